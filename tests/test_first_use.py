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

from lt_recipes.config import RECIPE_DIR, ConfigError, load_config, recipe_description
import preloaded
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


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One 3-epoch digits run, `--set epochs=3` alone for the schedule, G=50 configured over 10 classes (10 realised)."""
    out = tmp_path_factory.mktemp("short")
    proc = launch(out, "epochs=3", "groups.num_groups=50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ---- resume refuses what changes the results; the launch is recorded ----------------------------------------------
def test_resume_refuses_changed_batches_and_precision_naming_them(short_run):
    out, _ = short_run
    proc = launch(out, "epochs=3", "groups.num_groups=50", "data.eval_batch_size=128", extra=["--resume"])
    assert proc.returncode == 2 and "data.eval_batch_size=256" in proc.stderr \
        and "data.eval_batch_size=128" in proc.stderr
    proc = launch(out, "epochs=3", "groups.num_groups=50", extra=["--resume", "--mixed-precision", "bf16"])
    assert proc.returncode == 2 and "mixed_precision='no'" in proc.stderr and "mixed_precision='bf16'" in proc.stderr


def test_precision_processes_and_device_are_recorded(short_run):
    out, _ = short_run
    res = json.loads((out / "results.json").read_text())
    assert (res["mixed_precision"], res["num_processes"], res["device"]) == ("no", 1, "cpu")
    first = (out / "args.yaml").read_text().splitlines()[0]
    assert first.startswith("#") and "mixed_precision=no, num_processes=1, device=cpu" in first
    assert load_config(str(out / "args.yaml"))["groups"]["start_epoch"] == 1  # still a loadable recipe


def test_resume_with_other_epochs_says_how_to_extend_a_run(short_run):
    out, _ = short_run
    proc = launch(out, "epochs=5", "groups.num_groups=50", extra=["--resume"])
    assert proc.returncode == 2 and "epochs=3; this run has epochs=5" in proc.stderr
    assert "to train longer, start a new --output with --set epochs=N --set model.pretrained_path=" in proc.stderr


def test_fp16_on_the_cpu_is_refused(tmp_path):
    proc = launch(tmp_path, "epochs=1", "method=none", extra=["--mixed-precision", "fp16"])
    assert proc.returncode == 2 and "fp16 needs a CUDA GPU" in proc.stderr and "bf16" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- per-group columns for realised groups only, numbers rounded for reading -------------------------------------
def test_group_columns_only_for_realised_groups_and_readable_numbers(short_run):
    import torch

    out, proc = short_run
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    groups = [c for c in header if re.fullmatch(r"(loss|rho|cos|ascent)_g\d+", c)]
    assert sorted(groups) == sorted(f"{k}_g{g}" for k in ("loss", "rho", "cos", "ascent") for g in range(10))
    assert all(rows[0][c] == "" for c in groups) and all(rows[1][c] != "" for c in groups)  # epoch 0: no groups yet
    lines = {e: next(ln for ln in proc.stderr.splitlines() if f"engine: epoch {e}: " in ln) for e in range(3)}
    # the log line: the groups' loss and ascent as one short list each (the rest per group in summary.csv only)
    assert "_g=" not in lines[0] and "_g0" not in lines[1] and "rho" not in lines[1]
    groups = dict(re.findall(r"(\w+)_g=\[([^\]]*)\]", lines[1]))
    assert set(groups) == {"loss", "ascent"} and all(len(v.split()) == 10 for v in groups.values())
    assert len(lines[2]) < 420  # it was 518 characters at G = 4, some 1400 at G = 10
    # the log at 4 significant digits, summary.csv at 10 (28.999999999999996 reads 29), the checkpoint in full
    values = re.findall(r"[=\[ ](-?[\d.]+)(?:e[-+]\d+)?(?=[, \]]|$)", lines[2].split(": ", 2)[2])
    assert len(values) > 25 and all(len(v.replace("-", "").replace(".", "").lstrip("0")) <= 4 for v in values)
    full = torch.load(out / "checkpoint.pt", weights_only=True)["rows"]
    for row, raw in zip(rows, full):
        assert all(row[k] == (f"{v:.10g}" if isinstance(v, float) else str(v)) for k, v in raw.items())


# ---- the CLI's conveniences ----------------------------------------------------------------------------------------
def test_list_and_print_config(tmp_path):
    python, env = preloaded.command({**os.environ, "OMP_NUM_THREADS": "1"})
    train = [*python, os.path.join(ROOT, "train.py")]
    proc = subprocess.run(train + ["--list"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == len(RECIPES)
    assert re.search(r"^digits_lt +The default recipe: scikit-learn's bundled 8x8 digits", proc.stdout, re.M)
    for line in proc.stdout.splitlines():  # a shortened description ends at a whole word, never "long- ..."
        name, text = line.split(maxsplit=1)
        words = text.removesuffix(" ...").split()
        assert recipe_description(name, width=10_000).split()[:len(words)] == words, line
    proc = subprocess.run(train + ["--print-config", "--set", "epochs=4", "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and not (tmp_path / "run").exists()
    (tmp_path / "printed.yaml").write_text(proc.stdout)
    assert load_config(str(tmp_path / "printed.yaml")) == load_config("digits_lt", ["epochs=4"])


def test_seed_log_file_and_last_line_name_the_weights(short_run):
    out, proc = short_run
    log = (out / "train.log").read_text()
    assert "seed 0 " in log and "engine: epoch 2: " in log
    assert "recipe digits_lt: method ce+gkp+gsa (method=gkp_gsa, loss.name=ce)" in log  # the log names the method
    # the slow parts say how far they are: the Fisher per group, the test evaluation's size
    assert "fisher: group 1/10 at its anchor" in log and "fisher: group 10/10 at its anchor" in log
    assert "evaluating 500 images in 2 batches for the test results" in log
    saves = re.findall(r"checkpoint of epoch (\d): .*", log)
    assert "previous kept" not in saves[0] and "(previous kept as checkpoint.prev.pt)" in \
        re.search(r"checkpoint of epoch 1: .*", log).group(0)
    last = proc.stderr.strip().splitlines()[-1]  # (resumes in other tests of this run append to train.log)
    assert "the test results are for the weights of the last epoch (2)" in last
    assert f"{out / 'model_best.pt'} holds epoch" in last and last in log


def test_ctrl_c_ends_with_one_line_and_a_resumable_checkpoint(tmp_path):
    # a fresh interpreter, not the preloaded one: the signal goes to the process a user's Ctrl-C reaches (a forked
    # child behind a forwarding stub once outlived it under load)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--output", str(tmp_path), "--set", "epochs=200",
           "--set", "method=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "interrupted: " in last and "is kept, add --resume" in last
    assert (tmp_path / "train.log").read_text().strip().splitlines()[-1] == last
    resumed = launch(tmp_path, "epochs=200", "method=none", extra=["--resume"], failpoint="step:1")
    assert "resumed from epoch" in resumed.stderr, resumed.stderr[-3000:]


# ---- trying a big recipe small: --tiny ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_tiny_turns_every_recipe_into_a_short_cpu_run(name):
    """--tiny keeps the recipe's model, base and method and caps what makes it long: epochs, image size, batches,
    images per class, groups, the Fisher's batches; the GKP state and the bank in bf16 (half the checkpoint)."""
    from lt_recipes.config import TINY_CAPS, flatten

    full, cfg = flatten(load_config(name)), flatten(load_config(name, tiny=True))
    assert (cfg["model.name"], cfg["loss.name"], cfg["method"]) == (full["model.name"], full["loss.name"],
                                                                    full["method"])
    assert cfg["epochs"] == 2 and cfg["data.img_size"] <= 32 and cfg["data.batch_size"] <= 16
    assert cfg["data.max_per_class"] <= 50 and cfg["groups.num_groups"] <= 2 and 1 <= cfg["gkp.fisher_batches"] <= 1
    assert (cfg["gkp.state_dtype"], cfg["groups.bank_dtype"], cfg["data.num_workers"]) == ("bf16", "bf16", 0)
    assert all(cfg[k] is None or cfg[k] <= cap for k, cap in TINY_CAPS.items())
    assert cfg["groups.start_epoch"] < cfg["epochs"]  # the grouping, Fisher and GKP+GSA run in the try-out
    assert load_config(name, ["epochs=3"], tiny=True)["epochs"] == 3  # --set wins


