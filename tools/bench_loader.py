#!/usr/bin/env python3
"""Images per second of each recipe's training input pipeline per loader worker count, and the workers a GPU machine
would need to feed the step.

For every recipe (default: all of recipes/), synthetic data in the recipe's format is written to a temporary folder
(nothing is downloaded): CIFAR pickles and Fashion-MNIST idx files of random pixels, scikit-learn's bundled digits, and
for the image-file datasets JPEGs of a typical size for the dataset (smooth random content) named by text list files
in the official `path label` layout. The recipe's own data section builds the datasets and transforms
(lt_recipes.data: augmentation, contrastive views) as a GPU run has them (uint8 batches, normalised on the device),
and a loader with the run's options
(`loader_options`: seeded draws, collation, workers) yields batches of the recipe's batch size for each worker count
of `--workers`, timed from the end of the first round of batches (worker start-up) over `--rounds` more.

Workers needed: the committed GPU step figures (the newest `step_cuda_<model>.json` under results/bench/, else under
results/history/*/bench/) give a step's time per image for the plain step (`sgd`) and the grouped step with GKP; the
pipeline's CPU time per image (measured with 0 workers, so it does not depend on what else the machine runs) over the
step's time per image, rounded up, is the workers a machine with this CPU's cores would need (one core per worker;
a 16-core machine has 15 to spare besides the training process). CIFAR-size recipes take the ResNet-32 figures, image-file recipes the ResNet-50 ones.

    python tools/bench_loader.py --json > results/bench/loader_cpu.json
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench_epoch import write_synthetic_cifar
from lt_recipes.config import load_config, load_recipe
from lt_recipes.data import CIFAR_LAYOUT, build_data, dataset_info, loader_options
from lt_recipes.data.loader import SeededEpochSampler, SeededSamples
from lt_recipes.sections import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Image sides (width, height) of the synthetic files: ImageNet's typical 500 x 375, Places365-standard's 256 x 256,
# iNat 2018's 800 pixels on the long side.
FILE_SIZES = {"imagenet_lt": (500, 375), "places_lt": (256, 256), "inat2018": (800, 600)}
# The committed GPU step figure each recipe's model takes (the nearest measured model).
GPU_MODEL = {"cifar": "resnet32", "files": "resnet50"}
STEP_KEYS = {"plain": ("sgd_ms", "plain_ms"), "grouped": ("gkp_gsa_ms", "gkp_gsa_masked_ms")}
SPARE_CORES = 15  # a 16-core machine, one core for the training process


def _write_idx(path: str, array: np.ndarray) -> None:
    dims = array.shape
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, len(dims)]) + np.asarray(dims, dtype=">i4").tobytes() + array.tobytes())


def _write_fmnist(root: str, train: int, test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), np.arange(n, dtype=np.uint8) % 10)


def _write_files(root: str, dataset: str, images: int, lines: int, classes: int = 8) -> list[str]:
    """`images` distinct JPEGs of the dataset's size, listed round-robin on `lines` training lines (a list may name a
    file more than once) and a few evaluation lines; the overrides that point the recipe at them."""
    rng = np.random.default_rng(0)
    w, h = FILE_SIZES[dataset]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = []
    for i in range(images):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        names.append(f"images/{i}.jpg")
        Image.fromarray(noisy).save(os.path.join(root, names[-1]), quality=90)
    for split, n in (("train", lines), ("val", classes), ("test", classes)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.writelines(f"{names[i % images]} {i % classes}\n" for i in range(n))
    return [f"data.root={root}", "data.train_list=train.txt", "data.val_list=val.txt", "data.test_list=test.txt",
            "data.num_classes=null"]


def synthetic_overrides(recipe: str, tmp: str, needed: int) -> list[str]:
    """Write synthetic data of `recipe`'s dataset under `tmp` with at least `needed` training images after its long-tail
    cut; the recipe overrides that read it."""
    cfg = load_config(recipe)
    dataset = cfg["data"]["dataset"]
    if dataset == "digits":
        return []
    if dataset in CIFAR_LAYOUT:
        # the LT cut of ratio 100 keeps about a fifth of CIFAR-10's images and a tenth of CIFAR-100's
        write_synthetic_cifar(tmp, dataset, train_images=max(10_000, 20 * needed), test_images=1000)
        return [f"data.root={tmp}"]
    if dataset == "fmnist":
        _write_fmnist(tmp, max(6_000, 10 * needed), 1000)
        return [f"data.root={tmp}"]
    return _write_files(tmp, dataset, images=16, lines=needed)


def measure(data: Any, recipe: Recipe, workers: int, rounds: int, batch_size: int) -> tuple[float, float]:
    """(images per second, CPU ms per image of this process) of the recipe's training pipeline with `workers` loader
    workers: batches arrive in rounds of max(1, workers) (each worker makes whole batches), so both are taken between
    the end of the first round (worker start-up) and the end of `rounds` more, while this process takes each batch as
    it comes. With 0 workers the CPU time is the pipeline's own cost, whatever else the machine runs."""
    d = recipe.data
    per_round = max(1, workers)
    total = per_round * (1 + rounds)
    opts = {**loader_options(d, recipe.seed, "cpu"), "num_workers": workers, "persistent_workers": workers > 0}
    sampler = SeededEpochSampler(data.train_targets, "random", recipe.seed, num_samples=total * batch_size)
    loader = DataLoader(SeededSamples(data.train), batch_size=batch_size, sampler=sampler, **opts)
    arrivals = [(time.perf_counter(), time.process_time()) for _ in loader]
    del loader
    images = (total - per_round) * batch_size
    (wall0, cpu0), (wall1, cpu1) = arrivals[per_round - 1], arrivals[-1]
    return images / (wall1 - wall0), 1000 * (cpu1 - cpu0) / images


