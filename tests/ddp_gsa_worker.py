"""Run by tests/test_distributed.py under torchrun: one synchronized GSA(+GKP) step on this rank's half of a batch."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_gsa import GROUP_OF_CLASS, GROUP_SIZES, Tiny, _batch, _theta  # noqa: E402

from lt_recipes.steps import GroupedSAM  # noqa: E402


def main(out: str, sync: bool, group_grads: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch(n=24)
    half = len(y) // world
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), scale="euclidean", z=0.5,
                     backend="reference", sync=sync, group_grads=group_grads)
    gsa.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    stats = gsa.step(lambda idx: F.cross_entropy(model(xs[idx]), ys[idx], reduction="none"), ys)
    theta = _theta(model)
    gathered = [torch.zeros_like(theta) for _ in range(world)]
    dist.all_gather(gathered, theta)
    if rank == 0:
        host = stats.host()
        torch.save({"theta": gathered, "group_loss": host.group_loss, "rho": host.rho}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "sync", sys.argv[3])
