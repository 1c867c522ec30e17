"""The grouped step against a float64 oracle written the plain way, and the invariants every step must keep.

The oracle (`oracle_step`) computes every group loss with its own whole-batch forward and a masked loss, in
float64 autograd, with the paper's formulas typed out here (not imported): pass 1 one forward per group, pass 2 one
forward per perturbed group (or one at the averaged perturbation), GKP and the Eq. 15 regulariser by autograd.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lt_recipes.models import is_classifier, ordered_parameters
from lt_recipes.steps import ASAM, SAM, GroupedSAM, LossScaler, PlainStep
from lt_recipes.models import CosineLinear, LTModel
from lt_recipes.segments import Layout, SegmentError, group_offsets, offset_modules, shared

NUM_CLASSES = 6
GROUP_OF_CLASS = [0, 0, 1, 1, 2, 3]
GROUP_SIZES = [900, 120, 40, 9]  # training samples per group (n_g in Eq. 13, |G_j| of GKP per_samples)


class Tiny(nn.Module):
    """Encoder + classifier on vectors; the classifier is the only module whose names start with 'classifier.'."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(5, 8), nn.Tanh()] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Linear(8, 7), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.classifier = nn.Linear(7, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.encoder(x))


class SmallCNN(nn.Module):
    """Convolutions, a norm layer (none, GroupNorm, or BatchNorm2d/1d), a linear layer and a cosine classifier."""

    def __init__(self, norm: str = "none") -> None:
        super().__init__()
        norm2d = {"none": nn.Identity(), "gn": nn.GroupNorm(2, 4), "bn": nn.BatchNorm2d(4)}[norm]
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), norm2d, nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
            nn.ReLU(), nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5) if norm == "bn" else nn.Identity(), nn.Tanh())
        self.classifier = CosineLinear(5, NUM_CLASSES, scale=4.0)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _batch(n=24, seed=1, classes=None, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) if image else torch.randn(n, 5, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g) if classes is None else \
        torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return x, y


def _ordered(model):
    cov, rest = ordered_parameters(model, is_classifier)
    return cov + rest, sum(p.numel() for p in cov)


def _theta(model):
    params, _ = _ordered(model)
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def _loss_fn(model, x, y):
    return lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none")


