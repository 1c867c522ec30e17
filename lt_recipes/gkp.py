"""Grouped Knowledge Preservation (paper Eq. 5-6): the GKP term every step carries, Fisher estimates and the
per-group strengths.

Summed over the groups of Eq. 16 with group weights w_g, the penalty is sum_j c_j sum_i F_ji (theta_i - theta*_ji)^2
with c_j = (1 - alpha) (sum_{g != j} w_g) (lambda / 2) / |G_j|: `GKPTerm` holds the anchors, Fisher rows, strengths
and GKP's groups, forms c_j and evaluates the penalty with its gradient in one pass over theta, the anchors and the
Fisher rows (`lt_recipes.ops.gkp_penalty`); the step core (lt_recipes.steps.core) adds it to every step the same way.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from . import equations, ops
from .choices import GKP_NORMS
from .distributed import rank_and_world
from .flat import flat_view, pack
from .models import head_rule, ordered_parameters

_logger = logging.getLogger(__name__)


def gkp_strength(group_classes: Sequence[int], group_samples: Sequence[int], lam: float, norm: str,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(lambda / 2) / |G_j| of Eq. 6, |G_j| the group's training samples ("per_samples", the released code) or
    classes ("per_classes"): a float64 [G] for `set_gkp` (a step casts the coefficients it forms to its parameters'
    dtype), on `device` (the model's, for the fused GKP op; None: the CPU)."""
    if norm not in GKP_NORMS:
        raise ValueError(f"gkp_strength: norm must be one of {', '.join(GKP_NORMS)}, got {norm!r}")
    if len(group_classes) != len(group_samples):
        raise ValueError(f"gkp_strength: {len(group_classes)} groups of classes but {len(group_samples)} sample counts")
    sizes = group_samples if norm == "per_samples" else group_classes
    return torch.tensor([lam / 2 / max(int(s), 1) for s in sizes], dtype=torch.float64, device=device)


# The float types GKP's anchors and Fisher rows may be kept in (gkp.state_dtype); the penalty is formed in float32.
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gkp_state(anchors: torch.Tensor, fisher: torch.Tensor, strength: torch.Tensor, num_covered: int,
                    covered_dtype: torch.dtype) -> None:
    """A ValueError naming the expected shape or type when GKP's state does not fit a step: anchors and fisher
    [G, num_covered] (one row per group over the covered parameters, flattened in `named_parameters` order), each in
    the parameters' dtype or a STATE_DTYPES type; strength [G] floating (`gkp_strength`)."""
    for name, t in (("anchors", anchors), ("fisher", fisher), ("strength", strength)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"set_gkp: {name} must be a tensor, got {type(t).__name__}")
    G = anchors.shape[0] if anchors.dim() == 2 else None
    want = f"[G, {num_covered}] (a row per group over the {num_covered} covered parameter values, flattened in " \
           "named_parameters order: StepCore.covered is the current one)"
    for name, t in (("anchors", anchors), ("fisher", fisher)):
        if t.dim() != 2 or t.shape[1] != num_covered or t.shape[0] != (G or t.shape[0]):
            raise ValueError(f"set_gkp: {name} must be {want}, got {list(t.shape)}")
        if t.dtype not in (covered_dtype, *STATE_DTYPES):
            raise ValueError(f"set_gkp: {name} must be {covered_dtype} or one of {STATE_DTYPES} (gkp.state_dtype), "
                             f"got {t.dtype}")
    if strength.shape != (G,) or not strength.is_floating_point():
        raise ValueError(f"set_gkp: strength must be a floating [G] = [{G}] tensor (gkp_strength), got "
                         f"{strength.dtype} {list(strength.shape)}")