def test_a_tiny_run_keeps_the_gkp_state_in_bf16(tmp_path):
    """The digits recipe with --tiny end to end; its checkpoint holds the anchors, Fisher and bank in bf16."""
    import torch

    proc = launch(tmp_path, extra=["--tiny"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    method = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["method"]
    assert method["anchors"].dtype == method["fisher"].dtype == torch.bfloat16
    assert {v.dtype for v in method["bank"]["snapshots"].values()} == {torch.bfloat16}


@pytest.mark.parametrize("main_process", [True, False])
def test_the_fewer_groups_warning_is_the_main_process_s(main_process, caplog):
    """Under two processes every rank realises the same grouping: only rank 0 says so (it printed once per rank)."""
    from types import SimpleNamespace

    from lt_recipes.grouping import Groups
    from lt_recipes.grouping_cycle import GroupedMethod

    me = SimpleNamespace(_fewer_groups_said=False, acc=SimpleNamespace(is_main_process=main_process),
                         data=SimpleNamespace(num_classes=3), bank_snapshots=2)
    groups = Groups.from_labels([0, 1, 1], [5, 3, 2])
    for _ in range(2):
        assert GroupedMethod._realised(me, groups, 4, "the grouping") is groups
    said = [r for r in caplog.records if "gave 2 groups of the 4 asked" in r.getMessage()]
    assert len(said) == (1 if main_process else 0)


@pytest.mark.parametrize("memory_step", [True, False])
def test_a_non_finite_warm_up_step_is_named_by_its_number(memory_step):
    """Before the first grouping the grouped method runs its warm-up step; when non-finite steps exceed the budget,
    the error names the epoch and the step's number (it named the step's bound method)."""
    from types import SimpleNamespace

    from lt_recipes.errors import NonFiniteError
    from lt_recipes.grouping_cycle import GroupedMethod
    from lt_recipes.method import Method
    from lt_recipes.steps import StepStats

    skipped = lambda loss_fn, targets: StepStats(skipped=True)  # noqa: E731
    me = SimpleNamespace(memory_groups=None, memory_step=memory_step, nonfinite_run=0,
                         step_fn=SimpleNamespace(plain_step=skipped, step=skipped),
                         recipe=SimpleNamespace(max_nonfinite_steps=0), _loss_fn=lambda inputs, targets: None)
    me._finish = lambda stats, epoch, step: Method._finish(me, stats, epoch, step)
    me._nonfinite = lambda epoch, step, where: Method._nonfinite(me, epoch, step, where)
    with pytest.raises(NonFiniteError, match=r"\(epoch 3, step 17\)"):
        GroupedMethod.train_step(me, None, None, 3, 17)
