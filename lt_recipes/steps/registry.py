"""The registry of training steps: every recipe `method` is a registered step, optionally carrying GKP.

timm-style: `register_step` names a step class, `create_step(name, model, optimizer, ...)` builds it, `list_steps()`
names them all. The table of steps (name -> module, recipe section, what the step needs) is data
(lt_recipes.step_table) that imports nothing, so the recipe schema checks a method against it before torch is
imported; the step classes register themselves when their module is imported (`create_step` imports it). A step of
your own registers with the decorator, which adds its row: it is then created like the built-in ones and can be named
in a recipe (`method: mine`, `gkp_mine`).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..step_table import (GKP_PREFIX, StepInfo, add_step, list_methods, list_steps, method_modules, method_of,
                          split_method, step_info, uses_memory_groups)

__all__ = ["GKP_PREFIX", "RUN_FACTS", "StepInfo", "create_step", "list_methods", "list_steps", "method_modules",
           "method_of", "register_step", "split_method", "step_class", "step_info", "uses_memory_groups"]

_CLASSES: dict[str, type] = {}


def register_step(name: str, *, module: str | None = None, section: str | type | None = None,
                  grouping: str | None = None, uses: tuple[str, ...] = (), summary: str = "") -> Callable[[type], type]:
    """Class decorator: register a step class under `name`. The built-in steps have their row in the step table
    (their arguments come from it); a new name adds its row with these arguments. `section`: the step's recipe
    section, a `lt_recipes.sections.Section` subclass (or its name), whose fields are the step's options in a recipe
    (`mine.rho: 0.1`) and are passed to its constructor."""
    def wrap(cls: type) -> type:
        own = section if section is None or isinstance(section, str) else section.section
        add_step(StepInfo(name, module or cls.__module__, own, grouping, tuple(uses), summary))
        _CLASSES[name] = cls
        return cls
    return wrap


def step_class(name: str) -> type:
    """The class registered under `name`, importing its module first if needed."""
    info = step_info(name)
    if name not in _CLASSES:
        importlib.import_module(info.module if "." in info.module else f"{__package__}.{info.module}")
    return _CLASSES[name]


# What a training run knows that some steps use (StepInfo.uses): `create_step` takes them for every step.
RUN_FACTS = ("class_counts", "head_losses")


def create_step(name: str, model: Any, base_optimizer: Any, *, class_counts: Any = None, head_losses: Any = None,
                **kw: Any) -> Any:
    """Build the step `name` on `model` around `base_optimizer`. Every step takes the same run facts, and each is
    passed the ones it uses (StepInfo.uses): `class_counts`, the training images per class (ImbSAM, Focal-SAM,
    CC-SAM need it: a TypeError naming it otherwise), and `head_losses(logits, y)`, the base's per-sample
    classification loss (CC-SAM; None: cross-entropy). Other keyword options: the step's own (its recipe section),
    and the core's autocast, scaler, clip_grad, backend, is_excluded."""
    info, facts = step_info(name), {"class_counts": class_counts, "head_losses": head_losses}
    if "class_counts" in info.uses and class_counts is None:
        raise TypeError(f"create_step({name!r}) needs class_counts, the training images per class (the step uses it)")
    return step_class(name)(model, base_optimizer, **{k: facts[k] for k in info.uses}, **kw)


