"""Data layer: LT profile, held-out validation, dataset readers, transforms, sampler, loaders and every input error.

References are independent of lt_recipes.data: published LT sizes, Cao et al.'s global-seed shuffle procedure,
float64 normalisation, hand-written idx/pickle/list/json files.
"""
import itertools
import json
import logging
import os
import pickle
import random
import runpy
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from conftest import LIST_COLOURS, LIST_COUNTS, write_idx
from lt_recipes.errors import ConfigError
from lt_recipes.sections import DataConfig
from lt_recipes.data import (Cutout, DataError, DataNotFoundError, EpochSampler, LTData, build_data, build_loaders,
                             long_tail_counts, long_tail_indices, normalize_uint8, resolve_num_workers)
from lt_recipes.metrics import class_splits

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
REPO = Path(__file__).resolve().parents[1]


def make_cfg(seed=0, **data):
    """(data section, seed) as build_data and build_loaders take them; in-memory datasets at ratio 10 unless given."""
    return DataConfig(**{"imbalance_ratio": 10.0, **data}), seed


def decode_ids(images):
    """Inverse of conftest's id encoding for (N, 3, 32, 32) uint8 images."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1] + 65536 * flat[:, 2]


def cao_lt_indices(targets, counts):
    """Cao et al. 2019's procedure as published: np.random.seed(0), then per class np.where + np.random.shuffle."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for c, n in enumerate(counts):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)


def write_coco(path, items, category_ids):
    """COCO-style json as iNaturalist 2018 ships it; items are (file_name, category_id)."""
    doc = {"images": [{"id": 100 + i, "file_name": n, "width": 8} for i, (n, _) in enumerate(items)],
           "annotations": [{"id": i, "image_id": 100 + i, "category_id": c} for i, (_, c) in enumerate(items)],
           "categories": [{"id": c, "name": f"s{c}"} for c in category_ids]}
    Path(path).write_text(json.dumps(doc))
    return doc


# ----------------------------------------------------------------------------------------------------------------
# LT profile


@pytest.mark.parametrize("n_max,classes,ratio,total", [
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573),
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431)])
def test_long_tail_counts_published_sizes(n_max, classes, ratio, total):
    counts = long_tail_counts(n_max, classes, ratio)
    assert sum(counts) == total and counts[0] == n_max and counts[-1] == n_max // ratio


def test_cifar100_lt_splits_35_35_30():
    splits = class_splits(long_tail_counts(500, 100, 100))
    assert [len(splits[k]) for k in ("many", "medium", "few")] == [35, 35, 30]
    assert sorted(splits["many"] + splits["medium"] + splits["few"]) == list(range(100))


def test_class_splits_thresholds():
    assert class_splits([101, 100, 20, 19, 0]) == {"many": [0], "medium": [1, 2], "few": [3, 4]}


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5000), st.integers(2, 200), st.floats(1.0, 500.0))
def test_long_tail_counts_shape(n_max, classes, ratio):
    counts = long_tail_counts(n_max, classes, ratio)
    assert len(counts) == classes and counts[0] == n_max
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert abs(counts[-1] - n_max / ratio) < 1


def test_long_tail_indices_match_cao_procedure():
    rng = np.random.default_rng(3)
    targets = rng.permutation(np.repeat(np.arange(7), [40, 45, 50, 41, 60, 44, 43]))
    counts = long_tail_counts(40, 7, 8.0)
    np.testing.assert_array_equal(long_tail_indices(targets, 7, 8.0), cao_lt_indices(targets, counts))
    kept = long_tail_indices(targets, 7, 8.0, n_max=30)
    assert np.bincount(targets[kept]).tolist() == long_tail_counts(30, 7, 8.0)


