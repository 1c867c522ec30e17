#!/usr/bin/env python3
"""Memory of the method's state for a recipe's model, computed from parameter counts (nothing is trained).

Reports the memory bank as the paper describes it (one encoder copy per class) against this project's bank of
distinct snapshots (at most one per evaluation point, each stored once), plus the GSA buffers ([G, d] group
gradients, the saved weights and the global gradient) and the GKP anchors and Fisher rows, in fp32 and bf16.
`--json` prints one JSON object as the last line.

    python tools/bench_memory.py --recipe imagenet_lt_resnext50
"""
from __future__ import annotations

import argparse
import json

from lt_recipes.config import load_recipe
from lt_recipes.data import dataset_info
from lt_recipes.models import is_classifier
from lt_recipes.models import create_lt_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="imagenet_lt_resnext50")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_recipe(args.recipe, args.overrides)
    C = dataset_info(cfg.data.dataset).num_classes
    model = create_lt_model(cfg.model, C, 3)
    d = sum(p.numel() for p in model.parameters())
    d_enc = sum(p.numel() for n, p in model.named_parameters() if not is_classifier(n))
    G = cfg.groups.num_groups
    evals = cfg.epochs // cfg.groups.eval_interval
    gib = 2 ** 30
    out = {
        "recipe": cfg.name, "model": cfg.model.name, "num_classes": C, "groups": G, "params": d,
        "encoder_params": d_enc, "evaluation_points": evals,
        "naive_bank_bytes_fp32": C * d_enc * 4,
        "snapshot_bank_max_bytes_fp32": min(evals, C) * d_enc * 4,
        "snapshot_bank_max_bytes_bf16": min(evals, C) * d_enc * 2,
        "gsa_buffers_bytes": (G + 2) * d * 4,
        "gkp_state_bytes_fp32": 2 * G * d_enc * 4,
        "gkp_state_bytes_bf16": 2 * G * d_enc * 2,
    }
    out["bank_reduction"] = out["naive_bank_bytes_fp32"] / out["snapshot_bank_max_bytes_fp32"]
    print(f"{cfg.name}: {cfg.model.name}, {C} classes, G={G}, {d / 1e6:.2f}M parameters "
          f"({d_enc / 1e6:.2f}M encoder + heads), {evals} evaluation points")
    rows = [("memory bank, naive (one encoder per class)", out["naive_bank_bytes_fp32"]),
            ("memory bank, distinct snapshots, fp32 (worst case)", out["snapshot_bank_max_bytes_fp32"]),
            ("memory bank, distinct snapshots, bf16 (worst case)", out["snapshot_bank_max_bytes_bf16"]),
            ("GSA buffers: [G, d] rows + weights + global gradient", out["gsa_buffers_bytes"]),
            ("GKP anchors + Fisher, fp32", out["gkp_state_bytes_fp32"]),
            ("GKP anchors + Fisher, bf16", out["gkp_state_bytes_bf16"])]
    for name, b in rows:
        print(f"  {name:<55} {b / gib:9.2f} GiB")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
