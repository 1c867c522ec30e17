"""One truth per fact: the typed recipe sections are the one home of every default and option list, the recipe schema
is derived from them, nothing in the package writes a default or an option list a second time, and the realised
number of groups has one owner."""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import logging
import pathlib
from typing import Iterator

import pytest

from lt_recipes import choices
from lt_recipes.config import SCHEMA, load_config, load_recipe
from lt_recipes.data import DATASETS
from lt_recipes.errors import ConfigError
from lt_recipes.sections import SECTIONS, GSAConfig, Recipe
from lt_recipes.steps import list_methods

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lt_recipes"
CHOICE_TUPLES = {name: value for name, value in vars(choices).items() if name.isupper() and isinstance(value, tuple)}


def _section_defaults() -> dict[str, list[tuple[str, object]]]:
    """Every section key's name -> [(section.key, default)], the keys of several sections under one name."""
    out: dict[str, list[tuple[str, object]]] = {}
    for section in SECTIONS:
        for name, field in section.fields().items():
            out.setdefault(name, []).append((f"{section.section}.{name}", field.default))
    return out


def _literal(node: ast.expr) -> object:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return _NOT_LITERAL
    return list(value) if isinstance(value, tuple) else value


_NOT_LITERAL = object()


def _package_sources() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("sections.py", "choices.py"))


def _defaults(path: pathlib.Path) -> Iterator[tuple[str, int, str, ast.expr]]:
    """(qualified function name, line, parameter, default expression) of every parameter default in a source file."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, str, ast.expr]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args.posonlyargs + child.args.args
                pairs = list(zip(args[len(args) - len(child.args.defaults):], child.args.defaults))
                pairs += [(a, d) for a, d in zip(child.args.kwonlyargs, child.args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    yield prefix + child.name, child.lineno, arg.arg, default
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    return walk(ast.parse(path.read_text()), "")


# The lower layers (the math, the ops, the models, the losses) take explicit arguments with literal defaults and do
# not import the recipe schema (tests/test_layers.py); each of those defaults that a recipe key also sets is listed
# here with that key, and must equal the key's default.
LITERAL_DEFAULTS = {
    ("equations.py", "feature_quality", "beta"): "groups.quality_beta",
    ("equations.py", "ascent_direction", "sigma"): "gsa.friendly_sigma",
    ("ops.py", "gsa_project", "backend"): "gsa.backend",
    ("ops.py", "gkp_penalty", "backend"): "gsa.backend",
    ("models.py", "CifarResNet.__init__", "drop_rate"): "model.drop_rate",
    ("models.py", "LTModel.__init__", "classifier"): "model.classifier",
    ("models.py", "LTModel.__init__", "cosine_scale"): "model.cosine_scale",
    ("losses.py", "LTLoss.__init__", "label_smoothing"): "loss.label_smoothing",
    ("losses.py", "LogitAdjusted.__init__", "tau"): "loss.tau",
    ("losses.py", "LogitAdjusted.__init__", "label_smoothing"): "loss.label_smoothing",
    ("losses.py", "BalancedSoftmax.__init__", "label_smoothing"): "loss.label_smoothing",
    ("losses.py", "LDAMDRW.__init__", "max_m"): "loss.ldam_max_m",
    ("losses.py", "LDAMDRW.__init__", "s"): "loss.ldam_s",
    ("losses.py", "LDAMDRW.__init__", "beta"): "loss.drw_beta",
    ("losses.py", "LDAMDRW.__init__", "label_smoothing"): "loss.label_smoothing",
    ("losses.py", "BCL.__init__", "alpha"): "loss.bcl_alpha",
    ("losses.py", "BCL.__init__", "beta"): "loss.bcl_beta",
    ("losses.py", "BCL.__init__", "temperature"): "loss.bcl_temperature",
    ("losses.py", "BCL.__init__", "tau"): "loss.tau",
    ("losses.py", "BCL.__init__", "label_smoothing"): "loss.label_smoothing",
    # the step core, GBG and GKP's Fisher estimate do not import the schema either
    ("steps/core.py", "StepCore.__init__", "backend"): "gsa.backend",
    ("steps/gbg.py", "GBG.__init__", "num_groups"): "gbg.num_groups",
    ("gkp.py", "estimate_fisher", "batch_size"): "data.eval_batch_size",
}


def _rel(path) -> str:
    """A package source's path under lt_recipes/, as LITERAL_DEFAULTS names it."""
    return path.relative_to(PACKAGE).as_posix()


