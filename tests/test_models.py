"""Models: the timm-registered CIFAR ResNets, the cosine classifier, LTModel and its heads, local checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lt_recipes.sections import ModelConfig
from lt_recipes.models import CLASSIFIER_PREFIX, is_classifier
from lt_recipes.models import BasicBlock, CosineLinear, ModelError, ShortcutA, create_lt_model


def model_cfg(**kw):
    return ModelConfig(**kw)


def cifar_resnet_params(blocks: int, num_classes: int, in_chans: int = 3) -> int:
    """Parameter count of a CIFAR ResNet by hand: 3x3 convs without bias, BN (2 per channel), option-A shortcuts."""
    conv = lambda i, o: 9 * i * o  # noqa: E731
    total = conv(in_chans, 16) + 2 * 16
    in_chs = 16
    for width in (16, 32, 64):
        for _ in range(blocks):
            total += conv(in_chs, width) + conv(width, width) + 4 * width
            in_chs = width
    return total + 64 * num_classes + num_classes


@pytest.fixture(scope="module")
def resnet32():
    torch.manual_seed(0)
    return timm.create_model("resnet32_cifar", num_classes=100).eval()


def test_resnet32_parameter_count(resnet32):
    n = sum(p.numel() for p in resnet32.parameters())
    print(f"resnet32_cifar (100 classes): {n} parameters")
    assert n == cifar_resnet_params(5, 100)
    assert abs(n - 0.46e6) <= 0.02e6
    assert sum(isinstance(m, BasicBlock) for m in resnet32.modules()) == 15


def test_resnet8_is_one_block_per_stage():
    m = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1)
    assert sum(isinstance(m_, BasicBlock) for m_ in m.modules()) == 3
    assert sum(p.numel() for p in m.parameters()) == cifar_resnet_params(1, 10, in_chans=1)
    assert m.in_chans == 1 and m(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_timm_api(resnet32):
    x = torch.randn(2, 3, 32, 32)
    fmap = resnet32.forward_features(x)
    assert fmap.shape == (2, 64, 8, 8)
    assert resnet32.num_features == 64 and resnet32.num_classes == 100 and resnet32.in_chans == 3
    pooled = resnet32.forward_head(fmap, pre_logits=True)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    fc = resnet32.get_classifier()
    assert isinstance(fc, nn.Linear) and fc.weight.shape == (100, 64)
    torch.testing.assert_close(resnet32(x), pooled @ fc.weight.T + fc.bias)
    assert resnet32.pretrained_cfg["classifier"] == "head.fc"


def test_reset_classifier():
    m = timm.create_model("resnet8_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    m.reset_classifier(7)
    assert m.num_classes == 7 and m.get_classifier().weight.shape == (7, 64) and m(x).shape == (2, 7)
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), m.forward_features(x).mean(dim=(2, 3)))
    m.reset_classifier(5, global_pool="max")
    logits = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(logits, m.forward_features(x).amax(dim=(2, 3)))


def test_features_only_matches_forward_features():
    torch.manual_seed(0)
    full = timm.create_model("resnet8_cifar").eval()
    feats = timm.create_model("resnet8_cifar", features_only=True).eval()
    feats.load_state_dict({k.replace(".", "_", 1) if k.startswith("stages.") else k: v
                           for k, v in full.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(1, 3, 32, 32)
    out = feats(x)
    assert [o.shape[1] for o in out] == [16, 16, 32, 64]
    torch.testing.assert_close(out[-1], full.forward_features(x))


def test_kaiming_init(resnet32):
    conv = resnet32.stages[2][3].conv1.weight
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)


def test_shortcut_a_has_no_parameters_and_pads():
    sc = ShortcutA(16, 32, stride=2)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    y = sc(x).numpy()
    xs = x.numpy()[:, :, ::2, ::2]
    assert y.shape == (2, 32, 4, 4)
    np.testing.assert_array_equal(y[:, 8:24], xs)
    assert not y[:, :8].any() and not y[:, 24:].any()
    m = timm.create_model("resnet8_cifar")
    assert [type(b.shortcut) for b in m.modules() if isinstance(b, BasicBlock)] == [nn.Identity, ShortcutA, ShortcutA]


def test_cosine_linear_formula():
    torch.manual_seed(0)
    layer = CosineLinear(5, 3, scale=16.0)
    x = torch.randn(4, 5)
    xs, w = x.double().numpy(), layer.weight.detach().double().numpy()
    ref = np.zeros((4, 3))
    for i in range(4):
        for c in range(3):
            ref[i, c] = 16.0 * np.dot(xs[i], w[c]) / (np.linalg.norm(xs[i]) * np.linalg.norm(w[c]))
    np.testing.assert_allclose(layer(x).detach().double().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert not any(n == "bias" for n, _ in layer.named_parameters())


def test_lt_model_shapes_and_classifier_names():
    model = create_lt_model(model_cfg(classifier="cosine", cosine_scale=10.0), num_classes=6, in_chans=3).eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 64) and model.num_features == 64 and model.num_classes == 6
    logits, feats2 = model(x, return_features=True)
    torch.testing.assert_close(feats2, feats)
    torch.testing.assert_close(logits, model.classifier(feats))
    assert logits.abs().max() <= 10.0 + 1e-5
    assert model.encoder.num_classes == 0
    names = [n for n, _ in model.named_parameters()]
    assert {n for n in names if is_classifier(n)} == {"classifier.weight"}
    assert all(n.startswith(("encoder.", CLASSIFIER_PREFIX)) for n in names)
    assert model.proj_head is None and model.proto_head is None
    with pytest.raises(ModelError, match="proj_head"):
        model.prototypes()


def test_bcl_heads():
    torch.manual_seed(0)
    model = create_lt_model(model_cfg(classifier="cosine", proj_head=[32, 8]), num_classes=5, in_chans=3)
    feats = torch.randn(4, 64)
    z = model.project(feats)
    protos = model.prototypes()
    assert z.shape == (4, 8) and protos.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(5))
    head = model.proto_head
    raw = head[3](torch.relu(head[1](head[0](model.classifier.weight))))
    torch.testing.assert_close(protos, raw / raw.norm(dim=1, keepdim=True))
    proj_ids = {id(p) for p in model.proj_head.parameters()}
    assert proj_ids.isdisjoint(id(p) for p in model.proto_head.parameters())
    assert [type(m) for m in model.proj_head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert not any(is_classifier(n) for n, _ in model.proj_head.named_parameters(prefix="proj_head"))


def test_timm_resnet50_backbone():
    model = create_lt_model(model_cfg(name="resnet50", drop_rate=0.2), num_classes=4, in_chans=3).eval()
    assert model.encoder.num_classes == 0 and model.num_features == 2048 and model.encoder.drop_rate == 0.2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_groupnorm_resnet_normalises_each_sample_alone():
    """norm_layer=groupnorm: same parameter count, no BatchNorm, and a sample's output does not depend on its batch."""
    torch.manual_seed(0)
    model = create_lt_model(model_cfg(norm_layer="groupnorm"), num_classes=5, in_chans=1).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 7 and norms[0].num_groups == 8  # stem + 2 per block, 8 groups
    assert sum(p.numel() for p in model.encoder.parameters()) == cifar_resnet_params(1, 0, in_chans=1)
    x = torch.randn(6, 1, 16, 16)
    assert torch.allclose(model(x)[:2], model(x[:2]), atol=1e-5)
    bn = create_lt_model(model_cfg(), num_classes=5, in_chans=1).train()
    assert not torch.allclose(bn(x)[:2], bn(x[:2]), atol=1e-3)  # BatchNorm couples the batch: the contrast


