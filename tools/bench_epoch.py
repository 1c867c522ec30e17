#!/usr/bin/env python3
"""Time whole training epochs of a CIFAR recipe on synthetic CIFAR-shaped data and project the full schedule.

Writes a CIFAR-100 (or CIFAR-10) folder in the official pickle layout filled with random pixels (by default 50,000
training and 10,000 test images, as the real sets have; `--train-images` / `--test-images` shrink it for a smoke run),
then trains the recipe for a few epochs with the real data pipeline, model, loss and method: the first `--base-epochs`
run the base step, the grouping epoch builds the groups (memory bank, spectral grouping, exact Fisher) and the later
ones run the grouped step. Each epoch's wall time (training, validation and memory-bank update) comes from the run's
summary.csv. The projection for the recipe's own schedule is

    T = start * t_base + (epochs - start) * t_grouped + regroups * (t_grouping_epoch - t_grouped)

with start = groups.start_epoch, regroups = the grouping epochs of the schedule, t_base the median of the base epochs
after the first (which pays for start-up) and t_grouped the median of the grouped epochs after the grouping epoch.
The base recipe alone (method none) is projected as epochs * t_base.

    python tools/bench_epoch.py --recipe cifar100_lt_resnet32 --mixed-precision bf16 --json
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile

import numpy as np
import torch
from accelerate import Accelerator

from lt_recipes.config import load_config, load_recipe
from lt_recipes.data import CIFAR_LAYOUT, dataset_info
from lt_recipes.engine import Trainer


def write_synthetic_cifar(root: str, dataset: str, seed: int = 0, train_images: int = 50_000,
                          test_images: int = 10_000) -> None:
    """Random-pixel CIFAR in torchvision's on-disk layout, the images split evenly over the classes."""
    folder, train_files, (test_file,), key = CIFAR_LAYOUT[dataset]
    num_classes = dataset_info(dataset).num_classes
    out = os.path.join(root, folder)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), train_images // num_classes))
    for name, idx in zip(train_files, np.array_split(np.arange(len(labels)), len(train_files))):
        with open(os.path.join(out, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8),
                         key: labels[idx].tolist()}, f, protocol=4)
    test_labels = np.repeat(np.arange(num_classes), test_images // num_classes)
    with open(os.path.join(out, test_file), "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8),
                     key: test_labels.tolist()}, f, protocol=4)


def project(times: list[float], base_epochs: int, epochs: int, group_start: int, interval: int) -> dict[str, float]:
    """Seconds per epoch kind from the timed epochs, and the projected hours of the full schedule (module docstring)."""
    t_base = statistics.median(times[1:base_epochs])
    t_grouping = times[base_epochs]
    t_grouped = statistics.median(times[base_epochs + 1:])
    regroups = 1 + ((epochs - 1 - group_start) // interval if interval > 0 else 0)
    method_s = group_start * t_base + (epochs - group_start) * t_grouped + regroups * (t_grouping - t_grouped)
    return {"t_base_s": t_base, "t_grouping_epoch_s": t_grouping, "t_grouped_s": t_grouped, "regroups": regroups,
            "projected_base_h": epochs * t_base / 3600, "projected_method_h": method_s / 3600,
            "method_over_base": method_s / (epochs * t_base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="cifar100_lt_resnet32")
    ap.add_argument("--base-epochs", type=int, default=2, help="base epochs timed before grouping (first is warm-up)")
    ap.add_argument("--grouped-epochs", type=int, default=3, help="grouped epochs after the grouping epoch")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--train-images", type=int, default=50_000, help="synthetic training images (CIFAR: 50,000)")
    ap.add_argument("--test-images", type=int, default=10_000, help="synthetic test images (CIFAR: 10,000)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--paper-hours", type=float, default=None, help="the paper's full-schedule time, for the ratio")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.base_epochs < 2 or args.grouped_epochs < 1:
        raise SystemExit("need --base-epochs >= 2 (the first pays for start-up) and --grouped-epochs >= 1")

    full = load_config(args.recipe, args.overrides)
    if full["data"]["dataset"] not in CIFAR_LAYOUT:
        raise SystemExit(f"recipe {args.recipe} trains {full['data']['dataset']}: this benchmark writes CIFAR only")
    g_start, interval, total = full["groups"]["start_epoch"], full["groups"]["interval"], full["epochs"]
    bench_epochs = args.base_epochs + 1 + args.grouped_epochs
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cifar(tmp, full["data"]["dataset"], train_images=args.train_images,
                              test_images=args.test_images)
        cfg = load_recipe(args.recipe, args.overrides + [
            f"data.root={tmp}", f"data.num_workers={args.num_workers}", f"epochs={bench_epochs}",
            "sched.warmup_epochs=1", f"groups.start_epoch={args.base_epochs}", "groups.interval=0",
            "groups.eval_interval=1", f"checkpoint_interval={bench_epochs + 1}"])
        acc = Accelerator(mixed_precision=args.mixed_precision)
        trainer = Trainer(cfg, os.path.join(tmp, "run"), acc)
        trainer.fit()
        times = [float(r["time"]) for r in trainer.rows]
        steps = len(trainer.train_loader)
    p = project(times, args.base_epochs, total, g_start, interval)
    out = {
        "recipe": args.recipe, "device": str(acc.device), "mixed_precision": args.mixed_precision,
        "num_workers": args.num_workers, "steps_per_epoch": steps, "epoch_times_s": times,
        "t_base_s": p["t_base_s"], "t_grouping_epoch_s": p["t_grouping_epoch_s"], "t_grouped_s": p["t_grouped_s"],
        "schedule": {"epochs": total, "group_start": g_start, "regroups": p["regroups"]},
        "projected_base_h": p["projected_base_h"], "projected_method_h": p["projected_method_h"],
        "method_over_base": p["method_over_base"],
    }
    if args.paper_hours:
        out["paper_hours"] = args.paper_hours
        out["projected_over_paper"] = out["projected_method_h"] / args.paper_hours
    if "cuda" in out["device"]:
        out["gpu"] = torch.cuda.get_device_name(0)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.recipe} on {out.get('gpu', out['device'])} ({args.mixed_precision}), {steps} steps per epoch")
        print(f"  base epoch {p['t_base_s']:.2f}s, grouping epoch {p['t_grouping_epoch_s']:.2f}s, "
              f"grouped epoch {p['t_grouped_s']:.2f}s")
        print(f"  projected {total} epochs: base {out['projected_base_h']:.2f} h, "
              f"method {out['projected_method_h']:.2f} h ({out['method_over_base']:.2f}x)" +
              (f"; paper {args.paper_hours} h" if args.paper_hours else ""))


if __name__ == "__main__":
    main()
