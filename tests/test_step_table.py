"""The step table: a step registered from outside the package is named in a recipe and trained like a built-in one,
and adding one takes what docs/architecture.md ("Adding a step") lists."""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lt_recipes import step_table
from lt_recipes.config import ConfigError, load_config, load_recipe
from lt_recipes.sections import FLOAT, Section, key
from lt_recipes.steps import StepCore, StepStats, list_methods, register_step, registry

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HalfConfig(Section):
    """The toy step's recipe section: its one option, with its default and check."""

    section: ClassVar[str] = "half"
    factor: float = key(0.5, FLOAT, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")


class HalfStep(StepCore):
    """A toy step of our own: the plain step on `factor` times the batch loss, recording its calls and factor."""

    calls: list = []

    def __init__(self, model, base_optimizer, factor: float = HalfConfig.factor, **kw) -> None:
        super().__init__(model, base_optimizer, **kw)
        self.factor = factor

    def step(self, loss_fn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        type(self).calls.append(self.factor)
        return self.plain_step(lambda idx: self.factor * loss_fn(idx), targets, alpha)


@pytest.fixture
def toy_step(monkeypatch):
    """`half` registered from here with its section, the way a user registers a step; the table and registry are
    restored after."""
    monkeypatch.setattr(step_table, "_INFO", dict(step_table._INFO))
    monkeypatch.setattr(registry, "_CLASSES", dict(registry._CLASSES))
    monkeypatch.setattr(HalfStep, "calls", [])
    register_step("half", section=HalfConfig, summary="the plain step on a share of the loss")(HalfStep)
    return HalfStep


def test_a_step_registered_outside_the_package_is_named_in_a_recipe(toy_step):
    """Before registration the recipe refuses the name with the known ones; after it, `half` and `gkp_half` load."""
    assert "half" in list_methods() and "gkp_half" in list_methods()
    cfg = load_config("digits_lt", ["method=half", "half.factor=0.25"])
    assert cfg["method"] == "half" and cfg["half"] == {"factor": 0.25}
    assert load_config("digits_lt", ["method=gkp_half"])["method"] == "gkp_half"
    with pytest.raises(ConfigError, match=r"'half.factor' = 2.0: must be in \[0, 1\]"):
        load_config("digits_lt", ["method=half", "half.factor=2"])


def test_an_unknown_method_fails_early_with_the_names():
    with pytest.raises(ConfigError, match=r"'method' = 'half': must be one of \['none', 'sam'"):
        load_config("digits_lt", ["method=half"])


@pytest.mark.usefixtures("single_thread")
def test_a_user_registered_step_trains_from_a_recipe(toy_step, tmp_path):
    """One tiny epoch of digits with method=half: the engine builds the user's class and every training step is its."""
    from lt_recipes.engine import run

    cfg = load_recipe("digits_lt", ["method=half", "half.factor=0.25", "epochs=1", "data.batch_size=128",
                                    "data.test_per_class=10", "data.val_per_class=2"])
    res = run(cfg, str(tmp_path))
    assert res["method"] == "ce+half" and toy_step.calls and set(toy_step.calls) == {0.25}
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "ce+half"
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 2  # one epoch trained


def test_adding_a_step_touches_the_files_the_docs_list():
    """docs/architecture.md's list for a built-in step: its module (class with register_step), its section in
    sections.py, one row in step_table.py; every built-in row names a module that registers its class under the
    row's name, and a section that the recipe holds."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\d\. `([^`]+)`", text.split("### Adding a step")[1].split("\n## ")[0], re.M)
    assert listed == ["lt_recipes/steps/<name>.py", "lt_recipes/sections.py", "lt_recipes/step_table.py"]
    from lt_recipes.sections import Recipe, section_class
    from lt_recipes.steps import step_class
    recipe = Recipe.from_dict(load_config("digits_lt"))
    for info in step_table._BUILTIN:
        cls = step_class(info.name)
        assert cls.__module__ == f"lt_recipes.steps.{info.module}", info.name
        if info.section:
            assert isinstance(getattr(recipe, info.section), section_class(info.section)), info.name
            assert section_class(info.section).__module__ == "lt_recipes.sections", info.name


def test_the_typed_recipe_holds_every_key_of_the_data():
    """Recipe.from_dict keeps every value, the step sections' included, and to_dict gives the same data back."""
    from lt_recipes.sections import Recipe
    cfg = load_config("digits_lt", ["sam.rho=0.07", "gsa.direction=sam", "released.z=0.2", "gbg.num_groups=3"])
    recipe = Recipe.from_dict(cfg)
    assert (recipe.sam.rho, recipe.gsa.direction, recipe.released.z, recipe.gbg.num_groups) == (0.07, "sam", 0.2, 3)
    assert recipe.to_dict() == cfg


RELEASED_RUN = ROOT / "results" / "fmnist64_r100" / "bcl+gkp+gsa#released" / "seed0" / "args.yaml"


def test_a_released_run_written_before_the_step_had_its_row_loads_and_resumes():
    """A committed args.yaml of `reading: released` (method gkp_gsa with gsa.step released and the script's keys in
    the gsa section) loads as method gkp_released with the same values, and its checkpoint identity matches."""
    import yaml
    from lt_recipes.config import flatten, retired_identity
    old = flatten(yaml.safe_load(RELEASED_RUN.read_text()))
    assert (old["method"], old["gsa.step"], old["gsa.direction"]) == ("gkp_gsa", "released", "friendly")
    new = flatten(load_config(str(RELEASED_RUN)))
    assert new["method"] == "gkp_released" and "gsa.step" not in new
    assert {k: new[k] for k in ("released.z", "released.rho_clamp", "released.scale", "released.friendly_sigma",
                                "released.friendly_momentum")} == {
        "released.z": old["gsa.z"], "released.rho_clamp": old["gsa.rho_clamp"], "released.scale": old["gsa.scale"],
        "released.friendly_sigma": old["gsa.friendly_sigma"], "released.friendly_momentum": old["gsa.friendly_momentum"]}
    kept = [k for k in old if not k.startswith("gsa.") and k not in ("method", "sam.adaptive")]
    assert all(new[k] == old[k] for k in kept)
    identity = retired_identity({"method": old["method"], "config": old})
    assert identity["method"] == "gkp_released"
    assert all(new[k] == v for k, v in identity["config"].items())


def test_the_base_pairings_have_one_home():
    """Each base's keys in the run grid are its loss and LossConfig.PAIRED_KEYS: every base loads with them, and the
    recipe refuses a pairing left out (the check and the grid read the same table)."""
    from toolload import load_tool
    from lt_recipes.choices import LOSSES
    from lt_recipes.sections import LossConfig
    bases = load_tool("run_grid").BASES
    assert set(bases) == set(LOSSES)
    for name, keys in bases.items():
        assert load_config("digits_lt", keys)["loss"]["name"] == name
        for paired in LossConfig.PAIRED_KEYS.get(name, {}):
            assert any(k.startswith(f"{paired}=") for k in keys), (name, paired)
            with pytest.raises(ConfigError, match=f"loss.name={name}"):
                load_config("digits_lt", [k for k in keys if not k.startswith(f"{paired}=")])


def test_reading_released_builds_the_released_step_with_the_scripts_values():
    """`reading: released` names the step (gkp_gsa -> gkp_released) and the step takes its section's values: the
    script's radius C 0.1, clamp [0.002, 0.003], FriendlySAM sigma 1 and EMA 0.9, adaptive scaling."""
    from lt_recipes.steps import create_step, split_method, step_info
    recipe = load_recipe("cifar100_lt_resnet32", ["reading=released"])
    step_name = split_method(recipe.method)[0]
    assert recipe.method == "gkp_released"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    step = create_step(step_name, model, torch.optim.SGD(model.parameters(), lr=0.1),
                       **recipe.step_options(step_info(step_name).section))
    assert type(step).__name__ == "ReleasedGSA"
    assert (step.z, step.rho_clamp, step.sigma, step.lam, step.scale) == (0.1, (0.002, 0.003), 1.0, 0.9, "adaptive")
    assert (recipe.gkp.lam, recipe.alpha.start, recipe.alpha.end, recipe.groups.num_groups) == (10.0, 0.9, 0.8, 1)
