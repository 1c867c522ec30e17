#!/usr/bin/env python3
"""GKP + GSA and a peer in your own training loop, on scikit-learn's bundled digits (long-tailed, r = 10).

    python examples/own_loop.py [--device cpu|cuda] [--epochs 12] [--peer imbsam]

The README's snippet grown into a whole loop that uses only the public API, in the paper's order:

1. warm-up with the grouped step's `plain_step` (the base loss's own step: there are no groups yet);
2. after every epoch, the memory bank (Eq. 1): each class whose validation feature quality improved remembers the
   covered parameters (`step.covered`: every parameter but the head, flattened in `named_parameters` order);
3. at `--group-epoch`, the grouping (Eq. 2), the group anchors (Eq. 3) and their Fisher rows (Eq. 5), installed with
   `set_groups` and `set_gkp` (anchors and fisher [G, d_covered], strength [G]);
4. GKP + GSA steps (Eq. 16) with alpha annealed from 0.9 to 0.8 (Eq. 20);
5. a peer (`create_step`, e.g. ImbSAM) trained the same way for comparison.

Prints Top-1 and Many / Medium / Few on the balanced test split for both. tests/test_examples.py runs it.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import lt_recipes.models  # noqa: F401  (registers resnet8_cifar with timm)
from lt_recipes.data import long_tail_counts
from lt_recipes.equations import alpha_schedule, feature_quality
from lt_recipes.gkp import estimate_fisher, gkp_strength
from lt_recipes.grouping import MemoryBank, compute_groups
from lt_recipes.metrics import split_report
from lt_recipes.steps import GroupedSAM, create_step, list_steps

NUM_CLASSES = 10


def digits_lt(seed: int, test_per_class: int = 30, val_per_class: int = 10, ratio: float = 10.0):
    """(train, val, test) as (images [N, 1, 8, 8], labels) and the training images per class: a balanced test and
    validation split per class, the rest cut to the long-tailed profile (130 images for class 0 down to 13)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    rng = np.random.default_rng(seed)
    counts = long_tail_counts(130, NUM_CLASSES, ratio)
    split = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        split["test"] += idx[:test_per_class].tolist()
        split["val"] += idx[test_per_class:test_per_class + val_per_class].tolist()
        split["train"] += idx[test_per_class + val_per_class:][:counts[c]].tolist()
    y = torch.tensor(y)
    return {k: (x[v], y[v]) for k, v in split.items()}, counts


def new_model(device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = timm.create_model("resnet8_cifar", num_classes=NUM_CLASSES, in_chans=1).to(device)  # head: head.fc
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """What every step takes: idx -> the per-sample losses of batch rows idx."""
    return lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> dict:
    model.eval()
    preds = model(x).argmax(1).cpu()
    model.train()
    return split_report(preds, y.cpu(), counts)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    model.train()
    return feats


def train_gkp_gsa(data: dict, counts: list[int], args: argparse.Namespace, device: torch.device) -> dict:
    (xt, yt), (xv, yv) = [(x.to(device), y.to(device)) for x, y in (data["train"], data["val"])]
    model, opt = new_model(device)
    gsa = GroupedSAM(model, opt)  # logs what it covers: every parameter but the head (head.fc.*)
    bank = MemoryBank(NUM_CLASSES)
    gen = torch.Generator().manual_seed(args.seed)
    grouped = False
    for epoch in range(args.epochs):
        if epoch == args.group_epoch:
            labels = compute_groups(bank, args.groups, counts, seed=args.seed)  # group id per class
            G = int(labels.max()) + 1  # may be fewer than asked (classes sharing one snapshot)
            classes = [int((labels == g).sum()) for g in range(G)]
            samples = [int(sum(n for n, g in zip(counts, labels) if g == j)) for j in range(G)]
            anchors = bank.anchors(labels, G).to(device)  # [G, d_covered]
            fisher = estimate_fisher(model, dataset=TensorDataset(*data["train"]), targets=data["train"][1],
                                     group_of_class=labels, anchors=anchors, batch_size=64)  # [G, d_covered]
            gsa.set_groups(labels, samples)
            gsa.set_gkp(anchors, fisher, gkp_strength(classes, samples, lam=args.lam, norm="per_samples"))
            grouped = True
            print(f"epoch {epoch}: {G} groups {[np.flatnonzero(labels == g).tolist() for g in range(G)]}")
        alpha = alpha_schedule(epoch, args.epochs, 0.9, 0.8)
        ascents = []
        for x, y in batches(xt, yt, args.batch_size, gen):
            if grouped:
                stats = gsa.step(loss_fn(model, x, y), y, alpha=alpha)
                ascents += [a for a in stats.ascent if a == a]  # NaN: a group absent from this batch
            else:
                gsa.plain_step(loss_fn(model, x, y), y)
        # Eq. 1: classes whose validation feature quality improved remember the current covered parameters
        bank.update(feature_quality(features(model, xv), yv, NUM_CLASSES), gsa.covered)
        if grouped:
            print(f"epoch {epoch}: alpha {alpha:.3f}; a group's loss rose in its perturbed pass in "
                  f"{sum(a > 0 for a in ascents)} of {len(ascents)} group steps")
    return evaluate(model, *[t.to(device) for t in data["test"]], counts)


def train_peer(data: dict, counts: list[int], args: argparse.Namespace, device: torch.device) -> dict:
    (xt, yt) = [t.to(device) for t in data["train"]]
    model, opt = new_model(device)
    step = create_step(args.peer, model, opt, class_counts=counts)  # every step takes the same run facts
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for x, y in batches(xt, yt, args.batch_size, gen):
            step.step(loss_fn(model, x, y), y)
    return evaluate(model, *[t.to(device) for t in data["test"]], counts)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--group-epoch", type=int, default=4, help="the epoch of the grouping (after the warm-up)")
    p.add_argument("--groups", type=int, default=3, help="G, the groups asked for")
    p.add_argument("--lam", type=float, default=100.0, help="GKP's lambda (Eq. 6)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--peer", default="imbsam", choices=[s for s in list_steps() if s not in ("gsa", "gbg")])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 < args.group_epoch < args.epochs:
        p.error("--group-epoch must lie after the first epoch and before --epochs")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data, counts = digits_lt(args.seed)
    results = {"gkp+gsa": train_gkp_gsa(data, counts, args, device)}
    torch.manual_seed(args.seed)
    results[args.peer] = train_peer(data, counts, args, device)
    for name, r in results.items():
        print(f"{name:10s} top1 {r['top1']:.1f}  many {r['many']:.1f}  medium {r['medium']:.1f}  few {r['few']:.1f}")
    return results


if __name__ == "__main__":
    main()
