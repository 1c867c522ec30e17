"""GKP: Eq. 6 summed over groups (value and gradient) against autograd, and the Fisher estimate against a direct one."""
import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lt_recipes import ops
from lt_recipes.equations import gkp_weights, group_weights
from lt_recipes.gkp import estimate_fisher, gkp_strength
from lt_recipes.models import is_classifier, ordered_parameters
from oracles import fisher_diagonal, gkp_group_loss, total_objective


@pytest.mark.parametrize("norm", ["per_classes", "per_samples"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("weighting", ["samples", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gkp_value_and_gradient_equal_autograd_of_eq6(norm, backend, weighting, dtype):
    """The fused penalty with c_j = (1 - alpha) (sum_{g != j} w_g) strength_j is Eq. 16's weighted sum of Eq. 6: to
    float32 rounding, and on the float64 path to float64 rounding (a coefficient off by 1e-10 fails)."""
    g = torch.Generator().manual_seed(0)
    G, d, lam, alpha = 4, 301, 100.0, 0.7
    batch_counts = [20, 7, 0, 5]
    theta = torch.randn(d, generator=g).to(dtype)
    anchors, fisher = torch.randn(G, d, generator=g).to(dtype), torch.rand(G, d, generator=g).to(dtype)
    classes, samples = [3, 2, 4, 1], [500, 120, 60, 7]
    sizes = torch.tensor(classes if norm == "per_classes" else samples, dtype=torch.float64)
    t = theta.double().requires_grad_(True)
    w = group_weights(weighting, batch_counts)
    want = total_objective([torch.zeros(())] * G, [gkp_group_loss(t, anchors.double(), fisher.double(), sizes, k, lam)
                                                   for k in range(G)], alpha, w)
    want_grad, = torch.autograd.grad(want, t)
    coef = ((1 - alpha) * gkp_strength(classes, samples, lam, norm) * torch.tensor(gkp_weights(w))).to(dtype)
    grad = torch.zeros(d, dtype=dtype)
    value = ops.gkp_penalty(theta, anchors, fisher, coef, grad_out=grad, backend=backend)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
    assert value.dtype == dtype and float(value) == pytest.approx(float(want), rel=rtol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol)


def test_strength_and_weights_by_hand():
    assert gkp_strength([2, 3], [100, 10], lam=10.0, norm="per_samples").tolist() == pytest.approx([5 / 100, 5 / 10])
    assert gkp_strength([2, 3], [100, 10], lam=10.0, norm="per_classes").tolist() == pytest.approx([5 / 2, 5 / 3])
    assert group_weights("samples", [6, 2, 0, 2]) == [0.6, 0.2, 0.0, 0.2]
    assert group_weights("mean", [6, 2, 0, 2]) == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    assert group_weights("sum", [6, 2, 0, 2]) == [1.0] * 4
    assert gkp_weights([0.6, 0.2, 0.0, 0.2]) == pytest.approx([0.4, 0.8, 1.0, 0.8])
    assert gkp_weights([1.0] * 4) == [3.0] * 4  # Eq. 16 as printed: G - 1 step groups weigh each term


def _losses(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5))
        self.classifier = nn.Linear(6, 4)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_batch_mean_fisher_equals_direct_per_batch_computation():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(37, 3)
    y = torch.randint(0, 4, (37,))
    group_of_class = np.array([0, 1, 1, 0])
    cov, _ = ordered_parameters(model, is_classifier)
    n_cov = sum(p.numel() for p in cov)
    anchors = torch.randn(2, n_cov)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    fisher = estimate_fisher(model, dataset=TensorDataset(x, y), targets=y.numpy(), group_of_class=group_of_class,
                             anchors=anchors, classification_losses=_losses, is_excluded=is_classifier, batch_size=5,
                             device=torch.device("cpu"), autocast=contextlib.nullcontext)
    for j in range(2):
        m = copy.deepcopy(model).eval()
        torch.nn.utils.vector_to_parameters(anchors[j], list(m.encoder.parameters()))
        idx = np.flatnonzero(group_of_class[y.numpy()] == j)
        batches = [(x[idx[i:i + 5]], y[idx[i:i + 5]]) for i in range(0, len(idx), 5)]
        want = fisher_diagonal(m, F.cross_entropy, batches, list(m.encoder.parameters()))
        assert torch.allclose(fisher[j].double(), torch.cat([w.reshape(-1) for w in want]), rtol=1e-5, atol=1e-9)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), before)  # works on a copy


class BNNet(nn.Module):
    """A small CNN with BatchNorm: per-sample gradients through batch statistics."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(12, 5), nn.BatchNorm1d(5), nn.Tanh())
        self.classifier = nn.Linear(5, 4)

    def forward(self, x):
        return self.classifier(self.encoder(x))


@pytest.mark.parametrize("chunk", [0, 2])
def test_per_sample_fisher_equals_a_float64_per_sample_loop(chunk):
    """EWC's Fisher: the mean over a group's images of the squared gradient of each image's own loss, BatchNorm
    normalising with its batch's statistics held constant, written here as a loop of one evaluation-mode backward per
    image in float64 (the running statistics set to the batch's mean and biased variance); and the batch-mean
    estimate is smaller (about 1/B near a minimum: squaring a mean of gradients averages them first)."""
    torch.manual_seed(0)
    model = BNNet()
    x = torch.randn(29, 1, 2, 2)
    y = torch.randint(0, 4, (29,))
    group_of_class = np.array([0, 1, 1, 0])
    cov, _ = ordered_parameters(model, is_classifier)
    anchors = torch.cat([p.detach().reshape(-1) for p in cov])[None].repeat(2, 1)
    anchors[1] += 0.1 * torch.randn(anchors.shape[1])
    kw = dict(dataset=TensorDataset(x, y), targets=y.numpy(), group_of_class=group_of_class, anchors=anchors,
              classification_losses=_losses, is_excluded=is_classifier, batch_size=6, device=torch.device("cpu"),
              autocast=contextlib.nullcontext)
    fisher = estimate_fisher(model, estimate="per_sample", chunk=chunk, **kw)
    batch_mean = estimate_fisher(model, **kw)
    for j in range(2):
        m = copy.deepcopy(model).double().train()
        params = list(m.encoder.parameters())
        torch.nn.utils.vector_to_parameters(anchors[j].double(), params)
        idx = np.flatnonzero(group_of_class[y.numpy()] == j)
        want = torch.zeros(anchors.shape[1], dtype=torch.float64)
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        for start in range(0, len(idx), 6):
            rows = idx[start:start + 6]
            xb = x[rows].double()
            m.train()
            for bn in bns:  # momentum 1: the running statistics become this batch's (variance unbiased, so rescale)
                bn.momentum = 1.0
            with torch.no_grad():
                m(xb)
            for bn in bns:
                n = xb.shape[0] * (xb.shape[2] * xb.shape[3] if isinstance(bn, torch.nn.BatchNorm2d) else 1)
                bn.running_var *= (n - 1) / n
            m.eval()
            for i in range(len(rows)):
                loss = F.cross_entropy(m(xb[i:i + 1]), y[rows][i:i + 1])
                grads = torch.autograd.grad(loss, params)
                want += torch.cat([g.reshape(-1) for g in grads]) ** 2
        want /= len(idx)
        torch.testing.assert_close(fisher[j].double(), want, rtol=1e-4, atol=1e-7)
        assert float(batch_mean[j].sum()) < 0.5 * float(fisher[j].sum())
