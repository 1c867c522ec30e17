"""Training methods on top of a base loss: plain steps, SAM, and the paper's GKP / GSA (recipe key `method`).

`create_method` turns the recipe into one object with the hooks the engine calls: `epoch_start`, `train_step`,
`epoch_end`, `artifacts` and `state_dict`. The grouped method warms up with plain base steps, evaluates class
feature quality on the held-out validation split after every `groups.eval_interval` epochs to update the memory
bank, groups at `groups.start_epoch` (and every `groups.interval` epochs after), and then trains with Eq. 16.
Under several processes the bank is the main process's alone; the groups and anchors are broadcast from it
(lt_recipes.distributed) and the Fisher is estimated by all processes together.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from . import faults, reference
from .batchnorm import BNState
from .choices import GROUPED_METHODS, METHOD_MODULES
from .data import LTData
from .distributed import broadcast_groups, format_per_process, gather_counts
from .errors import NonFiniteError
from .gkp import estimate_fisher, gkp_strength
from .grouping import DTYPES, MemoryBank, compute_groups, feature_quality
from .gsa import SAM, GroupedSAM, LossScaler, StepStats, is_classifier
from .released import ReleasedGSA

_logger = logging.getLogger(__name__)


def create_grouped_step(cfg: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, perturb: bool = True,
                        **kw: Any) -> GroupedSAM | ReleasedGSA:
    """The step of a grouped method from the recipe: `gsa.step` grouped (GroupedSAM with the gsa.* options) or
    released (the authors' script's step); `kw` passes autocast, scaler, clip_grad."""
    g, G = cfg["gsa"], cfg["groups"]["num_groups"]
    if g["step"] == "released":
        return ReleasedGSA(model, optimizer, num_groups=G, z=0.1 if g["z"] is None else g["z"],
                           rho_clamp=(0.002, 0.003) if g["rho_clamp"] == "auto" else g["rho_clamp"], scale=g["scale"],
                           friendly_sigma=g["friendly_sigma"], friendly_momentum=g["friendly_momentum"],
                           backend=g["backend"], **kw)
    return GroupedSAM(model, optimizer, num_groups=G, direction=g["direction"], scale=g["scale"], z=g["z"],
                      rho_clamp=g["rho_clamp"], group_grads=g["group_grads"], perturbation=g["perturbation"],
                      group_weighting=g["group_weighting"], regularizer=g["regularizer"],
                      friendly_sigma=g["friendly_sigma"], friendly_momentum=g["friendly_momentum"],
                      group_grad_ema=g["group_grad_ema"], sync=g["sync"], perturb=perturb, backend=g["backend"], **kw)


def method_label(cfg: dict[str, Any]) -> str:
    """`<base>` or `<base>+<modules>`, with `@<direction>` when the paper's grouped step ascends along a non-default
    direction (the released step's direction is its own, named by its reading)."""
    modules = METHOD_MODULES[cfg["method"]]
    label = "+".join([cfg["loss"]["name"], *modules])
    if "gsa" in modules and cfg["gsa"]["step"] == "grouped" and cfg["gsa"]["direction"] != "gsa":
        label += f"@{cfg['gsa']['direction']}"
    return label


def index_inputs(inputs: torch.Tensor | list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The batch rows `idx` of an input tensor or of every view of a multi-view input."""
    if isinstance(inputs, (list, tuple)):
        return [x[idx] for x in inputs]
    return inputs[idx]


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


class Method:
    """Method `none`: one forward/backward of the base loss per step (Accelerate handles DDP and loss scaling)."""

    def __init__(self, cfg: dict[str, Any], model: nn.Module, criterion: nn.Module, data: LTData,
                 accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.model = model
        self.criterion = criterion
        self.data = data
        self.acc = accelerator
        self.skipped_steps = 0
        self.nonfinite_run = 0
        self.bn_state = BNState(model)

    def bind(self, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, val_loader: Any) -> None:
        """Attach the prepared (possibly DDP-wrapped) model, optimizer and validation loader."""
        self.ddp_model = ddp_model
        self.optimizer = optimizer
        self.val_loader = val_loader

    def epoch_start(self, epoch: int) -> None:
        """Hook before an epoch's first step."""

    def _nonfinite(self, epoch: int, step: int, where: str) -> None:
        self.skipped_steps += 1
        self.nonfinite_run += 1
        if self.nonfinite_run > self.cfg["max_nonfinite_steps"]:
            raise NonFiniteError(f"non-finite values in {where} for {self.nonfinite_run} steps in a row "
                                 f"(epoch {epoch}, step {step}); lower optim.lr or check the data")

    def base_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        self.bn_state.save()
        with self.acc.autocast():
            loss = self.criterion(self.ddp_model, inputs, targets)
        if not bool(torch.isfinite(loss.detach())):
            self.bn_state.restore()
            self.optimizer.zero_grad(set_to_none=False)
            self._nonfinite(epoch, step, "the base loss")
            return None
        self.acc.backward(loss)
        if self.cfg["optim"]["clip_grad"] is not None:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg["optim"]["clip_grad"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        if self.acc.optimizer_step_was_skipped:
            self._nonfinite(epoch, step, "the gradients (fp16 overflow)")
            return None
        self.nonfinite_run = 0
        return float(loss.detach())

    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        """One optimisation step; returns the batch loss, or None when the step was skipped."""
        return self.base_step(inputs, targets, epoch, step)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """Hook after an epoch; returns extra summary.csv columns."""
        return {"skipped_steps": self.skipped_steps}

    def artifacts(self) -> dict[str, Any]:
        """Extra JSON files for the run directory, by file name."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state["skipped_steps"])

    def _loss_fn(self, inputs: Any, targets: torch.Tensor):
        """Per-sample losses of the batch rows idx (the SAM-style steps' loss function)."""
        return lambda idx: self.criterion.per_sample(self.model, index_inputs(inputs, idx), targets[idx])

    def _finish(self, stats: StepStats, epoch: int, step: int) -> float | None:
        if stats.skipped:
            self._nonfinite(epoch, step, "the gradients of a SAM/GSA pass")
            return None
        self.nonfinite_run = 0
        return stats.loss


class SAMMethod(Method):
    """Method `sam`: plain SAM with radius `sam.rho` on the base loss (a baseline for GSA)."""

    def bind(self, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, val_loader: Any) -> None:
        super().bind(ddp_model, optimizer, val_loader)
        self.sam = SAM(self.model, _raw_optimizer(optimizer), rho=self.cfg["sam"]["rho"],
                       adaptive=self.cfg["sam"]["adaptive"], autocast=self.acc.autocast,
                       scaler=LossScaler(self.acc.mixed_precision == "fp16"), clip_grad=self.cfg["optim"]["clip_grad"])

    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        return self._finish(self.sam.step(self._loss_fn(inputs, targets), targets), epoch, step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scaler": self.sam.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sam.scaler.load_state_dict(state["scaler"])


class GroupedMethod(Method):
    """Methods `gkp`, `gsa`, `gkp_gsa`: memory bank, grouping, Fisher, and the Eq. 16 step via GroupedSAM."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        gcfg = self.cfg["groups"]
        self.use_gkp = "gkp" in METHOD_MODULES[self.cfg["method"]]
        self.use_gsa = "gsa" in METHOD_MODULES[self.cfg["method"]]
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

    def bind(self, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, val_loader: Any) -> None:
        super().bind(ddp_model, optimizer, val_loader)
        self.step_fn = create_grouped_step(
            self.cfg, self.model, _raw_optimizer(optimizer), perturb=self.use_gsa, autocast=self.acc.autocast,
            scaler=LossScaler(self.acc.mixed_precision == "fp16"), clip_grad=self.cfg["optim"]["clip_grad"])

    # ---- schedule ------------------------------------------------------------------------------------------
    def _grouping_due(self, epoch: int) -> bool:
        start, interval = self.cfg["groups"]["start_epoch"], self.cfg["groups"]["interval"]
        return epoch == start or (interval > 0 and epoch > start and (epoch - start) % interval == 0)

    def epoch_start(self, epoch: int) -> None:
        if self._grouping_due(epoch):
            # the bank, grouping and Fisher draw no random numbers from the training stream
            with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
                if not self.bank_snapshots:
                    self._update_bank(epoch - 1)
                self._regroup(epoch)
        if self.labels is not None:
            a = self.cfg["alpha"]
            # supplement Eq. 20 with t the epoch and T the total number of epochs
            self.alpha = reference.alpha_schedule(epoch, self.cfg["epochs"], a["start"], a["end"]) \
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
        G = int(self.labels.max()) + 1
        counts = np.asarray(self.data.train_counts)
        return ([int((self.labels == g).sum()) for g in range(G)],
                [int(counts[self.labels == g].sum()) for g in range(G)])

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
                             gkp_strength(classes, samples, k["lam"], k["norm"]).to(self.acc.device))

    # ---- steps ---------------------------------------------------------------------------------------------
    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        if self.labels is None:
            return self.base_step(inputs, targets, epoch, step)
        stats = self.step_fn.step(self._loss_fn(inputs, targets), targets, alpha=self.alpha)
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
                "quality": self.quality, "rho_last": list(self.rho_last), "step": self.step_fn.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
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
            self.step_fn.set_groups(self.labels, self._group_sizes()[1])
        self.step_fn.load_state_dict(state["step"])
        if self.cfg["gkp"]["fisher"] == "ema":
            self.fisher = self.step_fn.fisher_ema
        elif state["fisher"] is not None:
            self.fisher = state["fisher"].to(self.acc.device)
        if self.fisher is not None and self.labels is not None:
            self._install_gkp()


# The class of every recipe `method` (lt_recipes.choices.METHODS).
METHOD_CLASSES: dict[str, type[Method]] = {"none": Method, "sam": SAMMethod,
                                           **dict.fromkeys(GROUPED_METHODS, GroupedMethod)}


def create_method(cfg: dict[str, Any], model: nn.Module, criterion: nn.Module, data: LTData,
                  accelerator: Accelerator) -> Method:
    """The method object for `cfg["method"]`."""
    return METHOD_CLASSES[cfg["method"]](cfg, model, criterion, data, accelerator)
