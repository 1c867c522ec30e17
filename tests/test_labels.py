"""Run labels (lt_recipes.labels): one grammar that writes and reads every run's name, and the label a recipe trains
under, for every base, method and ascent direction."""
import subprocess
import sys

from lt_recipes.choices import DIRECTIONS, LOSSES
from lt_recipes.labels import DEFAULT_DIRECTION, RunLabel, format_label, method_label, parse_label
from lt_recipes.sections import DataConfig, GSAConfig, LossConfig, ModelConfig, Recipe
from lt_recipes.steps import list_methods, method_modules, split_method, step_info
from toolload import load_tool


def _base_sections(base: str) -> dict:
    """The data and model sections a base needs (LossConfig.PAIRED_KEYS, and BCL's contrastive heads)."""
    keys = {"data": {"imbalance_ratio": 10.0}, "model": {"proj_head": [8, 4]} if base == "bcl" else {}}
    for key, value in LossConfig.PAIRED_KEYS.get(base, {}).items():
        section, name = key.split(".")
        keys[section][name] = value
    return {"data": DataConfig(**keys["data"]), "model": ModelConfig(**keys["model"])}


def test_labels_round_trip_for_every_base_method_and_direction():
    """format -> parse gives the parts back and parse -> format the label, for every base x method x direction
    (with and without a variant); the label of a recipe built from those parts parses back to them."""
    seen = set()
    # a step labelled as another (released, as gsa) is told apart by its variant's reading, not by its label
    methods = [m for m in list_methods() if not step_info(split_method(m)[0]).label]
    for base in LOSSES:
        for method in methods:
            modules = "+".join(method_modules(method))
            directions = DIRECTIONS if "gsa" in method_modules(method) else (DEFAULT_DIRECTION,)
            for direction in directions:
                for variant in ("", "G2", "paper_exact_rho_div10_G6"):
                    label = format_label(base, modules, direction, variant)
                    parsed = parse_label(label)
                    assert parsed == RunLabel(base, modules, direction, variant), label
                    assert str(parsed) == label and parsed.method == method, label
                    assert parsed.plain == format_label(base, modules, direction)
                    seen.add(label)
                recipe = Recipe(method=method, loss=LossConfig(name=base), steps={"gsa": GSAConfig(
                    direction=direction, perturbation="per_group_exact")}, **_base_sections(base))
                assert parse_label(method_label(recipe)) == RunLabel(base, modules, direction), (base, method)
    assert len(seen) == len(LOSSES) * 3 * (len(methods) + 2 * (len(DIRECTIONS) - 1))
    # the default direction is not written; the released step's direction is its own, not the label's
    assert format_label("bcl", "gkp+gsa", DEFAULT_DIRECTION) == "bcl+gkp+gsa"
    released = Recipe(method="gkp_released", loss=LossConfig(name="bcl"),
                      **_base_sections("bcl"))
    assert method_label(released) == "bcl+gkp+gsa"


def test_every_grid_label_is_in_the_grammar():
    """Every label the results grids run is a canonical label: parsing and writing it back gives it unchanged, and
    its method is a registered one."""
    grid = load_tool("run_grid")
    for name, g in grid.GRIDS.items():
        for label, _, _ in grid.jobs_of(name, sorted(g.cells, key=str), [0]):
            assert str(parse_label(label)) == label, (name, label)
            assert parse_label(label).method in list_methods(), (name, label)


def test_labels_import_without_torch():
    """The tools read labels without importing torch (the grammar is plain strings)."""
    code = "import sys, lt_recipes.labels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
