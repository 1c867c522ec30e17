"""What a new user hits first: short runs with one override, resume checks, readable epoch logs, the CLI's conveniences."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lt_recipes.config import RECIPE_DIR, ConfigError, load_config
from test_engine import ROOT, launch

RECIPES = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


# ---- schedules scale with epochs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("epochs", [1, 2, 3, 5])
def test_every_recipe_takes_a_short_run_in_one_override(name, epochs):
    """--set epochs=N alone: warm-up, grouping start, refresh interval and milestones follow the run's length."""
    cfg = load_config(name, [f"epochs={epochs}"])
    s, g = cfg["sched"], cfg["groups"]
    assert 0 <= s["warmup_epochs"] < epochs and 0 <= g["start_epoch"] < epochs and g["interval"] >= 0
    assert all(isinstance(m, int) and 1 <= m <= epochs for m in s["decay_milestones"])
    assert isinstance(s["warmup_epochs"], int) and isinstance(g["start_epoch"], int)


def test_fractions_resolve_to_the_recipes_own_epochs_and_scale():
    """At a recipe's own length the fractions are its protocol's epochs; halved, they halve."""
    c = load_config("cifar100_lt_resnet32")
    assert (c["sched"]["warmup_epochs"], c["sched"]["decay_milestones"]) == (5, [160, 180])
    assert (c["groups"]["start_epoch"], c["groups"]["interval"]) == (20, 20)
    half = load_config("cifar100_lt_resnet32", ["epochs=100"])
    assert (half["sched"]["decay_milestones"], half["groups"]["start_epoch"]) == ([80, 90], 10)
    d = load_config("digits_lt")
    assert (d["sched"]["warmup_epochs"], d["groups"]["start_epoch"], d["groups"]["interval"]) == (1, 5, 10)
    assert load_config("digits_lt", ["epochs=10", "groups.start_epoch=0.5"])["groups"]["start_epoch"] == 5
    assert load_config("digits_lt", ["epochs=10", "groups.start_epoch=4"])["groups"]["start_epoch"] == 4


def test_help_example_and_one_epoch_without_the_method_work():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True)
    assert "--set epochs=5" in proc.stdout
    assert load_config("digits_lt", ["epochs=5"])["epochs"] == 5
    assert load_config("digits_lt", ["method=none", "epochs=1"])["sched"]["warmup_epochs"] == 0


@pytest.mark.parametrize("recipe,sets,key", [
    ("digits_lt", ["epochs=5", "groups.start_epoch=5"], "lower groups.start_epoch"),
    ("digits_lt", ["method=none", "epochs=1", "sched.warmup_epochs=1"], "lower sched.warmup_epochs"),
    ("cifar100_lt_resnet32", ["epochs=5", "sched.decay_milestones=[160, 180]"], "lower sched.decay_milestones"),
    ("digits_lt", ["groups.start_epoch=1.5"], "'groups.start_epoch'"),
])
def test_an_explicit_epoch_count_that_does_not_fit_names_the_key_to_change(recipe, sets, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(recipe, sets)


# ---- the CLI's conveniences ----------------------------------------------------------------------------------------
def test_a_number_in_a_yaml_list_is_a_number():
    assert load_config("digits_lt", ["data.std=[1e-40]", "data.mean=[0.5]"])["data"]["std"] == [1e-40]
