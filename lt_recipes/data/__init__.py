"""Long-tailed data: a recipe's dataset as train / train-eval / val / test splits, its transforms and loaders.

* `table`: one row per dataset (reader, class count, mean/std, flips, default root; in-memory or list files).
* `profile`: the long-tailed profile and cut (Cao et al. 2019), class-balanced test and validation draws.
* `in_memory`: digits, Fashion-MNIST idx files and CIFAR pickles read into uint8 arrays.
* `image_lists`: ImageNet-LT / Places-LT list files and iNat json, images opened lazily.
* `transforms`: torchvision v2 for in-memory images, timm's `create_transform` for image files, BCL's views.
* `build`: `build_data`, the splits of a validated recipe as `LTData`.
* `loader`: `EpochSampler` (the training order from seed and epoch), each draw's augmentation seed, and
  `build_loaders` (the worker count changes nothing but speed).

Class splits (Many / Medium / Few) are evaluation's and live in lt_recipes.metrics. The names below load on first
use, so the recipe schema reads the dataset table without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import DataError, DataNotFoundError
from .table import DATASETS, DatasetInfo, dataset_info, list_datasets, register_dataset

# public name -> module that defines it (imported on first access)
_LAZY = {"LTData": "build", "build_data": "build", "CIFAR_LAYOUT": "in_memory", "EpochSampler": "loader",
         "build_loaders": "loader", "loader_options": "loader", "resolve_num_workers": "loader",
         "long_tail_counts": "profile", "long_tail_indices": "profile", "Cutout": "transforms",
         "build_transforms": "transforms", "eval_data_config": "transforms",
         "normalize_uint8": "transforms"}

__all__ = ["DATASETS", "DataError", "DataNotFoundError", "DatasetInfo", "dataset_info", "list_datasets",
           "register_dataset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
