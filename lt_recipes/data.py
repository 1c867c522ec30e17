"""Long-tailed data: the LT cut, held-out validation splits, transforms, the epoch sampler and the loaders.

Datasets and where they come from (SPEC.md section 6):

* ``digits``: scikit-learn's bundled ``load_digits`` (8x8, 1 channel, values 0..16 scaled to uint8). A class-balanced
  test split of ``data.test_per_class`` images per class is carved first with a fixed seed (0, so every run seed is
  scored on the same test set); the rest is the training pool.
* ``fmnist``: Fashion-MNIST idx files (``train-images-idx3-ubyte`` etc., gzipped or raw) under ``data.root``,
  by default where Debian's ``dataset-fashion-mnist`` package installs them.
* ``cifar10`` / ``cifar100``: the python-pickle folders of torchvision's layout (``cifar-10-batches-py``,
  ``cifar-100-python``) under ``data.root``, read directly (no md5 check), so generated folders work too.
* ``imagenet_lt`` / ``places_lt`` / ``inat2018``: list files of ``relative/path.jpg label`` lines, or for iNat the
  COCO-style ``train2018.json`` / ``val2018.json`` (chosen by the ``.json`` suffix); images are opened lazily as RGB.

The in-memory datasets (digits, fmnist, cifar) get the long-tailed profile of Cao et al. 2019: class ``i`` keeps
``int(n_max * (1/r) ** (i / (C - 1)))`` images, the first ones after shuffling that class's indices; one
``np.random.RandomState(0)`` shuffles the classes in class order (the same stream as ``np.random.seed(0)`` followed
by ``np.random.shuffle`` per class). They have no validation split, so ``data.val_per_class`` images per class are
drawn (seeded with the run seed) from the images the LT cut discarded; a head class without enough leftovers gives
the shortfall from its kept images. ``lt_counts`` is therefore exactly the published profile and ``train_counts``
differs from it only for head classes.

In-memory images stay uint8 tensors and go through ``torchvision.transforms.v2``; digits are never flipped
(a mirrored digit is a different glyph). Image files (ImageNet-LT, Places-LT, iNat) get timm's
``create_transform``, with the recipe's ``data.auto_augment`` policy string (``rand-n2-m10`` as in the paper).
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .choices import IN_MEMORY_AUGMENTS, IN_MEMORY_DATASETS, LIST_DATASETS, SAMPLERS
from .errors import DataError, DataNotFoundError

_logger = logging.getLogger(__name__)

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
LT_SEED = 0
DIGITS_TEST_SEED = 0
MANY_SHOT = 100
FEW_SHOT = 20

NUM_CLASSES = {"digits": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100}
_DEFAULT_MEAN_STD = {
    "digits": ((0.3053,), (0.3759,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class LTData:
    """Everything the training run needs from the data layer."""

    dataset: str
    num_classes: int
    in_chans: int
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    train_targets: np.ndarray
    train_counts: list[int]
    lt_counts: list[int]
    num_val_from_train: int


# ----------------------------------------------------------------------------------------------------------------
# Long-tailed profile and splits


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class image counts of the exponential LT profile: ``n_i = int(n_max * (1/r) ** (i / (C - 1)))``."""
    if not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1:
        raise DataError(f"data.imbalance_ratio={imbalance_ratio!r} must be a number >= 1")
    if num_classes < 1 or n_max < 1:
        raise DataError(f"long-tail profile needs num_classes >= 1 and n_max >= 1, got {num_classes} and {n_max}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _class_sizes(targets: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise DataError(f"{what}: label {int(bad[0])} outside [0, {num_classes})")
    return np.bincount(targets, minlength=num_classes)


def long_tail_indices(targets: np.ndarray, num_classes: int, imbalance_ratio: float,
                      n_max: int | None = None) -> np.ndarray:
    """Indices kept by the LT cut, class by class in class order (see the module docstring for the seed convention).

    ``n_max`` defaults to the smallest class size, so every class can give what the profile asks.
    """
    targets = np.asarray(targets, dtype=np.int64)
    sizes = _class_sizes(targets, num_classes, "long_tail_indices targets")
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        raise DataError(f"class {int(empty[0])} has no training samples before the LT cut")
    n_max = int(sizes.min()) if n_max is None else int(n_max)
    counts = long_tail_counts(n_max, num_classes, imbalance_ratio)
    rng = np.random.RandomState(LT_SEED)
    kept = []
    for c, n in enumerate(counts):
        if n == 0:
            raise DataError(f"class {c} has no training samples after the LT cut: "
                            f"int({n_max} * (1/{imbalance_ratio}) ** ({c}/{num_classes - 1})) = 0; "
                            f"lower data.imbalance_ratio or use more images per class")
        if n > sizes[c]:
            raise DataError(f"class {c} has {int(sizes[c])} samples, fewer than the {n} the LT profile keeps "
                            f"(n_max={n_max})")
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


def class_splits(train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class ids per shot group: Many (> 100 training images), Medium (20..100), Few (< 20)."""
    splits: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        splits["many" if n > MANY_SHOT else "few" if n < FEW_SHOT else "medium"].append(c)
    return splits


def _balanced_pick(targets: np.ndarray, num_classes: int, per_class: int, rng: np.random.Generator,
                   key: str) -> np.ndarray:
    """``per_class`` random indices of every class, leaving at least one image of each class behind."""
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) <= per_class:
            raise DataError(f"class {c} has {len(idx)} images; {key}={per_class} must be smaller")
        picked.append(np.sort(rng.choice(idx, per_class, replace=False)))
    return np.concatenate(picked)


def _hold_out_val(targets: np.ndarray, kept: np.ndarray, num_classes: int, per_class: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split the pool into (train, val) indices: val comes from the LT leftovers, head-class shortfall from kept."""
    kept_mask = np.zeros(len(targets), dtype=bool)
    kept_mask[kept] = True
    val_parts = []
    for c in range(num_classes):
        in_class = targets == c
        left = np.flatnonzero(in_class & ~kept_mask)
        take = rng.choice(left, min(per_class, len(left)), replace=False)
        short = per_class - len(take)
        if short:
            kept_c = np.flatnonzero(in_class & kept_mask)
            if short >= len(kept_c):
                raise DataError(f"class {c}: {len(kept_c)} images after the LT cut and {len(left)} left over cannot "
                                f"give data.val_per_class={per_class} validation images and still train on one")
            take = np.concatenate([take, rng.choice(kept_c, short, replace=False)])
        val_parts.append(np.sort(take))
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=np.int64)
    return kept[~np.isin(kept, val)], val


# ----------------------------------------------------------------------------------------------------------------
# Readers


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64)