def oracle_step(model, x, y, direction="gsa", scale="euclidean", z=0.5, clamp=None, perturbation="per_group",
                weighting="samples", alpha=1.0, lr=0.1, group_of_class=GROUP_OF_CLASS, group_sizes=GROUP_SIZES,
                gkp=None, momentum=None, sigma=1.0, regularizer=False, ema=None, ema_beta=0.0):
    """One step the plain way in float64; returns (theta_new, group gradients, perturbations, new momenta).

    `perturbation` per_group: one whole-batch forward per group at theta + eps_g, the loss masked to the group (the
    step's per_group_exact, and its per_group without BatchNorm); averaged: one forward at the batch-share mean.
    With `ema_beta` > 0 the directions come from the per-group EMA of the group gradients, kept in the dict `ema`."""
    m = copy.deepcopy(model).double()
    params, n_cov = _ordered(m)
    names = {id(p): n for n, p in m.named_parameters()}
    layout = [(names[id(p)], p.shape, p.numel()) for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    d = theta.numel()

    def losses_at(vec):
        split, o = {}, 0
        for name, shape, n in layout:
            split[name] = vec[o:o + n].view(shape)
            o += n
        return F.cross_entropy(functional_call(m, split, (x.double(),)), y, reduction="none")

    gid = torch.tensor(group_of_class)[y]
    G, N = len(group_sizes), len(y)
    counts = [int((gid == g).sum()) for g in range(G)]
    present = [g for g in range(G) if counts[g]]
    w = {"samples": [c / N for c in counts], "sum": [1.0] * G,
         "mean": [1.0 / len(present) if c else 0.0 for c in counts]}[weighting]

    def grad(fn, vec):
        v = vec.clone().requires_grad_(True)
        return torch.autograd.grad(fn(v), v)[0]

    grads = {g: grad(lambda v: losses_at(v)[gid == g].mean(), theta) for g in present}
    src = grads
    if ema_beta > 0:
        for g in present:
            ema[g] = grads[g].clone() if g not in ema else ema_beta * ema[g] + (1 - ema_beta) * grads[g]
        src = {g: ema[g] for g in present}
    glob = sum(counts[g] / N * src[g] for g in present)
    eps, rhos, new_momentum = {}, {}, {}
    for g in present:
        gg = src[g]
        if direction == "sam":
            h = glob
        elif direction == "friendly":
            h = gg if momentum is None else gg - sigma * momentum[g]
            new_momentum[g] = gg.clone() if momentum is None else 0.9 * momentum[g] + 0.1 * gg
        else:
            along = torch.dot(gg, glob) / torch.dot(glob, glob) * glob
            h = along if direction == "gsa_proj" else gg - along
            if direction == "gsa" and h.norm() <= 1e-6 * gg.norm():
                h = gg
        norm = (theta * h).norm() if scale == "adaptive" else h.norm()
        rho = z * math.sqrt(theta.norm() / (2 * norm)) * d ** -0.25 * max(group_sizes[g] - 1, 1) ** -0.25
        if clamp is not None:
            rho = min(max(rho, clamp[0]), clamp[1])
        rhos[g] = rho
        eps[g] = math.sqrt(d) * rho * (theta * theta * h if scale == "adaptive" else h) / norm
    if perturbation in ("per_group", "per_group_exact"):
        total = sum(alpha * w[g] * grad(lambda v: losses_at(v)[gid == g].mean(), theta + eps[g]) for g in present)
    else:
        eps_bar = sum(counts[g] * eps[g] for g in present) / N
        total = grad(lambda v: sum(alpha * w[g] * losses_at(v)[gid == g].mean() for g in present), theta + eps_bar)
    if gkp is not None:
        anchors, fisher, lam = gkp

        def penalty(v):
            cov = v[:n_cov]
            return sum((1 - alpha) * w[g] * lam / 2 * sum((fisher[j] * (cov - anchors[j]) ** 2).sum() / group_sizes[j]
                                                         for j in range(G) if j != g) for g in range(G))
        total = total + grad(penalty, theta)
    if regularizer:
        total = total + grad(lambda v: sum(alpha * w[g] * v.norm() / (2 * math.sqrt(group_sizes[g] - 1) * rhos[g])
                                           for g in present), theta)
    return theta - lr * total, grads, eps, new_momentum


def _gsa(model, lr=0.1, group_of_class=GROUP_OF_CLASS, group_sizes=GROUP_SIZES, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw = {"scale": "euclidean", "z": 0.5, "rho_clamp": None, "backend": "reference", **kw}
    gsa = GroupedSAM(model, opt, **kw)
    gsa.set_groups(group_of_class, group_sizes)
    return gsa


def _gkp_state(model, seed=3, lam=100.0):
    _, n_cov = _ordered(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, n_cov, generator=g) * 0.3, torch.rand(4, n_cov, generator=g), lam


def _install_gkp(gsa, gkp, group_of_class=None):
    anchors, fisher, lam = gkp
    gsa.set_gkp(anchors, fisher, torch.tensor([lam / 2 / n for n in GROUP_SIZES]), group_of_class)


# ---- (d) the whole step equals the oracle on a CNN without BatchNorm -------------------------------------------

@pytest.mark.parametrize("group_grads", ["masked", "share"])
@pytest.mark.parametrize("perturbation", ["per_group", "per_group_exact", "averaged"])
@pytest.mark.parametrize("scale", ["euclidean", "adaptive"])
@pytest.mark.parametrize("direction", ["gsa", "sam", "gsa_proj", "friendly"])
def test_step_equals_float64_oracle_without_batchnorm(direction, scale, perturbation, group_grads):
    """Two steps (FriendlySAM's momentum enters in the second) with GKP, alpha < 1 and batch-share weights, on
    convolutions + GroupNorm + linear + cosine classifier: every module kind the offsets handle. The averaged pass of
    the h_g directions (which cancel) is refused."""
    if perturbation == "averaged" and direction == "gsa":
        with pytest.raises(ValueError, match="cancels"):
            _gsa(SmallCNN(norm="gn"), direction=direction, perturbation=perturbation)
        return
    torch.manual_seed(0)
    model = SmallCNN(norm="gn")
    x, y = _batch(image=True)
    gkp = _gkp_state(model)
    z = 0.5 if scale == "euclidean" else 5.0
    gsa = _gsa(model, direction=direction, scale=scale, z=z, perturbation=perturbation, group_grads=group_grads)
    _install_gkp(gsa, gkp)
    momentum = None
    for _ in range(2):
        want, _, eps, momentum = oracle_step(model, x, y, direction, scale, z, None, perturbation, alpha=0.8, gkp=gkp,
                                             momentum=momentum)
        stats = gsa.step(_loss_fn(model, x, y), y, alpha=0.8)
        assert not stats.skipped and stats.gkp > 0
        assert all(e.norm() > 1e-3 for e in eps.values())  # the perturbation is large enough to matter
        torch.testing.assert_close(_theta(model), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("direction,perturbation,group_grads,scale", [
    ("gsa", "per_group_exact", "masked", "adaptive"), ("friendly", "per_group", "share", "euclidean"),
    ("sam", "averaged", "masked", "adaptive")])
def test_step_in_float64_equals_float64_oracle_to_rounding(direction, perturbation, group_grads, scale):
    """In float64 the grouped step runs in the parameters' precision throughout (losses, group weights, FriendlySAM
    momenta, the fused ops' float64 path for the projection and GKP) and agrees with the oracle to float64 rounding
    over three steps (the momenta's EMA enters in the third), so a rule changed by 1e-10 fails."""
    torch.manual_seed(0)
    model = SmallCNN(norm="gn").double()
    x, y = _batch(image=True)
    anchors, fisher, lam = _gkp_state(model)
    gkp = (anchors.double(), fisher.double(), lam)
    z = 0.5 if scale == "euclidean" else 5.0
    gsa = _gsa(model, direction=direction, scale=scale, z=z, perturbation=perturbation, group_grads=group_grads,
               backend="fused")
    gsa.set_gkp(gkp[0], gkp[1], torch.tensor([lam / 2 / n for n in GROUP_SIZES], dtype=torch.float64))
    momentum = None
    for _ in range(3):
        want, _, _, momentum = oracle_step(model, x, y, direction, scale, z, None, perturbation, alpha=0.8, gkp=gkp,
                                           momentum=momentum)
        stats = gsa.step(_loss_fn(model, x.double(), y), y, alpha=0.8)
        assert not stats.skipped and stats.gkp > 0
        torch.testing.assert_close(_theta(model), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weighting", ["sum", "mean"])
def test_other_group_weightings_equal_oracle(weighting):
    torch.manual_seed(0)
    model = SmallCNN(norm="gn")
    x, y = _batch(image=True)
    gkp = _gkp_state(model)
    want, _, _, _ = oracle_step(model, x, y, weighting=weighting, alpha=0.7, lr=0.02, gkp=gkp)
    gsa = _gsa(model, lr=0.02, group_weighting=weighting)
    _install_gkp(gsa, gkp)
    gsa.step(_loss_fn(model, x, y), y, alpha=0.7)
    torch.testing.assert_close(_theta(model), want, rtol=2e-5, atol=2e-6)


def test_group_gradient_ema_equals_oracle():
    """gsa.group_grad_ema: three steps whose directions come from the per-group EMA of the group gradients (the
    first step sets it, so it equals the plain step; the later ones differ from it)."""
    torch.manual_seed(0)
    model = SmallCNN(norm="gn")
    plain = copy.deepcopy(model)
    x, y = _batch(image=True)
    gsa = _gsa(model, group_grad_ema=0.5)
    gsa_plain = _gsa(plain)
    ema = {}
    for k in range(3):
        want, _, _, _ = oracle_step(model, x, y, ema=ema, ema_beta=0.5)
        gsa.step(_loss_fn(model, x, y), y)
        gsa_plain.step(_loss_fn(plain, x, y), y)
        torch.testing.assert_close(_theta(model), want, rtol=2e-5, atol=2e-6)
        assert torch.equal(_theta(model), _theta(plain)) == (k == 0)


def test_clamp_and_regularizer_equal_oracle():
    torch.manual_seed(0)
    model = SmallCNN(norm="gn")
    x, y = _batch(image=True)
    want, _, _, _ = oracle_step(model, x, y, scale="adaptive", z=0.1, clamp=(0.002, 0.003), regularizer=True,
                                lr=0.01)
    gsa = _gsa(model, lr=0.01, scale="adaptive", z=0.1, rho_clamp=(0.002, 0.003), regularizer=True)
    stats = gsa.step(_loss_fn(model, x, y), y)
    assert all(r in (0.002, 0.003) for r in stats.rho)
    torch.testing.assert_close(_theta(model), want, rtol=2e-5, atol=2e-6)


def test_gkp_without_gsa_equals_oracle_at_zero_radius():
    """method=gkp: the plain step's task term at theta plus GKP, weighted by the batch shares of GKP's groups."""
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(image=True)
    gkp = _gkp_state(model)
    want, _, _, _ = oracle_step(model, x, y, z=0.0, alpha=0.6, gkp=gkp)
    step = PlainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _install_gkp(step, gkp, GROUP_OF_CLASS)
    step.step(_loss_fn(model, x, y), y, alpha=0.6)
    torch.testing.assert_close(_theta(model), want, rtol=2e-5, atol=2e-6)


def test_absent_group_contributes_nothing():
    torch.manual_seed(0)
    model = SmallCNN(norm="gn")
    x, y = _batch(image=True, classes=[0, 1, 4])  # groups 0 and 2 only
    want, grads, _, _ = oracle_step(model, x, y)
    assert sorted(grads) == [0, 2]
    for group_grads in ("masked", "share"):
        m = copy.deepcopy(model)
        stats = _gsa(m, group_grads=group_grads).step(_loss_fn(m, x, y), y)
        assert math.isnan(stats.group_loss[1]) and math.isnan(stats.rho[1]) and math.isnan(stats.rho[3])
        assert math.isnan(stats.ascent[1]) and stats.ascent[0] > 0 and stats.ascent[2] > 0
        torch.testing.assert_close(_theta(m), want, rtol=2e-5, atol=2e-6)


# ---- with BatchNorm: masked pass 1 exact, share and the mixed perturbed batch measured --------------------------

def _pass1(model, x, y, group_grads, **kw):
    gsa = _gsa(model, group_grads=group_grads, **kw)
    rows, counts = gsa.group_gradients(_loss_fn(model, x, y), y)
    return gsa, rows.double(), counts


def test_masked_group_gradients_equal_oracle_with_batchnorm():
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(n=30, image=True)
    _, grads, _, _ = oracle_step(model, x, y)
    _, rows, _ = _pass1(model, x, y, "masked")
    for g, want in grads.items():
        torch.testing.assert_close(rows[g], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("group_grads", ["masked", "share"])
def test_group_gradients_sum_to_the_batch_gradient(group_grads, norm):
    """(c) sum_g (|D_g| / |D|) g_g is the plain full-batch gradient, in both modes, with or without BatchNorm."""
    torch.manual_seed(0)
    model = SmallCNN(norm=norm)
    x, y = _batch(n=30, image=True)
    ref = copy.deepcopy(model).double()
    params, _ = _ordered(ref)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(ref(x.double()), y), params)])
    _, rows, counts = _pass1(model, x, y, group_grads)
    got = (torch.tensor(counts, dtype=torch.float64)[:, None] / len(y) * rows).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_grads", ["masked", "share"])
def test_bcl_group_gradients_sum_to_the_batch_gradient(group_grads):
    """The same with BCL: three stacked views through the backbone, projection heads with BatchNorm1d, and class
    prototypes computed from the classifier's weights outside the group segments (the share pass's common part)."""
    from lt_recipes.losses import BCL
    torch.manual_seed(0)
    model = LTModel(nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10), nn.ReLU()), 10, NUM_CLASSES,
                    classifier="cosine", proj_dims=(12, 8))
    loss = BCL([50, 40, 30, 20, 10, 5])
    x, y = _batch(n=18, image=True)
    views = [x, x.flip(2), x.flip(3)]
    ref = copy.deepcopy(model).double()
    params, _ = _ordered(ref)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss.double()(ref, [v.double() for v in views], y), params)])
    loss.float()
    gsa = _gsa(model, group_grads=group_grads)
    rows, counts = gsa.group_gradients(lambda idx: loss.per_sample(model, [v[idx] for v in views], y[idx]), y)
    got = (torch.tensor(counts, dtype=torch.float64)[:, None] / len(y) * rows.double()).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_share_equals_masked_without_batchnorm_and_not_with_it():
    torch.manual_seed(0)
    x, y = _batch(n=30, image=True)
    cosines = {}
    for norm in ("gn", "bn"):
        model = SmallCNN(norm=norm)
        _, masked, counts = _pass1(copy.deepcopy(model), x, y, "masked")
        _, share, _ = _pass1(copy.deepcopy(model), x, y, "share")
        present = [g for g, c in enumerate(counts) if c]
        if norm == "gn":
            torch.testing.assert_close(share, masked, rtol=1e-5, atol=1e-6)
        cosines[norm] = [float(F.cosine_similarity(share[g], masked[g], dim=0)) for g in present]
    print(f"\ncos(share, masked) per group with BatchNorm: {[round(c, 3) for c in cosines['bn']]}")
    assert min(cosines["bn"]) < 0.9999  # with BatchNorm, a group's share of the batch gradient is not its gradient


