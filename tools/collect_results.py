#!/usr/bin/env python3
"""Build the result tables (docs/results.md, README headline) and per-class plots from the committed results/ tree.

    python tools/collect_results.py [--results results] [--doc docs/results.md] [--readme README.md] [--check]

Reads results/<grid>_r<ratio>/<label>/seed<k>/results.json (tools/run_grid.py) and replaces only the block between
`<!-- results:begin -->` and `<!-- results:end -->` in docs/results.md with, per folder: mean +- std over seeds of
Top-1 / Many / Medium / Few per run label with the change of Top-1 against the label's base and whether that change
exceeds the seed spread (|delta| > std_base + std_method); the component ablation (base, +gkp, +gsa, +gkp+gsa) and
the direction ablation (GSA ascent along g, the removed component, or h_g) next to the paper's numbers; the group
number ablation. A label `<method>#<variant>` is a run with recipe keys changed on top (its variant.json names
them). It also writes docs/per_class_<folder>.png (per-class accuracy head -> tail, base vs base+gkp+gsa, seed
means). The first grouped step's grid, kept under results/history/v1/, gets one table beside the current runs.
The README's block between `<!-- headline:begin -->` and `<!-- headline:end -->` gets one table: each base against
base+gkp+gsa, per folder. `--check` writes nothing and exits 1 when a block differs from what would be written.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from lt_recipes.checkpoint import atomic_write_text
from lt_recipes.cli import last_error
from lt_recipes.choices import DIRECTIONS, LOSSES
from lt_recipes.errors import AnalysisError, LTRecipesError
from lt_recipes.labels import parse_label
from lt_recipes.steps import list_methods, method_modules

from analysis import (head_to_tail, indexed_columns, load_run, new_figure, read_json, read_summary, save_figure,
                      split_boundaries, train_counts_of)
from run_grid import DEFAULT_VARIANT, GRIDS  # the grids say which labels form which table

_logger = logging.getLogger("collect_results")

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
HEAD_BEGIN = "<!-- headline:begin -->"
HEAD_END = "<!-- headline:end -->"
METRICS = ("top1", "many", "medium", "few")
# The paper's components on a base (its Table 3), in the component table's column order.
GROUPED_MODULES = ("gkp", "gsa", "gkp+gsa")
# Labels sort by base loss, then method modules (the base alone, sam, the paper's components, then every other
# registered method in the registry's order), then ascent direction.
MODULE_ORDER = tuple(dict.fromkeys(("", "sam") + GROUPED_MODULES
                                   + tuple("+".join(method_modules(m)) for m in list_methods())))
DIRECTION_TITLES = {"gsa": "GSA: h_g (global component removed)", "sam": "SAM: global gradient g",
                    "gsa_proj": "GSA-proj: removed component only", "friendly": "FriendlySAM: g - EMA"}
PAPER = "CIFAR-100-LT r=100"
# the paper's reported figures (the one file they are typed in)
PAPER_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "paper.yaml")
PAPER_KEYS = {"top1": ("top1",) + METRICS[1:], "hours": ("hours",)}  # each section's figures, the first required


def read_paper(path: str = PAPER_FILE) -> dict[str, list[dict[str, Any]]]:
    """The paper's figures (results/paper.yaml): per section (`top1`, `hours`) rows of source (where in the paper),
    folder and label (the run_grid results folder and run label that reproduce it) and the reported figures."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or set(data) != set(PAPER_KEYS):
        raise AnalysisError(f"{path}: expected the sections {sorted(PAPER_KEYS)}")
    for section, (required, *optional) in PAPER_KEYS.items():
        for i, row in enumerate(data[section]):
            keys = set(row) if isinstance(row, dict) else set()
            numbers = [row.get(k) for k in (required, *optional) if k in keys]
            if not {"source", "folder", "label", required} <= keys or keys - {"source", "folder", "label", required,
                                                                                *optional} \
                    or not all(isinstance(v, (int, float)) for v in numbers):
                raise AnalysisError(f"{path}: {section} row {i + 1} ({row}) needs source, folder, label and a number "
                                    f"{required} (optional: {', '.join(optional) or 'none'})")
    return data


def paper_top1(source: str, folder: str = "cifar100_r100") -> dict[str, float]:
    """{run label: the paper's Top-1} of one table of results/paper.yaml for one results folder, in file order."""
    return {row["label"]: float(row["top1"]) for row in read_paper()["top1"]
            if row["source"] == source and row["folder"] == folder}


@dataclass
class MethodStats:
    """Seed statistics of one method at one (dataset, ratio): means, sample stds (NaN with one seed)."""

    method: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    per_class: np.ndarray
    train_counts: list[int] | None
    groups: int | None