def _read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format: 0, 0, dtype code, ndim, big-endian int32 dims, data) of unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(dims) != ndim or len(raw) - header != math.prod(dims):
        raise DataError(f"{path}: idx header says shape {dims} but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_path(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataNotFoundError(f"{os.path.join(root, stem)}[.gz] not found (data.root={root!r})")


def _read_fmnist(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for split in ("train", "t10k"):
        images_path = _idx_path(root, f"{split}-images-idx3-ubyte")
        labels_path = _idx_path(root, f"{split}-labels-idx1-ubyte")
        images, labels = _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) "
                            "do not hold N images of HxW and N labels")
        _class_sizes(labels, NUM_CLASSES["fmnist"], labels_path)
        out += [images[:, None], labels]
    return out[0], out[1], out[2], out[3]


def _read_cifar_files(folder: str, files: list[str], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataNotFoundError(f"CIFAR file {path} not found (data.root must hold torchvision's layout)")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a CIFAR python pickle ({e})") from None
        for key in ("data", label_key):
            if not isinstance(entry, dict) or key not in entry:
                raise DataError(f"{path}: missing key '{key}' (expected a dict with 'data' and '{label_key}')")
        data = np.asarray(entry["data"], dtype=np.uint8)
        lab = np.asarray(entry[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(f"{path}: 'data' has shape {data.shape} and '{label_key}' {len(lab)} entries; "
                            "expected (N, 3072) and N")
        _class_sizes(lab, num_classes, f"{path} '{label_key}'")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar(root: str, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder, train_files, test_files, label_key = CIFAR_LAYOUT[dataset]
    folder = os.path.join(root, folder)
    num_classes = NUM_CLASSES[dataset]
    train = _read_cifar_files(folder, train_files, label_key, num_classes)
    test = _read_cifar_files(folder, test_files, label_key, num_classes)
    return train[0], train[1], test[0], test[1]


@dataclass(frozen=True)
class _Record:
    path: str
    label: int
    source: str


def _read_list(path: str) -> list[tuple[str, int, str]]:
    """(relative path, label, 'file:line') for every non-blank ``relative/path.jpg label`` line."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            try:
                label = int(parts[1]) if len(parts) == 2 else -1
            except ValueError:
                label = -1
            if label < 0:
                raise DataError(f"{path}:{lineno}: expected 'relative/path.jpg label' with a label >= 0, got {text!r}")
            entries.append((parts[0], label, f"{path}:{lineno}"))
    return entries


def _require(obj: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with keys {list(keys)}, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")


def _int_field(obj: dict[str, Any], key: str, where: str) -> int:
    try:
        return int(obj[key])
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{key}' must be an integer, got {obj[key]!r}") from None


def _read_inat_json(path: str) -> tuple[list[tuple[str, int, str]], list[int]]:
    """(file name, category id, source) per image of a COCO-style json, and its sorted category ids."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    _require(doc, ("images", "annotations", "categories"), path)
    category_ids = set()
    for i, cat in enumerate(doc["categories"]):
        _require(cat, ("id",), f"{path} categories[{i}]")
        category_ids.add(_int_field(cat, "id", f"{path} categories[{i}]"))
    by_image: dict[Any, int] = {}
    for i, ann in enumerate(doc["annotations"]):
        _require(ann, ("image_id", "category_id"), f"{path} annotations[{i}]")
        if ann["image_id"] in by_image:
            raise DataError(f"{path} annotations[{i}]: image_id {ann['image_id']!r} has a second annotation")
        by_image[ann["image_id"]] = _int_field(ann, "category_id", f"{path} annotations[{i}]")
    entries = []
    for i, img in enumerate(doc["images"]):
        where = f"{path} images[{i}]"
        _require(img, ("id", "file_name"), where)
        if img["id"] not in by_image:
            raise DataError(f"{where}: image id {img['id']!r} ({img['file_name']}) has no annotation")
        entries.append((img["file_name"], by_image[img["id"]], where))
    return entries, sorted(category_ids)


def _read_entries(path: str,
                  label_of: dict[int, int] | None) -> tuple[list[tuple[str, int, str]], dict[int, int] | None]:
    """(relative path, label, source) of a list file or COCO-style json; json category ids become contiguous labels
    through ``label_of``, built from this json's sorted category ids when None (the training json)."""
    if not path.endswith(".json"):
        entries = _read_list(path)
    else:
        entries, ids = _read_inat_json(path)
        if label_of is None:
            label_of = {cid: i for i, cid in enumerate(ids)}
        for _, cid, where in entries:
            if cid not in label_of:
                raise DataError(f"{where}: category_id {cid} is not among the training categories")
        entries = [(name, label_of[cid], where) for name, cid, where in entries]
    if not entries:
        raise DataError(f"{path}: lists no images")
    return entries, label_of


def _readable(path: str, size: int) -> bool:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im.load()
        return True
    except _PIL_ERRORS:
        return False


def _check_images(records: list[_Record], skip: bool, size: int, workers: int) -> tuple[list[_Record], int]:
    """Drop unreadable images when ``skip`` (each fully decoded once); otherwise fail on the first missing one."""
    if not skip:
        for r in records:
            if not os.path.isfile(r.path):
                raise DataNotFoundError(f"image {r.path} ({r.source}) not found; set data.skip_bad_images=true "
                                        "to skip missing or unreadable images")
        return records, 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ok = list(pool.map(lambda r: _readable(r.path, size), records))
    bad = [r for r, good in zip(records, ok) if not good]
    for r in bad[:5]:
        _logger.warning("skipping unreadable or missing image %s (%s)", r.path, r.source)
    return [r for r, good in zip(records, ok) if good], len(bad)


# ----------------------------------------------------------------------------------------------------------------
# Datasets and transforms


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray, transform: Callable[[torch.Tensor], Any]):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), int(self.targets[index])


class ImageListDataset(Dataset):
    """Image files opened lazily as RGB; a file that cannot be decoded raises an error naming it and its source."""

    def __init__(self, records: Sequence[_Record], transform: Callable[[Image.Image], Any]):
        self.paths = [r.path for r in records]
        self.sources = [r.source for r in records]
        self.targets = np.array([r.label for r in records], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except _PIL_ERRORS as e:
            raise DataError(f"image {path} ({self.sources[index]}) cannot be read: {e}; set "
                            "data.skip_bad_images=true to drop unreadable images when the data is built") from None
        return self.transform(img), int(self.targets[index])


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


def dataset_in_chans(dataset: str) -> int:
    """Image channels of a dataset: 1 for the grey-scale digits and Fashion-MNIST, 3 for the others."""
    return len(_DEFAULT_MEAN_STD.get(dataset, (IMAGENET_DEFAULT_MEAN,))[0])


def _mean_std(data_cfg: dict[str, Any], dataset: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    default = _DEFAULT_MEAN_STD.get(dataset, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    out = []
    for i, key in enumerate(("mean", "std")):
        value = data_cfg[key]
        if value is None:
            value = default[i]
        if len(value) != in_chans or not all(isinstance(v, (int, float)) for v in value):
            raise DataError(f"data.{key}={list(value)!r} must hold {in_chans} numbers (one per channel of {dataset})")
        if key == "std" and min(value) <= 0:
            raise DataError(f"data.std={list(value)!r} must be > 0")
        out.append(tuple(float(v) for v in value))
    return out[0], out[1]


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


def _timm_transforms(data_cfg: dict[str, Any], mean: tuple[float, ...],
                     std: tuple[float, ...]) -> tuple[Callable, Callable, Callable]:
    """(train, eval, contrastive view) transforms of image files from `timm.data.create_transform`: train is
    RandomResizedCrop + flip + `data.auto_augment` (e.g. rand-n2-m10), eval resizes to size / crop_pct and
    centre-crops, the view is SimCLR's (crop scale 0.2-1, flip, colour jitter with p 0.8, grey-scale with p 0.2)."""
    size, common = data_cfg["img_size"], {"mean": mean, "std": std}
    eval_tf = create_transform(size, is_training=False, crop_pct=DEFAULT_CROP_PCT, **common)
    train_tf = eval_tf if data_cfg["augment"] == "none" else create_transform(
        size, is_training=True, auto_augment=data_cfg["auto_augment"], color_jitter=None, **common)
    view_tf = create_transform(size, is_training=True, scale=(0.2, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1),
                               color_jitter_prob=0.8, grayscale_prob=0.2, **common)
    return train_tf, eval_tf, view_tf


def build_transforms(dataset: str, data_cfg: dict[str, Any], in_chans: int,
                     native_size: int | None) -> tuple[Callable, Callable]:
    """(train, eval) transforms; ``native_size`` is the image side of in-memory datasets, None for image files.

    Image files (PIL) get timm's transforms (`_timm_transforms`). In-memory datasets (uint8 tensors, which timm's
    PIL-based transforms do not take) keep torchvision v2: pad-and-crop, flip (never for digits), the CIFAR or
    ImageNet AutoAugment policy with Cutout, or RandAugment(2, 10); conversion to float and normalisation last.
    """
    size, augment = data_cfg["img_size"], data_cfg["augment"]
    mean, std = _mean_std(data_cfg, dataset, in_chans)
    views = data_cfg["contrastive_views"]
    if native_size is None:
        if augment in IN_MEMORY_AUGMENTS:
            raise DataError(f"data.augment={augment} is for in-memory datasets; image files use timm's transforms: "
                            "data.augment=basic with data.auto_augment (e.g. rand-n2-m10)")
        train_tf, eval_tf, view_tf = _timm_transforms(data_cfg, mean, std)
        return (MultiViewTransform(train_tf, view_tf, views) if views else train_tf), eval_tf
    resize = [] if size == native_size else [v2.Resize(size)]
    eval_tf = v2.Compose([*resize, *_finish(mean, std)])
    flip = [] if dataset == "digits" else [v2.RandomHorizontalFlip()]
    if augment == "none":
        train_tf = eval_tf
    else:
        pad = max(1, round(size / 8))
        policy: list[Any] = []
        if augment == "autoaugment":
            policy = [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), Cutout(size // 2)]
        elif augment == "randaugment":
            policy = [v2.RandAugment(num_ops=2, magnitude=10)]
        train_tf = v2.Compose([*resize, v2.RandomCrop(size, padding=pad), *flip, *policy, *_finish(mean, std)])
    if views:
        colour = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        view_tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0)), *flip,
                              *(colour if in_chans == 3 else []), *_finish(mean, std)])
        train_tf = MultiViewTransform(train_tf, view_tf, views)
    return train_tf, eval_tf


# ----------------------------------------------------------------------------------------------------------------
# Building


def _data_root(data_cfg: dict[str, Any]) -> str:
    dataset, root = data_cfg["dataset"], data_cfg["root"]
    if root is None:
        if dataset != "fmnist":
            raise DataError(f"data.root is required for dataset {dataset!r} (e.g. --set data.root=/path/to/data)")
        root = FMNIST_ROOT
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.root={root!r} does not exist or is not a directory")
    return root


def _build_in_memory(cfg: dict[str, Any]) -> LTData:
    d = cfg["data"]
    dataset = d["dataset"]
    num_classes = NUM_CLASSES[dataset]
    if d["imbalance_ratio"] is None:
        raise DataError(f"data.imbalance_ratio is required for dataset {dataset!r}")
    if dataset == "digits":
        images, targets = _read_digits()
        test_idx = _balanced_pick(targets, num_classes, d["test_per_class"], np.random.default_rng(DIGITS_TEST_SEED),
                                  "data.test_per_class")
        pool = np.setdiff1d(np.arange(len(targets)), test_idx)
        test_images, test_targets = images[test_idx], targets[test_idx]
        images, targets = images[pool], targets[pool]
    elif dataset == "fmnist":
        images, targets, test_images, test_targets = _read_fmnist(_data_root(d))
    else:
        images, targets, test_images, test_targets = _read_cifar(_data_root(d), dataset)
    cap = d["max_per_class"]
    n_max = None if cap is None else min(cap, int(np.bincount(targets, minlength=num_classes).min()))
    kept = long_tail_indices(targets, num_classes, d["imbalance_ratio"], n_max)
    lt_counts = np.bincount(targets[kept], minlength=num_classes).tolist()
    train_idx, val_idx = _hold_out_val(targets, kept, num_classes, d["val_per_class"],
                                       np.random.default_rng(cfg["seed"]))
    in_chans, native = images.shape[1], images.shape[-1]
    train_tf, eval_tf = build_transforms(dataset, d, in_chans, native)
    train_images = torch.from_numpy(np.ascontiguousarray(images[train_idx]))
    train_targets = targets[train_idx]
    return LTData(
        dataset=dataset, num_classes=num_classes, in_chans=in_chans,
        train=TensorImageDataset(train_images, train_targets, train_tf),
        train_eval=TensorImageDataset(train_images, train_targets, eval_tf),
        val=TensorImageDataset(torch.from_numpy(np.ascontiguousarray(images[val_idx])), targets[val_idx], eval_tf),
        test=TensorImageDataset(torch.from_numpy(np.ascontiguousarray(test_images)), test_targets, eval_tf),
        train_targets=train_targets,
        train_counts=np.bincount(train_targets, minlength=num_classes).tolist(),
        lt_counts=lt_counts,
        num_val_from_train=len(val_idx),
    )


def _list_path(root: str, data_cfg: dict[str, Any], key: str) -> str | None:
    name = data_cfg[key]
    if name is None:
        return None
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataNotFoundError(f"data.{key}: {path} not found")
    return path


def _build_from_files(cfg: dict[str, Any]) -> LTData:
    d = cfg["data"]
    dataset = d["dataset"]
    root = _data_root(d)
    if d["imbalance_ratio"] is not None:
        raise DataError(f"data.imbalance_ratio={d['imbalance_ratio']} does not apply to {dataset!r} "
                        "(its long tail comes from the list files); set it to null")
    train_path = _list_path(root, d, "train_list")
    if train_path is None:
        raise DataError(f"data.train_list is required for dataset {dataset!r}")
    val_path = _list_path(root, d, "val_list")
    test_path = _list_path(root, d, "test_list")
    if val_path is None and test_path is None:
        raise DataError(f"dataset {dataset!r} needs data.val_list or data.test_list (or both)")
    if test_path is None:
        _logger.info("data.test_list is not set: %s is scored on the validation split %s", dataset, val_path)
    if val_path is None:
        _logger.info("data.val_list is not set: %s holds out %d training images per class for validation",
                     dataset, d["val_per_class"])

    train_entries, label_of = _read_entries(train_path, None)
    num_classes = len(label_of) if label_of is not None else max(label for _, label, _ in train_entries) + 1
    empty = np.flatnonzero(np.bincount([label for _, label, _ in train_entries], minlength=num_classes) == 0)
    if empty.size:
        raise DataError(f"class {int(empty[0])} has no training samples in {train_path} "
                        f"({len(empty)} of {num_classes} classes are empty)")
    paths = {"train": train_path, "val": val_path, "test": test_path}
    splits, skipped = {}, {}
    for name, path in paths.items():
        if path is None:
            continue
        entries = train_entries if name == "train" else _read_entries(path, label_of)[0]
        for _, label, where in entries:
            if not 0 <= label < num_classes:
                raise DataError(f"{where}: label {label} outside [0, {num_classes}) (num_classes from {train_path})")
        records = [_Record(os.path.join(root, rel), label, where) for rel, label, where in entries]
        splits[name], skipped[name] = _check_images(records, d["skip_bad_images"], d["img_size"], d["num_workers"])
    if sum(skipped.values()):
        _logger.warning("skipped %d unreadable or missing images (%s)", sum(skipped.values()),
                        ", ".join(f"{k} {v}" for k, v in skipped.items()))
    train_counts = np.bincount([r.label for r in splits["train"]], minlength=num_classes)
    empty = np.flatnonzero(train_counts == 0)
    if empty.size:
        raise DataError(f"class {int(empty[0])} has no readable training images left in {train_path}")
    num_val_from_train = 0
    if "val" not in splits:
        labels = np.array([r.label for r in splits["train"]], dtype=np.int64)
        train_idx, val_idx = _hold_out_val(labels, np.arange(len(labels)), num_classes, d["val_per_class"],
                                           np.random.default_rng(cfg["seed"]))
        splits["val"] = [splits["train"][i] for i in val_idx]
        splits["train"] = [splits["train"][i] for i in train_idx]
        num_val_from_train = len(val_idx)
    train_tf, eval_tf = build_transforms(dataset, d, 3, None)
    targets = np.array([r.label for r in splits["train"]], dtype=np.int64)
    val = ImageListDataset(splits["val"], eval_tf)
    return LTData(
        dataset=dataset, num_classes=num_classes, in_chans=3,
        train=ImageListDataset(splits["train"], train_tf),
        train_eval=ImageListDataset(splits["train"], eval_tf),
        val=val,
        test=ImageListDataset(splits["test"], eval_tf) if "test" in splits else val,
        train_targets=targets,
        train_counts=np.bincount(targets, minlength=num_classes).tolist(),
        lt_counts=train_counts.tolist(),
        num_val_from_train=num_val_from_train,
    )


def build_data(cfg: dict[str, Any]) -> LTData:
    """Build train / train-eval / val / test datasets from a validated recipe (its `data` section and `seed`)."""
    dataset = cfg["data"]["dataset"]
    if dataset in IN_MEMORY_DATASETS:
        data = _build_in_memory(cfg)
    elif dataset in LIST_DATASETS:
        data = _build_from_files(cfg)
    else:
        raise DataError(f"data.dataset={dataset!r} is not one of {list(IN_MEMORY_DATASETS + LIST_DATASETS)}")
    splits = class_splits(data.train_counts)
    _logger.info("%s: %d classes, %d train images (LT cut %d), %d val (%d from the training pool), %d test; "
                 "many/medium/few classes %d/%d/%d", dataset, data.num_classes, len(data.train), sum(data.lt_counts),
                 len(data.val), data.num_val_from_train, len(data.test), len(splits["many"]), len(splits["medium"]),
                 len(splits["few"]))
    return data


# ----------------------------------------------------------------------------------------------------------------
# Sampling and loading


class EpochSampler(Sampler[int]):
    """Training order as a pure function of (seed, epoch), identical on every process.

    ``random``: a permutation of the dataset (repeated if ``num_samples`` exceeds it). ``class_balanced``: every
    draw picks a class uniformly, then one of its samples uniformly, with replacement. Accelerate shards the
    resulting batches across ranks, so the sampler itself never looks at the rank.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray, mode: str, seed: int, num_samples: int | None = None):
        if mode not in SAMPLERS:
            raise DataError(f"data.sampler={mode!r} must be one of {', '.join(SAMPLERS)}")
        if seed < 0:
            raise DataError(f"seed={seed} must be >= 0")
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.targets) == 0:
            raise DataError(f"EpochSampler needs a non-empty 1-d list of targets, got shape {self.targets.shape}")
        self.mode = mode
        self.seed = int(seed)
        self.num_samples = len(self.targets) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise DataError(f"EpochSampler num_samples={num_samples} must be >= 1")
        self.epoch = 0
        self._order = np.argsort(self.targets, kind="stable")
        _, self._starts, self._counts = np.unique(self.targets[self._order], return_index=True, return_counts=True)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        if epoch < 0:
            raise DataError(f"epoch={epoch} must be >= 0")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.targets)
        if self.mode == "random":
            rounds = -(-self.num_samples // n)
            idx = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:self.num_samples]
        else:
            cls = rng.integers(0, len(self._counts), self.num_samples)
            idx = self._order[self._starts[cls] + rng.integers(0, self._counts[cls])]
        return iter(idx.tolist())


def build_loaders(data: LTData, cfg: dict[str, Any]) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (EpochSampler), val and test loaders, not yet prepared by Accelerate."""
    d = cfg["data"]
    common = {"num_workers": d["num_workers"], "pin_memory": torch.cuda.is_available()}
    train = DataLoader(data.train, batch_size=d["batch_size"], drop_last=False,
                       sampler=EpochSampler(data.train_targets, d["sampler"], cfg["seed"]), **common)
    val = DataLoader(data.val, batch_size=d["eval_batch_size"], shuffle=False, **common)
    test = DataLoader(data.test, batch_size=d["eval_batch_size"], shuffle=False, **common)
    return train, val, test
