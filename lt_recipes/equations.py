"""The method's equations that training runs, one function per equation of the paper (Eq. 1-20; docs/method.md).

Each reads like the paper; the step classes and the grouping call them. tests/oracles.py holds the plain float64
versions of the rest (the naive bank, the anchors, Eq. 6, the Fisher, Eq. 16) that the fast paths are tested against.
The recipe schema validates every option name once, so the functions here trust the names they are given; they
take explicit arguments, with literal defaults equal to the schema's (tests/test_sections.py compares them).
The GSA equations take and return tensors where the step computes them (norms, radii, weights), so a step never
reads a value back from the device to decide on it; they accept Python floats too.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


# ---- Memory-based grouping (Eq. 2, supplement Eq. 17-19) -----------------------------------------------------


def feature_quality(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    beta: float = 0.5, var_floor: float = 1e-12) -> torch.Tensor:
    """Q(c) = Dis(c) - beta * log Var(c) (supplement Eq. 17-19), vectorised, float64 on the CPU.

    mu_c: mean feature of class c; Dis(c) = min_{c' != c} ||mu_c - mu_c'||; Var(c) = mean ||a - mu_c||^2 over the
    class's held-out samples. Classes without samples (or without another present class) get -inf, so they never
    improve; Var is floored at `var_floor` so a class with one sample has a finite Q.
    """
    feats, labels = features.double().cpu(), labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats)
    present = counts > 0
    mus = sums / counts.clamp_min(1)[:, None]
    sq = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, ((feats - mus[labels]) ** 2).sum(1))
    var = (sq / counts.clamp_min(1)).clamp_min(var_floor)
    dist = torch.cdist(mus, mus)
    dist.fill_diagonal_(math.inf)
    dist[:, ~present] = math.inf
    q = dist.min(1).values - beta * torch.log(var)
    q[~present | torch.isinf(dist.min(1).values)] = -math.inf
    return q


def class_affinity(class_vectors: torch.Tensor) -> np.ndarray:
    """Affinity of the released code: (cos(theta^a, theta^b) + 1) / 2 over flattened encoder vectors [C, d]."""
    v = class_vectors.double()
    n = torch.linalg.vector_norm(v, dim=1).clamp_min(1e-300)
    cos = (v @ v.T) / (n[:, None] * n[None, :])
    return ((cos.clamp(-1, 1) + 1) / 2).numpy()


def gram_affinity(gram: torch.Tensor) -> np.ndarray:
    """`class_affinity` of the vectors behind a Gram matrix [C, C]: the cosines need only its entries and the norms
    on its diagonal, so the vectors themselves need never be held together."""
    g = gram.double()
    n = g.diagonal().clamp_min(0).sqrt().clamp_min(1e-300)
    cos = g / (n[:, None] * n[None, :])
    return ((cos.clamp(-1, 1) + 1) / 2).cpu().numpy()


def spectral_groups(affinity: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
    """Eq. 2: normalized-cut spectral clustering of the class affinity graph into `num_groups` groups."""
    from sklearn.cluster import SpectralClustering  # imported here: scikit-learn costs every process 2 s to import

    sc = SpectralClustering(n_clusters=num_groups, affinity="precomputed", random_state=seed)
    return sc.fit_predict(affinity)


# ---- GSA (Eq. 11-15) ----------------------------------------------------------------------------------------------

# A group gradient whose residual after projection is below this fraction of its norm is parallel to g.
PARALLEL_TOL = 1e-6


def ascent_direction(direction: str, g_g: torch.Tensor, g: torch.Tensor, momentum: torch.Tensor | None = None,
                     sigma: float = 1.0, coef: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 12 and the ablation directions of paper Table 5 plus FriendlySAM: gsa (h_g = g_g - (<g_g, g> / ||g||^2) g),
    sam (g), gsa_proj (g_g - h_g), friendly (g_g - sigma m).

    `coef` = <g_g, g> / ||g||^2 when the caller already has it (the fused projection computes it for every group).
    """
    if direction == "sam":
        return g.clone()
    if direction == "friendly":
        return g_g.clone() if momentum is None else g_g - sigma * momentum
    if coef is None:
        gg = torch.dot(g, g)
        coef = torch.where(gg > 0, torch.dot(g_g, g) / gg, 0.0)
    along = coef * g
    if direction == "gsa_proj":
        return along
    h = g_g - along
    # Our convention where the paper is silent: a group gradient parallel to g (always so for G = 1) has no
    # group-specific direction left, so the group ascends along g_g and GSA reduces to SAM.
    parallel = torch.linalg.vector_norm(h) <= PARALLEL_TOL * torch.linalg.vector_norm(g_g)
    return torch.where(parallel, g_g, h)


def scaled_norm(scale: str, h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The norm Eq. 13-14 divide by: ||h_g|| (euclidean, as printed) or ||theta * h_g|| (adaptive, released code)."""
    return torch.linalg.vector_norm(theta * h if scale == "adaptive" else h)


Scalar = torch.Tensor | float


def gsa_radius(z: float, theta_norm: Scalar, h_norm: Scalar, d: int, n_g: int,
               clamp: Sequence[float] | None = None) -> Scalar:
    """Eq. 13: rho*_g = Z sqrt(||theta|| / (2 ||h_g||)) d^(-1/4) (n_g - 1)^(-1/4); optional clamp of the released code.

    `h_norm` is `scaled_norm` of the chosen scale. n_g - 1 is floored at 1 so a one-sample group has a finite radius.
    Tensor norms give a tensor radius (computed on their device).
    """
    rho = z * (theta_norm / (2 * h_norm)) ** 0.5 * d ** -0.25 * max(n_g - 1, 1) ** -0.25
    if clamp is not None:
        rho = rho.clamp(clamp[0], clamp[1]) if isinstance(rho, torch.Tensor) else min(max(rho, clamp[0]), clamp[1])
    return rho


def gsa_perturbation(scale: str, h: torch.Tensor, theta: torch.Tensor, rho: Scalar,
                     norm: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 14: eps_g = sqrt(d) rho*_g h_g / ||h_g|| (euclidean: ||eps_g|| = sqrt(d) rho*_g), or the released code's
    adaptive form eps_g = sqrt(d) rho_g theta^2 h_g / ||theta h_g|| (||eps_g / |theta| || = sqrt(d) rho_g, ASAM-style).
    `norm`: the `scaled_norm` the caller already has (it is computed once per group).
    """
    norm = scaled_norm(scale, h, theta) if norm is None else norm
    if scale == "adaptive":
        return (math.sqrt(h.numel()) * rho / norm) * theta * theta * h
    return (math.sqrt(h.numel()) * rho / norm) * h


def gsa_regularizer(theta_norm: Scalar, rho: Scalar, n_g: int) -> Scalar:
    """The optional Eq. 15 term (1 / (2 sqrt(n_g - 1))) ||theta|| / rho*_g (left out by the released code)."""
    return theta_norm / (2 * math.sqrt(max(n_g - 1, 1)) * rho)


def averaged_perturbation(eps: torch.Tensor, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The released code's single perturbation: eps_bar = sum_g |D_g| eps_g / |D| over the groups in the batch."""
    w = torch.as_tensor(counts, dtype=eps.dtype).to(eps.device)
    return (w[:, None] * eps).sum(0) / w.sum()


# ---- Objective weights and schedule (Eq. 16, supplement Eq. 20) ---------------------------------------------


def group_weights(weighting: str, counts: torch.Tensor | Sequence[float]) -> torch.Tensor | list[float]:
    """w_g of each group's terms in Eq. 16: "samples" |D_g| / |D| (the released code: the task term is the batch
    loss), "sum" 1 (Eq. 16 as printed), "mean" 1 / (number of groups present in the batch). Counts on the device
    give weights there (float64); a list gives a list."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if weighting == "samples":
        w = n / n.sum().clamp_min(1.0)
    elif weighting == "sum":
        w = torch.ones_like(n)
    else:
        present = (n > 0).double()
        w = present / present.sum().clamp_min(1.0)
    return w if isinstance(counts, torch.Tensor) else w.tolist()


def gkp_weights(weights: torch.Tensor | Sequence[float]) -> torch.Tensor | list[float]:
    """Summing Eq. 16's GKP terms over the step groups g weighs group j's penalty by sum_{g != j} w_g."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    over = w.sum() - w
    return over if isinstance(weights, torch.Tensor) else over.tolist()


def alpha_schedule(t: float, total: float, start: float, end: float) -> float:
    """Supplement Eq. 20: alpha(t) = end + 0.5 (start - end) (1 + cos(pi t / T)), decaying from start to end."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / total))
