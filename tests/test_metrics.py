"""Metrics on hand-made predictions: per-class accuracy, Many/Medium/Few report, the text table."""
from __future__ import annotations

import math

import pytest
import torch

from lt_recipes.metrics import format_table, per_class_accuracy, split_report

# class:              0    1    2   3   4  5
TRAIN_COUNTS = [150, 101, 100, 20, 19, 5]  # many: 0, 1 | medium: 2, 3 | few: 4, 5
TARGETS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5])
PREDS = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0, 0, 3, 4, 0, 2])
# per class: 0: 3/4 = 75 | 1: 1/2 = 50 | 2: 1/3 | 3: 1/1 | 4: 1/2 | 5: 0/1 ; overall 7/13


def test_per_class_accuracy_hand_made():
    acc = per_class_accuracy(PREDS, TARGETS, 7)
    assert acc.dtype == torch.float64 and acc.shape == (7,)
    expect = [75.0, 50.0, 100.0 / 3, 100.0, 50.0, 0.0]
    assert acc[:6].tolist() == pytest.approx(expect)
    assert math.isnan(acc[6].item())


def test_split_report_hand_made():
    rep = split_report(PREDS, TARGETS, TRAIN_COUNTS)
    assert rep["top1"] == pytest.approx(100.0 * 7 / 13)
    assert rep["many"] == pytest.approx((75.0 + 50.0) / 2)
    assert rep["medium"] == pytest.approx((100.0 / 3 + 100.0) / 2)
    assert rep["few"] == pytest.approx((50.0 + 0.0) / 2)
    assert rep["per_class"] == pytest.approx([75.0, 50.0, 100.0 / 3, 100.0, 50.0, 0.0])
    assert all(isinstance(v, float) for v in rep["per_class"])


def test_empty_split_and_absent_class():
    # no Few class at all; class 1 (Many) never appears among the targets: skipped, not counted as 0
    rep = split_report(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 2, 2]), [500, 300, 50])
    assert rep["many"] == pytest.approx(50.0)
    assert rep["medium"] == pytest.approx(100.0)
    assert math.isnan(rep["few"])
    assert math.isnan(rep["per_class"][1])
    assert rep["top1"] == pytest.approx(75.0)


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="target label 9 is outside"):
        per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0, 9]), 3)
    with pytest.raises(ValueError, match="3 entries"):
        per_class_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3)


def test_format_table():
    rep = {"top1": 53.2, "many": 67.3, "medium": 54.9, "few": math.nan, "per_class": []}
    header, row = format_table(rep).splitlines()
    assert [c.strip() for c in header.split("|")] == ["Top-1", "Many", "Medium", "Few"]
    assert [c.strip() for c in row.split("|")] == ["53.20", "67.30", "54.90", "n/a"]
    assert [len(c) for c in header.split("|")] == [len(c) for c in row.split("|")]
