"""Per-group parameter offsets over a group-sorted batch: the one-pass forward of the grouped step.

The batch is sorted by group, so group g's samples form one contiguous segment. Inside `group_offsets`, every
module that holds parameters applies theta + O_g to segment g, where O is a [G, ...] offset per parameter, while
BatchNorm still normalises the whole batch (its affine part is per segment). Two uses (docs/method.md):

- share (pass 1): O = E, a zero offset whose gradient is wanted. One backward of the batch loss gives, in E's row g,
  group g's share of the one global gradient (paper Eq. 11 read as a split of the batch gradient). The rows sum to
  the batch gradient exactly; without BatchNorm each row is the group's own gradient.
- perturb (pass 2): O = eps_g - eps_bar with the parameters at theta + eps_bar, differentiated with respect to
  theta: group g's samples see theta + eps_g, the perturbed group losses of Eq. 15 in one pass.

A model input may stack several views of the batch ([x, v1, v2] for BCL): a layer input of k * B rows is read as k
copies of the segments. Computations whose rows are not samples (BCL's class prototypes) run inside
`lt_recipes.models.shared()`, at the parameters' own value (the model says where; this pass reads it); a layer that
sees a row count that is not a multiple of B outside `shared()` is an error rather than a silent mis-assignment.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import in_shared, shared

_logger = logging.getLogger(__name__)

_state = threading.local()


class SegmentError(RuntimeError):
    """A layer saw rows that cannot be assigned to groups."""


class Layout:
    """Group segments of a sorted batch of `sum(counts)` samples: group g owns rows [start_g, start_g + counts[g])."""

    def __init__(self, counts: Sequence[int]) -> None:
        self.counts = [int(c) for c in counts]
        self.batch = sum(self.counts)
        self.runs: list[tuple[int, int, int]] = []
        start = 0
        for g, n in enumerate(self.counts):
            if n:
                self.runs.append((start, start + n, g))
            start += n
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def runs_for(self, rows: int, where: str) -> list[tuple[int, int, int]]:
        """(start, stop, group) of every segment of a layer input with `rows` = k * B rows."""
        if self.batch == 0 or rows % self.batch:
            raise SegmentError(f"{where} got {rows} rows, not a multiple of the batch's {self.batch} samples; run "
                               "computations whose rows are not samples inside lt_recipes.segments.shared()")
        k = rows // self.batch
        return [(v * self.batch + s, v * self.batch + e, g) for v in range(k) for s, e, g in self.runs]

    def group_index(self, rows: int, device: torch.device, where: str) -> torch.Tensor:
        """The group of every row of a layer input with `rows` = k * B rows, as a long tensor."""
        key = (rows, device)
        if key not in self._index:
            idx = torch.empty(rows, dtype=torch.long)
            for s, e, g in self.runs_for(rows, where):
                idx[s:e] = g
            self._index[key] = idx.to(device)
        return self._index[key]


def _active() -> tuple[Layout, dict[int, torch.Tensor], bool] | None:
    return None if in_shared() else getattr(_state, "active", None)


def _base(p: torch.Tensor) -> torch.Tensor:
    """The parameter as the offsets' base: detached in a share pass, where only the offsets' gradient is wanted."""
    return p.detach() if _state.active[2] else p


def _offset_rows(module: nn.Module, name: str, g: int, offsets: dict[int, torch.Tensor]) -> torch.Tensor:
    p = module._parameters[name]
    return _base(p) + offsets[id(p)][g]


def _fast_conv(module: nn.Module) -> bool:
    """Linear layers and zero-padded convolutions with numeric padding get the fused segment functions."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
                                             and module.padding_mode == "zeros"
                                             and not isinstance(module.padding, str))


def _apply(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b) if isinstance(module, nn.Linear) else module._conv_forward(x, w, b)


