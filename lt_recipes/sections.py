"""The recipe's sections as typed, frozen dataclasses: the one home of every recipe key's default, type, range and
options.

Each field is declared with `key(default, types, ...)`; the recipe schema that reads YAML files and `--set`
overrides (lt_recipes.config) is derived from these classes, and `Recipe.from_dict` builds the typed recipe once from
a loaded recipe. An instance checks its own fields when it is created (so a section built by hand in an own loop is
checked too), and the code that takes a section trusts it. Constructors that can also be called without a recipe
(the steps, GKP, the schedule) take their keyword defaults from these classes (`SAMConfig.rho`), never from a second
literal. Imports neither torch nor timm, so a bad key or value is reported before either is imported.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

from .choices import (AFFINITIES, AUGMENTS, BACKENDS, BANK_DTYPES, CANCELLING_DIRECTIONS, CLASSIFIERS,
                      COMPILE_BACKENDS, CONTRASTIVE_VIEWS,
                      DIRECTIONS, FISHER_ESTIMATES, GKP_NORMS, GROUP_GRADS, IN_MEMORY_AUGMENTS,
                      LOSSES, LR_BASE_SCALES,
                      PERTURBATIONS, PERTURBED_BN, READINGS, SAMPLERS, SCALES, SCHEDULERS, STATE_DTYPES, WEIGHTINGS)
from .data.table import DATASETS, dataset_info, list_datasets
from .errors import ConfigError
from .step_table import list_methods, list_steps, split_method, step_info, uses_memory_groups

INT = (int,)
FLOAT = (int, float)
STR = (str,)
BOOL = (bool,)
LIST = (list, tuple)
_SPEC = "spec"


@dataclass(frozen=True)
class Field:
    """One recipe key: default value, accepted types, optional extra check returning an error text or None, and for a
    key that takes one of a few names, those names (`options`: a tuple of lt_recipes.choices, or a registry's
    function that names them when a value is checked, so names registered later are offered too)."""

    default: Any
    types: tuple
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False
    options: tuple | Callable[[], tuple] | None = None
    # an epoch count (or a list of them) that may be given as a fraction of `epochs`: config.resolve_epochs makes it
    # whole
    of_epochs: bool = False

    @property
    def choices(self) -> tuple | None:
        """The names this key takes now (None: any value of its types)."""
        return self.options() if callable(self.options) else self.options

    def checked(self, key: str, value: Any) -> Any:
        """`value` if it fits this key, else ConfigError naming `key`."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"recipe key '{key}' may not be null")
        if isinstance(value, bool) and bool not in self.types or not isinstance(value, self.types):
            raise ConfigError(f"recipe key '{key}': expected {'/'.join(t.__name__ for t in self.types)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"recipe key '{key}': value {value!r} is not finite")
        choices = self.choices
        if choices is not None and value not in choices:
            raise ConfigError(f"recipe key '{key}' = {value!r}: must be one of {list(choices)}")
        if self.check is not None:
            err = self.check(value)
            if err:
                raise ConfigError(f"recipe key '{key}' = {value!r}: {err}")
        return value


def key(default: Any, types: tuple, check: Callable[[Any], str | None] | None = None, *, nullable: bool = False,
        choices: tuple | Callable[[], tuple] | None = None, of_epochs: bool = False) -> Any:
    """A dataclass field carrying its recipe key's Field (a list default is a tuple in the section: it is frozen)."""
    spec = Field(default, types, check, nullable, choices, of_epochs)
    return dataclasses.field(default=tuple(default) if isinstance(default, list) else default, metadata={_SPEC: spec})


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _pair_of_increasing(v: Any) -> str | None:
    if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or not 0 <= v[0] <= v[1]:
        return "must be [low, high] with 0 <= low <= high"
    return None


def _workers(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be auto or a number of worker processes >= 0"
    return _at_least(0)(v)


def _clamp(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else "must be auto, null or [low, high]"
    return _pair_of_increasing(v)


def _epoch_count(v: Any) -> str | None:
    if isinstance(v, int):
        return None if v >= 0 else "must be >= 0"
    return None if 0 <= v < 1 else "must be a whole number of epochs or a fraction of epochs in [0, 1)"


def _milestones(v: Any) -> str | None:
    ok = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 or isinstance(x, float) and 0 < x < 1 for x in v)
    return None if ok else "must be a list of epochs (positive integers) or of fractions of epochs in (0, 1)"


def _names(v: Any) -> str | None:
    names = [v] if isinstance(v, str) else v
    return None if names and all(isinstance(n, str) and n for n in names) else "must be a name or a list of names"


def _betas(v: Any) -> str | None:
    return None if len(v) in (2, 3) and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in v) \
        else "must be a list of 2 (or 3) numbers in [0, 1)"


def _dims(v: Any) -> str | None:
    ok = len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
    return None if ok else "must be [hidden, out] positive integers"


def _numbers(v: Any) -> str | None:
    return None if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) else "must be numbers"