def test_per_group_perturbed_pass_against_whole_batch_passes_with_batchnorm():
    """The mixed perturbed batch normalises each group with the statistics of the whole mixed batch, not of the
    whole batch at theta + eps_g: exact at eps = 0, and at the recipes' radii off by the figure printed here."""
    torch.manual_seed(0)
    x, y = _batch(n=30, image=True)
    model = SmallCNN(norm="bn")
    for z, clamp in ((0.0, None), (0.1, (0.002, 0.003))):
        theta0 = _theta(model)
        want, _, _, _ = oracle_step(model, x, y, scale="adaptive", z=z, clamp=clamp, perturbation="per_group")
        m = copy.deepcopy(model)
        _gsa(m, scale="adaptive", z=z, rho_clamp=clamp, perturbation="per_group").step(_loss_fn(m, x, y), y)
        got_update, want_update = theta0 - _theta(m), theta0 - want
        rel = float((got_update - want_update).norm() / want_update.norm())
        if z == 0:
            assert rel < 1e-5
        else:
            print(f"\nper_group pass 2 vs per-group whole-batch passes (adaptive, clamp {clamp}): relative update "
                  f"difference {rel:.2e}")
            assert rel < 0.05


# ---- (b) one group is SAM (euclidean) or ASAM (adaptive) --------------------------------------------------------