# the direction ablation (Table 5) by direction, the component ablation (Table 4) by base and modules
PAPER_DIRECTIONS = {parse_label(label)[2]: top1 for label, top1 in paper_top1("Table 5").items()}
PAPER_COMPONENTS: dict[str, dict[str, float]] = {}
for _label, _top1 in paper_top1("Table 4").items():
    PAPER_COMPONENTS.setdefault(parse_label(_label)[0], {})[parse_label(_label)[1]] = _top1


def _order_key(label: str) -> tuple:
    base, modules, direction, variant = parse_label(label)
    b = LOSSES.index(base) if base in LOSSES else len(LOSSES)
    m = MODULE_ORDER.index(modules) if modules in MODULE_ORDER else len(MODULE_ORDER)
    d = DIRECTIONS.index(direction) if direction in DIRECTIONS else len(DIRECTIONS)
    return b, base, m, modules, d, direction, variant


def _scan(root: str) -> dict[str, dict[str, list[tuple[str, dict[str, Any]]]]]:
    """{folder: {label: [(run dir, results), ...] sorted by seed}} from <root>/<folder>/<label>/seed<k>/."""
    if not os.path.isdir(root):
        raise AnalysisError(f"results folder {root} does not exist")
    tree: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "*", "results.json"))):
        run_dir = os.path.dirname(path)
        folder, method, seed_dir = Path(path).parts[-4:-1]
        res = read_json(path)
        missing = [k for k in ("method", "seed", "dataset", "imbalance_ratio", "per_class") + METRICS if k not in res]
        if missing:
            raise AnalysisError(f"{path} lacks key(s) {missing}")
        name, variant = parse_label(method).plain, parse_label(method).variant
        if res["method"] != name:
            raise AnalysisError(f"{path}: method {res['method']!r} does not match its folder {method!r}")
        if variant:
            info = os.path.join(run_dir, "variant.json")
            if not os.path.exists(info) or read_json(info).get("name") != variant:
                raise AnalysisError(f"{run_dir}: a '#{variant}' run needs a variant.json naming it")
        if seed_dir != f"seed{res['seed']}":
            raise AnalysisError(f"{path}: seed {res['seed']} does not match its folder {seed_dir!r}")
        tree.setdefault(folder, {}).setdefault(method, []).append((run_dir, res))
    for folder, methods in tree.items():
        ids = {(r["dataset"], r["imbalance_ratio"], r["epochs"]) for runs in methods.values() for _, r in runs}
        if len(ids) > 1:
            raise AnalysisError(f"{os.path.join(root, folder)} mixes datasets/ratios/epochs {sorted(ids, key=str)}")
        for runs in methods.values():
            runs.sort(key=lambda item: item[1]["seed"])
    return tree


def summarize(runs: Sequence[tuple[str, dict[str, Any]]], with_counts: bool = False) -> MethodStats:
    """Mean and sample std (ddof=1; NaN for one seed) of each metric, and the seed-mean per-class accuracy.

    A split with no class (Few at r=10: no class has under 20 training images) is null in results.json: NaN here."""
    res = [r for _, r in runs]
    mean, std = {}, {}
    for key in METRICS:
        vals = np.array([math.nan if r[key] is None else float(r[key]) for r in res])
        mean[key] = float(vals.mean())
        std[key] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    lengths = {len(r["per_class"]) for r in res}
    if len(lengths) > 1:
        raise AnalysisError(f"{runs[0][0]} and its other seeds disagree on the number of classes {sorted(lengths)}")
    per_class = np.mean(np.array([[math.nan if v is None else float(v) for v in r["per_class"]] for r in res]), axis=0)
    counts = None
    if with_counts:
        counts = res[0].get("train_counts") or train_counts_of(load_run(runs[0][0]))
    args = os.path.join(runs[0][0], "args.yaml")
    groups = None
    if os.path.exists(args):  # read as plain YAML: history runs hold keys the schema no longer has
        with open(args) as f:
            groups = int(yaml.safe_load(f)["groups"]["num_groups"])
    return MethodStats(res[0]["method"], [int(r["seed"]) for r in res], mean, std, per_class, counts, groups)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def delta_vs(base: MethodStats, other: MethodStats, key: str = "top1") -> tuple[float, str]:
    """Change of `key` against the base and whether it exceeds the seed spread ('yes'/'no'/'n/a' with one seed)."""
    delta = other.mean[key] - base.mean[key]
    spread = base.std[key] + other.std[key]
    verdict = "n/a" if math.isnan(spread) else ("yes" if abs(delta) > spread else "no")
    return delta, verdict


def change_cells(base: MethodStats | None, other: MethodStats) -> list[str]:
    """The Top-1 change against the base and its verdict (`delta_vs`) as two cells; dashes without a base run or
    on the base's own row."""
    if base is None or base is other:
        return ["—", "—"]
    d, verdict = delta_vs(base, other)
    return [f"{d:+.2f}", verdict]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _ratio(value: Any) -> str:
    return f"{float(value):g}"


