"""The GSA/GKP step against an independent float64 autograd implementation of SPEC.md Eq. 6 and 11-16."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lt_recipes import reference
from lt_recipes.gkp import gkp_coefficients
from lt_recipes.gsa import SAM, GroupedSAM, LossScaler, ordered_parameters

NUM_CLASSES = 6


class Tiny(nn.Module):
    """Encoder + classifier; the classifier is the only module whose names start with 'classifier.'."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(5, 8), nn.Tanh()] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Linear(8, 7), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.classifier = nn.Linear(7, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _batch(n=24, seed=1, classes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g) if classes is None else \
        torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return x, y


GROUP_OF_CLASS = [0, 0, 1, 1, 2, 3]
GROUP_SIZES = [900, 120, 40, 9]  # training samples per group (n_g in Eq. 13)
CLASSES_PER_GROUP = [2, 2, 1, 1]


def _ordered(model):
    cov, rest = ordered_parameters(model, lambda n: n.startswith("classifier."))
    return cov + rest, sum(p.numel() for p in cov)


def reference_step(model, x, y, direction, z, alpha, lr, gkp=None, group_of_class=GROUP_OF_CLASS,
                   group_sizes=GROUP_SIZES, weighting="sum", bn_stats="group"):
    """theta_new = theta - lr * [sum_g alpha grad L_{D_g}(theta + eps_g) + grad sum_g (1 - alpha) L_gkp^g], float64.

    With `bn_stats` "batch" / "batch_theta" (Tiny(bn=True) only), every L_{D_g} normalises with the whole batch's
    statistics, held constant, at the weights it is evaluated at / at theta: BatchNorm in eval mode with its running
    statistics set to that batch's mean and biased variance, computed here from the layer's formula."""
    m = copy.deepcopy(model).double()
    if bn_stats != "group":
        m.eval()
    params, n_cov = _ordered(m)
    names = {id(p): n for n, p in m.named_parameters()}
    shapes = [(names[id(p)], p.shape, p.numel()) for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def unflatten(vec):
        d, o = {}, 0
        for name, shape, n in shapes:
            d[name] = vec[o:o + n].view(shape)
            o += n
        return d

    def set_batch_stats(vec):
        d = unflatten(vec.detach())
        with torch.no_grad():
            a = torch.tanh(F.linear(x.double(), d["encoder.0.weight"], d["encoder.0.bias"]))
            m.encoder[2].running_mean.copy_(a.mean(0))
            m.encoder[2].running_var.copy_(a.var(0, unbiased=False))

    if bn_stats == "batch_theta":
        set_batch_stats(theta)

    def loss_at(vec, idx):
        if bn_stats == "batch":
            set_batch_stats(vec)
        return F.cross_entropy(functional_call(m, unflatten(vec), (x[idx].double(),)), y[idx])

    gid = torch.tensor(group_of_class)[y]
    G = len(group_sizes)
    idx = {g: (gid == g).nonzero().squeeze(1) for g in range(G) if (gid == g).any()}
    grads = {}
    for g, ix in idx.items():
        v = theta.clone().requires_grad_(True)
        grads[g] = torch.autograd.grad(loss_at(v, ix), v)[0]
    glob = reference.global_gradient(torch.stack(list(grads.values())),
                                     torch.tensor([len(ix) for ix in idx.values()]))
    total = torch.zeros_like(theta)
    eps_all = {}
    for g, ix in idx.items():
        h = reference.ascent_direction(direction, grads[g], glob)
        if torch.linalg.vector_norm(h) > 0:
            rho = reference.gsa_radius(z, float(theta.norm()), float(h.norm()), theta.numel(), group_sizes[g])
            eps = reference.gsa_perturbation(h, rho)
        else:
            eps = torch.zeros_like(theta)
        eps_all[g] = eps
        v = (theta + eps).requires_grad_(True)
        w = {"sum": 1.0, "mean": 1.0 / len(idx), "samples": len(ix) / len(y)}[weighting]
        total += alpha * w * torch.autograd.grad(loss_at(v, ix), v)[0]
    if gkp is not None:
        anchors, fisher, lam = gkp
        v = theta[:n_cov].clone().requires_grad_(True)
        sizes = torch.tensor(CLASSES_PER_GROUP, dtype=torch.float64)
        pen = sum((1 - alpha) * reference.gkp_group_loss(v, anchors.double(), fisher.double(), sizes, g, lam)
                  for g in range(G))
        total[:n_cov] += torch.autograd.grad(pen, v)[0]
    return theta - lr * total, grads, glob, eps_all


def _gsa(model, direction="gsa", z=0.5, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gsa = GroupedSAM(model, opt, num_groups=4, direction=direction, z=z, backend="reference", **kw)
    gsa.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    return gsa


def _loss_fn(model, x, y, record=None, gsa=None):
    def fn(idx):
        if record is not None:
            record.append((gsa.flat.data - gsa.base).clone())
        return F.cross_entropy(model(x[idx]), y[idx])
    return fn


def _theta(model):
    params, _ = _ordered(model)
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


@pytest.mark.parametrize("direction", ["gsa", "sam", "gsa_proj"])
def test_step_equals_float64_reference(direction):
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    want, _, _, _ = reference_step(model, x, y, direction, z=0.5, alpha=1.0, lr=0.1)
    gsa = _gsa(model, direction)
    stats = gsa.step(_loss_fn(model, x, y), y)
    assert not stats.skipped
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["mean", "samples"])
def test_group_weightings_equal_reference(weighting):
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    want, _, _, _ = reference_step(model, x, y, "gsa", 0.5, 1.0, 0.1, weighting=weighting)
    gsa = _gsa(model, group_weighting=weighting)
    gsa.step(_loss_fn(model, x, y), y)
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn_stats,direction,weighting", [("batch", "gsa", "sum"), ("batch", "gsa", "samples"),
                                                          ("batch", "sam", "samples"), ("batch_theta", "gsa", "sum")])