@pytest.mark.parametrize("group_grads,perturbation", [("masked", "per_group"), ("share", "per_group"),
                                                      ("masked", "per_group_exact")])
@pytest.mark.parametrize("scale", ["euclidean", "adaptive"])
def test_single_group_is_sam_or_asam(scale, group_grads, perturbation):
    """With G = 1 the step is SAM / ASAM (written out here by hand) with radius sqrt(d) rho_1, BatchNorm included."""
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(n=30, image=True)
    ref = copy.deepcopy(model)
    lr, z = 0.1, (0.5 if scale == "euclidean" else 5.0)
    one = [0] * NUM_CLASSES
    gsa = _gsa(model, lr=lr, group_of_class=one, group_sizes=[1069], scale=scale, z=z,
               group_grads=group_grads, perturbation=perturbation)
    stats = gsa.step(_loss_fn(model, x, y), y)
    params = list(ref.parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    flat = torch.cat([g.reshape(-1) for g in grads])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    d = theta.numel()
    weight = theta.abs() if scale == "adaptive" else torch.ones_like(theta)
    norm = float((weight * flat).norm())
    rho = z * math.sqrt(float(theta.norm()) / (2 * norm)) * d ** -0.25 * 1068 ** -0.25
    assert stats.rho[0] == pytest.approx(rho, rel=1e-5)
    sam_radius = math.sqrt(d) * rho
    bn = ref.encoder[1]
    saved = (bn.running_mean.clone(), bn.running_var.clone())
    with torch.no_grad():
        for p, g in zip(params, grads):
            w = p.abs() if scale == "adaptive" else torch.ones_like(p)
            p.add_(sam_radius * w * w * g / norm)
    grads2 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    want = theta - lr * torch.cat([g.reshape(-1) for g in grads2])
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.encoder[1].running_mean, saved[0])  # one update, from the forward at theta


