"""Datasets of image files (ImageNet-LT, Places-LT, iNat 2018) named by list files or iNat's COCO-style json.

A list file holds ``relative/path.jpg label`` lines; iNat's ``train2018.json`` / ``val2018.json`` (chosen by the
``.json`` suffix) name images and category ids, which become contiguous labels in the training json's sorted order.
Images are opened lazily as RGB; every error names the file and line or json entry at fault.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, DataNotFoundError

_logger = logging.getLogger(__name__)

_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    """One image file: its path, label, and where it was listed (file:line or json entry) for error messages."""

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


def read_entries(path: str,
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


def check_images(records: list[Record], skip: bool, size: int, workers: int) -> tuple[list[Record], int]:
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


class ImageListDataset(Dataset):
    """Image files opened lazily as RGB; a file that cannot be decoded raises an error naming it and its source."""

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], Any]):
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
