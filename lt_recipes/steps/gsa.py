"""The paper's grouped step (GSA, Eq. 11-16; GKP is the step core's term), on the step core (lt_recipes.steps.core).

Group gradients land in rows of a [G, d] buffer of the core's flat parameters. One `GroupedSAM.step`
(docs/method.md):

1. Group gradients g_g (Eq. 11) from one whole-batch forward at theta, which makes the step's one BatchNorm
   running-statistics update: `masked` differentiates each group's masked share of the batch loss through that one
   graph (G backward passes: the gradient of L_{D_g} with whole-batch BatchNorm, exact); `share` splits the one
   batch gradient by group with zero per-group parameter offsets (lt_recipes.segments; one backward).
2. The global gradient g = sum_g (|D_g| / |D|) g_g and each group's component along it (fused op), the ascent
   direction (Eq. 12), radius (Eq. 13) and perturbation eps_g (Eq. 14), Euclidean as printed or adaptive as the
   released code. With `group_grad_ema` the directions come from a per-group EMA of the group gradients.
3. The perturbed group losses (Eq. 15), weighted as in Eq. 16: `per_group_exact` (the default) runs one
   whole-batch forward per group at theta + eps_g with the loss masked to the group; `per_group` one forward over
   the group-sorted batch in which group g's samples see theta + eps_g (one pass, but with BatchNorm every group is
   normalised by the mixed perturbed batch, and on the 64-epoch grid some groups' losses fell); `averaged` one
   whole-batch pass at the batch-share mean of the eps_g (the released code's pass; refused for the h_g directions,
   whose batch-share mean is exactly zero). BatchNorm normalises the whole batch; its running statistics are left alone.
4. theta restored, the task gradient weighted alpha and the GKP gradient (Eq. 6) added in one fused pass by the
   core, the base optimizer's step.

Every step records, per group, the rise of its loss in the perturbed pass over its loss at theta (`ascent`): the
defining property of a sharpness-aware step is that it is positive for every group.

A step waits for the device three times (lt_recipes.host_sync): for the batch's group counts (which groups get a
backward and a perturbed pass, and how a share or offset pass cuts the sorted batch), for the group gradients'
non-finite check (a non-finite row would perturb every parameter with NaN), and for the update's (the core's). The
directions, radii and perturbations, GKP and the statistics stay on the device.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from .. import equations, ops
from ..batchnorm import frozen_bn_stats
from ..sections import GSAConfig
from ..segments import Layout, group_offsets, offset_modules
from .batched import BatchedPasses
from .core import LossFn, StepCore, StepStats, all_reduce_, upcast, usable, world_size
from .registry import register_step

_logger = logging.getLogger(__name__)


def _cosine(coef: torch.Tensor, res_norm: torch.Tensor, glob_norm: torch.Tensor) -> torch.Tensor:
    """cos(g_g, g) of every group from the projection coefficients and residuals: ||g_g||^2 = res^2 + coef^2 ||g||^2."""
    along = coef * glob_norm
    norm = (res_norm ** 2 + along ** 2).sqrt()
    return torch.where(norm > 0, along / norm, 0.0)


@register_step("gsa")
class GroupedSAM(StepCore):
    """The paper's grouped step (GSA with optional GKP), usable from any training loop.

    >>> gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> gsa.set_groups(group_of_class, group_sizes)          # group id per class, training samples per group
    >>> stats = gsa.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)

    Options (docs/method.md): `direction` gsa (h_g, Eq. 12) | sam (g) | gsa_proj (the removed component) | friendly
    (g_g - sigma m_g, m_g an EMA of past group gradients); `scale` adaptive | euclidean, with radius scale `z` (None:
    the scale's own) and clamp `rho_clamp` ("auto": the scale's own, GSAConfig.SCALE_DEFAULTS; None: no clamp);
    `group_grads` masked | share; `perturbation` per_group_exact | per_group | averaged (not with direction gsa); `group_weighting` samples (each
    group's share of the batch, the released code) | sum (Eq. 16 as printed) | mean; `group_grad_ema` > 0 takes the
    directions from an EMA of each group's gradients across steps (decay `group_grad_ema`). With `sync` (default)
    group gradients and counts are all-reduced so every rank takes the same perturbation; without it each replica
    perturbs from its own samples. GKP, when installed with `set_gkp`, is added by the core. The options, their
    defaults and their checks are the recipe section `gsa` (lt_recipes.sections.GSAConfig). `batched` runs the
    per_group_exact passes as one vmapped pass, `batch_chunk` parameter sets at a time (lt_recipes.steps.batched).
    """

    rows_per_group = True

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 direction: str = GSAConfig.direction, scale: str = GSAConfig.scale, z: float | None = GSAConfig.z,
                 rho_clamp: Sequence[float] | str | None = GSAConfig.rho_clamp,
                 group_grads: str = GSAConfig.group_grads, perturbation: str = GSAConfig.perturbation,
                 group_weighting: str = GSAConfig.group_weighting, regularizer: bool = GSAConfig.regularizer,
                 friendly_sigma: float = GSAConfig.friendly_sigma,
                 friendly_momentum: float = GSAConfig.friendly_momentum,
                 group_grad_ema: float = GSAConfig.group_grad_ema, sync: bool = GSAConfig.sync,
                 batched: bool = GSAConfig.batched, batch_chunk: int | None = GSAConfig.batch_chunk,
                 **kw: Any) -> None:
        GSAConfig(direction=direction, scale=scale, z=z, rho_clamp=rho_clamp, group_grads=group_grads,
                  perturbation=perturbation, group_weighting=group_weighting, regularizer=regularizer,
                  friendly_sigma=friendly_sigma, friendly_momentum=friendly_momentum, group_grad_ema=group_grad_ema,
                  sync=sync, batched=batched, batch_chunk=batch_chunk)
        super().__init__(model, base_optimizer, **kw)
        self.direction = direction
        self.scale = scale
        self.z, self.rho_clamp = GSAConfig.radius(scale, z, rho_clamp)
        self.group_grads = group_grads
        self.perturbation = perturbation
        self.group_weighting = group_weighting
        self.regularizer = regularizer
        self.friendly_sigma = friendly_sigma
        self.friendly_momentum = friendly_momentum
        self.group_grad_ema = group_grad_ema
        self.sync = sync
        self.seg_modules, _ = offset_modules(model, self.flat.params)
        self.batched = BatchedPasses(model, self.flat.params, self.flat.strides, batch_chunk) if batched else None
        self.momentum: torch.Tensor | None = None
        self.momentum_set: list[bool] = []
        self.grad_ema: torch.Tensor | None = None
        self.grad_ema_set: list[bool] = []
        self.glob = torch.empty_like(self.flat.data)
        self._offsets()

    def _offsets(self) -> None:
        """Per-parameter [G, ...] views of the rows buffer: the perturbed pass's offsets, and the gradients of the
        zero offsets E of a share pass (stride-0 leaves, so E costs no memory)."""
        flat, G = self.flat, self.num_groups
        rows = flat.rows
        self.row_views: dict[int, torch.Tensor] = {}
        self.zero_offsets: dict[int, torch.Tensor] = {}
        for p, off, stride in zip(flat.params, flat.offsets, flat.strides):
            view = rows.as_strided((G, *p.shape), (flat.numel, *stride), rows.storage_offset() + off)
            self.row_views[id(p)] = view
            zero = torch.zeros((), dtype=p.dtype, device=p.device).expand(G, *p.shape).detach().requires_grad_()
            zero.grad = view
            self.zero_offsets[id(p)] = zero

    @property
    def retains_graph(self) -> bool:
        """`masked` group gradients: one backward per group through the one forward."""
        return self.group_grads == "masked"

    def compile_refusal(self, backend: str) -> str | None:
        """The one-pass modes (`share`, `per_group`) recompile on every batch: the compiled forward is specialised to
        the batch's group segments, which change from batch to batch."""
        one_pass = [f"gsa.{k}={v}" for k, v in (("group_grads", self.group_grads),
                                                 ("perturbation", self.perturbation)) if v in ("share", "per_group")]
        if one_pass:
            return (f"with {' and '.join(one_pass)} its one-pass forward is specialised to each batch's group "
                    "segments and recompiles on every batch")
        return super().compile_refusal(backend)

    def set_groups(self, group_of_class: Sequence[int] | torch.Tensor, group_sizes: Sequence[int]) -> None:
        """Install a grouping: group id of every class and the number of training samples n_g of every group.
        FriendlySAM momenta and the group-gradient EMA start afresh (a new grouping names new groups)."""
        super().set_groups(group_of_class, group_sizes)
        self._offsets()
        if self.direction == "friendly":
            self.momentum = self.flat.data.new_zeros(self.num_groups, self.d)
            self.momentum_set = [False] * self.num_groups
        if self.group_grad_ema > 0:
            self.grad_ema = self.flat.data.new_zeros(self.num_groups, self.d)
            self.grad_ema_set = [False] * self.num_groups

    # ---- the step --------------------------------------------------------------------------------------------
    def _group_gradients(self, loss_fn: LossFn, gid: torch.Tensor, local: list[int], counts: list[float],
                         stats: StepStats) -> None:
        """Pass 1: the group gradients g_g into the rows (unscaled, reduced over ranks with `sync`)."""
        everyone = torch.arange(len(gid), device=gid.device)
        self.flat.rows.zero_()
        if self.group_grads == "masked":
            self._masked_group_grads(loss_fn, gid, everyone, local, stats)
        else:
            self._shared_group_grads(loss_fn, gid, local, counts, stats)
        if self.scaler.scale != 1.0:
            self.flat.rows.div_(self.scaler.scale)

    def group_gradients(self, loss_fn: LossFn, targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Pass 1 alone, without a step: the group gradients [G, d] (a buffer the next step overwrites) and the number
        of samples of each group in the batch. Like any training forward, it moves BatchNorm running statistics."""
        gid, local, counts = self.group_counts(targets, self.sync)
        self._group_gradients(loss_fn, gid, local, counts, StepStats())
        return self.flat.rows, counts

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One full training step on a batch with labels `targets`. `alpha` in [0, 1] weighs the task gradient by
        alpha and GKP's by (1 - alpha) (Eq. 16): 1 drops GKP, lower values hold the other groups' optima more; the
        recipes anneal it from alpha.start to alpha.end over the run (Eq. 20). Before `set_groups`, use
        `plain_step`."""
        flat = self.flat
        stats = StepStats()
        gid, local, counts = self.group_counts(targets, self.sync)
        n = self.counts
        weights = equations.group_weights(self.group_weighting, n)
        # per-sample weights of the task term sum_g w_g L_g, L_g the mean loss over D_g
        per_sample = torch.where(n > 0, weights / n, 0.0).to(flat.grad.dtype)[gid]
        self._begin()
        self._group_gradients(loss_fn, gid, local, counts, stats)
        if not bool(torch.isfinite(flat.rows).all()):
            return self._skip(stats)
        self._perturb(counts, stats)
        self._perturbed_pass(loss_fn, gid, local, counts, per_sample, stats)
        if not self.sync and world_size() > 1:
            flat.grad.div_(world_size())
        extra = (lambda: self._regularizer(alpha, weights, counts, stats)) if self.regularizer else None
        return self._finish(stats, alpha, weights, extra=extra)

    def _masked_group_grads(self, loss_fn: LossFn, gid: torch.Tensor, everyone: torch.Tensor, local: list[int],
                            stats: StepStats) -> None:
        """Pass 1, masked: one whole-batch forward; row g = gradient of sum_{i in D_g} loss_i / |D_g|."""
        flat = self.flat
        with self.autocast():
            losses = upcast(loss_fn(everyone))
        stats.group_loss, stats.loss = self._group_means(losses, gid, self.counts, self.sync)
        self._group_rows(losses, gid, local, self.counts)
        if self.sync:
            all_reduce_(flat.rows)

    def _shared_group_grads(self, loss_fn: LossFn, gid: torch.Tensor, local: list[int], counts: list[float],
                            stats: StepStats) -> None:
        """Pass 1, share: one forward/backward of the batch loss over the sorted batch with zero offsets E_g; row g
        = dL/dE_g / (|D_g| / |D|), plus the gradient of uses outside the segments (common to every group)."""
        flat, total = self.flat, sum(counts)
        order = torch.argsort(gid, stable=True)
        with group_offsets(self.seg_modules, Layout(local), self.zero_offsets, share=True):
            with self.autocast():
                losses = upcast(loss_fn(order))
            self._backward(losses.sum() / total, 1.0)
        stats.group_loss, stats.loss = self._group_means(losses, gid[order], self.counts, self.sync)
        if self.sync:
            all_reduce_(flat.rows)
            all_reduce_(flat.grad)
        for g, c in enumerate(counts):
            if c > 0:
                flat.rows[g].mul_(total / c).add_(flat.grad)
        flat.grad.zero_()

    def _direction_rows(self, present: list[int]) -> torch.Tensor:
        """The rows the directions are formed from: this batch's group gradients, or with `group_grad_ema` their
        per-group EMA across steps, m_g <- beta m_g + (1 - beta) g_g for the groups in the batch (the first sets it)."""
        rows = self.flat.rows
        if self.group_grad_ema <= 0:
            return rows
        beta = self.group_grad_ema
        for g in present:
            if self.grad_ema_set[g]:
                self.grad_ema[g].mul_(beta).add_(rows[g], alpha=1 - beta)
            else:
                self.grad_ema[g].copy_(rows[g])
                self.grad_ema_set[g] = True
        return self.grad_ema

    def _perturb(self, counts: list[float], stats: StepStats) -> None:
        """Directions, radii and perturbations (Eq. 12-14) of the groups in the batch, written over their rows; the
        radii and cosines recorded (on the device, NaN for an absent group)."""
        rows, n = self.flat.rows, self.counts
        present = [g for g, c in enumerate(counts) if c > 0]
        if self.gkp is not None:  # GKP's EMA Fisher (gkp.fisher=ema) from the group gradients
            self.gkp.track(rows[:, :self.num_covered], present)
        src = self._direction_rows(present)
        shares = (n / n.sum()).to(rows.dtype)
        glob, coef, res_norm = ops.gsa_project(src, shares, backend=self.backend, out=self.glob)
        glob_norm = torch.linalg.vector_norm(glob)
        theta_norm = torch.linalg.vector_norm(self.base).double()
        stats.cos = torch.where(n > 0, _cosine(coef.double(), res_norm.double(), glob_norm.double()), math.nan)
        stats.rho = torch.full_like(n, math.nan)
        for g in present:
            momentum = self.momentum[g] if self.direction == "friendly" and self.momentum_set[g] else None
            h = equations.ascent_direction(self.direction, src[g], glob, momentum, self.friendly_sigma, coef[g])
            if self.direction == "friendly":
                self._update_momentum(g)
            norm = equations.scaled_norm(self.scale, h, self.base)
            ok = usable(norm)  # a zero direction takes no perturbation
            rho = torch.where(ok, equations.gsa_radius(self.z, theta_norm, norm.double(), self.d,
                                                       self.group_sizes[g], self.rho_clamp), 0.0)
            rows[g].copy_(equations.gsa_perturbation(self.scale, h, self.base, rho, torch.where(ok, norm, 1.0)))
            stats.rho[g] = rho

    def _perturbed_pass(self, loss_fn: LossFn, gid: torch.Tensor, local: list[int], counts: list[float],
                        per_sample: torch.Tensor, stats: StepStats) -> None:
        """Pass 2: every sample's loss at its group's perturbation (or, `averaged`, at their batch-share mean),
        weighted as its group's term of Eq. 16, differentiated with respect to theta."""
        flat, rows = self.flat, self.flat.rows
        everyone = torch.arange(len(gid), device=gid.device)
        with frozen_bn_stats(self.model, self.bn_scratch):
            if self.batched is not None:
                perturbed = self.batched.backward(loss_fn, gid, counts, per_sample, rows, self._backward,
                                                  self.autocast)
                order = everyone
            elif self.perturbation == "per_group_exact":
                perturbed = torch.zeros(len(gid), dtype=per_sample.dtype, device=gid.device)
                for g in [g for g, c in enumerate(counts) if c > 0]:
                    flat.data.copy_(self.base).add_(rows[g])
                    with self.autocast():
                        losses = upcast(loss_fn(everyone))
                    mine = gid == g
                    self._backward((losses * per_sample * mine).sum(), 1.0)
                    perturbed = torch.where(mine, losses.detach(), perturbed)
                order = everyone
            else:
                eps_bar = equations.averaged_perturbation(rows, self.counts)
                flat.data.copy_(self.base).add_(eps_bar)
                if self.perturbation == "averaged":
                    order = everyone
                    with self.autocast():
                        perturbed = upcast(loss_fn(order))
                    self._backward((perturbed * per_sample).sum(), 1.0)
                else:
                    rows.sub_(eps_bar)  # offsets eps_g - eps_bar on top of theta + eps_bar: group g sees theta + eps_g
                    order = torch.argsort(gid, stable=True)
                    with group_offsets(self.seg_modules, Layout(local), self.row_views, share=False):
                        with self.autocast():
                            perturbed = upcast(loss_fn(order))
                        self._backward((perturbed * per_sample[order]).sum(), 1.0)
        means, _ = self._group_means(perturbed, gid[order], self.counts, self.sync)
        stats.ascent = means - stats.group_loss

    def _update_momentum(self, g: int) -> None:
        """FriendlySAM's m_g <- lam m_g + (1 - lam) g_g (the first group gradient initialises it)."""
        if self.momentum_set[g]:
            self.momentum[g].mul_(self.friendly_momentum).add_(self.flat.rows[g], alpha=1 - self.friendly_momentum)
        else:
            self.momentum[g].copy_(self.flat.rows[g])
            self.momentum_set[g] = True

    def _regularizer(self, alpha: float, weights: torch.Tensor, counts: list[float],
                     stats: StepStats) -> torch.Tensor:
        """The optional Eq. 15 regulariser: its value, its gradient added at theta to the reduced task gradient."""
        flat = self.flat
        theta_norm = torch.linalg.vector_norm(flat.data).double()
        value = torch.zeros((), dtype=torch.float64, device=flat.data.device)
        for g, c in enumerate(counts):
            if c > 0:  # a group without a perturbation (rho 0) has no term
                rho = stats.rho[g]
                term = equations.gsa_regularizer(theta_norm, torch.where(rho > 0, rho, 1.0), self.group_sizes[g])
                value = value + torch.where(rho > 0, alpha * weights[g] * term, 0.0)
        flat.grad.add_(flat.data * (value / theta_norm ** 2).to(flat.data.dtype))  # each term is linear in ||theta||
        return value

    def state_dict(self) -> dict[str, Any]:
        """Step state that a resumed run needs: loss scale, FriendlySAM momenta, group-gradient EMA, Fisher EMA, skip
        count."""
        return {**super().state_dict(), "momentum": self.momentum, "momentum_set": list(self.momentum_set),
                "grad_ema": self.grad_ema, "grad_ema_set": list(self.grad_ema_set),
                "fisher_ema": self.gkp.fisher if self.gkp is not None and self.gkp.ema_decay is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["momentum"] is not None:
            self.momentum = state["momentum"].to(self.flat.data.device)
            self.momentum_set = list(state["momentum_set"])
        if state.get("grad_ema") is not None:
            self.grad_ema = state["grad_ema"].to(self.flat.data.device)
            self.grad_ema_set = list(state["grad_ema_set"])
