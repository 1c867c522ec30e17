"""`gsa.batched`: the exact perturbed passes as one vmapped pass equal the G whole-batch passes run one after another.

The reference is written the plain way, independent of lt_recipes.steps: for every group g a deep copy of the model
at theta + eps_g (its BatchNorm running statistics frozen), one whole-batch forward, the per-sample losses weighted and
masked to the group, and autograd's gradient, summed over the groups; all in float64, on every base loss and on the
models the recipes use (the CIFAR ResNets, a timm ResNet with ResNeXt bottlenecks, BCL's heads and three views).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from lt_recipes.batchnorm import batchnorms
from lt_recipes.choices import LOSSES
from lt_recipes.errors import ConfigError
from lt_recipes.losses import LOSS_BUILDERS
from lt_recipes.models import LTModel, create_lt_model
from lt_recipes.sections import GSAConfig, LossConfig, ModelConfig
from lt_recipes.steps import GroupedSAM
from lt_recipes.steps.batched import BatchedPasses

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 6
COUNTS = [60, 30, 15, 8, 4, 2]
GROUP_OF_CLASS = [0, 0, 1, 1, 2, 2]
GROUP_SIZES = [90, 23, 6]


def _model(name: str, bcl: bool) -> nn.Module:
    proj = (12, 8) if bcl else None
    if name == "timm_resnext":  # timm's ResNet class (resnet50, resnext50_32x4d, resnet152) with small bottlenecks
        encoder = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], cardinality=2, base_width=8, num_classes=0)
        return LTModel(encoder, encoder.num_features, NUM_CLASSES, proj_dims=proj)
    return create_lt_model(ModelConfig(name=name, proj_head=list(proj) if proj else None), NUM_CLASSES, 3)


def _case(model_name: str, loss_name: str, n: int = 8, seed: int = 0):
    """A float64 model in training mode, its loss, a batch (three views for BCL), per-sample weights, perturbations."""
    torch.manual_seed(seed)
    bcl = loss_name == "bcl"
    model = _model(model_name, bcl).double().train()
    loss = LOSS_BUILDERS[loss_name](LossConfig(name=loss_name, drw_start=0.0), COUNTS, 10).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    inputs = [x, x.flip(2), x.flip(3)] if bcl else x
    params = [p for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    eps = 1e-2 * torch.randn(len(GROUP_SIZES), theta.numel(), generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    return model, loss, inputs, y, params, theta, eps, weights


def _index(inputs, idx):
    return [v[idx] for v in inputs] if isinstance(inputs, list) else inputs[idx]


def _sequential(model, loss, inputs, y, theta, eps, weights, gid):
    """The reference: one whole-batch pass per present group at theta + eps_g, plain autograd, BatchNorm frozen."""
    total = torch.zeros_like(theta)
    own = torch.zeros(len(y), dtype=torch.float64)
    for g in sorted(set(gid.tolist())):
        m = copy.deepcopy(model)
        for bn in batchnorms(m):
            bn.momentum = 0.0
        params = [p for p in m.parameters() if p.requires_grad]
        torch.nn.utils.vector_to_parameters(theta + eps[g], params)
        losses = loss.per_sample(m, inputs, y)
        mine = gid == g
        grads = torch.autograd.grad((losses * weights * mine).sum(), params)
        total += torch.cat([gr.reshape(-1) for gr in grads])
        own = torch.where(mine, losses.detach(), own)
    return total, own


def _batched(model, loss, inputs, y, params, theta, eps, weights, gid, chunk=None):
    """The batched pass at the model's own weights theta: the gradient it leaves in the parameters' .grad."""
    passes = BatchedPasses(model, params, [p.stride() for p in params], chunk)
    counts = torch.bincount(gid, minlength=len(GROUP_SIZES)).double().tolist()
    for p in params:
        p.grad = None
    own = passes.backward(lambda idx: loss.per_sample(model, _index(inputs, idx), y[idx]), gid, counts, weights,
                          eps, lambda t, w: (t * w).backward())
    grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in params])
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), theta)  # the weights stay at theta
    return grad, own


# every base loss on the smallest recipe model; the deeper CIFAR ResNet on CE, the timm ResNet on BCL (heads, views)
CASES = [("resnet8_cifar", loss) for loss in LOSSES] + [("resnet32_cifar", "ce"), ("timm_resnext", "bcl")]


@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_batched_pass_equals_the_sequential_passes_in_float64(model_name, loss_name):
    model, loss, inputs, y, params, theta, eps, weights = _case(model_name, loss_name)
    gid = torch.tensor(GROUP_OF_CLASS)[y]
    buffers = [b.clone() for b in model.buffers()]
    want, want_own = _sequential(model, loss, inputs, y, theta, eps, weights, gid)
    got, got_own = _batched(model, loss, inputs, y, params, theta, eps, weights, gid)
    assert float(want.abs().max()) > 1e-3  # a real gradient
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12 * float(want.abs().max()))
    torch.testing.assert_close(got_own, want_own, rtol=1e-12, atol=1e-13)
    for a, b in zip(buffers, model.buffers()):  # running statistics untouched
        assert torch.equal(a, b)
    assert all(bn.track_running_stats for bn in batchnorms(model))


def test_chunks_and_absent_groups_change_nothing():
    """`chunk_size` 1 and 2 (gsa.batch_chunk) give the sequential passes' gradient; a group absent from the batch is
    not run (a NaN perturbation of it changes nothing)."""
    model, loss, inputs, y, params, theta, eps, weights = _case("resnet8_cifar", "ce", n=12)
    gid = torch.tensor(GROUP_OF_CLASS)[y]
    want, _ = _sequential(model, loss, inputs, y, theta, eps, weights, gid)
    for chunk in (1, 2):
        got, _ = _batched(model, loss, inputs, y, params, theta, eps, weights, gid, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12 * float(want.abs().max()))
    only = torch.where(gid == 2, torch.zeros_like(gid), gid)
    eps2 = eps.clone()
    eps2[2] = float("nan")
    got, _ = _batched(model, loss, inputs, y, params, theta, eps2, weights, only)
    want, _ = _sequential(model, loss, inputs, y, theta, eps, weights, only)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12 * float(want.abs().max()))


def _steps(model, batched, gkp, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = GroupedSAM(model, opt, scale="adaptive", z=0.5, rho_clamp=None, perturbation="per_group_exact",
                      batched=batched, backend="reference", **kw)
    step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    if gkp:
        n = step.num_covered
        g = torch.Generator().manual_seed(5)
        step.set_gkp(torch.randn(3, n, generator=g) * 0.1, torch.rand(3, n, generator=g),
                     torch.tensor([50.0 / s for s in GROUP_SIZES]))
    return step


@pytest.mark.parametrize("loss_name,gkp,channels_last", [("ce", False, False), ("ce", True, True),
                                                          ("bcl", False, False), ("bcl", True, False)])
def test_batched_step_equals_the_sequential_step(loss_name, gkp, channels_last):
    """The whole grouped step as it trains (float32; its fused ops take float32) with and without GKP: two steps with
    gsa.batched on and off give the same update to float32 rounding (BCL's temperature-scaled similarities amplify it
    to a few 1e-5 of the update), the same BatchNorm statistics and the same per-group ascent; also with
    channels-last convolution weights, which the flat buffer keeps in their memory order."""
    model, loss, inputs, y, _, _, _, _ = _case("resnet8_cifar", loss_name, n=16)
    model, loss = model.float(), loss.float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        assert not model.encoder.conv1.weight.is_contiguous()
    inputs = [v.float() for v in inputs] if isinstance(inputs, list) else inputs.float()
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    runs = []
    for batched in (False, True):
        m = copy.deepcopy(model)
        step = _steps(m, batched, gkp)
        ascents = [step.step(lambda idx, m=m: loss.per_sample(m, _index(inputs, idx), y[idx]), y, alpha=0.8).ascent
                   for _ in range(2)]
        runs.append((torch.cat([p.detach().reshape(-1) for p in m.parameters()]), list(m.buffers()), ascents))
    (want, want_bn, want_ascent), (got, got_bn, got_ascent) = runs
    assert float((got - want).norm() / (want - theta0).norm()) < 1e-4
    for a, b in zip(want_bn, got_bn):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_ascent, want_ascent):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)
    assert all(a > 0 for a in got_ascent[0])  # every group's loss rises in its perturbed pass


def test_bn_tracking_restored_when_the_pass_fails():
    model, loss, inputs, y, params, theta, eps, weights = _case("resnet8_cifar", "ce")
    gid = torch.tensor(GROUP_OF_CLASS)[y]
    passes = BatchedPasses(model, params, [p.stride() for p in params])
    buffers = [b.clone() for b in model.buffers()]

    def failing(idx):
        model(inputs[idx])
        raise KeyError("a loss that fails after the forward")
    with pytest.raises(KeyError):
        passes.backward(failing, gid, [1.0, 1.0, 1.0], weights, eps, lambda t, w: t.backward())
    assert all(bn.track_running_stats for bn in batchnorms(model))
    for a, b in zip(buffers, model.buffers()):
        assert torch.equal(a, b)
    model(inputs)  # and a training forward moves them again
    assert not torch.equal(buffers[0], next(model.buffers()))


def test_refusals_name_the_combination():
    with pytest.raises(ConfigError, match="per_group_exact"):
        GSAConfig(batched=True, perturbation="per_group")
    with pytest.raises(ConfigError, match="gsa.perturbation=averaged"):
        GSAConfig(batched=True, direction="friendly", perturbation="averaged")
    with pytest.raises(ConfigError, match="batch_chunk"):
        GSAConfig(batched=True, batch_chunk=0)
    model = nn.Sequential(nn.Linear(5, 4), nn.SyncBatchNorm(4), nn.Linear(4, NUM_CLASSES))
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), batched=True)

    class DataDependent(nn.Module):  # Python control flow on a tensor's value cannot be vmapped
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, NUM_CLASSES)

        def forward(self, x):
            return self.fc(x) * 2 if float(self.fc.weight.detach().sum()) > 0 else self.fc(x)
    model = DataDependent()
    step = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), batched=True)
    step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    x, y = torch.randn(12, 5), torch.arange(12) % NUM_CLASSES
    with pytest.raises(ConfigError, match="DataDependent.*gsa.batched=false"):
        step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)


def test_overflow_in_the_batched_pass_skips_the_step_and_bf16_runs():
    """An fp16 overflow in the batched pass skips the whole step as in the sequential one (weights, BatchNorm
    statistics and tracking as before); under bf16 autocast the batched step runs and moves the weights."""
    from lt_recipes.steps import LossScaler
    model, loss, x, y, _, _, _, _ = _case("resnet8_cifar", "ce", n=12)
    model, loss, x = model.float(), loss.float(), x.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = GroupedSAM(model, opt, batched=True, scaler=LossScaler(enabled=True, init_scale=1024.0))
    step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    theta = [p.detach().clone() for p in model.parameters()]
    calls = []

    def fn(idx):
        calls.append(1)
        losses = loss.per_sample(model, x[idx], y[idx])
        return losses * float("inf") if len(calls) == 2 else losses
    buffers = [b.clone() for b in model.buffers()]
    stats = step.step(fn, y)
    assert stats.skipped and step.scaler.scale == 512.0
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # pass 1's update undone too
    assert all(bn.track_running_stats for bn in batchnorms(model))
    bf16 = GroupedSAM(model, opt, batched=True, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    assert not bf16.step(lambda idx: loss.per_sample(model, x[idx], y[idx]), y).skipped
    assert not all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
