"""Adding a dataset is one row of the dataset table and its reader (docs/architecture.md, "Adding a dataset"): a toy
in-memory dataset registered from this file alone is offered by the recipe schema, built by `build_data` with the
row's classes, mean/std, flips and default root, checked on every process of a multi-process run, and trained for an
epoch from a recipe that names it."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torchvision.transforms import v2

from lt_recipes.config import ConfigError, load_recipe
from lt_recipes.data import (DATASETS, DataNotFoundError, DatasetInfo, build_data, build_transforms, dataset_info,
                             list_datasets, long_tail_counts, register_dataset, table)
from lt_recipes.sections import DataConfig

TOY = "toy_lt"
TOY_CLASSES, TOY_PER_CLASS, TOY_TEST_PER_CLASS = 3, 12, 4
TOY_MEAN, TOY_STD = (0.25, 0.5), (0.2, 0.3)  # two channels: no built-in dataset has two


def _toy_images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 2, 6, 6) whose first pixel holds their index, and their labels, class-sorted."""
    labels = torch.arange(TOY_CLASSES).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 2, 6, 6), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return images, labels


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy row, registered for this test only; its reader records the folder it was given."""
    monkeypatch.setattr(table, "_ROWS", dict(table._ROWS))
    folders: list[str] = []

    def read_toy(root: str):
        folders.append(root)
        return (*_toy_images(TOY_PER_CLASS, 0), *_toy_images(TOY_TEST_PER_CLASS, 1))

    root = tmp_path / "toy_data"
    root.mkdir()
    info = register_dataset(DatasetInfo(TOY, TOY_CLASSES, read_toy, TOY_MEAN, TOY_STD, flip=False,
                                        default_root=str(root)))
    return info, folders


def _flips(transform) -> bool:
    return any(isinstance(t, v2.RandomHorizontalFlip) for t in transform.transforms)


def test_the_recipe_schema_offers_a_registered_dataset(toy):
    assert TOY in DATASETS and list_datasets()[-1] == TOY and dataset_info(TOY) is toy[0]
    assert toy[0].in_memory and toy[0].in_chans == 2
    DataConfig(dataset=TOY, imbalance_ratio=2.0)  # an in-memory dataset: the long tail is the recipe's
    with pytest.raises(ConfigError, match="'data.imbalance_ratio' is required for toy_lt"):
        DataConfig(dataset=TOY)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(toy[0])


def test_build_data_reads_everything_from_the_row(toy):
    _, folders = toy
    data = build_data(DataConfig(dataset=TOY, imbalance_ratio=2.0, val_per_class=1, img_size=6), seed=0)
    assert folders == [toy[0].default_root]  # data.root unset: the row's default root
    assert (data.dataset, data.num_classes, data.in_chans) == (TOY, TOY_CLASSES, 2)
    assert data.lt_counts == long_tail_counts(TOY_PER_CLASS, TOY_CLASSES, 2.0)
    test_images, test_labels = _toy_images(TOY_TEST_PER_CLASS, 1)
    assert torch.equal(data.test.images, test_images) and data.test.targets.tolist() == test_labels.tolist()
    assert not _flips(data.train.transform)  # the row's flip=False
    x, _ = data.test[0]
    mean, std = torch.tensor(TOY_MEAN).view(2, 1, 1), torch.tensor(TOY_STD).view(2, 1, 1)
    torch.testing.assert_close(x, (test_images[0].float() / 255 - mean) / std)  # the row's mean and std
    uint8 = build_data(DataConfig(dataset=TOY, imbalance_ratio=2.0, val_per_class=1, img_size=6), 0, uint8_train=True)
    assert uint8.train_normalize == (TOY_MEAN, TOY_STD)


def test_flips_follow_the_rows():
    cifar = DataConfig(dataset="cifar10", imbalance_ratio=2.0)
    digits = DataConfig(dataset="digits", imbalance_ratio=2.0, img_size=8)
    assert _flips(build_transforms("cifar10", cifar, 3, 32)[0]) and dataset_info("cifar10").flip
    assert not _flips(build_transforms("digits", digits, 1, 8)[0]) and not dataset_info("digits").flip


def test_every_process_checks_the_rows_default_root(toy, monkeypatch):
    """A two-process run (the collective answered for both processes alike) checks the row's default root."""
    from lt_recipes import distributed

    dist = distributed.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **kw: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **kw: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, mine]))
    cfg = DataConfig(dataset=TOY, imbalance_ratio=2.0)
    distributed.check_data_root(cfg)
    root = toy[0].default_root
    os.rmdir(root)
    with pytest.raises(DataNotFoundError, match=f"data.root={root!r} does not exist.*2 of 2 processes"):
        distributed.check_data_root(cfg)


@pytest.mark.usefixtures("single_thread")
def test_a_recipe_naming_the_toy_dataset_trains_an_epoch(toy, tmp_path):
    from lt_recipes.engine import Trainer

    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"""# A toy in-memory dataset added through the dataset table alone.
epochs: 1
method: none
data:
  dataset: {TOY}
  imbalance_ratio: 2
  val_per_class: 1
  img_size: 6
  augment: basic
  batch_size: 8
  eval_batch_size: 32
  num_workers: 0
model:
  name: resnet8_cifar
sched:
  sched: none
""")
    trainer = Trainer(load_recipe(str(recipe)), str(tmp_path / "run"))
    res = trainer.fit()
    assert trainer.data.dataset == TOY and trainer.data.in_chans == 2 and toy[1] == [toy[0].default_root]
    assert len(trainer.rows) == 1 and math.isfinite(trainer.rows[0]["train_loss"]) and res["skipped_steps"] == 0
    assert res["dataset"] == TOY and 0 <= res["top1"] <= 100
