#!/usr/bin/env python3
"""Train a long-tailed recipe: `python train.py --recipe NAME --output DIR [--set KEY=VALUE ...] [--resume]`.

Works the same under `accelerate launch train.py ...` and `torchrun train.py ...` (DDP over any number of
processes, bf16/fp16); `data.batch_size` is per process. Exit code 2 for bad input (recipe key, data, checkpoint).
"""
from __future__ import annotations

import argparse
import sys

from lt_recipes.cli import add_recipe_args, process_rank, run_recipe, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--output", default=None, help="run directory (default: output/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def train(cfg: dict) -> int:
        from lt_recipes.engine import run

        output = args.output or f"output/{cfg['name']}"
        results = run(cfg, output, resume=args.resume, mixed_precision=args.mixed_precision)
        if process_rank() == 0:
            print(f"results: {output}/results.json  top1={results['top1']:.2f}")
        return 0

    return run_recipe(args.recipe, args.overrides, train)


if __name__ == "__main__":
    sys.exit(main())
