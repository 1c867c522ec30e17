"""Tools: the epoch benchmark's synthetic CIFAR and projection; the results grid's and sweep's recipes."""
import pytest

from lt_recipes.config import load_config
from lt_recipes.data import build_data
from lt_recipes.method import method_label
from toolload import load_tool

def _bench_epoch():
    return load_tool("bench_epoch")


def test_projection_hand_computed():
    # epochs: 0 start-up, 1-2 base (median 5), 3 grouping (10), 4-6 grouped (median 8)
    p = _bench_epoch().project([9.0, 5.0, 5.0, 10.0, 7.0, 8.0, 9.0], 3, epochs=200, group_start=20, interval=20)
    assert (p["t_base_s"], p["t_grouping_epoch_s"], p["t_grouped_s"], p["regroups"]) == (5.0, 10.0, 8.0, 9)
    # 20 * 5 + 180 * 8 + 9 * (10 - 8) = 1558 s; base alone 200 * 5 = 1000 s
    assert p["projected_method_h"] == pytest.approx(1558 / 3600) and p["projected_base_h"] == pytest.approx(1000 / 3600)
    assert p["method_over_base"] == pytest.approx(1.558)
    assert _bench_epoch().project([9.0, 5.0, 10.0, 8.0], 2, 10, 4, 0)["regroups"] == 1  # grouped once


def test_synthetic_cifar100_loads_as_cifar100_lt(tmp_path):
    _bench_epoch().write_synthetic_cifar(str(tmp_path), "cifar100")
    data = build_data(load_config("cifar100_lt_resnet32", [f"data.root={tmp_path}"]))
    assert data.num_classes == 100 and sum(data.lt_counts) == 10847  # the CIFAR-100-LT r=100 profile
    assert data.lt_counts[0] == 500 and data.lt_counts[-1] == 5 and len(data.test) == 10000


def test_grid_and_sweep_runs_are_valid_recipes_with_their_labels():
    """Every grid cell and sweep entry loads as a valid recipe whose results.json label is the folder's label."""
    grid = load_tool("run_grid")
    labels = grid.GRID + ["la+gkp+gsa@sam", "la+gkp+gsa@gsa_proj", "bs", "ldam_drw"]
    for label in labels:
        cfg = load_config("fmnist_lt_resnet8", grid.overrides(label, 10, 2))
        assert method_label(cfg) == label and cfg["data"]["imbalance_ratio"] == 10 and cfg["seed"] == 2
    names = [name for name, _, _ in grid.SWEEP]
    assert len(set(names)) == len(names)
    for name, label, keys in grid.SWEEP:
        cfg = load_config("fmnist_lt_resnet8", grid.overrides(label, 100, 0) + keys)
        assert method_label(cfg) == label, name
    cfg = load_config("fmnist_lt_resnet8", grid.overrides("ce+gkp+gsa", 100, 0) + dict(
        (n, k) for n, _, k in grid.SWEEP)["groupnorm_radius_div10"])
    assert cfg["model"]["norm_layer"] == "groupnorm" and cfg["gsa"]["rho_clamp"] == [0.0002, 0.0003]


def test_sweep_only_names_an_unknown_entry():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(load_tool("run_grid").ROOT) + "/tools/run_grid.py", "--sweep", "--only",
                           "lam1,no_such_run", "--workers", "0"], capture_output=True, text=True)  # 0: never trains
    assert proc.returncode != 0 and "no SWEEP entry named no_such_run" in proc.stderr
