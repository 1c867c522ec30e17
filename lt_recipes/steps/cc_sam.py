"""CC-SAM (Zhou et al., CVPR 2023), stage 1 as its authors released it: class-conditioned perturbations of the
classifier alone.

Per class c in the batch, g_c is the gradient of the class's mean classification loss with respect to the
classifier, per tensor t; its perturbation is

    eps_c^t = rho0 sqrt(||theta_cls|| / ||g_c^t||) d^(1/4) / (sqrt(2) (n_c - 1)^(1/4)) g_c^t / ||g_c^t||

(d the classifier's parameter count, n_c the class's training images), and the loss is

    L = (1 - beta) (1/B) sum_i l_i(theta) + beta (1/B) sum_i CE(head_{theta_cls + eps_{y_i}}(f_i), y_i),

the head re-run on the features f_i of the one forward, so the step costs one forward and backward plus a loop of
head-only passes. l_i is the base loss (the released code: mixup CE; the base's own here, so the comparison is
on the same data pipeline), the head's loss the base's classification loss. Under DDP the per-class classifier
gradients are summed over ranks (one small all-reduce), so every rank perturbs with the global batch's classes.
A step waits for the device twice (lt_recipes.host_sync): for the batch's class counts (which classes get a head
pass, and where each class's samples sit in the class-sorted batch) and for the update's non-finite check.
Stage 2 (a frozen backbone, class-aware sampling and feature perturbations) is a fine-tuning schedule, not a step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..models import find_head
from ..sections import CCSAMConfig
from .core import LossFn, StepCore, StepStats, all_reduce_, sample_counts, upcast, usable, world_size
from .registry import register_step

HeadLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def class_perturbation(grads: Sequence[torch.Tensor], theta_norm: torch.Tensor | float, d: int, n_c: int,
                       rho: float) -> list[torch.Tensor]:
    """eps_c per classifier tensor from class c's gradients (module docstring); zero for a zero gradient."""
    out = []
    for g in grads:
        norm = torch.linalg.vector_norm(g)
        scale = rho * (theta_norm / norm) ** 0.5 * d ** 0.25 / (math.sqrt(2) * max(n_c - 1, 1) ** 0.25)
        out.append(g * torch.where(usable(norm), scale / norm, 0.0))
    return out


@register_step("cc_sam")
class CCSAM(StepCore):
    """CC-SAM's stage-1 step (module docstring) on a model's classifier (`models.find_head`: get_classifier(), else
    the module `classifier`, `fc` or `head`).

    >>> step = CCSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), class_counts=counts)
    >>> stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, class_counts: Sequence[int],
                 head_losses: HeadLosses | None = None, rho: float = CCSAMConfig.rho, beta: float = CCSAMConfig.beta,
                 **kw: Any) -> None:
        CCSAMConfig(rho=rho, beta=beta)  # the options' checks live in their recipe section
        super().__init__(model, base_optimizer, **kw)
        self.classifier: nn.Module | None = find_head(model)
        if self.classifier is None:
            raise ValueError(f"CC-SAM perturbs the classifier: {type(model).__name__} has no get_classifier() and "
                             "no classifier / fc / head module")
        self.names = [n for n, p in self.classifier.named_parameters() if p.requires_grad]
        self.params = [p for p in self.classifier.parameters() if p.requires_grad]
        self.d_cls = sum(p.numel() for p in self.params)
        self.class_counts = [int(n) for n in class_counts]
        self.head_losses = head_losses or _cross_entropy
        self.rho, self.beta = rho, beta

    def _class_grads(self, logits: torch.Tensor, targets: torch.Tensor,
                     classes: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every class's gradient of its summed head loss w.r.t. the classifier, [C, d_cls], and the batch's count
        of each class, both summed over ranks (the mean per class is sum / count); the head losses at theta.
        `classes`: this rank's classes with the batch rows of each."""
        C = len(self.class_counts)
        grads = torch.zeros(C, self.d_cls, dtype=self.params[0].dtype, device=logits.device)
        counts = sample_counts(targets, C)
        losses = upcast(self.head_losses(upcast(logits), targets))
        for c, rows in classes:
            g = torch.autograd.grad(losses[rows].sum(), self.params, retain_graph=True)
            grads[c] = torch.cat([t.reshape(-1) for t in g])
        all_reduce_(grads)
        all_reduce_(counts)
        return grads, counts, losses.detach()

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One step on a batch with labels `targets`; `alpha` weighs the task gradient against GKP (Eq. 16)."""
        stats, B = StepStats(), len(targets)
        self._begin()
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = self.classifier.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
        try:
            with self.autocast():
                losses = upcast(loss_fn(torch.arange(B, device=targets.device)))
        finally:
            hook.remove()
        feats, logits = seen[0][0][:B], seen[0][1][:B]  # the classification view (BCL adds its views after it)
        stats.loss = losses.detach().mean()
        local = sample_counts(targets, len(self.class_counts)).tolist()  # the step's one wait before the update
        present = [c for c, n in enumerate(local) if n > 0]
        rows = torch.argsort(targets, stable=True).split([int(local[c]) for c in present])
        classes = list(zip(present, rows))
        grads, counts, clean_head = self._class_grads(logits, targets, classes)
        theta_norm = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in self.params]))
        sizes = [p.numel() for p in self.params]
        perturbed = torch.zeros(B, dtype=losses.dtype, device=targets.device)
        with self.autocast():
            for c, mine in classes:
                mean = [t.view_as(p) / counts[c] for t, p in zip(grads[c].split(sizes), self.params)]
                eps = class_perturbation(mean, theta_norm, self.d_cls, self.class_counts[c], self.rho)
                moved = {n: p + e.to(p.dtype) for n, p, e in zip(self.names, self.params, eps)}
                out = functional_call(self.classifier, moved, (feats[mine],))
                perturbed = perturbed.index_put((mine,), upcast(self.head_losses(upcast(out), targets[mine])))
        loss = (1 - self.beta) * losses.mean() + self.beta * perturbed.mean()
        self._backward(loss, 1.0 / world_size())
        rise = (perturbed.detach().mean() - clean_head.mean()).double().reshape(1)
        stats.ascent = all_reduce_(rise) / world_size()
        return self._finish(stats, alpha, self.batch_shares(targets))
