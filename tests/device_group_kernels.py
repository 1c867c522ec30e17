"""Run by tools/device_check.sh: the fused kernels' group-count variants above the 8 groups the CUDA tests draw (9-16
groups run the 16-group variant, 17-32 the 32-group one) against the reference backend, on the device given (`cuda`,
or `cpu` in the rehearsal). Prints one line per case; exits non-zero on a mismatch."""
from __future__ import annotations

import sys

import torch

import lt_recipes.ops as ops


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a.double().cpu(), b.double().cpu(), rtol=1e-4, atol=1e-5))


def main(device: str) -> None:
    bad = []
    for groups in (9, 16, 17, 32):
        gen = torch.Generator().manual_seed(groups)
        d = 100_003  # several blocks and a ragged tail
        grads, weights = torch.randn(groups, d, generator=gen), torch.rand(groups, generator=gen)
        theta, anchors = torch.randn(d, generator=gen), torch.randn(groups, d, generator=gen)
        fisher, coef = torch.rand(groups, d, generator=gen), torch.rand(groups, generator=gen)
        got, want = [], []
        for backend, out in (("fused", got), ("reference", want)):
            args = [t.to(device) for t in (grads, weights)]
            out += list(ops.gsa_project(*args, backend=backend))
            grad_out = torch.zeros(d, device=device)
            out.append(ops.gkp_penalty(*(t.to(device) for t in (theta, anchors, fisher, coef)), grad_out=grad_out,
                                       backend=backend))
            out.append(grad_out)
        same = [close(a, b) for a, b in zip(got, want)]
        print(f"G={groups}: gsa_project (global, coef, residual) and gkp_penalty (value, grad) fused == reference on "
              f"{device}: {same}", flush=True)
        if not all(same):
            bad.append(groups)
    if bad:
        raise SystemExit(f"fused kernels differ from the reference for G={bad}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
