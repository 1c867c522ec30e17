"""Fused vector ops of GSA and GKP over flattened parameters, with a plain PyTorch reference backend.

GSA and GKP touch every parameter G times per step; each op here does its work in one pass over its inputs. The op
schemas (`torch.ops.lt_recipes.*`) and their fake kernels, which let torch.compile and FakeTensorMode trace the ops,
are defined here and exist whether or not the compiled extension `lt_recipes._C` loads; the extension adds the
C++/CUDA kernels of csrc/ and the group limit of those kernels (MAX_FUSED_GROUPS, None without the extension). The
reference backend is the same math in plain torch ops; the fused kernels are tested against it.

The ops compute in float32, or in float64 (the float64 path, which lets the steps run against float64 oracles): the
CPU kernels and the reference take both, the CUDA kernels float32 only ("auto" sends float64 there to the reference).

Argument rules are stated once in Python (`_check_gsa_project`, `_check_gkp`), for the wrappers and the fake
kernels; the kernels' TORCH_CHECKs in csrc/ops.cpp raise the same ValueError messages for direct op calls.

backend: "fused" runs the extension and raises when it is missing; "reference" runs plain torch; "auto" runs the
extension when it has a kernel for the inputs' device and the inputs have at most MAX_FUSED_GROUPS groups, and
otherwise the reference (warning once per process when the extension failed to load, and once when it has no CUDA
kernels for a CUDA tensor).
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .choices import BACKENDS

_logger = logging.getLogger(__name__)

_STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The compute dtypes: float32, and the float64 path (the CPU kernels and the reference; the CUDA kernels refuse it)
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_FLOAT64_DEVICES = frozenset({"cpu"})

_lib = torch.library.Library("lt_recipes", "DEF")
# Writes global_grad = sum_g weights_g grads_g; returns coef_g = <grads_g, global_grad> / ||global_grad||^2 (0 when
# that is 0) and residual_norm_g = ||grads_g - coef_g global_grad||.
_lib.define("gsa_project(Tensor grads, Tensor weights, Tensor(a!) global_grad) -> (Tensor coef, Tensor residual_norm)")
# sum_j coef_j sum_i fisher_ji (theta_i - anchors_ji)^2.
_lib.define("gkp_penalty(Tensor theta, Tensor anchors, Tensor fisher, Tensor coef) -> Tensor")
# The same value; also grad_out += 2 sum_j coef_j fisher_ji (theta_i - anchors_ji), in the same pass.
_lib.define("gkp_penalty_accumulate(Tensor theta, Tensor anchors, Tensor fisher, Tensor coef, Tensor(a!) grad_out) "
            "-> Tensor")

try:
    from . import _C  # registers the CPU (and CUDA) kernels of the ops defined above
    _EXT_ERROR: str | None = None
    MAX_FUSED_GROUPS: int | None = _C.MAX_GROUPS
except ImportError as exc:
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    MAX_FUSED_GROUPS = None
    _logger.debug("lt_recipes._C did not load: %s", _EXT_ERROR)
_EXT_LOADED = _EXT_ERROR is None
# Device types with a compiled kernel, fixed at import so backend choice is plain Python under torch.compile.
_FUSED_DEVICES = frozenset(
    dev for dev in ("cpu", "cuda")
    if _EXT_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("lt_recipes::gsa_project", dev.upper()))
_warned_fallback = False
_warned_no_cuda = False


def fused_available() -> bool:
    """Whether the compiled extension `lt_recipes._C` loaded (so backend="fused" can run)."""
    return _EXT_LOADED


def _use_fused(op: str, backend: str, device: torch.device, groups: int,
               dtype: torch.dtype = torch.float32) -> bool:
    """Resolve `backend` for one call; raises for an unknown backend or a "fused" request that cannot run here.

    More groups than the kernels take is left to the kernel's own check under "fused" and sent to the reference
    under "auto"; so is float64 on a device whose kernel is float32 only (CUDA).
    """
    global _warned_fallback, _warned_no_cuda
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
        if dtype == torch.float64 and device.type not in _FLOAT64_DEVICES:
            raise RuntimeError(f"{op}: backend='fused' has no float64 kernel for {device.type} tensors (the float64 "
                               f"path runs on: {sorted(_FLOAT64_DEVICES)}); use backend='reference'")
        return True
    if not _EXT_LOADED and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"lt_recipes.ops: the compiled extension did not load ({_EXT_ERROR}); using the slower "
                      f"reference backend", RuntimeWarning, stacklevel=3)
    elif _EXT_LOADED and device.type == "cuda" and "cuda" not in _FUSED_DEVICES and not _warned_no_cuda:
        _warned_no_cuda = True  # a .venv built CPU-only, used on a GPU
        warnings.warn("lt_recipes.ops: lt_recipes._C was built without CUDA kernels; backend='auto' runs the slower "
                      "reference ops on the GPU (rebuild on this machine: bash tools/setup_env.sh)", RuntimeWarning,
                      stacklevel=3)
    return (device.type in _FUSED_DEVICES and groups <= MAX_FUSED_GROUPS
            and (dtype != torch.float64 or device.type in _FLOAT64_DEVICES))


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


def _check_groups(op: str, name: str, t: torch.Tensor, max_groups: int | None) -> None:
    """Raise unless t has at least one row (group) and, when max_groups is given, at most that many."""
    if t.shape[0] == 0:
        raise ValueError(f"{op}: {name} must have at least one row (group), got {_describe(t)}")
    if max_groups is not None and t.shape[0] > max_groups:
        raise ValueError(f"{op}: the fused kernels take at most {max_groups} groups, got {t.shape[0]} (the reference "
                         f"backend takes any number)")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share bytes of memory; also right for fake tensors, which keep their aliasing.

    While dynamo traces a caller it answers False: the fake kernel checks the traced tensors instead.
    """
    if torch.compiler.is_dynamo_compiling() or a.numel() == 0 or b.numel() == 0:
        return False
    if StorageWeakRef(a.untyped_storage()) != StorageWeakRef(b.untyped_storage()):
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_gsa_project(grads: object, weights: object, out: object | None, max_groups: int | None) -> None:
    """The argument rules of gsa_project (out may be None: not given yet); max_groups is the kernels' limit or None.
    grads are float32 or float64, weights and out of the same dtype."""
    op = "gsa_project"
    _check(op, "grads", grads, "2-D float32 or float64 tensor [G, d]", 2, _COMPUTE_DTYPES, None)
    _check_groups(op, "grads", grads, max_groups)
    dt = _name(grads.dtype)
    _check(op, "weights", weights, f"1-D {dt} tensor [G]", 1, (grads.dtype,), grads.device,
           (grads.shape[0], "G, the rows of grads"))
    if out is not None:
        _check(op, "out", out, f"1-D {dt} tensor [d]", 1, (grads.dtype,), grads.device,
               (grads.shape[1], "d, the columns of grads"))
        if _overlap(out, grads):
            raise ValueError(f"{op}: out must not share memory with grads")