def _where(res: dict[str, Any]) -> str:
    """`cifar100 r=100` from a results.json; a list-file dataset (no imbalance ratio) by its name alone."""
    ratio = res["imbalance_ratio"]
    return res["dataset"] if ratio is None else f"{res['dataset']} r={_ratio(ratio)}"


def _folder_order(first: dict[str, dict[str, Any]]) -> Callable[[str], tuple]:
    """Sort key of results folders: dataset, epochs, then the larger imbalance ratio first (a list-file dataset's own
    tail last)."""
    return lambda f: (first[f]["dataset"], first[f]["epochs"],
                      -math.inf if first[f]["imbalance_ratio"] is None else -float(first[f]["imbalance_ratio"]), f)


def main_table(stats: dict[str, MethodStats]) -> list[str]:
    """Per-method Top-1 / Many / Medium / Few with seeds and the Top-1 change against the base."""
    rows = []
    for label in sorted(stats, key=_order_key):
        s = stats[label]
        rows.append([f"`{label}`", str(len(s.seeds))] + [_fmt(s.mean[k], s.std[k]) for k in METRICS]
                    + change_cells(stats.get(parse_label(label)[0]), s))
    return _table(["method", "seeds", "Top-1", "Many", "Medium", "Few", "Δ Top-1 vs base", "beyond seed spread"],
                  rows)


def component_table(stats: dict[str, MethodStats]) -> list[str]:
    """Top-1 of base, +gkp, +gsa, +gkp+gsa for every base with at least one module run, then the paper's rows."""
    rows = []
    bases = sorted({parse_label(m)[0] for m in stats}, key=_order_key)
    for base in bases:
        if base not in stats or not any(current_label(stats, f"{base}+{m}") for m in GROUPED_MODULES):
            continue
        cells = [f"`{base}`"]
        for m in ("",) + GROUPED_MODULES:
            s = stats.get(current_label(stats, f"{base}+{m}") if m else base)
            if s is None:
                cells.append("—")
            elif m:
                d, verdict = delta_vs(stats[base], s)
                cells.append(f"{_fmt(s.mean['top1'], s.std['top1'])} ({d:+.2f}, {verdict})")
            else:
                cells.append(_fmt(s.mean["top1"], s.std["top1"]))
        rows.append(cells)
    if not rows:
        return []
    for base, paper in PAPER_COMPONENTS.items():
        rows.append([f"{base} (paper, {PAPER})"] + [f"{paper[m]:.1f}" if m in paper else "—"
                                                    for m in ("",) + GROUPED_MODULES])
    return _table(["base loss", "base alone", "+gkp", "+gsa", "+gkp+gsa"], rows) + [
        "", "Cells: Top-1 mean ± std over seeds (Δ vs base, beyond seed spread); a module with GSA is the default "
            f"step (`#{DEFAULT_VARIANT}` where the label spells it out)."]


def direction_table(stats: dict[str, MethodStats]) -> list[str]:
    """GSA ascent-direction ablation per base with `@` runs: ours next to the paper's Table 5."""
    rows = []
    for base in sorted({parse_label(m)[0] for m in stats}, key=_order_key):
        # the default step's family (`@<direction>#<DEFAULT_VARIANT>`) when it has runs, else the plain labels
        for suffix in (f"#{DEFAULT_VARIANT}", ""):
            full = f"{base}+gkp+gsa{suffix}"
            variants = [m for m in stats if m.startswith(f"{base}+gkp+gsa@") and m.endswith(suffix)
                        and m.count("#") == suffix.count("#")]
            if variants:
                break
        if not variants:
            continue
        paper_order = list(PAPER_DIRECTIONS) + list(DIRECTIONS)
        for label in sorted(variants + ([full] if full in stats else []),
                            key=lambda m: (paper_order.index(parse_label(m)[2]) if parse_label(m)[2] in paper_order
                                           else len(paper_order), m)):
            s, direction = stats[label], parse_label(label)[2]
            paper = PAPER_DIRECTIONS.get(direction)
            rows.append([DIRECTION_TITLES.get(direction, direction), f"`{label}`", str(len(s.seeds)),
                         _fmt(s.mean["top1"], s.std["top1"])] + change_cells(stats.get(base), s)
                        + ["—" if paper is None else f"{paper:.1f}"])
    if not rows:
        return []
    return _table(["ascent direction", "method", "seeds", "Top-1", "Δ vs base", "beyond seed spread",
                   f"paper Top-1 ({PAPER}, BCL base)"], rows)


def current_label(stats: dict[str, MethodStats], label: str) -> str | None:
    """The runs of `label` with the current default step: `<label>#<DEFAULT_VARIANT>` (the default spelled out,
    run_grid.DEFAULT_VARIANT), else `<label>` itself, else None."""
    for name in (f"{label}#{DEFAULT_VARIANT}", label):
        if name in stats:
            return name
    return None


