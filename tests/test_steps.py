"""The sharpness-aware peers and the plain step against float64 oracles written the plain way from their papers'
rules, plus the properties every step must keep: zero radius is the base step, the weighted split is SAM at a = 0,
b = 1, the registry is the one source of the recipe's `method` choices.

Each oracle works on a float64 copy of the model with torch.autograd.grad over its parameter list, and types each
rule out here (nothing imported from lt_recipes.steps): SAM's eps = rho g / ||g||, ASAM's rho T^2 g / ||T g||,
FriendlySAM's g - sigma m, ImbSAM's head / 2 x tail split, Focal-SAM's omega_c, CC-SAM's class-wise classifier
perturbations, GBG's min-norm weights (solved by scipy's SLSQP, not by Frank-Wolfe).
"""
import copy
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch.func import functional_call

import oracles
from lt_recipes.config import SCHEMA, defaults
from lt_recipes.steps import (ASAM, CCSAM, GBG, SAM, FocalSAM, FriendlySAM, ImbSAM, PlainStep, create_step,
                              list_methods, list_steps, step_class, step_info)
from test_gsa import NUM_CLASSES, SmallCNN, Tiny, _batch

COUNTS = [500, 200, 60, 25, 12, 5]  # training images per class: ImbSAM's default tail (< 20) is classes 4 and 5
LR = 0.1


def _ce(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _loss_fn(model, x, y):
    return lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none")


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in _params(model)])


def _grad(loss, params, retain=False):
    return list(torch.autograd.grad(loss, params, retain_graph=retain))


def _norm(ts):
    return torch.sqrt(sum((t ** 2).sum() for t in ts))


def _model(kind):
    torch.manual_seed(0)
    model = SmallCNN(norm="bn") if kind == "bn" else Tiny()
    return model.double()


def _data(kind, n=24, seed=1):
    x, y = _batch(n=n, seed=seed, image=kind == "bn")
    return x.double(), y


def _split_oracle(model, x, y, a, b, rho, adaptive=False, direction=None):
    """One weighted-split step, float64: g_a = grad (1/B) sum a_y l at theta, eps along d = grad (1/B) sum b_y l
    (or `direction(d)`), update -lr [g_a + grad (1/B) sum b_y l (theta + eps)]. Returns the new flat parameters."""
    m = copy.deepcopy(model)
    params = _params(m)
    losses = _ce(m, x, y)
    B = len(y)
    g_a = _grad((losses * a[y]).sum() / B, params) if a is not None else [torch.zeros_like(p) for p in params]
    losses = _ce(m, x, y)
    g_b = _grad((losses * (b[y] if b is not None else 1.0)).sum() / B, params)
    d = direction(g_b) if direction else g_b
    if adaptive:
        scaled = [p.detach().abs() * t for p, t in zip(params, d)]
        eps = [rho * p.detach().abs() * s / _norm(scaled) for p, s in zip(params, scaled)]
    else:
        eps = [rho * t / _norm(d) for t in d]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    losses = _ce(m, x, y)
    g_p = _grad((losses * (b[y] if b is not None else 1.0)).sum() / B, params)
    with torch.no_grad():
        for p, e, ga, gp in zip(params, eps, g_a, g_p):
            p.sub_(e).sub_(LR * (ga + gp))
    return _flat(m)


