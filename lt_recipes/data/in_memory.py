"""Datasets read whole into uint8 arrays (N, C, H, W): scikit-learn's digits, Fashion-MNIST idx files, CIFAR pickles.

* ``digits``: scikit-learn's bundled ``load_digits`` (8x8, 1 channel, values 0..16 scaled to uint8).
* ``fmnist``: Fashion-MNIST idx files (``train-images-idx3-ubyte`` etc., gzipped or raw) under ``data.root``.
* ``cifar10`` / ``cifar100``: the python-pickle folders of torchvision's layout (``cifar-10-batches-py``,
  ``cifar-100-python``) under ``data.root``, read directly (no md5 check), so generated folders work too.

These are the built-in rows' readers (lt_recipes.data.table). The images stay uint8 tensors in `TensorImageDataset`;
the transforms convert them (lt_recipes.data.transforms).
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, DataNotFoundError
from .profile import class_sizes
from .table import dataset_info

# folder, training files, test files, label key of each CIFAR pickle folder
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 images (N, 1, 8, 8) and their labels; the caller carves the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64)


def _read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format: 0, 0, dtype code, ndim, big-endian int32 dims, data) of unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(dims) != ndim or len(raw) - header != math.prod(dims):
        raise DataError(f"{path}: idx header says shape {dims} but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_path(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataNotFoundError(f"{os.path.join(root, stem)}[.gz] not found (data.root={root!r})")


def read_fmnist(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training images (N, 1, 28, 28), labels, test images and labels from the idx files under `root`."""
    out = []
    for split in ("train", "t10k"):
        images_path = _idx_path(root, f"{split}-images-idx3-ubyte")
        labels_path = _idx_path(root, f"{split}-labels-idx1-ubyte")
        images, labels = _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) "
                            "do not hold N images of HxW and N labels")
        class_sizes(labels, dataset_info("fmnist").num_classes, labels_path)
        out += [images[:, None], labels]
    return out[0], out[1], out[2], out[3]


def _read_cifar_files(folder: str, files: list[str], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataNotFoundError(f"CIFAR file {path} not found (data.root must hold torchvision's layout)")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a CIFAR python pickle ({e})") from None
        for key in ("data", label_key):
            if not isinstance(entry, dict) or key not in entry:
                raise DataError(f"{path}: missing key '{key}' (expected a dict with 'data' and '{label_key}')")
        data = np.asarray(entry["data"], dtype=np.uint8)
        lab = np.asarray(entry[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(f"{path}: 'data' has shape {data.shape} and '{label_key}' {len(lab)} entries; "
                            "expected (N, 3072) and N")
        class_sizes(lab, num_classes, f"{path} '{label_key}'")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(root: str, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training images (N, 3, 32, 32), labels, test images and labels of cifar10 / cifar100 under `root`."""
    folder, train_files, test_files, label_key = CIFAR_LAYOUT[dataset]
    folder = os.path.join(root, folder)
    num_classes = dataset_info(dataset).num_classes
    train = _read_cifar_files(folder, train_files, label_key, num_classes)
    test = _read_cifar_files(folder, test_files, label_key, num_classes)
    return train[0], train[1], test[0], test[1]


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray, transform: Callable[[torch.Tensor], Any]):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), int(self.targets[index])
