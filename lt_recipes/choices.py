"""The options of every recipe key that takes one of a few names, each defined once.

The recipe schema (lt_recipes.config) offers exactly these, and the code that implements an option imports the same
tuple to check its argument, so a recipe and an own-loop call accept the same names. Imports nothing, so a bad
recipe value is reported before torch is imported. tests/test_choices.py checks that every option has its own
implementation and that the implementations' registries name exactly these options.
"""
from __future__ import annotations

# ---- data (lt_recipes.data); the datasets themselves are the dataset table's (lt_recipes.data.table) -------------
AUGMENTS = ("none", "basic", "autoaugment", "randaugment")
IN_MEMORY_AUGMENTS = ("autoaugment", "randaugment")  # torchvision policies on uint8 tensors; files use timm's
CONTRASTIVE_VIEWS = (0, 2)  # BCL's two extra views, or none
SAMPLERS = ("random", "class_balanced")

# ---- model, loss, optimizer, schedule ----------------------------------------------------------------------------
CLASSIFIERS = ("linear", "cosine")
# model.compile: torch.compile backends of the steps' forward (null: eager); inductor generates kernels, aot_eager and
# eager trace the same graphs and run them with ATen's own ops (torch.compile's debugging backends)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
LOSSES = ("ce", "la", "bs", "ldam_drw", "bcl")
LR_BASE_SCALES = ("linear", "sqrt")
SCHEDULERS = ("cosine", "step", "multistep", "none")  # timm's schedulers by name; none keeps optim.lr

# ---- the method's options (grouping, gkp, steps.gsa, ops); the methods themselves are the step table's
# (lt_recipes.step_table) -------------------------------------------------------------------------------------------
AFFINITIES = ("cosine",)
BANK_DTYPES = ("fp32", "bf16")
STATE_DTYPES = ("fp32", "bf16", "fp16")
GKP_NORMS = ("per_samples", "per_classes")  # |G_j| of Eq. 6: the group's training samples or classes
# F_j of Eq. 6: squared batch-mean gradients (the released code), EWC's mean squared per-sample gradient, or an EMA of
# the squared group gradients GSA computes anyway
FISHER_ESTIMATES = ("batch_mean", "per_sample", "ema")
DIRECTIONS = ("gsa", "sam", "gsa_proj", "friendly")  # paper Table 5 plus FriendlySAM
SCALES = ("adaptive", "euclidean")  # the released code's perturbation scaling, or Eq. 13-14 as printed
GROUP_GRADS = ("masked", "share")
# Pass 2 of the grouped step: every group at its own theta + eps_g in one mixed forward over the group-sorted batch
# (per_group) or in one whole-batch forward per group (per_group_exact); or one pass at the batch-share mean of the
# eps_g (averaged, the released code's, which cancels for the h_g directions: refused with direction gsa)
PERTURBATIONS = ("per_group", "per_group_exact", "averaged")
# Directions whose batch-share average is exactly zero (sum_g w_g h_g = g - g): never averaged
CANCELLING_DIRECTIONS = ("gsa",)
# Named readings of the method: its step and a preset of recipe keys (lt_recipes.config.reading_preset)
READINGS = ("paper", "released")
WEIGHTINGS = ("samples", "sum", "mean")  # w_g of Eq. 16
BACKENDS = ("auto", "fused", "reference")
# BatchNorm running statistics in the perturbed pass of a SAM-style peer: left alone (the usual SAM practice), or moved
# by that train-mode forward at theta + eps (ImbSAM's own code)
PERTURBED_BN = ("frozen", "update")