def default_label(stats: dict[str, MethodStats], base: str) -> str | None:
    """The runs of the default GKP+GSA step on `base` (current_label of `<base>+gkp+gsa`)."""
    return current_label(stats, f"{base}+gkp+gsa")


def plot_pairs(stats: dict[str, MethodStats]) -> list[tuple[str, str]]:
    """(base, default GKP+GSA) label pairs with both methods present, in table order."""
    bases = sorted({parse_label(m)[0] for m in stats}, key=_order_key)
    return [(b, default_label(stats, b)) for b in bases if b in stats and default_label(stats, b)]


def _summaries(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, np.ndarray]]:
    return [read_summary(os.path.join(d, "summary.csv")) for d, _ in runs
            if os.path.exists(os.path.join(d, "summary.csv"))]


def ascent_cells(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """From summary.csv's `ascent_g<k>` columns (each group's epoch-mean rise of its loss in the perturbed pass):
    the share of (group, epoch) cells with a positive mean, and the smallest mean, over seeds; dashes without."""
    cells = [col[~np.isnan(col)] for s in _summaries(runs) for _, col in indexed_columns(s, "ascent_g")]
    values = np.concatenate(cells) if cells else np.array([])
    if not values.size:
        return ["—", "—"]
    return [f"{100 * float((values > 0).mean()):.0f}%", f"{float(values.min()):+.3g}"]


def gkp_ratio_cell(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Median (min-max) over seeds and epochs of summary.csv's gkp_grad_ratio = ||grad GKP|| / ||grad task||."""
    cols = [s["gkp_grad_ratio"] for s in _summaries(runs) if "gkp_grad_ratio" in s]
    values = np.concatenate(cols) if cols else np.array([])
    values = values[~np.isnan(values)]
    if not values.size:
        return "—"
    return f"{np.median(values):.2g} ({values.min():.2g}-{values.max():.2g})"


def variant_keys(run_dir: str) -> str:
    """The recipe keys a run's variant changed (variant.json), as table text."""
    info = os.path.join(run_dir, "variant.json")
    keys = read_json(info)["overrides"] if os.path.exists(info) else []
    return ", ".join(f"`{k}`" for k in keys) or "(recipe)"


def readings_table(stats: dict[str, MethodStats], runs: dict[str, list[tuple[str, dict[str, Any]]]],
                   labels: Sequence[str], folder_dir: str = "") -> list[str]:
    """The `readings` grid's rows present here: Top-1 / Many / Medium / Few, the change against the label's base,
    and whether every group ascended (share of positive epoch-mean ascents, the smallest); a run that stopped (its
    train.log committed) with its error."""
    header = ["method", "changed keys", "seeds", "Top-1", "Many", "Medium", "Few", "Δ Top-1 vs base",
              "beyond seed spread", "group-epochs ascending", "smallest ascent"]
    rows = label_rows(stats, runs, labels, folder_dir, len(header), lambda label, s: (
        [_fmt(s.mean[k], s.std[k]) for k in METRICS] + change_cells(stats.get(parse_label(label)[0]), s)
        + ascent_cells(runs[label])))
    if not rows:
        return []
    return _table(header, rows) + [
        "", "Ascent: each group's epoch mean of (its loss in the perturbed pass) - (its loss at theta) from "
            "summary.csv, over every epoch after grouping and every seed; 100% means every group rose in every epoch."]


def stopped_seeds(folder_dir: str, label: str) -> list[tuple[int, str]]:
    """(seed, last ERROR message) of each of `label`'s runs that stopped: a committed train.log, no results.json."""
    out = []
    for log in sorted(glob.glob(os.path.join(folder_dir, glob.escape(label), "seed*", "train.log"))):
        if os.path.exists(os.path.join(os.path.dirname(log), "results.json")):
            continue
        seed = int(Path(log).parent.name[len("seed"):])
        out.append((seed, last_error(log) or "stopped without an error line"))
    return out


def seeds_cell(finished: int, stopped: Sequence[tuple[int, str]]) -> str:
    """How many seeds finished, and which stopped (`stopped_seeds`): `2`, `1 (seed 1 stopped)`."""
    if not stopped:
        return str(finished)
    seeds = ", ".join(str(seed) for seed, _ in stopped)
    return f"{finished} (seed{'s' if len(stopped) > 1 else ''} {seeds} stopped)"


def label_rows(stats: dict[str, MethodStats], runs: dict[str, list[tuple[str, dict[str, Any]]]],
               labels: Sequence[str], folder_dir: str, width: int,
               cells: Callable[[str, MethodStats], list[str]]) -> list[list[str]]:
    """Rows of a grid's table of `width` columns, one per label with runs here: the label, the recipe keys its
    variant changed and its seeds (`seeds_cell`), then `cells(label, its MethodStats)` when a seed finished; when every
    seed stopped (`stopped_seeds`), "stopped", dashes and the first stopped seed's error, so every table shows a
    stopped run the same way. A label with neither is left out."""
    rows = []
    for label in labels:
        stopped = stopped_seeds(folder_dir, label)
        if label in stats:
            rows.append([f"`{label}`", variant_keys(runs[label][0][0]), seeds_cell(len(stats[label].seeds), stopped)]
                        + cells(label, stats[label]))
        elif stopped:
            keys = variant_keys(os.path.join(folder_dir, label, f"seed{stopped[0][0]}"))
            rows.append([f"`{label}`", keys, seeds_cell(0, stopped), "stopped"] + ["—"] * (width - 5)
                        + [stopped[0][1]])
    return rows


def gkp_sweep_table(stats: dict[str, MethodStats], runs: dict[str, list[tuple[str, dict[str, Any]]]],
                    labels: Sequence[str], folder_dir: str = "") -> list[str]:
    """GKP's strength: each `<base>+gkp[#variant]` row with its changed keys, Top-1 against the base and
    ||grad GKP|| / ||grad task|| as logged; a run that stopped (its train.log committed) with its error."""
    header = ["method", "changed keys", "seeds", "Top-1", "Few", "Δ Top-1 vs base", "beyond seed spread",
              "‖∇GKP‖ / ‖∇task‖ median (range)"]
    gkp_labels = [m for m in labels if parse_label(m)[1] == "gkp"]
    rows = label_rows(stats, runs, gkp_labels, folder_dir, len(header), lambda label, s: (
        [_fmt(s.mean["top1"], s.std["top1"]), _fmt(s.mean["few"], s.std["few"])]
        + change_cells(stats.get(parse_label(label)[0]), s) + [gkp_ratio_cell(runs[label])]))
    if not rows:
        return []
    return _table(header, rows) + [
        "", "The ratio is logged per epoch after grouping (summary.csv `gkp_grad_ratio`); runs from before it was "
            "logged show —."]


def per_class_plot(stats: dict[str, MethodStats], pairs: Sequence[tuple[str, str]], title: str, path: str) -> str:
    """Seed-mean per-class accuracy head -> tail for each (base, base+gkp+gsa) pair, one panel per pair."""
    fig, axes = new_figure(1, len(pairs), size=(5.5, 3.4))
    for ax, (base, full) in zip(axes[0], pairs):
        counts = stats[base].train_counts
        order = head_to_tail(counts, len(stats[base].per_class))
        x = np.arange(len(order))
        for label, style in ((base, "-o"), (full, "-s")):
            s = stats[label]
            ax.plot(x, s.per_class[order], style, ms=3, label=f"{label} ({s.mean['top1']:.1f})")
        if counts is not None:
            for name, lo, hi in split_boundaries(counts):
                ax.axvspan(lo - 0.5, hi + 0.5, alpha=0.08, color={"many": "C0", "medium": "C2", "few": "C3"}[name])
                ax.text((lo + hi) / 2, 2, name.capitalize(), ha="center", fontsize=8)
                if lo > 0:
                    ax.axvline(lo - 0.5, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="class (head → tail)" if counts is not None else "class index", ylabel="test accuracy (%)",
               ylim=(0, 100), title=f"{title}: {base}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def group_table(stats: dict[str, MethodStats]) -> list[str]:
    """Top-1 of base+gkp+gsa at each group number G (`#G<n>` runs; the label without a variant is the recipe's G)."""
    rows = []
    for plain in sorted({parse_label(m).plain for m in stats if parse_label(m)[1] == "gkp+gsa"}, key=_order_key):
        # `#G<n>` beside the plain label, or `#<DEFAULT_VARIANT>_G<n>` beside the spelled-out default step
        full = current_label(stats, plain)
        prefix = "" if full == plain else f"{DEFAULT_VARIANT}_"
        counts = sorted((int(v[len(prefix) + 1:]), m) for m in stats if parse_label(m).plain == plain
                        for v in [parse_label(m)[3]] if v.startswith(prefix + "G") and v[len(prefix) + 1:].isdigit())
        if not counts or full is None:
            continue
        base = stats.get(parse_label(full)[0])
        for g, label in counts + [(stats[full].groups, full)]:
            s = stats[label]
            rows.append([f"`{full}`", str(g), str(len(s.seeds)), _fmt(s.mean["top1"], s.std["top1"])]
                        + change_cells(base, s))
    if not rows:
        return []
    rows.sort(key=lambda r: (r[0], int(r[1])))
    return _table(["method", "G", "seeds", "Top-1", "Δ vs base", "beyond seed spread"], rows) + [
        "", f"The paper reports its best G as 4 on CIFAR-LT and iNaturalist 2018 and 6 on ImageNet-LT."]


def step_cost(bench: dict[str, Any] | None, label: str) -> str:
    """A label's step time over SAM's in the committed CPU step benchmark (its step kind: the plain step for a base
    alone, the registered step's name, the default grouped step with GKP for +gkp+gsa); a dash without one."""
    modules = parse_label(label)[1]
    kind = {"": "none", "gkp+gsa": "gkp_gsa_masked"}.get(modules, modules)
    if bench is None or f"{kind}_ms" not in bench:
        return "—"
    return f"{bench[f'{kind}_ms'] / bench['sam_ms']:.2f}x"


def peers_rows(stats: dict[str, MethodStats], labels: Sequence[str]) -> dict[str, list[str]]:
    """Per base of the `peers` grid's `labels` present in `stats`: the base, its runs of the grid in grid order, and
    the default GKP+GSA step on it."""
    out: dict[str, list[str]] = {}
    for base in sorted({parse_label(m)[0] for m in labels}, key=_order_key):
        if base not in stats:
            continue
        rows = [base] + [m for m in labels if parse_label(m)[0] == base and m != base and m in stats]
        full = default_label(stats, base)
        out[base] = rows + ([full] if full else [])
    return out


def peers_table(stats: dict[str, MethodStats], labels: Sequence[str], bench: dict[str, Any] | None) -> list[str]:
    """"Sharpness-aware methods on the same bases": every peer on each base next to the base alone and the default
    GKP+GSA step: Top-1 / Many / Medium / Few, step cost x SAM, the change against the base and its verdict."""
    rows = []
    for base, group in peers_rows(stats, labels).items():
        for label in group:
            s = stats[label]
            d, verdict = delta_vs(stats[base], s) if label != base else (math.nan, "—")
            rows.append([f"`{label}`", str(len(s.seeds))] + [_fmt(s.mean[k], s.std[k]) for k in METRICS]
                        + [step_cost(bench, label), "—" if label == base else f"{d:+.2f}", verdict])
    if not rows:
        return []
    return _table(["method", "seeds", "Top-1", "Many", "Medium", "Few", "step cost x SAM", "Δ Top-1 vs base",
                   "beyond seed spread"], rows) + [
        "", "Each peer at its authors' CIFAR-100-LT defaults (docs/method.md, section 9) on the recipe's schedule; "
            "`+gkp+gsa` is the default grouped step. Step cost: the committed CPU step benchmark "
            "(docs/benchmarks.md; ResNet-32, batch 128), median step time over SAM's."]


def history_table(history_root: str, tree: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]]) -> list[str]:
    """Per base of each history folder: the base now, base+gkp+gsa with the first grouped step (v1), and now."""
    if not os.path.isdir(history_root):
        return []
    rows = []
    for folder, old in sorted(_scan(history_root).items()):
        now = tree.get(folder, {})
        for full in sorted((m for m in old if parse_label(m)[1] == "gkp+gsa" and "@" not in m), key=_order_key):
            base = parse_label(full)[0]
            cells = []
            for runs in (now.get(base), old.get(full), now.get(full)):
                s = summarize(runs) if runs else None
                cells.append("—" if s is None else _fmt(s.mean["top1"], s.std["top1"]))
            rows.append([folder, f"`{full}`"] + cells)
    if not rows:
        return []
    lines = ["", f"#### The first grouped step (v1), `{os.path.relpath(history_root)}`", ""] + _table(
        ["folder", "method", "base alone (now)", "v1 step", "now"], rows)
    return lines + v1_sweep_table(os.path.join(history_root, "sweeps"))


def averaged_history_table(history_root: str, tree: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]]
                           ) -> list[str]:
    """The runs of the cancelling averaged perturbation (moved to history): each label's Top-1 then, beside its
    base and the same label with the default step now (`<label>` or `<label>#<DEFAULT_VARIANT>`)."""
    if not os.path.isdir(history_root):
        return []
    rows = []
    for folder, old in sorted(_scan(history_root).items()):
        now = {m: summarize(r) for m, r in tree.get(folder, {}).items()}
        for label in sorted(old, key=_order_key):
            base = parse_label(label)[0]
            then = summarize(old[label])
            current = next((m for m in (label, f"{label}#{DEFAULT_VARIANT}") if m in now and "#" not in label), None)
            cells = [_fmt(now[base].mean["top1"], now[base].std["top1"]) if base in now else "—",
                     _fmt(then.mean["top1"], then.std["top1"]), str(len(then.seeds)),
                     "—" if current is None else f"{_fmt(now[current].mean['top1'], now[current].std['top1'])} "
                                                 f"(`{current}`)"]
            rows.append([folder, f"`{label}`"] + cells)
    if not rows:
        return []
    return ["", f"#### The averaged perturbation (cancelling), `{os.path.relpath(history_root)}`", "",
            "The first default of the current step averaged the groups' h_g perturbations with batch-share weights; "
            "the h_g sum to zero with those weights, so the average kept only the imbalance of their norms and radii "
            "and some groups' losses fell in the perturbed pass (docs/method.md, the ascent property). The step is "
            "refused now; its runs are kept here.", ""] + _table(
        ["folder", "method", "base alone (now)", "averaged step", "seeds", "same label, default step now"], rows)


