"""Run labels: the one grammar that names a run in results/, the tables and results.json.

A label is `<base>[+<modules>][@<direction>][#<variant>]`: the base loss (`bcl`), the method's modules on top of it
in the registry's spelling (`gkp+gsa`, `sam`; none for the base's own step), the grouped step's ascent direction
when it is not the default (`@sam`), and a named variant of recipe keys set on top (`#G2`, tools/run_grid.py).
`format_label` writes one and `parse_label` reads it back; `method_label` is the label a recipe trains under.
Imports neither torch nor timm, so the tools read labels without them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .sections import GSAConfig
from .steps.registry import list_methods, method_modules, split_method, step_info

if TYPE_CHECKING:
    from .sections import Recipe

# the grouped step's default ascent direction, which a label leaves out
DEFAULT_DIRECTION = GSAConfig.direction


class RunLabel(NamedTuple):
    """A parsed label: base loss, modules ('' for the base's own step), ascent direction, variant ('' for none)."""

    base: str
    modules: str = ""
    direction: str = DEFAULT_DIRECTION
    variant: str = ""

    def __str__(self) -> str:
        return format_label(*self)

    @property
    def plain(self) -> str:
        """The label without its variant: what the run's results.json names it (`method_label`)."""
        return format_label(self.base, self.modules, self.direction)

    @property
    def method(self) -> str:
        """The recipe `method` of the label's modules (`gkp+gsa` -> `gkp_gsa`, '' -> `none`)."""
        return method_of_modules(self.modules)


def format_label(base: str, modules: str = "", direction: str = DEFAULT_DIRECTION, variant: str = "") -> str:
    """`<base>[+<modules>][@<direction>][#<variant>]`; the default direction is not written."""
    return (base + (f"+{modules}" if modules else "") + ("" if direction == DEFAULT_DIRECTION else f"@{direction}")
            + (f"#{variant}" if variant else ""))


def parse_label(label: str) -> RunLabel:
    """'bcl+gkp+gsa@sam#G2' -> RunLabel('bcl', 'gkp+gsa', 'sam', 'G2'); what is not given takes its default."""
    label, _, variant = label.partition("#")
    label, _, direction = label.partition("@")
    base, _, modules = label.partition("+")
    return RunLabel(base, modules, direction or DEFAULT_DIRECTION, variant)


def method_of_modules(modules: str) -> str:
    """The recipe `method` whose label modules are `modules`; KeyError naming the known ones otherwise. A step
    labelled as another (the released reading of gsa) is chosen by its variant's reading, not by a label."""
    methods = {"+".join(method_modules(m)): m for m in list_methods() if not step_info(split_method(m)[0]).label}
    if modules not in methods:
        raise KeyError(f"no method has the label modules {modules!r}; known: {', '.join(sorted(methods))}")
    return methods[modules]


def method_label(recipe: Recipe) -> str:
    """The label a recipe trains under (results.json's `method`): its base loss and method, with the direction of
    the paper's grouped step (the released step's direction is its own, named by its reading)."""
    modules = method_modules(recipe.method)
    grouped = split_method(recipe.method)[0] == "gsa"
    return format_label(recipe.loss.name, "+".join(modules), recipe.gsa.direction if grouped else DEFAULT_DIRECTION)
