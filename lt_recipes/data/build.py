"""`build_data`: a validated recipe's dataset as the train / train-eval / val / test splits a run needs (`LTData`).

The dataset's row (lt_recipes.data.table) says how: in-memory datasets are read by the row's reader, cut to the
long-tailed profile (lt_recipes.data.profile) and get validation images from the cut's leftovers; one whose reader
gives no test split (digits) first gives a class-balanced test split of ``data.test_per_class`` images per class,
carved with a fixed seed (so every run seed is scored on the same test set). List datasets are long-tailed as listed; without
``data.val_list`` they hold out ``data.val_per_class`` training images per class.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, DataNotFoundError
from ..metrics import class_splits
from .image_lists import ImageListDataset, Record, check_images, read_entries
from .in_memory import TensorImageDataset
from .loader import resolve_num_workers
from .profile import balanced_pick, class_sizes, hold_out_val, long_tail_indices
from .table import DatasetInfo, dataset_info
from .transforms import build_transforms, eval_data_config

if TYPE_CHECKING:
    from ..sections import DataConfig

_logger = logging.getLogger(__name__)

TEST_SEED = 0  # draws the test split of a dataset whose reader gives none


@dataclass
class LTData:
    """Everything the training run needs from the data layer."""

    dataset: str
    num_classes: int
    in_chans: int
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    train_targets: np.ndarray
    train_counts: list[int]
    lt_counts: list[int]
    num_val_from_train: int
    # (mean, std) when the training images are uint8, to be normalised on the device (`normalize_uint8`); else None
    train_normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _data_root(data_cfg: DataConfig) -> str:
    root = dataset_info(data_cfg.dataset).root(data_cfg.root)
    if root is None:
        raise DataError(f"data.root is required for dataset {data_cfg.dataset!r} (e.g. --set data.root=/path/to/data)")
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.root={root!r} does not exist or is not a directory")
    return root


def _read(info: DatasetInfo, d: DataConfig) -> list[np.ndarray]:
    """The arrays of an in-memory dataset's reader (uint8 images (N, C, H, W) and int64 labels), checked."""
    arrays = info.reader(_data_root(d)) if info.reads_root else info.reader()
    if len(arrays) not in (2, 4):
        raise DataError(f"the reader of dataset {info.name!r} returned {len(arrays)} arrays; expected (images, labels)"
                        " or (images, labels, test images, test labels)")
    out = []
    for images, labels in zip(arrays[::2], arrays[1::2]):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"the reader of dataset {info.name!r} returned images {images.dtype} {images.shape} and "
                            f"labels {labels.shape}; expected uint8 (N, C, H, W) and N labels")
        labels = labels.astype(np.int64, copy=False)
        class_sizes(labels, info.num_classes, f"the labels of dataset {info.name!r}")
        out += [images, labels]
    return out


def _build_in_memory(d: DataConfig, seed: int, uint8_train: bool) -> LTData:
    dataset = d.dataset
    info = dataset_info(dataset)
    num_classes = info.num_classes
    images, targets, *test = _read(info, d)
    if test:
        test_images, test_targets = test
    else:
        test_idx = balanced_pick(targets, num_classes, d.test_per_class, np.random.default_rng(TEST_SEED),
                                 "data.test_per_class")
        pool = np.setdiff1d(np.arange(len(targets)), test_idx)
        test_images, test_targets = images[test_idx], targets[test_idx]
        images, targets = images[pool], targets[pool]
    cap = d.max_per_class
    n_max = None if cap is None else min(cap, int(np.bincount(targets, minlength=num_classes).min()))
    kept = long_tail_indices(targets, num_classes, d.imbalance_ratio, n_max)
    lt_counts = np.bincount(targets[kept], minlength=num_classes).tolist()
    train_idx, val_idx = hold_out_val(targets, kept, num_classes, d.val_per_class,
                                      np.random.default_rng(seed))
    in_chans, native = images.shape[1], images.shape[-1]
    train_tf, eval_tf = build_transforms(dataset, d, in_chans, native, uint8_train)
    train_images = torch.from_numpy(np.ascontiguousarray(images[train_idx]))
    train_targets = targets[train_idx]
    return LTData(
        dataset=dataset, num_classes=num_classes, in_chans=in_chans,
        train=TensorImageDataset(train_images, train_targets, train_tf),
        train_eval=TensorImageDataset(train_images, train_targets, eval_tf),
        val=TensorImageDataset(torch.from_numpy(np.ascontiguousarray(images[val_idx])), targets[val_idx], eval_tf),
        test=TensorImageDataset(torch.from_numpy(np.ascontiguousarray(test_images)), test_targets, eval_tf),
        train_targets=train_targets,
        train_counts=np.bincount(train_targets, minlength=num_classes).tolist(),
        lt_counts=lt_counts,
        num_val_from_train=len(val_idx),
    )


def _list_path(root: str, data_cfg: DataConfig, key: str) -> str | None:
    name = getattr(data_cfg, key)
    if name is None:
        return None
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataNotFoundError(f"data.{key}: {path} not found")
    return path