def v1_sweep_table(sweeps: str) -> list[str]:
    """The v1 investigation: each sweep entry's Top-1 with the recipe keys it changed (sweep.json), in its order."""
    entries: dict[tuple[str, str], list[dict[str, Any]]] = {}
    infos: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(sweeps, "*", "*", "seed*", "results.json"))):
        folder, name = Path(path).parts[-4:-2]
        entries.setdefault((folder, name), []).append(read_json(path))
        infos[(folder, name)] = read_json(os.path.join(os.path.dirname(path), "sweep.json"))
    rows = []
    for key in sorted(entries, key=lambda k: (k[0], infos[k].get("order", math.inf), k[1])):
        top1 = np.array([r["top1"] for r in entries[key]])
        std = float(top1.std(ddof=1)) if len(top1) > 1 else math.nan
        info = infos[key]
        rows.append([key[0], f"`{key[1]}`", f"`{info['label']}`",
                     ", ".join(f"`{o}`" for o in info["overrides"]) or "(none)", str(len(top1)),
                     _fmt(float(top1.mean()), std)])
    if not rows:
        return []
    return ["", f"The v1 investigation runs (`{os.path.relpath(sweeps)}`; `gsa.bn_stats` and the v1 radius no longer "
                "exist):", ""] + _table(["folder", "run", "method", "changed keys", "seeds", "Top-1"], rows)