def _check_gkp(theta: object, anchors: object, fisher: object, coef: object, grad_out: object | None,
               max_groups: int | None) -> None:
    """The argument rules of gkp_penalty (and gkp_penalty_accumulate, which has a grad_out): theta float32 or
    float64, coef and grad_out of its dtype, anchors and fisher stored narrower or (float64 path) in float64."""
    op = "gkp_penalty"
    _check(op, "theta", theta, "1-D float32 or float64 tensor [d]", 1, _COMPUTE_DTYPES, None)
    wide = theta.dtype == torch.float64
    stored = f"2-D {'float64, ' if wide else ''}float32, bfloat16 or float16 tensor [G, d]"
    stored_dtypes = ((torch.float64,) if wide else ()) + _STORED_DTYPES
    dt = _name(theta.dtype)
    _check(op, "anchors", anchors, stored, 2, stored_dtypes, theta.device)
    if anchors.shape[1] != theta.shape[0]:
        raise ValueError(f"{op}: anchors must have {theta.shape[0]} columns (d, the length of theta), "
                         f"got {_describe(anchors)}")
    _check_groups(op, "anchors", anchors, max_groups)
    _check(op, "fisher", fisher, stored, 2, stored_dtypes, theta.device)
    if fisher.shape != anchors.shape:
        raise ValueError(f"{op}: fisher must have the shape of anchors {list(anchors.shape)}, got {_describe(fisher)}")
    _check(op, "coef", coef, f"1-D {dt} tensor [G]", 1, (theta.dtype,), theta.device,
           (anchors.shape[0], "G, the rows of anchors"))
    if grad_out is not None:
        _check(op, "grad_out", grad_out, f"1-D {dt} tensor [d]", 1, (theta.dtype,), theta.device,
               (theta.shape[0], "d, the length of theta"))