def test_unknown_norm_layer_names_the_key():
    with pytest.raises(ModelError, match="norm_layer.*'layernorm'"):
        create_lt_model(model_cfg(norm_layer="layernorm"), num_classes=4, in_chans=3)


def test_unknown_model_name():
    with pytest.raises(ModelError, match="model.name='resnet_nope'"):
        create_lt_model(model_cfg(name="resnet_nope"), num_classes=4, in_chans=3)


def test_pretrained_backbone_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet8_cifar", num_classes=10)
    state = source.state_dict()
    for i, wrap in enumerate([lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s, "epoch": 3},
                              lambda s: {f"module.{k}": v for k, v in s.items()}]):
        path = tmp_path / f"backbone{i}.pth"
        torch.save(wrap(state), path)
        model = create_lt_model(model_cfg(pretrained_path=str(path)), num_classes=3, in_chans=3)
        loaded = model.encoder.state_dict()
        assert set(loaded) == {k for k in state if not k.startswith("head.fc.")}
        for k, v in loaded.items():
            torch.testing.assert_close(v, state[k])
        assert model.classifier.weight.shape == (3, 64)


def test_pretrained_lt_model_checkpoint_and_class_mismatch(tmp_path):
    torch.manual_seed(2)
    source = create_lt_model(model_cfg(proj_head=[16, 8]), num_classes=6, in_chans=3)
    path = tmp_path / "run.pth"
    torch.save({"model": source.state_dict(), "epoch": 4}, path)
    same = create_lt_model(model_cfg(proj_head=[16, 8], pretrained_path=str(path)), num_classes=6, in_chans=3)
    for (k, a), (_, b) in zip(same.state_dict().items(), source.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ModelError) as err:
        create_lt_model(model_cfg(proj_head=[16, 8], pretrained_path=str(path)), num_classes=10, in_chans=3)
    msg = str(err.value)
    assert str(path) in msg and "'classifier.weight'" in msg and "(6, 64)" in msg and "(10, 64)" in msg


