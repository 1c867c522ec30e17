"""Crash safety: SIGKILL a training subprocess at several moments, resume, and get exactly the uninterrupted results."""
import csv
import json
import os
import signal
import subprocess

import pytest

import preloaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--recipe", "digits_lt", "--set", "epochs=4", "--set", "groups.start_epoch=1", "--set", "groups.interval=2",
        "--set", "gsa.direction=friendly"]


def train(out, *extra, failpoint=None, args=ARGS):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LT_RECIPES_FAILPOINT", None)
    if failpoint:
        env["LT_RECIPES_FAILPOINT"] = failpoint
    python, env = preloaded.command(env)
    return subprocess.run([*python, os.path.join(ROOT, "train.py"), *args, "--output", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def summary_without_time(run):
    with open(run / "summary.csv") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("point", [
    "step:13",      # mid-epoch 1 (8 steps per epoch)
    "checkpoint:2",  # epoch 1's checkpoint fully written to its temporary file, not yet renamed
    "grouping:2",   # second grouping (epoch 3): groups computed, Fisher not yet estimated
])
def test_kill_then_resume_gives_identical_results(point, tmp_path, uninterrupted):
    killed = train(tmp_path, failpoint=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] or point.startswith("checkpoint")
    resumed = train(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text()) == \
        json.loads((uninterrupted / "results.json").read_text())
    assert summary_without_time(tmp_path) == summary_without_time(uninterrupted)
    assert json.loads((tmp_path / "groups.json").read_text()) == \
        json.loads((uninterrupted / "groups.json").read_text())


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_unreadable(uninterrupted, tmp_path):
    """A corrupt latest checkpoint costs one epoch, not the run: resume says so and ends with identical results."""
    (tmp_path / "checkpoint.pt").write_bytes((uninterrupted / "checkpoint.pt").read_bytes()[:5000])
    (tmp_path / "checkpoint.prev.pt").write_bytes((uninterrupted / "checkpoint.prev.pt").read_bytes())
    proc = train(tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the previous checkpoint" in proc.stderr and "continuing at epoch 3" in proc.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == \
        json.loads((uninterrupted / "results.json").read_text())


def test_best_model_is_the_best_validation_epoch(uninterrupted):
    import torch

    rows = list(csv.DictReader(open(uninterrupted / "summary.csv")))
    top1 = [float(r["val_top1"]) for r in rows]
    best = torch.load(uninterrupted / "model_best.pt", weights_only=True)
    assert best["epoch"] == top1.index(max(top1)) and best["val_top1"] == max(top1)
    assert set(best) == {"identity", "epoch", "val_top1", "model", "ema"}  # weights only, no training state
    results = json.loads((uninterrupted / "results.json").read_text())
    assert (results["best_epoch"], results["best_val_top1"]) == (best["epoch"], best["val_top1"])


def test_checkpoint_size_tool_matches_a_real_checkpoint(uninterrupted):
    """tools/checkpoint_size.py (which gives the README's ImageNet-LT figure) against the run's own checkpoint."""
    import torch

    from lt_recipes.checkpoint import tensor_bytes
    from lt_recipes.config import load_recipe
    from toolload import load_tool

    state = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    groups = json.loads((uninterrupted / "groups.json").read_text())
    parts = load_tool("checkpoint_size").checkpoint_parts(
        load_recipe(str(uninterrupted / "args.yaml")), 10, 1, len(groups["groups"]), groups["memory_bank"]["snapshots"])
    assert set(parts["method_parts"]) == {"bank", "anchors", "fisher", "friendly_momentum"}
    for key in ("model", "optimizer", "method"):
        assert parts[key] == tensor_bytes(state[key]), key


def test_resume_of_a_finished_run_only_reevaluates(uninterrupted):
    before = (uninterrupted / "summary.csv").read_text()
    proc = train(uninterrupted, "--resume")
    assert proc.returncode == 0 and (uninterrupted / "summary.csv").read_text() == before


def test_resume_reads_the_runs_own_recipe(uninterrupted):
    """--resume without --recipe continues the run with its args.yaml (the default recipe differs from it)."""
    before = (uninterrupted / "summary.csv").read_text()
    proc = train(uninterrupted, "--resume", args=[])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"recipe: {uninterrupted / 'args.yaml'}" in proc.stderr
    assert (uninterrupted / "summary.csv").read_text() == before


def test_resume_of_a_folder_without_a_checkpoint_is_an_error_naming_it(tmp_path):
    """A mistyped --output used to train a new run from scratch with exit 0; it is named now, and not created."""
    typo = tmp_path / "typo"
    proc = train(typo, "--resume")
    assert proc.returncode == 2 and f"--resume: {typo} holds no checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "--resume-or-start" in proc.stderr and not typo.exists()
    proc = train(typo, "--resume", "--resume-or-start")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_existing_run_needs_resume(uninterrupted):
    proc = train(uninterrupted)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr


def test_corrupt_or_foreign_checkpoint_is_named(uninterrupted, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes((uninterrupted / "checkpoint.pt").read_bytes()[:5000])
    proc = train(tmp_path, "--resume")
    assert proc.returncode == 2 and f"checkpoint {ckpt} is corrupt or truncated" in proc.stderr
    assert "weights_only" not in proc.stderr
    ckpt.write_bytes((uninterrupted / "checkpoint.pt").read_bytes())
    proc = train(tmp_path, "--resume", args=ARGS + ["--set", "seed=3"])
    assert proc.returncode == 2 and "seed=0" in proc.stderr and "seed=3" in proc.stderr


def test_resume_with_another_recipe_is_refused_naming_the_keys(uninterrupted, tmp_path):
    """Any recipe key that changes what is trained must match the checkpoint; where data lives may change."""
    (tmp_path / "checkpoint.pt").write_bytes((uninterrupted / "checkpoint.pt").read_bytes())
    proc = train(tmp_path, "--resume", args=ARGS + ["--set", "gkp.lam=5", "--set", "gsa.rho_clamp=null"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "gkp.lam=100.0 there, gkp.lam=5.0 here" in proc.stderr and "gsa.rho_clamp=" in proc.stderr
    proc = train(tmp_path, "--resume", args=ARGS + ["--set", "log_interval=7", "--set", "data.root=/moved"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"identity": {}, "payload": Evil()}, tmp_path / "checkpoint.pt")
    proc = train(tmp_path, "--resume")
    assert proc.returncode == 2 and f"checkpoint {tmp_path / 'checkpoint.pt'} holds pickled Python objects" in \
        proc.stderr and "cannot be read" in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_repeated_nonfinite_losses_stop_the_run_without_a_checkpoint(tmp_path):
    proc = train(tmp_path, args=["--recipe", "digits_lt", "--set", "method=none", "--set", "optim.lr=1e12",
                                 "--set", "max_nonfinite_steps=2", "--set", "epochs=2",
                                 "--set", "sched.warmup_epochs=0"])
    assert proc.returncode == 2 and "non-finite values in the loss or gradients of the step" in proc.stderr
    assert "epoch 0" in proc.stderr and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("method", ["fsam", "gkp_gbg"])
def test_a_killed_peer_resumes_to_the_uninterrupted_result(method, tmp_path):
    """The peers' own state survives a kill: FriendlySAM's gradient EMA, and GBG's groups from the initial weights
    with GKP riding on it."""
    args = ["--recipe", "digits_lt", "--set", "epochs=3", "--set", "groups.start_epoch=1", "--set", f"method={method}"]
    full = tmp_path / "full"
    assert train(full, args=args).returncode == 0
    killed = train(tmp_path / "killed", failpoint="step:13", args=args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(tmp_path / "killed", "--resume", args=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "killed" / "results.json").read_text()) == \
        json.loads((full / "results.json").read_text())
    assert summary_without_time(tmp_path / "killed") == summary_without_time(full)
