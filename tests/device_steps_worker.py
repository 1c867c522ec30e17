"""Run by tools/device_check.sh under torchrun: two steps of every registered step on the device (`cuda` or `cpu`), in
a process group of that device's backend (nccl for cuda, gloo for cpu), with GKP set up as the README's own loop does
(anchors, Fisher rows and strengths made on the CPU). Every `all_reduce_` of the steps goes through the backend's
collective even with one process (a sum over one rank leaves the step's numbers as they are), so a tensor a step
makes on the wrong device meets NCCL's refusal here. Prints one line per step; exits non-zero on the first failure."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lt_recipes.steps.core as core
from lt_recipes.gkp import gkp_strength
from lt_recipes.steps import create_step, list_steps, step_class, step_info

COUNTS = [40, 20, 10, 6, 3, 2]  # training samples per class
GROUP_OF_CLASS, GROUP_SIZES = [0, 0, 1, 1, 2, 2], [60, 16, 5]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, len(COUNTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def _collective(device: torch.device):
    def all_reduce_(t: torch.Tensor) -> torch.Tensor:
        if t.device != device:  # NCCL would refuse it with a less helpful message
            raise SystemExit(f"a step handed all_reduce_ a tensor on {t.device}; its parameters are on {device}")
        dist.all_reduce(t)
        return t
    return all_reduce_


def main(device_type: str) -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank()
    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for name in list_steps():
        step_class(name)  # import every step module, then route their all_reduce_ through the collective
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("lt_recipes") and \
                getattr(module, "all_reduce_", None) is core.all_reduce_:
            module.all_reduce_ = _collective(device)
    for name in list_steps():
        torch.manual_seed(0)
        model = Net().to(device)
        kw = {k: {"class_counts": COUNTS, "head_losses": None}[k] for k in step_info(name).uses}
        step = create_step(name, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kw)
        step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
        n = step.num_covered
        g = torch.Generator().manual_seed(1)
        anchors = torch.stack([torch.cat([p.detach().reshape(-1).cpu() for p in model.body.parameters()])] * 3)
        step.set_gkp(anchors + 0.01 * torch.randn(3, n, generator=g), torch.rand(3, n, generator=g),
                     gkp_strength([2, 2, 2], GROUP_SIZES, lam=1.0, norm="per_samples"), GROUP_OF_CLASS)
        start = time.perf_counter()
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed + 10 * rank)
            x = torch.randn(24, 3, 8, 8, generator=gen).to(device)
            y = torch.randint(0, len(COUNTS), (24,), generator=gen).to(device)
            stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y, alpha=0.8)
        if device.type == "cuda":
            torch.cuda.synchronize()
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if not (bool(torch.isfinite(weights).all()) and torch.isfinite(torch.tensor(stats.loss))):
            raise SystemExit(f"{name}: non-finite weights or loss after two steps on {device}")
        if rank == 0:
            print(f"{name}: two steps on {device} ({dist.get_backend()}, {dist.get_world_size()} process(es)) in "
                  f"{time.perf_counter() - start:.2f}s, loss {stats.loss:.4f}, gkp {stats.gkp:.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
