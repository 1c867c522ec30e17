"""BatchNorm running statistics around the passes of SAM-style steps.

A step moves the running statistics once, in its first whole-batch forward at theta, exactly as a plain step does;
the perturbed pass at theta + eps must leave them alone, and a skipped step must leave them as they were.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNState:
    """A copy of every BatchNorm running statistic, to put back after a pass that must leave them untouched.

    Momentum 0 is not enough: 0 * NaN is NaN, so one non-finite forward would poison the running statistics.
    Saving and restoring are one foreach copy each (a ResNet has hundreds of these tensors).
    """

    def __init__(self, model: nn.Module) -> None:
        self.live = [b for m in batchnorms(model)
                     for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.live]

    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, state: BNState | None = None) -> Iterator[None]:
    """BatchNorm running statistics untouched by a perturbed pass, as usual for SAM: momentum 0 inside, and the
    saved values put back on exit. Wrap the backward passes too: BatchNorm's backward checks that the statistics
    it saved were not modified in between."""
    state = state or BNState(model)
    bns = batchnorms(model)
    momenta = [m.momentum for m in bns]
    state.save()
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        state.restore()
