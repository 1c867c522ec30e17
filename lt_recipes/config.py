"""Recipes: YAML files of nested keys, validated against one schema before any work starts.

Every key a recipe or an override (`--set data.root=/x`) may set is a field of a typed section
(lt_recipes.sections) with its default, type, range and options; `SCHEMA` is derived from them, so an unknown key
or a bad value fails early with a message that names it. `load_recipe` gives the typed `Recipe`, built once from
the merged keys (its sections and the recipe check every key and combination), which the run passes on section by
section; `load_config` its `to_dict()`, the recipe as data (what args.yaml holds). This module
imports neither torch nor timm: a bad key or value is reported in a fraction of a second. Only the names that live
in timm's and Accelerate's registries (optimizer, augmentation policy, trackers) are checked against them, last,
by `check_registries`, which imports them when it runs.
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import yaml

from .choices import READINGS
from .errors import ConfigError
from .sections import FLOAT, Field, Recipe, ReleasedConfig, recipe_sections
from .step_table import method_of, split_method

_logger = logging.getLogger(__name__)

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


class _Schema(Mapping):
    """Every key a recipe may set, by section: derived from the typed sections (lt_recipes.sections), the one home of
    each key's default, type, range and options, when it is read (so the section of a step registered from outside
    is in it)."""

    def _now(self) -> dict[str, Any]:
        return {**Recipe.fields(), **{s.section: s.fields() for s in recipe_sections()}}

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


SCHEMA: Mapping[str, Any] = _Schema()


# A reading names the grouped step it trains (method gsa <-> released, GKP kept) and presets keys: `released` its
# script's run values (ReleasedConfig.SCRIPT_RUN: GKP strength, alpha, one group from epoch 0; the step's own options
# are its section's defaults), `paper` the schema defaults of the same keys, except those a recipe sets for its data,
# and of the grouped step's keys in which the two steps' passes differ.
READING_STEP: dict[str, dict[str, str]] = {"released": {"gsa": "released"}, "paper": {"released": "gsa"}}
RECIPE_DEPENDENT = ("groups.num_groups", "groups.start_epoch", "groups.interval")
_PAPER_STEP_KEYS = ("gsa.direction", "gsa.perturbation", "gsa.scale", "gsa.z", "gsa.rho_clamp", "gsa.friendly_sigma",
                    "gsa.friendly_momentum", "gsa.group_weighting")

# train.py --tiny: any recipe as a minutes-long CPU try-out of its whole path (warm-up, grouping, Fisher, GKP+GSA,
# checkpoint, test) with its own model, base and method (docs/usage.md, "Trying a big recipe small"). The numbers
# are caps, a recipe's smaller value stays (null counts as no limit); the other keys are set as given; --set wins.
TINY_CAPS: dict[str, int | float] = {
    "epochs": 2, "data.img_size": 32, "data.batch_size": 16, "data.eval_batch_size": 64,
    "data.max_per_class": 50, "data.imbalance_ratio": 10.0, "data.val_per_class": 2, "data.test_per_class": 10,
    "groups.num_groups": 2, "gkp.fisher_batches": 1}
TINY_SET: dict[str, Any] = {"data.num_workers": 0, "groups.bank_dtype": "bf16", "gkp.state_dtype": "bf16"}
# a cap on these applies to a null value too (null: no limit), not to a list dataset's unset imbalance ratio
_NULL_IS_UNLIMITED = ("data.max_per_class",)


def tiny_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys --tiny sets on `cfg` (TINY_CAPS, TINY_SET); gkp.fisher_batches 0 means every batch, so it is capped."""
    flat, out = flatten(cfg), dict(TINY_SET)
    for key, cap in TINY_CAPS.items():
        value = flat[key]
        if value is None:
            if key in _NULL_IS_UNLIMITED:
                out[key] = cap
        elif value > cap or (key == "gkp.fisher_batches" and value == 0):
            out[key] = cap
    return out


def reading_preset(name: str) -> dict[str, Any]:
    """The recipe keys a reading sets besides its step (READING_STEP): `released` its script's run values
    (ReleasedConfig.SCRIPT_RUN); `paper` the schema defaults (the paper's equations and the measured choices where it
    is silent) of the same keys, except those a recipe sets for its data, and of the grouped step's pass keys."""
    if name not in READINGS:
        raise ConfigError(f"unknown reading {name!r} (one of {list(READINGS)})")
    if name == "released":
        return dict(ReleasedConfig.SCRIPT_RUN)
    keys = [k for k in ReleasedConfig.SCRIPT_RUN if k not in RECIPE_DEPENDENT] + list(_PAPER_STEP_KEYS)
    return {k: copy.deepcopy(_field(k).default) for k in keys}


def reading_step(cfg: dict[str, Any]) -> None:
    """Set the method's step to the one `cfg`'s reading names (gsa <-> released, GKP kept), in place; the released
    reading is refused for a method whose step is not the grouped one."""
    step, gkp = split_method(cfg["method"])
    steps = READING_STEP[cfg["reading"]]
    if cfg["reading"] == "released" and step not in (*steps, *steps.values()):
        raise ConfigError(f"reading=released is the released script's grouped step: it reads method gsa or gkp_gsa, "
                          f"not method={cfg['method']}")
    cfg["method"] = method_of(steps.get(step, step), gkp)


