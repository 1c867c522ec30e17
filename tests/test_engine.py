"""train.py end to end: artifacts, 2-process DDP (torchrun, gloo), bf16 autocast, resume of a 2-process run."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TEST = 500  # 10 classes x data.test_per_class=50


def launch(out, *sets, nproc=1, extra=(), failpoint=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LT_RECIPES_FAILPOINT", None)
    if failpoint:
        env["LT_RECIPES_FAILPOINT"] = failpoint
    head = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(29600 + os.getpid() % 1000)]
    cmd = head + [os.path.join(ROOT, "train.py"), "--recipe", "digits_lt", "--output", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


GSA = ["epochs=3", "groups.start_epoch=1", "groups.interval=1"]


def test_single_process_gkp_gsa_artifacts_bf16(tmp_path):
    proc = launch(tmp_path, *GSA, extra=["--mixed-precision", "bf16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "ce+gkp+gsa" and res["num_test_evaluated"] == DIGITS_TEST
    for key in ("recipe", "dataset", "imbalance_ratio", "seed", "epochs", "top1", "many", "medium", "few"):
        assert key in res
    assert len(res["per_class"]) == 10
    groups = json.loads((tmp_path / "groups.json").read_text())
    assert groups["group_epochs"] == [1, 2] and len(groups["alpha"]) == 2
    assert sorted(c for g in groups["groups"] for c in g) == list(range(10))
    assert groups["memory_bank"]["snapshots"] == len(set(groups["memory_bank"]["class_snapshot"]))
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    for col in ("train_loss", "val_top1", "lr", "time", "loss_g0", "rho_g0", "gkp", "cos_g0"):
        assert col in rows[0]
    assert float(rows[2]["gkp"]) > 0 and float(rows[2]["rho_g0"]) > 0
    assert (tmp_path / "args.yaml").exists() and (tmp_path / "quality.json").exists()


def test_two_process_ddp_counts_every_test_sample_once(tmp_path):
    proc = launch(tmp_path, "epochs=2", "method=none", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_processes"] == 2 and res["num_test_evaluated"] == DIGITS_TEST
    assert sorted(os.listdir(tmp_path)) == ["args.yaml", "checkpoint.pt", "results.json", "summary.csv"]


def test_two_process_gkp_gsa_run_resumes_to_the_same_result(tmp_path):
    full = tmp_path / "full"
    proc = launch(full, *GSA, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = tmp_path / "cut"
    killed = launch(cut, *GSA, nproc=2, failpoint="step:6")  # each rank has 4 steps per epoch
    assert killed.returncode != 0
    resumed = launch(cut, *GSA, nproc=2, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "results.json").read_text()) == json.loads((full / "results.json").read_text())


@pytest.mark.parametrize("direction", ["gsa", "sam", "gsa_proj", "friendly"])
def test_each_direction_runs_end_to_end_in_process(direction, tmp_path):
    from lt_recipes.config import load_config
    from lt_recipes.engine import run

    cfg = load_config("digits_lt", ["epochs=2", "groups.start_epoch=1", f"gsa.direction={direction}",
                                    "gkp.fisher=ema" if direction == "friendly" else "gkp.norm=per_samples"])
    res = run(cfg, str(tmp_path))
    suffix = "" if direction == "gsa" else f"@{direction}"
    assert res["method"] == f"ce+gkp+gsa{suffix}" and res["num_test_evaluated"] == DIGITS_TEST
    groups = json.loads((tmp_path / "groups.json").read_text())
    assert groups["group_epochs"] == [1] and all(r >= 0 for r in groups["rho"])


def test_fisher_ema_and_friendly_state_survive_a_kill(tmp_path):
    sets = GSA + ["gkp.fisher=ema", "gsa.direction=friendly"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert launch(full, *sets).returncode == 0
    assert launch(cut, *sets, failpoint="step:20").returncode == -signal.SIGKILL  # mid-epoch 2, after grouping
    resumed = launch(cut, *sets, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "results.json").read_text()) == json.loads((full / "results.json").read_text())
