#!/usr/bin/env python3
"""Loss-landscape slices and Hessian sharpness per class group for trained runs (e.g. base vs base+GKP+GSA).

    python tools/landscape.py RUN_DIR [RUN_DIR2 ...] [--points 21] [--span 1.0] [--two-d] [--batches 4]
                              [--hessian-iters 20] [--seed 0] [--out DIR] [--json]

Every run is rebuilt from its args.yaml and checkpoint.pt and evaluated in eval mode on the same fixed, class-balanced
sample of its training data (eval transform; about `batches` evaluation batches in all, at least one image per
class). The loss is the cross-entropy of the model's logits. Class groups: the groups.json groups of the first run
that has two or more (g0 = head), used for every run so the curves are comparable, else Many / Medium / Few; "all"
is every class. For each run and group:
- a 1-D slice L(theta + a d) for a in [-span, span], d a filter-normalized Gaussian direction (Li et al. 2018)
  drawn from --seed, so every run moves along the same random draw scaled to its own filters;
- with --two-d, the surface L(theta + a d1 + b d2) on a points x points grid (d2 from seed + 1);
- the top Hessian eigenvalue by power iteration on Hessian-vector products (double backward), the sharpness.
Writes landscape_1d.png, sharpness.png (and landscape_2d.png) into --out (default: the first RUN_DIR); with
--json the last line printed is one JSON object {run: {group: {"lambda_max": ..., "slice": [...]}}} ("surface"
added with --two-d).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from lt_recipes.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lt_recipes.data import build_data
from lt_recipes.errors import AnalysisError, CheckpointError, LTRecipesError
from lt_recipes.models import create_lt_model
from lt_recipes.sections import Recipe

from analysis import (analysis_groups, balanced_indices, filter_normalized_direction, group_means, load_run, new_figure,
                      new_panels, per_sample_loss, save_figure, set_parameters, top_hessian_eigenvalue, train_counts_of)

_logger = logging.getLogger("landscape")


@dataclass
class TrainedRun:
    """A run rebuilt for analysis: model with its trained weights, evaluation sample, labels for plots."""

    path: str
    label: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    train_counts: list[int]
    groups_json: dict[str, Any] | None


def load_trained(run_dir: str, batches: int, seed: int, device: torch.device) -> TrainedRun:
    """Model from args.yaml + checkpoint.pt and a seeded class-balanced sample of the training set (eval transform)."""
    run = load_run(run_dir)
    if run.args is None:
        raise AnalysisError(f"{run_dir} has no args.yaml")
    recipe = Recipe.from_dict(run.args)
    data = build_data(recipe.data, recipe.seed)
    model = create_lt_model(recipe.model, data.num_classes, data.in_chans)
    state = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{os.path.join(run_dir, CHECKPOINT_NAME)} does not fit the model of "
                              f"{os.path.join(run_dir, 'args.yaml')}: {e}") from None
    model.to(device).eval()
    bs = int(run.args["data"]["eval_batch_size"])
    idx = balanced_indices(np.asarray(data.train_targets), max(1, batches * bs // data.num_classes), seed)
    xs, ys = zip(*DataLoader(Subset(data.train_eval, idx.tolist()), batch_size=bs, shuffle=False))
    res = run.results or {}
    label = (f"{res['method']} (seed {res.get('seed')})" if "method" in res
             else os.path.basename(os.path.normpath(run_dir)))
    return TrainedRun(run_dir, label, model, torch.cat(xs).to(device), torch.cat(ys).to(device),
                      train_counts_of(run) or list(data.train_counts), run.groups)


def _group_loss_terms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, classes: Sequence[int],
                      batch_size: int):
    """Callable yielding chunk terms whose sum is the mean cross-entropy over the group's samples."""
    mask = torch.isin(targets, torch.as_tensor(list(classes), device=targets.device))
    x, y = inputs[mask], targets[mask]

    def terms() -> Iterator[torch.Tensor]:
        for i in range(0, len(y), batch_size):
            yield F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum") / len(y)

    return terms, len(y)


