"""Recipe options: the schema offers the tuples of lt_recipes.choices, the implementations' registries name exactly
those, and every option has its own implementation (an option added on one side only fails here)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_recipes import choices, equations, ops
from lt_recipes.config import SCHEMA, ConfigError, defaults, load_config
from lt_recipes.data import CIFAR_LAYOUT, DATASETS, EpochSampler, build_transforms, dataset_info, list_datasets
from lt_recipes.gkp import gkp_strength
from lt_recipes.grouping import DTYPES, MemoryBank
from lt_recipes.steps import GroupedSAM
from lt_recipes.losses import BCL, LOSS_BUILDERS, create_loss
from lt_recipes.labels import method_label
from lt_recipes.steps import list_methods, method_of, split_method, step_info
from lt_recipes.models import LTModel
from lt_recipes.optim import scaled_lr
from lt_recipes.sections import DataConfig, LossConfig, OptimConfig, Recipe
from test_gsa import GROUP_OF_CLASS, GROUP_SIZES, Tiny, _batch, _theta

# Every schema key that takes one of a few names, and the tuple of lt_recipes.choices it offers.
OPTION_KEYS = {
    "method": list_methods(), "data.dataset": DATASETS, "data.augment": choices.AUGMENTS,
    "data.contrastive_views": choices.CONTRASTIVE_VIEWS, "data.sampler": choices.SAMPLERS,
    "model.classifier": choices.CLASSIFIERS, "model.compile": choices.COMPILE_BACKENDS, "loss.name": choices.LOSSES,
    "optim.lr_base_scale": choices.LR_BASE_SCALES,
    "sched.sched": choices.SCHEDULERS, "groups.affinity": choices.AFFINITIES, "groups.bank_dtype": choices.BANK_DTYPES,
    "gkp.norm": choices.GKP_NORMS, "gkp.fisher": choices.FISHER_ESTIMATES, "gkp.state_dtype": choices.STATE_DTYPES,
    "gsa.direction": choices.DIRECTIONS, "gsa.scale": choices.SCALES, "gsa.group_grads": choices.GROUP_GRADS,
    "gsa.perturbation": choices.PERTURBATIONS, "gsa.group_weighting": choices.WEIGHTINGS,
    "gsa.backend": choices.BACKENDS, "reading": choices.READINGS,
    "imbsam.perturbed_bn": choices.PERTURBED_BN, "released.scale": choices.SCALES, "released.backend": choices.BACKENDS,
}


def _schema_choices(schema=SCHEMA, prefix=""):
    out = {}
    for k, v in schema.items():
        if isinstance(v, dict):
            out.update(_schema_choices(v, f"{prefix}{k}."))
        elif v.choices is not None:
            out[f"{prefix}{k}"] = v.choices
    return out


def _pairwise_different(results: dict) -> None:
    for (a, ra), (b, rb) in itertools.combinations(results.items(), 2):
        same = torch.equal(ra, rb) if isinstance(ra, torch.Tensor) else ra == rb
        assert not same, f"options {a!r} and {b!r} give the same result"


def test_schema_offers_the_tuples_of_choices():
    assert _schema_choices() == OPTION_KEYS
    for key, options in OPTION_KEYS.items():
        section, _, name = key.rpartition(".")
        default = (defaults()[section] if section else defaults())[name]
        assert default in options or default is None, key
        bad = 1 if isinstance(options[0], int) else "no_such_option"
        with pytest.raises(ConfigError, match=f"'{key}' = {bad!r}: must be one of"):
            load_config("digits_lt", [f"{key}={bad}"])


def test_registries_name_exactly_the_options():
    assert tuple(LOSS_BUILDERS) == choices.LOSSES
    assert SCHEMA["method"].choices == list_methods()
    assert tuple(DTYPES) == choices.STATE_DTYPES and set(choices.BANK_DTYPES) <= set(DTYPES)
    assert choices.CONTRASTIVE_VIEWS == (0, BCL.contrastive_views)


def test_every_loss_and_method_is_its_own():
    losses = {name: type(create_loss(LossConfig(name=name), [30, 9, 2], 10)) for name in choices.LOSSES}
    _pairwise_different(losses)
    labels = {m: method_label(Recipe(method=m, data=DataConfig(imbalance_ratio=10.0))) for m in list_methods()}
    # a step whose row names another step's label (the released reading of gsa) is labelled as that step, which the
    # run grid tells apart by the reading; every other method has its own label
    readings = {m: method_of(step_info(step).label, gkp) for m in list_methods()
                for step, gkp in [split_method(m)] if step_info(step).label}
    assert set(readings) == {"released", "gkp_released"}
    _pairwise_different({m: label for m, label in labels.items() if m not in readings})
    assert all(labels[m] == labels[read] for m, read in readings.items())


def test_every_direction_scale_and_weighting_is_its_own():
    g = torch.Generator().manual_seed(0)
    g_g, glob, momentum, theta = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(4))
    _pairwise_different({d: equations.ascent_direction(d, g_g, glob, momentum) for d in choices.DIRECTIONS})
    _pairwise_different({s: equations.scaled_norm(s, g_g, theta) for s in choices.SCALES})
    _pairwise_different({w: equations.group_weights(w, [3, 0, 5]) for w in choices.WEIGHTINGS})
    _pairwise_different({n: gkp_strength([1, 3], [10, 12], 100.0, n) for n in choices.GKP_NORMS})


def test_every_group_gradient_mode_and_perturbation_is_its_own():
    """One step of a BatchNorm model per option: masked (whole-batch BatchNorm in each group's gradient) and share
    (the batch gradient split by group) differ, as do one pass per group and one averaged pass."""
    x, y = _batch(n=24)
    thetas = {}
    for group_grads, perturbation in itertools.product(choices.GROUP_GRADS, choices.PERTURBATIONS):
        torch.manual_seed(0)
        model = Tiny(bn=True)
        # friendly: a direction whose batch-share average does not cancel (its first step ascends along g_g)
        step = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), scale="euclidean",
                          z=0.5, direction="friendly", group_grads=group_grads, perturbation=perturbation,
                          backend="reference")
        step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
        step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
        thetas[(group_grads, perturbation)] = _theta(model)
    _pairwise_different(thetas)


def test_every_backend_resolves_as_documented():
    """reference never runs the extension; fused always does (or raises); auto does where it has a kernel."""
    expected = {"auto": ops.fused_available(), "fused": True, "reference": False}
    assert set(expected) == set(choices.BACKENDS)
    for backend, fused in expected.items():
        if backend == "fused" and not ops.fused_available():
            with pytest.raises(RuntimeError, match="extension"):
                ops._use_fused("op", backend, torch.device("cpu"), 2)
        else:
            assert ops._use_fused("op", backend, torch.device("cpu"), 2) is fused, backend
    with pytest.raises(ValueError, match="backend must be one of"):
        ops._use_fused("op", "no_such_option", torch.device("cpu"), 2)


def test_every_classifier_lr_scale_scheduler_and_bank_dtype_is_its_own():
    from timm.scheduler import create_scheduler_v2

    encoder = torch.nn.Identity()
    _pairwise_different({c: type(LTModel(encoder, 4, 3, classifier=c).classifier) for c in choices.CLASSIFIERS})
    _pairwise_different({s: scaled_lr(OptimConfig(lr_base=0.1, lr_base_size=256, lr_base_scale=s), 1024)
                         for s in choices.LR_BASE_SCALES})
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    # "none" keeps optim.lr (the engine makes no scheduler); the others are timm's
    scheds = {s: type(create_scheduler_v2(opt, sched=s, num_epochs=10)[0]) for s in choices.SCHEDULERS if s != "none"}
    _pairwise_different(scheds)
    _pairwise_different({d: MemoryBank(3, d).dtype for d in choices.BANK_DTYPES})
    theta = torch.ones(4)
    for d in choices.STATE_DTYPES:
        bank = MemoryBank(3, "fp32")
        bank.update(torch.zeros(3), theta)
        assert bank.anchors(np.array([0, 0, 1]), 2, dtype=DTYPES[d]).dtype == DTYPES[d]


def test_every_dataset_has_its_reader_and_constants():
    in_memory = list_datasets(in_memory=True)
    assert {"digits", "fmnist", *CIFAR_LAYOUT} == set(in_memory)
    assert all(callable(dataset_info(n).reader) and dataset_info(n).mean is not None for n in in_memory)
    assert tuple(DATASETS) == list_datasets() == in_memory + list_datasets(in_memory=False)


def test_every_augment_and_sampler_is_its_own():
    tfs = {a: repr(build_transforms("cifar10", DataConfig(dataset="cifar10", imbalance_ratio=10.0, augment=a), 3, 32)[0])
           for a in choices.AUGMENTS}
    _pairwise_different(tfs)
    for augment in choices.IN_MEMORY_AUGMENTS:  # image files take timm's policies: the data section says so
        with pytest.raises(ConfigError, match="data.augment=basic and data.auto_augment"):
            load_config("imagenet_lt_resnet50", [f"data.augment={augment}"])
    targets = np.repeat(np.arange(3), [20, 5, 1])
    _pairwise_different({m: list(EpochSampler(targets, m, seed=0)) for m in choices.SAMPLERS})
