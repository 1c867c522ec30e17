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


# Rough seconds of the suite's longest tests on the 2-core machine (from `--durations`), to start them first:
# pytest-xdist's worksteal hands each worker one contiguous share of the collection and steals from the queues' ends,
# so a long test collected last ran alone at the end of the suite. A missing or stale entry costs only balance.
LONG_TESTS = {
    "test_tool_smoke.py::test_device_check_smoke": 40,
    "test_cuda_compile.py::test_cuda_sources_compile_for_sm90": 33,
    "test_tool_smoke.py::test_main_sh[.venv]": 32,
    "test_tool_smoke.py::test_record_bench_smoke": 20,
    "test_engine.py::test_two_process_gkp_gsa_run_resumes_to_the_same_result": 20,
    "test_distributed.py::test_two_nodes_give_one_node_s_results_and_write_once": 17,
    "test_examples.py::test_own_loop_example_trains_gkp_gsa_and_a_peer": 14,
    "test_sections.py::test_fewer_groups_than_asked_are_said_once_and_read_everywhere": 13,
    "test_invariants.py::test_zero_strength_trains_the_base_model[bcl-share]": 11,
    "test_tool_smoke.py::test_run_grid_job": 10,
    "test_bounded_memory.py::test_gradient_grouping_memory_does_not_grow_with_classes_times_parameters": 9,
    "test_distributed.py::test_one_memory_bank_per_run_groups_anchors_and_fisher_as_one_process": 8,
    "test_paper_tables.py::test_paper_row_end_to_end_on_cifar_files": 7,
    "test_invariants.py::test_zero_strength_trains_the_base_model[ce-masked]": 6,
    "test_export.py::test_the_printed_load_code_works_in_a_fresh_interpreter": 6,
    "test_ops.py::test_fake_kernels_are_registered_without_the_extension": 5,
}


def _uses_module_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module-scoped fixture: moved away from its module's other tests, it would build the
    fixture once more."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one torch thread per worker: the workers already fill the cores, and intra-op threads
    competing with the other worker (and with whatever else runs on the machine) made in-process training tests
    several times slower (the `single_thread` fixture's reason, for every test)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, put LONG_TESTS at the head of the workers' shares, balanced longest first."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    seconds = {item: LONG_TESTS.get(item.nodeid.split("/")[-1], 0) for item in items}
    long = sorted((i for i in items if seconds[i] and not _uses_module_fixture(i)), key=seconds.get, reverse=True)
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for item in long:  # longest first, each to the share with the least so far
        min(heads, key=lambda head: sum(map(seconds.get, head))).append(item)
    moved = set(long)
    rest = [i for i in items if i not in moved]
    ordered = []
    for k, head in enumerate(heads):  # worksteal's first shares: worker k gets len(pending) // (workers - k) items
        size = (len(items) - len(ordered)) // (workers - k)
        take = max(0, size - len(head))
        ordered += head + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest
