"""The plain step (method `none`, and `gkp`): the base loss's one forward and backward, on the step core."""
from __future__ import annotations

import torch

from .core import LossFn, StepCore, StepStats
from .registry import register_step


@register_step("none")
class PlainStep(StepCore):
    """One forward and backward of the batch loss at theta, then the base optimizer's step (with GKP when set).

    >>> step = PlainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    """

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        return self.plain_step(loss_fn, targets, alpha)