def _run(step_cls, model, x, y, steps=1, **kw):
    m = copy.deepcopy(model)
    step = step_cls(m, torch.optim.SGD(m.parameters(), lr=LR), **kw)
    for _ in range(steps):
        stats = step.step(_loss_fn(m, x, y), y)
    return _flat(m), step, stats


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_sam_and_asam_equal_their_oracles(kind):
    model, (x, y) = _model(kind), _data(kind)
    _close(_run(SAM, model, x, y, rho=0.05)[0], _split_oracle(model, x, y, None, None, 0.05))
    _close(_run(ASAM, model, x, y, rho=0.5)[0], _split_oracle(model, x, y, None, None, 0.5, adaptive=True))


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_friendly_sam_equals_its_oracle_over_two_steps(kind):
    """Step 1 ascends along g_1 and sets m = g_1; step 2 along g_2 - sigma m_1, then m = lam m_1 + (1 - lam) g_2."""
    model, (x1, y1) = _model(kind), _data(kind)
    x2, y2 = _data(kind, seed=2)
    sigma, lam, rho = 0.7, 0.6, 0.2
    m = copy.deepcopy(model)
    state = {}

    def direction(g):
        if "m" not in state:
            state["m"] = [t.clone() for t in g]
            return g
        d = [t - sigma * mt for t, mt in zip(g, state["m"])]
        state["m"] = [lam * mt + (1 - lam) * t for t, mt in zip(g, state["m"])]
        return d

    for x, y in ((x1, y1), (x2, y2)):
        want = _split_oracle(m, x, y, None, None, rho, direction=direction)
        torch.nn.utils.vector_to_parameters(want, _params(m))
    got = copy.deepcopy(model)
    step = FriendlySAM(got, torch.optim.SGD(got.parameters(), lr=LR), rho=rho, sigma=sigma, lam=lam)
    for x, y in ((x1, y1), (x2, y2)):
        step.step(_loss_fn(got, x, y), y)
    _close(_flat(got), want)


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_imbsam_equals_its_oracle(kind):
    """ImbSAM: head classes (n_c >= eta) at theta weight 1, tail classes (n_c < eta) weight 2 at theta + eps."""
    model, (x, y) = _model(kind), _data(kind)
    tail = torch.tensor([n < 20 for n in COUNTS], dtype=torch.float64)
    got, step, _ = _run(ImbSAM, model, x, y, class_counts=COUNTS, rho=0.05)
    assert step.tail_classes == [4, 5]
    _close(got, _split_oracle(model, x, y, 1 - tail, 2 * tail, 0.05))
    tail = torch.tensor([n < 100 for n in COUNTS], dtype=torch.float64)
    _close(_run(ImbSAM, model, x, y, class_counts=COUNTS, rho=0.05, eta=100)[0],
           _split_oracle(model, x, y, 1 - tail, 2 * tail, 0.05))


def _exact(got, want, name=""):
    """Agreement to float64 rounding: a rule changed by 1e-10 relative fails here."""
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("perturbed_bn", ["frozen", "update"])
def test_imbsam_equals_the_authors_step_with_either_bn_behaviour(perturbed_bn):
    """Two steps of `imbsam.perturbed_bn` frozen (ours) and update (the authors' third pass, a train-mode forward at
    theta + eps, moves the running statistics) against the float64 oracle of Imbalanced_SAM's forbackward
    (tests/oracles.py): parameters and every BatchNorm buffer. The running statistics of the two options differ."""
    model, (x1, y1) = _model("bn"), _data("bn")
    x2, y2 = _data("bn", seed=2)
    want = copy.deepcopy(model)
    got = copy.deepcopy(model)
    step = ImbSAM(got, torch.optim.SGD(got.parameters(), lr=LR), class_counts=COUNTS, rho=0.05,
                  perturbed_bn=perturbed_bn)
    for x, y in ((x1, y1), (x2, y2)):
        oracles.imbsam_step(want, x, y, step.tail_classes, 0.05, LR, perturbed_bn)
        step.step(_loss_fn(got, x, y), y)
    for (name, w), g in zip(want.state_dict().items(), got.state_dict().values()):
        _exact(g, w, name)
    other = copy.deepcopy(model)
    for x, y in ((x1, y1), (x2, y2)):
        oracles.imbsam_step(other, x, y, step.tail_classes, 0.05, LR, "update" if perturbed_bn == "frozen" else "frozen")
    _exact(_flat(other), _flat(got))  # train-mode forwards normalise by the batch: the parameters do not see it
    assert not torch.allclose(other.encoder[1].running_mean, got.encoder[1].running_mean, rtol=1e-3)


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_focal_sam_equals_its_oracle(kind):
    """Focal-SAM: omega_c = lam (1 - n_c / N)^gamma at theta + eps, 1 - omega_c at theta."""
    model, (x, y) = _model(kind), _data(kind)
    N = sum(COUNTS)
    omega = torch.tensor([0.8 * (1 - n / N) ** 3.2 for n in COUNTS], dtype=torch.float64)
    got, _, _ = _run(FocalSAM, model, x, y, class_counts=COUNTS, rho=0.3, gamma=3.2, lam=0.8)
    _close(got, _split_oracle(model, x, y, 1 - omega, omega, 0.3))