@torch.library.register_fake("lt_recipes::gsa_project")
def _gsa_project_fake(grads: torch.Tensor, weights: torch.Tensor,
                      global_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """coef and residual_norm [G] like the kernels', after their argument checks."""
    _check_gsa_project(grads, weights, global_grad, MAX_FUSED_GROUPS)
    return weights.new_empty(grads.shape[0]), weights.new_empty(grads.shape[0])


@torch.library.register_fake("lt_recipes::gkp_penalty")
def _gkp_penalty_fake(theta: torch.Tensor, anchors: torch.Tensor, fisher: torch.Tensor,
                      coef: torch.Tensor) -> torch.Tensor:
    """The 0-dim value in theta's dtype, after the kernels' argument checks."""
    _check_gkp(theta, anchors, fisher, coef, None, MAX_FUSED_GROUPS)
    return theta.new_empty(())


@torch.library.register_fake("lt_recipes::gkp_penalty_accumulate")
def _gkp_penalty_accumulate_fake(theta: torch.Tensor, anchors: torch.Tensor, fisher: torch.Tensor,
                                 coef: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The 0-dim value in theta's dtype (grad_out is updated in place), after the kernels' argument checks."""
    _check_gkp(theta, anchors, fisher, coef, grad_out, MAX_FUSED_GROUPS)
    return theta.new_empty(())


def gsa_project(grads: torch.Tensor, weights: torch.Tensor, backend: str = "auto",
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global gradient and each group's component along it, in one read of the group gradients.

    grads [G, d] and weights [G] are float32, or both float64 (the float64 path: CPU kernel or reference). Returns
    global_grad [d] = sum_g weights_g grads_g (accumulated in float64, rounded to the inputs' dtype), coef [G] with
    coef_g = <grads_g, global_grad> / ||global_grad||^2 (0 when ||global_grad|| is 0) and residual_norm [G] =
    ||grads_g - coef_g global_grad||, all in the inputs' dtype. The residual is
    never formed: residual_norm_g^2 = ||grads_g||^2 - coef_g <grads_g, global_grad>, which cancels when the residual
    is small next to grads_g, so the dot products and norms are accumulated in float64 (fp32 products are exact
    there) and the difference is clamped at 0. `out` ([d], not overlapping grads) receives global_grad
    instead of a new tensor, which saves allocating and first-touching d floats per call on the CPU.
    """
    _check_gsa_project(grads, weights, out, None)
    if out is None:
        out = grads.new_empty(grads.shape[1])
    if _use_fused("gsa_project", backend, grads.device, grads.shape[0], grads.dtype):
        coef, residual = torch.ops.lt_recipes.gsa_project(grads, weights, out)
        return out, coef, residual
    return _gsa_project_reference(grads, weights, out)


def _gsa_project_reference(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor):
    g64 = grads.double()
    global_grad = out.copy_((weights.double()[:, None] * g64).sum(0))
    glob64 = global_grad.double()
    gg = torch.dot(glob64, glob64)
    dots = g64 @ glob64
    coef = dots / gg if gg > 0 else torch.zeros_like(dots)
    sq = (g64 * g64).sum(1)
    residual = (sq - coef * dots).clamp_min(0.0).sqrt()
    return global_grad, coef.to(grads.dtype), residual.to(grads.dtype)


def gkp_penalty(theta: torch.Tensor, anchors: torch.Tensor, fisher: torch.Tensor, coef: torch.Tensor,
                grad_out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """sum_j coef_j sum_i fisher_ji (theta_i - anchors_ji)^2 as a 0-dim tensor of theta's dtype, in one pass.

    theta [d] and coef [G] are float32, or both float64 (the float64 path: CPU kernel or reference); anchors and
    fisher [G, d] may each be float32, bfloat16 or float16, or float64 on the float64 path (read as such, computed
    in theta's dtype). When grad_out ([d], theta's dtype) is given, 2 sum_j coef_j fisher_ji (theta_i - anchors_ji)
    is added to it in the same pass. Terms are formed in theta's dtype and summed in float64.
    """
    _check_gkp(theta, anchors, fisher, coef, grad_out, None)
    if _use_fused("gkp_penalty", backend, theta.device, anchors.shape[0], theta.dtype):
        if grad_out is None:
            return torch.ops.lt_recipes.gkp_penalty(theta, anchors, fisher, coef)
        return torch.ops.lt_recipes.gkp_penalty_accumulate(theta, anchors, fisher, coef, grad_out)
    return _gkp_penalty_reference(theta, anchors, fisher, coef, grad_out)


def _gkp_penalty_reference(theta, anchors, fisher, coef, grad_out):
    diff = theta - anchors.to(theta.dtype)
    weighted = coef[:, None] * fisher.to(theta.dtype) * diff
    value = (weighted * diff).sum(dtype=torch.float64).to(theta.dtype)
    if grad_out is not None:
        grad_out.add_(weighted.sum(0), alpha=2.0)
    return value