def test_the_schema_is_derived_from_the_sections():
    """Every schema key is a section field carrying the very Field the schema checks with, and back."""
    assert set(SCHEMA) == set(Recipe.fields()) | {s.section for s in SECTIONS}
    for key, field in Recipe.fields().items():
        assert SCHEMA[key] is field, key
    for section in SECTIONS:
        assert SCHEMA[section.section].keys() == section.fields().keys(), section.section
        for key, field in section.fields().items():
            assert SCHEMA[section.section][key] is field, f"{section.section}.{key}"
    # the defaults are a recipe: the typed recipe of the defaults holds them (a list default is a tuple there)
    recipe = Recipe.from_dict(load_config("digits_lt"))
    for section in SECTIONS:
        typed = getattr(recipe, section.section)
        assert isinstance(typed, section) and dataclasses.is_dataclass(typed), section.section
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(typed, next(iter(section.fields())), None)


def test_every_option_list_is_one_registry_tuple():
    """A key that takes one of a few names offers a tuple of lt_recipes.choices itself (or the step registry's
    methods, or the dataset table's names), and no package module writes one of those tuples out again."""
    for section in (Recipe, *SECTIONS):
        for key, field in section.fields().items():
            if field.choices is None:
                continue
            if key == "method":
                assert field.choices == list_methods()
            elif key == "dataset":
                assert field.choices is DATASETS  # the dataset table's live names
            else:
                assert any(field.choices is t for t in CHOICE_TUPLES.values()), f"{section.section}.{key}"
    options = {tuple(t): name for name, t in CHOICE_TUPLES.items() if len(t) > 1}
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                value = _literal(node)
                if isinstance(value, (list, set)) and all(isinstance(v, (str, int)) for v in value) \
                        and tuple(value) in options:
                    pytest.fail(f"{path.name}:{node.lineno} writes choices.{options[tuple(value)]} out again")


def test_the_step_core_gbg_and_gkp_do_not_import_the_schema():
    """The step core, GBG and GKP's Fisher estimate take explicit arguments with literal defaults (LITERAL_DEFAULTS,
    compared with the sections below) instead of importing the recipe schema."""
    for module in ("steps/core.py", "steps/gbg.py", "gkp.py"):
        imported = {n.module for n in ast.walk(ast.parse((PACKAGE / module).read_text()))
                    if isinstance(n, ast.ImportFrom)}
        assert not {"sections", "lt_recipes.sections"} & imported, f"{module} imports the recipe schema"


def test_no_default_is_written_twice():
    """No function or constructor in the package gives a literal default to a parameter named like a section key
    with that key's default: it takes it from the section (`rho: float = SAMConfig.rho`), or, in a lower layer that
    does not import the schema, is listed in LITERAL_DEFAULTS, which the next test compares with the sections."""
    defaults = _section_defaults()
    twice = []
    for path in _package_sources():
        for name, line, arg, default in _defaults(path):
            value = _literal(default)
            if value is _NOT_LITERAL or value is None or (_rel(path), name, arg) in LITERAL_DEFAULTS:
                continue
            for key, key_default in defaults.get(arg, []):
                if value == key_default and type(value) is type(key_default):
                    twice.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name}({arg}={value!r}) repeats {key}")
    assert not twice, "\n".join(twice)