@pytest.mark.parametrize("cls,kw", [(ImbSAM, {}), (FocalSAM, {})])
def test_weighted_split_at_a0_b1_is_sam(cls, kw):
    model, (x, y) = _model("bn"), _data("bn")
    m = copy.deepcopy(model)
    step = cls(m, torch.optim.SGD(m.parameters(), lr=LR), class_counts=COUNTS, rho=0.05)
    step.clean_weights = torch.zeros(NUM_CLASSES)
    step.perturbed_weights = torch.ones(NUM_CLASSES)
    step.step(_loss_fn(m, x, y), y)
    _close(_flat(m), _run(SAM, model, x, y, rho=0.05)[0])
    # Focal-SAM with lam = 1, gamma = 0 has omega = 1: SAM by its own parameters
    _close(_run(FocalSAM, model, x, y, class_counts=COUNTS, rho=0.05, gamma=0.0, lam=1.0)[0],
           _run(SAM, model, x, y, rho=0.05)[0])


def _plain_oracle(model, x, y, weights=None):
    m = copy.deepcopy(model)
    params = _params(m)
    losses = _ce(m, x, y)
    g = _grad((losses * (1.0 if weights is None else weights[y])).sum() / len(y), params)
    with torch.no_grad():
        for p, t in zip(params, g):
            p.sub_(LR * t)
    return _flat(m)


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_zero_radius_is_the_base_step(kind):
    """At rho = 0 every peer is the base step (ImbSAM: the base step of its own split, head + 2 x tail)."""
    model, (x, y) = _model(kind), _data(kind)
    base = _plain_oracle(model, x, y)
    _close(_run(PlainStep, model, x, y)[0], base)
    for cls, kw in ((SAM, {}), (ASAM, {}), (FriendlySAM, {}), (FocalSAM, {"class_counts": COUNTS}),
                    (CCSAM, {"class_counts": COUNTS})):
        _close(_run(cls, model, x, y, rho=0.0, **kw)[0], base)
    tail = torch.tensor([n < 20 for n in COUNTS], dtype=torch.float64)
    _close(_run(ImbSAM, model, x, y, rho=0.0, class_counts=COUNTS)[0], _plain_oracle(model, x, y, 1 + tail))


def _cc_sam_oracle(model, x, y, rho, beta):
    """CC-SAM stage 1, float64: per class c in the batch and per classifier tensor t, eps_c^t = rho sqrt(||theta_cls||
    / ||g_c^t||) d^(1/4) / (sqrt 2 (n_c - 1)^(1/4)) g_c^t / ||g_c^t||; loss (1 - beta) mean CE + beta mean CE of the
    head at theta_cls + eps_{y_i} on the same features."""
    m = copy.deepcopy(model)
    params = _params(m)
    cls_named = [(n, p) for n, p in m.classifier.named_parameters()]
    cls_params = [p for _, p in cls_named]
    d = sum(p.numel() for p in cls_params)
    theta_norm = float(_norm([p.detach() for p in cls_params]))
    feats = m.encoder(x)
    clean = F.cross_entropy(m.classifier(feats), y, reduction="none")
    perturbed = []
    for c in sorted(set(y.tolist())):
        mine = y == c
        g = _grad(clean[mine].mean(), cls_params, retain=True)
        eps = {}
        for (name, p), gt in zip(cls_named, g):
            n = float(_norm([gt]))
            eps[name] = rho * math.sqrt(theta_norm / n) * d ** 0.25 / (math.sqrt(2) * (COUNTS[c] - 1) ** 0.25) * gt / n
        moved = {name: p + eps[name].detach() for name, p in cls_named}
        perturbed.append(F.cross_entropy(functional_call(m.classifier, moved, (feats[mine],)), y[mine],
                                         reduction="sum"))
    loss = (1 - beta) * clean.mean() + beta * sum(perturbed) / len(y)
    g = _grad(loss, params)
    with torch.no_grad():
        for p, t in zip(params, g):
            p.sub_(LR * t)
    return _flat(m)


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_cc_sam_equals_its_oracle(kind):
    model, (x, y) = _model(kind), _data(kind)
    got, _, stats = _run(CCSAM, model, x, y, class_counts=COUNTS, rho=0.05, beta=0.5)
    _close(got, _cc_sam_oracle(model, x, y, 0.05, 0.5))
    assert stats.ascent[0] > 0