def read_bench(results_root: str) -> dict[str, Any] | None:
    """The committed CPU step benchmark (results/bench/step_cpu_resnet32.json), None when absent."""
    path = os.path.join(results_root, "bench", "step_cpu_resnet32.json")
    return read_json(path) if os.path.exists(path) else None


def build_block(results_root: str, readme: str, docs: str, write_plots: bool) -> str:
    """The README block (markers included); PNGs are written when `write_plots`."""
    tree = _scan(results_root)
    if not tree:
        raise AnalysisError(f"no results.json under {results_root}/<dataset>_r<ratio>/<method>/seed<k>/")
    first = {f: next(iter(m.values()))[0][1] for f, m in tree.items()}
    lines = [BEGIN, f"<!-- generated by tools/collect_results.py from {results_root}/; edits here are overwritten -->"]
    for folder in sorted(tree, key=_folder_order(first)):
        stats = {m: summarize(runs, with_counts=write_plots) for m, runs in tree[folder].items()}
        title = f"{_where(first[folder])}, {first[folder]['epochs']} epochs"
        lines += ["", f"### {title}", "", "Test accuracy (%), mean ± std over seeds (— where a split has no class).",
                  ""] + main_table(stats)
        png = os.path.join(docs, f"per_class_{folder}.png")
        pairs = plot_pairs(stats)
        if pairs:
            if write_plots:
                per_class_plot(stats, pairs, title, png)
            rel = os.path.relpath(png, os.path.dirname(os.path.abspath(readme))).replace(os.sep, "/")
            lines += ["", f"![per-class accuracy, {title}]({rel})"]
        comp = component_table(stats)
        if comp:
            lines += ["", f"#### Component ablation, {title} (Top-1)", ""] + comp
        direc = direction_table(stats)
        if direc:
            lines += ["", f"#### GSA direction ablation, {title}", ""] + direc
        groups = group_table(stats)
        if groups:
            lines += ["", f"#### Number of groups, {title}", ""] + groups
        peers = GRIDS["peers"]
        if folder.rpartition("_r")[0] == peers.folder and int(folder.rpartition("_r")[2]) in peers.cells:
            table = peers_table(stats, peers.cells[int(folder.rpartition("_r")[2])], read_bench(results_root))
            if table:
                lines += ["", f"#### Sharpness-aware methods on the same bases, {title}", ""] + table
        grid = next((g for g in GRIDS.values() if g.folder == folder.rpartition("_r")[0]
                     and int(folder.rpartition("_r")[2]) in g.sweeps), None)
        if grid is not None:
            ratio_key = int(folder.rpartition("_r")[2])
            readings = readings_table(stats, tree[folder], grid.cells[ratio_key], os.path.join(results_root, folder))
            if readings:
                lines += ["", f"#### Readings of the grouped step, {title}", ""] + readings
            sweep = gkp_sweep_table(stats, tree[folder], list(dict.fromkeys(grid.cells[ratio_key]
                                                                             + grid.sweeps[ratio_key])),
                                    os.path.join(results_root, folder))
            if sweep:
                lines += ["", f"#### GKP's strength, {title}", ""] + sweep
    lines += averaged_history_table(os.path.join(results_root, "history", "averaged"), tree)
    lines += history_table(os.path.join(results_root, "history", "v1"), tree)
    return "\n".join(lines + ["", END])


