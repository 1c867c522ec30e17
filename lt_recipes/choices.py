"""The options of every recipe key that takes one of a few names, each defined once.

The recipe schema (lt_recipes.config) offers exactly these, and the code that implements an option imports the same
tuple to check its argument, so a recipe and an own-loop call accept the same names. Imports nothing, so a bad
recipe value is reported before torch is imported. tests/test_choices.py checks that every option has its own
implementation and that the implementations' registries name exactly these options.
"""
from __future__ import annotations

# ---- data (lt_recipes.data) --------------------------------------------------------------------------------------
IN_MEMORY_DATASETS = ("digits", "fmnist", "cifar10", "cifar100")  # read whole into uint8 arrays, then cut to a LT
LIST_DATASETS = ("imagenet_lt", "places_lt", "inat2018")  # image files named by list files or iNat json
DATASETS = IN_MEMORY_DATASETS + LIST_DATASETS
AUGMENTS = ("none", "basic", "autoaugment", "randaugment")
IN_MEMORY_AUGMENTS = ("autoaugment", "randaugment")  # torchvision policies on uint8 tensors; files use timm's
CONTRASTIVE_VIEWS = (0, 2)  # BCL's two extra views, or none
SAMPLERS = ("random", "class_balanced")

# ---- model, loss, optimizer, schedule ----------------------------------------------------------------------------
CLASSIFIERS = ("linear", "cosine")
LOSSES = ("ce", "la", "bs", "ldam_drw", "bcl")
LR_BASE_SCALES = ("linear", "sqrt")
SCHEDULERS = ("cosine", "step", "multistep", "none")  # timm's schedulers by name; none keeps optim.lr

# ---- the method (lt_recipes.method, grouping, gkp, gsa, ops) ------------------------------------------------------
# Each method's modules on top of the base loss, as they appear in its label (ce+gkp+gsa).
METHOD_MODULES: dict[str, tuple[str, ...]] = {
    "none": (), "sam": ("sam",), "gkp": ("gkp",), "gsa": ("gsa",), "gkp_gsa": ("gkp", "gsa")}
METHODS = tuple(METHOD_MODULES)
GROUPED_METHODS = tuple(m for m, modules in METHOD_MODULES.items() if {"gkp", "gsa"} & set(modules))
AFFINITIES = ("cosine",)
BANK_DTYPES = ("fp32", "bf16")
STATE_DTYPES = ("fp32", "bf16", "fp16")
GKP_NORMS = ("per_samples", "per_classes")  # |G_j| of Eq. 6: the group's training samples or classes
FISHER_ESTIMATES = ("exact", "ema")
DIRECTIONS = ("gsa", "sam", "gsa_proj", "friendly")  # paper Table 5 plus FriendlySAM
SCALES = ("adaptive", "euclidean")  # the released code's perturbation scaling, or Eq. 13-14 as printed
GROUP_GRADS = ("masked", "share")
PERTURBATIONS = ("averaged", "per_group")
WEIGHTINGS = ("samples", "sum", "mean")  # w_g of Eq. 16
BACKENDS = ("auto", "fused", "reference")