def test_sam_and_asam_classes_match_their_definitions():
    for adaptive in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        ref = copy.deepcopy(model)
        x, y = _batch()
        rho, lr = 0.05, 0.1
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
        weights = [p.detach().abs() if adaptive else torch.ones_like(p) for p in ref.parameters()]
        norm = torch.sqrt(sum(((w * g) ** 2).sum() for w, g in zip(weights, grads)))
        with torch.no_grad():
            for p, w, g in zip(ref.parameters(), weights, grads):
                p.add_(rho * w * w * g / norm)
        grads2 = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
        sam = (ASAM if adaptive else SAM)(model, torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
        start = [p.detach().clone() for p in model.parameters()]
        sam.step(_loss_fn(model, x, y), y)
        for p0, g2, q in zip(start, grads2, model.parameters()):
            torch.testing.assert_close(q, p0 - lr * g2, rtol=1e-5, atol=1e-6)


# ---- (a) zero strength is the base step; BatchNorm running statistics move once -------------------------------

@pytest.mark.parametrize("group_grads,perturbation", [("masked", "per_group"), ("share", "per_group"),
                                                      ("masked", "per_group_exact")])
def test_zero_strength_step_is_the_plain_step(group_grads, perturbation):
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    ref = copy.deepcopy(model)
    x, y = _batch(n=30, image=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), z=0.0,
                     rho_clamp=None, group_grads=group_grads, perturbation=perturbation, backend="reference")
    gsa.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    for _ in range(3):
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
        gsa.step(_loss_fn(model, x, y), y, alpha=1.0)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("group_grads", ["masked", "share"])
