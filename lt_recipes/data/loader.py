"""The training order (`EpochSampler`, a pure function of seed and epoch) and the train / val / test loaders."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import DataError
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


def build_loaders(data: LTData, d: DataConfig, seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (EpochSampler drawing from `seed`), val and test loaders, not yet prepared by Accelerate."""
    common = {"num_workers": d.num_workers, "pin_memory": torch.cuda.is_available()}
    train = DataLoader(data.train, batch_size=d.batch_size, drop_last=False,
                       sampler=EpochSampler(data.train_targets, d.sampler, seed), **common)
    val = DataLoader(data.val, batch_size=d.eval_batch_size, shuffle=False, **common)
    test = DataLoader(data.test, batch_size=d.eval_batch_size, shuffle=False, **common)
    return train, val, test
