"""Training methods: a registered step (lt_recipes.steps) on top of a base loss, optionally carrying GKP (recipe key
`method`: `<step>` or `gkp_<step>`, `gkp` for the plain step with GKP).

`create_method` turns the recipe into one object with the hooks the engine calls: `epoch_start`, `train_step`,
`epoch_end`, `artifacts` and `state_dict`; it is built once, after Accelerate's `prepare`. Every step runs on the
step core (flat parameters, one loss scale, DDP reduction, clipping, skipping). A step that prepares itself from the
training run does so before the run's first step (GBG forms its gradient groups from the initial weights). A method
that carries GKP or runs the grouped step is the grouping cycle's (lt_recipes.grouping_cycle.GroupedMethod: memory
bank, regrouping, anchors and Fisher).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from .choices import COMPILE_BACKENDS
from .data import LTData
from .data.loader import loader_options
from .errors import ConfigError, NonFiniteError
from .sections import Recipe
from .steps import create_step, split_method, step_info, uses_memory_groups
from .steps.core import LossScaler, StepCore, StepStats, TrainingRun

_logger = logging.getLogger(__name__)


def build_step(recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               data: LTData, **kw: Any) -> StepCore:
    """The recipe's step: its registered class with its recipe section's options and what it uses from the run
    (training counts, the base's classification loss). `kw` passes autocast, scaler, clip_grad."""
    name = split_method(recipe.method)[0]
    info = step_info(name)
    options = recipe.step_options(info.section)
    return create_step(name, model, optimizer, class_counts=list(data.train_counts),
                       head_losses=criterion.classification_losses, **options, **kw)


def compile_forward(recipe: Recipe, model: nn.Module, step: StepCore) -> nn.Module:
    """timm's --torchcompile for the steps (recipe key model.compile): `model` under torch.compile with that backend,
    the module every pass of `step` forwards, or `model` itself when the key is null. Compiled after the step is
    built, so the graphs read the parameters as views into its flat buffer; the parameters stay `model`'s, and
    evaluation, the memory bank, the Fisher estimate and GBG's grouping run `model` eagerly (a deep copy of a
    compiled module would still call the original). Refused with ConfigError for a step it cannot run exactly."""
    backend = recipe.model.compile
    if backend is None:
        return model
    why = step.compile_refusal(backend)
    if why:
        exact = [b for b in COMPILE_BACKENDS if step.compile_refusal(b) is None]
        raise ConfigError(f"model.compile={backend} is refused for method {recipe.method} ({type(step).__name__}): "
                          f"{why}; set model.compile=null" + (f" or {' / '.join(exact)}" if exact else ""))
    _logger.info("the %s step forwards the model compiled with torch.compile(backend=%s)", type(step).__name__,
                 backend)
    return torch.compile(model, backend=backend)


def index_inputs(inputs: torch.Tensor | list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The batch rows `idx` of an input tensor or of every view of a multi-view input."""
    if isinstance(inputs, (list, tuple)):
        return [x[idx] for x in inputs]
    return inputs[idx]


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


class Method:
    """A registered step on the base loss, without the memory-based groups. A step that prepares itself from the
    training run (GBG forms its gradient groups from the initial weights) does so before the run's first step
    (`StepCore.prepare`); the grouping cycle (lt_recipes.grouping_cycle) adds the memory bank, groups and GKP."""

    def __init__(self, recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 data: LTData, val_loader: Any, accelerator: Accelerator) -> None:
        """`model` unwrapped (the steps forward it; their update gradient is all-reduced once), `optimizer` and
        `val_loader` as Accelerate prepared them."""
        self.recipe = recipe
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.data = data
        self.val_loader = val_loader
        self.acc = accelerator
        self.step_name, self.use_gkp = split_method(recipe.method)
        self.info = step_info(self.step_name)
        self.nonfinite_run = 0
        self._prepared = False
        self.step_fn = build_step(recipe, model, _raw_optimizer(optimizer), criterion, data,
                                  autocast=accelerator.autocast,
                                  scaler=LossScaler(accelerator.mixed_precision == "fp16"),
                                  clip_grad=recipe.optim.clip_grad)
        self.forward_model = compile_forward(recipe, model, self.step_fn)  # what the steps' passes forward

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (the step core's one counter)."""
        return self.step_fn.skipped_steps

    def epoch_start(self, epoch: int) -> None:
        """Hook before an epoch's first step: before the run's first step, the step prepares itself from the run."""
        if not self._prepared:
            with self._own_rng():
                self.step_fn.prepare(self._training_run())
            self._prepared = True

    def _training_run(self) -> TrainingRun:
        """What a step may read from the run before its first step."""
        return TrainingRun(dataset=self.data.train_eval, targets=np.asarray(self.data.train_targets),
                           class_counts=list(self.data.train_counts), head_losses=self.criterion.classification_losses,
                           batch_size=self.recipe.data.eval_batch_size, device=self.acc.device, seed=self.recipe.seed,
                           loader_kw=self._loader_kw(), is_main_process=self.acc.is_main_process)

    def _loader_kw(self) -> dict[str, Any]:
        """The run's loader settings (workers, pinned memory) for the passes that read the training images."""
        return loader_options(self.recipe.data, self.recipe.seed, self.acc.device)

    def _own_rng(self):
        """Random numbers drawn inside (grouping, bank, Fisher) leave the training stream untouched."""
        return torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else [])

    def _nonfinite(self, epoch: int, step: int, where: str) -> None:
        self.nonfinite_run += 1
        if self.nonfinite_run > self.recipe.max_nonfinite_steps:
            raise NonFiniteError(f"non-finite values in {where} for {self.nonfinite_run} steps in a row "
                                 f"(epoch {epoch}, step {step}); lower optim.lr or check the data")

    def _loss_fn(self, inputs: Any, targets: torch.Tensor):
        """Per-sample losses of the batch rows idx (the steps' loss function)."""
        return lambda idx: self.criterion.per_sample(self.forward_model, index_inputs(inputs, idx), targets[idx])

    def _finish(self, stats: StepStats, epoch: int, step: int) -> torch.Tensor | float | None:
        if stats.skipped:
            self._nonfinite(epoch, step, "the loss or gradients of the step")
            return None
        self.nonfinite_run = 0
        return stats.loss

    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> torch.Tensor | float | None:
        """One optimisation step; returns the batch loss (a 0-dim tensor on the device: the engine reads it at its
        log interval), or None when the step was skipped."""
        return self._finish(self.step_fn.step(self._loss_fn(inputs, targets), targets), epoch, step)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """Hook after an epoch; returns extra summary.csv columns."""
        return {"skipped_steps": self.skipped_steps}

    def artifacts(self) -> dict[str, Any]:
        """Extra JSON files for the run directory, by file name (the step's own: GBG's groups and weights)."""
        return self.step_fn.artifacts()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_fn.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = state["step"]
        if state.get("gradient_labels") is not None:  # a checkpoint written before the step kept its own groups
            step = {**step, "group_of_class": state["gradient_labels"]}
        self.step_fn.load_state_dict(step)


def create_method(recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                  data: LTData, val_loader: Any, accelerator: Accelerator) -> Method:
    """The method of `recipe.method`, built once after Accelerate's `prepare` (`GroupedMethod` when it needs the
    memory-based groups); `model` unwrapped, `optimizer` and `val_loader` prepared."""
    from .grouping_cycle import GroupedMethod  # the grouping cycle is a Method

    cls = GroupedMethod if uses_memory_groups(recipe.method) else Method
    return cls(recipe, model, optimizer, criterion, data, val_loader, accelerator)
