"""GBG (AAAI 2024, WickyLee1998/GBG_v1): class groups from gradient clustering, and MGDA weights over them per step.

Grouping, once from the initial weights: every class's mean per-sample gradient of the classification loss over its
training images (evaluation mode, the covered parameters: the encoder and its heads, not the classifier), cosine
affinity, normalised-cut spectral clustering into G groups (the grouping's own affinity and clustering,
lt_recipes.equations). Each step:

1. one forward; the gradient g_g of each present group's mean loss L_g (one backward per group into the rows of
   the flat buffer, summed over ranks);
2. MGDA (Sener & Koltun 2018) with the authors' `loss+` normalisation: u_g = g_g / (L_g ||g_g||) over the covered
   parameters, alpha = argmin over the simplex of ||sum_g alpha_g u_g||^2 (exact on the Gram matrix; the authors
   iterate towards it);
3. the update gradient sum_g alpha_g g_g, the gradient of sum_g alpha_g L_g.

A step waits for the device three times (lt_recipes.host_sync): for the batch's group counts (which groups get a
backward), for the Gram matrix MGDA solves on the host together with the group gradients' non-finite check, and for
the update's check.

L_g is the base's per-sample loss averaged over the group (the authors pair CE groups with BCL's contrastive term
outside the MGDA weights; here BCL's whole per-sample loss is grouped, as for every other base).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import equations
from ..grouping import order_head_first
from ..host_sync import on_host
from .core import LossFn, StepCore, StepStats, all_reduce_, upcast
from .registry import register_step

_logger = logging.getLogger(__name__)


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The point alpha of the simplex minimising alpha^T M alpha for a Gram matrix M: the min-norm element of the
    convex hull of the vectors behind M (MGDA). Exact, by enumerating the supports S of alpha: on each, the
    minimiser with sum alpha = 1 is M_S^+ 1 / (1^T M_S^+ 1); the best non-negative one wins (G is a handful)."""
    M = gram.double().cpu()
    n = M.shape[0]
    best, best_val = torch.full((n,), 1.0 / n, dtype=torch.float64), math.inf
    for mask in range(1, 2 ** n):
        S = [i for i in range(n) if mask >> i & 1]
        z = torch.linalg.pinv(M[S][:, S]) @ torch.ones(len(S), dtype=torch.float64)
        if not float(z.sum()) > 0:
            continue
        a_S = z / z.sum()
        if bool((a_S < -1e-12).any()):
            continue
        alpha = torch.zeros(n, dtype=torch.float64)
        alpha[S] = a_S.clamp_min(0)
        alpha /= alpha.sum()
        val = float(alpha @ M @ alpha)
        if val < best_val:
            best, best_val = alpha, val
    return best


def gradient_groups(model: nn.Module, classification_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    dataset: Dataset, targets: np.ndarray, num_classes: int, num_groups: int, covered: list[nn.Parameter],
                    batch_size: int, device: torch.device, autocast: Callable[[], ContextManager],
                    seed: int = 0) -> np.ndarray:
    """GBG's grouping: group id per class (head first) from the cosine affinity of the classes' mean per-sample
    gradients over the covered parameters, computed on `dataset` in evaluation mode."""
    was = model.training
    model.eval()
    sums = torch.zeros(num_classes, sum(p.numel() for p in covered), dtype=torch.float64)
    counts = np.bincount(targets, minlength=num_classes)
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            with autocast():
                losses = classification_losses(model(x), y).float()
            for c in torch.unique(y).tolist():
                g = torch.autograd.grad(losses[y == c].sum(), covered, retain_graph=True, allow_unused=True)
                sums[c] += torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).double().cpu()
                                      for t, p in zip(g, covered)])
    finally:
        model.train(was)
    means = sums / torch.from_numpy(np.maximum(counts, 1)).double()[:, None]
    if num_groups >= num_classes:
        labels = np.arange(num_classes)
    else:
        labels = equations.spectral_groups(equations.class_affinity(means), num_groups, seed)
    return order_head_first(labels, counts.tolist())


@register_step("gbg")
class GBG(StepCore):
    """GBG's step over installed groups (`set_groups`; the training loop forms them with `gradient_groups`).

    >>> step = GBG(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> step.set_groups(group_of_class, group_sizes)
    >>> stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    """

    rows_per_group = True

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, **kw: Any) -> None:
        super().__init__(model, base_optimizer, **kw)
        self.last_weights: list[float] = []

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One step on a batch with labels `targets`; `alpha` weighs the task gradient against GKP (Eq. 16)."""
        flat, stats = self.flat, StepStats()
        gid, local, counts = self.group_counts(targets)
        self._begin()
        with self.autocast():
            losses = upcast(loss_fn(torch.arange(len(targets), device=targets.device)))
        stats.group_loss, stats.loss = self._group_means(losses, gid, self.counts, True)
        flat.rows.zero_()
        self._group_rows(losses, gid, local, self.counts)
        rows = all_reduce_(flat.rows)
        if self.scaler.scale != 1.0:
            rows.div_(self.scaler.scale)
        present = [g for g, c in enumerate(counts) if c > 0]
        cov = rows[:, :self.num_covered]
        scale = torch.where(self.counts > 0, stats.group_loss, 1.0) * torch.linalg.vector_norm(cov, dim=1).double()
        unit = cov.double() / scale.clamp_min(1e-300)[:, None]
        # one transfer: the Gram matrix, and whether the group gradients are finite
        host = torch.cat([(unit @ unit.T).reshape(-1), torch.isfinite(rows).all().double().reshape(1)]).cpu()
        with on_host():
            if not host[-1] > 0:
                return self._skip(stats)
            G = self.num_groups
            weights = min_norm_weights(host[:-1].view(G, G)[present][:, present]).tolist()
        self.last_weights = [math.nan] * self.num_groups
        full = [0.0] * self.num_groups
        for w, g in zip(weights, present):
            self.last_weights[g] = full[g] = w
        flat.grad.addmv_(rows.T, torch.tensor(full, dtype=rows.dtype).to(rows.device, non_blocking=True))
        return self._finish(stats, alpha, self.batch_shares(targets), reduced=True)