def _class_count(recipe_count: int | None, label_of: dict[int, int] | None, train_path: str,
                 evaluation: dict[str, list[tuple[str, int, str]]]) -> tuple[int, str]:
    """(class count, where it comes from) of a list dataset: `data.num_classes`, else the training json's categories,
    else 1 + the largest label of the evaluation lists, which hold every class in the LT benchmarks; never from the
    training list alone, where a stray label would silently add a class."""
    if recipe_count is not None:
        if label_of is not None and len(label_of) != recipe_count:
            raise DataError(f"data.num_classes={recipe_count} but {train_path} has {len(label_of)} categories")
        return recipe_count, f"data.num_classes={recipe_count}"
    if label_of is not None:
        return len(label_of), f"the categories of {train_path}"
    return 1 + max(label for split in evaluation.values() for _, label, _ in split), (
        f"the labels of {' and '.join(evaluation)}; set data.num_classes when they do not hold every class")


def _build_from_files(d: DataConfig, seed: int, uint8_train: bool) -> LTData:
    dataset = d.dataset
    root = _data_root(d)
    train_path = _list_path(root, d, "train_list")
    if train_path is None:
        raise DataError(f"data.train_list is required for dataset {dataset!r}")
    val_path = _list_path(root, d, "val_list")
    test_path = _list_path(root, d, "test_list")
    if val_path is None and test_path is None:
        raise DataError(f"dataset {dataset!r} needs data.val_list or data.test_list (or both)")
    if test_path is None:
        _logger.info("data.test_list is not set: %s is scored on the validation split %s", dataset, val_path)
    if val_path is None:
        _logger.info("data.val_list is not set: %s holds out %d training images per class for validation",
                     dataset, d.val_per_class)

    train_entries, label_of = read_entries(train_path, None)
    paths = {"train": train_path, "val": val_path, "test": test_path}
    entries = {name: train_entries if name == "train" else read_entries(path, label_of)[0]
               for name, path in paths.items() if path is not None}
    evaluation = {paths[name]: split for name, split in entries.items() if name != "train"}
    num_classes, source = _class_count(d.num_classes, label_of, train_path, evaluation)
    for split in entries.values():
        for _, label, where in split:
            if label >= num_classes:
                raise DataError(f"{where}: label {label} outside [0, {num_classes}) (the class count from {source})")
    empty = np.flatnonzero(np.bincount([label for _, label, _ in train_entries], minlength=num_classes) == 0)
    if empty.size:
        listed = next((where for split in evaluation.values() for _, label, where in split if label == empty[0]),
                      None)
        raise DataError(f"class {int(empty[0])} has no training samples in {train_path}"
                        + (f" (listed at {listed})" if listed else "")
                        + f"; {len(empty)} of {num_classes} classes are empty (the class count from {source})")
    splits, skipped = {}, {}
    for name, split in entries.items():
        records = [Record(os.path.join(root, rel), label, where) for rel, label, where in split]
        splits[name], skipped[name] = check_images(records, d.skip_bad_images, d.img_size,
                                                    resolve_num_workers(d.num_workers))
    if sum(skipped.values()):
        _logger.warning("skipped %d unreadable or missing images (%s)", sum(skipped.values()),
                        ", ".join(f"{k} {v}" for k, v in skipped.items()))
    train_counts = np.bincount([r.label for r in splits["train"]], minlength=num_classes)
    empty = np.flatnonzero(train_counts == 0)
    if empty.size:
        raise DataError(f"class {int(empty[0])} has no readable training images left in {train_path}")
    num_val_from_train = 0
    if "val" not in splits:
        labels = np.array([r.label for r in splits["train"]], dtype=np.int64)
        train_idx, val_idx = hold_out_val(labels, np.arange(len(labels)), num_classes, d.val_per_class,
                                          np.random.default_rng(seed))
        splits["val"] = [splits["train"][i] for i in val_idx]
        splits["train"] = [splits["train"][i] for i in train_idx]
        num_val_from_train = len(val_idx)
    train_tf, eval_tf = build_transforms(dataset, d, 3, None, uint8_train)
    targets = np.array([r.label for r in splits["train"]], dtype=np.int64)
    val = ImageListDataset(splits["val"], eval_tf)
    return LTData(
        dataset=dataset, num_classes=num_classes, in_chans=3,
        train=ImageListDataset(splits["train"], train_tf),
        train_eval=ImageListDataset(splits["train"], eval_tf),
        val=val,
        test=ImageListDataset(splits["test"], eval_tf) if "test" in splits else val,
        train_targets=targets,
        train_counts=np.bincount(targets, minlength=num_classes).tolist(),
        lt_counts=train_counts.tolist(),
        num_val_from_train=num_val_from_train,
    )


def build_data(data_cfg: DataConfig, seed: int, uint8_train: bool = False) -> LTData:
    """Build train / train-eval / val / test datasets from the recipe's `data` section; `seed` draws the held-out
    validation images. With `uint8_train` the training split yields uint8 images (a GPU run normalises them on the
    device, `train_normalize`); the other splits are always normalised floats."""
    dataset = data_cfg.dataset
    build = _build_in_memory if dataset_info(dataset).in_memory else _build_from_files
    data = build(data_cfg, seed, uint8_train)
    if uint8_train:
        norm = eval_data_config(dataset, data_cfg, data.in_chans)
        data.train_normalize = (norm["mean"], norm["std"])
    splits = class_splits(data.train_counts)
    _logger.info("%s: %d classes, %d train images (LT cut %d), %d val (%d from the training pool), %d test; "
                 "many/medium/few classes %d/%d/%d", dataset, data.num_classes, len(data.train), sum(data.lt_counts),
                 len(data.val), data.num_val_from_train, len(data.test), len(splits["many"]), len(splits["medium"]),
                 len(splits["few"]))
    return data