def defaults(schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The configuration every recipe starts from."""
    schema = SCHEMA if schema is None else schema
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _did_you_mean(key: str) -> str:
    """' (did you mean a.b?)' with the closest recipe keys to `key` (difflib), or ''."""
    close = difflib.get_close_matches(key, list(flatten(SCHEMA)), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _field(key: str) -> Field:
    node: Any = dict(SCHEMA)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown recipe key '{key}'{_did_you_mean(key)}")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"recipe key '{key}' is a section; set one of its keys: {sorted(node)}")
    return node


def _yaml_number(text: str) -> float | str:
    """A number YAML 1.1 leaves as a string (1e-3, no dot) as a float, in a scalar or a list; other text as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _check_value(key: str, value: Any) -> Any:
    """`value` for `key` as YAML gave it (a number YAML 1.1 left as text read as one), checked by the key's Field."""
    f = _field(key)
    if isinstance(value, str) and f.types == FLOAT:
        value = _yaml_number(value)
    elif isinstance(value, list):
        value = [_yaml_number(v) if isinstance(v, str) else v for v in value]
    return f.checked(key, value)


def _merge(cfg: dict[str, Any], update: dict[str, Any], prefix: str, source: str) -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if not isinstance(cfg.get(k), dict):
                raise ConfigError(f"{source}: unknown recipe key '{key}'{_did_you_mean(key)}" if k not in cfg
                                  else f"{source}: recipe key '{key}' is a value, not a section")
            _merge(cfg[k], v, key + ".", source)
        else:
            try:
                cfg[k] = _check_value(key, v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `KEY=VALUE`; VALUE is read as YAML so numbers, lists, null and booleans work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    f = _field(key)
    if isinstance(value, int) and not isinstance(value, bool) and f.types == FLOAT and not f.of_epochs:
        value = float(value)
    return key, value


def recipe_names() -> list[str]:
    """The recipes in recipes/, by name (file stem)."""
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def recipe_path(name: str) -> str:
    """Resolve a recipe name (file stem in recipes/) or a path to a YAML file."""
    if os.path.isfile(name):
        return name
    path = os.path.join(RECIPE_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(recipe_names())})")
    return path


def recipe_description(name: str, width: int = 120) -> str:
    """A recipe's one-line description (train.py --list): the first sentence of the comment its file opens with,
    shortened to `width` characters."""
    lines = []
    with open(recipe_path(name)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    return textwrap.shorten(re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0], width, placeholder=" ...",
                            break_on_hyphens=False)  # whole words only: "long-tailed", not "long- ..."


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _whole_epochs(value: int | float, epochs: int, low: int, high: int) -> int:
    """`value` epochs: a whole number as it is; a fraction of `epochs` rounded to the nearest epoch (halves up) and
    kept in [low, high] (a zero fraction stays 0)."""
    if isinstance(value, int) or value == 0:
        return int(value)
    return min(max(math.floor(value * epochs + 0.5), low), high)


def resolve_epochs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Turn the epoch counts given as fractions of `epochs` (floats in [0, 1)) into whole epochs, in place.

    So a recipe's schedule keeps its shape under `--set epochs=N`: the warm-up stays below `epochs`, grouping starts
    at epoch 1 or later (epoch 0 only for a 1-epoch run), a refresh interval is at least 1, and a learning-rate
    milestone lies in [1, epochs]. Whole numbers are kept as given (validate names a key that does not fit).
    """
    n, sched, groups = cfg["epochs"], cfg["sched"], cfg["groups"]
    sched["warmup_epochs"] = _whole_epochs(sched["warmup_epochs"], n, 0, n - 1)
    sched["decay_milestones"] = [_whole_epochs(m, n, 1, n) for m in sched["decay_milestones"]]
    groups["start_epoch"] = _whole_epochs(groups["start_epoch"], n, 1, n - 1)
    groups["interval"] = _whole_epochs(groups["interval"], n, 1, n)
    return cfg


def _check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers

    known = list_optimizers()
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        raise ConfigError(f"recipe key 'optim.opt' = {name!r}: not a timm optimizer"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + "; timm.optim.list_optimizers() lists them, lookahead_<name> wraps one in Lookahead")


def _check_auto_augment(policy: str) -> None:
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception as e:  # timm raises assertion, key and value errors for a malformed policy string
        raise ConfigError(f"recipe key 'data.auto_augment' = {policy!r} is not a timm augmentation policy "
                          f"(e.g. rand-n2-m10, original, augmix-m5): {type(e).__name__}: {e}") from None


def _check_trackers(log_with: str | list[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in [log_with] if isinstance(log_with, str) else log_with:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"recipe key 'log_with': {name!r} is not an Accelerate tracker "
                              f"(one of {sorted(LOGGER_TYPE_TO_CLASS)})")
        if name not in available:
            raise ConfigError(f"recipe key 'log_with': tracker {name!r} needs its package: pip install {name}")


def check_registries(recipe: Recipe) -> Recipe:
    """Check the names that live in timm's and Accelerate's registries; imports both, so it runs last."""
    _check_optimizer(recipe.optim.opt)
    if recipe.data.auto_augment is not None:
        _check_auto_augment(recipe.data.auto_augment)
    if recipe.log_with is not None:
        _check_trackers(recipe.log_with if isinstance(recipe.log_with, str) else list(recipe.log_with))
    return recipe


def _apply_reading(cfg: dict[str, Any], name: Any, source: str) -> None:
    """Set the keys of reading `name` (a reading is a preset applied where it appears: later keys win)."""
    cfg["reading"] = _check_value("reading", name)
    for key, value in reading_preset(name).items():
        _merge(cfg, _nest(key, value), "", f"{source} (reading {name})")


# what the released step took from the grouped step's section before it had its own (a `gsa.step: released` run)
_RELEASED_FROM_GSA = ("z", "rho_clamp", "scale", "friendly_sigma", "friendly_momentum", "backend")


def retire(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite, in place, keys that runs trained before a schema change wrote into their args.yaml (and checkpoint
    identity): `sam.adaptive` (method sam with ASAM's scaling) became the step `asam` with its own `asam.rho`;
    `gsa.step: released` (method gsa on the released script's step) became the step `released` with its own
    section (its null `z` and `auto` clamp were the script's, now that section's defaults), and `gsa.step: grouped`
    is method gsa itself."""
    sam = raw.get("sam")
    if isinstance(sam, dict) and "adaptive" in sam:
        if sam.pop("adaptive") is True and raw.get("method") in ("sam", "gkp_sam"):
            raw["method"] = raw["method"].replace("sam", "asam")
            raw["asam"] = {"rho": sam.pop("rho", SCHEMA["sam"]["rho"].default)}
    gsa = raw.get("gsa")
    if isinstance(gsa, dict) and "step" in gsa and gsa.pop("step") == "released":
        step, gkp = split_method(raw.get("method", "none"))
        if step == "gsa":
            raw["method"] = method_of("released", gkp)
            own = {k: gsa.pop(k) for k in _RELEASED_FROM_GSA if k in gsa}
            own = {k: v for k, v in own.items() if not (k == "z" and v is None or k == "rho_clamp" and v == "auto")}
            raw["released"] = {**own, **(raw.get("released") or {})}
            for k in ("direction", "perturbation", "group_weighting", "group_grad_ema"):  # what the step fixed
                gsa.pop(k, None)
    return raw


def retired_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's identity (its flattened recipe under `config`, its `method`) with `retire`'s rewrites, so a
    checkpoint written before a schema change resumes under the keys that replaced the old ones."""
    flat = identity.get("config")
    if not isinstance(flat, dict):
        return identity
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    config = flatten(retire(nested))
    return {**identity, "config": config, "method": config.get("method", identity.get("method"))}


def load_recipe(recipe: str, overrides: Sequence[str] = (), tiny: bool = False) -> Recipe:
    """Load a recipe (name or path), apply `KEY=VALUE` overrides, validate everything; raise ConfigError naming the key.
    The typed `Recipe` is built once, here: its sections check their keys, and the recipe the combinations across
    sections (Recipe.__post_init__).

    A `reading` sets its preset of keys where it appears: in a recipe file before the file's other keys, in the
    overrides at its position. `tiny` applies `tiny_overrides` after the file, before the overrides. Keys, types,
    ranges and combinations are checked before timm or torch is imported; `check_registries` last.
    """
    path = recipe_path(recipe)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of keys")
    retire(raw)
    cfg = defaults()
    if "reading" in raw:
        try:
            _apply_reading(cfg, raw["reading"], path)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _merge(cfg, raw, "", path)
    if "reading" in raw:  # the step of the file's method
        try:
            reading_step(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if not cfg["name"]:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    if tiny:
        for key, value in tiny_overrides(cfg).items():
            _merge(cfg, _nest(key, value), "", "--tiny")
    for text in overrides:
        key, value = parse_override(text)
        if key == "reading":
            try:
                _apply_reading(cfg, value, f"override '{text}'")
                reading_step(cfg)
            except ConfigError as e:
                raise ConfigError(f"override '{text}': {e}") from None
        else:
            _merge(cfg, _nest(key, value), "", f"override '{text}'")
    if cfg["reading"] == "released":  # a method set after the reading is read by it too
        reading_step(cfg)
    return check_registries(Recipe.from_dict(resolve_epochs(cfg)))


def load_config(recipe: str, overrides: Sequence[str] = (), tiny: bool = False) -> dict[str, Any]:
    """`load_recipe`'s recipe as data (what args.yaml holds: `Recipe.to_dict()`)."""
    return load_recipe(recipe, overrides, tiny).to_dict()


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging and comparison."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
