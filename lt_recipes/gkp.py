"""Grouped Knowledge Preservation (paper Eq. 5-6): Fisher estimates and the per-group strengths.

Summed over the groups of Eq. 16 with group weights w_g, the penalty is sum_j c_j sum_i F_ji (theta_i - theta*_ji)^2
with c_j = (1 - alpha) (sum_{g != j} w_g) (lambda / 2) / |G_j|, which `lt_recipes.ops.gkp_penalty` evaluates with
its gradient in one pass over theta, the anchors and the Fisher rows (`GroupedSAM` forms c_j every step).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .choices import GKP_NORMS
from .gsa import ordered_parameters

_logger = logging.getLogger(__name__)


def gkp_strength(group_classes: Sequence[int], group_samples: Sequence[int], lam: float, norm: str) -> torch.Tensor:
    """(lambda / 2) / |G_j| of Eq. 6, |G_j| the group's training samples ("per_samples", the released code) or
    classes ("per_classes")."""
    if norm not in GKP_NORMS:
        raise ValueError(f"gkp norm must be one of {', '.join(GKP_NORMS)}, got '{norm}'")
    sizes = group_samples if norm == "per_samples" else group_classes
    return torch.tensor([lam / 2 / max(int(s), 1) for s in sizes], dtype=torch.float32)


@torch.no_grad()
def _set_vector(params: Sequence[torch.Tensor], vec: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.copy_(vec[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def exact_fisher(model: nn.Module, classification_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 dataset: Dataset, targets: np.ndarray, group_of_class: np.ndarray, anchors: torch.Tensor,
                 is_excluded: Callable[[str], bool], batch_size: int, device: torch.device,
                 autocast: Callable[[], ContextManager], max_batches: int = 0) -> torch.Tensor:
    """Diagonal Fisher per group as the released code estimates it (docs/method.md).

    For group j: theta*_j loaded into a copy of the model (classifier kept), eval mode, group j's training images with
    the test-time transform, F_j = sum over batches of (grad of the batch-mean classification loss)^2 / N_j, over the
    covered (non-classifier) parameters. Under DDP each rank takes a shard of the images and the sums are all-reduced.
    One departure: BatchNorm layers normalise with batch statistics. The anchor is a mean of parameter snapshots
    with no running statistics of its own, and the current model's running statistics do not fit it: with them the
    Fisher reached 577 on Fashion-MNIST-LT and the GKP step diverged.
    """
    G, n_cov = anchors.shape
    work = copy.deepcopy(model).to(device).eval()
    for m in work.modules():  # the anchor has no running statistics of its own: normalise with batch statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    cov_params, _ = ordered_parameters(work, is_excluded)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    fisher = torch.zeros(G, n_cov, dtype=torch.float32, device=device)
    counts = torch.zeros(G, dtype=torch.float64, device=device)
    group_of_sample = group_of_class[targets]
    for j in range(G):
        _set_vector(cov_params, anchors[j].to(device=device, dtype=torch.float32))
        idx = np.flatnonzero(group_of_sample == j)[rank::world]
        loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False)
        for b, (x, y) in enumerate(loader):
            if max_batches and b >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            with autocast():
                loss = classification_loss(work(x), y)
            grads = torch.autograd.grad(loss.float(), cov_params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                              for g, p in zip(grads, cov_params)])
            fisher[j].addcmul_(flat, flat)
            counts[j] += len(y)
    if world > 1:
        dist.all_reduce(fisher)
        dist.all_reduce(counts)
    fisher /= counts.clamp_min(1).to(fisher.dtype)[:, None]
    _logger.info("fisher: exact estimate over %s images per group; mean %s, max %s",
                 [int(c) for c in counts.tolist()], [f"{v:.3g}" for v in fisher.mean(1).tolist()],
                 [f"{v:.3g}" for v in fisher.amax(1).tolist()])
    return fisher