class GKPTerm:
    """GKP (Eq. 6) as one term: group j's anchor a_j and Fisher row F_j over a step's covered parameters ([G,
    num_covered] each, flattened in `named_parameters` order), its strength s_j = (lambda / 2) / |G_j| ([G],
    `gkp_strength`), and GKP's group of every class (None: the step's own groups, `StepCore.set_groups`). With
    `ema_decay` the Fisher rows are an EMA of the squared group gradients the step hands to `track` (gkp.fisher=ema).

    In an update whose task term weighs group g by w_g and the task gradient by alpha (Eq. 16), group j's penalty
    s_j sum_i F_ji (theta_i - a_ji)^2 is weighted (1 - alpha) sum_{g != j} w_g (`coefficients`); `penalty` evaluates
    the weighted sum with its gradient in one fused pass. Built by `StepCore.set_gkp`, which checks the shapes and
    dtypes (`check_gkp_state`) and moves the tensors to the parameters' device."""

    def __init__(self, anchors: torch.Tensor, fisher: torch.Tensor, strength: torch.Tensor,
                 group_of_class: torch.Tensor | None = None, ema_decay: float | None = None) -> None:
        self.anchors = anchors
        self.fisher = fisher
        self.strength = strength
        self.group_of_class = group_of_class
        self.ema_decay = ema_decay

    @property
    def num_groups(self) -> int:
        return self.anchors.shape[0]

    def coefficients(self, alpha: float, weights: torch.Tensor) -> torch.Tensor:
        """c_j = (1 - alpha) s_j sum_{g != j} w_g for the groups' weights `weights` in the update ([G], float64)."""
        return (1 - alpha) * self.strength * equations.gkp_weights(weights).to(self.strength.dtype)

    def track(self, rows: torch.Tensor, present: Sequence[int]) -> None:
        """The EMA Fisher's update (with `ema_decay` beta): F_g <- beta F_g + (1 - beta) g_g^2 for each group g in
        the batch, `rows` [G, num_covered] its group gradients over the covered parameters."""
        if self.ema_decay is None:
            return
        for g in present:
            self.fisher[g].mul_(self.ema_decay).addcmul_(rows[g], rows[g], value=1 - self.ema_decay)

    def penalty(self, theta: torch.Tensor, coef: torch.Tensor, grad_out: torch.Tensor, backend: str) -> torch.Tensor:
        """sum_j coef_j sum_i F_ji (theta_i - a_ji)^2 at the covered parameters `theta` (0-dim, on the device), its
        gradient added to `grad_out`; formed in theta's dtype (float64 for a float64 model)."""
        return ops.gkp_penalty(theta, self.anchors, self.fisher, coef.to(theta.dtype), grad_out=grad_out,
                               backend=backend)


