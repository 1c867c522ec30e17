"""The long-tailed profile and cut, and the class-balanced draws that carve test and validation splits.

The in-memory datasets get the long-tailed profile of Cao et al. 2019: class ``i`` keeps
``int(n_max * (1/r) ** (i / (C - 1)))`` images, the first ones after shuffling that class's indices; one
``np.random.RandomState(0)`` shuffles the classes in class order (the same stream as ``np.random.seed(0)`` followed
by ``np.random.shuffle`` per class). They have no validation split, so ``data.val_per_class`` images per class are
drawn (seeded with the run seed) from the images the LT cut discarded; a head class without enough leftovers gives
the shortfall from its kept images. ``lt_counts`` is therefore exactly the published profile and ``train_counts``
differs from it only for head classes.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError

LT_SEED = 0


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class image counts of the exponential LT profile: ``n_i = int(n_max * (1/r) ** (i / (C - 1)))``."""
    if not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1:
        raise DataError(f"data.imbalance_ratio={imbalance_ratio!r} must be a number >= 1")
    if num_classes < 1 or n_max < 1:
        raise DataError(f"long-tail profile needs num_classes >= 1 and n_max >= 1, got {num_classes} and {n_max}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def class_sizes(targets: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Images per class; a label outside [0, num_classes) raises a DataError naming `what`."""
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise DataError(f"{what}: label {int(bad[0])} outside [0, {num_classes})")
    return np.bincount(targets, minlength=num_classes)


def long_tail_indices(targets: np.ndarray, num_classes: int, imbalance_ratio: float,
                      n_max: int | None = None) -> np.ndarray:
    """Indices kept by the LT cut, class by class in class order (see the module docstring for the seed convention).

    ``n_max`` defaults to the smallest class size, so every class can give what the profile asks.
    """
    targets = np.asarray(targets, dtype=np.int64)
    sizes = class_sizes(targets, num_classes, "long_tail_indices targets")
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        raise DataError(f"class {int(empty[0])} has no training samples before the LT cut")
    n_max = int(sizes.min()) if n_max is None else int(n_max)
    counts = long_tail_counts(n_max, num_classes, imbalance_ratio)
    rng = np.random.RandomState(LT_SEED)
    kept = []
    for c, n in enumerate(counts):
        if n == 0:
            raise DataError(f"class {c} has no training samples after the LT cut: "
                            f"int({n_max} * (1/{imbalance_ratio}) ** ({c}/{num_classes - 1})) = 0; "
                            f"lower data.imbalance_ratio or use more images per class")
        if n > sizes[c]:
            raise DataError(f"class {c} has {int(sizes[c])} samples, fewer than the {n} the LT profile keeps "
                            f"(n_max={n_max})")
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


def balanced_pick(targets: np.ndarray, num_classes: int, per_class: int, rng: np.random.Generator,
                  key: str) -> np.ndarray:
    """``per_class`` random indices of every class, leaving at least one image of each class behind."""
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) <= per_class:
            raise DataError(f"class {c} has {len(idx)} images; {key}={per_class} must be smaller")
        picked.append(np.sort(rng.choice(idx, per_class, replace=False)))
    return np.concatenate(picked)


def hold_out_val(targets: np.ndarray, kept: np.ndarray, num_classes: int, per_class: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split the pool into (train, val) indices: val comes from the LT leftovers, head-class shortfall from kept."""
    kept_mask = np.zeros(len(targets), dtype=bool)
    kept_mask[kept] = True
    val_parts = []
    for c in range(num_classes):
        in_class = targets == c
        left = np.flatnonzero(in_class & ~kept_mask)
        take = rng.choice(left, min(per_class, len(left)), replace=False)
        short = per_class - len(take)
        if short:
            kept_c = np.flatnonzero(in_class & kept_mask)
            if short >= len(kept_c):
                raise DataError(f"class {c}: {len(kept_c)} images after the LT cut and {len(left)} left over cannot "
                                f"give data.val_per_class={per_class} validation images and still train on one")
            take = np.concatenate([take, rng.choice(kept_c, short, replace=False)])
        val_parts.append(np.sort(take))
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=np.int64)
    return kept[~np.isin(kept, val)], val
