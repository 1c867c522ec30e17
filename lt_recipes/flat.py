"""Flattened parameters: a model's parameters and gradients as views into contiguous buffers.

GSA and GKP are vector operations over every parameter; with the parameters of one dtype and device living in one
buffer of length d (and their gradients in another), each is one kernel over one vector instead of a loop over
tensors. Per-group gradients live in a [G, d] buffer, and pointing every `.grad` at row g makes the next backward
accumulate straight into that row, with no copy per group.

The module is unchanged: every parameter keeps its identity, shape and strides (only its storage moves), so
optimizers, hooks, `state_dict` / `load_state_dict` (which copy in place) and DDP keep working. Autograd's
AccumulateGrad adds into an existing `.grad` in place when grad mode is off during backward (the normal
`loss.backward()`); `backward(create_graph=True)` and `optimizer.zero_grad(set_to_none=True)` (the default) replace
the `.grad` tensors instead, after which `grads_to_main()` / `grads_to_row(g)` restore the views. Flatten after
the model is on its final device and dtype: `module.to(...)` that changes them allocates new storage.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

_logger = logging.getLogger(__name__)


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides if it covers exactly numel elements without overlap (any dim order), else contiguous strides."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= size
    return t.stride()


def flat_view(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 1-D `vec` (like.numel() elements, stride 1) viewed with `like`'s shape and strides: `vec` read in `like`'s
    memory order, the order a FlatParams buffer holds a parameter (NHWC for a channels_last weight, not the logical
    order of `reshape(-1)`)."""
    return vec.as_strided(like.shape, _dense_strides(like), vec.storage_offset())


def pack(tensors: Sequence[torch.Tensor | None], likes: Sequence[torch.Tensor],
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """One vector of `tensors` (None: zeros), each laid out in the memory order of its `like`, so that a vector of
    per-parameter values (a Fisher row, a gradient) lines up with a FlatParams buffer of those parameters."""
    out = torch.zeros(sum(p.numel() for p in likes), dtype=dtype or likes[0].dtype, device=likes[0].device)
    offset = 0
    for t, like in zip(tensors, likes):
        if t is not None:
            flat_view(out[offset:offset + like.numel()], like).copy_(t)
        offset += like.numel()
    return out


class FlatParams:
    """Make params (one dtype, one device) views into one contiguous buffer; grads views into another; plus
    optional [G, d] group-grad rows.

    Attributes: data [d] (each p.data is a view into it), grad [d] (each p.grad is a view into it, unless the
    grads point at a row), rows [num_rows, d], numel (d), params (in buffer order), offsets (start of each).
    """

    def __init__(self, params: Sequence[nn.Parameter], num_rows: int = 0):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatParams: params is empty; pass at least one parameter")
        first = self.params[0]
        seen: set[int] = set()
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"FlatParams: params[{i}] must be a tensor (nn.Parameter), got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"FlatParams: params[{i}] (shape {list(p.shape)}) appears twice")
            seen.add(id(p))
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"FlatParams: params[{i}] is {p.dtype} on {p.device}, params[0] is {first.dtype} on "
                                 f"{first.device}; one FlatParams holds one dtype and device (use flatten_model)")
        self._check_no_overlap()
        self.strides = [_dense_strides(p) for p in self.params]
        self.offsets = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.data = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            views = [self._view(self.data, i) for i in range(len(self.params))]
            for i, (view, p) in enumerate(zip(views, self.params)):
                view.copy_(p)
                if p.grad is not None:
                    self._view(self.grad, i).copy_(p.grad)
            for view, p in zip(views, self.params):
                p.data = view
        size = self.data.element_size()
        self._pointers = [self.data.data_ptr() + off * size for off in self.offsets]
        self.rows = self.grad.new_zeros(0, total)
        self.resize_rows(num_rows)
        _logger.debug("flattened %d parameters (%d elements, %s on %s), %d gradient rows", len(self.params), total,
                      first.dtype, first.device, num_rows)

    def _check_no_overlap(self) -> None:
        """Parameters that share memory would be separated by flattening: refuse them."""
        spans = sorted((p.untyped_storage().data_ptr(), p.storage_offset() * p.element_size(),
                        (p.storage_offset() + p.numel()) * p.element_size(), i) for i, p in enumerate(self.params))
        for (s0, _, e0, i0), (s1, b1, _, i1) in zip(spans, spans[1:]):
            if s0 == s1 and b1 < e0:
                raise ValueError(f"FlatParams: params[{i0}] and params[{i1}] share memory; flattening would split them")

    def detached(self) -> list[int]:
        """The parameters that no longer live in `data` (re-allocated by `module.to(...)` after flattening, e.g.
        to another memory format, dtype or device): their updates would never reach the model."""
        base, size = self.data.data_ptr(), self.data.element_size()
        return [i for i, (p, off) in enumerate(zip(self.params, self.offsets)) if p.data_ptr() != base + off * size]

    def attached(self) -> bool:
        """Whether every parameter still lives in `data` (the per-step check: one pointer per parameter)."""
        return [p.data_ptr() for p in self.params] == self._pointers

    def _view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter i's slice of a 1-D buffer (or buffer row), shaped and strided like the parameter."""
        p = self.params[i]
        return buffer.as_strided(p.shape, self.strides[i], buffer.storage_offset() + self.offsets[i])

    def _point_grads(self, buffer: torch.Tensor) -> None:
        for i, p in enumerate(self.params):
            p.grad = self._view(buffer, i)

    def grads_to_row(self, g: int) -> None:
        """Point every p.grad at its slice of rows[g]: backward then accumulates straight into row g."""
        if not 0 <= g < self.rows.shape[0]:
            raise IndexError(f"FlatParams.grads_to_row: row {g} out of range for {self.rows.shape[0]} rows")
        self._point_grads(self.rows[g])

    def grads_to_main(self) -> None:
        """Point every p.grad back at its slice of `grad`."""
        self._point_grads(self.grad)

    def resize_rows(self, num_rows: int) -> None:
        """Reallocate `rows` as zeros [num_rows, d] and point the grads back at `grad`."""
        if num_rows < 0:
            raise ValueError(f"FlatParams.resize_rows: num_rows must be >= 0, got {num_rows}")
        self.rows = self.grad.new_zeros(num_rows, self.numel)
        self.grads_to_main()


def flatten_model(model: nn.Module, params: Iterable[nn.Parameter] | None = None,
                  num_rows: int = 0) -> list[FlatParams]:
    """Flatten `params` (default: the model's parameters that require grad) into one FlatParams per (dtype, device),
    in order of first appearance; a parameter listed twice is flattened once."""
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    buckets: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            buckets.setdefault((p.dtype, p.device), []).append(p)
    if not buckets:
        raise ValueError(f"flatten_model: no parameters to flatten in {type(model).__name__}")
    return [FlatParams(group, num_rows=num_rows) for group in buckets.values()]