def _input_grad(module: nn.Module, dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return dout @ w
    return torch.ops.aten.convolution_backward(dout, x, w, None, module.stride, module.padding, module.dilation, False,
                                               [0] * len(module.stride), module.groups, [True, False, False])[0]


def _weight_grad(module: nn.Module, dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return dout.reshape(-1, dout.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return torch.ops.aten.convolution_backward(dout, x, w, None, module.stride, module.padding, module.dilation, False,
                                               [0] * len(module.stride), module.groups, [False, True, False])[1]


def _bias_grad(dout: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return dout.sum(dim=[d for d in range(dout.dim()) if d != (dout.dim() - 1 if isinstance(module, nn.Linear) else 1)])


class _ShareConv(torch.autograd.Function):
    """Pass 1 of a linear/conv layer at E = 0: one whole-batch forward and input gradient; the weight gradient
    computed per segment and returned as the gradient of the zero offsets E [G, ...]."""

    @staticmethod
    def forward(ctx, x, weight, bias, e_weight, e_bias, module, runs):
        out = _apply(module, x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.runs, ctx.groups, ctx.has_bias = module, runs, e_weight.shape[0], bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        module, dt = ctx.module, dout.dtype
        xc, wc = x.to(dt), weight.to(dt)
        dx = _input_grad(module, dout, xc, wc).to(x.dtype) if ctx.needs_input_grad[0] else None
        de_w = weight.new_zeros((ctx.groups, *weight.shape))
        de_b = weight.new_zeros((ctx.groups, weight.shape[0])) if ctx.has_bias else None
        for s, e, g in ctx.runs:
            de_w[g] += _weight_grad(module, dout[s:e], xc[s:e], wc)
            if de_b is not None:
                de_b[g] += _bias_grad(dout[s:e], module)
        return dx, None, None, de_w, de_b, None, None


class _PerturbConv(torch.autograd.Function):
    """Pass 2 of a linear/conv layer: segment g through weight + delta_g; the gradient with respect to the weight
    is one whole-batch weight gradient (every segment's weight is theta plus a constant)."""

    @staticmethod
    def forward(ctx, x, weight, bias, d_weight, d_bias, module, runs):
        outs = []
        for s, e, g in runs:
            outs.append(_apply(module, x[s:e], weight + d_weight[g], None if bias is None else bias + d_bias[g]))
        ctx.save_for_backward(x, weight, d_weight)
        ctx.module, ctx.runs, ctx.has_bias = module, runs, bias is not None
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, dout):
        x, weight, d_weight = ctx.saved_tensors
        module, dt = ctx.module, dout.dtype
        xc = x.to(dt)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            for s, e, g in ctx.runs:
                dx[s:e] = _input_grad(module, dout[s:e], xc[s:e], (weight + d_weight[g]).to(dt))
        dw = _weight_grad(module, dout, xc, weight.to(dt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = _bias_grad(dout, module).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def _conv_linear(module: nn.Module, x: torch.Tensor, layout: Layout, offsets: dict[int, torch.Tensor],
                 share: bool) -> torch.Tensor:
    runs = layout.runs_for(x.shape[0], type(module).__name__)
    bias = module.bias
    e_bias = offsets[id(bias)] if bias is not None else None
    if not _fast_conv(module):
        outs = []
        for s, e, g in runs:
            w = _base(module.weight) + offsets[id(module.weight)][g]
            b = _base(bias) + e_bias[g] if bias is not None else None
            outs.append(_apply(module, x[s:e], w, b))
        return torch.cat(outs)
    if share:
        return _ShareConv.apply(x, module.weight.detach(), None if bias is None else bias.detach(),
                                offsets[id(module.weight)], e_bias, module, runs)
    return _PerturbConv.apply(x, module.weight, bias, offsets[id(module.weight)], e_bias, module, runs)


class _ShareBatchNorm(torch.autograd.Function):
    """Pass 1 of a training-mode BatchNorm at E = 0: the fused whole-batch normalisation and its input gradient;
    each segment's affine gradient from per-sample sums, returned as the gradient of the zero offsets E [G, C]."""

    @staticmethod
    def forward(ctx, x, weight, bias, e_weight, e_bias, running_mean, running_var, factor, eps, runs):
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                             factor, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.runs, ctx.groups = eps, runs, e_weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, mean, invstd = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_batch_norm_backward(dout, x, weight, None, None, mean, invstd, True, ctx.eps,
                                                           [True, False, False])[0]
        shape = (x.shape[0], x.shape[1], -1)  # [N, C, spatial], spatial 1 for BatchNorm1d on [N, C]
        dy, xf = dout.float().reshape(shape), x.float().reshape(shape)
        sum_dy = dy.sum(2)  # per sample and channel
        sum_dyx = torch.linalg.vecdot(dy, xf)
        de_w = weight.new_zeros((ctx.groups, weight.shape[0]))
        de_b = weight.new_zeros((ctx.groups, weight.shape[0]))
        for s, e, g in ctx.runs:
            s1 = sum_dy[s:e].sum(0)
            de_b[g] += s1
            de_w[g] += (sum_dyx[s:e].sum(0) - mean * s1) * invstd
        return dx, None, None, de_w, de_b, None, None, None, None, None


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, layout: Layout,
                offsets: dict[int, torch.Tensor], share: bool) -> torch.Tensor:
    """Normalise with the whole batch's statistics (and their gradient), as nn.BatchNorm*d would, then apply the
    affine part with each segment's own offset weights."""
    module._check_input_dim(x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    use_batch = module.training or (module.running_mean is None and module.running_var is None)
    track = not module.training or module.track_running_stats
    running_mean = module.running_mean if track else None
    running_var = module.running_var if track else None
    where = type(module).__name__
    if not module.affine:
        layout.runs_for(x.shape[0], where)
        return F.batch_norm(x, running_mean, running_var, None, None, use_batch, factor, module.eps)
    if share and use_batch:
        return _ShareBatchNorm.apply(x, module.weight.detach(), module.bias.detach(), offsets[id(module.weight)],
                                     offsets[id(module.bias)], running_mean, running_var, factor, module.eps,
                                     layout.runs_for(x.shape[0], where))
    xhat = F.batch_norm(x, running_mean, running_var, None, None, use_batch, factor, module.eps)
    gid = layout.group_index(x.shape[0], x.device, where)
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    scale = (_base(module.weight) + offsets[id(module.weight)])[gid].view(shape)
    shift = (_base(module.bias) + offsets[id(module.bias)])[gid].view(shape)
    return torch.addcmul(shift.to(xhat.dtype), xhat, scale.to(xhat.dtype))


def _generic(module: nn.Module, layout: Layout, offsets: dict[int, torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """Any other module with parameters of its own (GroupNorm, LayerNorm, cosine classifier): called per segment."""
    x = args[0]
    outs = []
    for s, e, g in layout.runs_for(x.shape[0], type(module).__name__):
        params = {n: _offset_rows(module, n, g, offsets) for n, p in module._parameters.items() if p is not None}
        with shared():  # the module's own forward, at the segment's parameters
            outs.append(functional_call(module, params, (x[s:e],) + args[1:], kwargs))
    return torch.cat(outs)


def _wrap(module: nn.Module):
    plain = type(module).forward

    def forward(*args, **kwargs):
        state = _active()
        if state is None:
            return plain(module, *args, **kwargs)
        layout, offsets, share = state
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return _conv_linear(module, args[0], layout, offsets, share)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            return _batch_norm(module, args[0], layout, offsets, share)
        return _generic(module, layout, offsets, *args, **kwargs)

    return forward


def offset_modules(model: nn.Module, params: Sequence[nn.Parameter]) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The modules whose own parameters get per-segment offsets, and the parameters that cannot (held by a module
    that also has parameterised children, or not trainable there): those act at one value for every row."""
    wanted = {id(p) for p in params}
    modules, covered = [], set()
    for m in model.modules():
        own = [p for p in m._parameters.values() if p is not None and id(p) in wanted]
        if not own:
            continue
        has_param_children = any(any(True for _ in c.parameters()) for c in m.children())
        if has_param_children or any(p is not None and id(p) not in wanted for p in m._parameters.values()):
            continue
        modules.append(m)
        covered.update(id(p) for p in own)
    rest = [p for p in params if id(p) not in covered]
    if rest:
        _logger.warning("grouped step: %d parameter tensors (%d elements) are not held by a leaf module; they take one "
                        "value for every group", len(rest), sum(p.numel() for p in rest))
    return modules, rest


@contextlib.contextmanager
def group_offsets(modules: Sequence[nn.Module], layout: Layout, offsets: dict[int, torch.Tensor],
                  share: bool) -> Iterator[None]:
    """Inside, each of `modules` applies its parameters plus offsets[id(p)][g] to segment g of every layer input.

    `offsets` maps each parameter (by id) to a [G, *p.shape] tensor: with `share`, a zero leaf whose gradient is
    wanted (the parameters themselves are detached there, so their own gradient collects only uses outside the
    segments); otherwise eps_g - eps_bar, differentiated through the parameters.
    """
    if getattr(_state, "active", None) is not None:
        raise SegmentError("group_offsets contexts do not nest")
    for m in modules:
        m.forward = _wrap(m)
    _state.active = (layout, offsets, share)
    try:
        with warnings.catch_warnings():
            # The zero offsets E are stride-0 expansions whose gradients are views into a [G, d] buffer.
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            yield
    finally:
        _state.active = None
        for m in modules:
            del m.forward
