"""Every script under tools/ runs its main path on a tiny configuration, so that no tool rots unnoticed.

TOOLS maps each file in tools/ to the test that runs its main path, here or in another test file, and
test_every_tool_has_a_smoke_test fails when a script appears in tools/ without an entry (or an entry names a test that
does not exist). The shell scripts run with their documented environment overrides (PYTHON, LT_OUTPUT, BENCH_DIR,
BENCH_DOC, SMOKE, DEVICE_CHECK_SMOKE), so nothing here touches the checkout's own run, results/bench/ or README.md,
and nothing pauses a grid that may be training on the machine.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import preloaded
from conftest import write_idx
from lt_recipes.steps import list_steps
from toolload import ROOT, load_tool

# script -> (the test that runs its main path, how it is covered when that is not obvious from the test's name)
TOOLS: dict[str, tuple[str, str]] = {
    "analysis.py": ("tests/test_analysis.py::test_plot_run_writes_pngs",
                    "the module collect_results.py, plot_run.py and landscape.py import; tests/test_analysis.py "
                    "also tests its pieces one by one"),
    "bench_epoch.py": ("tests/test_tool_smoke.py::test_device_check_smoke",
                       "device_check.sh's epoch step runs it on synthetic CIFAR-100; its JSON is checked there"),
    "bench_kernels.py": ("tests/test_tool_smoke.py::test_bench_kernels", ""),
    "bench_loader.py": ("tests/test_tool_smoke.py::test_bench_loader", ""),
    "bench_memory.py": ("tests/test_tool_smoke.py::test_bench_memory", ""),
    "bench_report.py": ("tests/test_tool_smoke.py::test_record_bench_smoke",
                        "record_bench.sh writes the tables of freshly recorded files; tests/test_readme.py runs "
                        "--check on the committed ones"),
    "checkpoint_size.py": ("tests/test_tool_smoke.py::test_checkpoint_size", ""),
    "export.py": ("tests/test_export.py::test_export_loads_in_timm_with_the_classifier", ""),
    "bench_step.py": ("tests/test_tool_smoke.py::test_record_bench_smoke",
                      "record_bench.sh runs it (SMOKE=1: resnet8_cifar, batch 16, G=2); its JSON is checked there "
                      "and in device_check's"),
    "cuda_env.sh": ("tests/test_setup_env.py::test_a_failing_cuda_build_falls_back_to_cpu_only_with_one_line",
                    "the CUDA resolution and build fallback setup_env.sh and device_check.sh source, with a fake GPU"),
    "collect_results.py": ("tests/test_analysis.py::test_collect_results_tables_check_and_plot", ""),
    "dataset_summary.py": ("tests/test_data.py::test_dataset_summary_tool", ""),
    "device_check.sh": ("tests/test_tool_smoke.py::test_device_check_smoke", "DEVICE_CHECK_SMOKE=1, on the CPU"),
    "landscape.py": ("tests/test_analysis.py::test_landscape_writes_plots_and_json", ""),
    "main.sh": ("tests/test_tool_smoke.py::test_main_sh", ""),
    "paper_tables.py": ("tests/test_paper_tables.py::test_paper_row_end_to_end_on_cifar_files", ""),
    "plot_run.py": ("tests/test_analysis.py::test_plot_run_writes_pngs", ""),
    "record_bench.sh": ("tests/test_tool_smoke.py::test_record_bench_smoke", "SMOKE=1"),
    "run_grid.py": ("tests/test_tool_smoke.py::test_run_grid_job", ""),
    "setup_env.sh": ("tests/test_tool_smoke.py::test_main_sh",
                     "main.sh without PYTHON runs it first; that case is skipped where the checkout has no .venv "
                     "(in CI tools/test.sh has just made it)"),
    "test.sh": ("tests/test_readme.py::test_readme_is_a_front_page_with_the_two_commands_first",
                "CI's own command: .ci/run runs it, as that test checks; running it from the suite would recurse"),
}


def test_every_tool_has_a_smoke_test() -> None:
    scripts = {p.name for p in (ROOT / "tools").iterdir() if p.is_file()}
    assert not scripts - set(TOOLS), f"tools/ scripts without a smoke test in TOOLS: {sorted(scripts - set(TOOLS))}"
    assert not set(TOOLS) - scripts, f"TOOLS names scripts that are not in tools/: {sorted(set(TOOLS) - scripts)}"
    for script, (node, _) in TOOLS.items():
        path, _, name = node.partition("::")
        defined = re.findall(r"^def (test_\w+)\(", (ROOT / path).read_text(), re.M)
        assert name in defined, f"{script}: no test {node}"


# the scripts' environment overrides (OUT: device_check.sh's default BENCH_DIR): a test sets those it means, and
# none leaks in from the shell that runs the tests
OVERRIDES = ("PYTHON", "LT_OUTPUT", "BENCH_DIR", "BENCH_DOC", "SMOKE", "DEVICE_CHECK_SMOKE", "OUT")


def _run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run a tool from the repository root as a user would; it must exit 0 (its output tail is the failure message)."""
    inherited = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc


