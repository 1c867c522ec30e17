"""The step core every training step runs on: flat parameters, one loss scale, DDP reduction, clipping, skipping.

A step (SAM, ImbSAM, the grouped step, the plain step, ...) is a small class on `StepCore` that saves theta, runs
its passes through `_backward` (the loss times the current loss scale) and ends with `_finish`, which owns
everything the passes share:

- the parameters and their gradients are views into one flat buffer each (lt_recipes.flat): a perturbation is one
  vector operation, and group gradients can land in rows of a [G, d] buffer;
- mixed precision: one dynamic loss scale for fp16 (`LossScaler`), none for bf16 or fp32;
- DDP: the steps forward the unwrapped model, so no pass synchronises by itself; each step weighs its losses so that
  the sum over ranks is the global batch's gradient, and `_finish` all-reduces the update gradient once (a step that
  needs a synchronised ascent direction all-reduces it once too);
- clipping of the update gradient, and skipping a step whose gradient is not finite, with one skip counter: the one
  host synchronisation every step makes (lt_recipes.host_sync; everything else a step computes, its statistics
  included, stays on the device);
- GKP (Eq. 6), the one term every step carries the same way (`gkp.GKPTerm`, installed by `set_gkp`): `_finish`
  adds its gradient (`_add_gkp`), weighted (1 - alpha) sum_{g != j} w_g as in Eq. 16, and the task gradient is
  weighted alpha.

A loss function `loss_fn(idx)` returns the per-sample losses of the batch rows `idx`, in that order, whose mean over
the whole batch is the batch loss (lt_recipes.losses.LTLoss.per_sample).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import equations
from ..batchnorm import BNState
from ..distributed import world_size
from ..errors import ModelError
from ..flat import FlatParams
from ..gkp import GKPTerm, check_gkp_state
from ..models import head_rule, ordered_parameters

_logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], torch.Tensor]

# torch.compile backends that run the traced graphs with ATen's own ops: a second backward through one of their
# graphs (retain_graph) is exact. Inductor's is not: it stops on its donated buffers or, with those off, returns wrong
# gradients from the second backward on (measured on the CPU: relative error 0.5 to 2 in the group-gradient rows).
RETAIN_SAFE_BACKENDS = ("aot_eager", "eager")
RETAINED_GRAPH = ("it differentiates one forward pass more than once (retain_graph), and a second backward through an "
                  "inductor-compiled graph returns wrong gradients (or stops on its donated buffers)")


class LossScaler:
    """Dynamic fp16 loss scale shared by every pass: halve on overflow, double after `growth_interval` clean steps."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale /= 2.0
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes in place (nothing with one)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


@dataclass
class StepStats:
    """What one step measured: mean base loss at theta (all, per group); per group the radius, cos(g_g, g) and the
    rise of the group's loss in the perturbed pass over its loss at theta; the GKP value and ||grad GKP|| /
    ||grad task|| of the update; the skip flag. Ungrouped steps report one group, the whole batch. A per-group entry
    is NaN for a group absent from the batch (no samples, so nothing measured: skip it with math.isnan; summary.csv
    averages each group over the steps it was present in).

    A step leaves its measurements on the device (0-dim and [G] tensors; reading them would wait for the device);
    `host()` reads them all in one transfer, for a caller that wants them now rather than at its log interval."""

    loss: torch.Tensor | float = math.nan
    group_loss: torch.Tensor | list[float] = field(default_factory=list)
    rho: torch.Tensor | list[float] = field(default_factory=list)
    cos: torch.Tensor | list[float] = field(default_factory=list)
    ascent: torch.Tensor | list[float] = field(default_factory=list)
    gkp: torch.Tensor | float = 0.0
    gkp_grad_ratio: torch.Tensor | float = math.nan
    skipped: bool = False

    FIELDS = ("loss", "group_loss", "rho", "cos", "ascent", "gkp", "gkp_grad_ratio")

    def host(self) -> "StepStats":
        """The same statistics as Python floats and lists, read from the device in one transfer."""
        values = [getattr(self, f) for f in self.FIELDS]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors]).tolist() if tensors else []
        out, at = {}, 0
        for f, v in zip(self.FIELDS, values):
            if isinstance(v, torch.Tensor):
                n = v.numel()
                out[f] = flat[at] if v.dim() == 0 else flat[at:at + n]
                at += n
            else:
                out[f] = list(v) if isinstance(v, list) else v
        return StepStats(**out, skipped=self.skipped)


