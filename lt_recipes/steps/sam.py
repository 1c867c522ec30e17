"""SAM and the sharpness-aware steps that share its one perturbation: ASAM, FriendlySAM, ImbSAM and Focal-SAM.

All are one *weighted split* step (docs/method.md, "The sharpness-aware peers"). With per-class clean weights a_c and
perturbed weights b_c, L_a = (1/B) sum_i a_{y_i} l_i and L_b = (1/B) sum_i b_{y_i} l_i over the batch:

    first_step:   eps = rho d / ||d||,  d the ascent direction from grad L_b(theta)   (kept aside: grad L_a(theta))
    second_step:  theta <- theta - lr [grad L_a(theta) + grad L_b(theta + eps)]

- SAM (Foret et al. 2021): a = 0, b = 1, d = grad L_b. 2 forward + 2 backward passes.
- ASAM (Kwon et al. 2021): SAM with eps = rho T^2 d / ||T d||, T = |theta|.
- FriendlySAM (Li et al. 2024): SAM with d = g_t - sigma m_{t-1}, m_t = lam m_{t-1} + (1 - lam) g_t (the first
  step sets m = g and ascends along g, as the authors' code).
- ImbSAM (Zhou et al. 2023): a = 1 on head classes, b = 2 on tail classes {c : n_c < eta} (the factor 2 is the
  authors' code's), 0 elsewhere. 2 forward + 3 backward passes.
- Focal-SAM (Li et al. 2025): a_c = 1 - omega_c, b_c = omega_c = lam (1 - n_c / N)^gamma. 2F + 3B.

BatchNorm's running statistics move in the pass at theta only (ImbSAM with `perturbed_bn="update"`: in the pass at
theta + eps too, as its authors' code does). A step waits for the device twice (lt_recipes.host_sync): the non-finite
checks of the ascent gradient (a non-finite one would move theta + eps to NaN) and of the update. Under DDP the ascent
direction is the global batch's
(one all-reduce), so every rank takes the same eps and a step equals the one-process step on the global batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..batchnorm import frozen_bn_stats
from ..metrics import FEW_SHOT
from ..sections import ASAMConfig, FocalSAMConfig, FSAMConfig, ImbSAMConfig, SAMConfig
from .core import LossFn, StepCore, StepStats, all_reduce_, sam_perturbation, upcast, world_size
from .registry import register_step


@register_step("sam")
class SAM(StepCore):
    """Sharpness-Aware Minimization: ascend to theta + eps along the batch gradient, descend with the gradient there.

    >>> sam = SAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    >>> stats = sam.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    """

    adaptive = False
    perturbed_bn = "frozen"  # BatchNorm running statistics in the pass at theta + eps (choices.PERTURBED_BN)

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = SAMConfig.rho,
                 **kw: Any) -> None:
        SAMConfig(rho=rho)  # the options' checks live in their recipe section
        super().__init__(model, base_optimizer, num_rows=1, **kw)
        self.rho = rho
        # per-class clean (a) and perturbed (b) weights: None means a = 0, b = 1 (SAM)
        self.clean_weights: torch.Tensor | None = None
        self.perturbed_weights: torch.Tensor | None = None

    @property
    def retains_graph(self) -> bool:
        """With clean weights (ImbSAM, Focal-SAM) the pass at theta is differentiated twice: clean and perturbed."""
        return self.clean_weights is not None

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The ascent direction d from the (reduced, unscaled) gradient of L_b at theta."""
        return grad

    def _split(self, losses: torch.Tensor, targets: torch.Tensor,
               weights: torch.Tensor | None) -> torch.Tensor:
        """(1/B) sum_i w_{y_i} l_i, the batch mean when `weights` is None."""
        if weights is None:
            return losses.mean()
        return (losses * weights[targets]).sum() / len(targets)

    def first_step(self, loss_fn: LossFn, targets: torch.Tensor,
                   stats: StepStats) -> tuple[bool, torch.Tensor | float]:
        """theta -> theta + eps: the clean part's gradient kept in row 0, the perturbed part's gradient reduced over
        ranks and turned into eps. Returns (finite, L_b at theta on the device)."""
        flat, world = self.flat, world_size()
        self._begin()
        with self.autocast():
            losses = upcast(loss_fn(torch.arange(len(targets), device=targets.device)))
        stats.loss = losses.detach().mean()
        if self.clean_weights is not None:  # zero when the batch has no clean class: no host read to skip it
            self._backward(self._split(losses, targets, self.clean_weights), 1.0 / world, retain_graph=True)
            flat.rows[0].copy_(flat.grad)
            flat.grad.zero_()
        perturbed = self._split(losses, targets, self.perturbed_weights)
        self._backward(perturbed, 1.0 / world)
        grad = all_reduce_(flat.grad)
        if not self._unscale(grad):
            return False, math.nan
        flat.data.add_(sam_perturbation(self.direction(grad), self.base, self.rho, self.adaptive))
        grad.zero_()
        return True, perturbed.detach()

    def second_step(self, loss_fn: LossFn, targets: torch.Tensor, stats: StepStats, before: torch.Tensor,
                    alpha: float) -> StepStats:
        """The perturbed part's gradient at theta + eps plus the clean part's at theta; theta restored; the step."""
        frozen = self.perturbed_bn == "frozen"
        with frozen_bn_stats(self.model, self.bn_scratch) if frozen else contextlib.nullcontext():
            with self.autocast():
                losses = upcast(loss_fn(torch.arange(len(targets), device=targets.device)))
            perturbed = self._split(losses, targets, self.perturbed_weights)
            self._backward(perturbed, 1.0 / world_size())
        rise = (perturbed.detach() - before).double().reshape(1)
        stats.ascent = all_reduce_(rise) / world_size()
        if self.clean_weights is not None:
            self.flat.grad.add_(self.flat.rows[0])
        return self._finish(stats, alpha, self.batch_shares(targets))

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One step on a batch with labels `targets`; `alpha` weighs the task gradient against GKP (Eq. 16)."""
        stats = StepStats()
        finite, before = self.first_step(loss_fn, targets, stats)
        if not finite:
            return self._skip(stats)
        return self.second_step(loss_fn, targets, stats, before, alpha)


@register_step("asam")
class ASAM(SAM):
    """Adaptive SAM: eps = rho T^2 g / ||T g||, T = |theta| (davda54/sam's `adaptive=True`)."""

    adaptive = True

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = ASAMConfig.rho,
                 **kw: Any) -> None:
        super().__init__(model, base_optimizer, rho=rho, **kw)