def _gbg_oracle(model, x, y, group_of_class):
    """GBG: u_g = g_g / (L_g ||g_g||) over the encoder (not the classifier), alpha = argmin_{simplex} ||sum alpha_g
    u_g||^2 by SLSQP, polished to float64 rounding by the KKT system on the support SLSQP found, update -lr sum_g
    alpha_g g_g (whole-parameter group gradients)."""
    m = copy.deepcopy(model)
    params = _params(m)
    enc = [i for i, (n, p) in enumerate(m.named_parameters()) if not n.startswith("classifier.")]
    gid = torch.tensor(group_of_class)[y]
    grads, units = [], []
    for g in sorted(set(gid.tolist())):
        loss = _ce(m, x, y)[gid == g].mean()
        gr = _grad(loss, params)
        grads.append(gr)
        vec = torch.cat([gr[i].reshape(-1) for i in enc])
        units.append((vec / (float(loss.detach()) * vec.norm())).numpy())
    U = np.stack(units)
    k = len(units)
    res = minimize(lambda a: float((a @ U) @ (a @ U)), np.full(k, 1 / k), method="SLSQP", bounds=[(0, 1)] * k,
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}], options={"ftol": 1e-14, "maxiter": 500})
    # on the support S, the minimiser with sum alpha = 1 solves [[2 M_S, 1], [1^T, 0]] [alpha_S; mu] = [0; 1]
    M, S = U @ U.T, np.flatnonzero(res.x > 1e-6)
    kkt = np.block([[2 * M[np.ix_(S, S)], np.ones((len(S), 1))], [np.ones((1, len(S))), np.zeros((1, 1))]])
    alpha = np.zeros(k)
    alpha[S] = np.linalg.solve(kkt, np.r_[np.zeros(len(S)), 1.0])[:-1]
    assert (alpha >= 0).all() and np.abs(alpha - res.x).max() < 1e-5
    assert (2 * M @ alpha >= 2 * alpha @ M @ alpha - 1e-12).all()  # no group off the support lowers the norm
    with torch.no_grad():
        for i, p in enumerate(params):
            p.sub_(LR * sum(float(a) * gr[i] for a, gr in zip(alpha, grads)))
    return _flat(m), alpha


@pytest.mark.parametrize("kind", ["bn", "plain"])
def test_gbg_equals_its_oracle(kind):
    model, (x, y) = _model(kind), _data(kind)
    groups = [0, 0, 1, 1, 2, 2]
    m = copy.deepcopy(model)
    step = GBG(m, torch.optim.SGD(m.parameters(), lr=LR))
    step.set_groups(groups, [700, 85, 17])
    step.step(_loss_fn(m, x, y), y)
    want, alpha = _gbg_oracle(model, x, y, groups)
    assert step.last_weights == pytest.approx(alpha.tolist(), abs=1e-12)
    _exact(_flat(m), want)



