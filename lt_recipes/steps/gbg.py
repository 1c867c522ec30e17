"""GBG (AAAI 2024, WickyLee1998/GBG_v1): class groups from gradient clustering, and MGDA weights over them per step.

Grouping, once from the initial weights (`GBG.prepare`, before a training run's first step): every class's mean per-sample gradient of the classification loss over its
training images (evaluation mode, the covered parameters: the encoder and its heads, not the classifier), cosine
affinity (from the Gram matrix of the class gradients, accumulated a block of classes at a time in bounded memory),
normalised-cut spectral clustering into G groups (the grouping's own affinity and clustering, lt_recipes.equations). Each step:

1. one forward; the gradient g_g of each present group's mean loss L_g (one backward per group into the rows of
   the flat buffer, summed over ranks);
2. MGDA (Sener & Koltun 2018) with the authors' `loss+` normalisation: u_g = g_g / (L_g ||g_g||) over the covered
   parameters, alpha = argmin over the simplex of ||sum_g alpha_g u_g||^2 (exact on the Gram matrix; the authors
   iterate towards it);
3. the update gradient sum_g alpha_g g_g, the gradient of sum_g alpha_g L_g.

A step waits for the device three times (lt_recipes.host_sync): for the batch's group counts (which groups get a
backward), for the Gram matrix MGDA solves on the host together with the group gradients' non-finite check, and for
the update's check.

L_g is the base's per-sample loss averaged over the group (the authors pair CE groups with BCL's contrastive term
outside the MGDA weights; here BCL's whole per-sample loss is grouped, as for every other base).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import equations
from ..grouping import Groups, order_head_first, say_fewer_groups
from ..host_sync import on_host
from ..models import is_classifier, ordered_parameters
from .core import LossFn, StepCore, StepStats, TrainingRun, all_reduce_, upcast
from .registry import register_step

_logger = logging.getLogger(__name__)


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The point alpha of the simplex minimising alpha^T M alpha for a Gram matrix M: the min-norm element of the
    convex hull of the vectors behind M (MGDA). Exact, by enumerating the supports S of alpha: on each, the
    minimiser with sum alpha = 1 is M_S^+ 1 / (1^T M_S^+ 1); the best non-negative one wins (G is a handful)."""
    M = gram.double().cpu()
    n = M.shape[0]
    best, best_val = torch.full((n,), 1.0 / n, dtype=torch.float64), math.inf
    for mask in range(1, 2 ** n):
        S = [i for i in range(n) if mask >> i & 1]
        z = torch.linalg.pinv(M[S][:, S]) @ torch.ones(len(S), dtype=torch.float64)
        if not float(z.sum()) > 0:
            continue
        a_S = z / z.sum()
        if bool((a_S < -1e-12).any()):
            continue
        alpha = torch.zeros(n, dtype=torch.float64)
        alpha[S] = a_S.clamp_min(0)
        alpha /= alpha.sum()
        val = float(alpha @ M @ alpha)
        if val < best_val:
            best, best_val = alpha, val
    return best


# The most gradient numbers (float64) the grouping holds at once on the CPU: 2^27, 1 GiB, whatever the classes and
# parameters; on a GPU, half its free memory (fewer blocks: each block costs a pass over the later classes' images).
GROUPING_BLOCK_NUMBERS = 2 ** 27