def _preloaded_python() -> dict[str, str]:
    """PYTHON for the shell tools: tests/preloaded_python, whose `python ARGS` fork from the preloaded interpreter
    (tests/preloaded.py), with the variables it reads."""
    _, env = preloaded.command({})
    return {"PYTHON": str(ROOT / "tests" / "preloaded_python"), "LT_TESTS_PYTHON": sys.executable,
            preloaded.SOCKET_ENV: env[preloaded.SOCKET_ENV]}


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _check_step_json(out: dict) -> None:
    """bench_step.py's JSON from the smoke runs' tiny options (resnet8_cifar, batch 16, G=2, one repeat): a positive
    time and a state size for every kind, and the ratios to SAM."""
    for kind in load_tool("bench_step").KINDS:
        assert _positive(out[f"{kind}_ms"]), kind
        assert out[f"{kind}_state_bytes"] >= 0, kind
        if kind != "sam":
            assert _positive(out[f"{kind}_over_sam"]), kind
    assert (out["model"], out["batch"], out["groups"], out["repeats"]) == ("resnet8_cifar", 16, 2, 1)


def _check_kernels_json(out: dict, d: int) -> None:
    assert out["d"] == d and set(out["ops"]) == {"gsa_project", "gkp_penalty_fp32", "gkp_penalty_bf16"}
    for name, op in out["ops"].items():
        assert all(_positive(op[k]) for k in ("bytes", "fused_ms", "reference_ms", "speedup", "fused_gbps")), name
    assert all(_positive(out[k]) for k in ("copy_ms", "fused_over_reference", "fraction_of_copy_bandwidth"))


def test_bench_kernels(capsys: pytest.CaptureFixture) -> None:
    result = load_tool("bench_kernels").main(["--d", "4096", "--repeats", "1", "--json"])
    assert _last_json(capsys.readouterr().out) == result
    _check_kernels_json(result, 4096)


def test_bench_memory(capsys: pytest.CaptureFixture) -> None:
    load_tool("bench_memory").main(["--recipe", "digits_lt", "--json"])
    out = _last_json(capsys.readouterr().out)
    # digits_lt: 10 classes, G=4, 30 epochs evaluated every epoch
    assert (out["recipe"], out["num_classes"], out["groups"], out["evaluation_points"]) == ("digits_lt", 10, 4, 30)
    assert 0 < out["encoder_params"] < out["params"]
    assert out["naive_bank_bytes_fp32"] == 10 * out["encoder_params"] * 4 and out["bank_reduction"] == 1.0
    assert out["gsa_buffers_bytes"] == (4 + 2) * out["params"] * 4


def test_bench_loader(capsys: pytest.CaptureFixture) -> None:
    """Digits, synthetic CIFAR pickles, Fashion-MNIST idx files and ImageNet-LT JPEGs through each recipe's pipeline
    with 0 and 1 workers; the needed workers come from the committed GPU step figures; the report renders a row per
    recipe."""
    recipes = ["digits_lt", "cifar10_lt_resnet32", "fmnist_lt_resnet8", "imagenet_lt_resnet50"]
    load_tool("bench_loader").main(["--recipes", *recipes, "--workers", "0", "1", "--rounds", "1", "--batch-size", "4",
                                    "--json"])
    out = _last_json(capsys.readouterr().out)
    assert list(out["recipes"]) == recipes and set(out["gpu_steps"]) == {"cifar", "files"}
    for name, row in out["recipes"].items():
        assert set(row["images_per_s"]) == {"0", "1"} and min(row["images_per_s"].values()) > 0, name
        step = out["gpu_steps"][row["gpu_step"]]
        need = row["cpu_ms_per_image"] / step["ms_per_image"]["grouped"]
        assert row["cpu_ms_per_image"] > 0 and row["workers_needed"]["grouped"] == math.ceil(need) >= 1, name
    assert out["recipes"]["imagenet_lt_resnet50"]["views"] == 3
    table = load_tool("bench_report").loader_tables([("results/bench/loader_cpu.json", out)])
    assert sum(line.startswith(tuple(f"| {r} |" for r in recipes)) for line in table) == len(recipes)


