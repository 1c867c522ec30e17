#!/usr/bin/env python3
"""Run a results grid of Fashion-MNIST-LT and write commit-ready files under results/.

A grid is a recipe plus, per imbalance ratio, a list of run labels (lt_recipes.labels),
`<base>[+<modules>][@<direction>][#<variant>]`: the base loss (ce, la, bs, ldam_drw, bcl), the method's modules (sam,
gkp, gsa, gkp+gsa), GSA's ascent direction when not h_g, and a named variant (VARIANTS: recipe keys changed on top,
such as the Euclidean scaling or the group count). Each job trains one label, ratio and seed into a scratch run
directory, then copies args.yaml, results.json, groups.json, quality.json and summary.csv (and variant.json for a
variant) to results/<folder>_r<ratio>/<label>/seed<k>/; checkpoints stay in scratch. Jobs whose results exist are
skipped and unfinished scratch runs resume, so a grid can be stopped and continued by a later session. Jobs run one at
a time by default (the CPU machines have two cores).

    python tools/run_grid.py --grid digits                   # the main job's recipe, default method vs its base
    python tools/run_grid.py --grid fmnist16                 # the 16-epoch grid (README results)
    python tools/run_grid.py --grid fmnist64 --ratios 100    # the paper-shaped 64-epoch schedule
    python tools/run_grid.py --grid fmnist64 --list          # what is done and what is left
    python tools/run_grid.py --grid peers                    # the sharpness-aware peers on the same bases
    python tools/run_grid.py --grid fmnist200 --workers 4    # a GPU: the paper's CIFAR protocol at 28 px
    python tools/run_grid.py --grid table1 --gpus 0,1,2,3     # GPUs: the paper's Table 1, four jobs at once
    python tools/run_grid.py --grid table1 --shard 1/2       # machine 1 of 2 (docs/reproduce.md)

The paper's tables (PAPER_GRIDS; docs/reproduce.md) run on the CIFAR-10/100-LT, ImageNet-LT and iNaturalist recipes:
`--grid` takes a grid, a set of grids (GRID_SETS: table1, paper) or a comma-separated list; runs shared by two grids
(CIFAR-100-LT r=100 `bcl` is in Tables 1, 4 and 5) train once. The grid's state is the results/ tree: a job whose
results.json exists is skipped wherever it was trained, so machines that commit their results (`--commit`) and pull
each other's continue one grid, and `--shard k/n` gives machine k of n every n-th job of the same list.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lt_recipes.choices import LOSSES
from lt_recipes.cli import last_error
from lt_recipes.config import defaults, flatten, parse_override, reading_preset
from lt_recipes.labels import DEFAULT_DIRECTION, parse_label
from lt_recipes.sections import GSAConfig, LossConfig
from lt_recipes.steps import list_steps, step_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each base's keys: its loss and what the loss needs of the other sections (LossConfig.PAIRED_KEYS, which the recipe
# checks), and the grid's own choice for BCL: a 512-128 projection head and the cosine classifier
_GRID_KEYS = {"bcl": ["model.proj_head=[512, 128]", "model.classifier=cosine"]}
BASES = {name: [f"loss.name={name}", *(f"{k}={v}" for k, v in LossConfig.PAIRED_KEYS.get(name, {}).items()),
                *_GRID_KEYS.get(name, [])] for name in LOSSES}
# the adaptive radius clamp of the released code, the default before the readings grid measured a smaller one
_RELEASED_CLAMP = "gsa.rho_clamp=[0.002, 0.003]"
VARIANTS = {
    "euclidean": ["gsa.scale=euclidean"],        # Eq. 14 as printed, Z = 1e-2, no clamp
    "share": ["gsa.group_grads=share"],          # Eq. 11 read as a split of the one batch gradient
    # the paper's G perturbed group losses in one mixed pass (the 16-epoch rows' default was the averaged pass)
    "per_group": ["gsa.perturbation=per_group"],
    "per_group_euclidean": ["gsa.perturbation=per_group", "gsa.scale=euclidean"],
    "per_group_share": ["gsa.perturbation=per_group", "gsa.group_grads=share"],
    # a ten times smaller radius (clamp) of the adaptive scaling
    "per_group_rho_div10": ["gsa.perturbation=per_group", "gsa.rho_clamp=[0.0002, 0.0003]"],
    "cosine": ["model.classifier=cosine"],       # BCL's classifier without its contrastive term
    "G2": ["groups.num_groups=2"],
    "G6": ["groups.num_groups=6"],
    # the readings of the grouped step (docs/method.md), each spelled out so the folder keeps its meaning
    # (the first four at the released clamp, the default of the day they ran: their args.yaml say "auto")
    "paper": ["reading=paper", "gsa.perturbation=per_group", _RELEASED_CLAMP],  # Eq. 15: one mixed pass
    "paper_exact": ["reading=paper", "gsa.perturbation=per_group_exact", _RELEASED_CLAMP],  # one pass per group
    "paper_ema": ["reading=paper", "gsa.perturbation=per_group", "gsa.group_grad_ema=0.9", _RELEASED_CLAMP],
    "released": ["reading=released"],                                     # the authors' script as its README runs it
    # ASAM at the released radius (docs/results.md, "What the readings grid says": how the value follows from it)
    # (run as method sam with sam.adaptive, the key before ASAM was a step of its own)
    "r1.57": ["asam.rho=1.57"],
    "b128": ["data.batch_size=128", "optim.lr=0.2"],                       # 4x the batch, the learning rate scaled
    "paper_exact_b128": ["reading=paper", "gsa.perturbation=per_group_exact", "data.batch_size=128", "optim.lr=0.2",
                         _RELEASED_CLAMP],
    # a ten times smaller radius clamp, the default (docs/method.md, "Perturbation scaling": why)
    "paper_exact_rho_div10": ["reading=paper", "gsa.perturbation=per_group_exact", "gsa.rho_clamp=[0.0002, 0.0003]"],
    "paper_exact_lam1e5": ["reading=paper", "gsa.perturbation=per_group_exact", "gkp.lam=1e5", _RELEASED_CLAMP],
    # the default step with another group number (the paper's Table 4 ablation)
    **{f"paper_exact_rho_div10_G{g}": ["reading=paper", "gsa.perturbation=per_group_exact",
                                      "gsa.rho_clamp=[0.0002, 0.0003]", f"groups.num_groups={g}"] for g in (2, 6)},
    "paper_exact_rho_div10_lam1e5": ["reading=paper", "gsa.perturbation=per_group_exact",
                                     "gsa.rho_clamp=[0.0002, 0.0003]", "gkp.lam=1e5"],
    "lam0": ["gkp.lam=0"],                                                # GKP's control: alpha's schedule alone
    # GKP strength sweep: lambda with the released Fisher (batch_mean) and EWC's (per_sample), and the paper's |G_j|
    # (the ranges probed: docs/results.md, "What the readings grid says")
    **{f"lam1e{k}": [f"gkp.lam=1e{k}"] for k in (4, 5, 6, 7)},
    **{f"ps_lam1e{k}": ["gkp.fisher=per_sample", f"gkp.lam=1e{k}"] for k in (1, 2, 3, 4)},
    "classes": ["gkp.norm=per_classes"], "ps_classes": ["gkp.fisher=per_sample", "gkp.norm=per_classes"],
    # SAM + re-weighting (Rangwani et al. 2022): plain SAM at its CIFAR-100-LT radius for LDAM+DRW / CE+DRW
    "drw": ["sam.rho=0.8"],
    # the paper's group-number sweep on its recipes (G = 4, its best on CIFAR-LT, is the recipe's own)
    "G8": ["groups.num_groups=8"],
}
COPY = ["args.yaml", "results.json", "groups.json", "quality.json", "summary.csv"]


def resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat recipe keys with the grouped step's radius written out (a null gsa.z and an `auto` clamp: the values
    GSAConfig.radius resolves them to), so that two spellings of one step compare equal."""
    z, clamp = GSAConfig.radius(flat["gsa.scale"], flat["gsa.z"], flat["gsa.rho_clamp"])
    return {**flat, "gsa.z": z, "gsa.rho_clamp": None if clamp is None else list(clamp)}


