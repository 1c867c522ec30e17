"""train.py end to end: artifacts, 2-process DDP (torchrun, gloo), bf16 autocast, resume of a 2-process run."""
import csv
import json
import os
import signal
import subprocess

import pytest

from conftest import free_port
import preloaded
from test_faults import summary_without_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TEST = 500  # 10 classes x data.test_per_class=50


def launch(out, *sets, nproc=1, extra=(), failpoint=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LT_RECIPES_FAILPOINT", None)
    if failpoint:
        env["LT_RECIPES_FAILPOINT"] = failpoint
    python, env = preloaded.command(env)
    head = python if nproc == 1 else [
        *python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), *python[1:]]
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


def test_two_process_ddp_counts_every_sample_logs_once_and_scales_lr(tmp_path):
    """2 processes: test and train counts cover all data, lines print once, timm's lr rule sees the global batch,
    files get the umask's mode."""
    proc = launch(tmp_path, "epochs=2", "method=none", "log_interval=2", "optim.lr_base=0.1",
                  "optim.lr_base_size=64", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_processes"] == 2 and res["num_test_evaluated"] == DIGITS_TEST
    assert res["global_batch_size"] == 128 and res["lr"] == pytest.approx(0.1 * 128 / 64)
    assert sorted(os.listdir(tmp_path)) == ["args.yaml", "checkpoint.prev.pt", "checkpoint.pt", "model_best.pt",
                                            "results.json", "summary.csv", "train.log"]
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)} == {0o666 & ~umask}
    assert proc.stdout.count("results:") == 1 and proc.stderr.count("test results:") == 1
    assert proc.stderr.count("engine: epoch 1: lr=") == 1 and proc.stderr.count("model resnet8_cifar:") == 1
    # 497 training images, 64 per process per step: 4 steps per epoch each, a line every 2 steps, from rank 0 only
    assert [line.split("step ")[1].split(":")[0] for line in proc.stderr.splitlines() if " step " in line] == \
        ["2/4", "4/4"] * 2
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert all(497 <= int(r["train_images"]) <= 497 + 2 * 64 for r in rows)  # every image of both ranks (padding)


