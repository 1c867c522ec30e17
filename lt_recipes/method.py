"""Training methods: a registered step (lt_recipes.steps) on top of a base loss, optionally carrying GKP (recipe key
`method`: `<step>` or `gkp_<step>`, `gkp` for the plain step with GKP).

`create_method` turns the recipe into one object with the hooks the engine calls: `epoch_start`, `train_step`,
`epoch_end`, `artifacts` and `state_dict`. Every step runs on the step core (flat parameters, one loss scale, DDP
reduction, clipping, skipping). A method that carries GKP or runs the grouped step (`GroupedMethod`) warms up with
its step without GKP (the grouped step: with the plain step), evaluates class feature quality on the held-out
validation split after every `groups.eval_interval` epochs to update the memory bank, groups at
`groups.start_epoch` (and every `groups.interval` epochs after), and then trains with Eq. 16. Under several
processes the bank is the main process's alone; the groups and anchors are broadcast from it
(lt_recipes.distributed) and the Fisher is estimated by all processes together. GBG forms its own groups from the
initial weights, before the first step.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from . import equations, faults
from .data import LTData
from .distributed import broadcast_groups, format_per_process, gather_counts
from .equations import feature_quality
from .errors import NonFiniteError
from .gkp import estimate_fisher, gkp_strength
from .grouping import DTYPES, MemoryBank, compute_groups
from .models import is_classifier, ordered_parameters
from .steps import create_step, method_modules, split_method, step_info, uses_memory_groups
from .steps.core import LossScaler, StepCore, StepStats
from .steps.released import ReleasedGSA

_logger = logging.getLogger(__name__)


def create_grouped_step(cfg: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        **kw: Any) -> StepCore:
    """The grouped step from the recipe: `gsa.step` grouped (GroupedSAM with the gsa.* options) or released (the
    authors' script's step); `kw` passes autocast, scaler, clip_grad."""
    g, G = cfg["gsa"], cfg["groups"]["num_groups"]
    if g["step"] == "released":
        return ReleasedGSA(model, optimizer, num_groups=G, z=0.1 if g["z"] is None else g["z"],
                           rho_clamp=(0.002, 0.003) if g["rho_clamp"] == "auto" else g["rho_clamp"],
                           scale=g["scale"], friendly_sigma=g["friendly_sigma"],
                           friendly_momentum=g["friendly_momentum"], backend=g["backend"], **kw)
    return create_step("gsa", model, optimizer, num_groups=G, direction=g["direction"], scale=g["scale"], z=g["z"],
                       rho_clamp=g["rho_clamp"], group_grads=g["group_grads"], perturbation=g["perturbation"],
                       group_weighting=g["group_weighting"], regularizer=g["regularizer"],
                       friendly_sigma=g["friendly_sigma"], friendly_momentum=g["friendly_momentum"],
                       group_grad_ema=g["group_grad_ema"], sync=g["sync"], backend=g["backend"], **kw)


def build_step(cfg: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               data: LTData, **kw: Any) -> StepCore:
    """The recipe's step: its registered class with its recipe section's options and what it uses from the run
    (training counts, the base's classification loss); `kw` passes autocast, scaler, clip_grad."""
    name = split_method(cfg["method"])[0]
    if name == "gsa":
        return create_grouped_step(cfg, model, optimizer, **kw)
    info = step_info(name)
    options = dict(cfg[info.section]) if info.section else {}
    run = {"class_counts": list(data.train_counts), "head_losses": criterion.classification_losses}
    return create_step(name, model, optimizer, **options, **{k: run[k] for k in info.uses}, **kw)


def method_label(cfg: dict[str, Any]) -> str:
    """`<base>` or `<base>+<modules>`, with `@<direction>` when the paper's grouped step ascends along a non-default
    direction (the released step's direction is its own, named by its reading)."""
    modules = method_modules(cfg["method"])
    label = "+".join([cfg["loss"]["name"], *modules])
    if "gsa" in modules and cfg["gsa"]["step"] == "grouped" and cfg["gsa"]["direction"] != "gsa":
        label += f"@{cfg['gsa']['direction']}"
    return label


def index_inputs(inputs: torch.Tensor | list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The batch rows `idx` of an input tensor or of every view of a multi-view input."""
    if isinstance(inputs, (list, tuple)):
        return [x[idx] for x in inputs]
    return inputs[idx]


def group_sizes(labels: np.ndarray, train_counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """Classes and training samples of every group of a group-id-per-class array."""
    counts = np.asarray(train_counts)
    G = int(labels.max()) + 1
    return [int((labels == g).sum()) for g in range(G)], [int(counts[labels == g].sum()) for g in range(G)]


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


class Method:
    """A registered step on the base loss, without groups (GBG: with its gradient groups, formed before the first
    step from the initial weights)."""

    def __init__(self, cfg: dict[str, Any], model: nn.Module, criterion: nn.Module, data: LTData,
                 accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.model = model
        self.criterion = criterion
        self.data = data
        self.acc = accelerator
        self.step_name, self.use_gkp = split_method(cfg["method"])
        self.info = step_info(self.step_name)
        self.nonfinite_run = 0
        self.gradient_labels: np.ndarray | None = None

    def bind(self, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, val_loader: Any) -> None:
        """Attach the prepared (possibly DDP-wrapped) model, optimizer and validation loader; build the step."""
        self.ddp_model = ddp_model
        self.optimizer = optimizer
        self.val_loader = val_loader
        self.step_fn = build_step(self.cfg, self.model, _raw_optimizer(optimizer), self.criterion, self.data,
                                  autocast=self.acc.autocast, scaler=LossScaler(self.acc.mixed_precision == "fp16"),
                                  clip_grad=self.cfg["optim"]["clip_grad"])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (the step core's one counter)."""
        return self.step_fn.skipped_steps

    def epoch_start(self, epoch: int) -> None:
        """Hook before an epoch's first step: GBG's gradient grouping before the run's first step."""
        if self.info.grouping == "gradient" and self.gradient_labels is None:
            self._gradient_groups()

    def _gradient_groups(self) -> None:
        from .steps.gbg import gradient_groups
        with self._own_rng():
            covered, _ = ordered_parameters(self.model, is_classifier)
            self.gradient_labels = gradient_groups(
                self.model, self.criterion.classification_losses, self.data.train_eval,
                np.asarray(self.data.train_targets), self.data.num_classes, self.cfg[self.info.section]["num_groups"],
                covered, self.cfg["data"]["eval_batch_size"], self.acc.device, self.acc.autocast, self.cfg["seed"])
        self._install_gradient_groups()
        _logger.info("%s groups from the initial weights' class gradients: %s", self.step_name,
                     [np.flatnonzero(self.gradient_labels == g).tolist() for g in range(self.gradient_labels.max() + 1)])

    def _own_rng(self):
        """Random numbers drawn inside (grouping, bank, Fisher) leave the training stream untouched."""
        return torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else [])

    def _install_gradient_groups(self) -> None:
        self.step_fn.set_groups(self.gradient_labels, group_sizes(self.gradient_labels, self.data.train_counts)[1])

    def _nonfinite(self, epoch: int, step: int, where: str) -> None:
        self.nonfinite_run += 1
        if self.nonfinite_run > self.cfg["max_nonfinite_steps"]:
            raise NonFiniteError(f"non-finite values in {where} for {self.nonfinite_run} steps in a row "
                                 f"(epoch {epoch}, step {step}); lower optim.lr or check the data")

    def _loss_fn(self, inputs: Any, targets: torch.Tensor):
        """Per-sample losses of the batch rows idx (the steps' loss function)."""
        return lambda idx: self.criterion.per_sample(self.model, index_inputs(inputs, idx), targets[idx])

    def _finish(self, stats: StepStats, epoch: int, step: int) -> float | None:
        if stats.skipped:
            self._nonfinite(epoch, step, "the loss or gradients of the step")
            return None
        self.nonfinite_run = 0
        return stats.loss

    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        """One optimisation step; returns the batch loss, or None when the step was skipped."""
        return self._finish(self.step_fn.step(self._loss_fn(inputs, targets), targets), epoch, step)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """Hook after an epoch; returns extra summary.csv columns."""
        return {"skipped_steps": self.skipped_steps}

    def artifacts(self) -> dict[str, Any]:
        """Extra JSON files for the run directory, by file name."""
        if self.gradient_labels is None:
            return {}
        return {"groups.json": {"groups": [np.flatnonzero(self.gradient_labels == g).tolist()
                                           for g in range(int(self.gradient_labels.max()) + 1)],
                                "weights": [None if math.isnan(w) else w for w in self.step_fn.last_weights]}}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_fn.state_dict(),
                "gradient_labels": None if self.gradient_labels is None else self.gradient_labels.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_fn.load_state_dict(state["step"])
        if state.get("gradient_labels") is not None:
            self.gradient_labels = np.asarray(state["gradient_labels"], dtype=np.int64)
            self._install_gradient_groups()


class GroupedMethod(Method):
    """Methods with GKP (`gkp`, `gkp_<step>`) or the grouped step (`gsa`): memory bank, grouping, Fisher, and the
    Eq. 16 step."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        gcfg = self.cfg["groups"]
        self.memory_step = self.info.grouping == "memory"  # the step itself runs on the memory-based groups
        # one bank per run, on the main process: it groups and averages the anchors, the others get both broadcast
        self.bank = MemoryBank(self.data.num_classes, gcfg["bank_dtype"], gcfg["bank_spill_dir"]) \
            if self.acc.is_main_process else None
        self.bank_snapshots = 0  # the main bank's distinct snapshots, known on every process
        self.labels: np.ndarray | None = None
        self.anchors: torch.Tensor | None = None
        self.fisher: torch.Tensor | None = None
        self.group_epochs: list[int] = []
        self.alpha_history: list[float] = []
        self.quality: dict[str, list] = {"epochs": [], "q": []}
        self.rho_last: list[float] = []
        self.alpha = 1.0
        self._epoch_stats: dict[str, list[float]] = defaultdict(list)

    # ---- schedule ------------------------------------------------------------------------------------------
    def _grouping_due(self, epoch: int) -> bool:
        start, interval = self.cfg["groups"]["start_epoch"], self.cfg["groups"]["interval"]
        return epoch == start or (interval > 0 and epoch > start and (epoch - start) % interval == 0)

    def epoch_start(self, epoch: int) -> None:
        super().epoch_start(epoch)
        if self._grouping_due(epoch):
            # the bank, grouping and Fisher draw no random numbers from the training stream
            with self._own_rng():
                if not self.bank_snapshots:
                    self._update_bank(epoch - 1)
                self._regroup(epoch)
        if self.labels is not None:
            a = self.cfg["alpha"]
            # supplement Eq. 20 with t the epoch and T the total number of epochs
            self.alpha = equations.alpha_schedule(epoch, self.cfg["epochs"], a["start"], a["end"]) \
                if self.use_gkp else 1.0
            self.alpha_history.append(self.alpha)
        self._epoch_stats = defaultdict(list)

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
            q = feature_quality(feats, labels, self.data.num_classes, self.cfg["groups"]["quality_beta"])
            improved = self.bank.update(q, self.step_fn.flat.data[:self.step_fn.num_covered])
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

    def _group_sizes(self) -> tuple[list[int], list[int]]:
        return group_sizes(self.labels, self.data.train_counts)

    def _regroup(self, epoch: int) -> None:
        gcfg = self.cfg["groups"]
        dtype = DTYPES[self.cfg["gkp"]["state_dtype"]]
        labels = anchors = None
        if self.bank is not None:
            labels = compute_groups(self.bank, gcfg["num_groups"], self.data.train_counts, self.cfg["seed"])
            anchors = self.bank.anchors(labels, int(labels.max()) + 1, dtype=dtype).to(self.acc.device)
        self.labels, self.anchors = broadcast_groups(labels, anchors, self.data.num_classes, self.step_fn.num_covered,
                                                     dtype, self.acc.device)
        G = int(self.labels.max()) + 1
        self.group_epochs.append(epoch)
        faults.hit("grouping")
        classes, samples = self._group_sizes()
        if self.memory_step:
            self.step_fn.set_groups(self.labels, samples)
        if self.use_gkp:
            k = self.cfg["gkp"]
            if k["fisher"] != "ema":
                self.fisher = estimate_fisher(
                    self.model, self.criterion.classification_losses, self.data.train_eval, self.data.train_targets,
                    self.labels, self.anchors, is_classifier, self.cfg["data"]["eval_batch_size"], self.acc.device,
                    self.acc.autocast, k["fisher_batches"], estimate=k["fisher"], chunk=k["fisher_chunk"]).to(dtype)
            else:
                self.fisher = self.step_fn.track_fisher(k["fisher_ema"])
            self._install_gkp()
        _logger.info("groups at epoch %d: %s (classes per group %s)", epoch, G, classes)

    def _install_gkp(self) -> None:
        classes, samples = self._group_sizes()
        k = self.cfg["gkp"]
        self.step_fn.set_gkp(self.anchors, self.fisher,
                             gkp_strength(classes, samples, k["lam"], k["norm"]).to(self.acc.device), self.labels)

    # ---- steps ---------------------------------------------------------------------------------------------
    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        loss_fn = self._loss_fn(inputs, targets)
        if self.labels is None:  # before the first grouping: the grouped step's plain step, or the step without GKP
            stats = self.step_fn.plain_step(loss_fn, targets) if self.memory_step else self.step_fn.step(loss_fn, targets)
            return self._finish(stats, epoch, step)
        stats = self.step_fn.step(loss_fn, targets, alpha=self.alpha)
        if not stats.skipped:
            for key, values in (("loss", stats.group_loss), ("rho", stats.rho), ("cos", stats.cos),
                                ("ascent", stats.ascent)):
                for g, v in enumerate(values):
                    self._epoch_stats[f"{key}_g{g}"].append(v)
            self._epoch_stats["gkp"].append(stats.gkp)
            self._epoch_stats["gkp_grad_ratio"].append(stats.gkp_grad_ratio)
            if len(self.rho_last) != len(stats.rho):
                self.rho_last = [math.nan] * len(stats.rho)
            self.rho_last = [r if not math.isnan(r) else last for r, last in zip(stats.rho, self.rho_last)]
        return self._finish(stats, epoch, step)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        if (epoch + 1) % self.cfg["groups"]["eval_interval"] == 0:
            self._update_bank(epoch)
        row: dict[str, Any] = {"skipped_steps": self.skipped_steps,
                               "alpha": self.alpha if self.labels is not None else math.nan,
                               "num_groups": 0 if self.labels is None else int(self.labels.max()) + 1,
                               "bank_snapshots": self.bank_snapshots}
        # per realised group (none before grouping), the epoch mean over the steps where the group was in the batch
        for g in range(row["num_groups"]):
            for key in (f"loss_g{g}", f"rho_g{g}", f"cos_g{g}", f"ascent_g{g}"):
                vals = [v for v in self._epoch_stats.get(key, []) if not math.isnan(v)]
                row[key] = float(np.mean(vals)) if vals else math.nan
        for key in ("gkp", "gkp_grad_ratio"):
            vals = [v for v in self._epoch_stats.get(key, []) if not math.isnan(v)]
            row[key] = float(np.mean(vals)) if vals else math.nan
        return row

    def artifacts(self) -> dict[str, Any]:
        groups = [] if self.labels is None else [np.flatnonzero(self.labels == g).tolist()
                                                 for g in range(int(self.labels.max()) + 1)]
        return {
            "groups.json": {
                "groups": groups,
                "memory_bank": {"snapshots": len(self.bank.uids), "class_snapshot": list(self.bank.class_snapshot),
                                "bytes": self.bank.nbytes},
                "rho": [None if math.isnan(r) else r for r in self.rho_last], "alpha": self.alpha_history, "group_epochs": self.group_epochs},
            "quality.json": self.quality,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": None if self.bank is None else self.bank.state_dict(),
                "labels": None if self.labels is None else self.labels.tolist(),
                "anchors": None if self.anchors is None else self.anchors.cpu(),
                # the EMA Fisher is the step's own state (saved there): a second copy would double it on a GPU
                "fisher": None if self.fisher is None or self.cfg["gkp"]["fisher"] == "ema" else self.fisher.cpu(),
                "group_epochs": list(self.group_epochs), "alpha_history": list(self.alpha_history),
                "quality": self.quality, "rho_last": list(self.rho_last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        self.bank_snapshots = len({u for u in state["bank"]["class_snapshot"] if u >= 0})
        self.group_epochs = list(state["group_epochs"])
        self.alpha_history = list(state["alpha_history"])
        self.quality = state["quality"]
        self.rho_last = list(state["rho_last"])
        if state["labels"] is not None:
            self.labels = np.asarray(state["labels"], dtype=np.int64)
            self.anchors = state["anchors"].to(self.acc.device)
            if self.memory_step:  # before the step's state: a new grouping resets the step's per-group state
                self.step_fn.set_groups(self.labels, self._group_sizes()[1])
        super().load_state_dict(state)
        if self.cfg["gkp"]["fisher"] == "ema":
            self.fisher = self.step_fn.fisher_ema
        elif state["fisher"] is not None:
            self.fisher = state["fisher"].to(self.acc.device)
        if self.fisher is not None and self.labels is not None:
            self._install_gkp()


def create_method(cfg: dict[str, Any], model: nn.Module, criterion: nn.Module, data: LTData,
                  accelerator: Accelerator) -> Method:
    """The method object for `cfg["method"]`: `GroupedMethod` when it needs the memory-based groups."""
    cls = GroupedMethod if uses_memory_groups(cfg["method"]) else Method
    return cls(cfg, model, criterion, data, accelerator)
