"""SAM and Grouped Sharpness-Aware minimization (SPEC.md section 4) as optimizer-style step wrappers.

Both work on a flattened copy-free view of the parameters (lt_recipes.flat), so every vector operation is one
pass over one buffer, and the per-group backward passes write straight into rows of a [G, d] buffer.
`GroupedSAM.step` does the whole paper step: exact per-group gradients from forward/backward passes over each
group's subset of the batch (one full batch of work in total), the global gradient as their sample-weighted sum,
the projection (Eq. 12), radius (Eq. 13) and perturbation (Eq. 14), the perturbed group losses (Eq. 15, one more
batch of work), weights restored, the GKP gradient (Eq. 6) added, and the base optimizer step. So it costs about
what SAM costs: two passes, not G + 1.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .reference import PARALLEL_TOL
from .flat import FlatParams

_logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], torch.Tensor]


class LossScaler:
    """Dynamic fp16 loss scale shared by both passes: halve on overflow, double after `growth_interval` clean steps."""

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


class BNState:
    """A copy of every BatchNorm running statistic, to put back after a pass that must leave them untouched.

    Momentum 0 is not enough: 0 * NaN is NaN, so one non-finite forward would poison the running statistics.
    """

    def __init__(self, model: nn.Module) -> None:
        self.live = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.live]

    def save(self) -> None:
        for s, b in zip(self.saved, self.live):
            s.copy_(b)

    def restore(self) -> None:
        for s, b in zip(self.saved, self.live):
            b.copy_(s)


def _tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension of a BatchNorm input except the channels (dim 1): what its statistics reduce over."""
    return [d for d in range(x.dim()) if d != 1]


class FullBatchBNStats:
    """BatchNorm running statistics of the whole batch from passes over its group subsets.

    Left alone, each group's pass would move the running statistics towards that group's own statistics (the last,
    a tail group of a few samples of one class, weighing most), which breaks evaluation. While collecting, momentum
    is 0 and a pre-hook sums every BatchNorm input per channel; `apply` then makes the one momentum update that a
    full-batch forward would make, with the batch's mean and unbiased variance.
    """

    def __init__(self, model: nn.Module) -> None:
        self.bns = _tracked_batchnorms(model)
        self.sums: dict[int, list] = {}

    def _hook(self, bn: nn.Module, args: tuple) -> None:
        if not bn.training:
            return
        x = args[0].detach().float()
        dims = _channel_dims(x)
        acc = self.sums.setdefault(id(bn), [0.0, 0.0, 0])
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] += x.numel() // x.shape[1]

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        self.sums = {}
        momenta = [m.momentum for m in self.bns]
        handles = [m.register_forward_pre_hook(self._hook) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, mom in zip(self.bns, momenta):
                m.momentum = mom

    @torch.no_grad()
    def apply(self) -> None:
        """One running-statistics update per BatchNorm layer with the collected whole-batch mean and variance."""
        for m in self.bns:
            acc = self.sums.get(id(m))
            if acc is None or acc[2] < 2:
                continue
            s1, s2, n = acc
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0) * (n / (n - 1))
            m.num_batches_tracked.add_(1)
            mom = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - mom).add_(mean.to(m.running_mean.dtype), alpha=mom)
            m.running_var.mul_(1 - mom).add_(var.to(m.running_var.dtype), alpha=mom)