def test_bn_running_statistics_move_once_like_a_plain_forward(group_grads, momentum):
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    x, y = _batch(n=40, image=True)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(x)
    _gsa(model, group_grads=group_grads).step(_loss_fn(model, x, y), y)
    for (name, a), b in zip(ref.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ---- failures: overflow and non-finite passes skip the whole step ----------------------------------------------

@pytest.mark.parametrize("group_grads", ["masked", "share"])
@pytest.mark.parametrize("bad_pass", [0, 1])
def test_fp16_overflow_in_either_pass_skips_the_step(bad_pass, group_grads):
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(image=True)
    scaler = LossScaler(enabled=True, init_scale=1024.0)
    gsa = _gsa(model, scaler=scaler, group_grads=group_grads)
    before = _theta(model)
    bn = model.encoder[1]
    running = (bn.running_mean.clone(), bn.running_var.clone())
    calls = []
    base_fn = _loss_fn(model, x, y)

    def fn(idx):
        calls.append(1)
        losses = base_fn(idx)
        return losses * float("inf") if len(calls) == bad_pass + 1 else losses
    stats = gsa.step(fn, y)
    assert stats.skipped and gsa.skipped_steps == 1 and scaler.scale == 512.0
    assert torch.equal(_theta(model), before)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert float(gsa.flat.grad.abs().sum()) == 0.0
    stats = gsa.step(_loss_fn(model, x, y), y)
    assert not stats.skipped and not torch.equal(_theta(model), before)


def test_nonfinite_perturbed_pass_cannot_poison_bn_statistics():
    torch.manual_seed(0)
    model = SmallCNN(norm="bn")
    x, y = _batch(image=True)
    gsa = _gsa(model)
    bn = model.encoder[1]
    calls = []

    def fn(idx):
        calls.append(1)
        xi = x[idx] * (float("nan") if len(calls) > 1 else 1.0)  # NaN activations in pass 2 only
        return F.cross_entropy(model(xi), y[idx], reduction="none")
    assert gsa.step(fn, y).skipped
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_zero_global_gradient_takes_no_perturbation():
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch()
    gsa = _gsa(model)
    before = _theta(model)
    stats = gsa.step(lambda idx: sum((p * 0).sum() for p in model.parameters()) + torch.ones(len(idx)), y)
    assert stats.host().rho == [0.0] * 4 and not stats.skipped
    assert torch.equal(_theta(model), before)


# ---- the offset forward ----------------------------------------------------------------------------------------

def test_offsets_apply_per_segment_and_refuse_rows_that_are_not_samples():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    layout = Layout([2, 0, 3])
    offsets = {id(lin.weight): torch.randn(3, 2, 3), id(lin.bias): torch.randn(3, 2)}
    modules, rest = offset_modules(lin, [lin.weight, lin.bias])
    assert modules == [lin] and rest == []
    x = torch.randn(10, 3)  # two stacked views of a batch of five
    with group_offsets(modules, layout, offsets, share=False):
        out = lin(x)
        with shared():
            plain = lin(x[:4])
        with pytest.raises(SegmentError, match="4 rows, not a multiple of the batch's 5"):
            lin(x[:4])
    for row, g in zip(range(10), [0, 0, 2, 2, 2] * 2):
        want = x[row] @ (lin.weight + offsets[id(lin.weight)][g]).T + lin.bias + offsets[id(lin.bias)][g]
        torch.testing.assert_close(out[row], want)
    torch.testing.assert_close(plain, lin(x[:4]))
    assert "forward" not in lin.__dict__  # the module is back to its own forward