def analyse(run: TrainedRun, groups: dict[str, list[int]], points: int, span: float, two_d: bool,
            hessian_iters: int, seed: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """Slices (and surface) and lambda_max per group for one run; the weights are restored afterwards."""
    params = list(run.model.parameters())
    base = [p.detach().clone() for p in params]
    d1 = filter_normalized_direction(run.model, seed)
    coords = np.linspace(-span, span, points)
    slices = {g: [] for g in groups}
    for a in coords:
        set_parameters(params, base, [d1], [a])
        for g, v in group_means(per_sample_loss(run.model, run.inputs, run.targets, batch_size), run.targets,
                                groups).items():
            slices[g].append(v)
    out: dict[str, dict[str, Any]] = {g: {"slice": slices[g]} for g in groups}
    if two_d:
        d2 = filter_normalized_direction(run.model, seed + 1)
        surf = {g: np.full((points, points), np.nan) for g in groups}
        for i, a in enumerate(coords):
            for j, b in enumerate(coords):
                set_parameters(params, base, [d1, d2], [a, b])
                for g, v in group_means(per_sample_loss(run.model, run.inputs, run.targets, batch_size),
                                        run.targets, groups).items():
                    surf[g][i, j] = v
        for g in groups:
            out[g]["surface"] = surf[g].tolist()
    set_parameters(params, base)
    for g, classes in groups.items():
        terms, n = _group_loss_terms(run.model, run.inputs, run.targets, classes, batch_size)
        if n == 0:
            raise AnalysisError(f"group {g} has no images in the evaluation sample of {run.path}")
        out[g]["lambda_max"] = top_hessian_eigenvalue(terms, params, hessian_iters, seed)
        _logger.info("%s, group %s (%d images): lambda_max %.4g", run.label, g, n, out[g]["lambda_max"])
    return out


def plot_slices(runs: Sequence[TrainedRun], stats: dict[str, dict], coords: np.ndarray, path: str) -> str:
    """One panel per group, one curve per run."""
    groups = list(next(iter(stats.values())))
    fig, axes = new_panels(len(groups), size=(3.8, 3.2))
    for ax, g in zip(axes, groups):
        for run in runs:
            ax.plot(coords, stats[run.path][g]["slice"], label=run.label)
        ax.set(xlabel="step along filter-normalized direction", ylabel="train loss (CE)", title=f"group {g}")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_sharpness(runs: Sequence[TrainedRun], stats: dict[str, dict], path: str) -> str:
    """Grouped bars of lambda_max per group, one bar per run."""
    groups = list(next(iter(stats.values())))
    fig, axes = new_figure(1, 1, size=(max(4.5, 1.2 * len(groups) * len(runs) / 2 + 2), 3.4))
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    for k, run in enumerate(runs):
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, [stats[run.path][g]["lambda_max"] for g in groups], width,
               label=run.label)
    ax.set_xticks(x, groups)
    ax.set(xlabel="class group", ylabel="top Hessian eigenvalue", title="sharpness per group")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_surfaces(runs: Sequence[TrainedRun], stats: dict[str, dict], coords: np.ndarray, path: str) -> str:
    """Contour plots: one row per run, one column per group."""
    groups = list(next(iter(stats.values())))
    fig, axes = new_figure(len(runs), len(groups), size=(3.4, 3.0))
    for r, run in enumerate(runs):
        for c, g in enumerate(groups):
            ax = axes[r, c]
            cs = ax.contour(coords, coords, np.asarray(stats[run.path][g]["surface"]).T, levels=15, cmap="viridis")
            ax.clabel(cs, fontsize=6)
            ax.plot(0, 0, "k+")
            ax.set(title=f"{run.label}\ngroup {g}", xlabel="d1", ylabel="d2")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="trained run directories (checkpoint.pt)")
    p.add_argument("--points", type=int, default=21, help="points per slice axis (default 21)")
    p.add_argument("--span", type=float, default=1.0, help="slice from -span to +span (default 1.0)")
    p.add_argument("--two-d", action="store_true", help="also the 2-D surface (points^2 evaluations)")
    p.add_argument("--batches", type=int, default=4, help="evaluation batches of training data (default 4)")
    p.add_argument("--hessian-iters", type=int, default=20, help="power iterations (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions, the sample and the power iteration")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the first RUN_DIR)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object of all numbers as the last line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, value, low in (("--points", args.points, 2), ("--batches", args.batches, 1),
                             ("--hessian-iters", args.hessian_iters, 1)):
        if value < low:
            p.error(f"{name}={value} must be >= {low}")
    if not args.span > 0:
        p.error(f"--span={args.span} must be > 0")
    try:
        device = torch.device(args.device)
        runs = [load_trained(d, args.batches, args.seed, device) for d in args.run_dirs]
        sizes = {len(r.train_counts) for r in runs}
        if len(sizes) > 1:
            raise AnalysisError(f"runs {args.run_dirs} have different numbers of classes {sorted(sizes)}")
        grouped = next((r for r in runs if len((r.groups_json or {}).get("groups") or []) > 1), runs[0])
        groups = analysis_groups(grouped.groups_json, grouped.train_counts)
        _logger.info("groups from %s: %s", grouped.path, {g: len(c) for g, c in groups.items()})
        stats = {}
        for run in runs:
            bs = max(1, len(run.targets) // args.batches)
            stats[run.path] = analyse(run, groups, args.points, args.span, args.two_d, args.hessian_iters,
                                      args.seed, bs)
    except (LTRecipesError, OSError) as e:
        _logger.error("%s", e)
        return 2
    coords = np.linspace(-args.span, args.span, args.points)
    out = args.out or args.run_dirs[0]
    paths = [plot_slices(runs, stats, coords, os.path.join(out, "landscape_1d.png")),
             plot_sharpness(runs, stats, os.path.join(out, "sharpness.png"))]
    if args.two_d:
        paths.append(plot_surfaces(runs, stats, coords, os.path.join(out, "landscape_2d.png")))
    for run in runs:
        print(f"{run.label}: " + ", ".join(f"{g} lambda_max={v['lambda_max']:.4g}" for g, v in stats[run.path].items()))
    print("\n".join(paths))
    if args.json:
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