def variant_keys(name: str) -> dict[str, Any]:
    """The flat recipe keys a variant sets, its `reading` spelled out as the reading's preset."""
    out: dict[str, Any] = {}
    for text in VARIANTS[name]:
        key, value = parse_override(text)
        out.update(reading_preset(value) if key == "reading" else {key: value})
    return out


def default_variant() -> str:
    """The variant that spells out the grouped step's defaults (the schema's, lt_recipes.sections): of the variants
    that set only `reading` and gsa keys, the one whose keys change nothing of the schema's defaults. Its rows stand
    for the default step in the tables; a changed default makes another variant (or none) the one."""
    schema = flatten(defaults())
    candidates = [name for name, keys in VARIANTS.items()
                  if all(k.startswith(("reading=", "gsa.")) for k in keys)
                  and resolved({**schema, **variant_keys(name)}) == resolved(schema)]
    if len(candidates) != 1:
        raise RuntimeError(f"tools/run_grid.py: {len(candidates)} variants spell out the grouped step's defaults "
                           f"({', '.join(candidates) or 'none'}); VARIANTS needs exactly one")
    return candidates[0]


# the variant whose keys are the current defaults of the grouped step (its rows stand for the default in the tables)
DEFAULT_VARIANT = default_variant()


@dataclass(frozen=True)
class Grid:
    """A recipe, the results folder prefix, the run labels per imbalance ratio, and labels run for the first seed
    only (`sweeps`: a sweep reads one seed, and its best setting becomes a row of its own)."""

    recipe: str
    folder: str
    cells: dict[int | None, list[str]] = field(default_factory=dict)
    sweeps: dict[int | None, list[str]] = field(default_factory=dict)
    bases: dict[str, list[str]] = field(default_factory=lambda: BASES)  # the recipe keys of each label's base