def test_gbg_forms_its_own_groups_before_the_first_step_and_keeps_them_on_resume(monkeypatch):
    """GBG takes its section (num_groups) and groups the classes itself from what the run hands it (`prepare`): the
    groups of `gradient_groups` on the run's training set, their training samples from the run's class counts; a
    step loaded from its state installs the saved groups without grouping again."""
    from torch.utils.data import TensorDataset

    from lt_recipes.steps import TrainingRun
    from lt_recipes.steps import gbg as gbg_module

    model, (x, y) = _model("plain"), _data("plain", n=48)
    counts = np.bincount(y.numpy(), minlength=NUM_CLASSES).tolist()
    run = TrainingRun(dataset=TensorDataset(x, y), targets=y.numpy(), class_counts=counts, head_losses=lambda logits, t: F.cross_entropy(logits, t, reduction="none"),
                      batch_size=16, device=torch.device("cpu"))
    step = GBG(model, torch.optim.SGD(model.parameters(), lr=LR), num_groups=2)
    step.prepare(run)
    covered = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    want = gbg_module.gradient_groups(model, run.head_losses, run.dataset, y.numpy(), NUM_CLASSES, 2, covered, 16,
                                      torch.device("cpu"), step.autocast)
    assert step.group_of_class.tolist() == want.tolist() and step.num_groups == 2
    assert step.group_sizes == [sum(c for c, g in zip(counts, want) if g == k) for k in range(2)]
    step.step(_loss_fn(model, x, y), y)
    assert step.artifacts()["groups.json"]["groups"] == [np.flatnonzero(want == k).tolist() for k in range(2)]

    resumed = GBG(model, torch.optim.SGD(model.parameters(), lr=LR), num_groups=2)
    resumed.load_state_dict(step.state_dict())
    monkeypatch.setattr(gbg_module, "gradient_groups", lambda *a, **k: pytest.fail("grouped again on resume"))
    resumed.prepare(run)
    assert resumed.group_of_class.tolist() == want.tolist() and resumed.group_sizes == step.group_sizes

def test_sharpness_aware_peers_raise_their_perturbed_loss():
    """The defining property: the loss a peer ascends on is higher at theta + eps than at theta, at its defaults, in
    every step (FriendlySAM ascends along g - sigma m, the batch's deviation from the gradient EMA, which need not
    raise the batch loss: most steps)."""
    model = _model("bn")
    batches = [_data("bn", n=48, seed=s) for s in range(8)]
    for name in ("sam", "asam", "fsam", "imbsam", "focal_sam", "cc_sam"):
        kw = {k: {"class_counts": COUNTS, "head_losses": None}[k] for k in step_info(name).uses}
        m = copy.deepcopy(model)
        step = create_step(name, m, torch.optim.SGD(m.parameters(), lr=0.01), **kw)
        rises = [step.step(_loss_fn(m, x, y), y).ascent[0] for x, y in batches]
        share = sum(r > 0 for r in rises) / len(rises)
        assert share >= (0.75 if name == "fsam" else 1.0), (name, rises)


def test_registry_is_the_one_source_of_methods_and_their_options():
    """The schema offers exactly the registry's methods; each step's recipe section holds exactly its constructor's
    options with the same defaults, and every registered name builds its own class."""
    assert SCHEMA["method"].choices == list_methods()
    assert set(list_methods()) == set(list_steps()) | {"gkp"} | {f"gkp_{s}" for s in list_steps() if s != "none"}
    classes = {name: step_class(name) for name in list_steps()}
    assert len(set(classes.values())) == len(classes)
    cfg = defaults()
    for name, cls in classes.items():
        info = step_info(name)
        # gsa's section also configures the released step and the ops
        if info.section is None or name == "gsa":
            continue
        sig = inspect.signature(cls.__init__).parameters
        own = {k: p.default for k, p in sig.items()
               if k not in ("self", "model", "base_optimizer", "kw") and k not in info.uses}
        assert own == {k: tuple(v) if isinstance(v, list) else v for k, v in cfg[info.section].items()}, name


GBG_GROUPS = ([0, 0, 1, 1, 2, 2], [700, 85, 17])