def test_long_tail_errors_name_class_and_ratio():
    targets = np.repeat(np.arange(10), 10)
    with pytest.raises(DataError, match=r"class 5 has no training samples after the LT cut: int\(10 \* \(1/100.0\)"):
        long_tail_indices(targets, 10, 100.0)  # 10 * 0.01 ** (5/9) < 1 <= 10 * 0.01 ** (4/9)
    with pytest.raises(DataError, match="class 3 has no training samples"):
        long_tail_indices(targets[targets != 3], 10, 2.0)
    with pytest.raises(DataError, match=r"data.imbalance_ratio=0.5"):
        long_tail_counts(10, 10, 0.5)
    with pytest.raises(DataError, match="class 0 has 10 samples, fewer than the 11"):
        long_tail_indices(targets, 10, 2.0, n_max=11)
    with pytest.raises(DataError, match="label 12 outside"):
        long_tail_indices(np.array([0, 12]), 10, 2.0)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory, write_cifar):
    root = tmp_path_factory.mktemp("c100")
    return root, write_cifar(root, "cifar100", 500, 2)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory, write_cifar):
    root = tmp_path_factory.mktemp("c10")
    return root, write_cifar(root, "cifar10", 30, 3)


def test_cifar100_lt_r100_build(cifar100_root):
    root, pool_labels = cifar100_root
    v = 4
    data = build_data(*make_cfg(dataset="cifar100", root=str(root), imbalance_ratio=100.0, val_per_class=v))
    lt = long_tail_counts(500, 100, 100)
    assert data.lt_counts == lt and sum(data.lt_counts) == 10847
    assert [len(x) for x in class_splits(data.lt_counts).values()] == [35, 35, 30]
    shortfall = [max(0, v - (500 - n)) for n in lt]
    assert data.train_counts == [n - s for n, s in zip(lt, shortfall)]
    train_ids = decode_ids(data.train_eval.images.numpy())
    val_ids = decode_ids(data.val.images.numpy())
    np.testing.assert_array_equal(pool_labels[train_ids], data.train_targets)
    np.testing.assert_array_equal(pool_labels[val_ids], data.val.targets)
    kept = set(cao_lt_indices(pool_labels, lt).tolist())
    assert set(train_ids.tolist()) <= kept and not set(train_ids.tolist()) & set(val_ids.tolist())
    assert len(set(train_ids.tolist()) | (set(val_ids.tolist()) & kept)) == 10847
    assert np.bincount(data.val.targets, minlength=100).tolist() == [v] * 100
    assert data.num_val_from_train == 100 * v == len(data.val)
    assert len(data.test) == 200 and data.num_classes == 100 and data.in_chans == 3


def test_val_split_seeded_and_disjoint(cifar10_root):
    root, pool_labels = cifar10_root

    def val_ids(seed):
        data = build_data(*make_cfg(seed, dataset="cifar10", root=str(root), imbalance_ratio=2.0, val_per_class=3))
        return decode_ids(data.val.images.numpy()), decode_ids(data.train_eval.images.numpy())

    a, train_a = val_ids(0)
    b, _ = val_ids(0)
    c, _ = val_ids(1)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) != set(c.tolist())
    assert not set(a.tolist()) & set(train_a.tolist())
    assert Counter(pool_labels[a].tolist()) == {k: 3 for k in range(10)}


def test_cifar_eval_transform_is_float64_normalisation(write_cifar, tmp_path):
    write_cifar(tmp_path, "cifar10", 30, 3, seed=5)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    data = build_data(*make_cfg(dataset="cifar10", root=str(tmp_path), imbalance_ratio=2.0, mean=mean, std=std,
                               augment="none"))
    for ds in (data.test, data.train, data.train_eval):
        x, y = ds[1]
        ref = (ds.images[1].double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) \
            / torch.tensor(std, dtype=torch.float64)[:, None, None]
        assert x.dtype == torch.float32 and type(x) is torch.Tensor
        torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)
        assert y == int(ds.targets[1])


@pytest.mark.parametrize("augment", ["basic", "autoaugment", "randaugment"])
def test_cifar_train_augment_modes(cifar10_root, augment):
    root, _ = cifar10_root
    data = build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=2.0, augment=augment))
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    outs = [data.train.transform(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(data.train_eval[0][0], data.train_eval[0][0], rtol=0, atol=0)


def test_contrastive_views(cifar10_root):
    root, _ = cifar10_root
    data = build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=2.0, contrastive_views=2,
                               img_size=24))
    views, label = data.train[3]
    assert len(views) == 3 and all(v.shape == (3, 24, 24) for v in views) and label == data.train_targets[3]
    x, _ = data.train_eval[3]
    assert x.shape == (3, 24, 24)
    loader = build_loaders(data, *make_cfg(batch_size=5))[0]
    batch, y = next(iter(loader))
    assert [b.shape for b in batch] == [(5, 3, 24, 24)] * 3 and y.shape == (5,)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(1)
    for _ in range(20):
        out = Cutout(16)(torch.ones(1, 32, 32, dtype=torch.uint8))
        zero = out[0] == 0
        rows, cols = zero.any(1), zero.any(0)
        assert torch.equal(zero, rows[:, None] & cols[None, :])
        assert 8 <= int(rows.sum()) <= 16 and 8 <= int(cols.sum()) <= 16
        assert int(rows.int().diff().ne(0).sum()) <= 2 and int(cols.int().diff().ne(0).sum()) <= 2


