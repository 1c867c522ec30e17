"""The authors' released step (ChenShengHan100/gkp-gsa, `cifar_OneBackward.py` with `sam.GSA`), as their script runs it.

It is one reading of the paper among the others (docs/method.md, reading `released`), kept exact so its numbers can
be compared with the paper's step on the same bases. Per batch, with K the groups present in ascending order,
w_k = |D_k| / |D| and P_j = (lambda / 2) / n_j sum_i F_ji (theta_i - theta*_ji)^2 the GKP term of group j:

1. One backward of sum_{k in K} [alpha L_k(theta) + (1 - alpha) sum_{j != k} P_j(theta)], each group's mean loss
   weighted 1 (the script forwards the whole batch once per group in training mode: BatchNorm's running statistics
   move K times, reproduced here by one forward at momentum 1 - (1 - m)^K). This gradient G is the same for all
   groups: there are no separate group gradients.
2. FriendlySAM directions, cascaded through the one gradient buffer: d <- G; for each k in K, the first time
   m_k <- d and the direction is d; afterwards d <- d - sigma m_k and m_k <- lam m_k + (1 - lam) d_before, the
   direction being the new d (so group k sees G - sigma sum_{l <= k} m_l).
3. ASAM-scaled radius and perturbation with the clamp: rho_k = clamp(C sqrt(||theta|| / (2 ||theta * d_k||))
   D^(-1/4) (n_k - 1)^(-1/4)), e_k = sqrt(D) rho_k theta^2 d_k / ||theta * d_k||, over every trainable parameter
   (D of them, classifier included); one perturbation eps = sum_k w_k e_k / sum_k w_k.
4. One whole-batch pass at theta + eps (running statistics frozen) of alpha L_D + (1 - alpha) sum_{k in K} w_k
   sum_{j != k} P_j, GKP evaluated at theta + eps; theta restored; the base optimizer's step.

One departure, for BCL with more than one group: the script's group loss runs BCL's contrastive term over the
group's samples alone, while here a group's loss is its masked share of the batch loss (the same for every other
base, and for BCL with one group, as the script's README runs it). The arithmetic runs in the parameters' precision
(at least float32); the script forms D and n_k - 1 as float32 tensors, so in float64 the two agree to float32
rounding of the radius only (docs/method.md, "Departures from the authors' code").
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .. import equations
from ..batchnorm import batchnorms, frozen_bn_stats
from ..sections import ReleasedConfig
from .core import LossFn, StepCore, StepStats, all_reduce_, upcast, usable
from .registry import register_step

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def repeated_bn_updates(model: nn.Module, times: int) -> Iterator[None]:
    """One training forward moves BatchNorm running statistics as `times` identical forwards would: with momentum m,
    r <- (1 - m)^times r + (1 - (1 - m)^times) mean. Layers with momentum None (a cumulative average) move once."""
    bns = [m for m in batchnorms(model) if m.momentum is not None]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0 - (1.0 - m.momentum) ** max(times, 1)
    try:
        yield
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom


@register_step("released")
class ReleasedGSA(StepCore):
    """The released script's step (module docstring), with the interface of `GroupedSAM`.

    >>> step = ReleasedGSA(model, torch.optim.SGD(model.parameters(), lr=0.15, momentum=0.9))
    >>> step.set_groups([0] * num_classes, [num_train_images])
    >>> stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y, alpha=0.9)

    `z` is the radius scale C and `rho_clamp` the clamp of rho_k (None: none), `friendly_sigma` / `friendly_momentum`
    FriendlySAM's sigma and lam, `scale` adaptive (the script's) or euclidean; the defaults are the script's, the
    recipe section `released` (lt_recipes.sections.ReleasedConfig).
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, z: float = ReleasedConfig.z,
                 rho_clamp: Sequence[float] | None = ReleasedConfig.rho_clamp, scale: str = ReleasedConfig.scale,
                 friendly_sigma: float = ReleasedConfig.friendly_sigma,
                 friendly_momentum: float = ReleasedConfig.friendly_momentum, backend: str = ReleasedConfig.backend,
                 **kw: Any) -> None:
        ReleasedConfig(z=z, rho_clamp=rho_clamp, scale=scale, friendly_sigma=friendly_sigma,
                       friendly_momentum=friendly_momentum, backend=backend)  # the options' checks live there
        super().__init__(model, base_optimizer, num_rows=0, backend=backend, **kw)
        self.z = float(z)
        self.rho_clamp = None if rho_clamp is None else (float(rho_clamp[0]), float(rho_clamp[1]))
        self.scale = scale
        self.sigma = friendly_sigma
        self.lam = friendly_momentum
        self.momentum: torch.Tensor | None = None
        self.momentum_set: list[bool] = []
        self.direction = torch.empty_like(self.flat.data)
        self.eps = torch.empty_like(self.flat.data)

    def compile_refusal(self, backend: str) -> str | None:
        """Its pass at theta sets BatchNorm's momentum from the number of groups in the batch, a constant the compiled
        forward is specialised to: one compilation per count, past torch's recompile limit the forward runs eager."""
        return ("its pass at theta sets BatchNorm's momentum from the number of groups in each batch, and the compiled "
                "forward recompiles for every count")

    def set_groups(self, group_of_class: Sequence[int] | torch.Tensor, group_sizes: Sequence[int]) -> None:
        """Install a grouping: group id per class and training samples n_k per group; the momenta start afresh."""
        super().set_groups(group_of_class, group_sizes)
        self.momentum = self.flat.data.new_zeros(self.num_groups, self.d)
        self.momentum_set = [False] * self.num_groups

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One full training step on a batch with labels `targets`; `alpha` weighs the task term against GKP."""
        flat, stats = self.flat, StepStats()
        gid, _, counts = self.group_counts(targets)
        n = self.counts
        total = sum(counts)
        present = [k for k, c in enumerate(counts) if c > 0]
        shares = [c / total for c in counts]
        everyone = torch.arange(len(gid), device=gid.device)
        self._begin()

        # 1. sum_k [alpha L_k + (1 - alpha) sum_{j != k} P_j] at theta, each group's mean loss weighted 1
        per_group_mean = torch.where(n > 0, 1.0 / n, 0.0).to(flat.grad.dtype)[gid]
        with repeated_bn_updates(self.model, len(present)):
            with self.autocast():
                losses = upcast(loss_fn(everyone))
        stats.group_loss, stats.loss = self._group_means(losses, gid, n, True)
        self._backward((losses * per_group_mean).sum(), alpha)
        grad = all_reduce_(flat.grad)
        if not self._unscale(grad):
            return self._skip(stats)
        if self.gkp is not None:  # every present group's task term has weight 1
            self._add_gkp(alpha, (n > 0).double())

        # 2-3. cascaded FriendlySAM directions, ASAM radius with the clamp, the batch-share mean perturbation
        self.direction.copy_(grad)
        self.eps.zero_()
        theta_norm = torch.linalg.vector_norm(self.base).double()
        stats.rho = torch.full_like(n, math.nan)
        for k in present:
            if self.momentum_set[k]:
                before = self.direction.clone()
                self.direction.sub_(self.momentum[k], alpha=self.sigma)
                self.momentum[k].mul_(self.lam).add_(before, alpha=1 - self.lam)
            else:
                self.momentum[k].copy_(self.direction)
                self.momentum_set[k] = True
            norm = equations.scaled_norm(self.scale, self.direction, self.base)
            ok = usable(norm)  # a zero direction adds no perturbation
            rho = torch.where(ok, equations.gsa_radius(self.z, theta_norm, norm.double(), self.d,
                                                       self.group_sizes[k], self.rho_clamp), 0.0)
            self.eps.add_(equations.gsa_perturbation(self.scale, self.direction, self.base, rho,
                                                     torch.where(ok, norm, 1.0)), alpha=shares[k])
            stats.rho[k] = rho
        self.eps.div_(sum(shares[k] for k in present))
        grad.zero_()

        # 4. alpha L_D + (1 - alpha) sum_k w_k sum_{j != k} P_j at theta + eps
        flat.data.add_(self.eps)
        with frozen_bn_stats(self.model, self.bn_scratch):
            with self.autocast():
                perturbed = upcast(loss_fn(everyone))
            self._backward(perturbed.sum() / total, alpha)
        means, _ = self._group_means(perturbed, gid, n, True)
        stats.ascent = means - stats.group_loss
        # GKP at theta + eps (held in the direction buffer, free now), group k's task term weighted w_k
        m = self.num_covered
        at = torch.add(self.base[:m], self.eps[:m], out=self.direction[:m]) if self.gkp is not None else None
        return self._finish(stats, alpha, n / n.sum(), weighted=True, gkp_at=at)

    def state_dict(self) -> dict[str, Any]:
        """Step state that a resumed run needs: loss scale, skip count, FriendlySAM momenta."""
        return {**super().state_dict(), "momentum": self.momentum, "momentum_set": list(self.momentum_set)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["momentum"] is not None:
            self.momentum = state["momentum"].to(self.flat.data.device)
            self.momentum_set = list(state["momentum_set"])
