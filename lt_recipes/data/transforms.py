"""Train, eval and contrastive-view transforms, and each dataset's channels and normalisation.

In-memory images stay uint8 tensors and go through ``torchvision.transforms.v2``, flipped only where the dataset's
row allows (never digits: a mirrored digit is a different glyph). Image files (ImageNet-LT, Places-LT, iNat) get timm's
``create_transform``, with the recipe's ``data.auto_augment`` policy string (``rand-n2-m10`` as in the paper).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.transforms import v2

from ..errors import DataError
from .table import dataset_info

if TYPE_CHECKING:
    from ..sections import DataConfig

# How both evaluation pipelines resize: bilinearly, torchvision v2's default and timm's create_transform's.
EVAL_INTERPOLATION = "bilinear"


class MultiViewTransform:
    """The classification view of an image followed by ``num_views`` contrastive views (BCL)."""

    def __init__(self, cls_transform: Callable, view_transform: Callable, num_views: int):
        self.cls_transform = cls_transform
        self.view_transform = view_transform
        self.num_views = num_views

    def __call__(self, img: Any) -> list[torch.Tensor]:
        return [self.cls_transform(img)] + [self.view_transform(img) for _ in range(self.num_views)]


class Cutout(torch.nn.Module):
    """Zero one ``size`` x ``size`` square centred on a uniformly drawn pixel, clipped at the borders (Cutout)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.size // 2
        out = img.clone()
        out[..., max(0, cy - half):min(h, cy - half + self.size), max(0, cx - half):min(w, cx - half + self.size)] = 0
        return out


def _mean_std(data_cfg: DataConfig, dataset: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    info = dataset_info(dataset)
    default = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if info.mean is None else (info.mean, info.std)
    out = []
    for i, key in enumerate(("mean", "std")):
        value = getattr(data_cfg, key)
        if value is None:
            value = default[i]
        if len(value) != in_chans or not all(isinstance(v, (int, float)) for v in value):
            raise DataError(f"data.{key}={list(value)!r} must hold {in_chans} numbers (one per channel of {dataset})")
        if key == "std" and min(value) <= 0:
            raise DataError(f"data.std={list(value)!r} must be > 0")
        out.append(tuple(float(v) for v in value))
    return out[0], out[1]


def eval_data_config(dataset: str, data_cfg: DataConfig, in_chans: int) -> dict[str, Any]:
    """The run's evaluation preprocessing as timm's data config (input_size, interpolation, mean, std, crop_pct,
    crop_mode): the transforms below are built from it, and tools/export.py writes it into the exported model's
    pretrained_cfg, so `timm.data.resolve_data_config` preprocesses as the run did. Image files are resized to
    size / 0.875 and centre-cropped; in-memory images are resized whole (crop_pct 1)."""
    mean, std = _mean_std(data_cfg, dataset, in_chans)
    size = data_cfg.img_size
    return {"input_size": (in_chans, size, size), "interpolation": EVAL_INTERPOLATION, "mean": mean, "std": std,
            "crop_pct": 1.0 if dataset_info(dataset).in_memory else DEFAULT_CROP_PCT, "crop_mode": "center"}


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


def normalize_uint8(inputs: torch.Tensor | list[torch.Tensor], mean: tuple[float, ...],
                    std: tuple[float, ...]) -> torch.Tensor | list[torch.Tensor]:
    """A uint8 batch (or every view of one) as the float pipeline gives it, computed where it lies (on the GPU, after
    a quarter of the float batch's bytes were copied): scaled by 1/255 and normalised (timm's prefetcher idea)."""
    if isinstance(inputs, (list, tuple)):
        return [normalize_uint8(x, mean, std) for x in inputs]
    m = torch.as_tensor(mean, dtype=torch.float32, device=inputs.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=inputs.device).view(-1, 1, 1)
    return inputs.to(torch.float32).mul_(1.0 / 255).sub_(m).div_(s)


def _timm_transforms(data_cfg: DataConfig, eval_cfg: dict[str, Any],
                     uint8_train: bool = False) -> tuple[Callable, Callable, Callable]:
    """(train, eval, contrastive view) transforms of image files from `timm.data.create_transform`: train is
    RandomResizedCrop + flip + `data.auto_augment` (e.g. rand-n2-m10), eval is `eval_cfg` (resize to size / crop_pct,
    centre crop), the view is SimCLR's (crop scale 0.2-1, flip, colour jitter with p 0.8, grey-scale with p 0.2)."""
    size = data_cfg.img_size
    common = {"mean": eval_cfg["mean"], "std": eval_cfg["std"], "use_prefetcher": uint8_train}
    eval_tf = create_transform(**eval_cfg, is_training=False)
    train_tf = create_transform(**eval_cfg, is_training=False, use_prefetcher=uint8_train) \
        if data_cfg.augment == "none" else create_transform(
            size, is_training=True, auto_augment=data_cfg.auto_augment, color_jitter=None, **common)
    view_tf = create_transform(size, is_training=True, scale=(0.2, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1),
                               color_jitter_prob=0.8, grayscale_prob=0.2, **common)
    return train_tf, eval_tf, view_tf


def build_transforms(dataset: str, data_cfg: DataConfig, in_chans: int, native_size: int | None,
                     uint8_train: bool = False) -> tuple[Callable, Callable]:
    """(train, eval) transforms; ``native_size`` is the image side of in-memory datasets, None for image files. With
    ``uint8_train`` the training images (and views) stay uint8, to be normalised on the device (`normalize_uint8`).

    Image files (PIL) get timm's transforms (`_timm_transforms`). In-memory datasets (uint8 tensors, which timm's
    PIL-based transforms do not take) keep torchvision v2: pad-and-crop, flip (where the dataset's row allows), the
    CIFAR or ImageNet AutoAugment policy with Cutout, or RandAugment(2, 10); conversion to float and normalisation
    last.
    """
    size, augment = data_cfg.img_size, data_cfg.augment
    eval_cfg = eval_data_config(dataset, data_cfg, in_chans)
    mean, std = eval_cfg["mean"], eval_cfg["std"]
    views = data_cfg.contrastive_views
    if native_size is None:
        train_tf, eval_tf, view_tf = _timm_transforms(data_cfg, eval_cfg, uint8_train)
        return (MultiViewTransform(train_tf, view_tf, views) if views else train_tf), eval_tf
    resize = [] if size == native_size else [v2.Resize(size, interpolation=v2.InterpolationMode(EVAL_INTERPOLATION))]
    eval_tf = v2.Compose([*resize, *_finish(mean, std)])
    finish = [v2.ToImage(), v2.ToPureTensor()] if uint8_train else _finish(mean, std)
    flip = [v2.RandomHorizontalFlip()] if dataset_info(dataset).flip else []
    if augment == "none":
        train_tf = v2.Compose([*resize, *finish])
    else:
        pad = max(1, round(size / 8))
        policy: list[Any] = []
        if augment == "autoaugment":
            policy = [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), Cutout(size // 2)]
        elif augment == "randaugment":
            policy = [v2.RandAugment(num_ops=2, magnitude=10)]
        train_tf = v2.Compose([*resize, v2.RandomCrop(size, padding=pad), *flip, *policy, *finish])
    if views:
        colour = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        view_tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0)), *flip,
                              *(colour if in_chans == 3 else []), *finish])
        train_tf = MultiViewTransform(train_tf, view_tf, views)
    return train_tf, eval_tf