def test_pretrained_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="nope.pth"):
        create_lt_model(model_cfg(pretrained_path=str(missing)), num_classes=3, in_chans=3)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pth.*could not be read"):
        create_lt_model(model_cfg(pretrained_path=str(garbage)), num_classes=3, in_chans=3)
    state = timm.create_model("resnet8_cifar").state_dict()
    del state["conv1.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ModelError, match="partial.pth.*missing keys \\['conv1.weight'\\]"):
        create_lt_model(model_cfg(pretrained_path=str(partial)), num_classes=3, in_chans=3)
    wrong_arch = tmp_path / "resnet32.pth"
    torch.save(timm.create_model("resnet32_cifar").state_dict(), wrong_arch)
    with pytest.raises(ModelError, match="resnet32.pth.*unexpected keys"):
        create_lt_model(model_cfg(pretrained_path=str(wrong_arch)), num_classes=3, in_chans=3)
    one_chan = tmp_path / "gray.pth"
    torch.save(timm.create_model("resnet8_cifar", in_chans=1).state_dict(), one_chan)
    with pytest.raises(ModelError, match=r"gray.pth.*does not fit the backbone.*conv1 weight shape \(16, 1, 3, 3\)"):
        create_lt_model(model_cfg(pretrained_path=str(one_chan)), num_classes=3, in_chans=3)


def test_pretrained_backbone_goes_through_timm_channel_adaptation(tmp_path):
    """An RGB backbone initialises a grey-scale model as timm's pretrained loading does: first conv summed over
    the input channels, every other tensor as saved."""
    torch.manual_seed(4)
    rgb = timm.create_model("resnet8_cifar", num_classes=10).state_dict()
    path = tmp_path / "rgb.pth"
    torch.save(rgb, path)
    model = create_lt_model(model_cfg(pretrained_path=str(path)), num_classes=10, in_chans=1)
    got = model.encoder.state_dict()
    torch.testing.assert_close(got["conv1.weight"], rgb["conv1.weight"].sum(dim=1, keepdim=True))
    for k in got:
        if k != "conv1.weight":
            torch.testing.assert_close(got[k], rgb[k], msg=k)
