"""Base long-tail losses the method adds its terms to (docs/method.md): CE, logit adjustment, Balanced Softmax,
LDAM with DRW, and BCL.

Every loss is an `LTLoss`: `per_sample(model, inputs, targets)` runs the model itself (BCL needs one pass over three
views and the model's heads) and returns each sample's share of the batch loss, whose mean is the batch loss; called
as `loss(model, inputs, targets)` it returns that mean. The grouped step masks the per-sample losses to a group's
samples (a group's share of the batch loss, docs/method.md). `classification_loss(logits, targets)` is the
classification part alone (the base loss GKP's Fisher estimate differentiates). Class counts and the tensors derived
from them are buffers, so `.to(device)` moves them with the module.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .errors import LossError

if TYPE_CHECKING:
    from .sections import LossConfig

_logger = logging.getLogger(__name__)

__all__ = ["LTLoss", "CrossEntropy", "LogitAdjusted", "BalancedSoftmax", "LDAMDRW", "BCL", "LossError",
           "balanced_contrastive_loss", "LOSS_BUILDERS", "create_loss"]


class LTLoss(nn.Module):
    """Base interface: a classification loss on the model's logits, computed from (model, inputs, targets)."""

    contrastive_views: int = 0

    def __init__(self, class_counts: Sequence[int], label_smoothing: float = 0.0) -> None:
        super().__init__()
        counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        if counts.ndim != 1 or counts.numel() == 0:
            raise LossError(f"class_counts must be a non-empty list of per-class training counts, got {class_counts!r}")
        bad = torch.nonzero(counts <= 0).flatten().tolist()
        if bad:
            raise LossError(f"class_counts must be positive; class {bad[0]} has {counts[bad[0]].item():g} training "
                            "images (a long-tail loss needs every class present in training)")
        self.num_classes = counts.numel()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_counts", counts.float())

    def set_epoch(self, epoch: int) -> None:
        """Epoch-dependent behaviour (DRW's switch); nothing by default."""

    def classification_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample classification losses on logits [B, C], whose mean is the batch loss."""
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Batch-mean classification loss on logits [B, C]."""
        return self.classification_losses(logits, targets).mean()

    def per_sample(self, model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
                   targets: torch.Tensor) -> torch.Tensor:
        """Each sample's share of the batch loss [B] (their mean is the batch loss)."""
        if not isinstance(inputs, torch.Tensor):
            raise LossError(f"{type(self).__name__} takes one input tensor per batch, got {len(inputs)} views "
                            "(multi-view batches are for loss.name=bcl)")
        return self.classification_losses(model(inputs), targets)

    def forward(self, model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        return self.per_sample(model, inputs, targets).float().mean()


class CrossEntropy(LTLoss):
    """Plain softmax cross-entropy."""


class LogitAdjusted(LTLoss):
    """Logit-adjusted CE (Menon et al. 2021): CE on z + tau * log(pi), pi the training class prior."""

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        self.tau = tau
        prior = self.class_counts.double() / self.class_counts.double().sum()
        self.register_buffer("adjustment", (tau * prior.log()).float())

    def classification_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().classification_losses(logits + self.adjustment, targets)


class BalancedSoftmax(LTLoss):
    """Balanced Softmax (Ren et al. 2020): CE on z + log(n_c)."""

    def __init__(self, class_counts: Sequence[int], label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        self.register_buffer("log_counts", self.class_counts.log())

    def classification_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().classification_losses(logits + self.log_counts, targets)


class LDAMDRW(LTLoss):
    """LDAM (Cao et al. 2019) with deferred re-weighting.

    Margins m_c proportional to n_c^(-1/4), the largest equal to `max_m`; the target logit is lowered by m_y and all
    logits are multiplied by `s`. From epoch `drw_epoch` on, CE is weighted per class by the effective number
    (1 - beta) / (1 - beta^n_c), normalised so the weights sum to C; before it, unweighted.
    """

    def __init__(self, class_counts: Sequence[int], max_m: float = 0.5,
                 s: float = 30.0, drw_epoch: int = 0, beta: float = 0.9999,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        self.s = s
        self.drw_epoch = drw_epoch
        self.drw_active = drw_epoch <= 0
        n = self.class_counts.double()
        margins = n.pow(-0.25)
        self.register_buffer("margins", (margins * (max_m / margins.max())).float())
        weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
        self.register_buffer("drw_weights", (weights * (self.num_classes / weights.sum())).float())

    def set_epoch(self, epoch: int) -> None:
        active = epoch >= self.drw_epoch
        if active and not self.drw_active:
            _logger.info("DRW: class re-weighting on from epoch %d", epoch)
        self.drw_active = active

    def classification_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """With DRW the batch loss is sum_i w_yi l_i / sum_i w_yi (PyTorch's weighted mean): sample i's share is
        B w_yi l_i / sum_j w_yj."""
        shifted = logits - F.one_hot(targets, self.num_classes).to(logits.dtype) * self.margins[targets, None]
        if not self.drw_active:
            return F.cross_entropy(self.s * shifted, targets, reduction="none", label_smoothing=self.label_smoothing)
        losses = F.cross_entropy(self.s * shifted, targets, weight=self.drw_weights, reduction="none",
                                 label_smoothing=self.label_smoothing)
        return losses * (len(targets) / self.drw_weights[targets].sum())

    def extra_repr(self) -> str:
        return f"s={self.s}, drw_epoch={self.drw_epoch}, drw_active={self.drw_active}"


def balanced_contrastive_loss(views: torch.Tensor, view_labels: torch.Tensor, prototypes: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """Balanced supervised contrastive loss of BCL (Zhu et al. 2022), in float32 or wider whatever the autocast.

    Candidates are the view embeddings [V, D] plus one prototype per class [C, D] (class-complement: every class is
    present). Each view is an anchor; its positives are the other candidates of its class (its own prototype always
    among them), and its denominator sums, over classes, the mean of exp(z_i . z_j / T) over that class's candidates
    other than the anchor (class-averaging). Returns each anchor's loss [V], -mean over its positives of the log
    ratio (the loss is their mean). All embeddings are expected L2-normalised.
    """
    with torch.autocast(device_type=views.device.type, enabled=False):
        num_views, num_classes = views.shape[0], prototypes.shape[0]
        dtype = torch.promote_types(torch.promote_types(views.dtype, prototypes.dtype), torch.float32)
        anchors = views.to(dtype)
        cand = torch.cat([anchors, prototypes.to(dtype)])
        labels = torch.cat([view_labels, torch.arange(num_classes, device=view_labels.device)])
        sim = anchors @ cand.T / temperature  # [V, V + C]
        is_self = torch.zeros_like(sim, dtype=torch.bool)
        is_self[:, :num_views] = torch.eye(num_views, dtype=torch.bool, device=sim.device)
        same = view_labels[:, None] == labels[None, :]
        # size of candidate j's class, not counting the anchor (>= 1: the class prototype is always a candidate)
        per_class = torch.zeros(num_classes, dtype=sim.dtype, device=sim.device).index_add_(
            0, labels, torch.ones_like(labels, dtype=sim.dtype))  # torch.bincount would read its size on the host
        class_size = per_class[labels][None, :] - same.to(sim.dtype)
        log_denominator = torch.logsumexp((sim - class_size.log()).masked_fill(is_self, -math.inf), dim=1)
        positive = same & ~is_self
        log_ratio = sim - log_denominator[:, None]
        return -(log_ratio * positive).sum(1) / positive.sum(1)


class BCL(LogitAdjusted):
    """BCL: `alpha` * logit-adjusted CE on the classification view + `beta` * balanced contrastive loss.

    Inputs are [x_cls, v1, v2]: one model pass over their concatenation gives the logits of x_cls and the pooled
    features of all three, which `model.project` embeds together (as the reference code does: the projection head's
    BatchNorm sees all 3B rows) before the classification view's slice is dropped; `model.prototypes()` gives the
    class prototypes. Sample i's share of the loss is alpha * its classification loss + beta * the mean of its two
    views' contrastive losses. The model may be DDP-wrapped: the pass goes through the wrapper, the heads are
    reached on the wrapped module.
    """

    contrastive_views = 2

    def __init__(self, class_counts: Sequence[int], alpha: float = 2.0,
                 beta: float = 0.6, temperature: float = 0.1,
                 tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, tau=tau, label_smoothing=label_smoothing)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def per_sample(self, model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
                   targets: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor) or len(inputs) != 1 + self.contrastive_views:
            got = "one tensor" if isinstance(inputs, torch.Tensor) else f"{len(inputs)} tensors"
            raise LossError(f"BCL takes [x_cls, view1, view2] per batch (data.contrastive_views=2), got {got}")
        batch = targets.shape[0]
        sizes = [x.shape[0] for x in inputs]
        if any(n != batch for n in sizes):
            raise LossError(f"BCL views have batch sizes {sizes} but there are {batch} targets")
        logits, feats = model(torch.cat(list(inputs)), return_features=True)
        net = extract_model_from_parallel(model)
        views = net.project(feats)[batch:]
        contrastive = balanced_contrastive_loss(views, targets.repeat(self.contrastive_views), net.prototypes(),
                                                self.temperature)
        per_view = contrastive.view(self.contrastive_views, batch).mean(0)
        return self.alpha * self.classification_losses(logits[:batch], targets).float() + self.beta * per_view

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, tau={self.tau}"


# The builder of every recipe `loss.name` (lt_recipes.choices.LOSSES): (loss section, class counts, epochs) -> loss.
LOSS_BUILDERS: dict[str, Callable[[LossConfig, Sequence[int], int], LTLoss]] = {
    "ce": lambda c, counts, epochs: CrossEntropy(counts, label_smoothing=c.label_smoothing),
    "la": lambda c, counts, epochs: LogitAdjusted(counts, tau=c.tau, label_smoothing=c.label_smoothing),
    "bs": lambda c, counts, epochs: BalancedSoftmax(counts, label_smoothing=c.label_smoothing),
    "ldam_drw": lambda c, counts, epochs: LDAMDRW(counts, max_m=c.ldam_max_m, s=c.ldam_s,
                                                  drw_epoch=int(c.drw_start * epochs), beta=c.drw_beta,
                                                  label_smoothing=c.label_smoothing),
    "bcl": lambda c, counts, epochs: BCL(counts, alpha=c.bcl_alpha, beta=c.bcl_beta,
                                         temperature=c.bcl_temperature, tau=c.tau,
                                         label_smoothing=c.label_smoothing),
}


def create_loss(loss_cfg: LossConfig, class_counts: Sequence[int], epochs: int) -> LTLoss:
    """Build the recipe's loss (`loss_cfg.name`, one of `LOSS_BUILDERS`) for these training class counts."""
    loss = LOSS_BUILDERS[loss_cfg.name](loss_cfg, class_counts, epochs)
    _logger.info("loss: %s", loss)
    return loss
