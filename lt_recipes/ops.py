"""Fused vector ops of GSA and GKP over flattened parameters, with a plain PyTorch reference backend.

GSA and GKP touch every parameter G times per step; each op here does its work in one pass over its inputs
(C++/CUDA kernels of csrc/, registered as `torch.ops.lt_recipes.*` by the extension `lt_recipes._C`). The
reference backend is the same math in plain torch ops; the fused kernels are tested against it.

backend: "fused" runs the extension and raises when it is missing; "reference" runs plain torch; "auto" runs the
extension when it has a kernel for the inputs' device and otherwise the reference (warning once per process when
the extension failed to load, and also for more groups than the kernels take, MAX_FUSED_GROUPS).
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch

from .choices import BACKENDS

_logger = logging.getLogger(__name__)

MAX_FUSED_GROUPS = 32  # kMaxGroups of csrc/lt_ops.h
_STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    import lt_recipes._C  # noqa: F401  (registers torch.ops.lt_recipes.*)
    _EXT_ERROR: str | None = None
except ImportError as exc:
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    _logger.debug("lt_recipes._C did not load: %s", _EXT_ERROR)
_EXT_LOADED = _EXT_ERROR is None
# Device types with a compiled kernel, fixed at import so backend choice is plain Python under torch.compile.
_FUSED_DEVICES = frozenset(
    dev for dev in ("cpu", "cuda")
    if _EXT_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("lt_recipes::gsa_project", dev.upper()))
_warned_fallback = False

if _EXT_LOADED:
    @torch.library.register_fake("lt_recipes::gsa_project")
    def _gsa_project_fake(grads: torch.Tensor, weights: torch.Tensor, global_grad: torch.Tensor):
        return grads.new_empty(grads.shape[0]), grads.new_empty(grads.shape[0])

    @torch.library.register_fake("lt_recipes::gkp_penalty")
    def _gkp_penalty_fake(theta, anchors, fisher, coef):
        return theta.new_empty(())

    @torch.library.register_fake("lt_recipes::gkp_penalty_accumulate")
    def _gkp_penalty_accumulate_fake(theta, anchors, fisher, coef, grad_out):
        return theta.new_empty(())


def fused_available() -> bool:
    """Whether the compiled extension `lt_recipes._C` loaded (so backend="fused" can run)."""
    return _EXT_LOADED


def _use_fused(op: str, backend: str, device: torch.device, groups: int) -> bool:
    """Resolve `backend` for one call; raises for an unknown backend or a "fused" request that cannot run."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "fused":
        if not _EXT_LOADED:
            raise RuntimeError(f"{op}: backend='fused' needs the compiled extension lt_recipes._C, which did not load "
                               f"({_EXT_ERROR}); build it with `pip install --no-build-isolation -e .` or use "
                               f"backend='reference'")
        if device.type not in _FUSED_DEVICES:
            raise RuntimeError(f"{op}: backend='fused' has no kernel for {device.type} tensors in this build (kernels "
                               f"for: {sorted(_FUSED_DEVICES)}); rebuild with FORCE_CUDA=1 or use backend='reference'")
        if groups > MAX_FUSED_GROUPS:
            raise ValueError(f"{op}: backend='fused' takes at most {MAX_FUSED_GROUPS} groups, got G={groups}; "
                             f"use backend='reference'")
        return True
    if not _EXT_LOADED and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"lt_recipes.ops: the compiled extension did not load ({_EXT_ERROR}); using the slower "
                      f"reference backend", RuntimeWarning, stacklevel=3)
    return device.type in _FUSED_DEVICES and groups <= MAX_FUSED_GROUPS


def _describe(t: torch.Tensor) -> str:
    extra = "" if t.is_contiguous() else " (non-contiguous)"
    return f"shape {list(t.shape)} dtype {t.dtype} on {t.device}{extra}"