def headline_block(results_root: str) -> str:
    """The README's one table: per results folder and base, the base alone against base+gkp+gsa."""
    tree = _scan(results_root)
    rows = []
    first = {f: next(iter(m.values()))[0][1] for f, m in tree.items()}
    for folder in sorted(tree, key=_folder_order(first)):
        stats = {m: summarize(runs) for m, runs in tree[folder].items()}
        r = first[folder]
        for base, full in plot_pairs(stats):
            b, m = stats[base], stats[full]
            delta, verdict = delta_vs(b, m)
            rows.append([f"{_where(r)}, {r['epochs']} ep", f"`{base}`",
                         f"{_fmt(b.mean['top1'], b.std['top1'])} ({_fmt(b.mean['few'], math.nan)})",
                         f"{_fmt(m.mean['top1'], m.std['top1'])} ({_fmt(m.mean['few'], math.nan)})",
                         f"{delta:+.2f}", verdict, str(min(len(b.seeds), len(m.seeds)))])
    lines = [HEAD_BEGIN, f"<!-- generated by tools/collect_results.py from {results_root}/; edits here are "
                         "overwritten -->", ""]
    lines += _table(["data, schedule", "base", "base Top-1 (Few)", "+GKP+GSA Top-1 (Few)", "Δ Top-1",
                     "beyond seed spread", "seeds"], rows)
    return "\n".join(lines + peers_headline(tree, first) + ["", HEAD_END])