def test_whole_batch_bn_statistics_equal_reference(bn_stats, direction, weighting):
    """Group passes normalise with the whole batch's statistics at their own weights (batch) or at theta."""
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch(n=30)
    want, _, _, _ = reference_step(model, x, y, direction, 0.5, 1.0, 0.1, weighting=weighting, bn_stats=bn_stats)
    gsa = _gsa(model, direction, bn_stats=bn_stats, group_weighting=weighting)
    assert not gsa.step(_loss_fn(model, x, y), y).skipped
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-6)
    assert model.encoder[2].training  # BatchNorm back in training mode, its own buffers back in place
    assert model.encoder[2].running_mean is model.encoder[2]._buffers["running_mean"]


def test_bn_statistics_choices_give_different_steps():
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch(n=30)
    thetas = []
    for bn_stats in ("group", "batch", "batch_theta"):
        m = copy.deepcopy(model)
        _gsa(m, bn_stats=bn_stats).step(_loss_fn(m, x, y), y)
        thetas.append(_theta(m))
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(thetas[i], thetas[j], rtol=1e-4, atol=1e-5)


def test_step_with_gkp_equals_reference():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    _, n_cov = _ordered(model)
    g = torch.Generator().manual_seed(3)
    anchors, fisher = torch.randn(4, n_cov, generator=g), torch.rand(4, n_cov, generator=g)
    alpha, lam = 0.8, 100.0
    want, _, _, _ = reference_step(model, x, y, "gsa", 0.5, alpha, 0.01, gkp=(anchors, fisher, lam))
    gsa = _gsa(model, lr=0.01)
    coef = gkp_coefficients(CLASSES_PER_GROUP, GROUP_SIZES, lam, "per_classes", alpha)
    gsa.set_gkp(anchors, fisher, coef)
    stats = gsa.step(_loss_fn(model, x, y), y, alpha=alpha)
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-5)
    assert stats.gkp > 0


