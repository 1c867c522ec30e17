"""The released script's step (reading `released`) against a float64 oracle written from that script's equations.

The oracle follows ChenShengHan100/gkp-gsa's `cifar_OneBackward.py` and `sam.GSA` line by line, per parameter tensor:
one whole-batch training forward per group present (BatchNorm momentum 0.1 each), one backward of the sum of the
groups' alpha * mean loss + (1 - alpha) * GKP of the other groups, the FriendlySAM momenta updated in place and
cascaded through the one gradient, the ASAM-scaled clamped radius per group, the batch-share mean perturbation, one
perturbed forward at BatchNorm momentum 0 with GKP at the perturbed weights, plain SGD.
"""
import copy
import math

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


def test_released_step_equals_its_float64_oracle_with_batchnorm():
    """Two steps (the momenta enter in the second) with three groups, GKP, alpha 0.85, on a CNN with BatchNorm2d and
    BatchNorm1d: weights and running statistics (which move K times a step, at momentum 0.1)."""
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(n=30, image=True)
    n_cov = sum(p.numel() for p in _covered(model.named_parameters()))
    g = torch.Generator().manual_seed(4)
    anchors, fisher, gamma = torch.randn(3, n_cov, generator=g) * 0.3, torch.rand(3, n_cov, generator=g), 50.0
    oracle = copy.deepcopy(model).double()
    step = ReleasedGSA(model, torch.optim.SGD(model.parameters(), lr=0.05))
    step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    step.set_gkp(anchors, fisher, torch.tensor([gamma / 2 / n for n in GROUP_SIZES]))
    momenta = {}
    for _ in range(2):
        stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y, alpha=0.85)
        released_oracle(oracle, x.double(), y, 0.85, 0.05, (anchors.double(), fisher.double(), gamma), momenta)
        assert not stats.skipped and stats.gkp > 0 and all(0.002 <= r <= 0.003 for r in stats.rho)
        for (name, want), got in zip(oracle.state_dict().items(), model.state_dict().values()):
            if name.endswith("num_batches_tracked"):  # the script counts K + 1 forwards a step; it reads it nowhere
                continue
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6, msg=name)
