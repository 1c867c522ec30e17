"""The grouped step's exact perturbed passes batched (`gsa.batched`): G whole-batch passes as one vectorised pass.

`per_group_exact` runs, for every group g present in the batch, a whole-batch forward at theta + eps_g and
differentiates the loss masked to group g (Eq. 15-16). Those G passes differ only in their parameters, so they can run
as one `torch.func.vmap` over `torch.func.functional_call` with the G parameter sets stacked: each parameter set sees
the whole batch, and each BatchNorm layer normalises with its own set's whole-batch statistics, exactly as in its own
pass. The gradient with respect to theta of sum_g w_g L_g(theta + eps_g) is one backward through the vectorised pass:
every stacked parameter is p + eps_g (p the parameter itself, eps a constant view of the rows), so autograd sums
the G sets' gradients into p's gradient, the step's flat gradient buffer.

BatchNorm's running statistics take no part: vmap refuses the in-place update of a buffer shared by every parameter
set, so for the pass each BatchNorm layer stops tracking them (it normalises by the batch, as a training forward
does) and tracks them again afterwards, also when the pass fails. `chunk_size` runs the groups in chunks of that many
parameter sets, bounding the G-fold activation memory (None: all at once).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from ..batchnorm import batchnorms
from ..errors import ConfigError
from .core import upcast

_logger = logging.getLogger(__name__)

# modules that cannot run under vmap: each with the reason given in the refusal
UNBATCHABLE: dict[type, str] = {nn.SyncBatchNorm: "SyncBatchNorm all-gathers its statistics across processes"}


class _LossCall(nn.Module):
    """The loss function as a module call, so that `functional_call` swaps the model's parameters for one set while
    the loss function (which calls the model itself: BCL's heads and prototypes, multi-view inputs) runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(idx)


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by the batch and leave their running statistics alone inside (no in-place buffer
    update, which vmap refuses); they track them again on exit, also when the body raises."""
    tracking = [m for m in batchnorms(model) if m.track_running_stats]
    try:
        for m in tracking:
            m.track_running_stats = False
        yield
    finally:
        for m in tracking:
            m.track_running_stats = True


def _param_view(chunk: torch.Tensor, shape: torch.Size, stride: Sequence[int]) -> torch.Tensor:
    """The [P, *shape] parameter sets held in `chunk` [P, numel], laid out in memory as the flat buffer holds the
    parameter (its dense `stride`): a view, so the backward is one concatenation of the gradients."""
    order = sorted(range(len(shape)), key=lambda i: -stride[i])  # the parameter's dims, outermost in memory first
    view = chunk.view(chunk.shape[0], *[shape[i] for i in order])
    return view.permute(0, *[1 + order.index(i) for i in range(len(shape))])


class BatchedPasses:
    """Runs a loss function at P parameter sets theta + eps_g as one vmapped pass over the whole batch.

    `params` are the flat buffer's parameters, in its order, with their dense strides; `chunk_size` bounds how many
    parameter sets run at once (vmap's chunk_size; None: all).
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], strides: Sequence[Sequence[int]],
                 chunk_size: int | None = None) -> None:
        for name, module in model.named_modules():
            for kind, why in UNBATCHABLE.items():
                if isinstance(module, kind):
                    raise ConfigError(f"gsa.batched=true cannot run {type(model).__name__} ({name or 'the model'} is "
                                      f"a {kind.__name__}: {why}); set gsa.batched=false")
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.call = _LossCall(model)
        self.names = ["model." + names[id(p)] for p in params]
        self.shapes = [p.shape for p in params]
        self.strides = [tuple(s) for s in strides]
        self.sizes = [p.numel() for p in params]
        self.params = list(params)
        self.model = model
        self.chunk_size = chunk_size

    def losses(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, eps: torch.Tensor,
               autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """Per-sample losses [P, len(idx)] of `loss_fn(idx)` at the P parameter sets theta + eps_p, theta the
        parameters' values and `eps` [P, d] in the flat buffer's layout; differentiable with respect to the
        parameters (eps is a constant)."""
        chunks = eps.split(self.sizes, dim=1)
        sets = {n: p.unsqueeze(0) + _param_view(c, s, st)
                for n, p, c, s, st in zip(self.names, self.params, chunks, self.shapes, self.strides)}

        def one(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(self.call, params, (loss_fn, idx), strict=False)

        with batch_statistics_only(self.model), autocast():
            try:
                out = torch.func.vmap(one, randomness="different", chunk_size=self.chunk_size)(sets)
            except RuntimeError as e:
                if not any(s in str(e) for s in ("vmap", "Batching rule", "batched")):
                    raise
                raise ConfigError(f"gsa.batched=true cannot run {type(self.model).__name__} with this loss under "
                                  f"torch.func.vmap: {str(e).splitlines()[0]}; set gsa.batched=false") from e
        return upcast(out)

    def backward(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], gid: torch.Tensor, counts: Sequence[float],
                 per_sample: torch.Tensor, eps: torch.Tensor, backward: Callable[[torch.Tensor, float], None],
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """The exact perturbed passes of the groups present (`counts` > 0), the parameters at theta: every sample's
        loss at theta + eps_g of its group g (`eps` [G, d]), weighted by `per_sample` and summed, differentiated by
        `backward` (its gradient with respect to theta accumulates in the parameters' gradients). Returns each
        sample's loss at its group's perturbation."""
        present = [g for g, c in enumerate(counts) if c > 0]
        everyone = torch.arange(len(gid), device=gid.device)
        # the present groups' ids: a host-to-device copy that does not wait for the device
        groups = torch.tensor(present).to(gid.device, non_blocking=True)
        losses = self.losses(loss_fn, everyone, eps if len(present) == eps.shape[0] else eps.index_select(0, groups),
                             autocast)
        backward((losses * per_sample * (gid[None, :] == groups[:, None])).sum(), 1.0)
        slot = torch.zeros(eps.shape[0], dtype=torch.long, device=gid.device)
        slot[groups] = torch.arange(len(present), device=gid.device)
        return losses.detach().gather(0, slot[gid][None]).squeeze(0)