def test_cifar_errors(cifar10_root, write_cifar, tmp_path):
    root, _ = cifar10_root
    with pytest.raises(DataError, match="class 7 has no training samples after the LT cut"):
        build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=100.0))  # 30 * 0.01 ** (7/9) < 1
    with pytest.raises(DataNotFoundError, match="cifar-100-python/train"):
        build_data(*make_cfg(dataset="cifar100", root=str(root), imbalance_ratio=10.0))
    with pytest.raises(DataError, match="data.root is required"):
        build_data(*make_cfg(dataset="cifar10", root=None, imbalance_ratio=10.0))
    with pytest.raises(DataNotFoundError, match="data.root='/nonexistent/x'"):
        build_data(*make_cfg(dataset="cifar10", root="/nonexistent/x", imbalance_ratio=10.0))
    with pytest.raises(ConfigError, match=r"'data.imbalance_ratio' = 0.5: must be >= 1"):
        build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=0.5))
    with pytest.raises(DataError, match=r"data.mean=\[0.5\] must hold 3 numbers"):
        build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=2.0, mean=[0.5]))
    write_cifar(tmp_path, "cifar100", 3, 1)
    bad = tmp_path / "cifar-100-python" / "test"
    with open(bad, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "coarse_labels": [0]}, f)
    with pytest.raises(DataError, match=f"{bad}: missing key 'fine_labels'"):
        build_data(*make_cfg(dataset="cifar100", root=str(tmp_path), imbalance_ratio=1.0, val_per_class=1))
    with open(bad, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [100]}, f)
    with pytest.raises(DataError, match=f"{bad} 'fine_labels': label 100 outside"):
        build_data(*make_cfg(dataset="cifar100", root=str(tmp_path), imbalance_ratio=1.0, val_per_class=1))


def test_val_per_class_too_large_names_key(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(DataError, match="class 0: .*data.val_per_class=30"):
        build_data(*make_cfg(dataset="cifar10", root=str(root), imbalance_ratio=1.0, val_per_class=30))


# ----------------------------------------------------------------------------------------------------------------
# digits and Fashion-MNIST


def test_digits_build():
    bunch = load_digits()
    tpc, v, r = 20, 5, 10.0
    data = build_data(*make_cfg(dataset="digits", imbalance_ratio=r, test_per_class=tpc, val_per_class=v, img_size=8))
    n_max = int(np.bincount(bunch.target).min()) - tpc
    assert data.lt_counts == long_tail_counts(n_max, 10, r)
    assert data.num_classes == 10 and data.in_chans == 1 and data.num_val_from_train == 10 * v
    assert np.bincount(data.test.targets).tolist() == [tpc] * 10
    assert np.bincount(data.val.targets).tolist() == [v] * 10
    assert sum(data.train_counts) == sum(data.lt_counts) - sum(max(0, v - (np.bincount(bunch.target)[c] - tpc - n))
                                                              for c, n in enumerate(data.lt_counts))
    # no image is used more often than load_digits holds it (train / val / test are disjoint)
    scaled = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    have = Counter(x.tobytes() for x in scaled)
    used = Counter(x.numpy().tobytes() for ds in (data.train_eval, data.val, data.test) for x in ds.images)
    assert all(have[k] >= n for k, n in used.items())
    x, y = data.train[0]
    assert x.shape == (1, 8, 8) and y == data.train_targets[0]
    with pytest.raises(DataError, match="data.test_per_class=200"):
        build_data(*make_cfg(dataset="digits", imbalance_ratio=r, test_per_class=200))


def test_digits_resized_and_contrastive():
    data = build_data(*make_cfg(dataset="digits", imbalance_ratio=5.0, img_size=16, contrastive_views=2))
    views, _ = data.train[0]
    assert [v.shape for v in views] == [(1, 16, 16)] * 3
    assert data.test[0][0].shape == (1, 16, 16)


@pytest.mark.parametrize("gz", [False, True])
def test_fmnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    train_labels = rng.permutation(np.repeat(np.arange(10), 12)).astype(np.uint8)
    train_images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", train_labels)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", train_images[:20])
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", train_labels[:20])
    data = build_data(*make_cfg(dataset="fmnist", root=str(tmp_path), imbalance_ratio=4.0, val_per_class=2,
                               img_size=28))
    assert data.lt_counts == long_tail_counts(12, 10, 4.0) and data.in_chans == 1
    np.testing.assert_array_equal(data.test.images[:, 0].numpy(), train_images[:20])
    for img, label in zip(data.train_eval.images[:, 0].numpy(), data.train_targets):
        match = np.flatnonzero((train_images == img).all(axis=(1, 2)))
        assert train_labels[match[0]] == label


