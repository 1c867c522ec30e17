#!/usr/bin/env python3
"""Time the fused GSA/GKP ops against the plain PyTorch reference and a same-size tensor copy.

For each op the fused and reference backends run interleaved (A, B, A, B, ...) with a tensor copy dst.copy_(src)
of d float32 in every round, so all three see the same machine load; the medians are reported. Achieved GB/s
counts each input read once and each output written once (an accumulated output both). With --json the last line
is one JSON object with per-op medians, `fused_over_reference` (geometric mean of the speed-ups) and
`fraction_of_copy_bandwidth` (bytes of all fused ops over their total median time, divided by the copy's bytes/s).

    python tools/bench_kernels.py [--json] [--d 25600000] [--groups 4] [--repeats 5] [--device cpu|cuda] [--inner N]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from typing import Callable

import torch

from lt_recipes import ops

_logger = logging.getLogger(__name__)


def _timer(device: torch.device, inner: int) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of fn, over `inner` back-to-back calls (on a GPU: queued, then synchronized once)."""
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / inner
    return run


def _cases(d: int, groups: int, device: torch.device) -> list[tuple[str, int, Callable[[str], object]]]:
    """(name, bytes moved, fn(backend)) for each timed op."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    grads, weights, global_out = randn(groups, d), torch.rand(groups, generator=gen, device=device), randn(d)
    theta, coef, grad_out = randn(d), torch.rand(groups, generator=gen, device=device), torch.zeros(d, device=device)
    anchors, fisher = randn(groups, d), randn(groups, d).abs()
    anchors16, fisher16 = anchors.bfloat16(), fisher.bfloat16()
    f32, b16 = 4, 2
    return [
        ("gsa_project", (groups * d + groups + d + 2 * groups) * f32,
         lambda b: ops.gsa_project(grads, weights, backend=b, out=global_out)),
        ("gkp_penalty_fp32", (3 * d + 2 * groups * d + groups + 1) * f32,
         lambda b: ops.gkp_penalty(theta, anchors, fisher, coef, grad_out, backend=b)),
        ("gkp_penalty_bf16", (3 * d + groups + 1) * f32 + 2 * groups * d * b16,
         lambda b: ops.gkp_penalty(theta, anchors16, fisher16, coef, grad_out, backend=b)),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--d", type=int, default=25_600_000, help="flattened parameter count (ResNet-50: 25.6M)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per timing (default 1 on the CPU, 20 on a GPU, where one call is ~0.1 ms)")
    args = parser.parse_args(argv)
    if not ops.fused_available():
        parser.error("the extension lt_recipes._C is not built: pip install --no-build-isolation -e .")
    device = torch.device(args.device)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    timed = _timer(device, inner)
    cases = _cases(args.d, args.groups, device)
    src, dst = torch.randn(args.d, device=device), torch.empty(args.d, device=device)
    for _, _, fn in cases:
        fn("fused")
        fn("reference")
    dst.copy_(src)
    times: dict[str, list[float]] = {"copy": []}
    for name, _, _ in cases:
        times[f"{name}/fused"], times[f"{name}/reference"] = [], []
    for _ in range(args.repeats):
        times["copy"].append(timed(lambda: dst.copy_(src)))
        for name, _, fn in cases:
            times[f"{name}/fused"].append(timed(lambda: fn("fused")))
            times[f"{name}/reference"].append(timed(lambda: fn("reference")))
    med = {k: statistics.median(v) for k, v in times.items()}
    copy_gbps = 2 * args.d * 4 / med["copy"] / 1e9
    result_ops = {}
    print(f"device {device} ({torch.get_num_threads()} threads), d={args.d}, G={args.groups}, repeats={args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'op':<18}{'fused ms':>10}{'ref ms':>10}{'speed-up':>10}{'fused GB/s':>12}{'ref GB/s':>10}{'of copy':>9}")
    print(f"{'copy':<18}{med['copy'] * 1e3:>10.2f}{'':>10}{'':>10}{copy_gbps:>12.2f}")
    for name, nbytes, _ in cases:
        fused, ref = med[f"{name}/fused"], med[f"{name}/reference"]
        result_ops[name] = {"bytes": nbytes, "fused_ms": fused * 1e3, "reference_ms": ref * 1e3,
                            "speedup": ref / fused, "fused_gbps": nbytes / fused / 1e9,
                            "reference_gbps": nbytes / ref / 1e9}
        r = result_ops[name]
        print(f"{name:<18}{r['fused_ms']:>10.2f}{r['reference_ms']:>10.2f}{r['speedup']:>9.2f}x"
              f"{r['fused_gbps']:>12.2f}{r['reference_gbps']:>10.2f}{r['fused_gbps'] / copy_gbps:>9.2f}")
    speedup = math.exp(statistics.fmean(math.log(r["speedup"]) for r in result_ops.values()))
    fused_gbps = sum(r["bytes"] for r in result_ops.values()) / sum(r["fused_ms"] for r in result_ops.values()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "d": args.d,
              "groups": args.groups, "repeats": args.repeats, "inner": inner, "load_average": os.getloadavg()[0],
              "copy_ms": med["copy"] * 1e3, "copy_gbps": copy_gbps, "ops": result_ops,
              "fused_over_reference": speedup, "fraction_of_copy_bandwidth": fused_gbps / copy_gbps}
    print(f"fused over reference (geometric mean): {speedup:.2f}x; fused bandwidth {fused_gbps:.2f} GB/s = "
          f"{result['fraction_of_copy_bandwidth']:.2f} of copy")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
