"""The method's equations in plain PyTorch, one function per equation of the paper (Eq. 1-20; docs/method.md).

This module is the specification in code: it favours reading like the paper over speed, and the fast paths
(grouping.MemoryBank, gkp, gsa, and the fused ops in lt_recipes.ops) are tested against it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .choices import DIRECTIONS, SCALES, WEIGHTINGS

# ---- Memory-based grouping (Eq. 1-3, supplement Eq. 17-19) ---------------------------------------------------


def feature_quality(features: torch.Tensor, labels: torch.Tensor, num_classes: int, beta: float = 0.5,
                    var_floor: float = 1e-12) -> torch.Tensor:
    """Q(c) = Dis(c) - beta * log Var(c) (supplement Eq. 17-19), float64.

    mu_c: mean feature of class c; Dis(c) = min_{c' != c} ||mu_c - mu_c'||; Var(c) = mean ||a - mu_c||^2 over the
    class's held-out samples. Classes without samples get -inf (they never improve); Var is floored at `var_floor`
    so a class with one sample has a finite Q.
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


def class_affinity(class_vectors: torch.Tensor) -> np.ndarray:
    """Affinity of the released code: (cos(theta^a, theta^b) + 1) / 2 over flattened encoder vectors [C, d]."""
    v = class_vectors.double()
    n = torch.linalg.vector_norm(v, dim=1).clamp_min(1e-300)
    cos = (v @ v.T) / (n[:, None] * n[None, :])
    return ((cos.clamp(-1, 1) + 1) / 2).numpy()


def spectral_groups(affinity: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
    """Eq. 2: normalized-cut spectral clustering of the class affinity graph into `num_groups` groups."""
    from sklearn.cluster import SpectralClustering  # imported here: scikit-learn costs every process 2 s to import

    sc = SpectralClustering(n_clusters=num_groups, affinity="precomputed", random_state=seed)
    return sc.fit_predict(affinity)


def group_anchors(class_vectors: torch.Tensor, assignment: Sequence[int], num_groups: int) -> torch.Tensor:
    """Eq. 3: theta*_g = mean over classes c in G_g of theta_mem^c."""
    assignment = torch.as_tensor(np.asarray(assignment))
    return torch.stack([class_vectors[assignment == g].double().mean(0) for g in range(num_groups)])


# ---- GKP (Eq. 5-6) -------------------------------------------------------------------------------------------


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


# ---- GSA (Eq. 11-15) ----------------------------------------------------------------------------------------------


def global_gradient(group_grads: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
    """g = sum_g (|D_g| / |D|) g_g: the full-batch gradient of a mean loss from its group gradients."""
    w = group_counts.double() / group_counts.sum()
    return (w[:, None] * group_grads.double()).sum(0)


def project_out(g_g: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. 12: h_g = g_g - (<g_g, g> / ||g||^2) g (the head-dominated direction removed); g = 0 leaves g_g."""
    gg = torch.dot(g, g)
    if gg == 0:
        return g_g.clone()
    return g_g - torch.dot(g_g, g) / gg * g


# A group gradient whose residual after projection is below this fraction of its norm is parallel to g.
PARALLEL_TOL = 1e-6


def ascent_direction(direction: str, g_g: torch.Tensor, g: torch.Tensor, momentum: torch.Tensor | None = None,
                     sigma: float = 1.0, coef: float | None = None) -> torch.Tensor:
    """The ablation directions of paper Table 5 plus FriendlySAM: gsa (h_g), sam (g), gsa_proj (g_g - h_g), friendly.

    `coef` = <g_g, g> / ||g||^2 when the caller already has it (the fused projection computes it for every group).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'")
    if direction == "sam":
        return g.clone()
    if direction == "friendly":
        return g_g.clone() if momentum is None else g_g - sigma * momentum
    if coef is None:
        gg = torch.dot(g, g)
        coef = float(torch.dot(g_g, g) / gg) if gg > 0 else 0.0
    along = coef * g
    if direction == "gsa_proj":
        return along
    h = g_g - along
    # Our convention where the paper is silent: a group gradient parallel to g (always so for G = 1) has no
    # group-specific direction left, so the group ascends along g_g and GSA reduces to SAM.
    if torch.linalg.vector_norm(h) <= PARALLEL_TOL * torch.linalg.vector_norm(g_g):
        return g_g.clone()
    return h


def scaled_norm(scale: str, h: torch.Tensor, theta: torch.Tensor) -> float:
    """The norm Eq. 13-14 divide by: ||h_g|| (euclidean, as printed) or ||theta * h_g|| (adaptive, released code)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale '{scale}'")
    return float(torch.linalg.vector_norm(theta * h if scale == "adaptive" else h))


def gsa_radius(z: float, theta_norm: float, h_norm: float, d: int, n_g: int,
               clamp: Sequence[float] | None = None) -> float:
    """Eq. 13: rho*_g = Z sqrt(||theta|| / (2 ||h_g||)) d^(-1/4) (n_g - 1)^(-1/4); optional clamp of the released code.

    `h_norm` is `scaled_norm` of the chosen scale. n_g - 1 is floored at 1 so a one-sample group has a finite radius.
    """
    rho = z * math.sqrt(theta_norm / (2 * h_norm)) * d ** -0.25 * max(n_g - 1, 1) ** -0.25
    if clamp is not None:
        rho = min(max(rho, clamp[0]), clamp[1])
    return rho


def gsa_perturbation(scale: str, h: torch.Tensor, theta: torch.Tensor, rho: float) -> torch.Tensor:
    """Eq. 14: eps_g = sqrt(d) rho*_g h_g / ||h_g|| (euclidean: ||eps_g|| = sqrt(d) rho*_g), or the released code's
    adaptive form eps_g = sqrt(d) rho_g theta^2 h_g / ||theta h_g|| (||eps_g / |theta| || = sqrt(d) rho_g, ASAM-style).
    """
    norm = scaled_norm(scale, h, theta)
    if scale == "adaptive":
        return math.sqrt(h.numel()) * rho * theta * theta * h / norm
    return math.sqrt(h.numel()) * rho * h / norm


def gsa_regularizer(theta_norm: float, rho: float, n_g: int) -> float:
    """The optional Eq. 15 term (1 / (2 sqrt(n_g - 1))) ||theta|| / rho*_g (left out by the released code)."""
    return theta_norm / (2 * math.sqrt(max(n_g - 1, 1)) * rho)


# ---- Objective and schedule (Eq. 16, supplement Eq. 20) -------------------------------------------------------


def group_weights(weighting: str, counts: Sequence[float]) -> list[float]:
    """w_g of each group's terms in Eq. 16: "samples" |D_g| / |D| (the released code: the task term is the batch
    loss), "sum" 1 (Eq. 16 as printed), "mean" 1 / (number of groups present in the batch)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown group weighting '{weighting}'")
    total = sum(counts)
    present = sum(1 for c in counts if c > 0)
    if weighting == "samples":
        return [c / total if total else 0.0 for c in counts]
    if weighting == "sum":
        return [1.0] * len(counts)
    return [1.0 / present if c > 0 else 0.0 for c in counts]


def gkp_weights(weights: Sequence[float]) -> list[float]:
    """Summing Eq. 16's GKP terms over the step groups g weighs group j's penalty by sum_{g != j} w_g."""
    total = sum(weights)
    return [total - w for w in weights]


def averaged_perturbation(eps: torch.Tensor, counts: Sequence[float]) -> torch.Tensor:
    """The released code's single perturbation: eps_bar = sum_g |D_g| eps_g / |D| over the groups in the batch."""
    w = torch.tensor([float(c) for c in counts], dtype=eps.dtype, device=eps.device)
    return (w[:, None] * eps).sum(0) / w.sum()


def alpha_schedule(t: float, total: float, start: float = 0.95, end: float = 0.6) -> float:
    """Supplement Eq. 20: alpha(t) = end + 0.5 (start - end) (1 + cos(pi t / T))."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / total))


def total_objective(gsa_losses: Sequence[torch.Tensor], gkp_losses: Sequence[torch.Tensor], alpha: float,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 16: L = sum_g w_g [alpha L_gsa^g + (1 - alpha) L_gkp^g], w_g = 1 as printed or `group_weights`."""
    weights = [1.0] * len(gsa_losses) if weights is None else weights
    return sum(w * (alpha * a + (1 - alpha) * b) for w, a, b in zip(weights, gsa_losses, gkp_losses))
