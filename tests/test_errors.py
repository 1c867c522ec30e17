"""User errors: one LTRecipesError base, caught once by train.py / validate.py (exit code 2); code errors propagate."""
import inspect

import pytest

from lt_recipes import errors
from lt_recipes.cli import run_recipe
from lt_recipes.errors import LTRecipesError

USER_ERRORS = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]


def test_every_error_of_the_module_is_a_user_error_with_its_builtin_base():
    assert len(USER_ERRORS) == 12
    for cls in USER_ERRORS:
        assert issubclass(cls, LTRecipesError)
        if cls is not LTRecipesError:  # callers that catch the builtin kind keep catching it
            assert issubclass(cls, (ValueError, RuntimeError, OSError)), cls


def test_no_module_defines_its_own_error_but_for_code_errors():
    """Errors are defined in lt_recipes.errors; the one class elsewhere is SegmentError, a misuse of the grouped
    step's segments by model code (not bad input), which keeps its traceback."""
    import importlib
    import pkgutil

    import lt_recipes

    own = set()
    for info in pkgutil.walk_packages(lt_recipes.__path__, "lt_recipes."):
        if info.name == "lt_recipes._C":  # the compiled ops, loaded by lt_recipes.ops after torch
            continue
        module = importlib.import_module(info.name)
        own |= {f"{info.name}.{name}" for name, c in inspect.getmembers(module, inspect.isclass)
                if issubclass(c, Exception) and c.__module__ == info.name and info.name != errors.__name__}
    assert own == {"lt_recipes.segments.SegmentError"}


@pytest.mark.parametrize("cls", [c for c in USER_ERRORS if c is not LTRecipesError], ids=lambda c: c.__name__)
def test_a_user_error_exits_with_code_2_and_its_message(cls, caplog):
    def body(cfg):
        raise cls(f"bad input for {cfg.name}")

    assert run_recipe("digits_lt", [], body) == 2
    assert "bad input for digits_lt" in caplog.text


def test_a_code_error_keeps_its_traceback():
    def body(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_recipe("digits_lt", [], body)
    assert run_recipe("digits_lt", ["bad.key=1"], body) == 2
