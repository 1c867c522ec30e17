"""Shared test fixtures: small generated datasets in the real on-disk layouts (nothing is downloaded)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}
LIST_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
LIST_COUNTS = {"train": [5, 3, 2], "val": [1, 1, 1], "test": [2, 2, 2]}


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """An unsigned-byte idx file (the MNIST / Fashion-MNIST format), gzipped when the name ends in .gz."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)


def _id_rows(ids: np.ndarray) -> np.ndarray:
    rows = np.zeros((len(ids), 3072), dtype=np.uint8)
    rows[:, 0], rows[:, 1], rows[:, 2] = ids % 256, (ids // 256) % 256, ids // 65536
    return rows


@pytest.fixture(scope="session")
def write_cifar() -> Callable[..., np.ndarray]:
    """Factory: write a torchvision-layout CIFAR folder under `root`; returns the training labels in file order.

    Training image i is black except its first three bytes, which spell i in base 256 (i % 256, i // 256 % 256,
    i // 65536 in the red channel's first pixels), so tests can tell which pool image ended up where.
    """

    def write(root: Path, dataset: str, train_per_class: int, test_per_class: int, seed: int = 0) -> np.ndarray:
        folder, train_files, test_file, label_key, num_classes = CIFAR_LAYOUT[dataset]
        out = Path(root) / folder
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.repeat(np.arange(num_classes), train_per_class))
        for name, ids in zip(train_files, np.array_split(np.arange(len(labels)), len(train_files))):
            with open(out / name, "wb") as f:
                pickle.dump({"data": _id_rows(ids), label_key: labels[ids].tolist()}, f, protocol=4)
        test_labels = np.repeat(np.arange(num_classes), test_per_class)
        with open(out / test_file, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8),
                         label_key: test_labels.tolist()}, f, protocol=4)
        return labels

    return write


@pytest.fixture
def image_list_root(tmp_path: Path) -> Path:
    """A tiny list-file dataset: 3 classes of solid-colour images (LIST_COLOURS) of odd sizes, PNG and JPEG,
    in folders whose names hold a space; train.txt / val.txt / test.txt hold LIST_COUNTS images per class."""
    for split, per_class in LIST_COUNTS.items():
        lines = []
        for label, n in enumerate(per_class):
            folder = tmp_path / "images" / split / f"class {label}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                ext = "jpg" if k == 1 else "png"
                Image.new("RGB", (13 + k, 9 + label), LIST_COLOURS[label]).save(folder / f"{k}.{ext}", quality=95)
                lines.append(f"images/{split}/class {label}/{k}.{ext} {label}")
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def single_thread():
    """One torch thread for in-process training runs: tiny models on a shared CPU run many times faster than with
    competing intra-op threads (subprocess runs get OMP_NUM_THREADS=1 for the same reason)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous: a port derived from the pid is the same for every
    torchrun of one pytest process, and a test right after another could find it still held."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