# The paper's recipes are BCL recipes (BCL is the paper's base): the BCL rows take the recipe as it is; the CE rows
# drop BCL's extra views, projection head and cosine classifier, and train with crop and flip (the plain CE
# baseline of the long-tail literature; docs/reproduce.md).
PAPER_BASES = {"bcl": [], "ce": ["loss.name=ce", "data.contrastive_views=0", "model.proj_head=null",
                                  "model.classifier=linear", "data.augment=basic"]}
_TABLE1 = ["ce", "ce+gkp+gsa", "bcl", "bcl+gkp+gsa"]
_ABLATION = ["ce", "ce+gkp", "ce+gsa", "ce+gkp+gsa", "bcl", "bcl+gkp", "bcl+gsa", "bcl+gkp+gsa"]
PAPER_GRIDS = {
    # Table 1: BCL and CE, with and without GKP+GSA, at r = 100, 50, 10
    "table1_cifar100": Grid("cifar100_lt_resnet32", "cifar100", {100: _TABLE1, 50: _TABLE1, 10: _TABLE1},
                            bases=PAPER_BASES),
    "table1_cifar10": Grid("cifar10_lt_resnet32", "cifar10", {100: _TABLE1, 50: _TABLE1, 10: _TABLE1},
                           bases=PAPER_BASES),
    # Table 4: the components on BCL and CE, CIFAR-100-LT r=100
    "table4": Grid("cifar100_lt_resnet32", "cifar100", {100: _ABLATION}, bases=PAPER_BASES),
    # Table 5: GSA's ascent direction (SAM's global g, the removed component, h_g), BCL, CIFAR-100-LT r=100
    "table5": Grid("cifar100_lt_resnet32", "cifar100", {100: [
        "bcl", "bcl+gkp+gsa@sam", "bcl+gkp+gsa@gsa_proj", "bcl+gkp+gsa"]}, bases=PAPER_BASES),
    # the group number G on BCL, CIFAR-100-LT r=100 (4: the recipe's)
    "groups_cifar100": Grid("cifar100_lt_resnet32", "cifar100", {100: [
        "bcl", "bcl+gkp+gsa#G2", "bcl+gkp+gsa", "bcl+gkp+gsa#G6", "bcl+gkp+gsa#G8"]}, bases=PAPER_BASES),
    # the list-file datasets at their lists' own long tail (a ratio of None: no data.imbalance_ratio)
    "imagenet_lt_resnet50": Grid("imagenet_lt_resnet50", "imagenet_lt_resnet50", {None: ["bcl", "bcl+gkp+gsa"]},
                                 bases=PAPER_BASES),
    "imagenet_lt_resnext50": Grid("imagenet_lt_resnext50", "imagenet_lt_resnext50", {None: ["bcl", "bcl+gkp+gsa"]},
                                  bases=PAPER_BASES),
    "inat2018": Grid("inat2018_resnet50", "inat2018_resnet50", {None: ["bcl", "bcl+gkp+gsa"]}, bases=PAPER_BASES),
}


