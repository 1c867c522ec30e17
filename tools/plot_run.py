#!/usr/bin/env python3
"""Plot one run directory: training curves, the per-group method state, and class feature quality over epochs.

    python tools/plot_run.py RUN_DIR [--out DIR]

Writes into --out (default RUN_DIR):
- curves.png: train loss, validation top-1 and learning rate per epoch (summary.csv);
- groups.png (grouped methods): alpha, per-group radius rho_g, mean GKP penalty, per-group loss and the gradient
  similarity cos(g_g, g) between each group's gradient and the global gradient (g0 = head group);
- quality.png (grouped methods): feature quality Q per class (head -> tail) at every bank evaluation (quality.json).
The paths written are printed, one per line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from lt_recipes.errors import AnalysisError, LTRecipesError

from analysis import (head_to_tail, indexed_columns, load_run, new_figure, new_panels, save_figure, split_boundaries,
                      train_counts_of)

_logger = logging.getLogger("plot_run")

CURVES = (("train_loss", "train loss"), ("val_top1", "validation top-1 (%)"), ("lr", "learning rate"))


def _has_data(col: np.ndarray | None) -> bool:
    return col is not None and bool(np.isfinite(col).any())


def plot_curves(summary: dict[str, np.ndarray], path: str) -> str:
    """Train loss, validation top-1 and learning rate against the epoch."""
    missing = [k for k in ("epoch",) + tuple(k for k, _ in CURVES) if k not in summary]
    if missing:
        raise AnalysisError(f"summary.csv lacks column(s) {missing} (have {sorted(summary)})")
    fig, axes = new_figure(1, len(CURVES))
    for ax, (key, label) in zip(axes[0], CURVES):
        ax.plot(summary["epoch"], summary[key], "-o", ms=3)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)


# one marker per group, and a small sideways shift per group, so groups with equal values (the radii of the adaptive
# scale often are) stay visible side by side instead of drawing one line
GROUP_MARKERS = "os^vDP*X<>"
GROUP_SHIFT = 0.08  # epochs between neighbouring groups


def plot_groups(summary: dict[str, np.ndarray], path: str) -> str | None:
    """Per-group method state over epochs; None when the run never grouped (no finite per-group values)."""
    fig = groups_figure(summary)
    return None if fig is None else save_figure(fig, path)


def groups_figure(summary: dict[str, np.ndarray]) -> Any:
    """The groups.png figure: a panel per quantity, the groups told apart by marker and a sideways shift, the GKP
    penalty on a log axis (it spans decades and is 0 before the grouping, which a log axis leaves out), legends
    beside the panels; None when the run never grouped."""
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    if _has_data(summary.get("alpha")):
        panels.append(("alpha (GSA weight)", [("alpha", summary["alpha"])]))
    for prefix, title in (("rho_g", "GSA radius rho*_g"), ("loss_g", "group loss"),
                          ("cos_g", "gradient similarity cos(g_g, g)")):
        cols = [(f"g{k}", col) for k, col in indexed_columns(summary, prefix) if _has_data(col)]
        if cols:
            panels.append((title, cols))
    if _has_data(summary.get("gkp")):
        panels.append(("mean GKP penalty", [("gkp", summary["gkp"])]))
    if not panels:
        return None
    fig, axes = new_panels(len(panels), size=(5.2, 3.2))
    for ax, (title, cols) in zip(axes, panels):
        for k, (name, col) in enumerate(cols):
            shift = (k - (len(cols) - 1) / 2) * GROUP_SHIFT if len(cols) > 1 else 0.0
            if title == "mean GKP penalty":
                col = np.where(col > 0, col, np.nan)
                ax.set_yscale("log")
            ax.plot(summary["epoch"] + shift, col, "-", marker=GROUP_MARKERS[k % len(GROUP_MARKERS)], ms=4,
                    label=name, alpha=0.85)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(cols) > 1:
            ax.legend(fontsize=7, title="g0 = head", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_quality(quality: dict[str, Any], train_counts: Sequence[int] | None, path: str) -> str | None:
    """Heatmap of feature quality Q (epochs x classes, head -> tail); None when quality.json holds no evaluation."""
    q = np.array([[np.nan if v is None else float(v) for v in row] for row in quality.get("q", [])], dtype=float)
    epochs = list(quality.get("epochs", []))
    if q.size == 0:
        return None
    if q.ndim != 2 or len(epochs) != len(q):
        raise AnalysisError(f"quality.json: {len(epochs)} epochs but q has shape {q.shape}")
    order = head_to_tail(train_counts, q.shape[1])
    fig, axes = new_figure(1, 1, size=(max(5.0, 0.12 * q.shape[1] + 3), max(3.0, 0.25 * len(epochs) + 1.5)))
    ax = axes[0, 0]
    im = ax.imshow(q[:, order], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(epochs)), [str(e) for e in epochs])
    if train_counts is not None:
        bounds = split_boundaries(train_counts)
        for _, lo, _ in bounds:
            if lo > 0:
                ax.axvline(lo - 0.5, color="white", ls="--", lw=1)
        top = ax.secondary_xaxis("top")
        top.set_xticks([(lo + hi) / 2 for _, lo, hi in bounds], [name.capitalize() for name, _, _ in bounds])
        top.tick_params(length=0)
    ax.set(xlabel="class (head → tail)" if train_counts is not None else "class index", ylabel="after epoch",
           title="feature quality Q = Dis - beta log Var")
    fig.colorbar(im, ax=ax, label="Q")
    return save_figure(fig, path)


def plot_run(run_dir: str, out: str | None = None) -> list[str]:
    """Write every plot the run's files allow; returns the PNG paths."""
    run = load_run(run_dir)
    out = out or run_dir
    if run.summary is None:
        raise AnalysisError(f"{run_dir} has no summary.csv")
    written = [plot_curves(run.summary, os.path.join(out, "curves.png"))]
    groups = plot_groups(run.summary, os.path.join(out, "groups.png"))
    if groups:
        written.append(groups)
    if run.quality is not None:
        quality = plot_quality(run.quality, train_counts_of(run), os.path.join(out, "quality.png"))
        if quality:
            written.append(quality)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (summary.csv, quality.json, ...)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = plot_run(args.run_dir, args.out)
    except (LTRecipesError, OSError) as e:
        _logger.error("%s", e)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
