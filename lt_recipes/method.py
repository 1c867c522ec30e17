"""Training methods: a registered step (lt_recipes.steps) on top of a base loss, optionally carrying GKP (recipe key
`method`: `<step>` or `gkp_<step>`, `gkp` for the plain step with GKP).

`create_method` turns the recipe into one object with the hooks the engine calls: `epoch_start`, `train_step`,
`epoch_end`, `artifacts` and `state_dict`; it is built once, after Accelerate's `prepare`. Every step runs on the
step core (flat parameters, one loss scale, DDP reduction, clipping, skipping). A method that carries GKP or runs the grouped step (`GroupedMethod`) warms up with
its step without GKP (the grouped step: with the plain step), evaluates class feature quality on the held-out
validation split after every `groups.eval_interval` epochs to update the memory bank, groups at
`groups.start_epoch` (and every `groups.interval` epochs after), and then trains with Eq. 16. Under several
processes the bank is the main process's alone; the groups and anchors are broadcast from it
(lt_recipes.distributed) and the Fisher is estimated by all processes together. GBG forms its own groups from the
initial weights, before the first step. A grouping may yield fewer groups than asked (fewer classes or distinct bank
snapshots than groups, empty clusters): `Groups` holds the realised grouping, the one owner of the group count every
step, table and artifact reads, and the run says once in its log when it is below the asked count.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from . import equations, faults
from .choices import COMPILE_BACKENDS
from .data import LTData
from .data.loader import loader_options
from .distributed import broadcast_groups, format_per_process, gather_counts
from .equations import feature_quality
from .errors import ConfigError, NonFiniteError
from .gkp import estimate_fisher, gkp_strength
from .grouping import DTYPES, MemoryBank, compute_groups
from .models import is_classifier, ordered_parameters
from .sections import GSAConfig, Recipe
from .steps import create_step, method_modules, split_method, step_info, uses_memory_groups
from .steps.core import LossScaler, StepCore, StepStats

_logger = logging.getLogger(__name__)


def build_step(recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               data: LTData, **kw: Any) -> StepCore:
    """The recipe's step: its registered class with its recipe section's options and what it uses from the run
    (training counts, the base's classification loss). A step on gradient groups takes none of its section, which
    sets how many groups the method forms. `kw` passes autocast, scaler, clip_grad."""
    name = split_method(recipe.method)[0]
    info = step_info(name)
    options = recipe.step_options(info.section) if info.grouping != "gradient" else {}
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


def method_label(recipe: Recipe) -> str:
    """`<base>` or `<base>+<modules>`, with `@<direction>` when the paper's grouped step ascends along a non-default
    direction (the released step's direction is its own, named by its reading)."""
    modules = method_modules(recipe.method)
    label = "+".join([recipe.loss.name, *modules])
    if split_method(recipe.method)[0] == "gsa" and recipe.gsa.direction != GSAConfig.direction:
        label += f"@{recipe.gsa.direction}"
    return label


def index_inputs(inputs: torch.Tensor | list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The batch rows `idx` of an input tensor or of every view of a multi-view input."""
    if isinstance(inputs, (list, tuple)):
        return [x[idx] for x in inputs]
    return inputs[idx]


@dataclass(frozen=True)
class Groups:
    """A realised grouping of the classes: the group of every class, and each group's classes and training samples.
    Its `count` is the one group count every step, summary column and artifact reads."""

    of_class: np.ndarray
    classes: tuple[int, ...]
    samples: tuple[int, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[int] | np.ndarray, train_counts: Sequence[int]) -> "Groups":
        """The grouping of a group-id-per-class array (ids 0..G-1, every group non-empty)."""
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.asarray(train_counts)
        G = int(labels.max()) + 1
        return cls(labels, tuple(int((labels == g).sum()) for g in range(G)),
                   tuple(int(counts[labels == g].sum()) for g in range(G)))

    @property
    def count(self) -> int:
        return len(self.classes)

    def members(self) -> list[list[int]]:
        """The classes of every group."""
        return [np.flatnonzero(self.of_class == g).tolist() for g in range(self.count)]


class EpochMeans:
    """Per-key means over an epoch's steps of per-step statistics (a number or a vector of per-group values, NaN
    where a group was absent), each value averaged over the steps where it was not NaN. The sums stay where the
    steps left the values (on the device), so a step adds without waiting for it; `means` reads them all once."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[Any, Any]] = {}

    def add(self, key: str, value: torch.Tensor | float | list[float]) -> None:
        if isinstance(value, list) and not value:
            return
        if isinstance(value, torch.Tensor):
            v = value.detach().double().reshape(-1)
            seen = ~v.isnan()
            v = torch.where(seen, v, 0.0)
        else:
            v = np.array(value, dtype=np.float64).reshape(-1)
            seen = ~np.isnan(v)
            v = np.where(seen, v, 0.0)
        if key in self.sums:
            total, count = self.sums[key]
            self.sums[key] = (total + v, count + seen)
        else:
            self.sums[key] = (v, seen.double() if isinstance(seen, torch.Tensor) else seen.astype(np.float64))

    def means(self) -> dict[str, list[float]]:
        """Every key's per-entry means (NaN for an entry never seen), read from the device in one transfer."""
        keys = list(self.sums)
        parts = [torch.as_tensor(p).double().reshape(-1).cpu() for k in keys for p in self.sums[k]]
        flat = torch.cat(parts).tolist() if parts else []
        out, at = {}, 0
        for k in keys:
            n = len(self.sums[k][0])
            total, count = flat[at:at + n], flat[at + n:at + 2 * n]
            out[k] = [t / c if c > 0 else math.nan for t, c in zip(total, count)]
            at += 2 * n
        return out


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


class Method:
    """A registered step on the base loss, without groups (GBG: with its gradient groups, formed before the first
    step from the initial weights)."""

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
        self.groups: Groups | None = None  # GBG's gradient groups
        self.bank_snapshots: int | None = None  # the memory bank's distinct snapshots (GroupedMethod)
        self._fewer_groups_said = False
        self.step_fn = build_step(recipe, model, _raw_optimizer(optimizer), criterion, data,
                                  autocast=accelerator.autocast,
                                  scaler=LossScaler(accelerator.mixed_precision == "fp16"),
                                  clip_grad=recipe.optim.clip_grad)
        self.forward_model = compile_forward(recipe, model, self.step_fn)  # what the steps' passes forward

    def _realised(self, groups: Groups, asked: int, where: str) -> Groups:
        """`groups`, said once per run in the log (by the main process) when it has fewer groups than asked."""
        if groups.count < asked and not self._fewer_groups_said and self.acc.is_main_process:
            _logger.warning("%s gave %d groups of the %d asked (%d classes%s); the run uses the %d it has", where,
                            groups.count, asked, self.data.num_classes,
                            "" if self.bank_snapshots is None else f", {self.bank_snapshots} distinct bank snapshots",
                            groups.count)
            self._fewer_groups_said = True
        return groups

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (the step core's one counter)."""
        return self.step_fn.skipped_steps

    def epoch_start(self, epoch: int) -> None:
        """Hook before an epoch's first step: GBG's gradient grouping before the run's first step."""
        if self.info.grouping == "gradient" and self.groups is None:
            self._gradient_groups()

    def _gradient_groups(self) -> None:
        from .steps.gbg import gradient_groups
        asked = getattr(self.recipe, self.info.section).num_groups
        with self._own_rng():
            covered, _ = ordered_parameters(self.model, is_classifier)
            labels = gradient_groups(
                self.model, self.criterion.classification_losses, self.data.train_eval,
                np.asarray(self.data.train_targets), self.data.num_classes, asked, covered,
                self.recipe.data.eval_batch_size, self.acc.device, self.acc.autocast, self.recipe.seed,
                loader_kw=self._loader_kw())
        self.groups = self._realised(Groups.from_labels(labels, self.data.train_counts), asked,
                                     f"{self.step_name}'s gradient grouping")
        self.step_fn.set_groups(self.groups.of_class, self.groups.samples)
        _logger.info("%s groups from the initial weights' class gradients: %s", self.step_name, self.groups.members())

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
        """Extra JSON files for the run directory, by file name."""
        if self.groups is None:
            return {}
        return {"groups.json": {"groups": self.groups.members(),
                                "weights": [None if math.isnan(w) else w for w in self.step_fn.last_weights]}}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_fn.state_dict(),
                "gradient_labels": None if self.groups is None else self.groups.of_class.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_fn.load_state_dict(state["step"])
        if state.get("gradient_labels") is not None:
            self.groups = Groups.from_labels(state["gradient_labels"], self.data.train_counts)
            self.step_fn.set_groups(self.groups.of_class, self.groups.samples)


class GroupedMethod(Method):
    """Methods with GKP (`gkp`, `gkp_<step>`) or the grouped step (`gsa`): memory bank, grouping, Fisher, and the
    Eq. 16 step."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        g = self.recipe.groups
        self.memory_step = self.info.grouping == "memory"  # the step itself runs on the memory-based groups
        # one bank per run, on the main process: it groups and averages the anchors, the others get both broadcast
        self.bank = MemoryBank(self.data.num_classes, g.bank_dtype, g.bank_spill_dir) \
            if self.acc.is_main_process else None
        self.bank_snapshots = 0  # the main bank's distinct snapshots, known on every process
        self.memory_groups: Groups | None = None
        self.anchors: torch.Tensor | None = None
        self.fisher: torch.Tensor | None = None
        self.group_epochs: list[int] = []
        self.alpha_history: list[float] = []
        self.quality: dict[str, list] = {"epochs": [], "q": []}
        self.rho_last: torch.Tensor | list[float] = []
        self.alpha = 1.0
        self._epoch_stats = EpochMeans()

    # ---- schedule ------------------------------------------------------------------------------------------
    def _grouping_due(self, epoch: int) -> bool:
        start, interval = self.recipe.groups.start_epoch, self.recipe.groups.interval
        return epoch == start or (interval > 0 and epoch > start and (epoch - start) % interval == 0)

    def epoch_start(self, epoch: int) -> None:
        super().epoch_start(epoch)
        if self._grouping_due(epoch):
            # the bank, grouping and Fisher draw no random numbers from the training stream
            with self._own_rng():
                if not self.bank_snapshots:
                    self._update_bank(epoch - 1)
                self._regroup(epoch)
        if self.memory_groups is not None:
            a = self.recipe.alpha
            # supplement Eq. 20 with t the epoch and T the total number of epochs
            self.alpha = equations.alpha_schedule(epoch, self.recipe.epochs, a.start, a.end) \
                if self.use_gkp else 1.0
            self.alpha_history.append(self.alpha)
        self._epoch_stats = EpochMeans()

    # ---- memory bank and grouping -------------------------------------------------------------------------
    @torch.no_grad()
    def _val_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        was = self.model.training
        self.model.eval()
        feats, labels = [], []
        for x, y in self.val_loader:
            with self.acc.autocast():
                f = self.model.forward_features(x.to(self.acc.device))
            f, y = self.acc.gather_for_metrics((f.float(), y.to(self.acc.device)))
            feats.append(f.cpu())
            labels.append(y.cpu())
        self.model.train(was)
        return torch.cat(feats), torch.cat(labels)

    def _update_bank(self, epoch: int) -> None:
        """Eq. 1 on the main process from every process's validation features; logs each process's bank memory."""
        feats, labels = self._val_features()
        if self.bank is not None:
            q = feature_quality(feats, labels, self.data.num_classes, self.recipe.groups.quality_beta)
            improved = self.bank.update(q, self.step_fn.covered)
            self.quality["epochs"].append(epoch)
            self.quality["q"].append([float(v) for v in q.tolist()])
        held = gather_counts([0, 0] if self.bank is None else [self.bank.host_nbytes, len(self.bank.uids)],
                             self.acc.device)
        self.bank_snapshots = held[0][1]
        if self.bank is not None:
            _logger.info("memory bank: %d classes improved after epoch %d; %d distinct snapshots (%.1f MB%s); "
                         "host memory per process: %s", len(improved), epoch, self.bank_snapshots,
                         self.bank.nbytes / 2**20, ", on disk" if self.bank.spill_dir else "",
                         format_per_process([h for h, _ in held]))

    def _regroup(self, epoch: int) -> None:
        asked = self.recipe.groups.num_groups
        dtype = DTYPES[self.recipe.gkp.state_dtype]
        labels = anchors = None
        if self.bank is not None:
            labels = compute_groups(self.bank, asked, self.data.train_counts, self.recipe.seed)
            anchors = self.bank.anchors(labels, int(labels.max()) + 1, dtype=dtype).to(self.acc.device)
        labels, self.anchors = broadcast_groups(labels, anchors, self.data.num_classes, self.step_fn.num_covered,
                                                dtype, self.acc.device)
        self.memory_groups = self._realised(Groups.from_labels(labels, self.data.train_counts), asked,
                                            f"the memory-based grouping of epoch {epoch}")
        self.group_epochs.append(epoch)
        faults.hit("grouping")
        if self.memory_step:
            self.step_fn.set_groups(self.memory_groups.of_class, self.memory_groups.samples)
        if self.use_gkp:
            k = self.recipe.gkp
            if k.fisher != "ema":
                self.fisher = estimate_fisher(
                    self.model, dataset=self.data.train_eval, targets=self.data.train_targets,
                    group_of_class=self.memory_groups.of_class, anchors=self.anchors,
                    classification_losses=self.criterion.classification_losses, is_excluded=is_classifier,
                    batch_size=k.fisher_batch_size or self.recipe.data.eval_batch_size, device=self.acc.device,
                    autocast=self.acc.autocast, max_batches=k.fisher_batches, estimate=k.fisher, chunk=k.fisher_chunk,
                    loader_kw=self._loader_kw()).to(dtype)
            else:
                self.fisher = self.step_fn.track_fisher(k.fisher_ema)
            self._install_gkp()
        _logger.info("groups at epoch %d: %s (classes per group %s)", epoch, self.memory_groups.count,
                     list(self.memory_groups.classes))

    def _install_gkp(self) -> None:
        groups, k = self.memory_groups, self.recipe.gkp
        self.step_fn.set_gkp(self.anchors, self.fisher,
                             gkp_strength(groups.classes, groups.samples, k.lam, k.norm).to(self.acc.device),
                             groups.of_class)

    # ---- steps ---------------------------------------------------------------------------------------------
    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        loss_fn = self._loss_fn(inputs, targets)
        if self.memory_groups is None:  # before the first grouping: the grouped step's plain step, or without GKP
            step = self.step_fn.plain_step if self.memory_step else self.step_fn.step
            stats = step(loss_fn, targets)
            return self._finish(stats, epoch, step)
        stats = self.step_fn.step(loss_fn, targets, alpha=self.alpha)
        if not stats.skipped:
            for key in ("group_loss", "rho", "cos", "ascent", "gkp", "gkp_grad_ratio"):
                self._epoch_stats.add("loss" if key == "group_loss" else key, getattr(stats, key))
            if len(stats.rho):
                rho = torch.as_tensor(stats.rho, dtype=torch.float64)
                last = torch.as_tensor(self.rho_last, dtype=torch.float64).to(rho.device)
                self.rho_last = rho if last.shape != rho.shape else torch.where(rho.isnan(), last, rho)
        return self._finish(stats, epoch, step)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        if (epoch + 1) % self.recipe.groups.eval_interval == 0:
            self._update_bank(epoch)
        groups = self.memory_groups
        row: dict[str, Any] = {"skipped_steps": self.skipped_steps,
                               "alpha": self.alpha if groups is not None else math.nan,
                               "num_groups": 0 if groups is None else groups.count,
                               "bank_snapshots": self.bank_snapshots}
        # per realised group (none before grouping), the epoch mean over the steps where the group was in the batch
        means = self._epoch_stats.means()
        for g in range(row["num_groups"]):
            for key in ("loss", "rho", "cos", "ascent"):
                values = means.get(key, [])
                row[f"{key}_g{g}"] = values[g] if g < len(values) else math.nan
        for key in ("gkp", "gkp_grad_ratio"):
            row[key] = means.get(key, [math.nan])[0]
        return row

    def _rho_last(self) -> list[float]:
        rho = self.rho_last
        return rho.tolist() if isinstance(rho, torch.Tensor) else list(rho)

    def artifacts(self) -> dict[str, Any]:
        return {
            "groups.json": {
                "groups": [] if self.memory_groups is None else self.memory_groups.members(),
                "memory_bank": {"snapshots": len(self.bank.uids), "class_snapshot": list(self.bank.class_snapshot),
                                "bytes": self.bank.nbytes},
                "rho": [None if math.isnan(r) else r for r in self._rho_last()], "alpha": self.alpha_history,
                "group_epochs": self.group_epochs},
            "quality.json": self.quality,
        }

    def state_dict(self) -> dict[str, Any]:
        groups = self.memory_groups
        return {**super().state_dict(), "bank": None if self.bank is None else self.bank.state_dict(),
                "labels": None if groups is None else groups.of_class.tolist(),
                "anchors": None if self.anchors is None else self.anchors.cpu(),
                # the EMA Fisher is the step's own state (saved there): a second copy would double it on a GPU
                "fisher": None if self.fisher is None or self.recipe.gkp.fisher == "ema" else self.fisher.cpu(),
                "group_epochs": list(self.group_epochs), "alpha_history": list(self.alpha_history),
                "quality": self.quality, "rho_last": self._rho_last()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        self.bank_snapshots = len({u for u in state["bank"]["class_snapshot"] if u >= 0})
        self.group_epochs = list(state["group_epochs"])
        self.alpha_history = list(state["alpha_history"])
        self.quality = state["quality"]
        self.rho_last = list(state["rho_last"])
        if state["labels"] is not None:
            self.memory_groups = Groups.from_labels(state["labels"], self.data.train_counts)
            self.anchors = state["anchors"].to(self.acc.device)
            if self.memory_step:  # before the step's state: a new grouping resets the step's per-group state
                self.step_fn.set_groups(self.memory_groups.of_class, self.memory_groups.samples)
        super().load_state_dict(state)
        if self.recipe.gkp.fisher == "ema":
            self.fisher = self.step_fn.fisher_ema
        elif state["fisher"] is not None:
            self.fisher = state["fisher"].to(self.acc.device)
        if self.fisher is not None and self.memory_groups is not None:
            self._install_gkp()


def create_method(recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                  data: LTData, val_loader: Any, accelerator: Accelerator) -> Method:
    """The method of `recipe.method`, built once after Accelerate's `prepare` (`GroupedMethod` when it needs the
    memory-based groups); `model` unwrapped, `optimizer` and `val_loader` prepared."""
    cls = GroupedMethod if uses_memory_groups(recipe.method) else Method
    return cls(recipe, model, optimizer, criterion, data, val_loader, accelerator)
