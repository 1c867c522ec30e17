"""What train.py and validate.py share: recipe arguments, logging on the main process only, and exit code 2 for bad
input. Imports nothing heavy until the recipe has been validated, so a bad key costs a fraction of a second.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import LTRecipesError

if TYPE_CHECKING:
    from .sections import Recipe

_logger = logging.getLogger("lt_recipes")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

DEFAULT_RECIPE = "digits_lt"
RUN_RECIPE = "args.yaml"  # the recipe a run wrote into its directory, as it trained it


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--recipe, --set KEY=VALUE (repeatable) and --mixed-precision."""
    parser.add_argument("--recipe", default=None,
                        help="recipe name in recipes/ or a path to a YAML file (default: the run's own args.yaml "
                             f"where the command reads a run, else {DEFAULT_RECIPE})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set epochs=5 --set data.root=/data (repeatable)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="mixed precision when not set by `accelerate launch`")


def run_recipe_path(recipe: str | None, run_dir: str | None) -> str:
    """The recipe a command on an existing run loads: `recipe` when given (it overrides; the checkpoint's identity is
    still checked against it), else the run's own args.yaml in `run_dir` when there is one, else DEFAULT_RECIPE."""
    if recipe is not None:
        return recipe
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, RUN_RECIPE)):
        path = os.path.join(run_dir, RUN_RECIPE)
        _logger.info("recipe: %s (the run's own; --recipe to use another)", path)
        return path
    return DEFAULT_RECIPE


def process_rank() -> int:
    """This process's rank as torchrun / accelerate launch export it (0 for a plain `python` run): known before
    torch is imported and the process group set up (lt_recipes.distributed.rank_and_world asks the group)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    """INFO on the main process; only warnings and errors from the others, so every line prints once."""
    level = logging.INFO if process_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT)


@contextlib.contextmanager
def log_file(path: str | None) -> Iterator[None]:
    """While the block runs, the main process's log lines go to `path` too (appended: a resumed run continues its
    train.log); nothing for None or on the other processes."""
    if path is None or process_rank() != 0:
        yield
        return
    from .checkpoint import check_output_dir

    check_output_dir(os.path.dirname(path) or ".")  # an unwritable folder is an exit-2 error naming it
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def last_error(log_path: str) -> str | None:
    """The message of the last ERROR line of a log written in LOG_FORMAT (a run's train.log), None if it has none."""
    with open(log_path) as f:
        errors = [ln.split(" ERROR ", 1)[1].split(": ", 1)[-1].strip() for ln in f if " ERROR " in ln]
    return errors[-1] if errors else None

def _exit_code(fn: Callable[[], int]) -> int:
    """`fn()`'s exit code; bad input (an `LTRecipesError`: recipe, data, checkpoint, model) logs its message and gives
    2, Ctrl-C one line (what was kept, from `engine.Interrupted`) and 130, as a shell reports SIGINT."""
    try:
        return fn()
    except LTRecipesError as e:
        _logger.error("%s", e)
        return 2
    except KeyboardInterrupt as e:
        if process_rank() == 0:
            _logger.error("%s", str(e) or "interrupted")
        return 130


def run_recipe(recipe: str, overrides: list[str], body: Callable[["Recipe"], int],
               log_path: Callable[["Recipe"], str | None] | None = None, tiny: bool = False) -> int:
    """Load and validate the recipe (`tiny`: its --tiny form) into the typed `Recipe`, then `body(recipe)`, logging
    to the file `log_path(recipe)` names as well; exit code 2 for bad input, 130 for Ctrl-C (`_exit_code`)."""
    from .config import load_recipe

    def start() -> int:
        typed = load_recipe(recipe, overrides, tiny=tiny)
        with log_file(log_path(typed) if log_path is not None else None):
            return _exit_code(lambda: body(typed))

    return _exit_code(start)