def _check(op: str, name: str, t: object, what: str, ndim: int, dtypes: Sequence[torch.dtype],
           device: torch.device | None, length: tuple[int, str] | None = None) -> None:
    """Raise naming `op`, the argument and the expectation unless t is a contiguous ndim-D tensor as described."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a {what}, got {type(t).__name__}")
    if t.dim() != ndim or t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be a {what}, got {_describe(t)}")
    if length is not None and t.shape[0] != length[0]:
        raise ValueError(f"{op}: {name} must have length {length[0]} ({length[1]}), got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the first argument, got {_describe(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got {_describe(t)}")


def _check_scalar(op: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__} {value!r}")


def gsa_project(grads: torch.Tensor, weights: torch.Tensor, backend: str = "auto",
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global gradient and each group's component along it, in one read of the group gradients.

    grads [G, d] and weights [G] are float32. Returns global_grad [d] = sum_g weights_g grads_g (accumulated in
    float64, rounded to float32), coef [G] with coef_g = <grads_g, global_grad> / ||global_grad||^2 (0 when
    ||global_grad|| is 0) and residual_norm [G] = ||grads_g - coef_g global_grad||, all float32. The residual is
    never formed: residual_norm_g^2 = ||grads_g||^2 - coef_g <grads_g, global_grad>, which cancels when the residual
    is small next to grads_g, so the dot products and norms are accumulated in float64 (fp32 products are exact
    there) and the difference is clamped at 0. `out` (float32 [d], not overlapping grads) receives global_grad
    instead of a new tensor, which saves allocating and first-touching d floats per call on the CPU.
    """
    op = "gsa_project"
    _check(op, "grads", grads, "2-D float32 tensor [G, d]", 2, (torch.float32,), None)
    _check(op, "weights", weights, "1-D float32 tensor [G]", 1, (torch.float32,), grads.device,
           (grads.shape[0], "G, the rows of grads"))
    if grads.shape[0] == 0:
        raise ValueError(f"{op}: grads must have at least one row (group), got {_describe(grads)}")
    if out is None:
        out = grads.new_empty(grads.shape[1])
    else:
        _check(op, "out", out, "1-D float32 tensor [d]", 1, (torch.float32,), grads.device,
               (grads.shape[1], "d, the columns of grads"))
        if not torch.compiler.is_compiling() and _overlap(out, grads):
            raise ValueError(f"{op}: out must not share memory with grads")
    if _use_fused(op, backend, grads.device, grads.shape[0]):
        coef, residual = torch.ops.lt_recipes.gsa_project(grads, weights, out)
        return out, coef, residual
    return _gsa_project_reference(grads, weights, out)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share bytes of memory."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a.numel() > 0 and b.numel() > 0 and a0 < b0 + b.numel() * b.element_size() and \
        b0 < a0 + a.numel() * a.element_size()


def _gsa_project_reference(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor):
    g64 = grads.double()
    global_grad = out.copy_((weights.double()[:, None] * g64).sum(0))
    glob64 = global_grad.double()
    gg = torch.dot(glob64, glob64)
    dots = g64 @ glob64
    coef = dots / gg if gg > 0 else torch.zeros_like(dots)
    sq = (g64 * g64).sum(1)
    residual = (sq - coef * dots).clamp_min(0.0).sqrt()
    return global_grad, coef.float(), residual.float()


def gkp_penalty(theta: torch.Tensor, anchors: torch.Tensor, fisher: torch.Tensor, coef: torch.Tensor,
                grad_out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """sum_j coef_j sum_i fisher_ji (theta_i - anchors_ji)^2 as a 0-dim float32 tensor, in one pass.

    theta [d] and coef [G] are float32; anchors and fisher [G, d] may each be float32, bfloat16 or float16 (read
    as such, computed in float32). When grad_out (float32 [d]) is given, 2 sum_j coef_j fisher_ji (theta_i -
    anchors_ji) is added to it in the same pass. Terms are formed in float32 and summed in float64.
    """
    op = "gkp_penalty"
    stored = "2-D float32, bfloat16 or float16 tensor [G, d]"
    _check(op, "theta", theta, "1-D float32 tensor [d]", 1, (torch.float32,), None)
    _check(op, "anchors", anchors, stored, 2, _STORED_DTYPES, theta.device)
    if anchors.shape[1] != theta.shape[0]:
        raise ValueError(f"{op}: anchors must have {theta.shape[0]} columns (d, the length of theta), "
                         f"got {_describe(anchors)}")
    if anchors.shape[0] == 0:
        raise ValueError(f"{op}: anchors must have at least one row (group), got {_describe(anchors)}")
    _check(op, "fisher", fisher, stored, 2, _STORED_DTYPES, theta.device)
    if fisher.shape != anchors.shape:
        raise ValueError(f"{op}: fisher must have the shape of anchors {list(anchors.shape)}, got {_describe(fisher)}")
    _check(op, "coef", coef, "1-D float32 tensor [G]", 1, (torch.float32,), theta.device,
           (anchors.shape[0], "G, the rows of anchors"))
    if grad_out is not None:
        _check(op, "grad_out", grad_out, "1-D float32 tensor [d]", 1, (torch.float32,), theta.device,
               (theta.shape[0], "d, the length of theta"))
    if _use_fused(op, backend, theta.device, anchors.shape[0]):
        if grad_out is None:
            return torch.ops.lt_recipes.gkp_penalty(theta, anchors, fisher, coef)
        return torch.ops.lt_recipes.gkp_penalty_accumulate(theta, anchors, fisher, coef, grad_out)
    return _gkp_penalty_reference(theta, anchors, fisher, coef, grad_out)


def _gkp_penalty_reference(theta, anchors, fisher, coef, grad_out):
    diff = theta - anchors.float()
    weighted = coef[:, None] * fisher.float() * diff
    value = (weighted * diff).sum(dtype=torch.float64).float()
    if grad_out is not None:
        grad_out.add_(weighted.sum(0), alpha=2.0)
    return value