def test_fmnist_idx_errors(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        build_data(*make_cfg(dataset="fmnist", root=str(tmp_path), imbalance_ratio=1.0))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">i", 2) + b"\0" * 8)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: not an unsigned-byte idx file"):
        build_data(*make_cfg(dataset="fmnist", root=str(tmp_path), imbalance_ratio=1.0))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"\0" * 2)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: idx header says shape \(5,\)"):
        build_data(*make_cfg(dataset="fmnist", root=str(tmp_path), imbalance_ratio=1.0))


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_fmnist_debian_package():
    data = build_data(*make_cfg(dataset="fmnist", root=None, imbalance_ratio=100.0, img_size=28))
    assert data.lt_counts == long_tail_counts(6000, 10, 100.0)
    assert len(data.test) == 10000 and np.bincount(data.test.targets).tolist() == [1000] * 10
    assert data.train[0][0].shape == (1, 28, 28)


# ----------------------------------------------------------------------------------------------------------------
# list files and iNaturalist json


def list_cfg(root, **kw):
    args = {"dataset": "imagenet_lt", "root": str(root), "imbalance_ratio": None, "train_list": "train.txt",
            "val_list": "val.txt", "test_list": "test.txt", "img_size": 16}
    args.update(kw)
    return make_cfg(**args)


