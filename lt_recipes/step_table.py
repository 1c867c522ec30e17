"""The step table: one row per training step, as data (imports nothing), read by the recipe sections, the step
registry and the method.

A row names the step, the module under lt_recipes.steps that defines its class (the class registers itself there
with `steps.register_step`), its recipe section (its options), the class grouping it runs on and what it takes from
the run. The recipe's `method` is a step's name, with GKP `gkp_<step>` (`gkp` for the plain step with GKP); the
sections check a method against this table when the value is checked, so a step registered from outside the
package (`register_step("mine", section=...)`) can be named in a recipe as the built-in ones are.
"""
from __future__ import annotations

from dataclasses import dataclass

# A method that carries GKP is its step's name with this prefix (`gkp_gsa`, `gkp_imbsam`); GKP on the plain step is
# spelled `gkp`.
GKP_PREFIX = "gkp_"


@dataclass(frozen=True)
class StepInfo:
    """A step's row: its module (under lt_recipes.steps, or a dotted path for a step of your own), its recipe section
    with its options (None: none), the class grouping it runs on (`memory`: the paper's memory-based groups, formed
    during training, the plain step running until then; `gradient`: GBG's, formed from the initial weights; None),
    and what it takes from the training run (`class_counts`: training images per class; `head_losses`: the base's
    classification loss on logits). `label`: its module's name in a run's label (`bcl+gkp+<label>`; empty: its
    name)."""

    name: str
    module: str
    section: str | None = None
    grouping: str | None = None
    uses: tuple[str, ...] = ()
    summary: str = ""
    label: str = ""


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
    # a reading of GSA: its runs keep GSA's label (the run grid tells them apart by their variant, `#released`)
    StepInfo("released", "released", "released", grouping="memory", label="gsa",
             summary="GSA as the authors' released script runs it: one gradient, cascaded FriendlySAM directions, "
                     "one averaged perturbed pass"),
)
_INFO: dict[str, StepInfo] = {info.name: info for info in _BUILTIN}


def add_step(info: StepInfo) -> None:
    """Add a step's row (steps.register_step does, for a step of your own); a built-in row stays as it is."""
    _INFO.setdefault(info.name, info)


def list_steps() -> tuple[str, ...]:
    """Every step in the table, the built-in ones first in their table order."""
    return tuple(_INFO)


def step_info(name: str) -> StepInfo:
    """The row of a step (KeyError with the known names for an unknown one)."""
    if name not in _INFO:
        raise KeyError(f"unknown step {name!r}; registered: {', '.join(_INFO)}")
    return _INFO[name]


def list_methods() -> tuple[str, ...]:
    """The recipe's `method` choices now: every step, then every step with GKP (`gkp` for the plain step with GKP)."""
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
    return (("gkp",) if gkp else ()) + (() if step == "none" else (step_info(step).label or step,))


def uses_memory_groups(method: str) -> bool:
    """Whether a method needs the memory bank and its grouping: it carries GKP, or its step runs on those groups."""
    step, gkp = split_method(method)
    return gkp or step_info(step).grouping == "memory"