def test_launch_warning_only_for_a_multi_process_launch_that_runs_one():
    from lt_recipes.engine import launch_warning

    simple = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    assert launch_warning({}) is None and launch_warning(simple) is None  # python train.py, accelerate launch (1)
    assert launch_warning({**simple, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}) is not None
    assert launch_warning({**simple, "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "0"}) is None  # multi_gpu
    assert launch_warning({"MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}) is None  # torchrun


def test_accelerate_cpu_launch_of_two_processes_warns_and_logs_progress(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs one process: say so loudly; progress lines without a tty."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LT_RECIPES_FAILPOINT", None)
    python, env = preloaded.command(env)
    proc = subprocess.run([*python, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *python[1:],
                           os.path.join(ROOT, "train.py"), "--output", str(tmp_path), "--set", "epochs=1",
                           "--set", "method=none", "--set", "log_interval=3", "--set", "sched.warmup_epochs=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "asked for more than one process but started only this one" in proc.stderr
    assert "torchrun --nproc_per_node N" in proc.stderr and "--multi_gpu" in proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["num_processes"] == 1
    lines = [line for line in proc.stderr.splitlines() if "epoch 0/1 step" in line]
    assert [line.split("step ")[1].split(":")[0] for line in lines] == ["3/8", "6/8", "8/8"]
    assert all("img/s" in line and "eta" in line and "lr " in line and "loss " in line for line in lines)


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
    # every epoch's numbers too: ranks evaluate with rank 0's BatchNorm statistics, the ones the checkpoint holds
    assert summary_without_time(cut) == summary_without_time(full)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("direction", ["gsa", "sam", "gsa_proj", "friendly"])
def test_each_direction_runs_end_to_end_in_process(direction, tmp_path):
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run

    cfg = load_recipe("digits_lt", ["epochs=2", "groups.start_epoch=1", f"gsa.direction={direction}",
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


@pytest.mark.usefixtures("single_thread")
def test_ema_with_decay_zero_is_the_model_and_is_evaluated_beside_it(tmp_path):
    """ModelEmaV3 is updated after every optimizer step: with decay 0 it is the model, metric for metric."""
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run

    res = run(load_recipe("digits_lt", ["epochs=1", "method=none", "ema.decay=0.0",
                                                        "sched.warmup_epochs=0"]), str(tmp_path))
    keys = ("top1", "top5", "per_class")
    assert {k: res["ema"][k] for k in keys} == {k: res[k] for k in keys}
    row = next(csv.DictReader(open(tmp_path / "summary.csv")))
    assert row["ema_val_top1"] == row["val_top1"]


@pytest.mark.usefixtures("single_thread")
def test_ema_state_survives_a_kill(tmp_path):
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run

    sets = ["epochs=2", "method=none", "ema.decay=0.9"]
    want = run(load_recipe("digits_lt", sets), str(tmp_path / "full"))
    cut = tmp_path / "cut"
    assert launch(cut, *sets, failpoint="step:12").returncode == -signal.SIGKILL  # mid-epoch 1 (8 steps per epoch)
    assert run(load_recipe("digits_lt", sets), str(cut), resume=True) == want and want["ema"]["top1"] != want["top1"]


@pytest.mark.usefixtures("single_thread")
def test_tensorboard_tracker_gets_every_epoch_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lt_recipes.config import load_recipe
    from lt_recipes.engine import TRACKER_PROJECT, run

    res = run(load_recipe("digits_lt", ["epochs=2", "method=none", "log_with=tensorboard"]), str(tmp_path))
    events = EventAccumulator(str(tmp_path / TRACKER_PROJECT))
    events.Reload()
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    for key in ("train_loss", "val_top1", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(i, pytest.approx(float(r[key]), rel=1e-6)) for i, r in enumerate(rows)], key
    assert events.Scalars("test_top1")[0].value == pytest.approx(res["top1"])


@pytest.mark.usefixtures("single_thread")
def test_the_worker_count_changes_nothing_but_speed(tmp_path, monkeypatch):
    """A digits run with random crops, the grouped step and GKP's Fisher (read through the run's loaders, in batches
    of gkp.fisher_batch_size) trains to the same results with the loaders on the main process and with `auto` workers
    (2 on this machine)."""
    from lt_recipes import grouping_cycle as method
    from lt_recipes.config import load_recipe
    from lt_recipes.data import resolve_num_workers
    from lt_recipes.engine import run

    fisher_calls = []

    def estimate_fisher(*args, **kw):
        fisher_calls.append((kw["batch_size"], kw["loader_kw"]["num_workers"]))  # the Fisher's batch size, its workers
        return real_estimate(*args, **kw)

    real_estimate = method.estimate_fisher
    monkeypatch.setattr(method, "estimate_fisher", estimate_fisher)
    sets = ["epochs=2", "groups.start_epoch=1", "data.augment=basic", "data.max_per_class=60",
            "gkp.fisher_batch_size=16"]
    auto = resolve_num_workers("auto")
    assert auto > 0
    main = run(load_recipe("digits_lt", [*sets, "data.num_workers=0"]), str(tmp_path / "main"))
    workers = run(load_recipe("digits_lt", sets), str(tmp_path / "auto"))
    assert workers == main
    assert summary_without_time(tmp_path / "auto") == summary_without_time(tmp_path / "main")  # losses, groups
    assert fisher_calls == [(16, 0), (16, auto)]


def test_prepared_loaders_copy_batches_without_blocking():
    """Accelerate's prepared loaders move batches with non_blocking=False unless configured: the run's are configured,
    so the pinned batches of a GPU run are copied asynchronously."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lt_recipes.engine import _accelerator

    acc = _accelerator(None)
    loader = acc.prepare(DataLoader(TensorDataset(torch.arange(4)), batch_size=2))
    assert acc.non_blocking and loader._non_blocking


@pytest.mark.usefixtures("single_thread")
def test_uint8_training_batches_train_as_the_float_ones(tmp_path, monkeypatch):
    """The engine's GPU input path on the CPU: training images kept uint8 by the workers and normalised by the engine
    train to the very results of the float pipeline."""
    from lt_recipes import engine
    from lt_recipes.config import load_recipe

    sets = ["epochs=1", "method=sam", "data.augment=basic", "data.max_per_class=60"]
    want = engine.run(load_recipe("digits_lt", sets), str(tmp_path / "floats"))
    real_build = engine.build_data
    monkeypatch.setattr(engine, "build_data", lambda d, seed, uint8_train=False: real_build(d, seed, uint8_train=True))
    assert engine.run(load_recipe("digits_lt", sets), str(tmp_path / "uint8")) == want
    assert summary_without_time(tmp_path / "uint8") == summary_without_time(tmp_path / "floats")  # the train loss