_BCL_TABLE5 = ["bcl+gkp+gsa@sam", "bcl+gkp+gsa@gsa_proj"]
# every registered sharpness-aware step other than the paper's own and its released reading (the fmnist64 grid's rows)
PEER_STEPS = [s for s in list_steps() if s != "none" and step_info(s).grouping != "memory"]
GRIDS = {
    # the main job's recipe (scikit-learn digits, r=10, 30 epochs): the default method against its base
    "digits": Grid("digits_lt", "digits", {10: ["ce", f"ce+gkp+gsa#{DEFAULT_VARIANT}"]}),
    # the CPU-sized 16-epoch recipe: the grouped step v2 against each base, and its two alternative modes
    "fmnist16": Grid("fmnist_lt_resnet8", "fmnist", {100: [
        "ce", "ce+sam", "ce+gkp", "ce+gsa", "ce+gkp+gsa", "la", "la+gkp+gsa", "bcl", "bcl+gkp+gsa",
        "ce+gkp+gsa#euclidean", "ce+gkp+gsa#share"]}),
    # the paper's schedule shape at 4x the budget: component ablations on CE and BCL, LA with BCL's classifier,
    # the direction ablation (paper Table 5) and the group number on BCL
    # (the GSA rows spell the current default step out as DEFAULT_VARIANT; the averaged step's rows are history)
    "fmnist64": Grid("fmnist_lt_resnet8_long", "fmnist64", {
        100: ["ce", "ce+gkp", f"ce+gsa#{DEFAULT_VARIANT}", f"ce+gkp+gsa#{DEFAULT_VARIANT}", "la", "la#cosine",
              f"la+gkp+gsa#{DEFAULT_VARIANT}", "bcl", "bcl+gkp", f"bcl+gsa#{DEFAULT_VARIANT}",
              f"bcl+gkp+gsa#{DEFAULT_VARIANT}"] + _BCL_TABLE5 + [f"{m}#{DEFAULT_VARIANT}" for m in _BCL_TABLE5],
        10: ["ce", f"ce+gkp+gsa#{DEFAULT_VARIANT}", "bcl", f"bcl+gkp+gsa#{DEFAULT_VARIANT}"]}),
    # the grouped step's readings on the 64-epoch recipe against BCL and plain ASAM, GKP's control and strength sweep,
    # a 4x batch (docs/results.md, "Readings of the grouped step")
    "readings": Grid("fmnist_lt_resnet8_long", "fmnist64", {100: [
        "bcl+asam#r1.57", "bcl+gkp+gsa#paper", "bcl+gkp+gsa#paper_exact", "bcl+gkp+gsa#paper_ema",
        "bcl+gkp+gsa#released", "bcl+gkp#lam0", "bcl", "bcl+gkp", "bcl#b128",
        # the chosen default (the exact paper reading: every group ascends) at 4x the batch and on the other bases
        "bcl+gkp+gsa#paper_exact_b128", "ce", "ce+gkp+gsa#paper_exact", "la", "la+gkp+gsa#paper_exact",
        # phase 2: a ten times smaller radius on every base;
        # the strongest GKP that binds without diverging (the sweep: batch-mean Fisher, lambda 1e5) alone and inside
        # the default step
        "bcl+gkp+gsa#paper_exact_rho_div10", "ce+gkp+gsa#paper_exact_rho_div10", "la+gkp+gsa#paper_exact_rho_div10",
        "bcl+gkp#lam1e5", "bcl+gkp+gsa#paper_exact_lam1e5", "bcl+gkp+gsa#paper_exact_rho_div10_lam1e5"]},
        sweeps={100: [f"bcl+gkp#lam1e{k}" for k in (4, 5, 6, 7)]
                + [f"bcl+gkp#ps_lam1e{k}" for k in (1, 2, 3, 4)]
                + ["bcl+gkp#classes", "bcl+gkp#ps_classes"]}),
    # the sharpness-aware peers (lt_recipes.steps) at their authors' defaults on the LA and BCL bases (ImbSAM also on CE,
    # as its authors run it), SAM + DRW on LDAM-DRW, and each base alone (docs/results.md, "Sharpness-aware methods on
    # the same bases")
    "peers": Grid("fmnist_lt_resnet8_long", "fmnist64", {100: [
        f"{base}+{step}" for base in ("la", "bcl") for step in PEER_STEPS] + [
        "ce+imbsam", "ldam_drw+sam#drw", "ce", "la", "bcl", "ldam_drw"]}),
    # for a GPU: the paper's CIFAR protocol (ResNet-32, 200 epochs, batch 256) on the full 28-px Fashion-MNIST-LT
    "fmnist200": Grid("fmnist_lt_resnet32", "fmnist200", {100: ["la", "la+gkp+gsa"]}),
    **PAPER_GRIDS,
}
# names that stand for several grids (`--grid table1`)
GRID_SETS = {"table1": ["table1_cifar100", "table1_cifar10"], "paper": list(PAPER_GRIDS)}
# extras: the paper's group-number ablation on the full method (G = 4 is the grid's own cell), and investigations
EXTRAS = {"fmnist64": {100: [f"bcl+gkp+gsa#{DEFAULT_VARIANT}_G2", f"bcl+gkp+gsa#{DEFAULT_VARIANT}_G6"]},
          # the paper's per-group perturbed pass (the first v2 default), and a smaller radius with it
          "fmnist16": {100: ["ce+gsa#per_group", "ce+gkp+gsa#per_group", "la+gkp+gsa#per_group",
                             "bcl+gkp+gsa#per_group", "ce+gkp+gsa#per_group_euclidean",
                             "ce+gkp+gsa#per_group_share", "ce+gkp+gsa#per_group_rho_div10"]}}


