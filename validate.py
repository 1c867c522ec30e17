#!/usr/bin/env python3
"""Evaluate a checkpoint on its run's test split: `python validate.py --checkpoint P [--recipe R] [--set KEY=VALUE]`.

P is a run's checkpoint.pt or model_best.pt; the recipe is the run's own args.yaml beside it (`--recipe` to use
another: its dataset, image size, classes and model must match the checkpoint's). Prints Top-1, Top-5 (with 5 or
more classes) and Many / Medium / Few for the weights, and for the EMA weights when the checkpoint holds them, and
writes results.json as the end of training does (default folder: validate-<checkpoint name> beside the checkpoint).
Runs under `accelerate launch` / `torchrun` too. Exit code 2 for bad input (recipe key, data, a checkpoint that is
unreadable or of another model).
"""
from __future__ import annotations

import argparse
import os
import sys

from lt_recipes.cli import add_recipe_args, process_rank, run_recipe, run_recipe_path, setup_logging
from lt_recipes.sections import Recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt or model_best.pt")
    p.add_argument("--output", default=None, help="folder for results.json (default: validate-<name> beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def evaluate(recipe: Recipe) -> int:
        from lt_recipes.engine import evaluate_checkpoint

        stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
        output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"validate-{stem}")
        res = evaluate_checkpoint(recipe, args.checkpoint, output, mixed_precision=args.mixed_precision)
        if process_rank() == 0:
            top5 = "" if res["top5"] is None else f"  top5={res['top5']:.2f}"
            print(f"results: {output}/results.json  top1={res['top1']:.2f}{top5}")
        return 0

    recipe = run_recipe_path(args.recipe, os.path.dirname(os.path.abspath(args.checkpoint)))
    return run_recipe(recipe, args.overrides, evaluate)


if __name__ == "__main__":
    sys.exit(main())