@torch.no_grad()
def _set_vector(params: Sequence[torch.Tensor], vec: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.copy_(flat_view(vec[offset:offset + p.numel()], p))
        offset += p.numel()


def _batch_statistics(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every BatchNorm layer's batch mean and (biased) variance in one training-mode forward of `x`, as the running
    statistics buffers an evaluation-mode forward would need to normalise exactly as that forward did."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, name=name):
                a = inputs[0].detach().float()
                dims = [d for d in range(a.dim()) if d != 1]
                stats[f"{name}.running_mean"] = a.mean(dims)
                stats[f"{name}.running_var"] = a.var(dims, unbiased=False)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _squared_gradients(model: nn.Module, classification_losses: Callable, x: torch.Tensor, y: torch.Tensor,
                       names: Sequence[str], params: Sequence[torch.Tensor], estimate: str, chunk: int,
                       autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """[n] sum over one batch of squared gradients: of the batch-mean loss (`batch_mean`), or of every sample's own
    loss (`per_sample`, torch.func's vmap over the samples, `chunk` at a time, BatchNorm normalising with the batch's
    statistics held constant: with them a per-sample gradient is defined)."""
    if estimate == "batch_mean":
        with autocast():
            loss = classification_losses(model(x), y).float().mean()
        flat = pack(torch.autograd.grad(loss, params, allow_unused=True), params, torch.float32)
        return flat * flat
    state = {**dict(model.named_buffers()), **_batch_statistics(model, x)}
    state.update({n: p.detach() for n, p in model.named_parameters()})
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def loss_of(covered: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = functional_call(model, {**state, **covered}, (xi[None],))
        return classification_losses(out, yi[None]).float().sum()

    for m in bns:
        m.eval()
    try:
        grads = vmap(grad(loss_of), in_dims=(None, 0, 0), chunk_size=chunk)(
            {n: p.detach() for n, p in zip(names, params)}, x, y)
    finally:
        for m in bns:
            m.train()
    return pack([(grads[n].float() ** 2).sum(0) for n in names], params, torch.float32)


def estimate_fisher(model: nn.Module, *, dataset: Dataset, targets: Sequence[int] | np.ndarray,
                    group_of_class: Sequence[int] | np.ndarray, anchors: torch.Tensor,
                    classification_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    is_excluded: Callable[[str], bool] | None = None, batch_size: int = 256,
                    device: torch.device | None = None, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    max_batches: int = 0, estimate: str = "batch_mean", chunk: int = 0,
                    loader_kw: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Diagonal Fisher F_j [G, d_covered] float32 of every group at its anchor, over the covered (non-head)
    parameters (docs/method.md). Keyword arguments: `dataset` yields (image, label) with the test-time transform and
    `targets` is its label per sample; `group_of_class` the group id per class; `anchors` [G, d_covered] (e.g.
    `MemoryBank.anchors`); `classification_losses(logits, y)` the per-sample loss (default: cross-entropy);
    `is_excluded` the head rule (default: `models.head_rule(model)`, as the steps use); `device` (default: the
    parameters').

    For group j: theta*_j loaded into a copy of the model (classifier kept), group j's training images with the
    test-time transform in batches of `batch_size` (`gkp.fisher_batch_size`, which bounds the memory of a backward),
    N_j of them in all, read by one loader with the run's settings (`loader_kw`: workers, pinned memory) and computed
    on `device` under the run's `autocast`. `batch_mean` (the released code):
    F_j = sum over batches of (grad of the batch-mean classification loss)^2 / N_j, about 1/B of the squared
    per-sample gradient near a minimum. `per_sample` (EWC's): F_j = sum over images of (grad of that image's loss)^2
    / N_j, the per-sample gradients taken `chunk` at a time (0: as many as 2^26 numbers allow). Under DDP each rank
    takes every world-th of the batches one process forms and the sums are all-reduced: the same batches (and cap
    `max_batches`) for any process count, so every rank gets one process's Fisher up to summation order. Anchors
    are read and Fisher rows written in the order of a step's flat buffer (each parameter in its memory order,
    lt_recipes.flat.pack), the order of theta under `model.channels_last` too. BatchNorm
    layers normalise with batch statistics: the anchor is a mean of parameter snapshots with no running statistics of
    its own, and the current model's running statistics do not fit it (with them the Fisher reached 577 on
    Fashion-MNIST-LT and the GKP step diverged).
    """
    if estimate not in ("batch_mean", "per_sample"):
        raise ValueError(f"estimate must be batch_mean or per_sample, got {estimate!r}")
    classification_losses = classification_losses or functools.partial(F.cross_entropy, reduction="none")
    is_excluded = is_excluded or head_rule(model)
    device = device if device is not None else next(model.parameters()).device
    targets, group_of_class = np.asarray(targets), np.asarray(group_of_class)
    G, n_cov = anchors.shape
    work = copy.deepcopy(model).to(device).eval()
    for m in work.modules():  # the anchor has no running statistics of its own: normalise with batch statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    cov_params, _ = ordered_parameters(work, is_excluded)
    names = {id(p): n for n, p in work.named_parameters()}
    cov_names = [names[id(p)] for p in cov_params]
    chunk = chunk or max(1, 2 ** 26 // max(n_cov, 1))
    rank, world = rank_and_world()
    fisher = torch.zeros(G, n_cov, dtype=torch.float32, device=device)
    counts = torch.zeros(G, dtype=torch.float64, device=device)
    group_of_sample = group_of_class[targets]
    batches, owner, sizes = [], [], []  # every group's batches in one loader: its workers start once
    for j in range(G):
        idx = np.flatnonzero(group_of_sample == j)
        mine = [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
        mine = mine[:max_batches] if max_batches else mine
        sizes.append((sum(len(b) for b in mine), len(mine)))
        batches += mine[rank::world]
        owner += [j] * len(mine[rank::world])
    current = None
    for (x, y), j in zip(DataLoader(dataset, batch_sampler=batches, **(loader_kw or {})), owner):
        if j != current:
            _logger.info("fisher: group %d/%d at its anchor, %d images in %d batches", j + 1, G, *sizes[j])
            _set_vector(cov_params, anchors[j].to(device=device, dtype=torch.float32))
            current = j
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        fisher[j] += _squared_gradients(work, classification_losses, x, y, cov_names, cov_params, estimate, chunk,
                                        autocast)
        counts[j] += len(y)
    if world > 1:
        dist.all_reduce(fisher)
        dist.all_reduce(counts)
    fisher /= counts.clamp_min(1).to(fisher.dtype)[:, None]
    _logger.info("fisher (%s) over %s images per group; mean %s, max %s", estimate,
                 [int(c) for c in counts.tolist()], [f"{v:.3g}" for v in fisher.mean(1).tolist()],
                 [f"{v:.3g}" for v in fisher.amax(1).tolist()])
    return fisher
