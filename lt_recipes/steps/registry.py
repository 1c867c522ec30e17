"""The registry of training steps: every recipe `method` is a registered step, optionally carrying GKP.

timm-style: `register_step` names a step class, `create_step(name, model, optimizer, ...)` builds it, `list_steps()`
names them all. The table of built-in steps (name -> module, recipe section, what the step needs) is data that
imports nothing, so the recipe schema offers exactly these names before torch is imported; the step classes
register themselves when their module is imported (`create_step` imports it). A step of your own registers with the
decorator and is then created like the built-in ones.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# A method that carries GKP is its step's name with this prefix (`gkp_gsa`, `gkp_imbsam`); GKP on the plain step is
# spelled `gkp`.
GKP_PREFIX = "gkp_"


@dataclass(frozen=True)
class StepInfo:
    """A registered step: its module under lt_recipes.steps, the recipe section with its options (None: none), the
    class grouping it runs on (`memory`: the paper's memory-based groups, formed during training, the plain step
    running until then; `gradient`: GBG's, formed from the initial weights; None), and what it takes from the
    training run (`class_counts`: training images per class; `head_losses`: the base's classification loss on
    logits)."""

    name: str
    module: str
    section: str | None = None
    grouping: str | None = None
    uses: tuple[str, ...] = ()
    summary: str = ""


_BUILTIN = (
    StepInfo("none", "plain", summary="the base loss's own step: one forward and backward"),
    StepInfo("sam", "sam", "sam", summary="SAM (Foret et al. 2021): ascend along g / ||g||"),
    StepInfo("asam", "sam", "asam", summary="ASAM (Kwon et al. 2021): SAM scaled by |theta|"),
    StepInfo("fsam", "sam", "fsam", summary="FriendlySAM (Li et al. 2024): ascend along g - sigma m"),
    StepInfo("imbsam", "sam", "imbsam", uses=("class_counts",),
             summary="ImbSAM (Zhou et al. 2023): SAM on the tail classes' loss only"),
    StepInfo("focal_sam", "sam", "focal_sam", uses=("class_counts",),
             summary="Focal-SAM (Li et al. 2025): SAM on a focal-weighted share of each class's loss"),
    StepInfo("cc_sam", "cc_sam", "cc_sam", uses=("class_counts", "head_losses"),
             summary="CC-SAM (Zhou et al. 2023), stage 1 as released: class-wise classifier perturbations"),
    StepInfo("gbg", "gbg", "gbg", grouping="gradient",
             summary="GBG (2024): MGDA weights over gradient-clustered class groups"),
    StepInfo("gsa", "gsa", "gsa", grouping="memory",
             summary="GSA (this paper): one SAM step per memory-based group along h_g"),
)
_INFO: dict[str, StepInfo] = {info.name: info for info in _BUILTIN}
_CLASSES: dict[str, type] = {}


def register_step(name: str, *, module: str | None = None, section: str | None = None, grouping: str | None = None,
                  uses: tuple[str, ...] = (), summary: str = "") -> Callable[[type], type]:
    """Class decorator: register a step class under `name`. The built-in steps are already in the table (their
    arguments come from it); a new name needs its options here."""
    def wrap(cls: type) -> type:
        if name not in _INFO:
            _INFO[name] = StepInfo(name, module or cls.__module__, section, grouping, tuple(uses), summary)
        _CLASSES[name] = cls
        return cls
    return wrap


def list_steps() -> tuple[str, ...]:
    """Every registered step, the built-in ones first in their table order."""
    return tuple(_INFO)


def step_info(name: str) -> StepInfo:
    """The table entry of a step (KeyError with the known names for an unknown one)."""
    if name not in _INFO:
        raise KeyError(f"unknown step {name!r}; registered: {', '.join(_INFO)}")
    return _INFO[name]


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


def list_methods() -> tuple[str, ...]:
    """The recipe's `method` choices: every step, then every step with GKP (`gkp` for the plain step with GKP)."""
    return list_steps() + tuple(method_of(name, True) for name in list_steps())


def method_of(step: str, gkp: bool) -> str:
    """The method name of a step with or without GKP."""
    if not gkp:
        return step
    return "gkp" if step == "none" else GKP_PREFIX + step


def split_method(method: str) -> tuple[str, bool]:
    """A method name -> (its step, whether it carries GKP)."""
    if method == "gkp":
        return "none", True
    if method.startswith(GKP_PREFIX) and method[len(GKP_PREFIX):] in _INFO:
        return method[len(GKP_PREFIX):], True
    step_info(method)
    return method, False


def method_modules(method: str) -> tuple[str, ...]:
    """A method's modules on top of the base loss, as in its label (`bcl+gkp+imbsam`): () for the plain step."""
    step, gkp = split_method(method)
    return (("gkp",) if gkp else ()) + (() if step == "none" else (step,))


def uses_memory_groups(method: str) -> bool:
    """Whether a method needs the memory bank and its grouping: it carries GKP, or its step runs on those groups."""
    step, gkp = split_method(method)
    return gkp or step_info(step).grouping == "memory"
