"""GBG's gradient grouping and GKP's Fisher estimate read the training images through the run's loaders and keep
their results, and the grouping's peak memory does not grow with classes x parameters (measured).

The oracles are the loops these functions had before (one backward per class present in each mixed batch into a
float64 [classes x parameters] array on the host; one loader per group), kept here as plain code."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_recipes import equations, gkp
from lt_recipes.data import build_data, loader_options
from lt_recipes.grouping import order_head_first
from lt_recipes.models import create_lt_model, is_classifier, ordered_parameters
from lt_recipes.sections import DataConfig, ModelConfig
from lt_recipes.steps.gbg import GROUPING_BLOCK_NUMBERS, class_gradient_sums, gradient_groups


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def oracle_class_means(model, dataset, targets, num_classes, covered, batch_size):
    """The grouping's class vectors as they were computed: the whole [classes x parameters] float64 array on the host."""
    model.eval()
    sums = torch.zeros(num_classes, sum(p.numel() for p in covered), dtype=torch.float64)
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        losses = ce(model(x), y).float()
        for c in torch.unique(y).tolist():
            g = torch.autograd.grad(losses[y == c].sum(), covered, retain_graph=True, allow_unused=True)
            sums[c] += torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).double()
                                  for t, p in zip(g, covered)])
    model.train()
    return sums / torch.from_numpy(np.maximum(np.bincount(targets, minlength=num_classes), 1)).double()[:, None]


def oracle_fisher(model, dataset, targets, group_of_class, anchors, batch_size):
    """The batch-mean Fisher as it was estimated: one loader on the main process per group."""
    import copy

    work = copy.deepcopy(model).eval()
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    params, _ = ordered_parameters(work, is_classifier)
    fisher = torch.zeros(anchors.shape, dtype=torch.float32)
    counts = torch.zeros(len(anchors), dtype=torch.float64)
    for j in range(len(anchors)):
        torch.nn.utils.vector_to_parameters(anchors[j], params)
        idx = np.flatnonzero(group_of_class[targets] == j)
        for x, y in DataLoader(dataset, batch_sampler=[idx[i:i + batch_size].tolist()
                                                       for i in range(0, len(idx), batch_size)]):
            grads = torch.autograd.grad(ce(work(x), y).float().mean(), params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            fisher[j] += flat * flat
            counts[j] += len(y)
    return fisher / counts[:, None].float()


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(dataset="digits", imbalance_ratio=10.0, img_size=8, augment="none", num_workers=2)
    data = build_data(cfg, 0)
    torch.manual_seed(0)
    model = create_lt_model(ModelConfig(name="resnet8_cifar"), data.num_classes, data.in_chans)
    return cfg, data, model


@pytest.mark.usefixtures("single_thread")
def test_gradient_grouping_equals_the_host_array_oracle_on_digits(digits):
    """Class gradient sums through two workers equal the oracle's, and the Gram-block grouping gives the oracle's
    groups with every class in one block and with blocks of 3 classes (streamed cross terms)."""
    cfg, data, model = digits
    covered, _ = ordered_parameters(model, is_classifier)
    targets = np.asarray(data.train_targets)
    means = oracle_class_means(model, data.train_eval, targets, data.num_classes, covered, 64)
    counts = np.bincount(targets, minlength=data.num_classes)
    kw = loader_options(cfg, 0, "cpu")
    model.eval()
    sums = dict(class_gradient_sums(model, ce, data.train_eval, targets, range(data.num_classes), covered, 64,
                                    torch.device("cpu"), contextlib.nullcontext, kw))
    model.train()
    got = torch.stack([sums[c] / counts[c] for c in range(data.num_classes)])
    torch.testing.assert_close(got, means, rtol=1e-5, atol=1e-7)
    n = means.shape[1]
    for G, max_numbers in ((3, GROUPING_BLOCK_NUMBERS), (4, 3 * n)):
        want = order_head_first(equations.spectral_groups(equations.class_affinity(means), G, 0), counts.tolist())
        labels = gradient_groups(model, ce, data.train_eval, targets, data.num_classes, G, covered, 64,
                                 torch.device("cpu"), contextlib.nullcontext, 0, kw, max_numbers)
        assert labels.tolist() == want.tolist(), (G, max_numbers)
    assert GROUPING_BLOCK_NUMBERS >= 10 * n  # the default holds every digits class at once
    assert model.training


@pytest.mark.usefixtures("single_thread")
def test_fisher_through_the_run_loaders_equals_the_oracle_on_digits(digits):
    cfg, data, model = digits
    n = sum(p.numel() for p in ordered_parameters(model, is_classifier)[0])
    group_of_class = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    anchors = torch.nn.utils.parameters_to_vector(ordered_parameters(model, is_classifier)[0]).detach()
    anchors = anchors + 0.01 * torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    want = oracle_fisher(model, data.train_eval, data.train_targets, group_of_class, anchors, 32)
    got = gkp.estimate_fisher(model, dataset=data.train_eval, targets=data.train_targets, group_of_class=group_of_class,
                              anchors=anchors, classification_losses=ce, is_excluded=is_classifier, batch_size=32,
                              device=torch.device("cpu"), loader_kw=loader_options(cfg, 0, "cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def _peak_growth(fn) -> int:
    """Bytes the resident set's high-water mark rises by while `fn` runs (Linux: freed heap pages handed back with
    glibc's malloc_trim, so a reused free chunk is counted; the mark reset through clear_refs)."""
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def _grouping_peak_growths() -> dict[str, int]:
    """An MLP of 264k covered parameters, 16 and 48 classes (2 images each): each run's peak growth, the oracle's and
    the grouping's with 8-class blocks (two or more blocks at both sizes)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU())
    covered = list(body.parameters())
    n = sum(p.numel() for p in covered)
    runs = {}
    for C in (16, 48):
        model = nn.Sequential(body, nn.Linear(64, C))
        y = torch.arange(C).repeat(2)
        ds = TensorDataset(torch.randn(len(y), 1, 8, 8), y)
        runs[f"oracle{C}"] = lambda m=model, d=ds, t=y.numpy(), C=C: oracle_class_means(m, d, t, C, covered, 32)
        runs[f"blocks{C}"] = lambda m=model, d=ds, t=y.numpy(), C=C: gradient_groups(
            m, ce, d, t, C, 4, covered, 32, torch.device("cpu"), contextlib.nullcontext, 0, None, 8 * n)
    runs["blocks16"]()  # the allocator warmed up
    return {"n": n, **{k: _peak_growth(runs[k]) for k in ("blocks16", "blocks48", "oracle16", "oracle48")}}


def test_gradient_grouping_memory_does_not_grow_with_classes_times_parameters():
    """From 16 to 48 classes the oracle's peak rises with the [classes x parameters] float64 array (about 68 MB),
    the grouping's by less than 16 MB. Measured in a fresh interpreter: a long-lived test worker's heap holds free
    resident chunks that earlier tests left, which the oracle's array can reuse without raising the mark."""
    code = "import json, test_bounded_memory as t; print(json.dumps(t._grouping_peak_growths()))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    n = growth["n"]
    assert growth["oracle48"] - growth["oracle16"] > 0.8 * 32 * n * 8, growth
    assert growth["blocks48"] - growth["blocks16"] < 16 * 2**20, growth
