"""The fused GSA/GKP ops against float64 NumPy and against the reference backend, on the CPU and (when present)
the GPU; input validation by the wrappers, the kernels and the fake kernels; the group limit; opcheck;
torch.compile; the missing-extension paths."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from lt_recipes import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
STORED = [torch.float32, torch.bfloat16, torch.float16]
CHUNK = 1 << 14  # the CPU kernels' reduction chunk: sizes around it cross chunk and block edges
SIZES = st.one_of(st.integers(1, 3000), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]))
BIG_SIZES = st.integers(1_000_001, 1_100_000)
FEW = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=25, deadline=None)


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _t(a: np.ndarray, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, copy=True)


# ---- float64 NumPy references (independent of ops.py) -----------------------------------------------------------


def np_project(grads: np.ndarray, weights: np.ndarray, rounding: type = np.float32):
    """global in float64 rounded to `rounding` (what the op returns: its inputs' dtype), then everything about it in
    float64 with the residual formed explicitly."""
    g = grads.astype(np.float64)
    glob = (weights.astype(np.float64)[:, None] * g).sum(0).astype(rounding).astype(np.float64)
    gg = glob @ glob
    coef = g @ glob / gg if gg > 0 else np.zeros(len(g))
    residual = np.linalg.norm(g - coef[:, None] * glob, axis=1)
    return glob, coef, residual


def np_gkp(theta: np.ndarray, anchors: np.ndarray, fisher: np.ndarray, coef: np.ndarray):
    """Value, gradient and an elementwise bound on the gradient's float32 rounding (sum of |terms|)."""
    diff = theta.astype(np.float64)[None, :] - anchors
    terms = coef.astype(np.float64)[:, None] * fisher * diff
    return (terms * diff).sum(), 2 * terms.sum(0), 2 * np.abs(terms).sum(0)


def _assert_project(out, grads: np.ndarray, weights: np.ndarray) -> None:
    glob, coef, residual = (t.cpu().double().numpy() for t in out)
    ref_glob, ref_coef, ref_res = np_project(grads, weights)
    row_norm = np.linalg.norm(grads.astype(np.float64), axis=1)
    np.testing.assert_allclose(glob, ref_glob, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(coef, ref_coef, rtol=1e-5,
                               atol=1e-6 * row_norm.max() / max(np.linalg.norm(ref_glob), 1e-30))
    # the fused residual comes from ||g||^2 - c <g, global> in float64: compare on the scale of ||g_g||
    np.testing.assert_allclose(residual, ref_res, rtol=1e-5, atol=1e-5 * row_norm.max())


def _run_project(grads: np.ndarray, weights: np.ndarray, device: str) -> None:
    gt, wt = _t(grads, device), _t(weights, device)
    fused = ops.gsa_project(gt, wt, backend="fused")
    reference = ops.gsa_project(gt, wt, backend="reference")
    _assert_project(fused, grads, weights)
    _assert_project(reference, grads, weights)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@SOME
@given(groups=st.integers(1, 8), d=SIZES, seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_gsa_project_matches_float64(device, groups, d, seed, scale):
    rng = np.random.default_rng(seed)
    _run_project(_rand(rng, groups, d, scale=scale), rng.random(groups).astype(np.float32), device)


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(groups=st.integers(1, 8), d=BIG_SIZES, seed=st.integers(0, 2**32 - 1))
def test_gsa_project_matches_float64_big(device, groups, d, seed):
    rng = np.random.default_rng(seed)
    _run_project(_rand(rng, groups, d), rng.random(groups).astype(np.float32), device)


@pytest.mark.parametrize("device", DEVICES)
def test_gsa_project_zero_global_gradient(device):
    rng = np.random.default_rng(0)
    row = _rand(rng, 5001)
    for grads, weights in [(np.stack([row, row]), np.array([1.0, -1.0], np.float32)),  # cancels exactly
                           (_rand(rng, 3, 5001), np.zeros(3, np.float32))]:
        for backend in ("fused", "reference"):
            glob, coef, residual = ops.gsa_project(_t(grads, device), _t(weights, device), backend=backend)
            assert torch.count_nonzero(glob) == 0
            assert torch.count_nonzero(coef) == 0
            np.testing.assert_allclose(residual.cpu().numpy(), np.linalg.norm(grads.astype(np.float64), axis=1),
                                       rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 7, CHUNK + 3, 200_001])
def test_gsa_project_zero_residual(device, d):
    """Rows that are multiples of the global gradient: coef is the multiple, the residual 0 (no cancellation
    noise: with global == row 0 exactly, ||g||^2 - c <g, global> is 0 in exact arithmetic and in float64)."""
    row = _rand(np.random.default_rng(d), d)
    grads = np.stack([row, 2 * row, -row])
    weights = np.array([0.5, 0.25, 0.0], np.float32)  # global = 0.5 row + 0.5 row = row, exactly
    for backend in ("fused", "reference"):
        glob, coef, residual = ops.gsa_project(_t(grads, device), _t(weights, device), backend=backend)
        torch.testing.assert_close(glob.cpu(), torch.from_numpy(row), rtol=0, atol=0)
        torch.testing.assert_close(coef.cpu(), torch.tensor([1.0, 2.0, -1.0]), rtol=1e-6, atol=0)
        assert residual.abs().max().item() <= 1e-6 * np.linalg.norm(row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1000, 200_001])
def test_gsa_project_small_residual_keeps_precision(device, d):
    """Rows nearly parallel to the global gradient (residual 1e-4 of the row): ||g||^2 - c <g, global> cancels 8
    digits, which float32 accumulation would lose entirely; float64 keeps the residual to 1e-3 relative."""
    rng = np.random.default_rng(d)
    direction = rng.standard_normal(d)
    grads = np.stack([k * direction + 1e-4 * k * rng.standard_normal(d) for k in (1.0, -2.0, 0.5)]).astype(np.float32)
    weights = np.array([0.6, 0.1, 0.3], np.float32)
    _, _, ref_res = np_project(grads, weights)
    assert (ref_res < 2e-4 * np.linalg.norm(grads.astype(np.float64), axis=1)).all()
    for backend in ("fused", "reference"):
        _, _, residual = ops.gsa_project(_t(grads, device), _t(weights, device), backend=backend)
        np.testing.assert_allclose(residual.cpu().numpy(), ref_res, rtol=1e-3)


def test_gsa_project_out_and_thread_count_independence():
    rng = np.random.default_rng(1)
    grads = _t(_rand(rng, 4, 5 * CHUNK + 11), "cpu")
    weights = _t(rng.random(4).astype(np.float32), "cpu")
    out = torch.full((grads.shape[1],), float("nan"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.gsa_project(grads, weights, backend="fused")
        torch.set_num_threads(max(2, threads))
        multi = ops.gsa_project(grads, weights, backend="fused", out=out)
    finally:
        torch.set_num_threads(threads)
    assert multi[0] is out
    for a, b in zip(single, multi):
        assert torch.equal(a, b)  # fixed chunking: bitwise the same for any thread count


def _run_gkp(groups: int, d: int, seed: int, a_dtype: torch.dtype, f_dtype: torch.dtype, device: str,
             with_grad: bool) -> None:
    rng = np.random.default_rng(seed)
    theta = _rand(rng, d)
    anchors = _t(theta[None, :] + _rand(rng, groups, d, scale=0.1), device, a_dtype)
    fisher = _t(np.abs(_rand(rng, groups, d)), device, f_dtype)
    coef = rng.random(groups).astype(np.float32)
    # the float64 reference sees exactly the stored (rounded) anchors and Fisher values
    value, grad, bound = np_gkp(theta, anchors.cpu().double().numpy(), fisher.cpu().double().numpy(), coef)
    start = _rand(rng, d)
    results = []
    for backend in ("fused", "reference"):
        grad_out = _t(start, device) if with_grad else None
        got = ops.gkp_penalty(_t(theta, device), anchors, fisher, _t(coef, device), grad_out=grad_out,
                              backend=backend)
        assert got.shape == () and got.dtype == torch.float32
        np.testing.assert_allclose(got.item(), value, rtol=1e-5, atol=1e-30)
        if with_grad:
            err = np.abs(grad_out.cpu().double().numpy() - (start + grad))
            assert (err <= 1e-6 * (bound + np.abs(start)) + 1e-30).all(), f"{backend}: max error {err.max()}"
        results.append((got, grad_out))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    if with_grad:
        torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("device", DEVICES)
@SOME
@given(groups=st.integers(1, 8), d=SIZES, seed=st.integers(0, 2**32 - 1), a_dtype=st.sampled_from(STORED),
       f_dtype=st.sampled_from(STORED), with_grad=st.booleans())
def test_gkp_penalty_matches_float64(device, groups, d, seed, a_dtype, f_dtype, with_grad):
    _run_gkp(groups, d, seed, a_dtype, f_dtype, device, with_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_dtype", STORED)
@pytest.mark.parametrize("f_dtype", STORED)
def test_gkp_penalty_each_storage_dtype(device, a_dtype, f_dtype):
    _run_gkp(3, 2 * CHUNK + 5, 7, a_dtype, f_dtype, device, with_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(groups=st.integers(1, 8), d=BIG_SIZES, seed=st.integers(0, 2**32 - 1), a_dtype=st.sampled_from(STORED))
def test_gkp_penalty_matches_float64_big(device, groups, d, seed, a_dtype):
    _run_gkp(groups, d, seed, a_dtype, a_dtype, device, with_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gkp_penalty_at_the_anchor_is_zero(device):
    theta = torch.randn(1001, device=device)
    anchors = theta.expand(2, -1).contiguous()
    grad_out = torch.zeros(1001, device=device)
    value = ops.gkp_penalty(theta, anchors, torch.rand(2, 1001, device=device), torch.ones(2, device=device),
                            grad_out=grad_out, backend="fused")
    assert value.item() == 0.0 and torch.count_nonzero(grad_out) == 0


# ---- the float64 path: what lets the steps' float64 oracles run GKP and GSA through the ops ------------------------


@pytest.mark.parametrize("stored", [torch.float64, *STORED])
def test_gkp_penalty_float64_path_matches_float64(stored):
    """theta, coef and grad_out float64, anchors and Fisher stored in float64 or narrower, across chunk and block
    edges: value and gradient to float64 rounding on both backends (1e-13, where a float32 step is 1e-7 off)."""
    rng = np.random.default_rng(11)
    groups, d = 3, 2 * CHUNK + 5
    theta = rng.standard_normal(d)
    anchors = _t(theta[None, :] + 0.1 * rng.standard_normal((groups, d)), "cpu", stored)
    fisher = _t(np.abs(rng.standard_normal((groups, d))), "cpu", stored)
    coef = rng.random(groups)
    value, grad, bound = np_gkp(theta, anchors.double().numpy(), fisher.double().numpy(), coef)
    start = rng.standard_normal(d)
    for backend in ("fused", "reference"):
        grad_out = torch.from_numpy(start.copy())
        got = ops.gkp_penalty(torch.from_numpy(theta), anchors, fisher, torch.from_numpy(coef), grad_out=grad_out,
                              backend=backend)
        assert got.shape == () and got.dtype == torch.float64
        np.testing.assert_allclose(got.item(), value, rtol=1e-13, atol=0)
        err = np.abs(grad_out.numpy() - (start + grad))
        assert (err <= 1e-14 * (bound + np.abs(start))).all(), f"{backend}: max error {err.max()}"


def test_gsa_project_float64_path_matches_float64():
    rng = np.random.default_rng(12)
    grads, weights = rng.standard_normal((4, 2 * CHUNK + 5)), rng.random(4)
    ref_glob, ref_coef, ref_res = np_project(grads, weights, np.float64)
    row_norm = np.linalg.norm(grads, axis=1)
    for backend in ("fused", "reference"):
        out = ops.gsa_project(torch.from_numpy(grads), torch.from_numpy(weights), backend=backend)
        assert all(t.dtype == torch.float64 for t in out)
        glob, coef, residual = (t.numpy() for t in out)
        np.testing.assert_allclose(glob, ref_glob, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(coef, ref_coef, rtol=1e-13, atol=0)
        np.testing.assert_allclose(residual, ref_res, rtol=0, atol=1e-12 * row_norm.max())


def test_float64_on_a_float32_only_kernel_goes_to_the_reference(monkeypatch):
    """The CUDA kernels take float32 only: "auto" sends float64 there to the reference, "fused" refuses it."""
    monkeypatch.setattr(ops, "_FLOAT64_DEVICES", frozenset())
    grads, weights = torch.randn(2, 40, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    for a, b in zip(ops.gsa_project(grads, weights), ops.gsa_project(grads, weights, backend="reference")):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"gkp_penalty: backend='fused' has no float64 kernel for cpu tensors"):
        ops.gkp_penalty(grads[0], grads, grads.abs(), weights, backend="fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernels_refuse_float64_and_auto_takes_the_reference():
    lt = torch.ops.lt_recipes
    g, w = torch.randn(2, 40, dtype=torch.float64, device="cuda"), torch.rand(2, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"gsa_project: the CUDA kernel takes float32 only"):
        lt.gsa_project(g, w, torch.empty(40, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match=r"gkp_penalty: the CUDA kernel takes float32 only"):
        lt.gkp_penalty(g[0], g, g.abs(), w)
    grad = torch.zeros(40, dtype=torch.float64, device="cuda")
    value = ops.gkp_penalty(g[0], g, g.abs(), w, grad_out=grad)
    want = ops.gkp_penalty(g[0].cpu(), g.cpu(), g.abs().cpu(), w.cpu(), backend="fused")
    assert value.dtype == torch.float64 and float(value) == pytest.approx(float(want), rel=1e-13)


def test_more_groups_than_the_kernels_take_use_the_reference():
    grads, weights = torch.randn(ops.MAX_FUSED_GROUPS + 1, 50), torch.rand(ops.MAX_FUSED_GROUPS + 1)
    auto = ops.gsa_project(grads, weights)
    for a, b in zip(auto, ops.gsa_project(grads, weights, backend="reference")):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"at most {ops.MAX_FUSED_GROUPS} groups, got {ops.MAX_FUSED_GROUPS + 1}"):
        ops.gsa_project(grads, weights, backend="fused")


def test_group_limit_is_the_extensions():
    """MAX_FUSED_GROUPS is read from the extension, and the kernels take exactly that many groups (computing them
    right) and no more; the fake kernels apply the same limit."""
    import lt_recipes._C

    limit = ops.MAX_FUSED_GROUPS
    assert limit == lt_recipes._C.MAX_GROUPS and limit > 8
    rng = np.random.default_rng(limit)
    _run_project(_rand(rng, limit, 301), rng.random(limit).astype(np.float32), "cpu")
    _run_gkp(limit, 301, limit, torch.float32, torch.bfloat16, "cpu", with_grad=True)
    lt = torch.ops.lt_recipes
    for mode in ("kernel", "fake"):
        with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
            g, w, out = torch.randn(limit + 1, 10), torch.rand(limit + 1), torch.empty(10)
            with pytest.raises(ValueError, match=f"the fused kernels take at most {limit} groups, got {limit + 1}"):
                lt.gsa_project(g, w, out)
            with pytest.raises(ValueError, match=f"the fused kernels take at most {limit} groups, got {limit + 1}"):
                lt.gkp_penalty_accumulate(out, g, g, w, out.clone())


# ---- validation ---------------------------------------------------------------------------------------------------


def _bad_calls():
    g, w, d = torch.randn(3, 10), torch.rand(3), torch.randn(10)
    meta = torch.device("meta")
    th, a, f, c = torch.randn(10), torch.randn(2, 10), torch.rand(2, 10), torch.rand(2)
    return [
        (lambda b: ops.gsa_project(g[0], w, backend=b),
         r"grads must be a 2-D float32 or float64 tensor \[G, d\], got shape \[10\]"),
        (lambda b: ops.gsa_project(g.long(), w, backend=b),
         r"grads must be a 2-D float32 or float64 .* dtype torch.int64"),
        (lambda b: ops.gsa_project(g.double(), w, backend=b), r"weights must be a 1-D float64 tensor \[G\]"),
        (lambda b: ops.gsa_project(torch.randn(10, 3).t(), w, backend=b), r"grads must be contiguous"),
        (lambda b: ops.gsa_project(g, w[:2], backend=b), r"weights must have length 3 \(G, the rows of grads\)"),
        (lambda b: ops.gsa_project(g, w.to(meta), backend=b), r"weights must be on cpu like the first argument"),
        (lambda b: ops.gsa_project(g[:0], w[:0], backend=b), r"grads must have at least one row"),
        (lambda b: ops.gsa_project(g, w, backend=b, out=d[:9]), r"out must have length 10"),
        (lambda b: ops.gsa_project(g, w, backend=b, out=g[1]), r"out must not share memory with grads"),
        (lambda b: ops.gkp_penalty(th, a.long(), f, c, backend=b),
         r"anchors must be a 2-D float32, bfloat16 or float16 tensor \[G, d\]"),
        (lambda b: ops.gkp_penalty(th, a[:, :9].contiguous(), f, c, backend=b), r"anchors must have 10 columns"),
        (lambda b: ops.gkp_penalty(th, a, f[:1], c, backend=b), r"fisher must have the shape of anchors \[2, 10\]"),
        (lambda b: ops.gkp_penalty(th, a, f, c[:1], backend=b), r"coef must have length 2"),
        (lambda b: ops.gkp_penalty(th, a, f.to(meta), c, backend=b), r"fisher must be on cpu"),
        (lambda b: ops.gkp_penalty(th, a, f, c, grad_out=th.double(), backend=b), r"grad_out must be a 1-D float32"),
        (lambda b: ops.gkp_penalty(torch.randn(20)[::2], a, f, c, backend=b), r"theta must be contiguous"),
        (lambda b: ops.gkp_penalty(th.half(), a, f, c, backend=b), r"theta must be a 1-D float32 or float64 tensor"),
        (lambda b: ops.gkp_penalty(th.double(), a, f, c, backend=b), r"coef must be a 1-D float64 tensor \[G\]"),
        (lambda b: ops.gkp_penalty(th, a.double(), f, c, backend=b),
         r"anchors must be a 2-D float32, bfloat16 or float16 tensor \[G, d\], got .* torch.float64"),
        (lambda b: ops.gkp_penalty(th.double(), a.double(), f.long(), c.double(), backend=b),
         r"fisher must be a 2-D float64, float32, bfloat16 or float16 tensor \[G, d\]"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference", "auto"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_rejected_with_what_was_expected(backend, case):
    call, message = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call(backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'fused', 'reference'\), got 'cuda'"):
        ops.gsa_project(torch.randn(2, 3), torch.rand(2), backend="cuda")


def _bad_op_calls():
    """Direct op calls that break one argument rule each, with the message expected; tensors are made when called,
    so under FakeTensorMode they are fake."""
    lt = torch.ops.lt_recipes
    g, w, out = torch.randn(3, 10), torch.rand(3), torch.empty(10)
    th, a, f, c = torch.randn(10), torch.randn(2, 10), torch.rand(2, 10), torch.rand(2)
    return [
        (lambda: lt.gsa_project(g[0], w, out),
         r"gsa_project: grads must be a 2-D float32 or float64 tensor \[G, d\], got shape \[10\]"),
        (lambda: lt.gsa_project(g.long(), w, out), r"gsa_project: grads must be a 2-D float32 or float64 tensor"),
        (lambda: lt.gsa_project(g.double(), w, out), r"gsa_project: weights must be a 1-D float64 tensor \[G\]"),
        (lambda: lt.gsa_project(g.double(), w.double(), out), r"gsa_project: out must be a 1-D float64 tensor \[d\]"),
        (lambda: lt.gsa_project(torch.randn(10, 3).t(), w, out), r"gsa_project: grads must be contiguous"),
        (lambda: lt.gsa_project(g[:0], w[:0], out), r"gsa_project: grads must have at least one row \(group\)"),
        (lambda: lt.gsa_project(g, w[:2], out), r"gsa_project: weights must have length 3 \(G, the rows of grads\)"),
        (lambda: lt.gsa_project(g, w, out[:9]), r"gsa_project: out must have length 10 \(d, the columns of grads\)"),
        (lambda: lt.gsa_project(g, w, g[2]), r"gsa_project: out must not share memory with grads"),
        (lambda: lt.gkp_penalty(th, a.long(), f, c),
         r"gkp_penalty: anchors must be a 2-D float32, bfloat16 or float16 tensor \[G, d\]"),
        (lambda: lt.gkp_penalty(th, a[:, :9].contiguous(), f, c), r"gkp_penalty: anchors must have 10 columns"),
        (lambda: lt.gkp_penalty(th, a[:0], f[:0], c[:0]), r"gkp_penalty: anchors must have at least one row"),
        (lambda: lt.gkp_penalty(th, a, f[:1], c), r"gkp_penalty: fisher must have the shape of anchors \[2, 10\]"),
        (lambda: lt.gkp_penalty(th, a, f, c[:1]), r"gkp_penalty: coef must have length 2 \(G, the rows of anchors\)"),
        (lambda: lt.gkp_penalty(torch.randn(20)[::2], a, f, c), r"gkp_penalty: theta must be contiguous"),
        (lambda: lt.gkp_penalty_accumulate(th, a, f, c, out[:9]), r"gkp_penalty: grad_out must have length 10"),
        (lambda: lt.gkp_penalty_accumulate(th, a, f, c, out.double()), r"gkp_penalty: grad_out must be a 1-D float32"),
        (lambda: lt.gkp_penalty(th.double(), a, f, c), r"gkp_penalty: coef must be a 1-D float64 tensor \[G\]"),
        (lambda: lt.gkp_penalty(th, a.double(), f, c),
         r"gkp_penalty: anchors must be a 2-D float32, bfloat16 or float16 tensor \[G, d\]"),
        (lambda: lt.gkp_penalty_accumulate(th.double(), a, f, c.double(), out),
         r"gkp_penalty: grad_out must be a 1-D float64 tensor \[d\]"),
    ]


@pytest.mark.parametrize("mode", ["kernel", "fake"])
@pytest.mark.parametrize("case", range(len(_bad_op_calls())))
def test_kernels_and_fake_kernels_check_their_inputs_alike(mode, case):
    """The C++ kernels and the fake kernels reject the same calls with the same ValueError message."""
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        call, message = _bad_op_calls()[case]
        with pytest.raises(ValueError, match=message):
            call()


_WITHOUT_EXTENSION = """
import json, sys
sys.modules["lt_recipes._C"] = None  # the import of the extension fails, as when it was never built
import torch
from torch._library.simple_registry import singleton
from torch._subclasses.fake_tensor import FakeTensorMode
from lt_recipes import ops

names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lt_recipes::"))
report = {"loaded": ops.fused_available(), "limit": ops.MAX_FUSED_GROUPS, "names": names,
          "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("lt_recipes::gsa_project", "CPU"),
          "fakes": [singleton.find(n).fake_impl.kernel is not None for n in names]}
lt = torch.ops.lt_recipes
with FakeTensorMode():
    g, w, out = torch.randn(40, 10), torch.rand(40), torch.empty(10)
    a, f = torch.randn(40, 10).half(), torch.rand(40, 10)
    outputs = [*lt.gsa_project(g, w, out), lt.gkp_penalty(out, a, f, w), lt.gkp_penalty_accumulate(out, a, f, w, g[0])]
    report["shapes"] = [list(t.shape) for t in outputs]
    try:
        lt.gkp_penalty(out, a, f[:3], w)
    except ValueError as exc:
        report["error"] = str(exc)
print(json.dumps(report))
"""


def test_fake_kernels_are_registered_without_the_extension():
    """In a process where lt_recipes._C cannot be imported, every lt_recipes op still has its schema and a fake
    kernel that checks shapes (no group limit: there are no kernels to limit)."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] is False and report["limit"] is None and report["cpu_kernel"] is False
    assert report["names"] == ["lt_recipes::gkp_penalty", "lt_recipes::gkp_penalty_accumulate",
                               "lt_recipes::gsa_project"]
    assert report["fakes"] == [True, True, True]
    assert report["shapes"] == [[40], [40], [], []]
    assert report["error"].startswith("gkp_penalty: fisher must have the shape of anchors [40, 10], got shape [3, 10]")


# ---- torch.library integration ------------------------------------------------------------------------------------


def _op_samples(device: str):
    g = torch.randn(3, 1001, device=device)
    w = torch.rand(3, device=device)
    d = [torch.randn(1001, device=device) for _ in range(4)]
    a, f = torch.randn(3, 1001, device=device).bfloat16(), torch.rand(3, 1001, device=device)
    lt = torch.ops.lt_recipes
    return [(lt.gsa_project.default, (g, w, torch.empty(1001, device=device))),
            (lt.gkp_penalty.default, (d[0], a, f, w)),
            (lt.gkp_penalty_accumulate.default, (d[0], a, f, w, d[1]))]


def test_opcheck_float64_path():
    lt = torch.ops.lt_recipes
    g, w = torch.randn(3, 1001, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    d = [torch.randn(1001, dtype=torch.float64) for _ in range(2)]
    for op, args in [(lt.gsa_project.default, (g, w, torch.empty(1001, dtype=torch.float64))),
                     (lt.gkp_penalty.default, (d[0], g, g.abs(), w)),
                     (lt.gkp_penalty_accumulate.default, (d[0], g.float(), g.abs().bfloat16(), w, d[1]))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = _op_samples(device)
    assert sorted(op._schema.name for op, _ in samples) == \
        sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lt_recipes::"))  # every op
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_compiled_function_calls_the_ops():
    """aot_eager: traces the ops through their fake kernels and functionalizes the mutations (inductor compiles
    the same graph but takes far longer on a 2-core machine)."""
    def step(grads, weights, theta, anchors, fisher, coef, grad_out):
        glob, coef_g, residual = ops.gsa_project(grads, weights, backend="fused")
        value = ops.gkp_penalty(theta, anchors, fisher, coef, grad_out=grad_out, backend="fused")
        return glob * 2, coef_g, residual, value + 1

    torch.manual_seed(0)
    args = [torch.randn(3, 999), torch.rand(3), torch.randn(999), torch.randn(2, 999).half(), torch.rand(2, 999),
            torch.rand(2), torch.zeros(999)]
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*eager_args)):
        assert torch.equal(got, want)
    assert torch.equal(args[6], eager_args[6])  # the mutation is kept


def test_compiled_call_checks_aliasing_in_the_fake_kernel():
    """dynamo does not trace the wrapper's storage comparison; the fake kernel makes the same check on the traced
    tensors, which keep their aliasing."""
    compiled = torch.compile(lambda g, w: ops.gsa_project(g, w, backend="fused", out=g[1]), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(Exception, match=r"gsa_project: out must not share memory with grads"):
        compiled(torch.randn(3, 64), torch.rand(3))


# ---- backend selection --------------------------------------------------------------------------------------------


def test_fused_backend_without_extension_raises(monkeypatch):
    monkeypatch.setattr(ops, "_EXT_LOADED", False)
    monkeypatch.setattr(ops, "_EXT_ERROR", "ImportError: simulated")
    assert not ops.fused_available()
    with pytest.raises(RuntimeError, match=r"backend='fused' needs the compiled extension lt_recipes._C.*simulated"):
        ops.gkp_penalty(torch.randn(5), torch.randn(1, 5), torch.rand(1, 5), torch.rand(1), backend="fused")


def test_auto_backend_without_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_EXT_LOADED", False)
    monkeypatch.setattr(ops, "_EXT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    grads, weights = torch.randn(2, 40), torch.rand(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.gsa_project(grads, weights)
        ops.gsa_project(grads, weights)
    assert [str(w.message) for w in caught if "extension did not load" in str(w.message)] == \
        ["lt_recipes.ops: the compiled extension did not load (ImportError: simulated); using the slower reference "
         "backend"]
    for a, b in zip(first, ops.gsa_project(grads, weights, backend="reference")):
        assert torch.equal(a, b)


def test_auto_backend_on_cuda_without_cuda_kernels_warns_once(monkeypatch):
    """A .venv built CPU-only and used on a GPU: "auto" runs the reference there, and says so once. No GPU here, so
    the backend choice is asked for a CUDA device directly."""
    monkeypatch.setattr(ops, "_EXT_LOADED", True)
    monkeypatch.setattr(ops, "_FUSED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(ops, "_warned_no_cuda", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops._use_fused("gkp_penalty", "auto", torch.device("cuda", 0), 2)
        assert not ops._use_fused("gsa_project", "auto", torch.device("cuda", 0), 2)
    assert [str(w.message) for w in caught] == [
        "lt_recipes.ops: lt_recipes._C was built without CUDA kernels; backend='auto' runs the slower reference ops "
        "on the GPU (rebuild on this machine: bash tools/setup_env.sh)"]


def test_fused_backend_without_a_kernel_for_the_device_raises(monkeypatch):
    monkeypatch.setattr(ops, "_FUSED_DEVICES", frozenset({"cuda"}))
    with pytest.raises(RuntimeError, match=r"no kernel for cpu tensors in this build"):
        ops.gsa_project(torch.randn(2, 3), torch.rand(2), backend="fused")
    glob, _, _ = ops.gsa_project(torch.ones(2, 3), torch.ones(2))  # auto: reference, silently
    assert torch.equal(glob, torch.full((3,), 2.0))
