"""Shared pieces of the analysis tools (tools/collect_results.py, tools/plot_run.py, tools/landscape.py).

Reading run directories (summary.csv, results.json, groups.json, quality.json, args.yaml), the class groups a run
is analysed by, filter-normalized random directions (Li et al. 2018), per-sample losses for loss-landscape slices,
and the top Hessian eigenvalue by power iteration on Hessian-vector products (double backward).

The scripts import it as the sibling module `analysis` (a script's own folder leads sys.path; tests/toolload.py
puts tools/ there for the tests). It lives beside them because only the tools read runs: the training package
never imports it.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from lt_recipes.config import load_config
from lt_recipes.data import build_data
from lt_recipes.sections import Recipe
from lt_recipes.errors import AnalysisError
from lt_recipes.metrics import class_splits

_logger = logging.getLogger("analysis")


# ---- run directories ------------------------------------------------------------------------------------------
def read_json(path: str) -> Any:
    """Parse a JSON artifact, naming the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnalysisError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_summary(path: str) -> dict[str, np.ndarray]:
    """summary.csv as float columns; empty cells (NaN before grouping) become NaN.

    A cell that is not a number is an error naming the file, line, column and value.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise AnalysisError(f"{path} has no header row")
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                cell = (row.get(name) or "").strip()
                try:
                    columns[name].append(float(cell) if cell else math.nan)
                except ValueError:
                    raise AnalysisError(f"{path} line {reader.line_num}, column '{name}': "
                                        f"value {cell!r} is not a number") from None
    return {name: np.asarray(vals, dtype=np.float64) for name, vals in columns.items()}


def indexed_columns(summary: dict[str, np.ndarray], prefix: str) -> list[tuple[int, np.ndarray]]:
    """The per-group columns `<prefix><k>` (loss_g0, rho_g1, ...) sorted by k."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    found = [(int(m.group(1)), col) for name, col in summary.items() if (m := pattern.match(name))]
    return sorted(found, key=lambda kv: kv[0])


@dataclass
class Run:
    """The artifacts of one run directory; a file the run did not write is None."""

    path: str
    args: dict[str, Any] | None
    results: dict[str, Any] | None
    groups: dict[str, Any] | None
    quality: dict[str, Any] | None
    summary: dict[str, np.ndarray] | None


def load_run(run_dir: str) -> Run:
    """Read every artifact present in `run_dir` (see README "Training" for what a run writes).

    args.yaml goes through the recipe schema like any recipe file, so keys added to the schema after the run was
    trained take their defaults and a key the schema no longer knows is an error naming it.
    """
    if not os.path.isdir(run_dir):
        raise AnalysisError(f"run directory {run_dir} does not exist")

    def opt(name: str, reader: Callable[[str], Any]) -> Any:
        path = os.path.join(run_dir, name)
        return reader(path) if os.path.isfile(path) else None

    return Run(path=run_dir, args=opt("args.yaml", load_config), results=opt("results.json", read_json),
               groups=opt("groups.json", read_json), quality=opt("quality.json", read_json),
               summary=opt("summary.csv", read_summary))


def train_counts_of(run: Run) -> list[int] | None:
    """Training images per class: results.json 'train_counts', else rebuilt from args.yaml, else None."""
    if run.results and run.results.get("train_counts"):
        return [int(n) for n in run.results["train_counts"]]
    if run.args is None:
        return None
    recipe = Recipe.from_dict(run.args)
    return list(build_data(recipe.data, recipe.seed).train_counts)


def head_to_tail(train_counts: Sequence[int] | None, num_classes: int) -> np.ndarray:
    """Class ids ordered by decreasing training count (stable), or in index order when the counts are unknown."""
    if train_counts is None:
        return np.arange(num_classes)
    return np.argsort(-np.asarray(train_counts), kind="stable")


def split_boundaries(train_counts: Sequence[int]) -> list[tuple[str, int, int]]:
    """(split, first, last) positions of Many / Medium / Few along the head-to-tail order; empty splits dropped."""
    order = head_to_tail(train_counts, len(train_counts))
    splits = class_splits(train_counts)
    rank = {int(c): i for i, c in enumerate(order)}
    return [(name, min(rank[c] for c in cls), max(rank[c] for c in cls)) for name, cls in splits.items() if cls]