# Every section class by its recipe section name (Section.__init_subclass__): a step's row names its section by it
_SECTION_CLASSES: dict[str, type["Section"]] = {}


class Section:
    """Base of the sections: checks every field against its Field when created, and names its recipe section. A
    subclass with a `section` name is known by it (`section_class`), so a step's row can name it."""

    section: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.section:
            _SECTION_CLASSES[cls.section] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if _SPEC not in f.metadata:
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):  # lists from YAML are kept as tuples: a section never changes
                object.__setattr__(self, f.name, value := tuple(value))
            f.metadata[_SPEC].checked(f"{self.section}.{f.name}" if self.section else f.name, value)

    @classmethod
    def fields(cls) -> dict[str, Field]:
        """Every key of the section and its Field."""
        return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(cls) if _SPEC in f.metadata}


# ---- data, model, loss, optimizer, schedule ---------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig(Section):
    """Which dataset, its long tail, splits, preprocessing and loaders (lt_recipes.data); batch sizes per process."""

    section: ClassVar[str] = "data"
    dataset: str = key("digits", STR, choices=DATASETS)
    root: str | None = key(None, STR, nullable=True)
    imbalance_ratio: float | None = key(None, FLOAT, _at_least(1.0), nullable=True)
    max_per_class: int | None = key(None, INT, _at_least(1), nullable=True)
    val_per_class: int = key(10, INT, _at_least(0))
    test_per_class: int = key(50, INT, _at_least(1))
    train_list: str | None = key(None, STR, nullable=True)
    val_list: str | None = key(None, STR, nullable=True)
    test_list: str | None = key(None, STR, nullable=True)
    # list datasets: the class count (null: 1 + the largest label of the evaluation lists, or iNat's categories)
    num_classes: int | None = key(None, INT, _at_least(1), nullable=True)
    img_size: int = key(32, INT, _at_least(1))
    augment: str = key("basic", STR, choices=AUGMENTS)
    # timm's policy string for list datasets (e.g. rand-n2-m10, original, augmix-m5), see timm.data.auto_augment
    auto_augment: str | None = key(None, STR, nullable=True)
    contrastive_views: int = key(0, INT, choices=CONTRASTIVE_VIEWS)
    batch_size: int = key(128, INT, _at_least(1))
    eval_batch_size: int = key(256, INT, _at_least(1))
    # loader worker processes; auto: this process's share of the CPU cores (lt_recipes.data.loader), at most 8
    num_workers: int | str = key("auto", INT + STR, _workers)
    sampler: str = key("random", STR, choices=SAMPLERS)
    skip_bad_images: bool = key(False, BOOL)
    mean: tuple[float, ...] | None = key(None, LIST, _numbers, nullable=True)
    std: tuple[float, ...] | None = key(None, LIST, _numbers, nullable=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        listed, list_files = not dataset_info(self.dataset).in_memory, list(list_datasets(in_memory=False))
        if listed and self.imbalance_ratio is not None:
            raise ConfigError(f"recipe key 'data.imbalance_ratio' does not apply to {self.dataset} (its long tail "
                              "comes from the list files); set it to null")
        if not listed and self.imbalance_ratio is None:
            raise ConfigError(f"recipe key 'data.imbalance_ratio' is required for {self.dataset}")
        if not listed and self.num_classes is not None:
            raise ConfigError(f"recipe key 'data.num_classes' applies to the list-file datasets {list_files}; "
                              f"{self.dataset} has a fixed class count: set it to null")
        if listed and self.augment in IN_MEMORY_AUGMENTS:
            raise ConfigError(f"data.augment={self.augment} is for the in-memory datasets; {self.dataset} uses "
                              "timm's transforms: set data.augment=basic and data.auto_augment (e.g. rand-n2-m10)")
        if not listed and self.auto_augment is not None:
            raise ConfigError(f"data.auto_augment applies to timm's transforms of {list_files}, not "
                              f"{self.dataset} (use data.augment)")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The timm backbone, our classifier and BCL's projection heads (lt_recipes.models)."""

    section: ClassVar[str] = "model"
    name: str = key("resnet8_cifar", STR)
    pretrained_path: str | None = key(None, STR, nullable=True)
    classifier: str = key("linear", STR, choices=CLASSIFIERS)
    cosine_scale: float = key(30.0, FLOAT, _positive)
    proj_head: tuple[int, int] | None = key(None, LIST, _dims, nullable=True)
    drop_rate: float = key(0.0, FLOAT, _between(0.0, 1.0))
    norm_layer: str | None = key(None, STR, nullable=True)
    # timm's --torchcompile: the training steps' forward compiled with this backend (null: eager). Exact for the steps
    # with one backward per forward (none, sam, asam, fsam, cc_sam, with or without GKP); refused, naming the step,
    # where it is not (lt_recipes.method.compile_forward): inductor for imbsam, focal_sam, gbg and gsa's masked group
    # gradients (a second backward through one compiled graph), every backend for gsa's one-pass modes and the
    # released step (a new graph per batch); docs/usage.md, "Compile and channels_last"
    compile: str | None = key(None, STR, nullable=True, choices=COMPILE_BACKENDS)
    # timm's --channels-last: the model's 4-D weights in NHWC memory order, set when the model is built (before a step
    # flattens them); theta, anchors, Fisher rows and GKP then share the flat buffer's memory order. Every step.
    channels_last: bool = key(False, BOOL)


@dataclass(frozen=True)
class LossConfig(Section):
    """The base loss (lt_recipes.losses): CE, logit adjustment, Balanced Softmax, LDAM-DRW or BCL."""

    section: ClassVar[str] = "loss"
    name: str = key("ce", STR, choices=LOSSES)
    tau: float = key(1.0, FLOAT)
    ldam_max_m: float = key(0.5, FLOAT, _positive)
    ldam_s: float = key(30.0, FLOAT, _positive)
    drw_start: float = key(0.8, FLOAT, _between(0.0, 1.0))
    drw_beta: float = key(0.9999, FLOAT, _between(0.0, 1.0))
    bcl_alpha: float = key(2.0, FLOAT, _at_least(0.0))
    bcl_beta: float = key(0.6, FLOAT, _at_least(0.0))
    bcl_temperature: float = key(0.1, FLOAT, _positive)
    label_smoothing: float = key(0.0, FLOAT, _between(0.0, 1.0))

    # what a base needs of the other sections (Recipe checks it, tools/run_grid sets it): LDAM's unscaled cosine
    # classifier, as in its authors' code (the loss owns the scale s), and BCL's two extra contrastive views (BCL also
    # needs a projection head, whose size is the recipe's)
    PAIRED_KEYS: ClassVar[dict[str, dict[str, Any]]] = {
        "ldam_drw": {"model.classifier": "cosine", "model.cosine_scale": 1.0}, "bcl": {"data.contrastive_views": 2}}


@dataclass(frozen=True)
class OptimConfig(Section):
    """The base optimizer, by timm name (lt_recipes.optim)."""

    section: ClassVar[str] = "optim"
    opt: str = key("sgd", STR)  # any name in timm.optim.list_optimizers(), optionally lookahead_<name>
    lr: float = key(0.1, FLOAT, _positive)
    # timm's rule: with lr_base set, lr = lr_base * (global batch / lr_base_size), or its square root
    lr_base: float | None = key(None, FLOAT, _positive, nullable=True)
    lr_base_size: int = key(256, INT, _at_least(1))
    lr_base_scale: str | None = key(None, STR, nullable=True, choices=LR_BASE_SCALES)
    momentum: float = key(0.9, FLOAT, _between(0.0, 1.0))
    weight_decay: float = key(5e-4, FLOAT, _at_least(0.0))
    nesterov: bool = key(False, BOOL)
    eps: float | None = key(None, FLOAT, _positive, nullable=True)
    betas: tuple[float, ...] | None = key(None, LIST, _betas, nullable=True)
    clip_grad: float | None = key(None, FLOAT, _positive, nullable=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_base_scale is not None and self.lr_base is None:
            raise ConfigError("optim.lr_base_scale scales optim.lr_base, which is not set (set optim.lr_base or drop "
                              "optim.lr_base_scale)")


@dataclass(frozen=True)
class EmaConfig(Section):
    """timm's ModelEmaV3 of the weights; no decay: no EMA."""

    section: ClassVar[str] = "ema"
    decay: float | None = key(None, FLOAT, _between(0.0, 1.0), nullable=True)
    warmup: bool = key(False, BOOL)


@dataclass(frozen=True)
class SchedConfig(Section):
    """timm's learning-rate scheduler by name; epoch counts may be fractions of the run."""

    section: ClassVar[str] = "sched"
    sched: str = key("cosine", STR, choices=SCHEDULERS)
    warmup_epochs: int = key(0, FLOAT, _epoch_count, of_epochs=True)
    warmup_lr: float = key(1e-4, FLOAT, _at_least(0.0))
    min_lr: float = key(0.0, FLOAT, _at_least(0.0))
    decay_milestones: tuple[int, ...] = key([], LIST, _milestones, of_epochs=True)
    decay_rate: float = key(0.1, FLOAT, _positive)


# ---- the paper's method: memory-based grouping, GKP, GSA, the alpha schedule ------------------------------------
@dataclass(frozen=True)
class GroupsConfig(Section):
    """The memory-based grouping (lt_recipes.grouping): how many groups, when they are formed, the bank."""

    section: ClassVar[str] = "groups"
    num_groups: int = key(4, INT, _at_least(1))
    # the paper's: groups from 10% of the run, refreshed every 10%
    start_epoch: int = key(0.1, FLOAT, _epoch_count, of_epochs=True)
    interval: int = key(0.1, FLOAT, _epoch_count, of_epochs=True)
    eval_interval: int = key(1, INT, _at_least(1))
    quality_beta: float = key(0.5, FLOAT, _at_least(0.0))
    affinity: str = key("cosine", STR, choices=AFFINITIES)
    bank_dtype: str = key("fp32", STR, choices=BANK_DTYPES)
    bank_spill_dir: str | None = key(None, STR, nullable=True)


@dataclass(frozen=True)
class GKPConfig(Section):
    """Grouped Knowledge Preservation (lt_recipes.gkp): Eq. 6's strength, normaliser and Fisher estimate."""

    section: ClassVar[str] = "gkp"
    lam: float = key(100.0, FLOAT, _at_least(0.0))
    norm: str = key("per_samples", STR, choices=GKP_NORMS)
    fisher: str = key("batch_mean", STR, choices=FISHER_ESTIMATES)
    fisher_ema: float = key(0.9, FLOAT, _between(0.0, 1.0))
    fisher_batches: int = key(0, INT, _at_least(0))
    # per_sample: most per-sample gradients held at once (chunks of the evaluation batch); 0 = by memory
    fisher_chunk: int = key(0, INT, _at_least(0))
    # images per backward of the Fisher estimate, which bounds its memory; null: data.eval_batch_size. batch_mean's
    # estimate is about 1/B of the per-sample one, so a smaller batch raises it (docs/method.md)
    fisher_batch_size: int | None = key(None, INT, _at_least(1), nullable=True)
    state_dtype: str = key("fp32", STR, choices=STATE_DTYPES)


@dataclass(frozen=True)
class GSAConfig(Section):
    """Grouped Sharpness-Aware minimization (lt_recipes.steps.gsa): direction, radius, passes, ops."""

    section: ClassVar[str] = "gsa"
    direction: str = key("gsa", STR, choices=DIRECTIONS)
    scale: str = key("adaptive", STR, choices=SCALES)
    # Z of Eq. 13; null: the scale's own (Z_DEFAULTS)
    z: float | None = key(None, FLOAT, _at_least(0.0), nullable=True)
    # [low, high] clamp of rho_g; auto: the released clamp with the adaptive scale, none with euclidean
    rho_clamp: tuple[float, float] | str | None = key("auto", LIST + STR, _clamp, nullable=True)
    group_grads: str = key("masked", STR, choices=GROUP_GRADS)
    perturbation: str = key("per_group_exact", STR, choices=PERTURBATIONS)
    group_weighting: str = key("samples", STR, choices=WEIGHTINGS)
    regularizer: bool = key(False, BOOL)
    friendly_sigma: float = key(1.0, FLOAT)
    friendly_momentum: float = key(0.9, FLOAT, _between(0.0, 1.0))
    # > 0: the ascent directions from a per-group EMA (this decay) of the group gradients across steps
    group_grad_ema: float = key(0.0, FLOAT, _between(0.0, 0.999))
    sync: bool = key(True, BOOL)
    backend: str = key("auto", STR, choices=BACKENDS)
    # per_group_exact's G whole-batch passes as one vmapped pass (lt_recipes.steps.batched), in chunks of
    # `batch_chunk` parameter sets (null: all G at once)
    batched: bool = key(False, BOOL)
    batch_chunk: int | None = key(None, INT, _at_least(1), nullable=True)

    # Z (or C) of Eq. 13 and the clamp of rho_g that belong to each perturbation scaling (docs/method.md), used where
    # gsa.z is null and gsa.rho_clamp is auto: the released code's adaptive scaling with C = 0.1 and a clamp ten times
    # below its [0.002, 0.003] (docs/method.md, "Perturbation scaling": what the released clamp cost on every base);
    # Eq. 13-14 as printed with Z = 1e-2 and no clamp. The released step's own are its section's (ReleasedConfig).
    SCALE_DEFAULTS: ClassVar[dict[str, tuple[float, tuple[float, float] | None]]] = {
        "adaptive": (0.1, (0.0002, 0.0003)), "euclidean": (1e-2, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbation == "averaged" and self.direction in CANCELLING_DIRECTIONS:
            raise ConfigError(f"gsa.perturbation=averaged with gsa.direction={self.direction} cancels: the "
                              "batch-share mean of the projected directions h_g is exactly zero (sum_g w_g h_g = "
                              "g - g), so the tail groups' losses fall in the perturbed pass; set "
                              "gsa.perturbation=per_group (or per_group_exact), or another gsa.direction")
        if self.batched and self.perturbation != "per_group_exact":
            raise ConfigError(f"gsa.batched=true batches the per_group_exact passes of the grouped step; got "
                              f"gsa.perturbation={self.perturbation} (set gsa.batched=false)")

    @classmethod
    def radius(cls, scale: str, z: float | None, rho_clamp: Any) -> tuple[float, tuple[float, float] | None]:
        """Z of Eq. 13 and the clamp of rho_g the grouped step runs with: `z` and `rho_clamp` as given, a null `z`
        and an `auto` clamp resolved to the scale's own (SCALE_DEFAULTS)."""
        own = cls.SCALE_DEFAULTS[scale]
        clamp = own[1] if isinstance(rho_clamp, str) else rho_clamp
        return (own[0] if z is None else float(z)), (None if clamp is None else (float(clamp[0]), float(clamp[1])))


@dataclass(frozen=True)
class ReleasedConfig(Section):
    """The authors' released step (lt_recipes.steps.released; method `released`, `gkp_released`): its options, at the
    released script's values (ChenShengHan100/gkp-gsa, as its README runs it; docs/method.md, section 5).

    The script also fixes what the grouped methods share: GKP's strength, the alpha schedule and one group formed at
    epoch 0 and never refreshed. Those keys belong to their sections (gkp, alpha, groups) and every grouped method
    reads them there; their script values are `SCRIPT_RUN`, the one home that the reading `released` sets
    (lt_recipes.config.reading_preset) over a recipe's, so a key set after the reading still wins.
    """

    section: ClassVar[str] = "released"
    # C of the radius, and the clamp of rho_k (null: none)
    z: float = key(0.1, FLOAT, _at_least(0.0))
    rho_clamp: tuple[float, float] | None = key([0.002, 0.003], LIST, _pair_of_increasing, nullable=True)
    scale: str = key("adaptive", STR, choices=SCALES)
    friendly_sigma: float = key(1.0, FLOAT)
    friendly_momentum: float = key(0.9, FLOAT, _between(0.0, 1.0))
    backend: str = key("auto", STR, choices=BACKENDS)

    SCRIPT_RUN: ClassVar[dict[str, Any]] = {
        "gkp.lam": 10.0, "gkp.norm": "per_samples", "gkp.fisher": "batch_mean", "alpha.start": 0.9, "alpha.end": 0.8,
        "groups.num_groups": 1, "groups.start_epoch": 0, "groups.interval": 0}


@dataclass(frozen=True)
class AlphaConfig(Section):
    """Supplement Eq. 20: alpha decays from `start` to `end` over the run (GSA's share of Eq. 16 against GKP's)."""

    section: ClassVar[str] = "alpha"
    start: float = key(0.95, FLOAT, _between(0.0, 1.0))
    end: float = key(0.6, FLOAT, _between(0.0, 1.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.end > self.start:
            raise ConfigError("alpha.end must not exceed alpha.start (alpha decays over the method's epochs)")


# ---- the sharpness-aware peers (lt_recipes.steps), each at its authors' CIFAR-100-LT setting --------------------
@dataclass(frozen=True)
class SAMConfig(Section):
    """SAM (Foret et al. 2021)."""

    section: ClassVar[str] = "sam"
    rho: float = key(0.05, FLOAT, _at_least(0.0))


@dataclass(frozen=True)
class ASAMConfig(Section):
    """ASAM (Kwon et al. 2021): the radius is in |theta|-scaled units."""

    section: ClassVar[str] = "asam"
    rho: float = key(2.0, FLOAT, _at_least(0.0))


@dataclass(frozen=True)
class FSAMConfig(Section):
    """FriendlySAM (Li et al. 2024): momentum `sigma`-removed ascent, EMA `lam` of the gradients."""

    section: ClassVar[str] = "fsam"
    rho: float = key(0.2, FLOAT, _at_least(0.0))
    sigma: float = key(1.0, FLOAT)
    lam: float = key(0.6, FLOAT, _between(0.0, 1.0))


@dataclass(frozen=True)
class ImbSAMConfig(Section):
    """ImbSAM (Zhou et al. 2023): SAM on the tail classes {c : n_c < eta}."""

    section: ClassVar[str] = "imbsam"
    rho: float = key(0.05, FLOAT, _at_least(0.0))
    # null: the few-shot boundary of the Many/Medium/Few split (20 images)
    eta: float | None = key(None, FLOAT, _positive, nullable=True)
    # BatchNorm running statistics in the pass at theta + eps: frozen (ours, usual SAM practice) or update (the authors'
    # code, whose third pass is a train-mode forward there)
    perturbed_bn: str = key("frozen", STR, choices=PERTURBED_BN)


@dataclass(frozen=True)
class FocalSAMConfig(Section):
    """Focal-SAM (Li et al. 2025): focal weights (1 - pi_c)^gamma mixed with `lam`."""

    section: ClassVar[str] = "focal_sam"
    rho: float = key(0.3, FLOAT, _at_least(0.0))
    gamma: float = key(3.2, FLOAT, _at_least(0.0))
    lam: float = key(0.8, FLOAT, _between(0.0, 1.0))


@dataclass(frozen=True)
class CCSAMConfig(Section):
    """CC-SAM (Zhou et al. 2023), stage 1: class-wise radii rho n_c^-beta on the classifier."""

    section: ClassVar[str] = "cc_sam"
    rho: float = key(1e-6, FLOAT, _at_least(0.0))
    beta: float = key(0.5, FLOAT, _between(0.0, 1.0))


@dataclass(frozen=True)
class GBGConfig(Section):
    """GBG (2024): MGDA over gradient-clustered class groups."""

    section: ClassVar[str] = "gbg"
    num_groups: int = key(4, INT, _at_least(1))


# The run's own sections; every step's section joins them through its row in the step table (`step_sections`)
RUN_SECTIONS: tuple[type[Section], ...] = (DataConfig, ModelConfig, LossConfig, OptimConfig, EmaConfig, SchedConfig,
                                           GroupsConfig, GKPConfig, AlphaConfig)


def section_class(name: str) -> type[Section]:
    """The section class of recipe section `name` (KeyError naming the known ones)."""
    if name not in _SECTION_CLASSES:
        raise KeyError(f"no recipe section {name!r}; known: {', '.join(_SECTION_CLASSES)}")
    return _SECTION_CLASSES[name]


def step_sections() -> tuple[type[Section], ...]:
    """The sections the step table's rows name now, in row order (a step registered from outside adds its own)."""
    names = dict.fromkeys(info.section for name in list_steps() if (info := step_info(name)).section)
    return tuple(section_class(n) for n in names)


def recipe_sections() -> tuple[type[Section], ...]:
    """Every section of a recipe now: the run's, then the steps'."""
    return RUN_SECTIONS + step_sections()


def _step_defaults() -> Mapping[str, Section]:
    return MappingProxyType({s.section: s() for s in step_sections()})


@dataclass(frozen=True)
class Recipe(Section):
    """A whole recipe: the run's own keys and one typed section per part (built once per run by `from_dict`)."""

    name: str = key("", STR)
    epochs: int = key(10, INT, _at_least(1))
    seed: int = key(0, INT, _at_least(0))
    # a step of the step table (lt_recipes.step_table; a step registered from outside too: checked when the value
    # is), with GKP as gkp_<step> (gkp alone: the plain step with GKP)
    method: str = key("none", STR, choices=list_methods)
    # a named reading of the method: a preset of keys (lt_recipes.config.reading_preset), applied where it is set
    reading: str = key("paper", STR, choices=READINGS)
    log_interval: int = key(50, INT, _at_least(1))
    checkpoint_interval: int = key(1, INT, _at_least(1))
    max_nonfinite_steps: int = key(20, INT, _at_least(1))
    # experiment trackers through Accelerate (tensorboard, wandb, mlflow, ...): a name or a list, null = none
    log_with: str | tuple[str, ...] | None = key(None, STR + LIST, _names, nullable=True)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    sched: SchedConfig = dataclasses.field(default_factory=SchedConfig)
    groups: GroupsConfig = dataclasses.field(default_factory=GroupsConfig)
    gkp: GKPConfig = dataclasses.field(default_factory=GKPConfig)
    alpha: AlphaConfig = dataclasses.field(default_factory=AlphaConfig)
    # the steps' sections by name (`recipe.gsa`, `recipe.sam`): one per section the step table names (those not given
    # at their defaults)
    steps: Mapping[str, Section] = dataclasses.field(default_factory=_step_defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        known = {s.section: s for s in step_sections()}
        unknown = sorted(set(self.steps) - set(known))
        if unknown:
            raise ConfigError(f"no step has the recipe section(s) {unknown}; the steps' sections: {sorted(known)}")
        object.__setattr__(self, "steps", MappingProxyType({n: self.steps.get(n) or s() for n, s in known.items()}))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Combinations of keys of different sections that cannot work together (each section checks its own)."""
        data, loss, model, method = self.data, self.loss, self.model, self.method
        paired = {k: v for k, v in LossConfig.PAIRED_KEYS.get(loss.name, {}).items()
                  if getattr(getattr(self, k.split(".")[0]), k.split(".")[1]) != v}
        if loss.name == "bcl":
            if paired:
                raise ConfigError("loss.name=bcl needs data.contrastive_views=2 (two extra contrastive views per "
                                  "image)")
            if model.proj_head is None:
                raise ConfigError("loss.name=bcl needs model.proj_head=[hidden, out] (the contrastive heads)")
        elif model.proj_head is not None:
            raise ConfigError("model.proj_head builds the contrastive heads of loss.name=bcl; unused heads break DDP "
                              f"with loss.name={loss.name}: set model.proj_head=null")
        elif data.contrastive_views:
            raise ConfigError(f"data.contrastive_views={data.contrastive_views} is only used by loss.name=bcl, "
                              f"not {loss.name}")
        if loss.name == "ldam_drw" and paired:
            raise ConfigError("loss.name=ldam_drw pairs with an unscaled cosine classifier, as in LDAM's own code (the "
                              "loss multiplies the margin-shifted cosines by loss.ldam_s): set model.classifier=cosine "
                              f"and model.cosine_scale=1 (got {model.classifier}, scale {model.cosine_scale:g})")
        if uses_memory_groups(method) and self.groups.start_epoch >= self.epochs:
            raise ConfigError(f"groups.start_epoch={self.groups.start_epoch} must be < epochs={self.epochs} "
                              f"for method={method}: lower groups.start_epoch, or give it as a fraction of the "
                              "run (groups.start_epoch=0.1: from 10% of epochs)")
        if self.gkp.fisher == "ema" and method != "gkp_gsa":
            raise ConfigError("gkp.fisher=ema tracks the per-group gradients that GSA computes: it needs method=gkp_gsa"
                              + (" (the released step has none)" if method == "gkp_released" else ""))
        step = split_method(method)[0]
        if step != "gsa" and self.steps["gsa"].direction != "gsa":
            own = step_info(step).section or "none"
            raise ConfigError(f"gsa.direction sets the grouped step of methods gsa/gkp_gsa, not method={method} "
                              + ("(the released script's step cascades FriendlySAM directions of its own; its options "
                                 "are the section released)" if step == "released"
                                 else f"(its options are the section {own})"))
        sched = self.sched
        if sched.warmup_epochs >= self.epochs:
            raise ConfigError(f"sched.warmup_epochs={sched.warmup_epochs} must be < epochs={self.epochs}: lower "
                              "sched.warmup_epochs, or give it as a fraction of the run (sched.warmup_epochs=0.05: 5% "
                              "of epochs)")
        late = [m for m in sched.decay_milestones if m > self.epochs]
        if sched.sched in ("step", "multistep") and late:
            raise ConfigError(f"sched.decay_milestones={list(sched.decay_milestones)}: {late} lie past "
                              f"epochs={self.epochs} and are never reached: lower sched.decay_milestones, or give them "
                              "as fractions of the run (sched.decay_milestones=[0.8, 0.9]: at 80% and 90% of epochs)")

    def __getattr__(self, name: str) -> Section:
        steps = self.__dict__.get("steps", {})
        if name in steps:
            return steps[name]
        raise AttributeError(f"'Recipe' object has no attribute {name!r}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "Recipe":
        """The typed recipe of a loaded recipe (lt_recipes.config.load_config's dict, or a run's args.yaml)."""
        run = {s.section: s(**cfg[s.section]) for s in RUN_SECTIONS}
        steps = MappingProxyType({s.section: s(**cfg[s.section]) for s in step_sections()})
        return cls(**{k: cfg[k] for k in cls.fields()}, **run, steps=steps)

    def sections(self) -> dict[str, Section]:
        """Every section of this recipe by name, the run's then the steps'."""
        return {**{s.section: getattr(self, s.section) for s in RUN_SECTIONS}, **self.steps}

    def to_dict(self) -> dict[str, Any]:
        """The recipe as data, as args.yaml holds it and load_config gives it (lists, not tuples)."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        out: dict[str, Any] = {k: plain(getattr(self, k)) for k in self.fields()}
        for name, section in self.sections().items():
            out[name] = {k: plain(getattr(section, k)) for k in section.fields()}
        return out

    def step_options(self, section: str | None) -> dict[str, Any]:
        """The options of a step's recipe section (none for a step without one)."""
        return dataclasses.asdict(getattr(self, section)) if section else {}


# The built-in recipe's sections (recipe_sections() now: with the sections of steps registered since)
SECTIONS: tuple[type[Section], ...] = recipe_sections()
