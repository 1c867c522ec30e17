"""The training order (`EpochSampler`, a pure function of seed and epoch), each draw's augmentation seed, and the
loaders of a run (`build_loaders`, `loader_options`): the worker count changes nothing but speed.

Every training draw carries its own seed, a function of (seed, epoch, draw), and its transform runs with Python's,
NumPy's and torch's CPU generators seeded from it (`sample_rng`): a sample is augmented the same in the main process
or in any worker, and the main process's own random streams are left as they were.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..errors import DataError

if TYPE_CHECKING:  # build imports resolve_num_workers from here
    from ..sections import DataConfig
    from .build import LTData


class EpochSampler(Sampler[int]):
    """Training order as a pure function of (seed, epoch), identical on every process.

    ``random``: a permutation of the dataset (repeated if ``num_samples`` exceeds it). ``class_balanced``: every
    draw picks a class uniformly, then one of its samples uniformly, with replacement. Accelerate shards the
    resulting batches across ranks, so the sampler itself never looks at the rank.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray, mode: str, seed: int, num_samples: int | None = None):
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.targets) == 0:
            raise DataError(f"EpochSampler needs a non-empty 1-d list of targets, got shape {self.targets.shape}")
        self.mode = mode
        self.seed = int(seed)
        self.num_samples = len(self.targets) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise DataError(f"EpochSampler num_samples={num_samples} must be >= 1")
        self.epoch = 0
        self._order = np.argsort(self.targets, kind="stable")
        _, self._starts, self._counts = np.unique(self.targets[self._order], return_index=True, return_counts=True)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        if epoch < 0:
            raise DataError(f"epoch={epoch} must be >= 0")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.targets)
        if self.mode == "random":
            rounds = -(-self.num_samples // n)
            idx = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:self.num_samples]
        else:
            cls = rng.integers(0, len(self._counts), self.num_samples)
            idx = self._order[self._starts[cls] + rng.integers(0, self._counts[cls])]
        return iter(idx.tolist())


# The most loader workers `auto` gives a process (timm's train.py default is 4-8 per GPU).
MAX_AUTO_WORKERS = 8
# The entropy word that keeps the augmentation seeds' stream apart from the training order's ([seed, epoch]).
_AUGMENT_STREAM = 1


class SeededEpochSampler(EpochSampler):
    """EpochSampler's draws as (index, augmentation seed) pairs, the seed a function of (seed, epoch, draw), so two
    draws of one image (class-balanced sampling) are augmented independently, and every process of a DDP run draws
    the seeds its shard of the batches carries."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        idx = list(super().__iter__())
        seeds = np.random.default_rng([self.seed, self.epoch, _AUGMENT_STREAM]).integers(0, 2**63 - 1, len(idx))
        return iter(zip(idx, seeds.tolist()))


@contextlib.contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded from `seed` inside (the transforms of torchvision and timm
    draw from them), and restored after in the main process; a loader worker's own streams serve nothing else, and
    saving NumPy's costs more than most transforms."""
    main = get_worker_info() is None
    states = (random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()) if main else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.default_generator.set_state(states[2])


class SeededSamples(Dataset):
    """A dataset read with (index, seed) pairs (`SeededEpochSampler`): sample `index`, transformed under
    `sample_rng(seed)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with sample_rng(seed):
            return self.dataset[index]


def resolve_num_workers(num_workers: int | str, env: Mapping[str, str] | None = None) -> int:
    """`data.num_workers` as a count: `auto` is this process's share of the CPU cores it may run on (the cores of
    os.sched_getaffinity over the processes of this node, LOCAL_WORLD_SIZE), at most MAX_AUTO_WORKERS."""
    if num_workers != "auto":
        return int(num_workers)
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_WORKERS, cores // local))


# what a loader worker's fd-sharing thread raises when the main process stopped in the middle of taking a batch
_PARENT_GONE = (ConnectionResetError, BrokenPipeError, EOFError)


def quiet_worker_init(worker_id: int) -> None:
    """A loader worker's start: the thread that hands batches' shared memory to the main process reports through
    sys.excepthook, and a connection error there only means the main process stopped mid-transfer (Ctrl-C, which
    ends the run with one line), so that one is not printed as a traceback after it."""
    hook = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, _PARENT_GONE):
            hook(kind, value, tb)

    sys.excepthook = excepthook


def loader_options(d: DataConfig, seed: int, device: torch.device | str | None = None) -> dict[str, Any]:
    """The DataLoader options every loader of a run shares: the resolved workers, kept alive across epochs; pinned
    memory when batches go to a GPU; a generator of the loader's own (its worker seeds are then not drawn from the
    training stream, which stays the same for any worker count)."""
    workers = resolve_num_workers(d.num_workers)
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": cuda,
            "generator": torch.Generator().manual_seed(seed), "worker_init_fn": quiet_worker_init if workers else None}


def build_loaders(data: LTData, d: DataConfig, seed: int,
                  device: torch.device | str | None = None) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (SeededEpochSampler drawing from `seed`), val and test loaders for batches bound to `device` (None: a
    GPU when there is one), not yet prepared by Accelerate."""
    train = DataLoader(SeededSamples(data.train), batch_size=d.batch_size, drop_last=False,
                       sampler=SeededEpochSampler(data.train_targets, d.sampler, seed),
                       **loader_options(d, seed, device))
    val = DataLoader(data.val, batch_size=d.eval_batch_size, shuffle=False, **loader_options(d, seed, device))
    test = DataLoader(data.test, batch_size=d.eval_batch_size, shuffle=False, **loader_options(d, seed, device))
    return train, val, test