def test_list_dataset_build(image_list_root):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    data = build_data(*list_cfg(image_list_root, mean=mean, std=std, augment="basic", auto_augment="rand-n2-m10"))
    assert data.num_classes == 3 and data.in_chans == 3 and data.num_val_from_train == 0
    assert data.train_counts == data.lt_counts == LIST_COUNTS["train"]
    assert (len(data.val), len(data.test)) == (3, 6)
    np.testing.assert_array_equal(data.train_targets, np.repeat([0, 1, 2], LIST_COUNTS["train"]))
    for x, y in (data.test[0], data.train_eval[7]):  # PNG images: exact solid colour after resize + centre crop
        colour = torch.tensor(LIST_COLOURS[y], dtype=torch.float64) / 255
        ref = ((colour - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64))
        assert x.shape == (3, 16, 16)
        torch.testing.assert_close(x.double(), ref[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-6)
    x, _ = data.train[1]
    assert x.shape == (3, 16, 16)
    train, val, test = build_loaders(data, *list_cfg(image_list_root, batch_size=4, eval_batch_size=4))
    assert sorted(torch.cat([y for _, y in test]).tolist()) == sorted(data.test.targets.tolist())


def test_list_dataset_transforms_come_from_timm(image_list_root):
    """Image files: timm's create_transform with the recipe's RandAugment string, and SimCLR views from timm."""
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation

    data = build_data(*list_cfg(image_list_root, augment="basic", auto_augment="rand-n2-m10", contrastive_views=2))
    train = data.train.transform
    ra = [t for t in train.cls_transform.transforms if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 2 and {op.magnitude for op in ra[0].ops} == {10}
    crop = [t for t in train.view_transform.transforms if isinstance(t, RandomResizedCropAndInterpolation)]
    assert len(crop) == 1 and crop[0].scale == (0.2, 1.0)
    views = data.train[0][0]
    assert len(views) == 3 and all(v.shape == (3, 16, 16) for v in views)
    with pytest.raises(ConfigError, match="data.auto_augment"):  # the data section refuses it, once
        build_data(*list_cfg(image_list_root, augment="randaugment"))


def test_list_test_defaults_to_val(image_list_root):
    data = build_data(*list_cfg(image_list_root, dataset="places_lt", test_list=None))
    assert data.test is data.val


def test_max_per_class_caps_the_profile_head():
    data = build_data(*make_cfg(dataset="digits", imbalance_ratio=10.0, max_per_class=60, val_per_class=5))
    assert data.lt_counts == long_tail_counts(60, 10, 10.0)


def test_list_without_val_holds_out_training_images(image_list_root):
    """iNat protocol: val2018 is the test set, so feature quality needs a class-balanced hold-out of training images."""
    data = build_data(*list_cfg(image_list_root, dataset="inat2018", val_list=None, val_per_class=1))
    assert data.num_val_from_train == 3 and len(data.val) == 3 and len(data.test) == 6
    assert data.lt_counts == LIST_COUNTS["train"]
    assert data.train_counts == [n - 1 for n in LIST_COUNTS["train"]]
    assert not set(data.train.paths) & set(data.val.paths)
    assert sorted(data.val.targets.tolist()) == [0, 1, 2]
    with pytest.raises(DataError, match="val_list or data.test_list"):
        build_data(*list_cfg(image_list_root, val_list=None, test_list=None))


def test_list_absolute_paths(image_list_root, tmp_path_factory):
    other = tmp_path_factory.mktemp("lists")
    lines = [f"{image_list_root / name} {label}" for name, label in
             (line.rsplit(" ", 1) for line in (image_list_root / "train.txt").read_text().splitlines())]
    (other / "abs.txt").write_text("\n".join(lines))
    data = build_data(*list_cfg(image_list_root, train_list=str(other / "abs.txt")))
    assert data.train_counts == LIST_COUNTS["train"]


@pytest.mark.parametrize("line,lineno", [("images/x.png", 3), ("images/x.png one", 2), ("images/x.png -1", 1)])
def test_bad_list_line_names_file_and_line(image_list_root, line, lineno):
    path = image_list_root / "train.txt"
    lines = path.read_text().splitlines()
    lines.insert(lineno - 1, line)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=f"{path}:{lineno}: expected 'relative/path.jpg label'"):
        build_data(*list_cfg(image_list_root))


def test_label_out_of_range_names_file_and_line(image_list_root):
    path = image_list_root / "val.txt"
    path.write_text(path.read_text() + "images/val/class 0/0.png 3\n")
    with pytest.raises(DataError, match=rf"{path}:4: label 3 outside \[0, 3\) \(the class count from data.num_classes"):
        build_data(*list_cfg(image_list_root, num_classes=3))
    with pytest.raises(DataError, match=rf"class 3 has no training samples in .*train.txt \(listed at {path}:4\)"):
        build_data(*list_cfg(image_list_root))


@pytest.mark.parametrize("label", [3, 1000])
def test_stray_training_label_names_file_and_line_not_a_new_class(image_list_root, label):
    """The class count comes from the evaluation lists (or data.num_classes), never from the training list alone:
    a training label past the others' classes is named with its line, not a class added (or 997 empty ones)."""
    path = image_list_root / "train.txt"
    path.write_text(path.read_text() + f"images/train/class 0/0.png {label}\n")
    lineno = sum(LIST_COUNTS["train"]) + 1
    with pytest.raises(DataError, match=rf"{path}:{lineno}: label {label} outside \[0, 3\) \(the class count from "
                                        r"the labels of .*val.txt and .*test.txt; set data.num_classes"):
        build_data(*list_cfg(image_list_root))
    with pytest.raises(DataError, match=rf"{path}:{lineno}: label {label} outside \[0, 3\)"):
        build_data(*list_cfg(image_list_root, num_classes=3))
    if label == 3:
        data = build_data(*list_cfg(image_list_root, num_classes=4))  # a class the evaluation lists lack
        assert data.num_classes == 4 and data.train_counts == LIST_COUNTS["train"] + [1]


def test_recipe_class_count_is_checked_against_the_data(image_list_root):
    with pytest.raises(DataError, match=r"class 3 has no training samples in .*train.txt; 2 of 5 classes are empty "
                                        r"\(the class count from data.num_classes=5\)"):
        build_data(*list_cfg(image_list_root, num_classes=5))
    write_coco(image_list_root / "train2018.json", [("images/train/class 0/0.png", 7)], [7])
    with pytest.raises(DataError, match="data.num_classes=3 but .*train2018.json has 1 categories"):
        build_data(*list_cfg(image_list_root, dataset="inat2018", train_list="train2018.json", num_classes=3))
    from lt_recipes.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'data.num_classes' applies to the list-file datasets"):
        load_config("digits_lt", ["data.num_classes=10"])


def test_class_without_training_images_is_named(image_list_root):
    path = image_list_root / "train.txt"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.endswith(" 1\n")))
    with pytest.raises(DataError, match="class 1 has no training samples in .*train.txt"):
        build_data(*list_cfg(image_list_root))


