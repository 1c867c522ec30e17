#!/usr/bin/env python3
"""Train a long-tailed recipe: `python train.py --recipe NAME --output DIR [--set KEY=VALUE ...] [--resume]`.

Works the same under `accelerate launch train.py ...` (DDP over any number of processes, bf16/fp16).
"""
from __future__ import annotations

import argparse
import logging
import sys

from lt_recipes.checkpoint import CheckpointError
from lt_recipes.config import ConfigError, load_config
from lt_recipes.data import DataError
from lt_recipes.engine import run
from lt_recipes.losses import LossError
from lt_recipes.method import NonFiniteError
from lt_recipes.models import ModelError

_logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="digits_lt", help="recipe name in recipes/ or a path to a YAML file")
    p.add_argument("--output", default=None, help="run directory (default: output/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set epochs=5 --set data.root=/data (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="mixed precision when not set by `accelerate launch`")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides)
        output = args.output or f"output/{cfg['name']}"
        results = run(cfg, output, resume=args.resume, mixed_precision=args.mixed_precision)
    except (ConfigError, DataError, CheckpointError, NonFiniteError, ModelError, LossError) as e:
        _logger.error("%s", e)
        return 2
    print(f"results: {output}/results.json  top1={results['top1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
