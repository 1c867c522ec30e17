"""Models: the CIFAR ResNets registered with timm, the cosine classifier, and `LTModel` (backbone + classifier + the
optional BCL heads) built by `create_lt_model` from a recipe's `model` section.

Importing this module registers `resnet32_cifar` and `resnet8_cifar`, so `timm.create_model("resnet32_cifar")` works
like any timm model. Nothing here downloads weights: backbones always start from `pretrained=False` and a local
checkpoint can be loaded with `model.pretrained_path` (timm's loader and `load_pretrained`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, load_state_dict, register_model
from timm.models import load_pretrained as timm_load_pretrained
from torch import nn

from .data.table import dataset_info
from .errors import ModelError, read_error

if TYPE_CHECKING:
    from .sections import ModelConfig

_logger = logging.getLogger(__name__)
_rows = threading.local()

__all__ = ["CifarResNet", "ShortcutA", "CosineLinear", "LTModel", "ModelError", "create_lt_model", "is_classifier",
           "head_rule", "ordered_parameters"]

# LTModel's classifier: the parameters GKP leaves out and the flattened buffers put last.
CLASSIFIER_PREFIX = "classifier."


def is_classifier(name: str) -> bool:
    """Whether a parameter name belongs to the classifier (`CLASSIFIER_PREFIX`), which GKP does not cover."""
    return name.startswith(CLASSIFIER_PREFIX)


# The names timm's models (and LTModel) give their classifier, tried in this order when a model has no
# get_classifier(): a parameter under one of them is the head.
HEAD_NAMES = ("classifier", "fc", "head")


def find_head(model: nn.Module) -> nn.Module | None:
    """`model`'s head, the classifier GKP and the steps leave out: `model.get_classifier()` when the model has it
    (timm's models), else the first of the attributes HEAD_NAMES it has (`classifier` for LTModel); None when none
    of them holds parameters."""
    get_classifier = getattr(model, "get_classifier", None)
    candidates = [get_classifier()] if callable(get_classifier) else []
    for head in [*candidates, *(getattr(model, name, None) for name in HEAD_NAMES)]:
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    return None


def head_rule(model: nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name belongs to `model`'s head (`find_head`); a model without one has every parameter
    covered, which the warning says."""
    head = find_head(model)
    if head is None:
        _logger.warning("%s has no get_classifier() and no parameters under %s: GKP and the steps cover all of its "
                        "parameters (pass is_excluded to name its head)", type(model).__name__, ", ".join(HEAD_NAMES))
        return lambda name: False
    ids = {id(p) for p in head.parameters()}
    return frozenset(n for n, p in model.named_parameters() if id(p) in ids).__contains__


def ordered_parameters(model: nn.Module,
                       is_excluded: Callable[[str], bool] = is_classifier) -> tuple[list[nn.Parameter],
                                                                                   list[nn.Parameter]]:
    """Trainable parameters split into the GKP-covered ones (encoder and heads) and the excluded ones (classifier)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in named if not is_excluded(n)], [p for n, p in named if is_excluded(n)]


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Rows computed inside are not batch samples (BCL's class prototypes): a pass that gives each group's rows
    parameters of their own (the grouped step's offset pass, lt_recipes.segments) runs the layers inside at the
    parameters' own value for every row. The model says where its rows are not samples; the pass reads it."""
    _rows.shared = getattr(_rows, "shared", 0) + 1
    try:
        yield
    finally:
        _rows.shared -= 1


def in_shared() -> bool:
    """Whether this thread runs inside `shared()`."""
    return getattr(_rows, "shared", 0) > 0


# ----------------------------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, section 4.2): 3x3 stem, three stages of BasicBlocks at 16/32/64 channels


class ShortcutA(nn.Module):
    """Option-A shortcut: parameter-free, subsamples by `stride` and zero-pads the channels up to `out_chs`.

    The padding is split evenly before and after the input channels, as in the CIFAR ResNet paper's code.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_before = (out_chs - in_chs) // 2
        self.pad_after = out_chs - in_chs - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


GROUP_NORM_GROUPS = 8


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUP_NORM_GROUPS, num_channels), num_channels)


# `model.norm_layer` of the CIFAR ResNets: BatchNorm (the reference design) or GroupNorm, which normalises each sample
# on its own, so that a pass over a group's samples computes exactly that group's share of a whole-batch pass.
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {"batchnorm": nn.BatchNorm2d, "groupnorm": _group_norm}


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm plus the shortcut, then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.shortcut = ShortcutA(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _kaiming_init(module: nn.Module) -> None:
    """He-normal (fan-in) weights for convs and linears, as the CIFAR ResNet reference code does."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet with the timm model API (`depth` = 6 * blocks_per_stage + 2: 8, 20, 32, 44, 56, 110)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, widths: tuple[int, int, int] = (16, 32, 64),
                 norm_layer: str = "batchnorm") -> None:
        super().__init__()
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {sorted(NORM_LAYERS)}, got {norm_layer!r}")
        norm = NORM_LAYERS[norm_layer]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = norm(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        stages, in_chs, reduction = [], widths[0], 1
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if b == 0 else width, width, stride if b == 0 else 1, norm)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(_kaiming_init)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final layer (0 removes it: forward then returns pooled features)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.fc.apply(_kaiming_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map [B, 64, H/4, W/4] before pooling."""
        return self.stages(self.act1(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout, and the classifier unless `pre_logits`."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_cfg() -> dict[str, Any]:
    cifar = dataset_info("cifar10")
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": cifar.mean, "std": cifar.std,
            "first_conv": "conv1", "classifier": "head.fc"}


default_cfgs = generate_default_cfgs({"resnet32_cifar": _cifar_cfg(), "resnet8_cifar": _cifar_cfg()})


def _create_cifar_resnet(variant: str, blocks_per_stage: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, blocks_per_stage=blocks_per_stage,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (5 BasicBlocks per stage, option-A shortcuts; 0.46M parameters)."""
    return _create_cifar_resnet("resnet32_cifar", 5, pretrained, **kwargs)


@register_model
def resnet8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8 for 32x32 inputs (1 BasicBlock per stage): the same family, small enough for CPU runs."""
    return _create_cifar_resnet("resnet8_cifar", 1, pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Classifier and the long-tail model wrapper


class CosineLinear(nn.Module):
    """Normalised linear classifier: logits = scale * cos(x, w_c) for every class row w_c of `weight` [C, F]."""

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}"


def _mlp_head(in_features: int, hidden: int, out: int) -> nn.Sequential:
    """BCL head: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


class LTModel(nn.Module):
    """A timm backbone (created with num_classes=0, so its forward returns pooled features) plus our classifier.

    `classifier` is the only module whose parameter names start with "classifier." (`CLASSIFIER_PREFIX`: GKP and
    the steps rely on that to leave it out or put it last). With `proj_dims=(hidden, out)`, `proj_head` maps features to the
    contrastive embedding and `proto_head`, a same-shaped MLP with its own parameters, maps the classifier's weight
    rows to class prototypes.
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int,
                 classifier: str = "linear", cosine_scale: float = 30.0,
                 proj_dims: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = num_features
        self.num_classes = num_classes
        if classifier == "linear":
            self.classifier: nn.Module = nn.Linear(num_features, num_classes)
        else:
            self.classifier = CosineLinear(num_features, num_classes, cosine_scale)
        self.proj_head: nn.Module | None = None
        self.proto_head: nn.Module | None = None
        if proj_dims is not None:
            hidden, out = proj_dims
            self.proj_head = _mlp_head(num_features, hidden, out)
            self.proto_head = _mlp_head(num_features, hidden, out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [B, num_features]."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C]; with `return_features`, (logits, pooled features) from the same pass.

        Losses that need the features ask for them here rather than calling `forward_features` separately, so one
        call goes through a DDP wrapper and its gradient synchronisation.
        """
        feats = self.forward_features(x)
        logits = self.classifier(feats)
        return (logits, feats) if return_features else logits

    def _heads(self) -> tuple[nn.Module, nn.Module]:
        if self.proj_head is None or self.proto_head is None:
            raise ModelError("this model has no contrastive heads: set model.proj_head=[hidden, out]")
        return self.proj_head, self.proto_head

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive embeddings [B, out] of pooled features."""
        return F.normalize(self._heads()[0](feats), dim=1)

    def prototypes(self) -> torch.Tensor:
        """L2-normalised class prototypes [C, out]: the prototype head applied to the classifier's weight rows.

        Their rows are classes, not batch samples: in the grouped step's offset passes they are computed at the
        parameters' own value (`shared`)."""
        with shared():
            return F.normalize(self._heads()[1](self.classifier.weight), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Building and local checkpoints


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict read by timm's `load_state_dict` (.safetensors or torch files, plain or under "state_dict" /
    "model", EMA weights first as timm prefers them, DDP's "module." prefixes removed, weights_only)."""
    if not os.path.isfile(path):
        raise ModelError(f"model.pretrained_path={path!r} is not a file")
    try:
        obj = load_state_dict(path)
    except Exception as e:  # torch, safetensors and timm raise several types; all mean "unreadable"
        raise ModelError(f"model.pretrained_path={path!r} could not be read as a checkpoint: it {read_error(e)}") \
            from None
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.pretrained_path={path!r} holds no state dict (expected a mapping of tensors, "
                         "optionally under 'state_dict' or 'model')")
    return dict(obj)


def _check_keys(own: Mapping[str, Any], state: Mapping[str, Any], path: str, what: str) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(f"model.pretrained_path={path!r} does not match the {what}: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """load_state_dict(strict=True) with errors that name the file, the keys and both shapes."""
    own = module.state_dict()
    _check_keys(own, state, path, what)
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ModelError(f"model.pretrained_path={path!r}: key {key!r} has shape {tuple(value.shape)} in the "
                             f"checkpoint but {tuple(own[key].shape)} in the {what} (different number of classes "
                             "or architecture?)")
    module.load_state_dict(state, strict=True)


def load_pretrained(model: LTModel, path: str, in_chans: int) -> None:
    """Load a local checkpoint: an `LTModel` state dict (keys "encoder.*", e.g. a run's checkpoint.pt) into the whole
    model; otherwise a timm backbone state dict (e.g. from tools/export.py) into `model.encoder` through timm's
    `load_pretrained`, the mechanism behind `pretrained_cfg_overlay`, which adapts the first convolution to
    `in_chans`; the backbone's own classifier keys are dropped first."""
    state = _read_state_dict(path)
    if any(k.startswith("encoder.") for k in state):
        _load_strict(model, state, path, "model")
        _logger.info("loaded the whole model (encoder, classifier, heads) from %s", path)
        return
    cfg = dict(model.encoder.pretrained_cfg)
    names = cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    dropped = sorted(k for k in state if k.startswith(tuple(f"{n}." for n in names)))
    state = {k: v for k, v in state.items() if k not in dropped}
    _check_keys(model.encoder.state_dict(), state, path, "backbone")
    try:  # the backbone has no classifier (num_classes=0), so timm loads strictly
        source = {"state_dict": state, "source": None, "file": None, "url": None, "hf_hub_id": None}
        timm_load_pretrained(model.encoder, pretrained_cfg={**cfg, **source, "num_classes": 0}, num_classes=0,
                             in_chans=in_chans)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"model.pretrained_path={path!r} does not fit the backbone: {e}") from None
    _logger.info("loaded the backbone from %s (dropped its classifier keys %s)", path, dropped)


def create_lt_model(model_cfg: ModelConfig, num_classes: int, in_chans: int) -> LTModel:
    """Build the recipe's model: timm backbone `model_cfg.name` without classifier, plus our classifier and heads.

    `norm_layer` None keeps the backbone's own (timm gets it otherwise). Never downloads: timm gets pretrained=False,
    weights come only from `pretrained_path`. `channels_last` puts the 4-D weights in NHWC memory order (timm's
    --channels-last), here, before any step flattens them.
    """
    name = model_cfg.name
    if not timm.is_model(name):
        raise ModelError(f"model.name={name!r} is not a timm model (e.g. resnet32_cifar, resnet8_cifar, resnet50, "
                         "resnext50_32x4d, resnet152)")
    extra = {"norm_layer": model_cfg.norm_layer} if model_cfg.norm_layer else {}
    try:
        encoder = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans,
                                    drop_rate=model_cfg.drop_rate, **extra)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model.name={name!r} could not be created with in_chans={in_chans}, "
                         f"drop_rate={model_cfg.drop_rate}, {extra or 'its own norm layer'}: {e}") from None
    num_features = int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)
    proj = model_cfg.proj_head
    model = LTModel(encoder, num_features, num_classes, classifier=model_cfg.classifier,
                    cosine_scale=float(model_cfg.cosine_scale), proj_dims=tuple(proj) if proj else None)
    if model_cfg.pretrained_path:
        load_pretrained(model, model_cfg.pretrained_path, in_chans)
    if model_cfg.channels_last:  # before a step flattens the parameters, which keeps their memory order
        model.to(memory_format=torch.channels_last)
    _logger.info("model %s: %d features, %d classes, %s classifier, %.3fM parameters", name, num_features,
                 num_classes, model_cfg.classifier, sum(p.numel() for p in model.parameters()) / 1e6)
    return model