def test_missing_files_and_root(image_list_root):
    with pytest.raises(DataNotFoundError, match="data.val_list: .*nope.txt not found"):
        build_data(*list_cfg(image_list_root, val_list="nope.txt"))
    with pytest.raises(DataError, match="data.train_list is required"):
        build_data(*list_cfg(image_list_root, train_list=None))
    with pytest.raises(DataNotFoundError, match="data.root='/no/such/dir'"):
        build_data(*list_cfg("/no/such/dir"))
    with pytest.raises(ConfigError, match="does not apply"):
        build_data(*list_cfg(image_list_root, imbalance_ratio=10.0))


def test_missing_image_error_or_skip(image_list_root, caplog):
    gone = image_list_root / "images/train/class 0/3.png"
    gone.unlink()
    with pytest.raises(DataNotFoundError, match=f"image {gone} .*train.txt:4"):
        build_data(*list_cfg(image_list_root))
    (image_list_root / "images/val/class 2/0.png").write_bytes(b"this is not an image")
    with caplog.at_level(logging.WARNING, logger="lt_recipes.data"):
        data = build_data(*list_cfg(image_list_root, skip_bad_images=True))
    assert data.train_counts == [4, 3, 2] and len(data.val) == 2
    assert "skipped 2 unreadable or missing images (train 1, val 1, test 0)" in caplog.text


def test_unreadable_image_named_when_loaded(image_list_root):
    bad = image_list_root / "images/train/class 1/0.png"
    bad.write_bytes(b"\x89PNG garbage")
    data = build_data(*list_cfg(image_list_root))
    with pytest.raises(DataError, match=f"image {bad} .*train.txt:6.* cannot be read"):
        data.train[5]


def test_inat_json(image_list_root):
    entries = [(name, int(label)) for name, label in
               (line.rsplit(" ", 1) for line in (image_list_root / "train.txt").read_text().splitlines())]
    ids = [70, 3, 511]  # labels follow the sorted ids: 3 -> 0, 70 -> 1, 511 -> 2
    write_coco(image_list_root / "train2018.json", [(n, ids[lab]) for n, lab in entries], ids)
    val = [(n, int(lab)) for n, lab in
           (line.rsplit(" ", 1) for line in (image_list_root / "val.txt").read_text().splitlines())]
    write_coco(image_list_root / "val2018.json", [(n, ids[lab]) for n, lab in val], ids)
    cfg = list_cfg(image_list_root, dataset="inat2018", train_list="train2018.json", val_list="val2018.json",
                   test_list=None)
    data = build_data(*cfg)
    sorted_ids = sorted(ids)
    expected = [sorted_ids.index(ids[lab]) for _, lab in entries]
    assert data.num_classes == 3 and data.train_targets.tolist() == expected
    assert data.train_counts == np.bincount(expected).tolist()
    assert data.test is data.val and len(data.val) == 3
    mixed = build_data(*list_cfg(image_list_root, dataset="inat2018", train_list="train2018.json"))
    assert mixed.train_targets.tolist() == expected and len(mixed.test) == 6


