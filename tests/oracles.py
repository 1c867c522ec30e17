"""Plain float64 versions of the paper's equations that only the tests use: the oracles the fast paths are checked
against (grouping.MemoryBank, gkp.estimate_fisher, the fused GKP op, the ImbSAM step as its authors run it). Written
the slow, literal way and independent of lt_recipes."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def feature_quality(features: torch.Tensor, labels: torch.Tensor, num_classes: int, beta: float = 0.5,
                    var_floor: float = 1e-12) -> torch.Tensor:
    """Q(c) = Dis(c) - beta * log Var(c) (supplement Eq. 17-19), a loop over classes, float64.

    mu_c: mean feature of class c; Dis(c) = min_{c' != c} ||mu_c - mu_c'||; Var(c) = mean ||a - mu_c||^2 over the
    class's held-out samples. Classes without samples get -inf; Var is floored at `var_floor`.
    """
    feats = features.double()
    mus = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
    var = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        a = feats[labels == c]
        if len(a) == 0:
            continue
        present[c] = True
        mus[c] = a.mean(0)
        var[c] = ((a - mus[c]) ** 2).sum(1).mean()
    q = torch.full((num_classes,), -math.inf, dtype=torch.float64)
    for c in range(num_classes):
        others = [o for o in range(num_classes) if o != c and present[o]]
        if not present[c] or not others:
            continue
        dis = min(torch.linalg.vector_norm(mus[c] - mus[o]).item() for o in others)
        q[c] = dis - beta * math.log(max(var[c].item(), var_floor))
    return q


def update_naive_bank(bank: list[torch.Tensor | None], best_q: torch.Tensor, q: torch.Tensor,
                      theta_enc: torch.Tensor) -> None:
    """Eq. 1, the naive per-class bank: if Q(theta_t, c) > Q(theta_mem^c, c) then theta_mem^c <- theta_t."""
    for c in range(len(bank)):
        if q[c] > best_q[c]:
            bank[c] = theta_enc.detach().clone()
            best_q[c] = q[c]


def group_anchors(class_vectors: torch.Tensor, assignment: Sequence[int], num_groups: int) -> torch.Tensor:
    """Eq. 3: theta*_g = mean over classes c in G_g of theta_mem^c."""
    assignment = torch.as_tensor(np.asarray(assignment))
    return torch.stack([class_vectors[assignment == g].double().mean(0) for g in range(num_groups)])


def gkp_group_loss(theta: torch.Tensor, anchors: torch.Tensor, fisher: torch.Tensor, group_sizes: torch.Tensor,
                   g: int, lam: float) -> torch.Tensor:
    """Eq. 6 for the step on group g: (lambda/2) sum_{j != g} (1/|G_j|) sum_i F_{j,i} (theta_i - theta*_{j,i})^2."""
    total = theta.new_zeros(())
    for j in range(anchors.shape[0]):
        if j != g:
            total = total + (fisher[j] * (theta - anchors[j]) ** 2).sum() / group_sizes[j]
    return lam / 2 * total


def fisher_diagonal(model: torch.nn.Module, loss_fn, batches, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Diagonal Fisher as the released code estimates it: sum over batches of (grad of batch-mean loss)^2 / N."""
    fisher = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    n = 0
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        for f, gr in zip(fisher, grads):
            if gr is not None:
                f += gr.double() ** 2
        n += len(y)
    return [f / max(n, 1) for f in fisher]


def total_objective(gsa_losses: Sequence[torch.Tensor], gkp_losses: Sequence[torch.Tensor], alpha: float,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 16: L = sum_g w_g [alpha L_gsa^g + (1 - alpha) L_gkp^g], w_g = 1 as printed or the given weights."""
    weights = [1.0] * len(gsa_losses) if weights is None else weights
    return sum(w * (alpha * a + (1 - alpha) * b) for w, a, b in zip(weights, gsa_losses, gkp_losses))


def imbsam_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tail_classes: Sequence[int], rho: float,
                lr: float, perturbed_bn: str) -> None:
    """One ImbSAM step on `model` in place (parameters and BatchNorm buffers), the way cool-xuan/Imbalanced_SAM's
    `forbackward` and `ImbSAM` run it with plain SGD, float64, cross-entropy, training mode:

    1. a whole-batch forward at theta (BatchNorm running statistics move); g_H = grad of sum_{i in H} l_i / B;
    2. eps = rho g_T / (||g_T|| + 1e-16), g_T = grad of 2 sum_{i in T} l_i / B (T: samples of tail classes);
    3. a whole-batch forward at theta + eps, g_T' = grad of 2 sum_{i in T} l_i / B there; with `perturbed_bn`
       "update" this forward moves the running statistics as the authors' does, with "frozen" they are put back;
    4. theta <- theta - lr (g_H + g_T').
    """
    params = [p for p in model.parameters() if p.requires_grad]
    B = len(y)
    tail = (y[:, None] == torch.as_tensor(list(tail_classes))[None, :]).any(1)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g_head = torch.autograd.grad(losses[~tail].sum() / B, params, retain_graph=True)
    g_tail = torch.autograd.grad(losses[tail].sum() / B * 2, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_tail)) + 1e-16
    eps = [rho * g / norm for g in g_tail]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    buffers = [b.clone() for b in model.buffers()]
    losses = F.cross_entropy(model(x), y, reduction="none")
    g_perturbed = torch.autograd.grad(losses[tail].sum() / B * 2, params)
    with torch.no_grad():
        if perturbed_bn == "frozen":
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        for p, e, gh, gt in zip(params, eps, g_head, g_perturbed):
            p.sub_(e).sub_(lr * (gh + gt))
