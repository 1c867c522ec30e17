#!/usr/bin/env python3
"""What a recipe's training checkpoint holds and how large it is; nothing is trained.

    python tools/checkpoint_size.py --recipe imagenet_lt_resnext50 [--set KEY=VALUE ...] [--snapshots K] [--json]

The model (and its EMA copy) and the optimizer state are measured on the real objects built on the CPU (timm's
model, one optimizer step on zero gradients so the optimizer allocates its state). The method's state is sized
from the layout the grouped methods store (lt_recipes.grouping_cycle.state_parts): memory-bank snapshots of the
parameters GKP covers (everything but the classifier), anchors and exact Fisher rows [G, d_covered] in
`gkp.state_dtype`, the EMA Fisher [G, d_covered], FriendlySAM momenta and the group-gradient EMA [G, d] in fp32. The bank holds K distinct snapshots, 1 up to min(classes, evaluations);
`groups.bank_spill_dir` keeps them out of the checkpoint. tests/test_faults.py checks these figures against a
real checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from lt_recipes.checkpoint import tensor_bytes
from lt_recipes.config import load_recipe
from lt_recipes.data import dataset_info
from lt_recipes.grouping_cycle import state_parts
from lt_recipes.models import is_classifier, ordered_parameters
from lt_recipes.models import create_lt_model
from lt_recipes.optim import create_optimizer
from lt_recipes.sections import Recipe


def weights_and_optimizer(cfg: Recipe, num_classes: int, in_chans: int) -> dict[str, int]:
    """Tensor bytes of the model, its EMA copy and the optimizer state, measured on the real objects; and the
    parameter counts (all trainable, and those GKP/GSA cover)."""
    model = create_lt_model(dataclasses.replace(cfg.model, pretrained_path=None), num_classes, in_chans)
    parts = {"model": tensor_bytes(model.state_dict())}
    parts["ema"] = parts["model"] if cfg.ema.decay is not None else 0
    optimizer = create_optimizer(model, cfg.optim, cfg.data.batch_size)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    parts["optimizer"] = tensor_bytes(optimizer.state_dict())
    covered, _ = ordered_parameters(model, is_classifier)
    parts["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts["covered_params"] = sum(p.numel() for p in covered)
    return parts


def method_parts(cfg: Recipe, params: int, covered: int, num_classes: int, groups: int,
                 snapshots: int) -> dict[str, int]:
    """Tensor bytes of the method's state by part (lt_recipes.grouping_cycle.state_parts; none for method none / sam)."""
    sizes = {"groups": groups, "snapshots": snapshots, "classes": num_classes, "covered": covered, "params": params,
             "one": 1}
    return {name: sum(t.nbytes(cfg, sizes) for t in tensors) for name, tensors in state_parts(cfg).items()}


def checkpoint_parts(cfg: Recipe, num_classes: int, in_chans: int, groups: int,
                     snapshots: int) -> dict[str, Any]:
    """Tensor bytes of each part of checkpoint.pt: model, ema, optimizer, method (and `method_parts`)."""
    parts: dict[str, Any] = weights_and_optimizer(cfg, num_classes, in_chans)
    parts["method_parts"] = method_parts(cfg, parts["params"], parts["covered_params"], num_classes, groups, snapshots)
    parts["method"] = sum(parts["method_parts"].values())
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="imagenet_lt_resnext50")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--snapshots", type=int, default=None, help="memory-bank snapshots (default: 1 and the most)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    cfg = load_recipe(args.recipe, args.overrides)
    dataset = cfg.data.dataset
    num_classes, groups = dataset_info(dataset).num_classes, cfg.groups.num_groups
    most = min(num_classes, cfg.epochs // cfg.groups.eval_interval)
    counts = [args.snapshots] if args.snapshots else sorted({1, most})
    out = {"recipe": cfg.name, "model": cfg.model.name, "num_classes": num_classes, "groups": groups,
           "optimizer": cfg.optim.opt, "sizes": {}}
    weights = weights_and_optimizer(cfg, num_classes, dataset_info(dataset).in_chans)
    for k in counts:
        method = method_parts(cfg, weights["params"], weights["covered_params"], num_classes, groups, k)
        parts = {**weights, "method_parts": method, "method": sum(method.values())}
        total = parts["model"] + parts["ema"] + parts["optimizer"] + parts["method"]
        out["sizes"][k] = {**parts, "checkpoint": total, "model_best": parts["model"] + parts["ema"],
                           "on_disk": 2 * total + parts["model"] + parts["ema"]}
    first = out["sizes"][counts[0]]
    print(f"{cfg.name}: {cfg.model.name}, {num_classes} classes, {first['params'] / 1e6:.1f}M parameters "
          f"({first['covered_params'] / 1e6:.1f}M covered by GKP/GSA), G={groups}, optim.opt={cfg.optim.opt}, "
          f"method={cfg.method}")
    rows = [("model (weights, BatchNorm statistics)", "model"), ("EMA weights", "ema"),
            ("optimizer state", "optimizer")]
    header = "| part | " + " | ".join(f"MB, {k} bank snapshot{'s' * (k > 1)}" for k in counts) + " |"
    print(header + "\n|---|" + "---:|" * len(counts))
    for title, key in rows:
        print(f"| {title} | " + " | ".join(f"{out['sizes'][k][key] / 1e6:,.0f}" for k in counts) + " |")
    for key in first["method_parts"]:
        print(f"| method: {key} | " + " | ".join(f"{out['sizes'][k]['method_parts'][key] / 1e6:,.0f}"
                                               for k in counts) + " |")
    for title, key in (("**checkpoint.pt**", "checkpoint"), ("model_best.pt", "model_best"),
                       ("on disk: checkpoint.pt + checkpoint.prev.pt + model_best.pt", "on_disk")):
        print(f"| {title} | " + " | ".join(f"{out['sizes'][k][key] / 1e6:,.0f}" for k in counts) + " |")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