def test_inat_json_errors(image_list_root):
    path = image_list_root / "train2018.json"
    doc = write_coco(path, [("images/train/class 0/0.png", 5), ("images/train/class 0/2.png", 6)], [5, 6])
    cfg = list_cfg(image_list_root, dataset="inat2018", train_list="train2018.json", val_list="val2018.json")
    write_coco(image_list_root / "val2018.json", [("images/val/class 0/0.png", 9)], [5, 6, 9])
    with pytest.raises(DataError, match=r"val2018.json images\[0\]: category_id 9 is not among"):
        build_data(*cfg)
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "annotations"}))
    with pytest.raises(DataError, match=f"{path}: missing key 'annotations'"):
        build_data(*cfg)
    del doc["images"][1]["file_name"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"{path} images\[1\]: missing key 'file_name'"):
        build_data(*cfg)
    doc["images"][1]["file_name"] = "x.png"
    doc["annotations"] = doc["annotations"][:1]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"{path} images\[1\]: image id 101 \(x.png\) has no annotation"):
        build_data(*cfg)
    doc["annotations"][0]["category_id"] = "five"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"{path} annotations\[0\]: 'category_id' must be an integer, got 'five'"):
        build_data(*cfg)
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: not valid JSON"):
        build_data(*cfg)


# ----------------------------------------------------------------------------------------------------------------
# sampler and loaders


def test_epoch_sampler_deterministic_per_seed_and_epoch():
    targets = np.random.default_rng(0).integers(0, 5, 200)
    for mode in ("random", "class_balanced"):
        a, b = EpochSampler(targets, mode, seed=3), EpochSampler(targets, mode, seed=3)
        assert len(a) == 200 and list(a) == list(b) == list(a)
        first = list(a)
        a.set_epoch(4)
        b.set_epoch(4)
        assert list(a) == list(b) != first
        assert list(EpochSampler(targets, mode, seed=4)) != first


def test_random_sampler_is_permutation():
    s = EpochSampler(np.zeros(50, dtype=np.int64), "random", seed=0)
    assert sorted(s) == list(range(50))
    s2 = EpochSampler(np.zeros(50, dtype=np.int64), "random", seed=0, num_samples=125)
    counts = np.bincount(list(s2), minlength=50)
    assert len(s2) == 125 and counts.min() == 2 and counts.max() == 3


def test_class_balanced_sampler_uniform_over_classes():
    targets = np.repeat([0, 1, 2], [900, 90, 10])
    np.random.default_rng(1).shuffle(targets)
    s = EpochSampler(targets, "class_balanced", seed=0, num_samples=30000)
    idx = np.array(list(s))
    freq = np.bincount(targets[idx], minlength=3) / len(idx)
    np.testing.assert_allclose(freq, 1 / 3, atol=0.02)
    tail = np.flatnonzero(targets == 2)
    per_item = np.array([np.sum(idx == i) for i in tail])
    assert per_item.min() > 0.8 * per_item.mean() and per_item.max() < 1.2 * per_item.mean()


def test_sampler_bad_mode():
    with pytest.raises(ConfigError, match="'data.sampler' = 'balanced': must be one of"):
        DataConfig(imbalance_ratio=10.0, sampler="balanced")


def test_build_loaders_digits():
    cfg = make_cfg(dataset="digits", imbalance_ratio=10.0, batch_size=32, eval_batch_size=64, sampler="class_balanced",
                   img_size=8)
    data = build_data(*cfg)
    assert isinstance(data, LTData)
    train, val, test = build_loaders(data, *cfg)
    assert isinstance(train.sampler, EpochSampler) and train.sampler.mode == "class_balanced"
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert torch.cat([y for _, y in val]).tolist() == data.val.targets.tolist()
    assert sum(len(y) for _, y in test) == len(data.test) == 500


def _rng_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_batches_do_not_depend_on_the_worker_count(cifar10_root):
    """The same bits with 0 and 2 workers (AutoAugment + Cutout + two contrastive views over random images), other
    augmentations in another epoch, and the main process's random streams untouched by the loader."""
    root, _ = cifar10_root
    cfg = dict(dataset="cifar10", root=str(root), imbalance_ratio=2.0, augment="autoaugment", contrastive_views=2,
               batch_size=6)
    data = build_data(*make_cfg(**cfg))
    data.train.images = torch.randint(0, 256, data.train.images.shape, dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(0))
    batches = {}
    for workers, epoch in ((0, 1), (2, 1), (0, 2)):
        train = build_loaders(data, *make_cfg(num_workers=workers, **cfg))[0]
        train.sampler.set_epoch(epoch)
        before = _rng_states()
        batches[workers, epoch] = list(itertools.islice(train, 3))
        assert _rng_states() == before
    for (views, y), (views2, y2), (views3, y3) in zip(batches[0, 1], batches[2, 1], batches[0, 2]):
        assert len(views) == 3 and torch.equal(y, y2)
        for a, b in zip(views, views2):
            assert torch.equal(a, b)
        assert not torch.equal(views[0], views3[0])