def run_two_steps(name: str, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Two steps of `name` with its defaults (rho 0.05 for the SAM family) on the Tiny model without BatchNorm, each
    on this rank's share of a 24-sample batch; the parameters after them (float64)."""
    torch.manual_seed(0)
    model = Tiny().double()
    info = step_info(name)
    kw = {k: {"class_counts": COUNTS, "head_losses": None}[k] for k in info.uses}
    if info.section in ("sam", "asam", "fsam", "imbsam", "focal_sam", "cc_sam"):
        kw["rho"] = 0.05
    step = create_step(name, model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), **kw)
    if name == "gbg":
        step.set_groups(*GBG_GROUPS)
    for seed in (1, 2):
        x, y = _data("plain", n=24, seed=seed)
        half = len(y) // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        step.step(_loss_fn(model, xs, ys), ys)
    return _flat(model)


def test_gkp_rides_on_a_peer():
    """GKP + ImbSAM: the task update weighted alpha plus the gradient of (1 - alpha) sum_j (sum_{g != j} w_g)
    s_j sum_i F_ji (theta_i - a_ji)^2 over the encoder, w_g the batch share of GKP's group g (float64 oracle; the
    step in float64 through the fused op's float64 path, to float64 rounding)."""
    model, (x, y) = _model("bn"), _data("bn")
    group_of_class, alpha = [0, 0, 1, 1, 2, 2], 0.6
    enc = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    n_enc = sum(p.numel() for p in enc)
    g = torch.Generator().manual_seed(5)
    anchors = torch.randn(3, n_enc, generator=g, dtype=torch.float64) * 0.1
    fisher = torch.rand(3, n_enc, generator=g, dtype=torch.float64)
    strength = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    m = copy.deepcopy(model)
    step = ImbSAM(m, torch.optim.SGD(m.parameters(), lr=LR), class_counts=COUNTS, rho=0.05, backend="fused")
    step.set_gkp(anchors, fisher, strength, group_of_class)
    step.step(_loss_fn(m, x, y), y, alpha=alpha)

    tail = torch.tensor([n < 20 for n in COUNTS], dtype=torch.float64)
    task = _split_oracle(model, x, y, 1 - tail, 2 * tail, 0.05)  # theta - lr * task gradient
    theta0 = _flat(model)
    theta_enc = torch.cat([p.detach().reshape(-1) for p in enc]).requires_grad_()
    shares = torch.bincount(torch.tensor(group_of_class)[y], minlength=3).double() / len(y)
    over = shares.sum() - shares
    penalty = (1 - alpha) * sum(over[j] * strength[j] * (fisher[j] * (theta_enc - anchors[j]) ** 2).sum()
                                for j in range(3))
    (gkp_grad,) = torch.autograd.grad(penalty, theta_enc)
    enc_ids = {id(p) for p in enc}
    names = [n for n, p in model.named_parameters()]
    # the model's parameter order interleaves nothing: the encoder comes first, then the classifier
    assert all(not n.startswith("classifier.") for n in names[:len(enc)])
    want = theta0 + alpha * (task - theta0)
    want[:n_enc] -= LR * gkp_grad
    assert len(enc_ids) == len(enc)
    _exact(_flat(m), want)


@pytest.mark.parametrize("name", ["none", "sam", "imbsam", "cc_sam", "gbg"])
def test_a_non_finite_step_is_skipped_once_by_the_core(name):
    """An overflow in any pass skips the whole step on the core: weights and BatchNorm statistics untouched, the fp16
    loss scale halved, the one skip counter raised."""
    from lt_recipes.steps import LossScaler

    model, (x, y) = _model("bn"), _data("bn")
    m = copy.deepcopy(model)
    kw = {k: {"class_counts": COUNTS, "head_losses": None}[k] for k in step_info(name).uses}
    scaler = LossScaler(True, init_scale=1024.0)
    step = create_step(name, m, torch.optim.SGD(m.parameters(), lr=LR), scaler=scaler, **kw)
    if name == "gbg":
        step.set_groups(*GBG_GROUPS)
    before, stats_before = _flat(m), [b.clone() for b in m.buffers()]
    stats = step.step(lambda idx: _loss_fn(m, x, y)(idx) * float("inf"), y)
    assert stats.skipped and step.skipped_steps == 1 and scaler.scale == 512.0
    _close(_flat(m), before)
    assert all(torch.equal(a, b) for a, b in zip(stats_before, m.buffers()))
