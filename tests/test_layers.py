"""Dependencies point downward: the math, the ops, the models, the losses and the data layer take explicit arguments
and never import the recipe schema, its loader or the training driver; rank and world size are asked in one place.

Read from the sources (an ast walk over every import, lazy ones in functions included; an import under
`if TYPE_CHECKING:` is for annotations only and is not a dependency)."""
from __future__ import annotations

import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lt_recipes"
# what the lower layers may not import: the recipe schema and its loader, the training driver and its files, the
# steps and the grouping lifecycle built on top of them, the run labels and the command line
UPPER = ("sections", "config", "method", "engine", "checkpoint", "steps", "gkp", "labels", "cli")
LOWER = ("equations.py", "ops.py", "flat.py", "segments.py", "models.py", "losses.py", "data")


def _runtime_imports(source: str, package: list[str]) -> set[str]:
    """The lt_recipes modules a source file of `package` imports at run time (absolute names; `from . import x`
    counts as x)."""
    tree = ast.parse(source)
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join((package[:len(package) - node.level + 1] if node.level else [])
                            + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "lt_recipes" or m.startswith("lt_recipes.")}


def _sources(*names: str) -> list[pathlib.Path]:
    return sorted(p for name in names for p in ([PACKAGE / name] if name.endswith(".py")
                                                else (PACKAGE / name).rglob("*.py")))


def _package_of(path: pathlib.Path) -> list[str]:
    return ["lt_recipes", *path.relative_to(PACKAGE).parent.parts]


def _imports_any(source: str, package: list[str], modules: tuple[str, ...]) -> list[str]:
    forbidden = tuple(f"lt_recipes.{m}" for m in modules)
    return sorted(m for m in _runtime_imports(source, package)
                  if m in forbidden or m.startswith(tuple(f + "." for f in forbidden)))


def _file_imports_any(path: pathlib.Path, modules: tuple[str, ...]) -> list[str]:
    return _imports_any(path.read_text(), _package_of(path), modules)


def test_the_lower_layers_import_nothing_above_them():
    """The math (equations, ops, flat, segments), the models, the losses and the data layer import neither the
    recipe schema nor its loader, the method, the engine, checkpoints, the steps or GKP: they take explicit
    arguments (with literal defaults that tests/test_sections.py compares with the schema)."""
    found = {str(p.relative_to(PACKAGE)): _file_imports_any(p, UPPER) for p in _sources(*LOWER)}
    assert len(found) >= 12 and "data/build.py" in found  # the walk sees the files it checks
    assert not {k: v for k, v in found.items() if v}, {k: v for k, v in found.items() if v}


def test_the_schema_imports_no_step():
    """The recipe schema (sections, choices) imports no step module: the steps take their sections, not back."""
    assert not _file_imports_any(PACKAGE / "sections.py", ("steps",)) + _file_imports_any(PACKAGE / "choices.py",
                                                                                         ("steps",))


def test_the_walk_sees_lazy_imports_and_skips_annotation_ones():
    """The check itself: a lazy import inside a function counts, relative imports resolve from the file's package,
    and an import under `if TYPE_CHECKING:` does not count."""
    source = ("from typing import TYPE_CHECKING\nfrom ..errors import DataError\nimport lt_recipes.flat\n"
              "if TYPE_CHECKING:\n    from ..sections import DataConfig\n\ndef f():\n    from .. import engine\n")
    package = ["lt_recipes", "data"]
    assert _imports_any(source, package, UPPER) == ["lt_recipes.engine"]
    assert {"lt_recipes.errors.DataError", "lt_recipes.flat"} <= _runtime_imports(source, package)
    assert _imports_any("from .sections import Recipe\n", ["lt_recipes"], UPPER) == ["lt_recipes.sections",
                                                                                      "lt_recipes.sections.Recipe"]


def test_rank_and_world_size_are_asked_in_one_place():
    """Only lt_recipes.distributed asks torch.distributed for the rank or the world size; everything else reads
    its rank_and_world / world_size."""
    asking = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("get_rank", "get_world_size"):
                asking.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert asking and all(a.startswith("distributed.py:") for a in asking), asking
