"""Recipes and overrides: every recipe loads, and every bad key or value is an error that names it."""
import os
import re
import subprocess
import sys
import time

import pytest

from lt_recipes.config import RECIPE_DIR, ConfigError, load_config, parse_override

RECIPES = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))
REQUIRED = ["cifar10_lt_resnet32", "cifar100_lt_resnet32", "imagenet_lt_resnet50", "imagenet_lt_resnext50",
            "inat2018_resnet50", "places_lt_resnet152", "fmnist_lt_resnet8", "digits_lt"]


def test_required_recipes_exist():
    assert set(REQUIRED) <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_common_keys(name):
    cfg = load_config(name)
    assert cfg["name"] == name
    for key in ("root", "imbalance_ratio"):
        assert key in cfg["data"]
    for key in ("epochs", "seed", "model", "loss", "method"):
        assert key in cfg


def test_paper_hyperparameters():
    c = load_config("cifar100_lt_resnet32")
    assert (c["epochs"], c["data"]["batch_size"], c["optim"]["lr"], c["optim"]["weight_decay"]) == (200, 256, 0.15, 5e-4)
    assert c["sched"]["decay_milestones"] == [160, 180] and c["sched"]["warmup_epochs"] == 5
    assert c["loss"]["name"] == "bcl" and (c["loss"]["bcl_alpha"], c["loss"]["bcl_beta"]) == (2.0, 0.6)
    assert c["groups"]["num_groups"] == 4 and c["gkp"]["lam"] == 100.0
    # the method's defaults: the released code's adaptive perturbation (scale-owned radius and clamp), batch-share
    # group weights, GKP per training sample of a group
    assert (c["gsa"]["scale"], c["gsa"]["z"], c["gsa"]["rho_clamp"]) == ("adaptive", None, "auto")
    assert (c["gsa"]["group_weighting"], c["gkp"]["norm"]) == ("samples", "per_samples")
    assert (c["gsa"]["group_grads"], c["gsa"]["perturbation"], c["reading"]) == ("masked", "per_group_exact",
                                                                                  "paper")
    i = load_config("imagenet_lt_resnext50")
    assert i["groups"]["num_groups"] == 6 and i["model"]["name"] == "resnext50_32x4d" and i["epochs"] == 90
    assert load_config("inat2018_resnet50")["optim"]["lr"] == 0.2


def test_ldam_takes_only_its_faithful_classifier():
    """LDAM's authors pair it with an unscaled cosine classifier; the loss owns the scale s (30 x 30 otherwise)."""
    for bad in ([], ["model.classifier=cosine"], ["model.cosine_scale=1"]):
        with pytest.raises(ConfigError, match="loss.name=ldam_drw pairs with an unscaled cosine classifier"):
            load_config("digits_lt", ["loss.name=ldam_drw", *bad])
    cfg = load_config("digits_lt", ["loss.name=ldam_drw", "model.classifier=cosine", "model.cosine_scale=1"])
    assert cfg["model"]["cosine_scale"] == 1.0


def test_radius_and_clamp_keys():
    cfg = load_config("digits_lt", ["gsa.z=0", "gsa.rho_clamp=null", "gsa.scale=euclidean"])
    assert (cfg["gsa"]["z"], cfg["gsa"]["rho_clamp"], cfg["gsa"]["scale"]) == (0.0, None, "euclidean")
    with pytest.raises(ConfigError, match="'gsa.rho_clamp' = 'tight': must be auto, null or"):
        load_config("digits_lt", ["gsa.rho_clamp=tight"])
    with pytest.raises(ConfigError, match="'gsa.z' = -1.0: must be >= 0"):
        load_config("digits_lt", ["gsa.z=-1"])


def test_overrides_apply_and_parse_yaml():
    cfg = load_config("digits_lt", ["epochs=8", "data.root=/x", "gsa.rho_clamp=[0.002, 0.003]", "optim.lr=1"])
    assert cfg["epochs"] == 8 and cfg["data"]["root"] == "/x" and cfg["gsa"]["rho_clamp"] == [0.002, 0.003]
    assert isinstance(cfg["optim"]["lr"], float)
    assert load_config("digits_lt", ["optim.lr=1e-3", "optim.weight_decay=5e-4"])["optim"]["lr"] == 1e-3
    assert parse_override("model.pretrained_path=null") == ("model.pretrained_path", None)