@dataclass(frozen=True)
class TrainingRun:
    """What a step may read from the training run before its first step (`StepCore.prepare`): the training images
    with the test-time transform (`dataset`, yielding (image, label)) and their labels (`targets`), the training
    images per class, the base's per-sample classification loss on logits, the evaluation batch size, the device,
    the run's seed and loader settings (workers, pinned memory), and whether this process speaks for the run."""

    dataset: Any
    targets: Sequence[int]
    class_counts: Sequence[int]
    head_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    device: torch.device
    seed: int = 0
    loader_kw: Mapping[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


def sample_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """How many entries of `index` hold each value 0..size-1, float64 on the device (a bincount that, unlike
    torch.bincount, needs no host read to size its output)."""
    ones = torch.ones_like(index, dtype=torch.float64)
    return torch.zeros(size, dtype=torch.float64, device=index.device).index_add_(0, index, ones)


def upcast(losses: torch.Tensor) -> torch.Tensor:
    """Per-sample losses in at least float32 (autocast's half-precision losses are summed in float32)."""
    return losses if losses.dtype in (torch.float32, torch.float64) else losses.float()


def usable(norm: torch.Tensor) -> torch.Tensor:
    """Whether a norm can be divided by (positive and finite), as a device tensor: the steps decide with it on the
    device (torch.where) instead of reading it on the host."""
    return (norm > 0) & torch.isfinite(norm)


def sam_perturbation(grad: torch.Tensor, theta: torch.Tensor, rho: float, adaptive: bool) -> torch.Tensor:
    """SAM's eps = rho g / ||g||, or ASAM's rho T^2 g / ||T g|| with T = |theta|; zero when the norm is zero."""
    scaled = theta * grad if adaptive else grad
    norm = torch.linalg.vector_norm(scaled)
    return (theta * scaled if adaptive else grad) * torch.where(usable(norm), rho / norm, 0.0)


class StepCore:
    """The machinery every step shares (module docstring). Subclasses implement `step(loss_fn, targets, alpha)`:
    `alpha` in [0, 1] weighs the task gradient against GKP's (1 - alpha), Eq. 16 (1: no GKP).

    A step on groups learns their number from `set_groups` only (the grouping is its one owner); a step that keeps a
    gradient row per group (`rows_per_group`) sizes its rows there.
    """

    rows_per_group = False
    retains_graph = False  # some pass differentiates one forward more than once (compile_refusal)

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, num_rows: int = 0,
                 is_excluded: Callable[[str], bool] | None = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, scaler: LossScaler | None = None,
                 clip_grad: float | None = None, backend: str = "auto") -> None:
        """`num_rows` gradient rows (a step's per-group or scratch gradients), `is_excluded` the head rule (None:
        `models.head_rule`), `autocast` and `scaler` the mixed precision, `clip_grad` the update's norm clip, `backend`
        the fused ops' (recipe key gsa.backend). The defaults are written here, not read from the recipe schema;
        tests/test_sections.py checks them against it."""
        self.model = model
        self.base_optimizer = base_optimizer
        covered, rest = ordered_parameters(model, is_excluded or head_rule(model))  # the head last, not covered
        self.num_covered = sum(p.numel() for p in covered)
        head = [n for n, p in model.named_parameters() if any(p is q for q in rest)]
        _logger.info("%s covers %d parameter tensors (%d values) and leaves out the head: %s", type(self).__name__,
                     len(covered), self.num_covered, ", ".join(head) or "none")
        self.flat = FlatParams(covered + rest, num_rows=num_rows)
        self.base = torch.empty_like(self.flat.data)
        self.autocast = autocast
        self.scaler = scaler or LossScaler(False)
        self.clip_grad = clip_grad
        self.backend = backend
        self.skipped_steps = 0
        self.bn_at_start = BNState(model)
        self.bn_scratch = BNState(model)
        self.group_of_class: torch.Tensor | None = None
        self.group_sizes: list[int] = []
        self.counts: torch.Tensor | None = None  # the last batch's samples per group over all ranks, on the device
        self.gkp: GKPTerm | None = None  # GKP (Eq. 6), installed by set_gkp
        self.gkp_grad: torch.Tensor | None = None  # GKP's gradient over the covered parameters (a scratch buffer)

    def compile_refusal(self, backend: str) -> str | None:
        """Why this step cannot run on a model whose forward torch.compile compiled with `backend` (recipe key
        model.compile): a pass it cannot make exact, or a forward that recompiles on every batch; None when it
        runs exactly."""
        return RETAINED_GRAPH if self.retains_graph and backend not in RETAIN_SAFE_BACKENDS else None

    @property
    def d(self) -> int:
        return self.flat.numel

    @property
    def covered(self) -> torch.Tensor:
        """The covered parameters as one flat vector [num_covered] (a view, in `named_parameters` order, the head
        left out): what `MemoryBank.update` snapshots and what GKP's anchors and Fisher rows are laid out like."""
        return self.flat.data[:self.num_covered]

    @property
    def num_groups(self) -> int:
        """The groups installed by `set_groups` (0 before)."""
        return len(self.group_sizes)

    def prepare(self, run: TrainingRun) -> None:
        """Hook before a training run's first step (lt_recipes.method): a step that needs the run's data forms what
        it needs here (GBG its groups); the others need nothing."""

    def artifacts(self) -> dict[str, Any]:
        """Extra JSON files for the run directory, by file name, that the step itself produces (none)."""
        return {}

    # ---- groups and GKP --------------------------------------------------------------------------------------
    def set_groups(self, group_of_class: Sequence[int] | torch.Tensor, group_sizes: Sequence[int]) -> None:
        """Install a grouping: group id of every class and the number of training samples n_g of every group (GKP's
        weights; the grouped steps' own groups)."""
        self.group_of_class = torch.as_tensor(group_of_class, dtype=torch.long, device=self.flat.data.device)
        self.group_sizes = [int(n) for n in group_sizes]
        if self.rows_per_group and self.flat.rows.shape[0] != self.num_groups:
            self.flat.resize_rows(self.num_groups)

    def set_gkp(self, anchors: torch.Tensor, fisher: torch.Tensor, strength: torch.Tensor,
                group_of_class: Sequence[int] | torch.Tensor | None = None, fisher_ema: float | None = None) -> None:
        """Install GKP (`gkp.GKPTerm`) over the covered parameters: group j's term is strength_j sum_i F_ji (theta_i -
        a_ji)^2, with strength_j = (lambda / 2) / |G_j| (Eq. 6); every step weighs it by (1 - alpha) sum_{g != j}
        w_g (Eq. 16), w_g the batch share of GKP's group g (`group_of_class`; None: the step's own groups of
        `set_groups`).

        anchors and fisher are [G, num_covered]: row j over the covered parameters flattened in `named_parameters`
        order (as `covered`), float32 (or the parameters' dtype; bf16/fp16 to halve their memory); strength is [G]
        (`gkp.gkp_strength`). Wrong shapes or dtypes are a ValueError here, naming the expected shape; the tensors
        are moved to the parameters' device. With `fisher_ema` (a decay), a step with group gradients keeps `fisher`
        as their squared EMA (GroupedSAM; gkp.fisher=ema)."""
        check_gkp_state(anchors, fisher, strength, self.num_covered, self.flat.data.dtype)
        device = self.flat.data.device
        groups = group_of_class if group_of_class is not None else self.group_of_class
        top = None if groups is None else int(torch.as_tensor(groups).max())
        if top is not None and top >= anchors.shape[0]:
            raise ValueError(f"set_gkp: group ids up to {top} but {anchors.shape[0]} anchor rows (one per group)")
        self.gkp = GKPTerm(anchors.to(device), fisher.to(device), strength.to(device),
                           None if group_of_class is None else
                           torch.as_tensor(group_of_class, dtype=torch.long, device=device), fisher_ema)

    def group_counts(self, targets: torch.Tensor, reduce: bool = True) -> tuple[torch.Tensor, list[int], list[float]]:
        """Group of every sample, local samples per group, and samples per group over all ranks (with `reduce`; the
        device copy stays in `self.counts`). The grouped steps' one host synchronisation before their passes: the
        counts decide which groups get a pass and how the batch is cut."""
        if self.group_of_class is None:
            raise RuntimeError(f"{type(self).__name__}.step needs set_groups(group_of_class, group_sizes) first; until "
                               "the classes are grouped, train with its plain_step(loss_fn, targets) (the base loss's "
                               "own step, as the recipes' warm-up does)")
        gid = self.group_of_class[targets]
        both = sample_counts(gid, len(self.group_sizes)).expand(2, -1).clone()
        if reduce:
            all_reduce_(both[1])
        self.counts = both[1]
        local, counts = both.tolist()
        return gid, [int(c) for c in local], counts

    def batch_shares(self, targets: torch.Tensor) -> torch.Tensor | None:
        """The batch share |D_g| / |D| of every GKP group over all ranks, the w_g GKP is weighted with (None without
        GKP), on the device."""
        if self.gkp is None:
            return None
        groups = self.group_of_class if self.gkp.group_of_class is None else self.gkp.group_of_class
        counts = sample_counts(groups[targets], self.gkp.num_groups)
        return equations.group_weights("samples", all_reduce_(counts))

    def _add_gkp(self, alpha: float, weights: torch.Tensor, stats: StepStats | None = None,
                 at: torch.Tensor | None = None) -> torch.Tensor:
        """GKP's one path into a step: its value at the covered parameters (`at`, default the current weights) with
        group j weighted (1 - alpha) sum_{g != j} w_g (`weights`: the groups' weights in the update), its gradient
        added to the gradient buffer; with `stats`, ||grad GKP|| / ||grad task|| recorded before (NaN for a zero task
        gradient). Returns GKP's value (0-dim, on the device)."""
        n = self.num_covered
        if self.gkp_grad is None:
            self.gkp_grad = torch.zeros(n, dtype=self.flat.grad.dtype, device=self.flat.grad.device)
        self.gkp_grad.zero_()
        value = self.gkp.penalty(self.flat.data[:n] if at is None else at, self.gkp.coefficients(alpha, weights),
                                 self.gkp_grad, self.backend)
        if stats is not None:
            task = torch.linalg.vector_norm(self.flat.grad)
            stats.gkp_grad_ratio = torch.where(task > 0, torch.linalg.vector_norm(self.gkp_grad) / task, math.nan)
        self.flat.grad[:n].add_(self.gkp_grad)
        return value

    # ---- passes ----------------------------------------------------------------------------------------------
    def _begin(self) -> None:
        """Remember theta and the BatchNorm statistics, to restore after a perturbed pass or a skipped step; refuse a
        model whose parameters were re-allocated after the step was built (the step would update its flat buffer,
        not them)."""
        if not self.flat.attached():
            detached = self.flat.detached()
            shapes = ", ".join(str(list(self.flat.params[i].shape)) for i in detached[:4])
            raise ModelError(f"{type(self).__name__}: {len(detached)} parameters (shapes {shapes}"
                             f"{' ...' if len(detached) > 4 else ''}) no longer live in the step's flat buffer: the "
                             "model was converted after the step was built (model.to(memory_format=...), to another "
                             "dtype or device), so the step's updates would not reach them; convert it first "
                             "(recipe key model.channels_last does so before the step is built)")
        self.base.copy_(self.flat.data)
        self.bn_at_start.save()

    def _backward(self, loss: torch.Tensor, weight: float, retain_graph: bool = False) -> None:
        """Backward of `weight` x `loss` at the current loss scale, accumulated into the gradient buffer."""
        (loss * (weight * self.scaler.scale)).backward(retain_graph=retain_graph)

    def _unscale(self, grad: torch.Tensor) -> bool:
        """Unscale a gradient in place; whether it is finite."""
        if self.scaler.scale != 1.0:
            grad.div_(self.scaler.scale)
        return bool(torch.isfinite(grad).all())

    def _finish(self, stats: StepStats, alpha: float = 1.0, gkp_weights: torch.Tensor | None = None,
                reduced: bool = False, extra: Callable[[], torch.Tensor] | None = None,
                weighted: bool = False, gkp_at: torch.Tensor | None = None) -> StepStats:
        """Restore theta, reduce and unscale the update gradient (unless `reduced`: the step did both), skip on
        inf/NaN, weigh it by `alpha` (unless `weighted`: the step's passes did), add GKP (`_add_gkp`, with the group
        weights `gkp_weights`, at theta or at the covered point `gkp_at`) and `extra` terms, clip, step."""
        self.flat.data.copy_(self.base)
        grad = self.flat.grad
        finite = self._unscale(all_reduce_(grad)) if not reduced else bool(torch.isfinite(grad).all())
        if not finite:
            return self._skip(stats)
        if alpha != 1.0 and not weighted:
            grad.mul_(alpha)
        if self.gkp is not None and gkp_weights is not None:
            stats.gkp = self._add_gkp(alpha, gkp_weights, stats, gkp_at)
        if extra is not None:
            stats.gkp += extra()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([grad], self.clip_grad)
        self.base_optimizer.step()
        grad.zero_()
        self.scaler.update(False)
        return stats

    def _skip(self, stats: StepStats) -> StepStats:
        """An overflow in any pass skips the whole step: weights and BatchNorm statistics restored, gradients
        dropped, loss scale halved, the one skip counter raised."""
        self.flat.data.copy_(self.base)
        self.bn_at_start.restore()
        self.flat.grad.zero_()
        self.scaler.update(True)
        self.skipped_steps += 1
        stats.skipped = True
        _logger.debug("non-finite gradient: step skipped (loss scale now %g)", self.scaler.scale)
        return stats

    def plain_step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """The base loss's own step on the core: one forward and backward at theta (GKP added when installed)."""
        stats = StepStats()
        self._begin()
        with self.autocast():
            loss = upcast(loss_fn(torch.arange(len(targets), device=targets.device))).mean()
        self._backward(loss, 1.0 / world_size())
        stats.loss = loss.detach()
        return self._finish(stats, alpha, self.batch_shares(targets))

    def _group_rows(self, losses: torch.Tensor, gid: torch.Tensor, local: list[int], counts: torch.Tensor) -> None:
        """Row g of the rows = the gradient of sum_{i in D_g} l_i / |D_g| (the masked share of the losses): one
        backward per group present in this rank's batch through the one graph of `losses`, |D_g| the group's count
        over all ranks (`counts`, on the device). Each backward lands in the (zero) gradient buffer, which is moved
        to its row: the parameters' `.grad` keep pointing at the one buffer."""
        flat = self.flat
        mine = [g for g, n in enumerate(local) if n > 0]
        for k, g in enumerate(mine):
            self._backward((losses * (gid == g)).sum() / counts[g], 1.0, retain_graph=k + 1 < len(mine))
            flat.rows[g].copy_(flat.grad)
            flat.grad.zero_()

    def _group_means(self, losses: torch.Tensor, gid: torch.Tensor, counts: torch.Tensor,
                     sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of per-sample `losses` per group (NaN for an absent group) and over the batch, over all ranks with
        `sync`, on the device (float64); `counts` the groups' samples over all ranks."""
        sums = torch.zeros(len(counts), dtype=torch.float64, device=losses.device)
        sums.index_add_(0, gid, losses.detach().double())
        if sync:
            all_reduce_(sums)
        means = torch.where(counts > 0, sums / counts, math.nan)
        return means, sums.sum() / counts.sum().clamp_min(1.0)

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the loss scale and the skip count (steps with state add theirs)."""
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state["skipped_steps"])