def _first_batch(data, cfg):
    train = build_loaders(data, *make_cfg(num_workers=0, **cfg))[0]
    return next(iter(train))


def test_uint8_training_batches_normalised_on_the_device_equal_the_float_pipeline(cifar10_root, image_list_root):
    """A GPU run's training batches travel as uint8 and are normalised where they land: the same batch, bit for bit
    for torchvision's in-memory pipeline (AutoAugment, Cutout, two views) and to float rounding for timm's image-file
    one (RandAugment; timm's float path divides by 255 where the device multiplies by 1/255)."""
    root, _ = cifar10_root
    cases = [(dict(dataset="cifar10", root=str(root), imbalance_ratio=2.0, augment="autoaugment", contrastive_views=2,
                   batch_size=6), 0.0),
             (dict(dataset="imagenet_lt", root=str(image_list_root), imbalance_ratio=None, train_list="train.txt",
                   val_list="val.txt", test_list="test.txt", img_size=24, auto_augment="rand-n2-m10",
                   batch_size=4), 1e-6)]
    for cfg, atol in cases:
        floats, raw = (build_data(*make_cfg(**cfg), uint8_train=u) for u in (False, True))
        if cfg["dataset"] == "cifar10":
            for data in (floats, raw):
                data.train.images = torch.randint(0, 256, data.train.images.shape, dtype=torch.uint8,
                                                  generator=torch.Generator().manual_seed(0))
        assert floats.train_normalize is None and raw.train_normalize is not None
        (want, y), (got, y2) = _first_batch(floats, cfg), _first_batch(raw, cfg)
        assert torch.equal(y, y2)
        want, got = (w if isinstance(w, list) else [w] for w in (want, got))
        assert all(g.dtype == torch.uint8 for g in got)
        for w, g in zip(want, normalize_uint8(got, *raw.train_normalize)):
            torch.testing.assert_close(g, w, rtol=0, atol=atol)


def test_auto_workers_are_the_process_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_num_workers("auto", {}) == 8  # at most MAX_AUTO_WORKERS
    assert resolve_num_workers("auto", {"LOCAL_WORLD_SIZE": "4"}) == 4
    assert resolve_num_workers("auto", {"LOCAL_WORLD_SIZE": "32"}) == 1
    assert resolve_num_workers(3, {"LOCAL_WORLD_SIZE": "4"}) == 3
    assert DataConfig(imbalance_ratio=10.0).num_workers == "auto"
    with pytest.raises(ConfigError, match="'data.num_workers' = 'many': must be auto"):
        DataConfig(imbalance_ratio=10.0, num_workers="many")


# ----------------------------------------------------------------------------------------------------------------
# tools/dataset_summary.py


def test_dataset_summary_tool(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("data:\n  dataset: digits\n  imbalance_ratio: 10\n  img_size: 8\n")
    main = runpy.run_path(str(REPO / "tools" / "dataset_summary.py"))["main"]
    main(["--recipe", str(recipe), "--set", "data.val_per_class=5"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = build_data(*make_cfg(dataset="digits", imbalance_ratio=10.0, val_per_class=5))
    assert out["dataset"] == "digits" and out["num_classes"] == 10
    assert out["train_counts"] == data.train_counts and out["num_train"] == sum(data.train_counts)
    assert out["num_lt"] == sum(data.lt_counts)
    assert (out["num_val_from_train"], out["num_val"], out["num_test"]) == (50, 50, 500)
    assert out["splits"] == {k: len(v) for k, v in class_splits(data.train_counts).items()}


def test_a_loader_worker_does_not_print_a_connection_reset_after_ctrl_c(capsys, monkeypatch):
    """A worker's fd-sharing thread reports through sys.excepthook; a connection error there (the main process stopped
    mid-transfer) is dropped, any other error still printed."""
    import sys

    from lt_recipes.data.loader import quiet_worker_init

    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: printed.append(kind))
    quiet_worker_init(0)
    for kind in (ConnectionResetError, BrokenPipeError, EOFError, ValueError):
        sys.excepthook(kind, kind("x"), None)
    assert printed == [ValueError]