@pytest.mark.parametrize("override, words", [
    ("epochz=3", "'epochz'"),
    ("data.rooot=/x", "'data.rooot'"),
    ("epochs=-1", "'epochs'"),
    ("epochs=two", "'epochs'"),
    ("groups.num_groups=0", "'groups.num_groups'"),
    ("data.imbalance_ratio=0.5", "'data.imbalance_ratio'"),
    ("gsa.direction=up", "'gsa.direction'"),
    ("method=magic", "'method'"),
    ("loss.name=bcl", "contrastive_views"),
    ("data=3", "'data' is a section"),
    ("epochs", "KEY=VALUE"),
    ("groups.start_epoch=100", "groups.start_epoch"),
    ("optim.lr=.nan", "not finite"),
    ("optim.opt=sgdd", "'optim.opt' = 'sgdd': not a timm optimizer (did you mean sgd"),
    ("optim.lr_base_scale=sqrt", "optim.lr_base_scale scales optim.lr_base"),
    ("optim.lr_base_scale=cubic", "'optim.lr_base_scale'"),
    ("optim.betas=[0.9]", "'optim.betas'"),
    ("ema.decay=1.5", "'ema.decay'"),
    ("log_with=nosuchtracker", "'log_with': 'nosuchtracker' is not an Accelerate tracker"),
    ("data.auto_augment=rand-n2-m10", "data.auto_augment applies to timm's transforms"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config("digits_lt", [override])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="method=gkp_gsa"):
        load_config("digits_lt", ["method=gkp", "gkp.fisher=ema"])
    with pytest.raises(ConfigError, match="model.proj_head"):
        load_config("digits_lt", ["loss.name=bcl", "data.contrastive_views=2"])
    with pytest.raises(ConfigError, match="model.proj_head=null"):
        load_config("digits_lt", ["model.proj_head=[32, 16]"])


def test_unknown_recipe_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nmodel:\n  nam: resnet8_cifar\n")
    with pytest.raises(ConfigError, match=f"{bad}.*'model.nam'"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_timm_and_accelerate_names_are_accepted():
    cfg = load_config("digits_lt", ["optim.opt=lookahead_adamw", "optim.lr_base=0.1", "optim.lr_base_scale=sqrt",
                                    "optim.betas=[0.9, 0.99]", "ema.decay=0.999", "log_with=tensorboard"])
    assert cfg["optim"]["opt"] == "lookahead_adamw" and cfg["log_with"] == "tensorboard"
    assert load_config("imagenet_lt_resnext50")["data"]["auto_augment"] == "rand-n2-m10"
    with pytest.raises(ConfigError, match="'data.auto_augment' = 'bogus' is not a timm augmentation policy"):
        load_config("imagenet_lt_resnext50", ["data.auto_augment=bogus"])
    with pytest.raises(ConfigError, match="data.augment=basic and data.auto_augment"):
        load_config("imagenet_lt_resnext50", ["data.augment=randaugment"])


def test_bad_key_is_reported_before_torch_or_timm_is_imported():
    """A typo costs a fraction of a second: config checks run before the heavy imports."""
    code = ("import sys\nfrom lt_recipes.config import ConfigError, load_config\ntry:\n"
            "    load_config('digits_lt', ['bad.key=1'])\nexcept ConfigError as e:\n"
            "    print(e, sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(RECIPE_DIR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "unknown recipe key 'bad.key' []"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(RECIPE_DIR), "train.py"), "--set",
                           "bad.key=1"], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and "unknown recipe key 'bad.key'" in proc.stderr
    assert elapsed < 2.0, f"train.py took {elapsed:.2f} s to reject a bad key"


def test_list_dataset_rejects_ratio():
    with pytest.raises(ConfigError, match="data.imbalance_ratio"):
        load_config("imagenet_lt_resnet50", ["data.imbalance_ratio=100"])


def test_a_reading_is_a_preset_applied_where_it_is_set():
    """reading=released sets the released script's keys over the recipe's; a key set after it wins; paper restores
    the schema defaults of the same keys but leaves the recipe's grouping epochs and G."""
    from lt_recipes.config import flatten
    from lt_recipes.sections import ReleasedConfig
    rel = flatten(load_config("cifar100_lt_resnet32", ["reading=released"]))
    script = {**ReleasedConfig.SCRIPT_RUN, "method": "gkp_released", "released.z": 0.1,
              "released.rho_clamp": [0.002, 0.003], "released.scale": "adaptive", "released.friendly_sigma": 1.0,
              "released.friendly_momentum": 0.9}
    assert all(rel[k] == v for k, v in script.items()) and rel["reading"] == "released"
    assert (rel["groups.num_groups"], rel["groups.start_epoch"], rel["gkp.lam"]) == (1, 0, 10.0)
    later = flatten(load_config("cifar100_lt_resnet32", ["reading=released", "groups.num_groups=4"]))
    assert later["groups.num_groups"] == 4 and later["method"] == "gkp_released"
    back = flatten(load_config("cifar100_lt_resnet32", ["gsa.direction=sam", "reading=paper"]))
    assert back["gsa.direction"] == "gsa" and back["groups.start_epoch"] == 20


@pytest.mark.parametrize("sets,match", [
    (["gsa.perturbation=averaged"], "cancels"),
    (["reading=released", "gsa.direction=sam"], "released script's step"),
    (["reading=released", "gkp.fisher=ema"], "gkp.fisher=ema"),
    (["reading=nope"], "must be one of"),
])
def test_readings_refuse_what_cannot_hold(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config("cifar100_lt_resnet32", sets)


def test_an_unknown_key_gets_the_closest_names(tmp_path):
    """As optimizer names do: a misspelled key names the keys it is closest to, in an override and in a file."""
    with pytest.raises(ConfigError, match=r"unknown recipe key 'gkp\.lamda' \(did you mean gkp\.lam\?\)"):
        load_config("digits_lt", ["gkp.lamda=3"])
    (tmp_path / "r.yaml").write_text("groups:\n  num_group: 3\n")
    with pytest.raises(ConfigError, match=r"'groups\.num_group' \(did you mean groups\.num_groups"):
        load_config(str(tmp_path / "r.yaml"))
