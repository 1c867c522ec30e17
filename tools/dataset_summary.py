"""Print what a recipe's data looks like: per-class training counts, shot splits and split sizes.

    python tools/dataset_summary.py --recipe cifar100_lt_resnet32 --set data.root=/data/cifar

The last line printed is one JSON object (dataset, num_classes, train_counts, num_train, num_lt,
num_val_from_train, num_val, num_test, splits) for scripts to parse.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from lt_recipes.config import load_recipe
from lt_recipes.data import build_data
from lt_recipes.errors import LTRecipesError
from lt_recipes.metrics import class_splits
from lt_recipes.sections import Recipe

_logger = logging.getLogger(__name__)


def summarize(cfg: Recipe) -> dict[str, Any]:
    """Build the recipe's data and return the summary fields."""
    data = build_data(cfg.data, cfg.seed)
    splits = class_splits(data.train_counts)
    return {
        "dataset": data.dataset,
        "num_classes": data.num_classes,
        "train_counts": data.train_counts,
        "num_train": len(data.train),
        "num_lt": sum(data.lt_counts),
        "num_val_from_train": data.num_val_from_train,
        "num_val": len(data.val),
        "num_test": len(data.test),
        "splits": {name: len(ids) for name, ids in splits.items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name in recipes/ or path to a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set data.root=/data (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = summarize(load_recipe(args.recipe, args.overrides))
    except LTRecipesError as e:
        _logger.error("%s", e)
        sys.exit(2)
    counts = summary["train_counts"]
    print(f"{summary['dataset']}: {summary['num_classes']} classes, train {summary['num_train']} "
          f"(LT cut {summary['num_lt']}, {summary['num_val_from_train']} held out for val), "
          f"val {summary['num_val']}, test {summary['num_test']}")
    print(f"per-class train counts: max {max(counts)}, min {min(counts)}, imbalance {max(counts) / min(counts):.1f}")
    print("classes many/medium/few: " + "/".join(str(summary["splits"][k]) for k in ("many", "medium", "few")))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