def test_checkpoint_size(capsys: pytest.CaptureFixture) -> None:
    load_tool("checkpoint_size").main(["--recipe", "digits_lt", "--json"])
    out = _last_json(capsys.readouterr().out)
    one = out["sizes"]["1"]
    # GKP state: anchors and Fisher rows [G, covered] in fp32; one bank snapshot of the covered parameters
    assert (out["recipe"], out["groups"]) == ("digits_lt", 4)
    assert one["method_parts"]["anchors"] == one["method_parts"]["fisher"] == 4 * one["covered_params"] * 4
    assert one["checkpoint"] >= one["model"] + one["optimizer"] + one["method"]



def test_checkpoint_size_counts_the_grouped_step_s_own_state() -> None:
    """The layout checkpoint_size reads (lt_recipes.grouping_cycle.state_parts) against a real grouped step's saved
    state: FriendlySAM momenta and the group-gradient EMA, [G, d] each (the tool missed the EMA)."""
    import torch

    from lt_recipes.checkpoint import tensor_bytes
    from lt_recipes.config import load_recipe
    from lt_recipes.steps import create_step

    cfg = load_recipe("digits_lt", ["method=gsa", "gsa.direction=friendly", "gsa.group_grad_ema=0.5"])
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    step = create_step("gsa", model, torch.optim.SGD(model.parameters(), lr=0.1), **cfg.step_options("gsa"))
    step.set_groups([0, 1, 1], [10, 4])
    params = sum(p.numel() for p in model.parameters())
    parts = load_tool("checkpoint_size").method_parts(cfg, params, step.num_covered, 3, 2, 1)
    assert parts["friendly_momentum"] == parts["grad_ema"] == 2 * params * 4
    assert parts["friendly_momentum"] + parts["grad_ema"] == tensor_bytes(step.state_dict())