def overrides(label: str, ratio: int | None, seed: int, bases: dict[str, list[str]] = BASES) -> list[str]:
    """Recipe overrides for a run label such as `la+gkp+gsa@sam` or `bcl+gkp+gsa#G2` (`bases`: the grid's base keys;
    a ratio of None leaves a list-file dataset's own long tail)."""
    run = parse_label(label)
    out = bases[run.base] + [f"method={run.method}"]
    out += ([] if ratio is None else [f"data.imbalance_ratio={ratio}"]) + [f"seed={seed}"]
    out += VARIANTS[run.variant] if run.variant else []
    # the direction after the variant: a variant's `reading=...` presets the direction, a key set after it wins
    return out + ([f"gsa.direction={run.direction}"] if run.direction != DEFAULT_DIRECTION else [])


def folder_of(grid: Grid, ratio: int | None) -> str:
    """The results folder of a grid's ratio: `<folder>_r<ratio>`, or `<folder>` for a list-file dataset's own tail."""
    return grid.folder if ratio is None else f"{grid.folder}_r{ratio}"


def result_dir(results: str, grid: Grid, label: str, ratio: int | None, seed: int) -> str:
    return os.path.join(results, folder_of(grid, ratio), label, f"seed{seed}")


def job_name(label: str, ratio: int | None, seed: int) -> str:
    """`la+gkp+gsa r=100 seed=0` (a list-file dataset: `bcl seed=0`), as the runner prints it."""
    return f"{label}{'' if ratio is None else f' r={ratio}'} seed={seed}"


def jobs_of(name: str, ratios: list[int], seeds: list[int]) -> list[tuple[str, int, int]]:
    """(label, ratio, seed) of a grid in run order, seed by seed: every cell and extra of seed 0 first, so a grid
    stopped early still has one complete seed."""
    grid, extras = GRIDS[name], EXTRAS.get(name, {})
    return [(label, r, s) for s in seeds for r in ratios
            for label in grid.cells.get(r, []) + extras.get(r, []) + (grid.sweeps.get(r, []) if s == seeds[0] else [])]


def run_job(grid: Grid, label: str, ratio: int, seed: int, args: argparse.Namespace) -> str:
    """Train one run and copy its files; skip it when its results exist."""
    dest = result_dir(args.results, grid, label, ratio, seed)
    if os.path.exists(os.path.join(dest, "results.json")):
        return f"skip {job_name(label, ratio, seed)}"
    if os.path.exists(os.path.join(dest, "train.log")):  # a run that stopped (diverged): its log is its result
        return f"skip {job_name(label, ratio, seed)} (stopped; its train.log is committed)"
    scratch = os.path.join(args.scratch, folder_of(grid, ratio), label, f"seed{seed}")
    os.makedirs(scratch, exist_ok=True)
    with open(os.path.join(scratch, "running.lock"), "w") as lock:
        try:  # another runner (two grids share labels) trains this job now; the lock dies with its process
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"busy {job_name(label, ratio, seed)} (another runner trains it)"
        if os.path.exists(os.path.join(dest, "results.json")):  # finished by that runner while this one waited
            return f"skip {job_name(label, ratio, seed)}"
        return _train_and_copy(grid, label, ratio, seed, args, dest, scratch)


