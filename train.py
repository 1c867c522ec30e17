#!/usr/bin/env python3
"""Train a long-tailed recipe: `python train.py --recipe NAME --output DIR [--set KEY=VALUE ...] [--resume]`.

Works the same under `accelerate launch train.py ...` and `torchrun train.py ...` (DDP over any number of
processes, bf16/fp16); `data.batch_size` is per process. Exit code 2 for bad input (recipe key, data, checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys

from lt_recipes.cli import add_recipe_args, process_rank, run_recipe, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--output", default=None, help="run directory (default: output/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--list", action="store_true", help="list the recipes with their descriptions, then exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (after --set, epoch fractions as epochs) as YAML; exit, no training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        from lt_recipes.config import recipe_description, recipe_names

        for name in recipe_names():
            print(f"{name:24s} {recipe_description(name)}")
        return 0
    setup_logging()

    def output(cfg: dict) -> str:
        return args.output or f"output/{cfg['name']}"

    def train(cfg: dict) -> int:
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        from lt_recipes.engine import run

        results = run(cfg, output(cfg), resume=args.resume, mixed_precision=args.mixed_precision)
        if process_rank() == 0:
            print(f"results: {output(cfg)}/results.json  top1={results['top1']:.2f}")
        return 0

    return run_recipe(args.recipe, args.overrides, train,
                      log_path=None if args.print_config else lambda cfg: os.path.join(output(cfg), "train.log"))


if __name__ == "__main__":
    sys.exit(main())
