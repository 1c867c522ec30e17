#!/usr/bin/env python3
"""Write the benchmark tables of docs/benchmarks.md from the committed JSON files under results/bench/.

Reads every `step_*.json` (tools/bench_step.py --json; with `gsa.batched` kinds also a batched-vs-sequential
table), `kernels_*.json` (tools/bench_kernels.py --json), `memory_*.json` (tools/bench_memory.py --json),
`epoch_*.json` (tools/bench_epoch.py --json) and `loader_*.json` (tools/bench_loader.py --json), and replaces the
block between `<!-- bench:begin -->` and `<!-- bench:end -->`; the first grouped step's figures, kept under
results/history/v1/bench/, fill the block between `<!-- bench-history:begin -->` and `<!-- bench-history:end -->`.
`--check` writes nothing and exits 1 when a block is out of date.
Record new figures with `bash tools/record_bench.sh` (it saves the CPU JSON files this reads) and, on a GPU machine,
`bash tools/device_check.sh` (it saves the *_cuda*.json files).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from lt_recipes.checkpoint import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HISTORY_BEGIN, HISTORY_END = "<!-- bench-history:begin -->", "<!-- bench-history:end -->"


def _load(pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            out.append((os.path.relpath(path, ROOT), json.load(f)))
    return out


def step_kinds(r: dict) -> list[str]:
    """The step kinds of a bench_step.py JSON object, in its order: every `<kind>_ms` key (the kinds have changed
    names over versions of bench_step.py, and committed files of each version are kept)."""
    return [k[:-len("_ms")] for k in r if k.endswith("_ms")]


def step_tables(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for path, r in files:
        lines += [f"Step times, `{path}`: {r['model']}, batch {r['batch']}, G={r['groups']}, {r['device_name']} "
                  f"({r['threads']} threads), amp {r['amp']}, median of {r['repeats']} interleaved repeats.", "",
                  "| step |" + (" passes |" if "sam_passes" in r else "") + (" syncs |" if "sam_syncs" in r else "")
                  + " median ms | / SAM | extra state MB |" + (" peak MB |" if "sam_peak_bytes" in r else ""),
                  "|---|" + ("---|" if "sam_passes" in r else "") + ("---:|" if "sam_syncs" in r else "")
                  + "---:|---:|---:|" + ("---:|" if "sam_peak_bytes" in r else "")]
        for k in step_kinds(r):
            ratio = r[f"{k}_ms"] / r["sam_ms"]
            passes = f" {r[f'{k}_passes']} |" if f"{k}_passes" in r else ""
            passes += f" {r[f'{k}_syncs']} |" if f"{k}_syncs" in r else ""
            row = f"| {k} |{passes} {r[f'{k}_ms']:.1f} | {ratio:.3f} | {r[f'{k}_state_bytes'] / 2**20:.1f} |"
            if f"{k}_peak_bytes" in r:
                row += f" {r[f'{k}_peak_bytes'] / 2**20:.0f} |"
            lines.append(row)
        lines.append("")
    return lines


def batched_tables(files: list[tuple[str, dict]]) -> list[str]:
    """`gsa.batched` against the sequential passes: every step file that times a `<kind>_batched` beside `<kind>`,
    the whole step and its perturbed passes (bench_step.py's `perturbed_pass_times`)."""
    lines = []
    for path, r in files:
        pairs = [(k[:-len("_batched")], k) for k in step_kinds(r)
                 if k.endswith("_batched") and f"{k[:-len('_batched')]}_ms" in r]
        if not pairs:
            continue
        passes = r["perturbed_pass_times"]
        lines += [f"`gsa.batched` against the sequential passes, `{path}`: {r['model']}, batch {r['batch']} of "
                  f"{r['img_size']}x{r['img_size']} images, G={r['groups']}, {r['device_name']} ({r['threads']} "
                  f"threads), median of {r['repeats']} interleaved repeats. Perturbed passes: from their first "
                  "forward to the base optimizer's step (with GKP, its gradient included).", "",
                  "| step | sequential ms | batched ms | batched / sequential | perturbed passes, sequential ms | "
                  "batched ms | batched / sequential |", "|---|---:|---:|---:|---:|---:|---:|"]
        for seq, bat in pairs:
            lines.append(f"| {seq} | {r[f'{seq}_ms']:.1f} | {r[f'{bat}_ms']:.1f} | "
                         f"{r[f'{bat}_ms'] / r[f'{seq}_ms']:.3f} | {passes[seq]:.1f} | {passes[bat]:.1f} | "
                         f"{passes[bat] / passes[seq]:.3f} |")
        lines.append("")
    return lines


def kernel_tables(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for path, r in files:
        lines += [f"Fused ops, `{path}`: d={r['d']:,}, G={r['groups']}, {r['device_name']} ({r['threads']} threads), "
                  f"load average {r['load_average']:.2f}; copy {r['copy_gbps']:.2f} GB/s. Fused over reference "
                  f"(geometric mean) **{r['fused_over_reference']:.1f}x**, fused bandwidth "
                  f"**{r['fraction_of_copy_bandwidth']:.2f}** of copy.", "",
                  "| op | fused ms | reference ms | speed-up | fused GB/s |", "|---|---:|---:|---:|---:|"]
        for name, o in r["ops"].items():
            lines.append(f"| {name} | {o['fused_ms']:.1f} | {o['reference_ms']:.1f} | {o['speedup']:.1f}x | "
                         f"{o['fused_gbps']:.2f} |")
        lines.append("")
    return lines


def memory_tables(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    gib = 2 ** 30
    for path, r in files:
        lines += [f"Method state, `{path}`: {r['model']}, {r['num_classes']} classes, G={r['groups']}, "
                  f"{r['params'] / 1e6:.1f}M parameters, {r['evaluation_points']} evaluation points.", "",
                  "| state | GiB |", "|---|---:|",
                  f"| memory bank, naive (one encoder per class) | {r['naive_bank_bytes_fp32'] / gib:.1f} |",
                  f"| memory bank, distinct snapshots, fp32, worst case | {r['snapshot_bank_max_bytes_fp32'] / gib:.1f} |",
                  f"| memory bank, distinct snapshots, bf16, worst case | {r['snapshot_bank_max_bytes_bf16'] / gib:.1f} |",
                  f"| GSA buffers ([G, d] rows, weights, global gradient) | {r['gsa_buffers_bytes'] / gib:.2f} |",
                  f"| GKP anchors + Fisher, fp32 / bf16 | {r['gkp_state_bytes_fp32'] / gib:.2f} / "
                  f"{r['gkp_state_bytes_bf16'] / gib:.2f} |", ""]
    return lines


def epoch_tables(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for path, r in files:
        s = r["schedule"]
        lines += [f"Whole epochs, `{path}`: {r['recipe']} on synthetic CIFAR-shaped data, {r.get('gpu', r['device'])}, "
                  f"mixed precision {r['mixed_precision']}, {r['num_workers']} loader workers, "
                  f"{r['steps_per_epoch']} steps per epoch; projected over the recipe's {s['epochs']} epochs "
                  f"(method from epoch {s['group_start']}, {s['regroups']} groupings).", "",
                  "| | seconds per epoch | projected hours |", "|---|---:|---:|",
                  f"| base alone (every epoch) | {r['t_base_s']:.2f} | {r['projected_base_h']:.2f} |",
                  f"| grouping epoch (bank, spectral grouping, exact Fisher) | {r['t_grouping_epoch_s']:.2f} | |",
                  f"| base + GKP + GSA | {r['t_grouped_s']:.2f} | {r['projected_method_h']:.2f} |"]
        if "paper_hours" in r:
            lines.append(f"| paper, same method on one RTX 3090 | | {r['paper_hours']:.2f} |")
        lines.append("")
    return lines


def loader_tables(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for path, r in files:
        workers = list(next(iter(r["recipes"].values()))["images_per_s"]) if r["recipes"] else []
        steps = r["gpu_steps"]
        lines += [f"Input pipelines, `{path}`: each recipe's training transforms and loader on synthetic data of its "
                  f"format, {r['machine']} ({r['cores']} cores, load average {r['load_average']:.1f}), images per "
                  f"second per loader worker count after the workers' first batches, and the pipeline's CPU time per "
                  f"image (0 workers; CPU time, less sensitive to the load than the rates). Workers to feed a step: that CPU time over the "
                  f"step's time per image, rounded up (a 16-core machine has {r['spare_cores']} to spare); step "
                  f"times per image from "
                  + "; ".join(f"`{s['file']}` ({s['model']}, batch {s['batch']}, {s['device_name']}, amp {s['amp']}: "
                              + ", ".join(f"{k} {v:.3f} ms" for k, v in s["ms_per_image"].items()) + ")"
                              for s in steps.values()) + ".", "",
                  "| recipe | pipeline | batch | " + " | ".join(f"img/s, {w} workers" for w in workers)
                  + " | CPU ms per image | workers for the plain step | for the grouped step with GKP |",
                  "|---|---|---:|" + "---:|" * len(workers) + "---:|---:|---:|"]
        for name, row in r["recipes"].items():
            need = row.get("workers_needed", {})
            pipeline = f"{row['dataset']} {row['img_size']} px, {row['augment']}, {row['views']} view" \
                + ("s" if row["views"] > 1 else "")
            lines.append(f"| {name} | {pipeline} | {row['batch_size']} | "
                         + " | ".join(f"{row['images_per_s'][w]:.0f}" for w in workers)
                         + f" | {row['cpu_ms_per_image']:.2f} | {need.get('plain', 'n/a')} | "
                         f"{need.get('grouped', 'n/a')} |")
        lines.append("")
    return lines


def build_block(bench_dir: str, begin: str = BEGIN, end: str = END) -> str:
    lines = [begin, f"<!-- generated by tools/bench_report.py from {os.path.relpath(bench_dir, ROOT)}/; "
                    "edits here are overwritten -->", ""]
    lines += step_tables(_load(os.path.join(bench_dir, "step_*.json")))
    lines += batched_tables(_load(os.path.join(bench_dir, "step_*.json")))
    lines += kernel_tables(_load(os.path.join(bench_dir, "kernels_*.json")))
    lines += memory_tables(_load(os.path.join(bench_dir, "memory_*.json")))
    lines += epoch_tables(_load(os.path.join(bench_dir, "epoch_*.json")))
    lines += loader_tables(_load(os.path.join(bench_dir, "loader_*.json")))
    return "\n".join(lines + [end])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=os.path.join(ROOT, "results", "bench"))
    ap.add_argument("--history", default=os.path.join(ROOT, "results", "history", "v1", "bench"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    with open(args.doc) as f:
        text = f.read()
    new = text
    for bench_dir, begin, end in ((args.bench, BEGIN, END), (args.history, HISTORY_BEGIN, HISTORY_END)):
        if new.count(begin) != 1 or new.count(end) != 1 or new.index(begin) > new.index(end):
            print(f"{args.doc} must contain {begin} and, after it, {end}, once each", file=sys.stderr)
            return 2
        block = build_block(bench_dir, begin, end)
        new = new[:new.index(begin)] + block + new[new.index(end) + len(end):]
        print(block)
    if args.check:
        if new != text:
            print(f"{args.doc}: a benchmark block is out of date; run tools/bench_report.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        atomic_write_text(args.doc, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