def peers_headline(tree: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]],
                   first: dict[str, dict[str, Any]]) -> list[str]:
    """The README's rows of the peers table: a method per row, a base per column, Top-1 (Δ vs the base, whether
    beyond the seed spread, seeds)."""
    peers = GRIDS["peers"]
    lines = []
    for ratio, labels in peers.cells.items():
        folder = f"{peers.folder}_r{ratio}"
        if folder not in tree:
            continue
        stats = {m: summarize(runs) for m, runs in tree[folder].items()}
        groups = {b: g for b, g in peers_rows(stats, labels).items() if len(g) > 2}  # bases with a peer run
        if not groups:
            continue
        methods = list(dict.fromkeys(parse_label(m)[1] for g in groups.values() for m in g))
        rows = []
        for mod in methods:
            cells = []
            for base, group in groups.items():
                label = next((m for m in group if parse_label(m)[1] == mod), None)
                if label is None:
                    cells.append("—")
                    continue
                s = stats[label]
                d, verdict = delta_vs(stats[base], s)
                cells.append(_fmt(s.mean["top1"], s.std["top1"]) + ("" if not mod else f" ({d:+.2f}, {verdict})")
                             + f" [{len(s.seeds)}]")
            rows.append([f"+{mod}" if mod else "base alone"] + cells)
        r = first[folder]
        lines += ["", f"Sharpness-aware methods on the same bases, {_where(r)}, "
                      f"{r['epochs']} ep: Top-1 (Δ vs base, beyond seed spread) [seeds].", ""]
        lines += _table(["method"] + [f"`{b}`" for b in groups], rows)
    return lines


def replace_block(text: str, block: str, path: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with its marker block replaced by `block`; the markers must appear once each, in order."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise AnalysisError(f"{path} must contain the line {begin} once, followed later by {end} once "
                            "(add them where the tables belong)")
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + block + text[stop:]


def _update(path: str, blocks: Sequence[tuple[str, str, str]], check: bool) -> int:
    """Replace each (block, begin, end) in the file; with `check`, only report whether it is up to date."""
    with open(path) as f:
        text = f.read()
    new_text = text
    for block, begin, end in blocks:
        new_text = replace_block(new_text, block, path, begin, end)
    if check:
        if new_text != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new_text.splitlines(True),
                                                       f"{path} (current)", f"{path} (generated)"))
            _logger.error("%s: the results tables are out of date; run tools/collect_results.py", path)
            return 1
        return 0
    if new_text != text:
        atomic_write_text(path, new_text)
        _logger.info("updated the results tables of %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="results tree (default: results)")
    p.add_argument("--doc", default="docs/results.md", help="page whose results block is replaced "
                                                             "(default: docs/results.md)")
    p.add_argument("--readme", default="README.md", help="page whose headline block is replaced (default: README.md)")
    p.add_argument("--docs", default="docs", help="folder for the per-class PNGs (default: docs)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is out of date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        block = build_block(args.results, args.doc, args.docs, write_plots=not args.check)
        headline = headline_block(args.results)
        status = max(_update(args.doc, [(block, BEGIN, END)], args.check),
                     _update(args.readme, [(headline, HEAD_BEGIN, HEAD_END)], args.check))
    except (LTRecipesError, OSError) as e:
        _logger.error("%s", e)
        return 2
    print(block)
    print(headline)
    return status


if __name__ == "__main__":
    sys.exit(main())
