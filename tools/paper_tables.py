#!/usr/bin/env python3
"""Write the paper's tables, ours beside the paper's, and what each run costs on a GPU into docs/reproduce.md.

    python tools/paper_tables.py [--results results] [--doc docs/reproduce.md] [--check]

For each grid of run_grid.PAPER_GRIDS (Table 1 on CIFAR-100-LT and CIFAR-10-LT, Tables 4 and 5, the group number,
ImageNet-LT, iNaturalist 2018) one row per run label and ratio: the paper's figures (results/paper.yaml, with where in
the paper they are), ours (mean ± std over the seeds under results/), and the projected GPU-hours of one seed from the
committed benchmarks (`project`); then each grid's projected cost. Replaces the block between `<!-- paper:begin -->`
and `<!-- paper:end -->`; `--check` writes nothing and exits 1 when the block is out of date.

The projection, per run: steps per epoch from the training-set size and the recipe's batch; a plain step's time on
the GPU (the measured epoch of tools/bench_epoch.py where one exists for the model, else the GPU step benchmark's
plain step scaled to the recipe's batch and views); the method's step from the epoch it starts (`groups.start_epoch`)
costs the plain step plus the plain step's compute times (the CPU step benchmark's time of the step kind over the plain
step's, minus one, scaled linearly in G from the benchmark's G). Each row names which of these it rests on.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from lt_recipes.checkpoint import atomic_write_text
from lt_recipes.config import load_recipe
from lt_recipes.data.profile import long_tail_counts
from lt_recipes.errors import AnalysisError, LTRecipesError
from lt_recipes.labels import parse_label
from lt_recipes.sections import Recipe

from collect_results import METRICS, _fmt, _scan, _table, read_paper, replace_block, summarize
from run_grid import GRID_SETS, GRIDS, PAPER_GRIDS, ROOT, Grid, folder_of, overrides

_logger = logging.getLogger("paper_tables")

BEGIN, END = "<!-- paper:begin -->", "<!-- paper:end -->"
# where the benchmark JSON files are, newest first: a kind of file found in the first folder is not read again later
BENCH_DIRS = ("results/bench", "results/history/v1/bench")
# training-set sizes: CIFAR-LT from its profile (images per class in the full set, classes), the list-file
# datasets as their official lists give them
CIFAR_POOL = {"cifar10": (5000, 10), "cifar100": (500, 100)}
TRAIN_IMAGES = {"imagenet_lt": 115_846, "inat2018": 437_513}
# the model whose GPU step benchmark stands in for one without its own (ResNeXt-50 32x4d: 4.3 GFLOPs, ResNet-50 4.1)
STAND_IN = {"resnext50_32x4d": "resnet50"}
# the CPU step benchmark's kind for a label's method modules (GKP alone adds one fused pass over the parameters to
# the plain step: the plain step's time)
STEP_KIND = {"": "none", "gkp": "none", "gsa": "gsa_masked", "gkp+gsa": "gkp_gsa_masked"}
BASIS = {"E": "the plain step from an epoch measured on the GPU (tools/bench_epoch.py, this model, data loading "
              "included; with S, a row of another batch or view count adds the difference of the plain step's "
              "compute)",
         "S": "the plain step from the GPU step benchmark (tools/bench_step.py) scaled linearly to the recipe's batch "
              "and views; data loading not included",
         "R": "the method's step over the plain step from the CPU step benchmark (ResNet-32, the benchmark's G), "
              "carried to the GPU and scaled linearly in G",
         "M": "the method's step from an epoch of the current code measured on the GPU (tools/bench_epoch.py, the "
              "same recipe keys)",
         "X": "no GPU step benchmark of this model: ResNet-50's stands in"}


@dataclass(frozen=True)
class Bench:
    """The committed benchmark files a projection reads: GPU epochs and GPU steps by model, the CPU steps."""

    epochs: dict[str, tuple[str, dict[str, Any]]]
    gpu_steps: dict[str, tuple[str, dict[str, Any]]]
    cpu_steps: tuple[str, dict[str, Any]]


def read_bench(root: str = ROOT) -> Bench:
    """The newest committed file of each kind (BENCH_DIRS in order): epoch_cuda_*.json (by its recipe's model),
    step_cuda_*.json and step_cpu_resnet32.json."""
    epochs: dict[str, tuple[str, dict[str, Any]]] = {}
    gpu: dict[str, tuple[str, dict[str, Any]]] = {}
    cpu = None
    for folder in BENCH_DIRS:
        for path in sorted(glob.glob(os.path.join(root, folder, "*.json"))):
            with open(path) as f:
                data = json.load(f)
            rel = os.path.relpath(path, root)
            name = os.path.basename(path)
            if name.startswith("epoch_cuda"):
                epochs.setdefault(load_recipe(data["recipe"]).model.name, (rel, data))
            elif name.startswith("step_cuda"):
                gpu.setdefault(data["model"], (rel, data))
            elif name == "step_cpu_resnet32.json" and cpu is None:
                cpu = (rel, data)
    if cpu is None or not gpu:
        raise AnalysisError(f"no committed step benchmarks under {', '.join(BENCH_DIRS)} (step_cpu_resnet32.json and "
                            "a step_cuda_*.json): record them with tools/record_bench.sh and tools/device_check.sh")
    return Bench(epochs, gpu, cpu)


def train_images(dataset: str, ratio: float | None) -> int:
    """Training images of a run: the long-tail profile's sum for CIFAR-LT, the official list's count otherwise."""
    if dataset in CIFAR_POOL:
        return sum(long_tail_counts(*CIFAR_POOL[dataset], ratio))
    return TRAIN_IMAGES[dataset]


@dataclass(frozen=True)
class Projection:
    """Projected GPU-hours of one run and what they rest on (BASIS letters)."""

    hours: float
    steps_per_epoch: int
    plain_ms: float
    method_ms: float
    basis: str
    device: str


@functools.lru_cache(maxsize=None)
def _recipe(name: str, keys: tuple[str, ...]) -> Recipe:
    return load_recipe(name, keys)


def same_step_measured(recipe: Recipe, bench: Bench) -> bool:
    """Whether a GPU epoch benchmark of the current code (not under results/history/) timed this run's own step: its
    recipe's method with the same model, batch, views, loss, grouping and step keys."""
    if recipe.model.name not in bench.epochs or recipe.method == "none":
        return False
    path, epoch = bench.epochs[recipe.model.name]
    if path.startswith(os.path.join("results", "history")) or "t_grouped_s" not in epoch:
        return False
    timed = _recipe(epoch["recipe"], ())
    return all(getattr(recipe, k) == getattr(timed, k) for k in ("method", "model", "loss", "groups", "gkp", "gsa")) \
        and (recipe.data.batch_size, recipe.data.contrastive_views) == (timed.data.batch_size,
                                                                        timed.data.contrastive_views)


def project(grid: Grid, label: str, ratio: int | None, bench: Bench) -> Projection:
    """Hours of one seed of `label` on one GPU: plain steps before the method starts, the method's steps after."""
    recipe = _recipe(grid.recipe, tuple(overrides(label, ratio, 0, grid.bases)))
    batch, views = recipe.data.batch_size, 1 + recipe.data.contrastive_views
    steps = math.ceil(train_images(recipe.data.dataset, recipe.data.imbalance_ratio) / batch)
    model = recipe.model.name
    basis = ""
    if model not in bench.gpu_steps:
        model, basis = STAND_IN[model], "X"
    _, step = bench.gpu_steps[model]
    compute_ms = step["sgd_ms"] * batch * views / step["batch"]  # the plain step's compute at the recipe's batch
    if recipe.model.name in bench.epochs:
        _, epoch = bench.epochs[recipe.model.name]
        plain_ms, basis = 1000 * epoch["t_base_s"] / epoch["steps_per_epoch"], "E" + basis
        timed = _recipe(epoch["recipe"], ())
        timed_images = timed.data.batch_size * (1 + timed.data.contrastive_views)
        if timed_images != batch * views:  # another batch or view count: the plain step's compute differs by this
            plain_ms, basis = plain_ms + compute_ms - step["sgd_ms"] * timed_images / step["batch"], basis + "S"
    else:
        plain_ms, basis = compute_ms, "S" + basis
    modules = parse_label(label).modules
    method_ms, start = plain_ms, recipe.epochs
    if same_step_measured(recipe, bench):
        _, epoch = bench.epochs[recipe.model.name]
        method_ms, start, basis = 1000 * epoch["t_grouped_s"] / epoch["steps_per_epoch"], recipe.groups.start_epoch, \
            basis + "M"
    elif STEP_KIND[modules] != "none":
        path, cpu = bench.cpu_steps
        if f"{STEP_KIND[modules]}_ms" not in cpu:
            raise AnalysisError(f"{path} has no step kind {STEP_KIND[modules]!r} (the time of `{label}`'s step): "
                                "update paper_tables.STEP_KIND to the kinds tools/bench_step.py records")
        over_plain = cpu[f"{STEP_KIND[modules]}_ms"] / cpu["none_ms"] - 1.0
        method_ms = plain_ms + compute_ms * over_plain * recipe.groups.num_groups / cpu["groups"]
        start, basis = recipe.groups.start_epoch, basis + "R"
    elif modules:
        start = recipe.groups.start_epoch
    ms = steps * (start * plain_ms + (recipe.epochs - start) * method_ms)
    return Projection(ms / 3.6e6, steps, plain_ms, method_ms, "".join(sorted(basis)), step["device_name"])


def paper_cells(rows: list[dict[str, Any]], folder: str, label: str) -> tuple[str, str]:
    """(the paper's Top-1 with where it is, its Many / Medium / Few) for a folder and label; dashes without."""
    hits = [r for r in rows if r["folder"] == folder and r["label"] == label]
    if not hits:
        return "—", "—"
    top1 = " = ".join(dict.fromkeys(f"{r['top1']:.1f}" for r in hits))
    where = ", ".join(dict.fromkeys(r["source"] for r in hits))
    splits = next((r for r in hits if "many" in r), None)
    return f"{top1} ({where})", "—" if splits is None else " / ".join(f"{splits[k]:.1f}" for k in METRICS[1:])


def grid_table(name: str, tree: dict[str, dict[str, list]], paper: dict[str, list[dict[str, Any]]],
               bench: Bench) -> tuple[list[str], float]:
    """One paper grid's rows (paper beside ours, projected hours of one seed) and the grid's hours for one seed."""
    grid = GRIDS[name]
    rows, total = [], 0.0
    for ratio in sorted(grid.cells, key=lambda r: -1 if r is None else r, reverse=True):
        folder = folder_of(grid, ratio)
        for label in grid.cells[ratio]:
            p = project(grid, label, ratio, bench)
            total += p.hours
            runs = tree.get(folder, {}).get(label)
            ours = summarize(runs) if runs else None
            top1, splits = paper_cells(paper["top1"], folder, label)
            reported = next((r["top1"] for r in paper["top1"] if r["folder"] == folder and r["label"] == label), None)
            rows.append([f"`{label}`", "—" if ratio is None else str(ratio), top1,
                         "—" if ours is None else _fmt(ours.mean["top1"], ours.std["top1"]),
                         "—" if ours is None or reported is None else f"{ours.mean['top1'] - reported:+.2f}",
                         str(0 if ours is None else len(ours.seeds)), splits,
                         "—" if ours is None else " / ".join(_fmt(ours.mean[k], math.nan) for k in METRICS[1:]),
                         f"{p.hours:.2f}", p.basis])
    return _table(["run", "r", "paper Top-1 (where)", "ours Top-1", "ours − paper", "seeds",
                   "paper Many / Med / Few", "ours Many / Med / Few", "GPU-h per seed", "basis"], rows), total


# a sentence under a grid's table
NOTES = {"groups_cifar100": "The paper reports its best G as 4 on CIFAR-LT (the recipe's G, the `bcl+gkp+gsa` row).",
         "table1_cifar100": "The CE figures beside ours are Table 4's (r=100); results/paper.yaml has none for CE "
                                    "at r=50 and 10.",
         "table4": "results/paper.yaml holds no CE+GSA figure."}
TITLES = {"table1_cifar100": "Table 1, CIFAR-100-LT (ResNet-32)", "table1_cifar10": "Table 1, CIFAR-10-LT (ResNet-32)",
          "table4": "Table 4, components (CIFAR-100-LT r=100)",
          "table5": "Table 5, GSA's direction (CIFAR-100-LT r=100)",
          "groups_cifar100": "Number of groups G (CIFAR-100-LT r=100)",
          "imagenet_lt_resnet50": "ImageNet-LT, ResNet-50", "imagenet_lt_resnext50": "ImageNet-LT, ResNeXt-50 (32x4d)",
          "inat2018": "iNaturalist 2018, ResNet-50"}


def cost_table(hours: dict[str, float], bench: Bench, paper: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each grid's and set's projected hours for one and three seeds (a run two grids share counted once per set)."""
    rows = [[f"`--grid {name}`", str(sum(len(v) for v in GRIDS[name].cells.values())), f"{h:.1f}", f"{3 * h:.1f}"]
            for name, h in hours.items()]
    for name, members in GRID_SETS.items():
        seen: dict[tuple[str, str], float] = {}
        for member in members:
            grid = GRIDS[member]
            for ratio, labels in grid.cells.items():
                for label in labels:
                    seen.setdefault((folder_of(grid, ratio), label),
                                    project(grid, label, ratio, bench).hours)
        rows.append([f"`--grid {name}`", str(len(seen)), f"{sum(seen.values()):.1f}", f"{3 * sum(seen.values()):.1f}"])
    lines = _table(["grid", "runs", "GPU-hours, one seed", "three seeds (`--seeds 0,1,2`)"], rows)
    reference = ", ".join(f"`{r['label']}` {r['hours']:.2f} h" for r in paper["hours"])
    devices = sorted({d["device_name"] for _, d in bench.gpu_steps.values()}
                     | {d.get("gpu", d["device"]) for _, d in bench.epochs.values()})
    return lines + ["", f"Projected on the GPU the benchmarks ran on ({', '.join(devices)}). For scale, the paper's "
                        f"training time on one RTX 3090 (CIFAR-LT, ResNet-32): {reference}."]


def basis_lines(bench: Bench) -> list[str]:
    """The legend of the basis letters and the files each rests on."""
    files = sorted({p for p, _ in bench.epochs.values()} | {p for p, _ in bench.gpu_steps.values()}
                   | {bench.cpu_steps[0]})
    lines = ["Basis of each projection (letters in the tables): " + "; ".join(f"**{k}** {v}" for k, v in BASIS.items())
             + f". Files: {', '.join(f'`{p}`' for p in files)} (of the files under results/history/, recorded with the "
               "first grouped step, only the plain step's figures are read). Every row with R or S is an "
               "extrapolation; the extra time of a regrouping (memory bank, spectral grouping, Fisher) and of the "
               "test evaluation is left out."]
    return lines


def build_block(results_root: str) -> str:
    """The block of docs/reproduce.md (markers included)."""
    tree = _scan(results_root) if os.path.isdir(results_root) else {}
    paper, bench = read_paper(), read_bench()
    lines = [BEGIN, f"<!-- generated by tools/paper_tables.py from {os.path.relpath(results_root, ROOT)}/, "
                    "results/paper.yaml and results/bench/; edits here are overwritten -->"]
    hours = {}
    for name in PAPER_GRIDS:
        table, hours[name] = grid_table(name, tree, paper, bench)
        lines += ["", f"#### {TITLES[name]}: `--grid {name}`", ""] + table + (["", NOTES[name]] if name in NOTES
                                                                                else [])
    lines += ["", "Ours: test accuracy (%) at the last epoch, mean ± std over the seeds done; ours − paper: the "
                  "difference of Top-1 means.", "", "#### What it costs", ""] + cost_table(hours, bench, paper)
    lines += [""] + basis_lines(bench)
    return "\n".join(lines + ["", END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="results tree (default: results)")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "reproduce.md"),
                   help="page whose paper block is replaced (default: docs/reproduce.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the block is out of date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        block = build_block(args.results)
        with open(args.doc) as f:
            text = f.read()
        new = replace_block(text, block, args.doc, BEGIN, END)
    except (LTRecipesError, OSError) as e:
        _logger.error("%s", e)
        return 2
    print(block)
    if args.check:
        if new != text:
            _logger.error("%s: the paper tables are out of date; run tools/paper_tables.py", args.doc)
            return 1
        return 0
    if new != text:
        atomic_write_text(args.doc, new)
        _logger.info("updated the paper tables of %s", args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