def gpu_steps(root: str) -> dict[str, dict[str, Any]]:
    """The newest committed GPU step figures per model family: file, model, batch, device and ms per image of the
    plain and the grouped step."""
    out: dict[str, dict[str, Any]] = {}
    for family, model in GPU_MODEL.items():
        paths = sorted(glob.glob(os.path.join(root, "results", "bench", f"step_cuda_{model}.json"))) or sorted(
            glob.glob(os.path.join(root, "results", "history", "*", "bench", f"step_cuda_{model}.json")))[-1:]
        if not paths:
            continue
        with open(paths[0]) as f:
            r = json.load(f)
        per_image = {kind: r[next(k for k in keys if k in r)] / r["batch"] for kind, keys in STEP_KEYS.items()
                     if any(k in r for k in keys)}
        out[family] = {"file": os.path.relpath(paths[0], root), "model": r["model"], "batch": r["batch"],
                       "device_name": r["device_name"], "amp": r["amp"], "ms_per_image": per_image}
    return out


def workers_needed(cpu_ms_per_image: float, step_ms_per_image: float) -> int:
    """Loader workers, each a core spending `cpu_ms_per_image` on an image, that feed a step taking
    `step_ms_per_image` per image."""
    return math.ceil(cpu_ms_per_image / step_ms_per_image)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: every recipe)")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=2,
                    help="timed rounds of batches (one batch per worker each) after the first round")
    ap.add_argument("--batch-size", type=int, default=None, help="default: each recipe's data.batch_size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    recipes = args.recipes or sorted(os.path.splitext(os.path.basename(p))[0]
                                     for p in glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
    if 0 not in args.workers:
        ap.error("--workers must include 0 (the pipeline's CPU cost per image, which the needed workers come from)")
    most = max(1, *args.workers) * (1 + args.rounds)  # batches of the longest measurement
    torch.set_num_threads(1)  # the loader's own work only; workers run single-threaded as well
    steps = gpu_steps(ROOT)
    out: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                           "load_average": os.getloadavg()[0], "rounds": args.rounds, "gpu_steps": steps,
                           "spare_cores": SPARE_CORES, "recipes": {}}
    for name in recipes:
        batch = args.batch_size or load_config(name)["data"]["batch_size"]
        with tempfile.TemporaryDirectory() as tmp:
            recipe = load_recipe(name, synthetic_overrides(name, tmp, most * batch))
            data = build_data(recipe.data, recipe.seed, uint8_train=True)  # as a GPU run reads them
            runs = {str(w): measure(data, recipe, w, args.rounds, batch) for w in args.workers}
        rates = {w: rate for w, (rate, _) in runs.items()}
        cpu_ms = runs["0"][1]
        d = recipe.data
        row: dict[str, Any] = {"dataset": d.dataset, "img_size": d.img_size,
                               "augment": d.auto_augment or d.augment, "views": 1 + d.contrastive_views,
                               "batch_size": batch, "images_per_s": rates, "cpu_ms_per_image": cpu_ms}
        family = "cifar" if dataset_info(d.dataset).in_memory else "files"
        if family in steps:
            row["gpu_step"] = family
            row["workers_needed"] = {kind: workers_needed(cpu_ms, ms)
                                     for kind, ms in steps[family]["ms_per_image"].items()}
        out["recipes"][name] = row
        if not args.json:
            need = row.get("workers_needed", {})
            print(f"{name}: " + ", ".join(f"{w} workers {r:.0f} img/s" for w, r in rates.items())
                  + (f"; workers to feed the {steps[family]['device_name']} step: "
                     + ", ".join(f"{k} {v}" for k, v in need.items()) if need else ""), flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