def block_numbers(device: torch.device) -> int:
    """The gradient numbers the grouping may hold at once on `device` (GROUPING_BLOCK_NUMBERS on the CPU)."""
    if device.type != "cuda":
        return GROUPING_BLOCK_NUMBERS
    free, _ = torch.cuda.mem_get_info(device)
    return max(GROUPING_BLOCK_NUMBERS, free // 2 // 8)


def class_gradient_sums(model: nn.Module, classification_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        dataset: Dataset, targets: np.ndarray, classes: Sequence[int], covered: list[nn.Parameter],
                        batch_size: int, device: torch.device, autocast: Callable[[], ContextManager],
                        loader_kw: Mapping[str, Any] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(class, the sum over its images of their loss gradients over `covered`, float64 on `device`) for each of
    `classes` with images, in order: one loader (`loader_kw`: the run's workers and pinned memory) over batches of one
    class each, so a class costs one backward per `batch_size` of its images and one vector is held at a time."""
    batches, owner = [], []
    for c in classes:
        idx = np.flatnonzero(targets == c)
        batches += [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
        owner += [c] * -(-len(idx) // batch_size)
    current, total = None, None
    for (x, y), c in zip(DataLoader(dataset, batch_sampler=batches, **(loader_kw or {})), owner):
        if c != current:
            if current is not None:
                yield current, total
            current = c
            total = torch.zeros(sum(p.numel() for p in covered), dtype=torch.float64, device=device)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = upcast(classification_losses(model(x), y)).sum()
        g = torch.autograd.grad(loss, covered, allow_unused=True)
        total += torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).double() for t, p in zip(g, covered)])
    if current is not None:
        yield current, total


def gradient_groups(model: nn.Module, classification_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    dataset: Dataset, targets: np.ndarray, num_classes: int, num_groups: int, covered: list[nn.Parameter],
                    batch_size: int, device: torch.device, autocast: Callable[[], ContextManager],
                    seed: int = 0, loader_kw: Mapping[str, Any] | None = None,
                    max_numbers: int | None = None) -> np.ndarray:
    """GBG's grouping: group id per class (head first) from the cosine affinity of the classes' mean per-sample
    gradients over the covered parameters, computed on `dataset` in evaluation mode (so a sample's gradient does not
    depend on its batch).

    The cosines need only the Gram matrix of the classes' gradient sums, accumulated on `device` a block of classes
    at a time: a block's vectors are held (at most `max_numbers` numbers), their Gram entries with every later class
    taken from one streamed pass over those classes; memory is bounded by the block (`max_numbers`, None:
    `block_numbers(device)`), not classes x parameters (one pass when all classes fit, as on digits)."""
    was = model.training
    model.eval()
    targets = np.asarray(targets)
    n = sum(p.numel() for p in covered)
    per_block = max(1, (max_numbers or block_numbers(device)) // max(n, 1))
    gram = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    args = (model, classification_losses, dataset, targets)
    rest = (covered, batch_size, device, autocast, loader_kw)
    try:
        for start in range(0, num_classes, per_block):
            stop = min(num_classes, start + per_block)
            block = torch.zeros(stop - start, n, dtype=torch.float64, device=device)
            for c, g in class_gradient_sums(*args, range(start, stop), *rest):
                block[c - start] = g
            gram[start:stop, start:stop] = block @ block.T
            for c, g in class_gradient_sums(*args, range(stop, num_classes), *rest):
                gram[start:stop, c] = gram[c, start:stop] = block @ g
            del block
    finally:
        model.train(was)
    counts = np.bincount(targets, minlength=num_classes)
    if num_groups >= num_classes:
        labels = np.arange(num_classes)
    else:
        labels = equations.spectral_groups(equations.gram_affinity(gram), num_groups, seed)
    return order_head_first(labels, counts.tolist())


@register_step("gbg")
class GBG(StepCore):
    """GBG's step over its groups: `num_groups` formed from the initial weights by `prepare` before a training run's
    first step (`gradient_groups`), or installed by hand with `set_groups`.

    >>> step = GBG(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> step.set_groups(group_of_class, group_sizes)
    >>> stats = step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    """

    rows_per_group = True
    retains_graph = True  # one backward per group through the one forward

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 num_groups: int = 4, **kw: Any) -> None:
        super().__init__(model, base_optimizer, **kw)
        self.asked_groups = num_groups
        self.resumed_labels: list[int] | None = None  # a resumed run's groups, installed by `prepare`
        self.last_weights: list[float] = []

    def prepare(self, run: TrainingRun) -> None:
        """The groups before the run's first step: a resumed run's as they were, else `num_groups` from the current
        (initial) weights' class gradients over the covered parameters (nothing when installed by hand)."""
        if self.group_of_class is not None:
            return
        labels = self.resumed_labels
        if labels is None:
            covered, _ = ordered_parameters(self.model, is_classifier)
            labels = gradient_groups(self.model, run.head_losses, run.dataset, np.asarray(run.targets),
                                     len(run.class_counts), self.asked_groups, covered, run.batch_size, run.device,
                                     self.autocast, run.seed, loader_kw=run.loader_kw)
        groups = Groups.from_labels(labels, run.class_counts)
        if self.resumed_labels is None:
            if groups.count < self.asked_groups and run.is_main_process:
                say_fewer_groups("gbg's gradient grouping", groups, self.asked_groups, len(run.class_counts))
            _logger.info("gbg groups from the initial weights' class gradients: %s", groups.members())
        self.set_groups(groups.of_class, groups.samples)

    def _labels(self) -> list[int] | None:
        return self.group_of_class.tolist() if self.group_of_class is not None else self.resumed_labels

    def artifacts(self) -> dict[str, Any]:
        """groups.json: the groups' classes and the last step's MGDA weights (null for a group absent from it)."""
        labels = self._labels()
        if labels is None:
            return {}
        members = [[c for c, g in enumerate(labels) if g == k] for k in range(max(labels) + 1)]
        return {"groups.json": {"groups": members,
                                "weights": [None if math.isnan(w) else w for w in self.last_weights]}}

    def state_dict(self) -> dict[str, Any]:
        """The core's state and the groups (a resumed run keeps them)."""
        return {**super().state_dict(), "group_of_class": self._labels()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("group_of_class") is not None:
            self.resumed_labels = [int(g) for g in state["group_of_class"]]

    def step(self, loss_fn: LossFn, targets: torch.Tensor, alpha: float = 1.0) -> StepStats:
        """One step on a batch with labels `targets`; `alpha` weighs the task gradient against GKP (Eq. 16)."""
        flat, stats = self.flat, StepStats()
        gid, local, counts = self.group_counts(targets)
        self._begin()
        with self.autocast():
            losses = upcast(loss_fn(torch.arange(len(targets), device=targets.device)))
        stats.group_loss, stats.loss = self._group_means(losses, gid, self.counts, True)
        flat.rows.zero_()
        self._group_rows(losses, gid, local, self.counts)
        rows = all_reduce_(flat.rows)
        if self.scaler.scale != 1.0:
            rows.div_(self.scaler.scale)
        present = [g for g, c in enumerate(counts) if c > 0]
        cov = rows[:, :self.num_covered]
        scale = torch.where(self.counts > 0, stats.group_loss, 1.0) * torch.linalg.vector_norm(cov, dim=1).double()
        unit = cov.double() / scale.clamp_min(1e-300)[:, None]
        # one transfer: the Gram matrix, and whether the group gradients are finite
        host = torch.cat([(unit @ unit.T).reshape(-1), torch.isfinite(rows).all().double().reshape(1)]).cpu()
        with on_host():
            if not host[-1] > 0:
                return self._skip(stats)
            G = self.num_groups
            weights = min_norm_weights(host[:-1].view(G, G)[present][:, present]).tolist()
        self.last_weights = [math.nan] * self.num_groups
        full = [0.0] * self.num_groups
        for w, g in zip(weights, present):
            self.last_weights[g] = full[g] = w
        flat.grad.addmv_(rows.T, torch.tensor(full, dtype=rows.dtype).to(rows.device, non_blocking=True))
        return self._finish(stats, alpha, self.batch_shares(targets), reduced=True)
