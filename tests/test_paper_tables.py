"""The paper's tables for a GPU user: a paper-grid row end to end on CIFAR-format files, our figure beside the paper's
in the generated table, the projected GPU-hours against a hand computation, and the grid runner's GPU pool."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from toolload import load_tool


def _row(block: str, title: str, label: str, ratio: str) -> list[str]:
    """The cells of `label` at `ratio` in the table under the heading that contains `title`."""
    section = block.split(title, 1)[1].split("####", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    return next(r for r in rows if r[0] == f"`{label}`" and r[1] == ratio)


def test_paper_row_end_to_end_on_cifar_files(tmp_path: Path, write_cifar, capsys: pytest.CaptureFixture) -> None:
    """Table 1's CIFAR-10-LT r=10 BCL row, one epoch on a tiny CIFAR-10 in torchvision's layout: run_grid trains it
    into results/cifar10_r10/bcl/seed0, and paper_tables sets its Top-1 beside the paper's 91.1."""
    grid, tables = load_tool("run_grid"), load_tool("paper_tables")
    write_cifar(tmp_path / "cifar", "cifar10", 30, 3)
    results = tmp_path / "results"
    argv = ["--grid", "table1", "--only", "bcl", "--ratios", "10", "--seeds", "0", "--results", str(results),
            "--scratch", str(tmp_path / "scratch")]
    tiny = ["epochs=1", "sched.warmup_epochs=0", "data.val_per_class=1", "data.batch_size=64",
            "model.name=resnet8_cifar", "model.proj_head=[32, 16]", f"data.root={tmp_path / 'cifar'}"]
    assert grid.main(argv + ["--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["todo cifar100: bcl r=10 seed=0", "todo cifar10: bcl r=10 seed=0"]
    assert grid.main(argv + ["--grid", "table1_cifar10"] + sum([["--set", k] for k in tiny], [])) == 0
    assert capsys.readouterr().out.startswith("done bcl r=10 seed=0")
    res = load_tool("collect_results").read_json(str(results / "cifar10_r10" / "bcl" / "seed0" / "results.json"))
    assert (res["dataset"], res["imbalance_ratio"], res["method"], res["epochs"]) == ("cifar10", 10.0, "bcl", 1)
    block = tables.build_block(str(results))
    row = _row(block, "Table 1, CIFAR-10-LT", "bcl", "10")
    assert row[2] == "91.1 (Table 1)" and row[3] == f"{res['top1']:.2f}" and row[5] == "1"
    assert row[4] == f"{res['top1'] - 91.1:+.2f}"
    assert _row(block, "Table 1, CIFAR-10-LT", "bcl+gkp+gsa", "10")[2:6] == ["92.5 (Table 1)", "—", "—", "0"]
    assert _row(block, "Table 1, CIFAR-100-LT", "bcl", "10")[3] == "—"  # the other dataset's row is still to run
    doc = tmp_path / "reproduce.md"
    doc.write_text("text\n<!-- paper:begin -->\nold\n<!-- paper:end -->\nmore\n")
    args = ["--results", str(results), "--doc", str(doc)]
    assert tables.main(args + ["--check"]) == 1 and tables.main(args) == 0 and tables.main(args + ["--check"]) == 0
    text = doc.read_text()
    assert text.startswith("text\n<!-- paper:begin -->") and text.endswith("<!-- paper:end -->\nmore\n")


def _bench(tables) -> object:
    """Benchmarks with round figures: a GPU epoch of 43 plain steps in 4.3 s (100 ms a step), a GPU plain step of
    10 ms at batch 256, and on the CPU the grouped step three times the plain step at G = 4."""
    return tables.Bench(
        epochs={"resnet32_cifar": ("e.json", {"recipe": "cifar100_lt_resnet32", "t_base_s": 4.3, "steps_per_epoch": 43,
                                             "device": "cuda", "gpu": "G"})},
        gpu_steps={"resnet32_cifar": ("s.json", {"sgd_ms": 10.0, "batch": 256, "device_name": "G"}),
                   "resnet50": ("s50.json", {"sgd_ms": 40.0, "batch": 64, "device_name": "G"})},
        cpu_steps=("c.json", {"none_ms": 100.0, "gkp_gsa_masked_ms": 300.0, "gsa_masked_ms": 250.0, "groups": 4}))


def test_projection_hand_computed() -> None:
    tables, grid = load_tool("paper_tables"), load_tool("run_grid")
    bench, c100 = _bench(tables), grid.GRIDS["table1_cifar100"]
    # CIFAR-100-LT r=100: 10,847 images, 43 steps of 256; BCL's three views: plain compute 10 ms x 3 = 30 ms;
    # method step 100 + 30 x (3 - 1) = 160 ms from epoch 20 of 200
    p = tables.project(c100, "bcl+gkp+gsa", 100, bench)
    assert (p.steps_per_epoch, p.plain_ms, p.method_ms, p.basis) == (43, 100.0, 160.0, "ER")
    assert p.hours == pytest.approx(43 * (20 * 100 + 180 * 160) / 3.6e6)
    assert tables.project(c100, "bcl", 100, bench).hours == pytest.approx(43 * 200 * 100 / 3.6e6)
    # G = 8: twice the extra passes of G = 4; GSA alone: its own kind (2.5x); CE: one view, so the measured BCL
    # epoch's plain step less 20 ms of compute, and a 10 ms compute for the grouped step's extra passes
    assert tables.project(grid.GRIDS["groups_cifar100"], "bcl+gkp+gsa#G8", 100, bench).method_ms == 100 + 30 * 2 * 2
    ce = tables.project(c100, "ce+gkp+gsa", 100, bench)
    assert (ce.plain_ms, ce.method_ms, ce.basis) == (80.0, 80 + 10 * 2, "ERS")
    assert tables.project(grid.GRIDS["table4"], "bcl+gsa", 100, bench).method_ms == 100 + 30 * 1.5
    # CIFAR-10-LT r=10: the profile's 20,431 images -> 80 steps
    assert tables.project(grid.GRIDS["table1_cifar10"], "bcl", 10, bench).steps_per_epoch == math.ceil(20431 / 256)
    # ImageNet-LT, ResNet-50 (no GPU epoch): 40 ms at batch 64 -> 160 ms at 256, x3 views = 480 ms; G = 6 from
    # epoch 9 of 90; ResNeXt-50 takes ResNet-50's step (X)
    p = tables.project(grid.GRIDS["imagenet_lt_resnet50"], "bcl+gkp+gsa", None, bench)
    assert (p.steps_per_epoch, p.plain_ms, p.basis) == (math.ceil(115846 / 256), 480.0, "RS")
    assert p.method_ms == pytest.approx(480 + 480 * 2 * 6 / 4)
    assert p.hours == pytest.approx(p.steps_per_epoch * (9 * 480 + 81 * p.method_ms) / 3.6e6)
    x = tables.project(grid.GRIDS["imagenet_lt_resnext50"], "bcl+gkp+gsa", None, bench)
    assert x.basis == "RSX" and x.hours == pytest.approx(p.hours)


def test_a_gpu_epoch_of_the_current_step_replaces_the_cpu_ratio() -> None:
    """An epoch benchmark under results/bench/ (the current code) times the recipe's own method: rows with the same
    step keys take its grouped epoch (M); another G, another base or a history file keep the CPU ratio (R)."""
    tables, grid = load_tool("paper_tables"), load_tool("run_grid")
    bench = _bench(tables)
    epoch = {"recipe": "cifar100_lt_resnet32", "t_base_s": 4.3, "t_grouped_s": 8.6, "steps_per_epoch": 43,
             "device": "cuda", "gpu": "G"}
    now = tables.Bench({"resnet32_cifar": ("results/bench/epoch_cuda_cifar100_lt_resnet32.json", epoch)},
                       bench.gpu_steps, bench.cpu_steps)
    for name in ("table1_cifar100", "table1_cifar10"):
        p = tables.project(grid.GRIDS[name], "bcl+gkp+gsa", 50, now)
        assert (p.method_ms, p.basis) == (200.0, "EM")
    assert tables.project(grid.GRIDS["groups_cifar100"], "bcl+gkp+gsa#G8", 100, now).basis == "ER"
    assert tables.project(grid.GRIDS["table1_cifar100"], "ce+gkp+gsa", 100, now).basis == "ERS"
    assert tables.project(grid.GRIDS["table1_cifar100"], "bcl", 100, now).basis == "E"
    old = tables.Bench({"resnet32_cifar": ("results/history/v1/bench/epoch.json", epoch)}, bench.gpu_steps,
                       bench.cpu_steps)
    assert tables.project(grid.GRIDS["table1_cifar100"], "bcl+gkp+gsa", 100, old).basis == "ER"


def test_committed_reproduce_page_is_generated() -> None:
    assert load_tool("paper_tables").main(["--check"]) == 0


def test_grid_runs_each_job_on_its_gpus_under_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """--gpus: each job runs with one entry of the list as CUDA_VISIBLE_DEVICES ('+' joins a job's GPUs), as many
    jobs at once as entries; --launch prefixes train.py with the launcher."""
    grid = load_tool("run_grid")
    seen = []

    def fake_train(cmd, cwd, env, stdout, stderr):
        seen.append((tuple(cmd[:3]), env["CUDA_VISIBLE_DEVICES"]))
        return subprocess.CompletedProcess(cmd, 1)  # a failure: nothing is copied
    monkeypatch.setattr(grid.subprocess, "run", fake_train)
    argv = ["--grid", "table5", "--seeds", "0", "--results", str(tmp_path / "r"), "--scratch", str(tmp_path / "s"),
            "--gpus", "0+1,2+3", "--launch", "torchrun --nproc_per_node 2"]
    assert grid.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4 and len(seen) == 4
    assert {cmd for cmd, _ in seen} == {("torchrun", "--nproc_per_node", "2")}
    assert {gpus for _, gpus in seen} <= {"0,1", "2,3"}


def test_list_file_dataset_rows_collect_without_a_ratio(tmp_path: Path) -> None:
    """ImageNet-LT runs (no imbalance ratio: the list files' own tail) land in results/imagenet_lt_resnet50/ and are
    tabled by both generators: docs/results.md titles them by dataset alone, the paper table beside 56.0 and 57.9."""
    import json

    import yaml
    results = tmp_path / "results"
    for label, top1 in (("bcl", 55.0), ("bcl+gkp+gsa", 56.5)):
        run = results / "imagenet_lt_resnet50" / label / "seed0"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "recipe": "imagenet_lt_resnet50", "method": label, "dataset": "imagenet_lt", "imbalance_ratio": None,
            "seed": 0, "epochs": 90, "top1": top1, "many": 70.0, "medium": 50.0, "few": 30.0,
            "per_class": [70.0, 50.0, 30.0], "train_counts": [200, 50, 10]}))
        (run / "args.yaml").write_text(yaml.safe_dump({"groups": {"num_groups": 6}}))
    collect = load_tool("collect_results")
    block = collect.build_block(str(results), str(tmp_path / "README.md"), str(tmp_path), write_plots=False)
    assert "### imagenet_lt, 90 epochs" in block
    headline = collect.headline_block(str(results))
    assert "| imagenet_lt, 90 ep | `bcl` | 55.00 (30.00) | 56.50 (30.00) | +1.50 |" in headline
    paper = load_tool("paper_tables").build_block(str(results))
    assert _row(paper, "ImageNet-LT, ResNet-50", "bcl+gkp+gsa", "—")[2:6] == ["57.9 (ImageNet-LT table)", "56.50",
                                                                               "-1.40", "1"]


def test_a_step_kind_the_benchmark_lacks_is_named() -> None:
    tables, grid = load_tool("paper_tables"), load_tool("run_grid")
    bench = _bench(tables)
    renamed = tables.Bench(bench.epochs, bench.gpu_steps, ("c.json", {"none_ms": 100.0, "groups": 4}))
    with pytest.raises(tables.AnalysisError, match="c.json has no step kind 'gkp_gsa_masked'"):
        tables.project(grid.GRIDS["table1_cifar100"], "bcl+gkp+gsa", 100, renamed)
