"""The grouping cycle: the epoch-level driver of the memory bank, regrouping, anchors and Fisher (`GroupedMethod`).

A method that carries GKP or runs the grouped step warms up with its step without GKP (the grouped step: with the
plain step), evaluates class feature quality on the held-out validation split after every `groups.eval_interval`
epochs to update the memory bank (Eq. 1), groups at `groups.start_epoch` (and every `groups.interval` epochs after;
Eq. 2-3), takes every group's anchor from the bank and its Fisher (Eq. 6), installs both as the step's GKP term, and
then trains with Eq. 16. Under several processes the bank is the main process's alone; the groups and anchors are
broadcast from it (lt_recipes.distributed) and the Fisher is estimated by all processes together. A grouping may
yield fewer groups than asked (fewer classes or distinct bank snapshots than groups, empty clusters): `Groups`
(lt_recipes.grouping) holds the realised grouping, the one owner of the group count every step, table and artifact
reads, and the run says once in its log when it is below the asked count.

`state_parts` is the one home of the tensors a method's checkpoint holds: `GroupedMethod.state_dict` writes by it
and tools/checkpoint_size.py sizes it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from . import equations, faults
from .distributed import broadcast_groups, format_per_process, gather_counts
from .equations import feature_quality
from .gkp import estimate_fisher, gkp_strength
from .grouping import DTYPES, Groups, MemoryBank, compute_groups, say_fewer_groups
from .method import Method
from .models import is_classifier
from .sections import Recipe
from .steps import split_method, uses_memory_groups

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatePart:
    """One tensor of a method's checkpoint state: `rows` x `cols` numbers (each a size named in `StatePart.nbytes`:
    groups, snapshots, classes, covered, params, one) of the dtype named by `dtype` (a recipe key holding a dtype
    name, e.g. `gkp.state_dtype`, or a torch dtype name)."""

    rows: str
    cols: str
    dtype: str

    def nbytes(self, recipe: Recipe, sizes: Mapping[str, int]) -> int:
        """Its bytes for `sizes` (the counts its rows and columns name)."""
        if "." in self.dtype:
            section, key = self.dtype.split(".")
            itemsize = DTYPES[getattr(getattr(recipe, section), key)].itemsize
        else:
            itemsize = getattr(torch, self.dtype).itemsize
        return sizes[self.rows] * sizes[self.cols] * itemsize


def state_parts(recipe: Recipe) -> dict[str, tuple[StatePart, ...]]:
    """The tensors a method's checkpoint holds under `recipe`, by part (none without the memory-based groups): the
    memory bank (its per-class quality and, unless spilled, its snapshots of the covered parameters), GKP's anchors
    and exact Fisher rows, and the grouped steps' per-group state (the EMA Fisher, FriendlySAM momenta, the
    group-gradient EMA), all as the grouping cycle and the steps save them."""
    if not uses_memory_groups(recipe.method):
        return {}
    step, gkp = split_method(recipe.method)
    k, gsa = recipe.gkp, recipe.gsa
    bank = (StatePart("classes", "one", "float64"),)
    if not recipe.groups.bank_spill_dir:
        bank += (StatePart("snapshots", "covered", "groups.bank_dtype"),)
    parts = {"bank": bank, "anchors": (StatePart("groups", "covered", "gkp.state_dtype"),)}
    if gkp and k.fisher != "ema":
        parts["fisher"] = (StatePart("groups", "covered", "gkp.state_dtype"),)
    if gkp and k.fisher == "ema":
        parts["fisher_ema"] = (StatePart("groups", "covered", "float32"),)
    if step == "released" or step == "gsa" and gsa.direction == "friendly":  # the released step ascends friendly
        parts["friendly_momentum"] = (StatePart("groups", "params", "float32"),)
    if step == "gsa" and gsa.group_grad_ema > 0:
        parts["grad_ema"] = (StatePart("groups", "params", "float32"),)
    return parts


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
        self._fewer_groups_said = False
        self.memory_groups: Groups | None = None
        self.anchors: torch.Tensor | None = None
        self.fisher: torch.Tensor | None = None
        self.group_epochs: list[int] = []
        self.alpha_history: list[float] = []
        self.quality: dict[str, list] = {"epochs": [], "q": []}
        self.rho_last: torch.Tensor | list[float] = []
        self.alpha = 1.0
        self._epoch_stats = EpochMeans()

    def _realised(self, groups: Groups, asked: int, where: str) -> Groups:
        """`groups`, said once per run in the log (by the main process) when it has fewer groups than asked."""
        if groups.count < asked and not self._fewer_groups_said and self.acc.is_main_process:
            say_fewer_groups(where, groups, asked, self.data.num_classes,
                             f"{self.bank_snapshots} distinct bank snapshots")
            self._fewer_groups_said = True
        return groups

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
                # the EMA Fisher: GKP's term keeps it from the grouped step's group gradients (a new grouping
                # with as many groups keeps the rows it has)
                same = self.fisher is not None and self.fisher.shape[0] == self.memory_groups.count
                self.fisher = self.fisher if same else \
                    self.step_fn.covered.new_zeros(self.memory_groups.count, self.step_fn.num_covered)
            self._install_gkp()
        _logger.info("groups at epoch %d: %s (classes per group %s)", epoch, self.memory_groups.count,
                     list(self.memory_groups.classes))

    def _install_gkp(self) -> None:
        groups, k = self.memory_groups, self.recipe.gkp
        self.step_fn.set_gkp(self.anchors, self.fisher,
                             gkp_strength(groups.classes, groups.samples, k.lam, k.norm).to(self.acc.device),
                             groups.of_class, k.fisher_ema if k.fisher == "ema" else None)

    # ---- steps ---------------------------------------------------------------------------------------------
    def train_step(self, inputs: Any, targets: torch.Tensor, epoch: int, step: int) -> float | None:
        loss_fn = self._loss_fn(inputs, targets)
        if self.memory_groups is None:  # before the first grouping: the grouped step's plain step, or without GKP
            warm_up = self.step_fn.plain_step if self.memory_step else self.step_fn.step
            return self._finish(warm_up(loss_fn, targets), epoch, step)
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
                # the layout's own Fisher only: the EMA Fisher is the step's state (saved there, not twice)
                "fisher": self.fisher.cpu() if self.fisher is not None and "fisher" in state_parts(self.recipe)
                else None,
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
            self.fisher = None if state["step"]["fisher_ema"] is None else \
                state["step"]["fisher_ema"].to(self.acc.device)
        elif state["fisher"] is not None:
            self.fisher = state["fisher"].to(self.acc.device)
        if self.fisher is not None and self.memory_groups is not None:
            self._install_gkp()
