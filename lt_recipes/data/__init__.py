"""Long-tailed data: a recipe's dataset as train / train-eval / val / test splits, its transforms and loaders.

* `constants`: class counts, default normalisation and install path per dataset.
* `profile`: the long-tailed profile and cut (Cao et al. 2019), class-balanced test and validation draws.
* `in_memory`: digits, Fashion-MNIST idx files and CIFAR pickles read into uint8 arrays.
* `image_lists`: ImageNet-LT / Places-LT list files and iNat json, images opened lazily.
* `transforms`: torchvision v2 for in-memory images, timm's `create_transform` for image files, BCL's views.
* `build`: `build_data`, the splits of a validated recipe as `LTData`.
* `loader`: `EpochSampler` (the training order from seed and epoch), each draw's augmentation seed, and
  `build_loaders` (the worker count changes nothing but speed).

Class splits (Many / Medium / Few) are evaluation's and live in lt_recipes.metrics.
"""
from ..errors import DataError, DataNotFoundError
from .build import LTData, build_data
from .constants import NUM_CLASSES
from .in_memory import CIFAR_LAYOUT
from .loader import EpochSampler, build_loaders, loader_options, resolve_num_workers
from .profile import long_tail_counts, long_tail_indices
from .transforms import Cutout, build_transforms, dataset_in_chans, eval_data_config, normalize_uint8

__all__ = ["CIFAR_LAYOUT", "Cutout", "DataError", "DataNotFoundError", "EpochSampler", "LTData", "NUM_CLASSES",
           "build_data", "build_loaders", "build_transforms", "dataset_in_chans", "eval_data_config",
           "loader_options", "long_tail_counts", "long_tail_indices", "normalize_uint8", "resolve_num_workers"]
