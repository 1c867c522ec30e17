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

import pytest

from lt_recipes import choices
from lt_recipes.config import SCHEMA, load_config, load_recipe
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
    methods), and no package module writes one of those tuples out again."""
    for section in (Recipe, *SECTIONS):
        for key, field in section.fields().items():
            if field.choices is None:
                continue
            if key == "method":
                assert field.choices == list_methods()
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


def test_no_default_is_written_twice():
    """No function or constructor in the package gives a literal default to a parameter named like a section key
    with that key's default: it takes it from the section (`rho: float = SAMConfig.rho`)."""
    defaults = _section_defaults()
    twice = []
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args.posonlyargs + node.args.args
            pairs = list(zip(args[len(args) - len(node.args.defaults):], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            for arg, default in pairs:
                value = _literal(default)
                if value is _NOT_LITERAL or value is None:
                    continue
                for key, key_default in defaults.get(arg.arg, []):
                    if value == key_default and type(value) is type(key_default):
                        twice.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}({arg.arg}="
                                     f"{value!r}) repeats {key}")
    assert not twice, "\n".join(twice)


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
    caplog.set_level(logging.WARNING, logger="lt_recipes.method")
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