def test_group_gradients_equal_autograd_and_projection_is_orthogonal():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    _, grads, glob, _ = reference_step(model, x, y, "gsa", 0.5, 1.0, 0.1)
    gsa = _gsa(model)
    record = []
    stats = gsa.step(_loss_fn(model, x, y, record, gsa), y)
    for g, want in grads.items():
        assert torch.allclose(gsa.flat.rows[g].double(), want, rtol=1e-5, atol=1e-7)
    present = sorted(grads)
    d = gsa.d
    perturbations = record[len(present):]
    for g, eps in zip(present, perturbations):
        eps = eps.double()
        assert float(eps.norm()) == pytest.approx(math.sqrt(d) * stats.rho[g], rel=1e-5)
        assert abs(float(torch.dot(eps, glob))) < 1e-5 * float(eps.norm() * glob.norm())  # h_g orthogonal to g


@pytest.mark.parametrize("direction", ["sam", "gsa_proj"])
def test_other_directions_point_as_specified(direction):
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    _, grads, glob, _ = reference_step(model, x, y, direction, 0.5, 1.0, 0.1)
    gsa = _gsa(model, direction)
    record = []
    stats = gsa.step(_loss_fn(model, x, y, record, gsa), y)
    present = sorted(grads)
    for g, eps in zip(present, record[len(present):]):
        eps = eps.double()
        coef = float(torch.dot(grads[g], glob) / torch.dot(glob, glob))
        expected = glob if direction == "sam" else coef * glob
        cos = float(torch.dot(eps, expected) / (eps.norm() * expected.norm()))
        assert cos == pytest.approx(1.0, abs=1e-5)
        assert float(eps.norm()) == pytest.approx(math.sqrt(gsa.d) * stats.rho[g], rel=1e-5)


def test_absent_group_contributes_nothing():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch(classes=[0, 1, 4])  # groups 0 and 2 only
    want, grads, _, _ = reference_step(model, x, y, "gsa", 0.5, 1.0, 0.1)
    assert sorted(grads) == [0, 2]
    gsa = _gsa(model)
    calls = []
    stats = gsa.step(_loss_fn(model, x, y, calls, gsa), y)
    assert len(calls) == 4  # two groups, two passes each
    assert math.isnan(stats.group_loss[1]) and stats.rho[1] == 0.0 and stats.rho[3] == 0.0
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn_stats", ["group", "batch"])
def test_one_sample_group_with_batchnorm1d_does_not_crash(bn_stats):
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch(n=9, classes=[0, 1])
    x, y = torch.cat([x, torch.randn(1, 5)]), torch.cat([y, torch.tensor([5])])  # one sample of group 3
    gsa = _gsa(model, bn_stats=bn_stats)
    running = model.encoder[2].running_mean.clone()
    stats = gsa.step(_loss_fn(model, x, y), y)
    assert not stats.skipped and stats.rho[3] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(running, model.encoder[2].running_mean)  # the step updates BN statistics once


@pytest.mark.parametrize("bn_stats", ["group", "batch"])
def test_bn_running_statistics_get_one_full_batch_update(bn_stats):
    """Per-group passes must not leave BN statistics dominated by the last (tail) group: one whole-batch update."""
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch(n=40)
    bn = model.encoder[2]
    with torch.no_grad():
        a = model.encoder[1](model.encoder[0](x)).double()  # the BN input for the whole batch at theta
    m = bn.momentum
    want_mean = (1 - m) * bn.running_mean.double() + m * a.mean(0)
    want_var = (1 - m) * bn.running_var.double() + m * a.var(0, unbiased=True)
    gsa = _gsa(model, bn_stats=bn_stats)
    gsa.step(_loss_fn(model, x, y), y)
    assert torch.allclose(bn.running_mean.double(), want_mean, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), want_var, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_perturbed_pass_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch()
    gsa = _gsa(model)
    seen = []
    base_fn = _loss_fn(model, x, y)

    def fn(idx):
        seen.append(model.encoder[2].running_mean.clone())
        return base_fn(idx)
    gsa.step(fn, y)
    n = len(seen) // 2
    after_pass1 = model.encoder[2].running_mean.clone()
    assert torch.equal(after_pass1, seen[n]) and all(torch.equal(seen[n], s) for s in seen[n:])


