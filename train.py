#!/usr/bin/env python3
"""Train a long-tailed recipe: `python train.py --recipe NAME --output DIR [--set KEY=VALUE ...] [--resume]`.

`--resume` continues the run in --output with its own args.yaml (a `--recipe` given too must match the checkpoint);
a folder without a checkpoint is an error. `--resume-or-start` continues a run or starts it when there is none yet.

Works the same under `accelerate launch train.py ...` and `torchrun train.py ...` (DDP over any number of
processes, bf16/fp16); `data.batch_size` is per process. Exit code 2 for bad input (recipe key, data, checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys

from lt_recipes.cli import DEFAULT_RECIPE, add_recipe_args, process_rank, run_recipe, run_recipe_path, setup_logging
from lt_recipes.sections import Recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--output", default=None, help="run directory (default: output/<recipe>)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --output (an error when there is none)")
    resume.add_argument("--resume-or-start", action="store_true",
                        help="continue from the checkpoint in --output, or start the run there when there is none")
    p.add_argument("--tiny", action="store_true",
                   help="a minutes-long CPU try-out of the recipe: 2 epochs, 32 px, small batches and splits, G<=2, "
                        "bf16 GKP state (docs/usage.md, 'Trying a big recipe small'; --set still overrides)")
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

    def output(recipe: Recipe) -> str:
        return args.output or f"output/{recipe.name}"

    continuing = args.resume or args.resume_or_start
    recipe = run_recipe_path(args.recipe, args.output or f"output/{DEFAULT_RECIPE}") if continuing \
        else args.recipe or DEFAULT_RECIPE

    def train(recipe: Recipe) -> int:
        if args.print_config:
            import yaml

            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        from lt_recipes.engine import run

        results = run(recipe, output(recipe), resume="or_start" if args.resume_or_start else args.resume,
                      mixed_precision=args.mixed_precision)
        if process_rank() == 0:
            print(f"results: {output(recipe)}/results.json  top1={results['top1']:.2f}")
        return 0

    def log_path(recipe: Recipe) -> str | None:
        from lt_recipes.checkpoint import has_checkpoint

        if args.print_config or (args.resume and not has_checkpoint(output(recipe))):
            return None  # nothing to resume (an error): a mistyped --output is not created for a log
        return os.path.join(output(recipe), "train.log")

    return run_recipe(recipe, args.overrides, train, log_path=log_path, tiny=args.tiny)


if __name__ == "__main__":
    sys.exit(main())
