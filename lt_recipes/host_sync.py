"""Count the device-to-host synchronisations of a piece of code, on any device.

On a GPU the host waits for the device whenever a value computed there is read on the host: `Tensor.item`,
`tolist`, `float()` / `bool()` / `int()` of a tensor (an `if` on a tensor included), `nonzero`, `unique`,
`bincount` (it sizes its output from the data), boolean-mask indexing, `torch.tensor(...)` of a list that holds
tensors, `.cpu()` / `.numpy()`, printing a tensor. A step that waits there leaves the device idle while the host
catches up and launches the next kernels, so the steps keep these to a budget (docs/benchmarks.md).

`count_host_syncs()` counts these calls with a torch function mode, so the count is the same on the CPU (where none
of them waits) as on a GPU; on a GPU, `torch.cuda.set_sync_debug_mode("warn")` reports the synchronisations CUDA
itself sees (tools/device_check.sh). Calls made by torch's own Python code inside a counted call are not counted
again, nor calls inside `on_host()`, which marks code that works on tensors already on the host (after the one
transfer that brought them there). A tensor made from Python data with an explicit `device` counts too: on a GPU its
copy there is a blocking one.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# calls that read a device value on the host whatever their arguments
_ALWAYS = {
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
    Tensor.__complex__, Tensor.__repr__, Tensor.__format__, Tensor.nonzero, torch.nonzero, Tensor.argwhere,
    torch.argwhere, Tensor.unique, torch.unique, torch.unique_consecutive, Tensor.bincount, torch.bincount,
    Tensor.masked_select, torch.masked_select, Tensor.cpu, Tensor.numpy, torch.equal, Tensor.equal,
    torch.allclose, Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero,
}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__}
_FROM_DATA = {torch.tensor, torch.as_tensor}

_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


_paused = 0


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Code on host tensors (their transfer counted where it happened): its calls are not counted."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


def _holds_tensor(data: Any) -> bool:
    if isinstance(data, Tensor):
        return False  # a tensor as such is copied on the device
    if isinstance(data, (list, tuple)):
        return any(isinstance(d, Tensor) or _holds_tensor(d) for d in data)
    return False


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module: where the synchronising call is written."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH + os.sep):
            return f"{os.path.relpath(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


@dataclass
class SyncCount:
    """The synchronising calls seen: their number and, per call, its name and where it was made."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)

    def __str__(self) -> str:
        return f"{self.count} host synchronisations" + "".join(f"\n  {name} at {where}" for name, where in self.calls)


class _Counter(TorchFunctionMode):
    def __init__(self, out: SyncCount) -> None:
        super().__init__()
        self.out = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _paused and (func in _ALWAYS or (func in _INDEXING and len(args) > 1 and _has_bool_mask(args[1]))
                or (func in _FROM_DATA and args and not isinstance(args[0], Tensor)
                    and (_holds_tensor(args[0]) or kwargs.get("device") is not None))
                or (func is torch.where and len(args) + len(kwargs) == 1)):
            self.out.calls.append((getattr(func, "__name__", str(func)), _caller()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count the host synchronisations of the code inside (module docstring).

    >>> with count_host_syncs() as syncs:
    ...     step.step(loss_fn, targets)
    >>> syncs.count
    """
    out = SyncCount()
    with _Counter(out):
        yield out