def test_single_group_reduces_to_sam_and_gkp_vanishes():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    one = [0] * NUM_CLASSES
    want, grads, glob, eps = reference_step(model, x, y, "gsa", 0.5, 1.0, 0.1, group_of_class=one,
                                            group_sizes=[1069])
    assert torch.allclose(eps[0] / eps[0].norm(), glob / glob.norm(), atol=1e-6)  # SAM's direction
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gsa = GroupedSAM(model, opt, num_groups=1, z=0.5, backend="reference")
    gsa.set_groups(one, [1069])
    assert gkp_coefficients([6], [1069], 100.0, "per_classes", 0.7).tolist() == [0.0]
    gsa.step(_loss_fn(model, x, y), y)
    assert torch.allclose(_theta(model), want, rtol=1e-5, atol=1e-6)


def test_zero_global_gradient_takes_no_perturbation():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    gsa = _gsa(model)
    before = _theta(model)
    stats = gsa.step(lambda idx: sum((p * 0).sum() for p in model.parameters()) + 1.0, y)
    assert stats.rho == [0.0] * 4 and not stats.skipped
    assert torch.equal(_theta(model), before)


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_fp16_overflow_in_either_pass_skips_the_step(bad_pass):
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch()
    scaler = LossScaler(enabled=True, init_scale=1024.0)
    gsa = _gsa(model, scaler=scaler)
    before = _theta(model)
    bn = model.encoder[2]
    running = (bn.running_mean.clone(), bn.running_var.clone())
    calls = []
    base_fn = _loss_fn(model, x, y)
    n_groups = len(set(torch.tensor(GROUP_OF_CLASS)[y].tolist()))

    def fn(idx):
        calls.append(1)
        loss = base_fn(idx)
        in_second = len(calls) > n_groups
        return loss * float("inf") if in_second == bool(bad_pass) and len(calls) in (1, n_groups + 1) else loss
    stats = gsa.step(fn, y)
    assert stats.skipped and gsa.skipped_steps == 1 and scaler.scale == 512.0
    assert torch.equal(_theta(model), before)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert float(gsa.flat.grad.abs().sum()) == 0.0
    stats = gsa.step(_loss_fn(model, x, y), y)
    assert not stats.skipped and not torch.equal(_theta(model), before)


def test_nonfinite_perturbed_pass_cannot_poison_bn_statistics():
    torch.manual_seed(0)
    model = Tiny(bn=True)
    x, y = _batch()
    gsa = _gsa(model)
    bn = model.encoder[2]
    n_groups = len(set(torch.tensor(GROUP_OF_CLASS)[y].tolist()))
    calls = []

    def fn(idx):
        calls.append(1)
        xi = x[idx] * (float("nan") if len(calls) > n_groups else 1.0)  # NaN activations in pass 2 only
        return F.cross_entropy(model(xi), y[idx])
    stats = gsa.step(fn, y)
    assert stats.skipped
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_sam_matches_definition():
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    x, y = _batch()
    rho, lr = 0.05, 0.1
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p.add_(g, alpha=rho / float(norm))
    grads2 = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    sam = SAM(model, torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    start = [p.detach().clone() for p in model.parameters()]
    sam.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx]), y)
    for p0, g2, q in zip(start, grads2, model.parameters()):
        assert torch.allclose(q, p0 - lr * g2, atol=1e-6)