def _tiny_fashion_mnist(root: Path) -> None:
    """Fashion-MNIST's idx files with 100 training and 10 test images per class of random pixels."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 100), ("t10k", 10)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)


def test_run_grid_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--list of grid fmnist16, then one real job (one epoch on a tiny Fashion-MNIST) copied to --results."""
    grid = load_tool("run_grid")
    data, results = tmp_path / "fmnist", tmp_path / "results"
    data.mkdir()
    _tiny_fashion_mnist(data)
    assert grid.main(["--grid", "fmnist16", "--seeds", "0", "--results", str(results), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"todo {label} r=100 seed=0"
                                                    for label, _, _ in grid.jobs_of("fmnist16", [100], [0])]
    argv = ["--grid", "fmnist16", "--only", "ce", "--seeds", "0", "--ratios", "100", "--set", "epochs=1",
            "--set", "sched.warmup_epochs=0", "--set", f"data.root={data}", "--results", str(results),
            "--scratch", str(tmp_path / "scratch")]
    assert grid.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("done ce r=100 seed=0"), out
    dest = results / "fmnist_r100" / "ce" / "seed0"
    assert sorted(p.name for p in dest.iterdir()) == ["args.yaml", "results.json", "summary.csv"]  # ce: no groups
    res = json.loads((dest / "results.json").read_text())
    assert (res["method"], res["imbalance_ratio"], res["seed"], res["epochs"]) == ("ce", 100.0, 0, 1)
    assert res["train_counts"][0] == 100 - 20 and res["num_test_evaluated"] == 100  # head class: 20 held out for val
    assert yaml.safe_load((dest / "args.yaml").read_text())["data"]["root"] == str(data)
    assert grid.main(argv + ["--list"]) == 0 and capsys.readouterr().out == "done ce r=100 seed=0\n"
    assert grid.main(argv) == 0 and capsys.readouterr().out == "skip ce r=100 seed=0\n"
    # a run that stopped (diverged) is kept as its committed train.log: listed as stopped, never rerun
    stopped = results / "fmnist_r100" / "la" / "seed0"
    stopped.mkdir(parents=True)
    (stopped / "train.log").write_text("ERROR lt_recipes.engine: non-finite values\n")
    la = argv[:3] + ["la"] + argv[4:]
    assert grid.main(la + ["--list"]) == 0 and capsys.readouterr().out == "stopped la r=100 seed=0\n"
    assert grid.main(la) == 0 and capsys.readouterr().out.startswith("skip la r=100 seed=0 (stopped")


@pytest.mark.parametrize("error, recorded", [
    ("ERROR lt_recipes: non-finite values in the gradients of a SAM/GSA pass for 21 steps in a row", True),
    ("ERROR lt_recipes: data.root /nowhere does not exist", False)])
def test_run_grid_records_a_diverged_run_and_only_that(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, error: str,
                                                       recorded: bool) -> None:
    """A job whose training stopped on non-finite values is a result (its args.yaml and train.log are kept, later
    runners skip it); any other failure (bad input, a kill) is reported and left to rerun."""
    grid = load_tool("run_grid")

    def fake_train(cmd, cwd, env, stdout, stderr):  # the training subprocess: writes its log and args.yaml, exits 2
        out = cmd[cmd.index("--output") + 1]
        Path(out, "args.yaml").write_text("seed: 0\n")
        stdout.write(f"2026-01-01 00:00:00,000 {error}\n")
        return subprocess.CompletedProcess(cmd, 2)
    monkeypatch.setattr(grid.subprocess, "run", fake_train)
    results = tmp_path / "results"
    argv = ["--grid", "readings", "--only", "bcl+gkp#lam1e7", "--seeds", "0", "--ratios", "100",
            "--results", str(results), "--scratch", str(tmp_path / "scratch")]
    assert grid.main(argv) == 0
    out = capsys.readouterr().out
    dest = results / "fmnist64_r100" / "bcl+gkp#lam1e7" / "seed0"
    if recorded:
        assert out.startswith("stopped (diverged) bcl+gkp#lam1e7 r=100 seed=0"), out
        assert sorted(p.name for p in dest.iterdir()) == ["args.yaml", "train.log", "variant.json"]
        assert grid.main(argv + ["--list"]) == 0
        assert capsys.readouterr().out == "stopped bcl+gkp#lam1e7 r=100 seed=0\n"
    else:
        assert out.startswith("FAILED bcl+gkp#lam1e7 r=100 seed=0"), out
        assert not dest.exists()


@pytest.mark.parametrize("python", ["PYTHON", ".venv"])
def test_main_sh(python: str, tmp_path: Path) -> None:
    """Two epochs of the main job into LT_OUTPUT; with .venv (no PYTHON), tools/setup_env.sh runs first."""
    env = {"LT_OUTPUT": str(tmp_path / "run")}
    if python == "PYTHON":
        env.update(_preloaded_python())
    elif not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip(f"{ROOT}/.venv/bin/python does not exist (tools/setup_env.sh has not run in this checkout)")
    proc = _run(["bash", "tools/main.sh", "--set", "epochs=2", "--set", "groups.start_epoch=1"], timeout=600, **env)
    assert re.search(r"Top-1 \|.* Many \| +Medium \| +Few", proc.stdout + proc.stderr)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["recipe"] == "digits_lt" and res["method"] == "ce+gkp+gsa" and res["epochs"] == 2
    assert all(0 <= res[k] <= 100 for k in ("top1", "many", "medium", "few"))
    assert (tmp_path / "run" / "groups.json").exists()  # the groups were formed at epoch 1
    if python == ".venv":  # the set-up is idempotent: once main.sh has run it, nothing is installed or rebuilt
        again = _run(["bash", "tools/setup_env.sh"], timeout=600).stdout
        assert "installing torch" not in again and "building the extension" not in again, again


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_record_bench_smoke(tmp_path: Path) -> None:
    """SMOKE=1 record_bench.sh writes the three JSON files and their tables, and pauses no training process."""
    bench, readme = tmp_path / "bench", tmp_path / "benchmarks.md"
    readme.write_text("# Benchmarks\n\n<!-- bench:begin -->\n<!-- bench:end -->\n\n<!-- bench-history:begin -->\n"
                      "<!-- bench-history:end -->\n")
    # what record_bench.sh pauses outside smoke runs: a process whose command line has `train.py --recipe fmnist`
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "train.py --recipe fmnist"])
    seen_stopped, done = [], threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            seen_stopped.append(_stopped(sentinel.pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _run(["bash", "tools/record_bench.sh"], timeout=300, SMOKE="1", BENCH_DIR=str(bench), BENCH_DOC=str(readme),
             **_preloaded_python())
    finally:
        done.set()
        watcher.join()
        sentinel.kill()
        sentinel.wait()
    assert seen_stopped and not any(seen_stopped), "the smoke run paused a training process"
    assert sorted(p.name for p in bench.iterdir()) == ["kernels_cpu.json", "memory_imagenet_lt_resnext50.json",
                                                       "step_cpu_resnet32.json", "step_cpu_resnet32_batched_b32.json",
                                                       "step_cpu_resnet32_batched_dispatch.json"]
    step = json.loads((bench / "step_cpu_resnet32.json").read_text())
    _check_step_json(step)
    assert step["device"] == "cpu" and step["amp"] == "none"
    _check_kernels_json(json.loads((bench / "kernels_cpu.json").read_text()), 4096)
    memory = json.loads((bench / "memory_imagenet_lt_resnext50.json").read_text())
    assert memory["num_classes"] == 1000 and _positive(memory["bank_reduction"])
    text = readme.read_text()
    for kind in load_tool("bench_step").KINDS:
        assert f"\n| {kind} | " in text, f"no table row for step kind {kind}"
    for row in ("| gsa_project | ", "| GKP anchors + Fisher, fp32 / bf16 | "):
        assert row in text


def test_device_check_smoke(tmp_path: Path) -> None:
    """DEVICE_CHECK_SMOKE=1 device_check.sh: every part runs and passes on the CPU (or says why it cannot run in this
    checkout yet), every registered step takes its two steps, and each benchmark's JSON is saved."""
    proc = _run(["bash", "tools/device_check.sh"], timeout=600, DEVICE_CHECK_SMOKE="1", BENCH_DIR=str(tmp_path),
                **_preloaded_python())
    assert proc.stdout.rstrip().endswith("device check passed")
    assert "build the CUDA extension: skipped" in proc.stdout and "FAILED" not in proc.stdout
    run = re.findall(r"^==== (.*) \(limit \d+s\) ====$", proc.stdout, re.M)
    assert re.findall(r"^---- (.*): ok in \d+s$", proc.stdout, re.M) == run  # every step that ran passed
    # every part runs, or says why it cannot in this checkout yet
    parts = run + re.findall(r"^==== (.*): skipped \(.*\) ====$", proc.stdout, re.M)
    for part in ("environment", "the README's set-up", "CPU kernels registered", "CUDA tests",
                 "16- and 32-group kernel variants on cpu", "every registered step, two steps under a one-process gloo",
                 "engine, 2 epochs of synthetic CIFAR-100 in bf16, killed and resumed, then validate.py",
                 "engine in fp16", "the README's own loop on cpu", "two steps with model.compile",
                 "kernel benchmark", "step benchmark, ResNet-32", "step benchmark, ResNet-50", "epoch timing"):
        assert sum(p.startswith(part) for p in parts) == 1, part
    for name in list_steps():
        assert re.search(rf"^{name}: two steps on cpu \(gloo, 1 process\(es\)\)", proc.stdout, re.M), name
    assert "killed at the grouping of epoch 1 as planned; resuming" in proc.stdout
    assert re.search(r"^results: .*/engine_bf16/validate/results.json  top1=", proc.stdout, re.M)
    assert (tmp_path / "device_check.log").read_text().rstrip().endswith("device check passed")
    _check_kernels_json(json.loads((tmp_path / "kernels_cuda.json").read_text()), 4096)
    for name in ("step_cuda_resnet32.json", "step_cuda_resnet50.json"):
        step = json.loads((tmp_path / name).read_text())
        _check_step_json(step)
        assert step["amp"] == "bf16"
    epoch = json.loads((tmp_path / "epoch_cuda_cifar100_lt_resnet32.json").read_text())
    # bench_epoch.py: 2 base epochs, the grouping epoch, 1 grouped epoch; projected over the recipe's own schedule
    assert epoch["recipe"] == "cifar100_lt_resnet32" and len(epoch["epoch_times_s"]) == 4
    assert all(_positive(t) for t in epoch["epoch_times_s"]) and epoch["steps_per_epoch"] >= 1
    assert epoch["schedule"] == {"epochs": 200, "group_start": 20, "regroups": 9}
    assert epoch["t_base_s"] == epoch["epoch_times_s"][1] and epoch["t_grouping_epoch_s"] == epoch["epoch_times_s"][2]
    assert _positive(epoch["projected_method_h"]) and epoch["projected_base_h"] == pytest.approx(
        200 * epoch["t_base_s"] / 3600)
    assert epoch["projected_over_paper"] == pytest.approx(epoch["projected_method_h"] / 1.67)
