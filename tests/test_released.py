"""The released script's step (reading `released`) against a float64 oracle written from that script's equations,
with the step in float32 and in float64.

The oracle follows ChenShengHan100/gkp-gsa's `cifar_OneBackward.py` and `sam.GSA` line by line, per parameter tensor:
one whole-batch training forward per group present (BatchNorm momentum 0.1 each), one backward of the sum of the
groups' alpha * mean loss + (1 - alpha) * GKP of the other groups, the FriendlySAM momenta updated in place and
cascaded through the one gradient, the ASAM-scaled clamped radius per group, the batch-share mean perturbation, one
perturbed forward at BatchNorm momentum 0 with GKP at the perturbed weights, plain SGD.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lt_recipes.steps import ReleasedGSA
from test_gsa import SmallCNN, _batch

GROUP_OF_CLASS = [0, 0, 1, 1, 2, 2]
GROUP_SIZES = [900, 120, 9]


def _covered(named):
    return [p for n, p in named if not n.startswith("classifier.")]


def released_oracle(model, x, y, alpha, lr, gkp, momenta, C=0.1, clamp=(0.002, 0.003), sigma=1.0, lam=0.9):
    """One released step on float64 `model` in place (weights and running statistics); `momenta` per group, updated."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    anchors, fisher, gamma = gkp
    gid = torch.tensor(GROUP_OF_CLASS)[y]
    present = sorted(set(gid.tolist()))
    B = len(y)

    def penalty(j, cov):
        vec = torch.cat([p.reshape(-1) for p in cov])
        return gamma / 2.0 * (1.0 / GROUP_SIZES[j]) * (fisher[j] * (vec - anchors[j]) ** 2).sum()

    total = 0.0
    for k in present:  # one whole-batch forward per group, BatchNorm running statistics moving each time
        logits = model(x)
        loss_gsa_k = F.cross_entropy(logits[gid == k], y[gid == k])
        loss_gkp_k = sum(penalty(j, _covered(model.named_parameters())) for j in range(len(GROUP_SIZES)) if j != k)
        total = total + alpha * loss_gsa_k + (1 - alpha) * loss_gkp_k
    grads = list(torch.autograd.grad(total, params))
    theta_norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in params))
    d_total = sum(p.numel() for p in params)
    ascent, weight = [torch.zeros_like(p) for p in params], 0.0
    for k in present:
        if k not in momenta:
            momenta[k] = [g.clone() for g in grads]
        else:
            before = [g.clone() for g in grads]
            grads = [g - momenta[k][i] * sigma for i, g in enumerate(grads)]
            momenta[k] = [momenta[k][i] * lam + before[i] * (1 - lam) for i in range(len(grads))]
        norm = torch.sqrt(sum(((p.detach().abs() * g) ** 2).sum() for p, g in zip(params, grads)))
        rho = C * torch.sqrt(theta_norm / (2.0 * norm)) * d_total ** -0.25 * (max(GROUP_SIZES[k], 2) - 1.0) ** -0.25
        rho = rho.clamp(min=clamp[0], max=clamp[1])
        scale = math.sqrt(d_total) * rho / norm
        w_k = float((gid == k).sum()) / B
        for i, (p, g) in enumerate(zip(params, grads)):
            ascent[i] += p.detach() ** 2 * g * scale * w_k
        weight += w_k
    perturbed = {n: (p.detach() + a / weight).requires_grad_() for n, p, a in zip(names, params, ascent)}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 0.0
    logits2 = functional_call(model, perturbed, (x,))
    for m in bns:
        m.momentum = 0.1
    cov2 = [perturbed[n] for n in names if not n.startswith("classifier.")]
    gkp2 = sum(float((gid == k).sum()) / B * sum(penalty(j, cov2) for j in range(len(GROUP_SIZES)) if j != k)
               for k in present)
    loss2 = alpha * F.cross_entropy(logits2, y) + (1 - alpha) * gkp2
    grads2 = torch.autograd.grad(loss2, [perturbed[n] for n in names])
    with torch.no_grad():
        for p, g in zip(params, grads2):
            p -= lr * g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_released_step_equals_its_float64_oracle_with_batchnorm(dtype):
    """Three steps (the momenta enter in the second, their EMA in the third) with three groups, GKP, alpha 0.85, on a CNN with BatchNorm2d and
    BatchNorm1d: weights and running statistics (which move K times a step, at momentum 0.1). In float64 the step
    runs in the parameters' precision throughout (GKP through the fused op's float64 path) and agrees to float64
    rounding, so a rule changed by 1e-10 fails; in float32 to float32 rounding."""
    torch.manual_seed(0)
    model = SmallCNN(norm="bn").to(dtype)
    x, y = _batch(n=30, image=True)
    n_cov = sum(p.numel() for p in _covered(model.named_parameters()))
    g = torch.Generator().manual_seed(4)
    anchors, fisher, gamma = torch.randn(3, n_cov, generator=g) * 0.3, torch.rand(3, n_cov, generator=g), 50.0
    oracle = copy.deepcopy(model).double()
    step = ReleasedGSA(model, torch.optim.SGD(model.parameters(), lr=0.05), backend="fused")
    step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    step.set_gkp(anchors.to(dtype), fisher.to(dtype), torch.tensor([gamma / 2 / n for n in GROUP_SIZES], dtype=dtype))
    momenta = {}
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for _ in range(3):
        stats = step.step(lambda idx: F.cross_entropy(model(x[idx].to(dtype)), y[idx], reduction="none"), y,
                          alpha=0.85)
        released_oracle(oracle, x.double(), y, 0.85, 0.05, (anchors.double(), fisher.double(), gamma), momenta)
        assert not stats.skipped and stats.gkp > 0 and all(0.002 <= r <= 0.003 for r in stats.rho)
        for (name, want), got in zip(oracle.state_dict().items(), model.state_dict().values()):
            if name.endswith("num_batches_tracked"):  # the script counts K + 1 forwards a step; it reads it nowhere
                continue
            torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m: f"{name}: {m}")
