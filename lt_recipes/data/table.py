"""The dataset table: one row per dataset that the recipe schema, `build_data`, the transforms and the multi-process
root check all read (name -> reader, classes, mean/std, flips, default root; in-memory or list files).

timm-style: `register_dataset(DatasetInfo(...))` adds a row, `dataset_info(name)` reads one, `list_datasets()` names
them all, and `DATASETS` is the live sequence of names the recipe's ``data.dataset`` takes, so a dataset registered
from outside the package can be named in a recipe. Imports nothing heavy (the recipe schema reads it before torch is
imported); the built-in readers are the functions of lt_recipes.data.in_memory, imported on first use.

An in-memory dataset's reader returns uint8 images (N, C, H, W) and integer labels (numpy arrays or CPU tensors):
``(images, labels, test_images, test_labels)``, or ``(images, labels)`` for a dataset without a test split, of which
`build_data` carves ``data.test_per_class`` images per class with a fixed seed. It is called with the data folder
(``data.root``, else the row's default) when the row reads one, else with no argument. A list-file dataset has no
reader: its image files are named by ``data.train_list`` / ``val_list`` / ``test_list`` under ``data.root``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator

Reader = Callable[..., tuple[Any, ...]]


def _in_memory(function: str, *args: Any) -> Reader:
    """The reader `function(*call_args, *args)` of lt_recipes.data.in_memory, imported when it is called."""
    def read(*call_args: Any) -> tuple[Any, ...]:
        from . import in_memory

        return getattr(in_memory, function)(*call_args, *args)

    read.__qualname__ = f"in_memory.{function}"
    return read


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its class count; its reader (None: a list-file dataset); the per-channel mean and std of its
    training images (None: ImageNet's, three channels), whose length is its channel count; whether training may
    mirror its images; the folder it reads when ``data.root`` is unset (None: the recipe must set it), and whether it
    reads a folder at all."""

    name: str
    num_classes: int
    reader: Reader | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    flip: bool = True
    default_root: str | None = None
    reads_root: bool = True

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None) or self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"dataset {self.name!r}: mean and std must both be given, one number per channel")

    @property
    def in_memory(self) -> bool:
        """Read whole into memory by its reader and cut to a long tail (else image files named by list files)."""
        return self.reader is not None

    @property
    def in_chans(self) -> int:
        """Image channels: the length of its mean (3 for ImageNet's)."""
        return 3 if self.mean is None else len(self.mean)

    def root(self, recipe_root: str | None) -> str | None:
        """The folder this dataset reads: ``data.root``, else its default; None when it reads none or none is
        given (the data layer then asks for ``data.root``)."""
        if not self.reads_root:
            return None
        return self.default_root if recipe_root is None else recipe_root


_BUILTIN = (
    # scikit-learn bundles the images (no folder); a mirrored digit is another glyph (no flips)
    DatasetInfo("digits", 10, _in_memory("read_digits"), (0.3053,), (0.3759,), flip=False, reads_root=False),
    # where Debian's dataset-fashion-mnist package installs the idx files
    DatasetInfo("fmnist", 10, _in_memory("read_fmnist"), (0.2860,), (0.3530,),
                default_root="/usr/share/datasets/fashion-mnist"),
    DatasetInfo("cifar10", 10, _in_memory("read_cifar", "cifar10"), (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616)),
    DatasetInfo("cifar100", 100, _in_memory("read_cifar", "cifar100"), (0.5071, 0.4865, 0.4409),
                (0.2673, 0.2564, 0.2762)),
    # the list datasets' class counts are the published ones (their list files decide in a run)
    DatasetInfo("imagenet_lt", 1000),
    DatasetInfo("places_lt", 365),
    DatasetInfo("inat2018", 8142),
)
_ROWS: dict[str, DatasetInfo] = {info.name: info for info in _BUILTIN}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a row: `info.name` can then be named in a recipe's ``data.dataset`` and built by `build_data`."""
    if info.name in _ROWS:
        raise ValueError(f"dataset {info.name!r} is already registered")
    _ROWS[info.name] = info
    return info


def dataset_info(name: str) -> DatasetInfo:
    """The row of a dataset (KeyError with the known names for an unknown one)."""
    if name not in _ROWS:
        raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(_ROWS)}")
    return _ROWS[name]


def list_datasets(in_memory: bool | None = None) -> tuple[str, ...]:
    """Every registered dataset (the built-in ones first), or only the in-memory or only the list-file ones."""
    return tuple(name for name, info in _ROWS.items() if in_memory is None or info.in_memory == in_memory)


class _Names(Sequence):
    """The registered names as they are now: the recipe schema's choices of ``data.dataset``."""

    def __getitem__(self, index: Any) -> Any:
        return list_datasets()[index]

    def __len__(self) -> int:
        return len(_ROWS)

    def __contains__(self, name: object) -> bool:
        return name in _ROWS

    def __iter__(self) -> Iterator[str]:
        return iter(list_datasets())

    def __repr__(self) -> str:
        return repr(list_datasets())


DATASETS: Sequence[str] = _Names()