@register_step("fsam")
class FriendlySAM(SAM):
    """FriendlySAM: ascend along g_t - sigma m_{t-1}, with m an EMA (decay `lam`) of the batch gradients."""

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = FSAMConfig.rho,
                 sigma: float = FSAMConfig.sigma, lam: float = FSAMConfig.lam, **kw: Any) -> None:
        FSAMConfig(rho=rho, sigma=sigma, lam=lam)
        super().__init__(model, base_optimizer, rho=rho, **kw)
        self.sigma, self.lam = sigma, lam
        self.momentum: torch.Tensor | None = None

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            self.momentum = grad.clone()
            return grad
        d = grad - self.sigma * self.momentum
        self.momentum.mul_(self.lam).add_(grad, alpha=1 - self.lam)
        return d

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        m = state["momentum"]
        self.momentum = None if m is None else m.to(self.flat.data.device)


def _class_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)


@register_step("imbsam")
class ImbSAM(SAM):
    """ImbSAM: SAM on the tail classes' loss (times 2, as the authors' code), the head classes' loss at theta.

    The tail is {c : n_c < eta}; `eta` None takes the benchmark's few-shot boundary (fewer than 20 training images,
    the paper's eta = 20 on CIFAR-100-LT: its 30 Few classes). `perturbed_bn` "update" lets the pass at theta + eps
    move BatchNorm running statistics, as the authors' third pass (a train-mode forward there) does; "frozen" leaves
    them alone, as SAM does.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, class_counts: Sequence[int],
                 rho: float = ImbSAMConfig.rho, eta: float | None = ImbSAMConfig.eta,
                 perturbed_bn: str = ImbSAMConfig.perturbed_bn, **kw: Any) -> None:
        ImbSAMConfig(rho=rho, eta=eta, perturbed_bn=perturbed_bn)
        super().__init__(model, base_optimizer, rho=rho, **kw)
        self.perturbed_bn = perturbed_bn
        self.eta = float(FEW_SHOT if eta is None else eta)
        tail = [n < self.eta for n in class_counts]
        self.tail_classes = [c for c, t in enumerate(tail) if t]
        self.clean_weights = _class_tensor([0.0 if t else 1.0 for t in tail], self.flat.data)
        self.perturbed_weights = _class_tensor([2.0 if t else 0.0 for t in tail], self.flat.data)


def focal_weights(class_counts: Sequence[int], gamma: float, lam: float) -> list[float]:
    """Focal-SAM's omega_c = lam (1 - pi_c)^gamma, pi_c = n_c / N the training prior."""
    total = float(sum(class_counts))
    return [lam * (1.0 - n / total) ** gamma for n in class_counts]


@register_step("focal_sam")
class FocalSAM(SAM):
    """Focal-SAM: each class's loss split into (1 - omega_c) at theta and omega_c at theta + eps, eps along the
    gradient of the omega-weighted loss; omega_c = lam (1 - n_c / N)^gamma grows toward the tail."""

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, class_counts: Sequence[int],
                 rho: float = FocalSAMConfig.rho, gamma: float = FocalSAMConfig.gamma,
                 lam: float = FocalSAMConfig.lam, **kw: Any) -> None:
        FocalSAMConfig(rho=rho, gamma=gamma, lam=lam)
        super().__init__(model, base_optimizer, rho=rho, **kw)
        omega = focal_weights(class_counts, gamma, lam)
        self.clean_weights = _class_tensor([1.0 - w for w in omega], self.flat.data)
        self.perturbed_weights = _class_tensor(omega, self.flat.data)
