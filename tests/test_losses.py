"""Base losses against independent float64 formulas (explicit loops / numpy), DRW switching, priors as buffers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lt_recipes.errors import ConfigError
from lt_recipes.sections import LossConfig
from lt_recipes.losses import (BCL, LDAMDRW, BalancedSoftmax, CrossEntropy, LogitAdjusted, LossError,
                               balanced_contrastive_loss, create_loss)
from lt_recipes.models import LTModel

COUNTS = [50, 20, 8, 3]


def loss_cfg(**kw):
    return LossConfig(**kw)


def ref_ce(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None,
           smoothing: float = 0.0) -> float:
    """Softmax CE by explicit loops in float64; class-weighted mean as torch defines it (sum w_y l / sum w_y).

    The losses keep their class buffers in float32, so comparisons that go through them use rel=1e-6.
    """
    w = np.ones(logits.shape[1]) if weights is None else weights
    num, den = 0.0, 0.0
    for z, y in zip(logits.astype(np.float64), targets):
        log_z = math.log(sum(math.exp(v) for v in z))
        nll = [log_z - v for v in z]
        smooth = sum(w[c] * nll[c] for c in range(len(z))) / len(z)
        num += (1 - smoothing) * w[y] * nll[y] + smoothing * smooth
        den += w[y]
    return num / den


def batch(seed: int = 0, n: int = 6, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 2, torch.randint(0, c, (n,), generator=g)


def test_hand_checked_two_class_values():
    logits, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0])
    assert CrossEntropy([3, 1]).classification_loss(logits, y).item() == pytest.approx(math.log(2))
    # z + log(pi) = [log .75, log .25]  ->  -log(.75)
    assert LogitAdjusted([3, 1]).classification_loss(logits, y).item() == pytest.approx(-math.log(0.75))
    assert BalancedSoftmax([3, 1]).classification_loss(logits, y).item() == pytest.approx(-math.log(0.75))
    # LDAM: margins 3^-1/4 : 1 scaled to max 0.5 -> class 0 margin 0.5 * 3^-1/4; s = 2
    m0 = 0.5 * 3 ** -0.25
    expect = math.log(1 + math.exp(2 * m0))
    ldam = LDAMDRW([3, 1], max_m=0.5, s=2.0, drw_epoch=5)
    assert ldam.classification_loss(logits, y).item() == pytest.approx(expect)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_la_bs_against_loops(smoothing):
    logits, y = batch()
    z, t = logits.numpy(), y.numpy()
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    cases = [
        (CrossEntropy(COUNTS, label_smoothing=smoothing), z),
        (LogitAdjusted(COUNTS, tau=1.0, label_smoothing=smoothing), z + np.log(prior)),
        (LogitAdjusted(COUNTS, tau=0.5, label_smoothing=smoothing), z + 0.5 * np.log(prior)),
        (BalancedSoftmax(COUNTS, label_smoothing=smoothing), z + np.log(np.array(COUNTS, dtype=np.float64))),
    ]
    for loss, adjusted in cases:
        got = loss.double().classification_loss(logits, y).item()
        assert got == pytest.approx(ref_ce(adjusted, t, smoothing=smoothing), rel=1e-6), type(loss).__name__


def test_la_and_bs_differ_only_by_a_constant_shift():
    """Softmax is shift-invariant: log(pi) and log(n) differ by log(N), so LA(tau=1) == BS exactly."""
    logits, y = batch(3)
    la = LogitAdjusted(COUNTS).double().classification_loss(logits, y)
    bs = BalancedSoftmax(COUNTS).double().classification_loss(logits, y)
    assert la.item() == pytest.approx(bs.item(), rel=1e-6)


def test_ldam_margins_ratio_and_max():
    loss = LDAMDRW(COUNTS, max_m=0.5, s=30.0)
    m = loss.margins.double().numpy()
    assert m.max() == pytest.approx(0.5) and m.argmax() == len(COUNTS) - 1
    for i in range(len(COUNTS)):
        for j in range(len(COUNTS)):
            assert m[i] / m[j] == pytest.approx((COUNTS[j] / COUNTS[i]) ** 0.25, rel=1e-6)


def test_ldam_drw_against_loop_and_switch_epoch():
    logits, y = batch(1, n=8)
    loss = create_loss(loss_cfg(name="ldam_drw", ldam_s=5.0), COUNTS, epochs=10).double()
    assert isinstance(loss, LDAMDRW) and loss.drw_epoch == 8
    n = np.array(COUNTS, dtype=np.float64)
    margins = 0.5 * n ** -0.25 / (n ** -0.25).max()
    shifted = logits.numpy().copy()
    for i, t in enumerate(y.numpy()):
        shifted[i, t] -= margins[t]
    w = (1 - 0.9999) / (1 - 0.9999 ** n)
    w = w * len(COUNTS) / w.sum()
    plain, weighted = ref_ce(5.0 * shifted, y.numpy()), ref_ce(5.0 * shifted, y.numpy(), weights=w)
    assert abs(plain - weighted) > 1e-3
    for epoch, expect in [(0, plain), (7, plain), (8, weighted), (9, weighted)]:
        loss.set_epoch(epoch)
        assert loss.classification_loss(logits, y).item() == pytest.approx(expect, rel=1e-6), epoch
    loss.set_epoch(3)
    assert loss.classification_loss(logits, y).item() == pytest.approx(plain, rel=1e-6)
    np.testing.assert_allclose(loss.drw_weights.numpy(), w, rtol=1e-6)
    assert loss.drw_weights.sum().item() == pytest.approx(len(COUNTS))


def test_drw_on_from_the_start():
    loss = create_loss(loss_cfg(name="ldam_drw", drw_start=0.0), COUNTS, epochs=10)
    assert loss.drw_active


def test_buffers_follow_to():
    for name in ["ce", "la", "bs", "ldam_drw", "bcl"]:
        loss = create_loss(loss_cfg(name=name), COUNTS, epochs=10)
        names = {n for n, _ in loss.named_buffers()}
        expect = {"ce": {"class_counts"}, "la": {"class_counts", "adjustment"}, "bs": {"class_counts", "log_counts"},
                  "ldam_drw": {"class_counts", "margins", "drw_weights"}, "bcl": {"class_counts", "adjustment"}}
        assert names == expect[name]
        moved = loss.to("meta")
        assert all(b.device.type == "meta" for b in moved.buffers()), name
        assert all(b.dtype == torch.float64 for b in create_loss(loss_cfg(name=name), COUNTS, 10).double().buffers())


def test_forward_runs_the_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    for name in ["ce", "la", "bs", "ldam_drw"]:
        loss = create_loss(loss_cfg(name=name), COUNTS, epochs=10)
        torch.testing.assert_close(loss(model, x, y), loss.classification_loss(model(x), y))
        with pytest.raises(LossError, match="bcl"):
            loss(model, [x, x, x], y)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_per_sample_losses_average_to_the_batch_loss(smoothing):
    """The grouped step masks per-sample losses: their mean must be the batch loss, DRW's weighted mean included
    (checked against F.cross_entropy's own weighted mean and the loop reference)."""
    logits, y = batch(4, n=9)
    model = nn.Identity()
    for name in ["ce", "la", "bs", "ldam_drw"]:
        loss = create_loss(loss_cfg(name=name, label_smoothing=smoothing, drw_start=0.0), COUNTS, epochs=10).double()
        per_sample = loss.per_sample(model, logits, y)
        assert per_sample.shape == (9,)
        assert per_sample.mean().item() == pytest.approx(loss.classification_loss(logits, y).item(), rel=1e-12)
    ldam = create_loss(loss_cfg(name="ldam_drw", label_smoothing=smoothing, drw_start=0.0), COUNTS, 10).double()
    shifted = logits - F.one_hot(y, len(COUNTS)).double() * ldam.margins.double()[y, None]
    want = F.cross_entropy(30.0 * shifted, y, weight=ldam.drw_weights.double(), label_smoothing=smoothing)
    assert ldam.per_sample(model, logits, y).mean().item() == pytest.approx(want.item(), rel=1e-12)


def test_bad_inputs():
    with pytest.raises(LossError, match="class 2 has 0"):
        CrossEntropy([5, 3, 0])
    with pytest.raises(ConfigError, match="'loss.name' = 'focal': must be one of"):  # the loss section's check
        create_loss(loss_cfg(name="focal"), COUNTS, 10)


# ---- BCL ----------------------------------------------------------------------------------------------------------


def ref_balanced_scl(views: torch.Tensor, labels: list[int], protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """Balanced SCL per anchor by explicit double loops over anchors and candidates (float64, differentiable)."""
    cands = [views[i] for i in range(len(views))] + [protos[c] for c in range(len(protos))]
    cand_labels = list(labels) + list(range(len(protos)))
    per_anchor = []
    for i in range(len(views)):
        sims = [torch.dot(views[i], cands[j]) / temperature for j in range(len(cands))]
        denominator = views.new_zeros(())
        for c in range(len(protos)):
            members = [j for j in range(len(cands)) if cand_labels[j] == c and j != i]
            denominator = denominator + sum(torch.exp(sims[j]) for j in members) / len(members)
        positives = [p for p in range(len(cands)) if cand_labels[p] == labels[i] and p != i]
        per_anchor.append(-sum(sims[p] - torch.log(denominator) for p in positives) / len(positives))
    return torch.stack(per_anchor)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_balanced_scl_hand_case():
    """Two class-0 views equal to e, prototypes e and -e, T=1: each anchor sees dots 1 (view), 1 (p0), -1 (p1).
    Denominator mean(e, e) + e^-1; both positives give 1 - log(e + 1/e), so the loss is log(1 + e^-2)."""
    e = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = balanced_contrastive_loss(torch.cat([e, e]), torch.tensor([0, 0]), torch.cat([e, -e]), 1.0)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-2))] * 2, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_scl_against_double_loop(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, b, dim = 5, 6, 4
    labels = torch.randint(0, 3, (b,), generator=g).repeat(2)  # classes 3, 4 only through their prototypes
    views = unit(torch.randn(2 * b, dim, generator=g, dtype=torch.float64)).requires_grad_()
    protos = unit(torch.randn(num_classes, dim, generator=g, dtype=torch.float64)).requires_grad_()
    got = balanced_contrastive_loss(views, labels, protos, 0.1)
    ref = ref_balanced_scl(views, labels.tolist(), protos, 0.1)
    assert got.dtype == torch.float64 and got.shape == (2 * b,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    g_got = torch.autograd.grad(got.mean(), [views, protos])
    g_ref = torch.autograd.grad(ref.mean(), [views, protos])
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_balanced_scl_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    views, protos = unit(torch.randn(8, 6, generator=g)), unit(torch.randn(3, 6, generator=g))
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 1, 2])
    plain = balanced_contrastive_loss(views, labels, protos, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = balanced_contrastive_loss(views, labels, protos, 0.07)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


class TinyEncoder(nn.Module):
    """A flatten + linear 'backbone' returning pooled features, standing in for a timm model with num_classes=0."""

    def __init__(self, in_features: int, num_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def tiny_bcl_model(num_classes: int = 4) -> LTModel:
    torch.manual_seed(0)
    return LTModel(TinyEncoder(12, 10), 10, num_classes, classifier="cosine", cosine_scale=30.0,
                   proj_dims=(16, 8)).double()


def test_bcl_forward_composes_la_and_balanced_scl():
    model = tiny_bcl_model()
    g = torch.Generator().manual_seed(0)
    x_cls, v1, v2 = (torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([0, 0, 1, 3, 0])
    loss = create_loss(loss_cfg(name="bcl", bcl_alpha=2.0, bcl_beta=0.6, bcl_temperature=0.1), COUNTS, 10).double()
    assert isinstance(loss, BCL) and loss.contrastive_views == 2
    got = loss(model, [x_cls, v1, v2], y)
    per_sample = loss.per_sample(model, [x_cls, v1, v2], y)
    # reference: the model run on the concatenated batch (batch-norm statistics come from that one pass), and the
    # projection head run on all 3B features before the classification view's rows are dropped
    feats = model.forward_features(torch.cat([x_cls, v1, v2]))
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    la = ref_ce((model.classifier(feats[:5]) + prior.log()).detach().numpy(), y.numpy())
    scl = ref_balanced_scl(model.project(feats)[5:], y.repeat(2).tolist(), model.prototypes(), 0.1)
    assert got.item() == pytest.approx(2.0 * la + 0.6 * scl.mean().item(), rel=1e-6)
    assert not torch.allclose(model.project(feats)[5:], model.project(feats[5:]))  # the head's BatchNorm sees 3B
    for i in range(5):
        ce_i = ref_ce((model.classifier(feats[i:i + 1]) + prior.log()).detach().numpy(), y[i:i + 1].numpy())
        want = 2.0 * ce_i + 0.6 * (scl[i] + scl[5 + i]).item() / 2
        assert per_sample[i].item() == pytest.approx(want, rel=1e-6)
    assert loss.classification_loss(model(x_cls), y).item() == pytest.approx(
        ref_ce((model(x_cls) + prior.log()).detach().numpy(), y.numpy()), rel=1e-6)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bcl_through_a_parallel_wrapper_and_bad_views():
    model = tiny_bcl_model()
    x = [torch.randn(3, 12, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([1, 2, 1])
    loss = create_loss(loss_cfg(name="bcl"), COUNTS, 10).double()
    wrapped = nn.DataParallel(model)  # no GPUs here: it calls the module directly, but hides project/prototypes
    assert not hasattr(wrapped, "prototypes")
    torch.testing.assert_close(loss(wrapped, x, y), loss(model, x, y))
    with pytest.raises(LossError, match="got 2 tensors"):
        loss(model, x[:2], y)
    with pytest.raises(LossError, match="one tensor"):
        loss(model, x[0], y)
    with pytest.raises(LossError, match=r"batch sizes \[3, 3, 2\]"):
        loss(model, [x[0], x[1], x[2][:2]], y)
