"""What train.py and validate.py share: recipe arguments, logging on the main process only, and exit code 2 for bad
input. Imports nothing heavy until the recipe has been validated, so a bad key costs a fraction of a second.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

from .errors import LTRecipesError

_logger = logging.getLogger("lt_recipes")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--recipe, --set KEY=VALUE (repeatable) and --mixed-precision."""
    parser.add_argument("--recipe", default="digits_lt", help="recipe name in recipes/ or a path to a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set epochs=5 --set data.root=/data (repeatable)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="mixed precision when not set by `accelerate launch`")


def process_rank() -> int:
    """This process's rank as torchrun / accelerate launch export it (0 for a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    """INFO on the main process; only warnings and errors from the others, so every line prints once."""
    level = logging.INFO if process_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_recipe(recipe: str, overrides: list[str], body: Callable[[dict[str, Any]], int]) -> int:
    """Load and validate the recipe, then `body(cfg)`; bad input (an `LTRecipesError`: recipe, data, checkpoint,
    model) returns exit code 2."""
    from .config import load_config

    try:
        return body(load_config(recipe, overrides))
    except LTRecipesError as e:
        _logger.error("%s", e)
        return 2
