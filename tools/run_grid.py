#!/usr/bin/env python3
"""Run the Fashion-MNIST-LT results grid of the README and commit-ready files under results/.

Each job trains `fmnist_lt_resnet8` with one method label (`<base>` or `<base>+<modules>[@direction]`), ratio and
seed into a scratch run directory, then copies args.yaml, results.json, groups.json, quality.json and summary.csv to
results/fmnist_r<ratio>/<label>/seed<k>/ (checkpoints stay in scratch). Jobs whose results exist are skipped and
unfinished scratch runs are resumed, so the grid can be stopped and restarted. The direction ablation runs on the
base with the best mean Top-1 at r=100 among the finished base runs (`--ablation-base auto`).

`--sweep` runs the investigation instead: one method label with one set of changed recipe keys per entry of SWEEP
(radius, lambda, grouping epoch, Fisher estimate, BatchNorm statistics of the group passes), into
results/sweeps/fmnist_r<ratio>/<name>/seed<k>/ with a sweep.json that records the label and the changed keys.

    python tools/run_grid.py --workers 2
    python tools/run_grid.py --sweep --ratios 100 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = {
    "ce": ["loss.name=ce"],
    "la": ["loss.name=la"],
    "bs": ["loss.name=bs"],
    "ldam_drw": ["loss.name=ldam_drw"],
    "bcl": ["loss.name=bcl", "data.contrastive_views=2", "model.proj_head=[512, 128]", "model.classifier=cosine"],
}
MODULES = {"": "none", "sam": "sam", "gkp": "gkp", "gsa": "gsa", "gkp+gsa": "gkp_gsa"}
GRID = ["ce", "la", "ce+gkp+gsa", "la+gkp+gsa", "ce+sam", "ce+gkp", "ce+gsa", "bcl", "bcl+gkp+gsa"]
COPY = ["args.yaml", "results.json", "groups.json", "quality.json", "summary.csv"]
# (name, method label, changed recipe keys): what was tried when the grouped step lost accuracy (README, results)
SWEEP = [
    ("subset_passes_lam0", "ce+gkp", ["gkp.lam=0"]),
    ("bn_batch_stats_lam0", "ce+gkp", ["gkp.lam=0", "gsa.bn_stats=batch"]),
    ("bn_batch_stats", "ce+gkp+gsa", ["gsa.bn_stats=batch"]),
    ("bn_theta_stats", "ce+gkp+gsa", ["gsa.bn_stats=batch_theta"]),
    ("groupnorm_ce", "ce", ["model.norm_layer=groupnorm"]),
    ("groupnorm_ce_gkp_gsa", "ce+gkp+gsa", ["model.norm_layer=groupnorm"]),
    # lambda 0 and alpha 1 without GSA: with GroupNorm this step is plain CE's, computed group by group
    ("groupnorm_lam0_alpha1", "ce+gkp", ["model.norm_layer=groupnorm", "gkp.lam=0", "alpha.start=1.0",
                                         "alpha.end=1.0"]),
    ("bn_batch_stats_lam0_alpha1", "ce+gkp", ["gsa.bn_stats=batch", "gkp.lam=0", "alpha.start=1.0", "alpha.end=1.0"]),
    ("lam1", "ce+gkp+gsa", ["gkp.lam=1"]),
    ("lam100", "ce+gkp+gsa", ["gkp.lam=100"]),
    ("radius_unclamped_z1e-2", "ce+gkp+gsa", ["gsa.rho_clamp=null"]),
    ("radius_div10", "ce+gkp+gsa", ["gsa.rho_clamp=[0.0002, 0.0003]"]),
    ("groups_from_epoch3", "ce+gkp+gsa", ["groups.start_epoch=3"]),
    ("groups_from_epoch11", "ce+gkp+gsa", ["groups.start_epoch=11"]),
    ("fisher_ema", "ce+gkp+gsa", ["gkp.fisher=ema"]),
    # a perturbation norm near plain SAM's (sqrt(d) * 0.0002 = 0.056 for ResNet-8 here, against SAM's 0.05), with
    # the two BatchNorm-free settings of the group passes
    ("groupnorm_radius_div10", "ce+gkp+gsa", ["model.norm_layer=groupnorm", "gsa.rho_clamp=[0.0002, 0.0003]"]),
    ("bn_batch_stats_radius_div10", "ce+gkp+gsa", ["gsa.bn_stats=batch", "gsa.rho_clamp=[0.0002, 0.0003]"]),
    ("la_bn_batch_stats_radius_div10", "la+gkp+gsa", ["gsa.bn_stats=batch", "gsa.rho_clamp=[0.0002, 0.0003]"]),
    # the grid's own cells again, as the references of a sweep run elsewhere (another device or library version)
    ("recipe_ce", "ce", []),
    ("recipe_ce_gkp_gsa", "ce+gkp+gsa", []),
]


def overrides(label: str, ratio: int, seed: int) -> list[str]:
    """Recipe overrides for a method label such as `la+gkp+gsa@sam`."""
    label, _, direction = label.partition("@")
    base, _, mods = label.partition("+")
    out = BASES[base] + [f"method={MODULES[mods]}", f"data.imbalance_ratio={ratio}", f"seed={seed}"]
    if direction:
        out.append(f"gsa.direction={direction}")
    return out


def result_dir(results: str, label: str, ratio: int, seed: int) -> str:
    return os.path.join(results, f"fmnist_r{ratio}", label, f"seed{seed}")


def run_job(label: str, ratio: int, seed: int, args: argparse.Namespace,
            sweep: tuple[str, list[str]] | None = None) -> str:
    """Train one grid cell (or, with `sweep` = (name, changed keys), one investigation run) and copy its files."""
    if sweep is None:
        dest = result_dir(args.results, label, ratio, seed)
        scratch = os.path.join(args.scratch, f"r{ratio}", label, f"seed{seed}")
        extra: list[str] = []
    else:
        dest = os.path.join(args.results, "sweeps", f"fmnist_r{ratio}", sweep[0], f"seed{seed}")
        scratch = os.path.join(args.scratch, "sweeps", f"r{ratio}", sweep[0], f"seed{seed}")
        extra = sweep[1]
    if os.path.exists(os.path.join(dest, "results.json")):
        return f"skip {label} r={ratio} seed={seed}"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", args.recipe, "--output", scratch]
    for o in overrides(label, ratio, seed) + extra + args.overrides:
        cmd += ["--set", o]
    if os.path.exists(os.path.join(scratch, "checkpoint.pt")):
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    os.makedirs(scratch, exist_ok=True)
    with open(os.path.join(scratch, "train.log"), "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return f"FAILED {label} r={ratio} seed={seed} (see {scratch}/train.log)"
    os.makedirs(dest, exist_ok=True)
    for name in COPY:
        if os.path.exists(os.path.join(scratch, name)):
            shutil.copy(os.path.join(scratch, name), os.path.join(dest, name))
    if sweep is not None:
        with open(os.path.join(dest, "sweep.json"), "w") as f:
            order = [name for name, _, _ in SWEEP].index(sweep[0])
            json.dump({"name": sweep[0], "label": label, "overrides": sweep[1], "order": order}, f, indent=1)
    return f"done {label} r={ratio} seed={seed} in {time.time() - t0:.0f}s"


def best_base(results: str, ratio: int, bases: list[str]) -> str:
    """The base with the highest mean Top-1 over its finished seeds at this ratio."""
    means = {}
    for b in bases:
        vals = []
        for seed in range(10):
            path = os.path.join(result_dir(results, b, ratio, seed), "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    vals.append(json.load(f)["top1"])
        if vals:
            means[b] = statistics.mean(vals)
    if not means:
        raise SystemExit("no finished base runs to pick the ablation base from")
    return max(means, key=means.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fmnist_lt_resnet8")
    ap.add_argument("--ratios", default="100,10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument("--ablation-base", default="auto", help="base for the direction ablation at r=100, or 'none'")
    ap.add_argument("--sweep", action="store_true", help="run the SWEEP investigation instead of the grid")
    ap.add_argument("--only", default=None, help="with --sweep: comma-separated entry names to run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every job (e.g. data.root=/elsewhere/fashion-mnist)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per training process")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--scratch", default=os.path.join(ROOT, "runs", "grid"))
    args = ap.parse_args()
    ratios = [int(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if args.sweep:
        only = set(args.only.split(",")) if args.only else None
        unknown = sorted((only or set()) - {name for name, _, _ in SWEEP})
        if unknown:
            raise SystemExit(f"--only: no SWEEP entry named {', '.join(unknown)}")
        jobs = [(label, ratio, seed, args, (name, keys)) for name, label, keys in SWEEP
                for ratio in ratios for seed in seeds if only is None or name in only]
        with ThreadPoolExecutor(args.workers) as pool:
            for msg in pool.map(lambda j: run_job(*j), jobs):
                print(msg, flush=True)
        return
    with ThreadPoolExecutor(args.workers) as pool:
        for ratio in ratios:
            jobs = [(m, ratio, s) for m in methods for s in seeds]
            for msg in pool.map(lambda j: run_job(*j, args), jobs):
                print(msg, flush=True)
            if ratio == 100 and args.ablation_base != "none":
                base = args.ablation_base if args.ablation_base != "auto" else \
                    best_base(args.results, 100, [m for m in methods if "+" not in m])
                print(f"direction ablation on {base}", flush=True)
                jobs = [(f"{base}+gkp+gsa@{d}", ratio, s) for d in ("sam", "gsa_proj") for s in seeds]
                jobs += [(f"{base}+gkp+gsa", ratio, s) for s in seeds]
                for msg in pool.map(lambda j: run_job(*j, args), jobs):
                    print(msg, flush=True)


if __name__ == "__main__":
    main()
