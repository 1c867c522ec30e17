"""Recipes: YAML files of nested keys, validated against one schema before any work starts.

Every key a recipe or an override (`--set data.root=/x`) may set is declared in `SCHEMA` with its default,
type and allowed range, so an unknown key or a bad value fails early with a message that names it. This module
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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import yaml

from .choices import (AFFINITIES, AUGMENTS, BACKENDS, BANK_DTYPES, CANCELLING_DIRECTIONS, CLASSIFIERS,
                      CONTRASTIVE_VIEWS, DATASETS, DIRECTIONS, FISHER_ESTIMATES, GKP_NORMS, GROUP_GRADS, GROUPED_STEPS,
                      IN_MEMORY_AUGMENTS, LIST_DATASETS, LOSSES, LR_BASE_SCALES, PERTURBATIONS, READINGS, SAMPLERS,
                      SCALES, SCHEDULERS, STATE_DTYPES, WEIGHTINGS)
from .errors import ConfigError
from .steps.registry import list_methods, split_method, step_info, uses_memory_groups

_logger = logging.getLogger(__name__)

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


@dataclass(frozen=True)
class Field:
    """One recipe key: default value, accepted types, optional extra check returning an error text or None, and for a
    key that takes one of a few names, those names (`choices`, from lt_recipes.choices)."""

    default: Any
    types: tuple
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False
    choices: tuple | None = None
    # an epoch count (or a list of them) that may be given as a fraction of `epochs`: resolve_epochs makes it whole
    of_epochs: bool = False


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _pair_of_increasing(v: Any) -> str | None:
    if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or not 0 <= v[0] <= v[1]:
        return "must be [low, high] with 0 <= low <= high"
    return None


def _clamp(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be auto, null or [low, high]"
    return _pair_of_increasing(v)


def _epoch_count(v: Any) -> str | None:
    if isinstance(v, int):
        return None if v >= 0 else "must be >= 0"
    return None if 0 <= v < 1 else "must be a whole number of epochs or a fraction of epochs in [0, 1)"


def _milestones(v: Any) -> str | None:
    ok = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 or isinstance(x, float) and 0 < x < 1 for x in v)
    return None if ok else "must be a list of epochs (positive integers) or of fractions of epochs in (0, 1)"


def _names(v: Any) -> str | None:
    names = [v] if isinstance(v, str) else v
    return None if names and all(isinstance(n, str) and n for n in names) else "must be a name or a list of names"


def _betas(v: Any) -> str | None:
    return None if len(v) in (2, 3) and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in v) \
        else "must be a list of 2 (or 3) numbers in [0, 1)"


def _dims(v: Any) -> str | None:
    return None if len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v) else "must be [hidden, out] positive integers"


INT = (int,)
FLOAT = (int, float)
STR = (str,)
BOOL = (bool,)
LIST = (list,)

SCHEMA: dict[str, Any] = {
    "name": Field("", STR),
    "epochs": Field(10, INT, _at_least(1)),
    "seed": Field(0, INT, _at_least(0)),
    # a registered step (lt_recipes.steps), with GKP as gkp_<step> (gkp alone: the plain step with GKP)
    "method": Field("none", STR, choices=list_methods()),
    # a named reading of the method: a preset of the keys in READINGS, applied where it is set (docs/method.md)
    "reading": Field("paper", STR, choices=READINGS),
    "log_interval": Field(50, INT, _at_least(1)),
    "checkpoint_interval": Field(1, INT, _at_least(1)),
    "max_nonfinite_steps": Field(20, INT, _at_least(1)),
    # experiment trackers through Accelerate (tensorboard, wandb, mlflow, ...): a name or a list, null = none
    "log_with": Field(None, (str, list), _names, nullable=True),
    "data": {
        "dataset": Field("digits", STR, choices=DATASETS),
        "root": Field(None, STR, nullable=True),
        "imbalance_ratio": Field(None, FLOAT, _at_least(1.0), nullable=True),
        "max_per_class": Field(None, INT, _at_least(1), nullable=True),
        "val_per_class": Field(10, INT, _at_least(0)),
        "test_per_class": Field(50, INT, _at_least(1)),
        "train_list": Field(None, STR, nullable=True),
        "val_list": Field(None, STR, nullable=True),
        "test_list": Field(None, STR, nullable=True),
        # list datasets: the class count (null: 1 + the largest label of the evaluation lists, or iNat's categories)
        "num_classes": Field(None, INT, _at_least(1), nullable=True),
        "img_size": Field(32, INT, _at_least(1)),
        "augment": Field("basic", STR, choices=AUGMENTS),
        # timm's policy string for list datasets (e.g. rand-n2-m10, original, augmix-m5), see timm.data.auto_augment
        "auto_augment": Field(None, STR, nullable=True),
        "contrastive_views": Field(0, INT, choices=CONTRASTIVE_VIEWS),
        "batch_size": Field(128, INT, _at_least(1)),
        "eval_batch_size": Field(256, INT, _at_least(1)),
        "num_workers": Field(0, INT, _at_least(0)),
        "sampler": Field("random", STR, choices=SAMPLERS),
        "skip_bad_images": Field(False, BOOL),
        "mean": Field(None, LIST, nullable=True),
        "std": Field(None, LIST, nullable=True),
    },
    "model": {
        "name": Field("resnet8_cifar", STR),
        "pretrained_path": Field(None, STR, nullable=True),
        "classifier": Field("linear", STR, choices=CLASSIFIERS),
        "cosine_scale": Field(30.0, FLOAT, _positive),
        "proj_head": Field(None, LIST, _dims, nullable=True),
        "drop_rate": Field(0.0, FLOAT, _between(0.0, 1.0)),
        "norm_layer": Field(None, STR, nullable=True),
    },
    "loss": {
        "name": Field("ce", STR, choices=LOSSES),
        "tau": Field(1.0, FLOAT),
        "ldam_max_m": Field(0.5, FLOAT, _positive),
        "ldam_s": Field(30.0, FLOAT, _positive),
        "drw_start": Field(0.8, FLOAT, _between(0.0, 1.0)),
        "drw_beta": Field(0.9999, FLOAT, _between(0.0, 1.0)),
        "bcl_alpha": Field(2.0, FLOAT, _at_least(0.0)),
        "bcl_beta": Field(0.6, FLOAT, _at_least(0.0)),
        "bcl_temperature": Field(0.1, FLOAT, _positive),
        "label_smoothing": Field(0.0, FLOAT, _between(0.0, 1.0)),
    },
    "optim": {
        "opt": Field("sgd", STR),  # any name in timm.optim.list_optimizers(), optionally lookahead_<name>
        "lr": Field(0.1, FLOAT, _positive),
        # timm's rule: with lr_base set, lr = lr_base * (global batch / lr_base_size), or its square root
        "lr_base": Field(None, FLOAT, _positive, nullable=True),
        "lr_base_size": Field(256, INT, _at_least(1)),
        "lr_base_scale": Field(None, STR, nullable=True, choices=LR_BASE_SCALES),
        "momentum": Field(0.9, FLOAT, _between(0.0, 1.0)),
        "weight_decay": Field(5e-4, FLOAT, _at_least(0.0)),
        "nesterov": Field(False, BOOL),
        "eps": Field(None, FLOAT, _positive, nullable=True),
        "betas": Field(None, LIST, _betas, nullable=True),
        "clip_grad": Field(None, FLOAT, _positive, nullable=True),
    },
    "ema": {
        "decay": Field(None, FLOAT, _between(0.0, 1.0), nullable=True),  # timm's ModelEmaV3; null = no EMA
        "warmup": Field(False, BOOL),
    },
    "sched": {
        "sched": Field("cosine", STR, choices=SCHEDULERS),
        "warmup_epochs": Field(0, FLOAT, _epoch_count, of_epochs=True),
        "warmup_lr": Field(1e-4, FLOAT, _at_least(0.0)),
        "min_lr": Field(0.0, FLOAT, _at_least(0.0)),
        "decay_milestones": Field([], LIST, _milestones, of_epochs=True),
        "decay_rate": Field(0.1, FLOAT, _positive),
    },
    "groups": {
        "num_groups": Field(4, INT, _at_least(1)),
        # the paper's: groups from 10% of the run, refreshed every 10%
        "start_epoch": Field(0.1, FLOAT, _epoch_count, of_epochs=True),
        "interval": Field(0.1, FLOAT, _epoch_count, of_epochs=True),
        "eval_interval": Field(1, INT, _at_least(1)),
        "quality_beta": Field(0.5, FLOAT, _at_least(0.0)),
        "affinity": Field("cosine", STR, choices=AFFINITIES),
        "bank_dtype": Field("fp32", STR, choices=BANK_DTYPES),
        "bank_spill_dir": Field(None, STR, nullable=True),
    },
    "gkp": {
        "lam": Field(100.0, FLOAT, _at_least(0.0)),
        "norm": Field("per_samples", STR, choices=GKP_NORMS),
        "fisher": Field("batch_mean", STR, choices=FISHER_ESTIMATES),
        "fisher_ema": Field(0.9, FLOAT, _between(0.0, 1.0)),
        "fisher_batches": Field(0, INT, _at_least(0)),
        # per_sample: most per-sample gradients held at once (chunks of the evaluation batch); 0 = by memory
        "fisher_chunk": Field(0, INT, _at_least(0)),
        "state_dtype": Field("fp32", STR, choices=STATE_DTYPES),
    },
    "gsa": {
        "step": Field("grouped", STR, choices=GROUPED_STEPS),
        "direction": Field("gsa", STR, choices=DIRECTIONS),
        "scale": Field("adaptive", STR, choices=SCALES),
        "z": Field(None, FLOAT, _at_least(0.0), nullable=True),
        "rho_clamp": Field("auto", LIST + STR, _clamp, nullable=True),
        "group_grads": Field("masked", STR, choices=GROUP_GRADS),
        "perturbation": Field("per_group_exact", STR, choices=PERTURBATIONS),
        "group_weighting": Field("samples", STR, choices=WEIGHTINGS),
        "regularizer": Field(False, BOOL),
        "friendly_sigma": Field(1.0, FLOAT),
        "friendly_momentum": Field(0.9, FLOAT, _between(0.0, 1.0)),
        # > 0: the ascent directions from a per-group EMA (this decay) of the group gradients across steps
        "group_grad_ema": Field(0.0, FLOAT, _between(0.0, 0.999)),
        "sync": Field(True, BOOL),
        "backend": Field("auto", STR, choices=BACKENDS),
    },
    # the sharpness-aware peers' options, one section per step (lt_recipes.steps), each at its authors' CIFAR-100-LT
    # setting (docs/method.md, "The sharpness-aware peers")
    "sam": {"rho": Field(0.05, FLOAT, _at_least(0.0))},
    "asam": {"rho": Field(2.0, FLOAT, _at_least(0.0))},
    "fsam": {
        "rho": Field(0.2, FLOAT, _at_least(0.0)),
        "sigma": Field(1.0, FLOAT),
        "lam": Field(0.6, FLOAT, _between(0.0, 1.0)),
    },
    "imbsam": {
        "rho": Field(0.05, FLOAT, _at_least(0.0)),
        # the tail is {c : n_c < eta}; null: the few-shot boundary of the Many/Medium/Few split (20 images)
        "eta": Field(None, FLOAT, _positive, nullable=True),
    },
    "focal_sam": {
        "rho": Field(0.3, FLOAT, _at_least(0.0)),
        "gamma": Field(3.2, FLOAT, _at_least(0.0)),
        "lam": Field(0.8, FLOAT, _between(0.0, 1.0)),
    },
    "cc_sam": {
        "rho": Field(1e-6, FLOAT, _at_least(0.0)),
        "beta": Field(0.5, FLOAT, _between(0.0, 1.0)),
    },
    "gbg": {"num_groups": Field(4, INT, _at_least(1))},
    "alpha": {
        "start": Field(0.95, FLOAT, _between(0.0, 1.0)),
        "end": Field(0.6, FLOAT, _between(0.0, 1.0)),
    },
}


# The released script's reading (ChenShengHan100/gkp-gsa; docs/method.md): its step, radius, GKP strength, alpha
# schedule, and one group formed once from the initial weights, as its README runs it.
RELEASED: dict[str, Any] = {
    "gsa.step": "released", "gsa.direction": "friendly", "gsa.perturbation": "averaged", "gsa.scale": "adaptive",
    "gsa.z": 0.1, "gsa.rho_clamp": [0.002, 0.003], "gsa.friendly_sigma": 1.0, "gsa.friendly_momentum": 0.9,
    "gsa.group_weighting": "samples", "gkp.lam": 10.0, "gkp.norm": "per_samples", "gkp.fisher": "batch_mean",
    "alpha.start": 0.9, "alpha.end": 0.8, "groups.num_groups": 1, "groups.start_epoch": 0, "groups.interval": 0}
# Keys a recipe sets for its data (the paper's G and grouping epochs per benchmark): `paper` leaves them to the recipe.
RECIPE_DEPENDENT = ("groups.num_groups", "groups.start_epoch", "groups.interval")


def reading_preset(name: str) -> dict[str, Any]:
    """The recipe keys a reading sets: `released` its script's values; `paper` the schema defaults (the paper's
    equations and the measured choices where it is silent) of the same keys, except those a recipe sets for its data."""
    if name not in READINGS:
        raise ConfigError(f"unknown reading {name!r} (one of {list(READINGS)})")
    if name == "released":
        return dict(RELEASED)
    return {k: copy.deepcopy(_field(k).default) for k in RELEASED if k not in RECIPE_DEPENDENT}


def defaults(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configuration every recipe starts from."""
    schema = SCHEMA if schema is None else schema
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _field(key: str) -> Field:
    node: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown recipe key '{key}'")
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
    f = _field(key)
    if value is None:
        if f.nullable:
            return None
        raise ConfigError(f"recipe key '{key}' may not be null")
    if isinstance(value, str) and f.types == FLOAT:
        value = _yaml_number(value)
    elif isinstance(value, list):
        value = [_yaml_number(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, bool) and bool not in f.types:
        raise ConfigError(f"recipe key '{key}': expected {'/'.join(t.__name__ for t in f.types)}, got {value!r}")
    if not isinstance(value, f.types):
        raise ConfigError(f"recipe key '{key}': expected {'/'.join(t.__name__ for t in f.types)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"recipe key '{key}': value {value!r} is not finite")
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"recipe key '{key}' = {value!r}: must be one of {list(f.choices)}")
    if f.check is not None:
        err = f.check(value)
        if err:
            raise ConfigError(f"recipe key '{key}' = {value!r}: {err}")
    return value


def _merge(cfg: dict[str, Any], update: dict[str, Any], prefix: str, source: str) -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if not isinstance(cfg.get(k), dict):
                raise ConfigError(f"{source}: unknown recipe key '{key}'" if k not in cfg
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
    return textwrap.shorten(re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0], width, placeholder=" ...")


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


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Cross-key checks: combinations of keys that cannot work together."""
    data, loss, model = cfg["data"], cfg["loss"], cfg["model"]
    if data["dataset"] in LIST_DATASETS:
        if data["imbalance_ratio"] is not None:
            raise ConfigError(f"recipe key 'data.imbalance_ratio' does not apply to {data['dataset']} "
                              "(its long tail comes from the list files); set it to null")
    elif data["imbalance_ratio"] is None:
        raise ConfigError(f"recipe key 'data.imbalance_ratio' is required for {data['dataset']}")
    elif data["num_classes"] is not None:
        raise ConfigError(f"recipe key 'data.num_classes' applies to the list-file datasets {list(LIST_DATASETS)}; "
                          f"{data['dataset']} has a fixed class count: set it to null")
    if loss["name"] == "bcl":
        if data["contrastive_views"] != 2:
            raise ConfigError("loss.name=bcl needs data.contrastive_views=2 (two extra contrastive views per image)")
        if model["proj_head"] is None:
            raise ConfigError("loss.name=bcl needs model.proj_head=[hidden, out] (the contrastive heads)")
    elif model["proj_head"] is not None:
        raise ConfigError("model.proj_head builds the contrastive heads of loss.name=bcl; unused heads break DDP "
                          f"with loss.name={loss['name']}: set model.proj_head=null")
    elif data["contrastive_views"]:
        raise ConfigError(f"data.contrastive_views={data['contrastive_views']} is only used by loss.name=bcl, "
                          f"not {loss['name']}")
    if loss["name"] == "ldam_drw" and (model["classifier"] != "cosine" or model["cosine_scale"] != 1.0):
        raise ConfigError("loss.name=ldam_drw pairs with an unscaled cosine classifier, as in LDAM's own code (the "
                          "loss multiplies the margin-shifted cosines by loss.ldam_s): set model.classifier=cosine "
                          f"and model.cosine_scale=1 (got {model['classifier']}, scale {model['cosine_scale']:g})")
    if cfg["alpha"]["end"] > cfg["alpha"]["start"]:
        raise ConfigError("alpha.end must not exceed alpha.start (alpha decays over the method's epochs)")
    if uses_memory_groups(cfg["method"]) and cfg["groups"]["start_epoch"] >= cfg["epochs"]:
        raise ConfigError(f"groups.start_epoch={cfg['groups']['start_epoch']} must be < epochs={cfg['epochs']} "
                          f"for method={cfg['method']}: lower groups.start_epoch, or give it as a fraction of the "
                          "run (groups.start_epoch=0.1: from 10% of epochs)")
    gsa = cfg["gsa"]
    if gsa["perturbation"] == "averaged" and gsa["direction"] in CANCELLING_DIRECTIONS and gsa["step"] == "grouped":
        raise ConfigError(f"gsa.perturbation=averaged with gsa.direction={gsa['direction']} cancels: the batch-share "
                          "mean of the projected directions h_g is exactly zero (sum_g w_g h_g = g - g), so the tail "
                          "groups' losses fall in the perturbed pass; set gsa.perturbation=per_group (or "
                          "per_group_exact), or another gsa.direction")
    if gsa["step"] == "released":
        fixed = {"direction": "friendly", "perturbation": "averaged", "group_weighting": "samples",
                 "group_grad_ema": 0.0}
        wrong = {k: gsa[k] for k, v in fixed.items() if gsa[k] != v}
        if wrong:
            raise ConfigError(f"gsa.step=released is the released script's step, which fixes "
                              f"{', '.join(f'gsa.{k}={v}' for k, v in fixed.items())}; got "
                              f"{', '.join(f'gsa.{k}={v}' for k, v in wrong.items())} (use gsa.step=grouped)")
        if cfg["gkp"]["fisher"] == "ema":
            raise ConfigError("gkp.fisher=ema needs the group gradients of gsa.step=grouped; the released step has none")
    if cfg["gkp"]["fisher"] == "ema" and cfg["method"] != "gkp_gsa":
        raise ConfigError("gkp.fisher=ema tracks the per-group gradients that GSA computes: it needs method=gkp_gsa")
    step = split_method(cfg["method"])[0]
    if step != "gsa" and (gsa["direction"] != "gsa" or gsa["step"] != "grouped"):
        raise ConfigError(f"gsa.direction and gsa.step set the grouped step of methods gsa/gkp_gsa, not "
                          f"method={cfg['method']} (its options are the section {step_info(step).section or 'none'})")
    sched = cfg["sched"]
    if sched["warmup_epochs"] >= cfg["epochs"]:
        raise ConfigError(f"sched.warmup_epochs={sched['warmup_epochs']} must be < epochs={cfg['epochs']}: lower "
                          "sched.warmup_epochs, or give it as a fraction of the run (sched.warmup_epochs=0.05: 5% of "
                          "epochs)")
    late = [m for m in sched["decay_milestones"] if m > cfg["epochs"]]
    if sched["sched"] in ("step", "multistep") and late:
        raise ConfigError(f"sched.decay_milestones={sched['decay_milestones']}: {late} lie past epochs={cfg['epochs']} "
                          "and are never reached: lower sched.decay_milestones, or give them as fractions of the run "
                          "(sched.decay_milestones=[0.8, 0.9]: at 80% and 90% of epochs)")
    if cfg["optim"]["lr_base_scale"] is not None and cfg["optim"]["lr_base"] is None:
        raise ConfigError("optim.lr_base_scale scales optim.lr_base, which is not set (set optim.lr_base or drop "
                          "optim.lr_base_scale)")
    if data["dataset"] in LIST_DATASETS and data["augment"] in IN_MEMORY_AUGMENTS:
        raise ConfigError(f"data.augment={data['augment']} is for the in-memory datasets; {data['dataset']} uses "
                          "timm's transforms: set data.augment=basic and data.auto_augment (e.g. rand-n2-m10)")
    if data["auto_augment"] is not None and data["dataset"] not in LIST_DATASETS:
        raise ConfigError(f"data.auto_augment applies to timm's transforms of {list(LIST_DATASETS)}, not "
                          f"{data['dataset']} (use data.augment)")
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


def check_registries(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check the names that live in timm's and Accelerate's registries; imports both, so it runs last."""
    _check_optimizer(cfg["optim"]["opt"])
    if cfg["data"]["auto_augment"] is not None:
        _check_auto_augment(cfg["data"]["auto_augment"])
    if cfg["log_with"] is not None:
        _check_trackers(cfg["log_with"])
    return cfg


def _apply_reading(cfg: dict[str, Any], name: Any, source: str) -> None:
    """Set the keys of reading `name` (a reading is a preset applied where it appears: later keys win)."""
    cfg["reading"] = _check_value("reading", name)
    for key, value in reading_preset(name).items():
        _merge(cfg, _nest(key, value), "", f"{source} (reading {name})")


def _retire(raw: dict[str, Any]) -> None:
    """Rewrite keys that runs trained before a schema change wrote into their args.yaml: `sam.adaptive` (method
    sam with ASAM's scaling) became the step `asam` with its own `asam.rho`."""
    sam = raw.get("sam")
    if isinstance(sam, dict) and "adaptive" in sam:
        if sam.pop("adaptive") is True and raw.get("method") in ("sam", "gkp_sam"):
            raw["method"] = raw["method"].replace("sam", "asam")
            raw["asam"] = {"rho": sam.pop("rho", SCHEMA["sam"]["rho"].default)}


def load_config(recipe: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a recipe (name or path), apply `KEY=VALUE` overrides, validate everything; raise ConfigError naming the key.

    A `reading` sets its preset of keys where it appears: in a recipe file before the file's other keys, in the
    overrides at its position. Keys, types, ranges and combinations are checked before timm or torch is imported;
    `check_registries` last.
    """
    path = recipe_path(recipe)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of keys")
    _retire(raw)
    cfg = defaults()
    if "reading" in raw:
        try:
            _apply_reading(cfg, raw["reading"], path)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _merge(cfg, raw, "", path)
    if not cfg["name"]:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    for text in overrides:
        key, value = parse_override(text)
        if key == "reading":
            try:
                _apply_reading(cfg, value, f"override '{text}'")
            except ConfigError as e:
                raise ConfigError(f"override '{text}': {e}") from None
        else:
            _merge(cfg, _nest(key, value), "", f"override '{text}'")
    return check_registries(validate(resolve_epochs(cfg)))


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging and comparison."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
