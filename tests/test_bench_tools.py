"""The epoch benchmark's synthetic CIFAR and its projection of a full schedule."""
import importlib.util
import sys
from pathlib import Path

import pytest

from lt_recipes.config import load_config
from lt_recipes.data import build_data

ROOT = Path(__file__).resolve().parents[1]


def _bench_epoch():
    if "tool_bench_epoch" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tool_bench_epoch", ROOT / "tools" / "bench_epoch.py")
        sys.modules["tool_bench_epoch"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["tool_bench_epoch"])
    return sys.modules["tool_bench_epoch"]


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
