"""Feature quality, the distinct-snapshot memory bank against the naive per-class bank, grouping edge cases."""
import logging
import math

import numpy as np
import pytest
import torch

from lt_recipes.config import defaults
from lt_recipes.equations import alpha_schedule, class_affinity, feature_quality, spectral_groups
from lt_recipes.grouping import MemoryBank, order_head_first, compute_groups
import oracles


def _hand_example():
    feats = torch.tensor([[0., 0.], [2., 0.],            # class 0: mu (1,0), Var 1
                          [1., 3.], [1., 7.],            # class 1: mu (1,5), Var 4
                          [4., 0.], [6., 0.], [5., 3.], [5., -3.]])  # class 2: mu (5,0), Var 5
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    # Dis: d(0,1)=5, d(0,2)=4, d(1,2)=sqrt(41) -> Dis = 4, 5, 4
    expected = [4 - 0.5 * math.log(1), 5 - 0.5 * math.log(4), 4 - 0.5 * math.log(5)]
    return feats, labels, expected


def test_quality_matches_hand_computed_example():
    feats, labels, expected = _hand_example()
    assert oracles.feature_quality(feats, labels, 3).tolist() == pytest.approx(expected, abs=1e-12)
    assert feature_quality(feats, labels, 3).tolist() == pytest.approx(expected, abs=1e-12)


def test_fast_quality_equals_oracle_and_handles_missing_classes():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 16, generator=g)
    labels = torch.randint(0, 9, (200,), generator=g)  # class 9 absent
    fast, ref = feature_quality(feats, labels, 10, beta=0.7), oracles.feature_quality(feats, labels, 10, beta=0.7)
    assert torch.allclose(fast[:9], ref[:9], atol=1e-10)
    assert fast[9] == -math.inf and ref[9] == -math.inf


def test_alpha_schedule_ends_and_middle():
    start, end = defaults()["alpha"]["start"], defaults()["alpha"]["end"]
    assert alpha_schedule(0, 10, start, end) == pytest.approx(0.95)
    assert alpha_schedule(10, 10, start, end) == pytest.approx(0.6)
    assert alpha_schedule(5, 10, start, end) == pytest.approx(0.775)
    assert alpha_schedule(5, 10, 0.9, 0.8) == pytest.approx(0.85)


def _train_and_bank(num_classes=6, epochs=12, d_feat=5, spill_dir=None, dtype="fp32"):
    """A small real model trained a few epochs; both banks updated from the same Q after every epoch."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, d_feat))
    head = torch.nn.Linear(d_feat, num_classes)
    opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.05)
    centers = torch.randn(num_classes, 4) * 2
    y = torch.arange(num_classes).repeat_interleave(torch.tensor([40, 30, 20, 12, 8, 5][:num_classes]))
    x = centers[y] + torch.randn(len(y), 4)
    yv = torch.arange(num_classes).repeat_interleave(6)
    xv = centers[yv] + 2 * torch.randn(len(yv), 4)
    naive, best = [None] * num_classes, torch.full((num_classes,), -math.inf, dtype=torch.float64)
    bank = MemoryBank(num_classes, dtype=dtype, spill_dir=spill_dir)
    for _ in range(epochs):
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(enc(x)), y).backward()
            opt.step()
        with torch.no_grad():
            q = feature_quality(enc(xv), yv, num_classes)
        theta = torch.nn.utils.parameters_to_vector(enc.parameters()).detach()
        oracles.update_naive_bank(naive, best, q, theta)
        bank.update(q, theta)
    counts = torch.bincount(y).tolist()
    return bank, torch.stack(naive), counts


def test_bank_groups_and_anchors_equal_naive_bank():
    bank, naive, counts = _train_and_bank()
    assert len(bank.uids) > 2, "the example must produce several distinct snapshots"
    for G in (2, 3):
        labels = compute_groups(bank, G, counts, seed=0)
        naive_labels = order_head_first(spectral_groups(class_affinity(naive), G, 0), counts)
        assert labels.tolist() == naive_labels.tolist()
        assert torch.allclose(bank.anchors(labels, G), oracles.group_anchors(naive, labels, G).float(), atol=1e-6)
    assert np.allclose(bank.affinity(), class_affinity(naive), atol=1e-12)


def test_bank_memory_grows_with_snapshots_not_classes(tmp_path):
    bank, naive, _ = _train_and_bank()
    d = naive.shape[1]
    assert bank.nbytes == len(bank.uids) * d * 4 < naive.numel() * 4
    half, _, _ = _train_and_bank(dtype="bf16")
    assert half.nbytes == len(half.uids) * d * 2
    spilled, _, counts = _train_and_bank(spill_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"snapshot_{u:06d}.safetensors" for u in spilled.uids]
    assert spilled.snapshots == {}
    labels = compute_groups(spilled, 3, counts)
    assert torch.equal(spilled.anchors(labels, 3), bank.anchors(labels, 3))


def test_bank_state_round_trip_and_missing_spill_file(tmp_path):
    bank, _, counts = _train_and_bank(spill_dir=str(tmp_path))
    state = bank.state_dict()
    copy = MemoryBank(bank.num_classes, spill_dir=str(tmp_path))
    copy.load_state_dict(state)
    assert copy.class_snapshot == bank.class_snapshot and copy.affinity().tolist() == bank.affinity().tolist()
    (tmp_path / f"snapshot_{bank.uids[0]:06d}.safetensors").unlink()
    with pytest.raises(RuntimeError, match="snapshot_.*missing"):
        MemoryBank(bank.num_classes, spill_dir=str(tmp_path)).load_state_dict(state)


def test_ties_keep_the_older_snapshot():
    bank = MemoryBank(3)
    bank.update(torch.tensor([1.0, 2.0, 3.0]), torch.ones(4))
    assert bank.update(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(4)) == []
    assert bank.update(torch.tensor([1.0, 2.5, 3.0]), torch.zeros(4)) == [1]
    assert bank.class_snapshot == [0, 1, 0]


def test_degenerate_groupings_are_handled_and_logged(caplog):
    """Fewer snapshots or classes than groups give fewer groups (the method says so: tests/test_sections.py)."""
    bank = MemoryBank(4)
    bank.update(torch.zeros(4), torch.tensor([1.0, 0.0, 0.0]))
    caplog.set_level(logging.WARNING)
    labels = compute_groups(bank, 3, [50, 30, 10, 5])
    assert labels.tolist() == [0, 0, 0, 0]
    assert sorted(compute_groups(bank, 4, [50, 30, 10, 5]).tolist()) == [0, 1, 2, 3]
    # identical snapshots for several classes, opposite vectors -> zero affinity -> a disconnected graph
    bank = MemoryBank(6)
    vecs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.0])]
    for c, v in enumerate(vecs):
        bank.update(torch.tensor([10.0 if k == c else -1e9 for k in range(6)]), v)
    bank.update(torch.tensor([-1e9, -1e9, -1e9, 5.0, 5.0, 5.0]), torch.tensor([-1.0, 0.0]))
    caplog.clear()
    labels = compute_groups(bank, 2, [60, 50, 40, 30, 20, 10])
    assert "connected components" in caplog.text
    assert labels[0] == labels[2] and labels[1] == labels[3] == labels[4] == labels[5] and labels[0] != labels[1]