class RecordedBNStats:
    """Group passes normalised with the statistics of a whole-batch forward (`gsa.bn_stats: batch | batch_theta`).

    `record` wraps a no-grad forward of the whole batch in training mode: every BatchNorm call's batch mean and biased
    variance are kept, in call order. Inside `use`, which wraps one group pass, BatchNorm layers run in eval mode and
    the k-th call of a layer normalises with its k-th recorded statistics, held constant (no gradient flows through
    them): a group's samples are normalised as in the whole-batch forward, instead of with the statistics of the
    group's few samples (`gsa.bn_stats: group`, the literal per-subset loss).
    """

    def __init__(self, model: nn.Module) -> None:
        self.bns = _tracked_batchnorms(model)
        self.stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.calls: dict[int, int] = {}

    def _record(self, bn: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        var, mean = torch.var_mean(x, dim=_channel_dims(x), correction=0)
        self.stats.setdefault(id(bn), []).append((mean, var))

    def _use(self, bn: nn.Module, args: tuple) -> None:
        recorded = self.stats.get(id(bn))
        if not recorded:
            raise RuntimeError("gsa.bn_stats: a BatchNorm layer ran in a group pass but not in the whole-batch forward")
        k = self.calls.get(id(bn), 0)
        mean, var = recorded[min(k, len(recorded) - 1)]
        self.calls[id(bn)] = k + 1
        bn.running_mean, bn.running_var = mean.to(bn.running_mean.dtype), var.to(bn.running_var.dtype)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.stats = {}
        handles = [m.register_forward_pre_hook(self._record) for m in self.bns if m.training]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Wrap one group pass's forward (the backward may run outside: it keeps the tensors it normalised with)."""
        saved = [(m.running_mean, m.running_var, m.training) for m in self.bns]
        handles = [m.register_forward_pre_hook(self._use) for m in self.bns]
        self.calls = {}
        for m in self.bns:
            m.eval()
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, (mean, var, training) in zip(self.bns, saved):
                m.running_mean, m.running_var = mean, var
                m.train(training)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, state: BNState | None = None) -> Iterator[None]:
    """BatchNorm running statistics untouched by a perturbed pass, as usual for SAM: momentum 0 inside, and the
    saved values put back on exit. Wrap the backward passes too: BatchNorm's backward checks that the statistics
    it saved were not modified in between."""
    state = state or BNState(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    state.save()
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        state.restore()


@contextlib.contextmanager
def few_sample_safe(model: nn.Module, batch_size: int, min_samples: int = 2) -> Iterator[None]:
    """A pass over fewer than `min_samples` samples uses BatchNorm running statistics.

    BatchNorm1d heads cannot normalise a batch of one, and the batch statistics of a few samples of one tail class
    have a near-zero variance whose gradients blew Fashion-MNIST-LT runs up (`gsa.bn_min_samples`).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if batch_size >= max(min_samples, 2) or not bns:
        yield
        return
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.train()


BN_STATS = ("group", "batch", "batch_theta")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t)
    return t


def ordered_parameters(model: nn.Module,
                       is_excluded: Callable[[str], bool]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split into the GKP-covered ones (encoder and heads) and the excluded ones (classifier)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in named if not is_excluded(n)], [p for n, p in named if is_excluded(n)]


def _cosine(coef: float, res_norm: float, glob_norm: float) -> float:
    """cos(g_g, g) from the projection coefficient and residual: ||g_g||^2 = res^2 + coef^2 ||g||^2."""
    along = coef * glob_norm
    norm = math.sqrt(res_norm ** 2 + along ** 2)
    return along / norm if norm > 0 else 0.0


@dataclass
class StepStats:
    """What one step measured: mean base loss at theta per group, radius per group, GKP value, skip flag."""

    loss: float = math.nan
    group_loss: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)
    gkp: float = 0.0
    skipped: bool = False


class _FlatStep:
    """Shared machinery: flattened parameters, loss scaling, restore-before-step, gradient reduction."""

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, num_rows: int,
                 is_excluded: Callable[[str], bool] = lambda name: name.startswith("classifier."),
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, scaler: LossScaler | None = None,
                 clip_grad: float | None = None, backend: str = "auto") -> None:
        self.model = model
        self.base_optimizer = base_optimizer
        covered, rest = ordered_parameters(model, is_excluded)
        self.num_covered = sum(p.numel() for p in covered)
        self.flat = FlatParams(covered + rest, num_rows=num_rows)
        self.base = torch.empty_like(self.flat.data)
        self.autocast = autocast
        self.scaler = scaler or LossScaler(False)
        self.clip_grad = clip_grad
        self.backend = backend
        self.skipped_steps = 0
        self.bn_at_start = BNState(model)
        self.bn_scratch = BNState(model)
        self.bn_batch = FullBatchBNStats(model)

    @property
    def d(self) -> int:
        return self.flat.numel

    def _backward(self, loss: torch.Tensor, weight: float) -> None:
        (loss * (weight * self.scaler.scale)).backward()

    def _finish(self, stats: StepStats, extra_grad: Callable[[], float] | None = None) -> StepStats:
        """Restore theta, reduce and unscale the update gradient, skip on inf/NaN, add extra terms, step."""
        self.flat.data.copy_(self.base)
        grad = self.flat.grad
        _all_reduce_(grad)
        if self.scaler.scale != 1.0:
            grad.div_(self.scaler.scale)
        if not bool(torch.isfinite(grad).all()):
            return self._skip(stats)
        if extra_grad is not None:
            stats.gkp = extra_grad()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([grad], self.clip_grad)
        self.base_optimizer.step()
        grad.zero_()
        self.scaler.update(False)
        return stats

    def _skip(self, stats: StepStats) -> StepStats:
        """An overflow in either pass skips the whole step: weights and BatchNorm statistics restored, gradients
        dropped, loss scale halved."""
        self.flat.data.copy_(self.base)
        self.bn_at_start.restore()
        self.flat.grads_to_main()
        self.flat.grad.zero_()
        self.scaler.update(True)
        self.skipped_steps += 1
        stats.skipped = True
        _logger.debug("non-finite gradient: step skipped (loss scale now %g)", self.scaler.scale)
        return stats


class SAM(_FlatStep):
    """Sharpness-Aware Minimization (Foret et al.): ascend to theta + rho g/||g||, take the gradient there, step from theta.

    The ascent gradient is each replica's own (as common for SAM under DDP); the update gradient is averaged.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, **kw: Any) -> None:
        super().__init__(model, base_optimizer, num_rows=0, **kw)
        self.rho = rho

    def step(self, loss_fn: LossFn, targets: torch.Tensor) -> StepStats:
        idx = torch.arange(len(targets), device=targets.device)
        stats = StepStats()
        self.base.copy_(self.flat.data)
        self.bn_at_start.save()
        with self.autocast():
            loss = loss_fn(idx)
        self._backward(loss, 1.0)
        stats.loss = float(loss.detach())
        grad = self.flat.grad
        norm = float(torch.linalg.vector_norm(grad)) / self.scaler.scale
        if not math.isfinite(norm):
            return self._skip(stats)
        if norm > 0:
            self.flat.data.add_(grad, alpha=self.rho / (norm * self.scaler.scale))
        grad.zero_()
        with frozen_bn_stats(self.model, self.bn_scratch):
            with self.autocast():
                loss2 = loss_fn(idx)
            self._backward(loss2, 1.0 / _world())
        return self._finish(stats)


class GroupedSAM(_FlatStep):
    """The paper's grouped step (GSA with optional GKP), usable from any training loop.

    >>> gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), num_groups=4)
    >>> gsa.set_groups(group_of_class, group_sizes)          # group id per class, training samples per group
    >>> stats = gsa.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx]), y)

    `loss_fn(idx)` must return the mean base loss over the batch samples `idx`. The task term sums the group losses
    as Eq. 16 does (`group_weighting="sum"`), or averages them ("mean"), or weighs them by their share of the batch
    ("samples": the full-batch gradient, as the released code's single second pass). Directions (`direction`): "gsa"
    (h_g, Eq. 12), "sam" (global g), "gsa_proj" (the removed component), "friendly" (g_g - sigma m_g, m_g an EMA of
    past group gradients). With `sync` (default) group gradients and counts are all-reduced so every rank takes the
    same perturbation; without it each replica perturbs from its own samples and only the update is averaged.
    BatchNorm in a group pass (`bn_stats`): "group" normalises with the group's own samples (the literal L_{D_g});
    "batch" with the whole batch's statistics at the pass's weights (theta, then theta + eps_g: one no-grad
    whole-batch forward per pass); "batch_theta" with the statistics at theta in every pass.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, num_groups: int,
                 direction: str = "gsa", z: float = 1e-2, rho_clamp: Sequence[float] | None = None,
                 regularizer: bool = False, friendly_sigma: float = 1.0, friendly_momentum: float = 0.9,
                 sync: bool = True, perturb: bool = True, bn_min_samples: int = 2, group_weighting: str = "sum",
                 bn_stats: str = "group", **kw: Any) -> None:
        if direction not in ("gsa", "sam", "gsa_proj", "friendly"):
            raise ValueError(f"gsa direction must be gsa, sam, gsa_proj or friendly, got '{direction}'")
        if group_weighting not in ("sum", "mean", "samples"):
            raise ValueError(f"group_weighting must be sum, mean or samples, got '{group_weighting}'")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got '{bn_stats}'")
        super().__init__(model, base_optimizer, num_rows=num_groups, **kw)
        self.num_groups = num_groups
        self.direction = direction
        self.z = z
        self.rho_clamp = rho_clamp
        self.regularizer = regularizer
        self.friendly_sigma = friendly_sigma
        self.friendly_momentum = friendly_momentum
        self.sync = sync
        self.perturb = perturb
        self.bn_min_samples = bn_min_samples
        self.group_weighting = group_weighting
        self.bn_stats = bn_stats
        self.bn_recorded = RecordedBNStats(model)
        self.group_of_class: torch.Tensor | None = None
        self.group_sizes: list[int] = []
        self.momentum: torch.Tensor | None = None
        self.momentum_set: list[bool] = []
        self.glob = torch.empty_like(self.flat.data)
        self.fisher_ema: torch.Tensor | None = None
        self.fisher_ema_decay = 0.0
        self.gkp_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def set_groups(self, group_of_class: Sequence[int] | torch.Tensor, group_sizes: Sequence[int]) -> None:
        """Install a grouping: group id of every class and the number of training samples n_g of every group."""
        self.group_of_class = torch.as_tensor(group_of_class, dtype=torch.long, device=self.flat.data.device)
        self.group_sizes = [int(n) for n in group_sizes]
        if len(self.group_sizes) != self.num_groups:
            self.num_groups = len(self.group_sizes)
            self.flat.resize_rows(self.num_groups)
        if self.direction == "friendly":
            self.momentum = torch.zeros(self.num_groups, self.d, device=self.flat.data.device)
            self.momentum_set = [False] * self.num_groups

    def set_gkp(self, anchors: torch.Tensor, fisher: torch.Tensor, coef: torch.Tensor) -> None:
        """GKP terms over the covered parameters: sum_j coef_j sum_i F_ji (theta_i - a_ji)^2 is added to the objective."""
        self.gkp_terms = (anchors, fisher, coef)

    def track_fisher(self, decay: float) -> torch.Tensor:
        """Keep an EMA of squared per-group gradients (the cheap Fisher option) over the covered parameters."""
        self.fisher_ema_decay = decay
        if self.fisher_ema is None or self.fisher_ema.shape[0] != self.num_groups:
            self.fisher_ema = torch.zeros(self.num_groups, self.num_covered, device=self.flat.data.device)
        return self.fisher_ema

    # ---- the step --------------------------------------------------------------------------------------------
    def _radius(self, theta_norm: float, h_norm: float, g: int) -> float:
        rho = self.z * math.sqrt(theta_norm / (2 * h_norm)) * self.d ** -0.25 * max(self.group_sizes[g] - 1, 1) ** -0.25
        if self.rho_clamp is not None:
            rho = min(max(rho, self.rho_clamp[0]), self.rho_clamp[1])
        return rho

    def _direction(self, g: int, glob: torch.Tensor, coef: float, res_norm: float,
                   glob_norm: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(row, other, c, ||h||) such that h = row - c * other."""
        rows = self.flat.rows
        if self.direction == "gsa":
            group_norm = math.hypot(res_norm, coef * glob_norm)
            if res_norm <= PARALLEL_TOL * group_norm:  # no group-specific direction (G = 1): ascend along g_g
                return rows[g], glob, 0.0, group_norm
            return rows[g], glob, coef, res_norm
        if self.direction == "sam":
            return glob, glob, 0.0, glob_norm
        if self.direction == "gsa_proj":
            return glob, glob, 1.0 - coef, abs(coef) * glob_norm
        if not self.momentum_set[g]:
            return rows[g], glob, 0.0, float(torch.linalg.vector_norm(rows[g]))
        m = self.momentum[g]
        return rows[g], m, self.friendly_sigma, float(torch.linalg.vector_norm(rows[g] - self.friendly_sigma * m))

    def _group_bn(self, n: int) -> ContextManager:
        """How BatchNorm normalises a group pass over `n` local samples (`bn_stats`, `bn_min_samples`)."""
        if self.bn_stats != "group":
            return self.bn_recorded.use()
        return few_sample_safe(self.model, n, self.bn_min_samples)

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One full training step on a batch with labels `targets`; `alpha` weighs the task term against GKP (Eq. 16)."""
        if self.group_of_class is None:
            raise RuntimeError("GroupedSAM.step called before set_groups()")
        G, flat = self.num_groups, self.flat
        stats = StepStats()
        gid = self.group_of_class[targets]
        local = torch.bincount(gid, minlength=G)
        order = torch.argsort(gid, stable=True)
        counts = local.double()
        if self.sync:
            _all_reduce_(counts)
        local_l, counts_l = local.tolist(), counts.tolist()
        index = torch.split(order, local_l)
        present = [g for g in range(G) if counts_l[g] > 0]
        self.base.copy_(flat.data)
        self.bn_at_start.save()
        everyone = torch.arange(len(targets), device=targets.device)
        if self.bn_stats != "group":  # the step's running-statistics update, and the statistics group passes use
            self._record_batch_stats(loss_fn, everyone)

        # Pass 1: exact group gradients g_g (means over D_g), each backward writing into row g.
        rows = flat.rows
        rows.zero_()
        group_loss = torch.zeros(G, dtype=torch.float64, device=rows.device)
        total = max(sum(counts_l), 1)
        group_weight = [1.0 if self.group_weighting == "sum" else
                        1.0 / len(present) if self.group_weighting == "mean" else counts_l[g] / total
                        for g in range(G)]
        task_weight = 1.0 if self.perturb else alpha
        with self.bn_batch.collect() if self.bn_stats == "group" else contextlib.nullcontext():
            for g in present:
                if local_l[g] == 0:
                    continue
                if self.perturb:
                    flat.grads_to_row(g)
                with self._group_bn(local_l[g]), self.autocast():
                    loss = loss_fn(index[g])
                share = local_l[g] / counts_l[g]
                self._backward(loss, share * (task_weight if self.perturb else task_weight * group_weight[g]))
                group_loss[g] = loss.detach().double() * share
        if self.bn_stats == "group":
            self.bn_at_start.restore()
            self.bn_batch.apply()
        flat.grads_to_main()
        if self.sync:
            _all_reduce_(group_loss)
        losses_l = group_loss.tolist()
        stats.group_loss = [float(v) if counts_l[g] > 0 else math.nan for g, v in enumerate(losses_l)]
        stats.loss = float(sum(v * counts_l[g] for g, v in enumerate(losses_l)) / max(sum(counts_l), 1))

        if self.perturb:
            if self.sync:
                _all_reduce_(rows)
            if self.scaler.scale != 1.0:
                rows.div_(self.scaler.scale)
            if not bool(torch.isfinite(rows).all()):
                return self._skip(stats)
            self._perturbed_pass(loss_fn, index, everyone, local_l, counts_l, present, alpha, stats, group_weight)
        if not self.sync and _world() > 1:
            flat.grad.div_(_world())

        def extras() -> float:
            value = 0.0
            if self.gkp_terms is not None:
                anchors, fisher, coef = self.gkp_terms
                n = self.num_covered
                value = float(ops.gkp_penalty(flat.data[:n], anchors, fisher, coef, grad_out=flat.grad[:n],
                                              backend=self.backend))
            if self.regularizer and self.perturb:
                theta_norm = float(torch.linalg.vector_norm(flat.data))
                for g, rho in enumerate(stats.rho):
                    if counts_l[g] > 0 and rho > 0 and math.isfinite(rho):
                        k = alpha / (2 * math.sqrt(max(self.group_sizes[g] - 1, 1)) * rho)
                        value += k * theta_norm
                        flat.grad.add_(flat.data, alpha=k / theta_norm)
            return value

        return self._finish(stats, extras)

    def _record_batch_stats(self, loss_fn: LossFn, everyone: torch.Tensor) -> None:
        with torch.no_grad(), self.bn_recorded.record(), self.autocast():
            loss_fn(everyone)

    def _perturbed_pass(self, loss_fn: LossFn, index: Sequence[torch.Tensor], everyone: torch.Tensor,
                        local_l: list[int], counts_l: list[float], present: list[int], alpha: float,
                        stats: StepStats, group_weight: list[float]) -> None:
        """Pass 2: for each group, theta + eps_g, gradient of alpha * L_{D_g} accumulated into the update buffer."""
        flat, rows = self.flat, self.flat.rows
        weights = torch.tensor([c / max(sum(counts_l), 1) for c in counts_l], dtype=rows.dtype, device=rows.device)
        glob, coef, res_norm = ops.gsa_project(rows, weights, backend=self.backend, out=self.glob)
        coef_l, res_l = coef.tolist(), res_norm.tolist()
        glob_norm = float(torch.linalg.vector_norm(glob))
        theta_norm = float(torch.linalg.vector_norm(self.base))
        if self.fisher_ema is not None:
            n, decay = self.num_covered, self.fisher_ema_decay
            for g in present:
                self.fisher_ema[g].mul_(decay).addcmul_(rows[g, :n], rows[g, :n], value=1 - decay)
        stats.rho = [0.0] * self.num_groups
        stats.cos = [_cosine(coef_l[g], res_l[g], glob_norm) if counts_l[g] > 0 else math.nan
                     for g in range(self.num_groups)]
        with frozen_bn_stats(self.model, self.bn_scratch):
            for g in present:
                row, other, c, h_norm = self._direction(g, glob, coef_l[g], res_l[g], glob_norm)
                if h_norm > 0 and math.isfinite(h_norm):
                    rho = self._radius(theta_norm, h_norm, g)
                    ops.gsa_perturb_(flat.data, self.base, row, other, math.sqrt(self.d) * rho / h_norm, c,
                                     backend=self.backend)
                    stats.rho[g] = rho
                else:
                    flat.data.copy_(self.base)
                if self.bn_stats == "batch":  # the whole batch's statistics at theta + eps_g
                    self._record_batch_stats(loss_fn, everyone)
                if local_l[g] > 0:
                    with self._group_bn(local_l[g]), self.autocast():
                        loss = loss_fn(index[g])
                    self._backward(loss, alpha * group_weight[g] * local_l[g] / counts_l[g])
        if self.direction == "friendly":
            lam = self.friendly_momentum
            for g in present:
                if self.momentum_set[g]:
                    self.momentum[g].mul_(lam).add_(rows[g], alpha=1 - lam)
                else:
                    self.momentum[g].copy_(rows[g])
                    self.momentum_set[g] = True

    def state_dict(self) -> dict[str, Any]:
        """Step state that a resumed run needs: loss scale, FriendlySAM momenta, Fisher EMA, skip count."""
        return {"scaler": self.scaler.state_dict(), "momentum": self.momentum, "momentum_set": list(self.momentum_set),
                "fisher_ema": self.fisher_ema, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])
        if state["momentum"] is not None:
            self.momentum = state["momentum"].to(self.flat.data.device)
            self.momentum_set = list(state["momentum_set"])
        if state["fisher_ema"] is not None:
            self.fisher_ema = state["fisher_ema"].to(self.flat.data.device)
        self.skipped_steps = int(state["skipped_steps"])
