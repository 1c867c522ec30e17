#!/usr/bin/env python3
"""Run the Fashion-MNIST-LT results grid of the README and commit-ready files under results/.

Each job trains `fmnist_lt_resnet8` with one method label (`<base>` or `<base>+<modules>[@direction]`), ratio and
seed into a scratch run directory, then copies args.yaml, results.json, groups.json, quality.json and summary.csv to
results/fmnist_r<ratio>/<label>/seed<k>/ (checkpoints stay in scratch). Jobs whose results exist are skipped and
unfinished scratch runs are resumed, so the grid can be stopped and restarted. The direction ablation runs on the
base with the best mean Top-1 at r=100 among the finished base runs (`--ablation-base auto`).

    python tools/run_grid.py --workers 2
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


def run_job(label: str, ratio: int, seed: int, args: argparse.Namespace) -> str:
    dest = result_dir(args.results, label, ratio, seed)
    if os.path.exists(os.path.join(dest, "results.json")):
        return f"skip {label} r={ratio} seed={seed}"
    scratch = os.path.join(args.scratch, f"r{ratio}", label, f"seed{seed}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", args.recipe, "--output", scratch]
    for o in overrides(label, ratio, seed):
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
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per training process")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--scratch", default=os.path.join(ROOT, "runs", "grid"))
    args = ap.parse_args()
    ratios = [int(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
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
