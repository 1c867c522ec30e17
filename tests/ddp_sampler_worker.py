"""Run by tests/test_distributed.py under torchrun: which sample positions each rank's prepared loader yields, and
what the engine's per-epoch reduction returns on each rank for rank-specific loss sums and image counts."""
import os
import sys

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from lt_recipes.data import EpochSampler
from lt_recipes.engine import reduce_sums


def main(out: str) -> None:
    acc = Accelerator(cpu=True)
    targets = np.repeat(np.arange(5), [40, 20, 10, 5, 3])
    sampler = EpochSampler(targets, "class_balanced", seed=7)
    loader = acc.prepare(DataLoader(TensorDataset(torch.arange(len(targets))), batch_size=6, sampler=sampler))
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen[epoch] = [batch[0].tolist() for batch in loader]
    seen["reduced"] = reduce_sums(acc, *((2.0, 1) if acc.process_index == 0 else (12.0, 3)))
    gathered = [None] * acc.num_processes
    torch.distributed.all_gather_object(gathered, seen)
    if acc.is_main_process:
        torch.save(gathered, out)
    torch.distributed.destroy_process_group()  # before exit: a live gloo group can abort a rank at teardown


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
