"""Run by tests/test_distributed.py under torchrun: two steps of every registered ungrouped step (and GBG over fixed
groups) on this rank's half of each batch, parameters gathered from every rank."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_steps import run_two_steps  # noqa: E402

from lt_recipes.steps import list_steps, step_info  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    got = {}
    for name in [s for s in list_steps() if step_info(s).grouping != "memory"]:  # gsa: tests/test_distributed.py
        theta = run_two_steps(name, rank, world)
        gathered = [torch.zeros_like(theta) for _ in range(world)]
        dist.all_gather(gathered, theta)
        got[name] = gathered
    if rank == 0:
        torch.save(got, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