def _train_and_copy(grid: Grid, label: str, ratio: int, seed: int, args: argparse.Namespace, dest: str,
                    scratch: str) -> str:
    launcher = shlex.split(args.launch) if args.launch else [sys.executable]
    cmd = launcher + [os.path.join(args.code, "train.py"), "--recipe", grid.recipe, "--output", scratch]
    for o in overrides(label, ratio, seed, grid.bases) + args.overrides:
        cmd += ["--set", o]
    if os.path.exists(os.path.join(scratch, "checkpoint.pt")):
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    slots = getattr(args, "gpu_slots", None)
    gpus = slots.get() if slots is not None else None  # this job's GPUs, back to the pool when it ends
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    t0 = time.time()
    try:
        with open(os.path.join(scratch, "train.log"), "a") as log:
            proc = subprocess.run(cmd, cwd=args.code, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        if gpus is not None:
            slots.put(gpus)
    diverged = proc.returncode != 0 and _diverged(os.path.join(scratch, "train.log"))
    if proc.returncode != 0 and not diverged:
        return f"FAILED {job_name(label, ratio, seed)} (see {scratch}/train.log)"
    os.makedirs(dest, exist_ok=True)
    # a diverged run is a result too: its train.log (with the error) is committed in place of results.json
    for name in ["args.yaml", "train.log"] if diverged else COPY:
        if os.path.exists(os.path.join(scratch, name)):
            shutil.copy(os.path.join(scratch, name), os.path.join(dest, name))
    variant = parse_label(label).variant
    if variant:
        with open(os.path.join(dest, "variant.json"), "w") as f:
            json.dump({"name": variant, "overrides": VARIANTS[variant]}, f, indent=1)
    outcome = "stopped (diverged)" if diverged else "done"
    if args.commit:
        where = grid.folder if ratio is None else f"{grid.folder} r={ratio}"
        message = f"results: {where} {label} seed {seed}" + (" stopped: diverged" if diverged else "")
        commit(dest, message, tables=not args.no_tables)
    return f"{outcome} {job_name(label, ratio, seed)} in {time.time() - t0:.0f}s"


def _diverged(log_path: str) -> bool:
    """Whether a failed run stopped because training diverged: the last error its train.log records is the engine's
    non-finite stop (lt_recipes.errors.NonFiniteError), not bad input or a kill."""
    error = last_error(log_path)
    return error is not None and "non-finite" in error


TABLES = ["docs/results.md", "README.md", "docs/per_class_*.png"]  # what tools/collect_results.py writes
PAPER_TABLES = ["docs/reproduce.md"]  # what tools/paper_tables.py writes


def commit(path: str, message: str, tables: bool = True, tries: int = 5) -> None:
    """git commit of `path`, with the result tables regenerated from it (unless `tables` is off) so that committed
    tables match the committed runs; retried while another git command holds the index lock."""
    paths = [path]
    for tool, written in (("collect_results.py", TABLES), ("paper_tables.py", PAPER_TABLES)) if tables else ():
        regen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)], cwd=ROOT, capture_output=True,
                               text=True)
        paths += written if regen.returncode == 0 else []
    for attempt in range(tries):
        add = subprocess.run(["git", "add", *paths], cwd=ROOT, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=ROOT,
                                                      capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"could not commit {path}; commit it by hand", file=sys.stderr, flush=True)


def grid_names(spec: str) -> list[str]:
    """The grids of `--grid`: a grid, a set of GRID_SETS, or a comma-separated list of either, in order, once each."""
    names = []
    for name in spec.split(","):
        if name not in GRIDS and name not in GRID_SETS:
            raise SystemExit(f"--grid: no grid or set named {name!r}; grids: {', '.join(sorted(GRIDS))}; "
                             f"sets: {', '.join(GRID_SETS)}")
        names += GRID_SETS.get(name, [name])
    return list(dict.fromkeys(names))


def select_jobs(names: list[str], ratios: list[int] | None, seeds: list[int]) -> list[tuple[str, str, int | None, int]]:
    """(grid, label, ratio, seed) of the grids in run order: seed by seed, each grid's jobs of that seed in its own
    order; a run two grids share (same folder, label, ratio, seed) appears once, under the first. `ratios` None: every
    ratio of each grid (a list-file dataset's None among them); else those of each grid that are listed."""
    jobs, seen = [], set()
    for name in names:
        grid = GRIDS[name]
        own = sorted(grid.cells, key=lambda r: -1 if r is None else r, reverse=True)
        for label, ratio, seed in jobs_of(name, [r for r in own if ratios is None or r in ratios], seeds):
            key = (folder_of(grid, ratio), label, seed)
            if key not in seen:
                seen.add(key)
                jobs.append((name, label, ratio, seed))
    return sorted(jobs, key=lambda j: seeds.index(j[3]))  # stable: within a seed, the grids' order