def test_the_lower_layers_literal_defaults_equal_the_sections():
    """Each literal default of LITERAL_DEFAULTS is there, a literal, and equal (value and type) to its key's default
    in the sections: a default changed in the schema and not in the math (or back) fails here."""
    keys = {f"{section.section}.{name}": field.default for section in SECTIONS
            for name, field in section.fields().items()}
    found = {}
    for path in {PACKAGE / f for f, _, _ in LITERAL_DEFAULTS}:
        for name, line, arg, default in _defaults(path):
            if (_rel(path), name, arg) in LITERAL_DEFAULTS:
                found[_rel(path), name, arg] = (line, _literal(default))
    assert found.keys() == LITERAL_DEFAULTS.keys(), f"not found: {sorted(LITERAL_DEFAULTS.keys() - found.keys())}"
    for where, key in LITERAL_DEFAULTS.items():
        line, value = found[where]
        assert value is not _NOT_LITERAL, f"{where[0]}:{line} {where[1]}({where[2]}) is not a literal"
        assert value == keys[key] and type(value) is type(keys[key]), \
            f"{where[0]}:{line} {where[1]}({where[2]}={value!r}) differs from {key} = {keys[key]!r}"


def test_a_hand_built_section_checks_itself():
    """The checks of a key and of keys of one section live in the section: a section built in an own loop (as a step
    constructor builds one from its arguments) refuses what a recipe file would."""
    with pytest.raises(ConfigError, match="'gsa.direction' = 'up': must be one of"):
        GSAConfig(direction="up")
    with pytest.raises(ConfigError, match="gsa.perturbation=averaged with gsa.direction=gsa cancels"):
        GSAConfig(perturbation="averaged")
    with pytest.raises(ConfigError, match="'sam.rho' = -1: must be >= 0"):
        from lt_recipes.steps import SAM
        import torch
        SAM(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), rho=-1)
    with pytest.raises(ConfigError, match="required for digits"):
        Recipe()


def test_fewer_groups_than_asked_are_said_once_and_read_everywhere(tmp_path, caplog):
    """digits has 10 classes: asking for 16 groups gives at most 10; the run says so once in its log (two
    groupings), and the step, summary.csv and groups.json all hold the realised count."""
    from lt_recipes.engine import Trainer

    cfg = load_recipe("digits_lt", ["epochs=3", "method=gsa", "gsa.perturbation=per_group", "groups.num_groups=16",
                                    "groups.start_epoch=1", "groups.interval=1", "data.batch_size=128"])
    caplog.set_level(logging.WARNING, logger="lt_recipes.grouping_cycle")
    trainer = Trainer(cfg, str(tmp_path))
    trainer.fit()
    said = [r for r in caplog.records if "groups of the 16 asked" in r.getMessage()]
    assert len(said) == 1, caplog.text
    realised = trainer.method.memory_groups.count
    assert realised <= 10 and trainer.method.step_fn.num_groups == realised
    assert trainer.method.step_fn.flat.rows.shape[0] == realised
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["num_groups"]) for r in rows] == [0, realised, realised]
    assert not any(f"loss_g{realised}" in r for r in rows)
    assert len(json.loads((tmp_path / "groups.json").read_text())["groups"]) == realised


def test_the_method_is_built_once_after_prepare(tmp_path, monkeypatch):
    """create_method runs once per run, with the optimizer and validation loader Accelerate prepared."""
    from lt_recipes import engine

    built = []
    real = engine.create_method
    monkeypatch.setattr(engine, "create_method", lambda *a, **kw: built.append(a) or real(*a, **kw))
    trainer = engine.Trainer(load_recipe("digits_lt", ["epochs=1"]), str(tmp_path))
    assert len(built) == 1
    assert trainer.method.optimizer is trainer.optimizer and trainer.method.val_loader is trainer.val_loader
    assert not hasattr(trainer.method, "bind")
