"""What the processes of a multi-process or multi-node run exchange beyond DDP's gradients.

One memory bank per run: the main process (global rank 0) holds it and computes the grouping and the anchors, and
`broadcast_groups` hands both to every other process, so host memory for the bank is spent once per run, not once
per process. `check_data_root` (before any data is read) and `check_same_resume` (after --resume) name a node
without the data or without the checkpoint, with its rank and host, on every process, instead of one process
failing or starting over while the others wait for it.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data.table import dataset_info
from .errors import CheckpointError, DataNotFoundError

_logger = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process in the default process group; (0, 1) without one. The one place
    that asks torch.distributed; before the group exists the launcher's environment says it (cli.process_rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return rank_and_world()[1]


def process_name(rank: int) -> str:
    """`rank R (node N, host H)` of this process, the node as torchrun (GROUP_RANK) or slurm (SLURM_NODEID) numbers
    it, so a message says which machine a problem is on."""
    node = os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "?"))
    return f"rank {rank} (node {node}, host {socket.gethostname()})"


def check_data_root(data_cfg: dict[str, Any]) -> None:
    """Every process checks that the recipe's data root (the dataset's default when data.root is unset,
    lt_recipes.data.table) is a directory; one missing anywhere is an error on every process naming the path and the
    ranks and nodes without it. Nothing to check for a single process (the data layer names a missing root), for a
    dataset that reads no folder (digits) or without a root (the data layer says data.root is required)."""
    rank, world = rank_and_world()
    root = dataset_info(data_cfg.dataset).root(data_cfg.root)
    if world == 1 or root is None:
        return
    mine = (os.path.isdir(root), os.path.abspath(root), process_name(rank))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    missing = [f"{path} on {name}" for found, path, name in everyone if not found]
    if missing:
        raise DataNotFoundError(f"data.root={root!r} does not exist or is not a directory: " + "; ".join(missing)
                                + f" ({len(missing)} of {world} processes); every node needs the data at that path")


def check_same_resume(start_epoch: int, checkpoint: str) -> None:
    """After --resume every process must continue at the same epoch (0: it found no checkpoint); a node that reads
    another checkpoint, or none (an --output not shared by all nodes), is an error naming what each process found,
    instead of processes that train different epochs."""
    rank, world = rank_and_world()
    if world == 1:
        return
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (start_epoch, process_name(rank)))
    if len({epoch for epoch, _ in everyone}) > 1:
        found = "; ".join(f"{f'epoch {epoch - 1}' if epoch else 'none'} on {name}" for epoch, name in everyone)
        raise CheckpointError(f"--resume found different checkpoints at {checkpoint}: {found}; --output must be on "
                              "storage every node reads")


def broadcast_groups(labels: np.ndarray | None, anchors: torch.Tensor | None, num_classes: int, num_covered: int,
                     dtype: torch.dtype, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """The main process's group of every class and anchors [G, num_covered] (on `device`) on every process; the
    other processes pass None for both."""
    rank, world = rank_and_world()
    if world == 1:
        return labels, anchors
    group_of = torch.as_tensor(labels, dtype=torch.int64).to(device) if rank == 0 \
        else torch.empty(num_classes, dtype=torch.int64, device=device)
    dist.broadcast(group_of, src=0)
    if rank != 0:
        anchors = torch.empty(int(group_of.max()) + 1, num_covered, dtype=dtype, device=device)
    dist.broadcast(anchors, src=0)
    return group_of.cpu().numpy(), anchors


def gather_counts(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every process's `values` (the same length on all), in rank order, on every process."""
    mine = torch.tensor([list(values)], dtype=torch.int64, device=device)
    _, world = rank_and_world()
    if world == 1:
        return mine.tolist()
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return torch.cat(everyone).tolist()


def format_per_process(nbytes: Sequence[int]) -> str:
    """`rank 0 12.3 MB, ranks 1-7 none`: byte counts by rank, runs of equal values as one range."""
    parts, start = [], 0
    for r in range(1, len(nbytes) + 1):
        if r == len(nbytes) or nbytes[r] != nbytes[start]:
            ranks = f"rank {start}" if r - 1 == start else f"ranks {start}-{r - 1}"
            parts.append(f"{ranks} {nbytes[start] / 2**20:.1f} MB" if nbytes[start] else f"{ranks} none")
            start = r
    return ", ".join(parts)