def shard_of(spec: str) -> tuple[int, int]:
    """`--shard k/n` -> (k, n), 1 <= k <= n."""
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise SystemExit(f"--shard {spec}: expected k/n with 1 <= k <= n (machine k of n), e.g. --shard 1/2")
    return int(k), int(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="fmnist16",
                    help=f"a grid ({', '.join(sorted(GRIDS))}), a set ({', '.join(GRID_SETS)}) or a comma-separated "
                         "list")
    ap.add_argument("--ratios", default=None, help="comma-separated ratios (default: every ratio of the grid)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None, help="comma-separated run labels to run (default: all of the grid)")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="run every N-th job of the list, starting at the K-th (machine K of N; the machines split "
                         "the same list, and each skips what the committed results/ already hold)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every job (e.g. data.root=/elsewhere/fashion-mnist)")
    ap.add_argument("--workers", type=int, default=None, help="jobs at once (default: one, or one per --gpus entry)")
    ap.add_argument("--gpus", default=None, metavar="LIST",
                    help="the GPUs of each concurrent job, comma-separated, '+' joining a multi-GPU job's: 0,1,2,3 "
                         "(four one-GPU jobs) or 0+1+2+3,4+5+6+7 (with --launch for the processes)")
    ap.add_argument("--launch", default=None, metavar="COMMAND",
                    help="the launcher each job's train.py runs under (default: this Python), e.g. \"accelerate launch "
                         "--multi_gpu --num_processes 4 --mixed_precision bf16\" or \"torchrun --nproc_per_node 4\"")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per training process")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--scratch", default=os.path.join(ROOT, "runs", "grid"))
    ap.add_argument("--code", default=ROOT,
                    help="the checkout whose train.py trains (default: this one): a git worktree held at one commit "
                         "keeps a long grid on one version of the code while this checkout changes; results and "
                         "commits still go here")
    ap.add_argument("--commit", action="store_true",
                    help="git commit each run's result files, with the tables regenerated, when it finishes")
    ap.add_argument("--no-tables", action="store_true",
                    help="with --commit, commit the run files only (regenerate the tables with collect_results.py)")
    ap.add_argument("--list", action="store_true", help="print each job as done or todo, run nothing")
    args = ap.parse_args(argv)
    names = grid_names(args.grid)
    ratios = [int(r) for r in args.ratios.split(",")] if args.ratios else None
    jobs = select_jobs(names, ratios, [int(s) for s in args.seeds.split(",")])
    if args.only:
        only = args.only.split(",")
        unknown = sorted(set(only) - {label for _, label, _, _ in jobs})
        if unknown:
            raise SystemExit(f"--only: grid {args.grid} has no run labelled {', '.join(unknown)}")
        jobs = [j for j in jobs if j[1] in only]
    if args.shard:
        k, n = shard_of(args.shard)
        jobs = jobs[k - 1::n]
    several = len({GRIDS[name].folder for name, *_ in jobs}) > 1  # then each line names its grid's folder

    def where(name: str) -> str:
        return f"{GRIDS[name].folder}: " if several else ""
    if args.list:
        for name, label, ratio, seed in jobs:
            dest = result_dir(args.results, GRIDS[name], label, ratio, seed)
            state = ("done" if os.path.exists(os.path.join(dest, "results.json"))
                     else "stopped" if os.path.exists(os.path.join(dest, "train.log")) else "todo")
            print(f"{state} {where(name)}{job_name(label, ratio, seed)}")
        return 0
    if args.gpus:
        args.gpu_slots = queue.Queue()
        for entry in args.gpus.split(","):
            args.gpu_slots.put(entry.replace("+", ","))
    workers = args.workers or (len(args.gpus.split(",")) if args.gpus else 1)
    with ThreadPoolExecutor(workers) as pool:
        for (name, *_), msg in zip(jobs, pool.map(lambda j: run_job(GRIDS[j[0]], *j[1:], args), jobs)):
            print(f"{where(name)}{msg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