def analysis_groups(groups_json: dict[str, Any] | None, train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Named class sets to evaluate a run on: "all", then groups.json's groups (g0 = head) when there are two or
    more, else Many/Medium/Few (a single group would only repeat "all")."""
    out = {"all": list(range(len(train_counts)))}
    groups = (groups_json or {}).get("groups") or []
    if len(groups) > 1:
        out.update({f"g{k}": [int(c) for c in cls] for k, cls in enumerate(groups)})
    else:
        out.update({name: cls for name, cls in class_splits(train_counts).items() if cls})
    return out


# ---- directions and landscape slices --------------------------------------------------------------------------
def filter_normalized_direction(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """A random Gaussian direction per parameter, scaled filter-wise to the weights (Li et al. 2018).

    For every parameter with two or more dimensions, each filter (output row: dim 0) of the direction is rescaled to
    the norm of the same filter of the weight, so a step of 1 moves every filter by its own size. One-dimensional
    parameters (biases, BatchNorm scales and shifts) get a zero direction. The draws depend only on `seed` and the
    parameter shapes, so runs of one architecture get the same direction before scaling.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in model.parameters():
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        rows = d.view(p.shape[0], -1)
        w = p.detach().to(device="cpu", dtype=torch.float64).reshape(p.shape[0], -1)
        rows.mul_(w.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


@torch.no_grad()
def set_parameters(params: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
                   directions: Sequence[Sequence[torch.Tensor]] = (), coefs: Sequence[float] = ()) -> None:
    """theta <- base + sum_i coefs[i] * directions[i], parameter by parameter."""
    for k, p in enumerate(params):
        p.copy_(base[k])
        for d, c in zip(directions, coefs):
            p.add_(d[k], alpha=float(c))


@torch.no_grad()
def per_sample_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cross-entropy of the model's logits for every sample (float64), evaluated in chunks of `batch_size`."""
    out = [F.cross_entropy(model(inputs[i:i + batch_size]).double(), targets[i:i + batch_size], reduction="none")
           for i in range(0, len(targets), batch_size)]
    return torch.cat(out)


def group_means(values: torch.Tensor, targets: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    """Mean of per-sample `values` over the samples whose class is in each named group (NaN for an empty group)."""
    out = {}
    for name, classes in groups.items():
        mask = torch.isin(targets, torch.as_tensor(classes, dtype=targets.dtype, device=targets.device))
        out[name] = float(values[mask].mean()) if bool(mask.any()) else math.nan
    return out


def balanced_indices(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` seeded random indices of every class, so every group, tail included, is represented."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in np.unique(targets)]
    return np.sort(np.concatenate(picked))


# ---- Hessian sharpness ----------------------------------------------------------------------------------------
def hessian_vector_product(loss_terms: Callable[[], Iterable[torch.Tensor]], params: Sequence[torch.Tensor],
                           vec: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss sum(loss_terms()), by double backward one term at a time (terms: e.g. weighted batches).

    Parameters the loss does not depend on contribute zero rows of H.
    """
    out = [torch.zeros_like(p) for p in params]
    for loss in loss_terms():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dots = [(g * v).sum() for g, v in zip(grads, vec) if g is not None and g.requires_grad]
        if not dots:
            continue
        hv = torch.autograd.grad(torch.stack(dots).sum(), params, allow_unused=True)
        for o, h in zip(out, hv):
            if h is not None:
                o.add_(h)
    return out


def top_hessian_eigenvalue(loss_terms: Callable[[], Iterable[torch.Tensor]], params: Sequence[torch.Tensor],
                           iters: int = 20, seed: int = 0, tol: float = 1e-4) -> float:
    """Largest-magnitude Hessian eigenvalue of the loss by power iteration on Hessian-vector products.

    Returns the Rayleigh quotient v^T H v of the last unit iterate; stops early once it changes by less than
    `tol` relative. At a trained minimum this is the top (positive) curvature: the usual sharpness number.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v))
    v = [x / norm for x in v]
    eig = math.nan
    for it in range(iters):
        hv = hessian_vector_product(loss_terms, params, v)
        new = float(sum((h.double() * x.double()).sum() for h, x in zip(hv, v)))
        norm = torch.sqrt(sum((h.double() ** 2).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h / norm.to(h.dtype) for h in hv]
        if it > 0 and abs(new - eig) <= tol * max(abs(eig), 1e-12):
            return new
        eig = new
    return eig


# ---- figures --------------------------------------------------------------------------------------------------
def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (4.5, 3.2)) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (no GUI backend, no global state) and its axes as a 2-D array."""
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def new_panels(n: int, max_cols: int = 3, size: tuple[float, float] = (4.5, 3.2)) -> tuple[Figure, list[Any]]:
    """A figure with `n` panels in rows of at most `max_cols`; the axes as a flat list, spare cells hidden."""
    cols = min(n, max_cols)
    fig, axes = new_figure(-(-n // cols), cols, size)
    flat = list(axes.reshape(-1))
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def save_figure(fig: Figure, path: str) -> str:
    """Write a PNG (folders created) without the date/version metadata, so reruns give the same bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _logger.info("wrote %s", path)
    return path
