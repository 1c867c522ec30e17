"""timm's GPU options as recipe keys: `model.channels_last` (NHWC weights, set before a step flattens them, every
consumer of the flat order in one order) and `model.compile` (torch.compile of the steps' forward, exact for a step
or refused for it with a message naming the step).

The compile equality tests run inductor on the smallest BatchNorm net for 3 steps; inductor compiles take seconds
to tens of seconds on a CPU, so they compile the fewest graphs that show the property.
"""
import shutil

import pytest
import torch
import torch.nn.functional as F

from lt_recipes import choices
from lt_recipes.errors import ConfigError, ModelError
from lt_recipes.flat import flat_view, pack
from lt_recipes.method import compile_forward
from lt_recipes.sections import DataConfig, ModelConfig, Recipe
from lt_recipes.steps import PlainStep, create_step
from test_gsa import GROUP_OF_CLASS, GROUP_SIZES, SmallCNN, Tiny, _batch

COUNTS = [500, 200, 60, 25, 12, 5]
# the compile equality tests also run on a GPU where there is one (tools/device_check.sh: -k cuda)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
TOLERANCE = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "cuda": {"rtol": 1e-4, "atol": 1e-5}}


def _recipe(method, backend, **gsa):
    from lt_recipes.sections import GSAConfig
    return Recipe(method=method, data=DataConfig(imbalance_ratio=10.0), model=ModelConfig(compile=backend),
                  steps={"gsa": GSAConfig(**gsa)})


def _step(name, model, **kw):
    uses = {"imbsam": {"class_counts": COUNTS}, "focal_sam": {"class_counts": COUNTS},
            "cc_sam": {"class_counts": COUNTS, "rho": 0.5}}
    step = create_step(name, model, torch.optim.SGD(model.parameters(), lr=0.1), **uses.get(name, {}), **kw)
    if step.rows_per_group:
        step.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    return step


# ---- channels_last ---------------------------------------------------------------------------------------------
def test_flat_view_and_pack_follow_the_memory_order():
    w = torch.randn(3, 2, 2, 2).to(memory_format=torch.channels_last)
    vec = w.permute(0, 2, 3, 1).reshape(-1)  # NHWC: the order of w's memory
    assert torch.equal(flat_view(vec, w), w)
    assert torch.equal(pack([w.contiguous(), None], [w, torch.empty(2)]), torch.cat([vec, torch.zeros(2)]))


def test_channels_last_is_set_before_flattening_and_refused_after():
    from lt_recipes.models import create_lt_model
    model = create_lt_model(ModelConfig(channels_last=True), 6, 1)
    step = PlainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert step.flat.detached() == []
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 6
    step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)

    model = create_lt_model(ModelConfig(), 6, 1)
    step = PlainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.to(memory_format=torch.channels_last)  # re-allocates the 4-D weights outside the flat buffer
    assert len(step.flat.detached()) == len(convs)
    with pytest.raises(ModelError, match=rf"PlainStep: {len(convs)} parameters \(shapes .* no longer live in the "
                                         "step's flat buffer"):
        step.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)


# The digits recipe with GKP (bank anchors, batch-mean Fisher, the GKP gradient) strong enough to steer the weights
# (regrouped in epochs 1 and 2; with 2 epochs a Fisher in the logical order of the NHWC weights went unnoticed)
GKP_RUN = ["epochs=3", "method=gkp", "groups.start_epoch=1", "groups.interval=1", "gkp.lam=1.0e5", "alpha.start=0.5",
           "alpha.end=0.5", "data.val_per_class=5", "data.test_per_class=5"]


def _gkp_run(out, *sets):
    """The model weights at the end of a GKP_RUN with `sets` (one torch thread, as the other in-process runs)."""
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_recipe("digits_lt", GKP_RUN + list(sets)), str(out))
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def eager_gkp_run(tmp_path_factory):
    return _gkp_run(tmp_path_factory.mktemp("eager"))


def _same_weights(got, want):
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_channels_last_gkp_run_equals_a_contiguous_one(eager_gkp_run, tmp_path):
    """NHWC weights train to the contiguous run's weights: Fisher rows, anchors and theta share one order."""
    got = _gkp_run(tmp_path, "model.channels_last=true")
    assert got["encoder.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    _same_weights(got, eager_gkp_run)


# ---- compile ---------------------------------------------------------------------------------------------------
RETAINED = "differentiates one forward pass more than once"
RECOMPILES = "recompiles on every batch"
RECOMPILES_PER_COUNT = "recompiles for every count"


@pytest.mark.parametrize("method,gsa,refusals", [
    # the steps with one backward per forward compile with every backend
    *[(m, {}, {}) for m in ("none", "sam", "asam", "fsam", "cc_sam", "gkp", "gkp_sam")],
    # a second backward through one forward: exact with the tracing backends, wrong under inductor
    *[(m, {}, {"inductor": RETAINED}) for m in ("imbsam", "focal_sam", "gbg", "gsa", "gkp_gsa", "gkp_imbsam")],
    ("gsa", {"group_grads": "share"}, dict.fromkeys(choices.COMPILE_BACKENDS, RECOMPILES)),
    ("gsa", {"perturbation": "per_group"}, dict.fromkeys(choices.COMPILE_BACKENDS, RECOMPILES)),
    ("released", {}, dict.fromkeys(choices.COMPILE_BACKENDS, RECOMPILES_PER_COUNT)),
])
def test_compile_is_refused_with_the_step_and_why(method, gsa, refusals):
    from lt_recipes.steps import split_method
    for backend in choices.COMPILE_BACKENDS:
        recipe = _recipe(method, backend, **gsa)
        model = Tiny(bn=True)
        step_name = split_method(method)[0]
        step = create_step("gsa", model, torch.optim.SGD(model.parameters(), lr=0.1), **recipe.step_options("gsa")) \
            if step_name == "gsa" else _step(step_name, model)
        if backend not in refusals:
            assert compile_forward(recipe, model, step) is not model
            continue
        with pytest.raises(ConfigError, match=rf"model.compile={backend} is refused for method {method} "
                                              rf"\({type(step).__name__}\): .*{refusals[backend]}") as e:
            compile_forward(recipe, model, step)
        exact = [b for b in choices.COMPILE_BACKENDS if b not in refusals]
        assert str(e.value).endswith(f"set model.compile=null" + (f" or {' / '.join(exact)}" if exact else ""))
    assert compile_forward(_recipe(method, None, **gsa), model, step) is model


def test_compile_backends_are_torch_backends():
    assert set(choices.COMPILE_BACKENDS) <= set(torch._dynamo.list_backends(exclude_tags=()))


@pytest.mark.usefixtures("single_thread")
def test_the_default_recipe_refuses_inductor_before_training(tmp_path):
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run
    with pytest.raises(ConfigError, match="model.compile=inductor is refused for method gkp_gsa \\(GroupedSAM\\)"):
        run(load_recipe("digits_lt", ["model.compile=inductor"]), str(tmp_path))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_compiled_gkp_run_equals_eager(eager_gkp_run, tmp_path):
    """model.compile through the engine: the steps forward the compiled model (dynamo traced it), while the Fisher
    estimate's copy and evaluation run eagerly; the weights are the eager run's."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    _same_weights(_gkp_run(tmp_path, "model.compile=eager"), eager_gkp_run)
    assert counters["frames"]["ok"] > 0


def _three_steps(name, backend, device, **kw):
    """The weights after 3 steps on 3 batches of a BatchNorm net, its forward compiled with `backend` (None: eager),
    and the last step's group-gradient rows."""
    torch.manual_seed(0)
    model = Tiny(bn=True).to(device)
    step = _step(name, model, **kw)
    forward = model if backend is None else torch.compile(model, backend=backend)
    for seed in range(3):
        x, y = (t.to(device) for t in _batch(n=24, seed=seed + 1))
        step.step(lambda idx: F.cross_entropy(forward(x[idx]), y[idx], reduction="none"), y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), step.flat.rows.clone()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="no C++ compiler")
@pytest.mark.parametrize("device", DEVICES)
def test_inductor_plain_and_sam_steps_equal_eager(device):
    """The steps model.compile=inductor accepts: float32 tolerance over 3 steps (2 graphs each: training, and
    SAM's perturbed pass with BatchNorm's momentum 0)."""
    torch._dynamo.reset()
    for name in ("none", "sam"):
        want, _ = _three_steps(name, None, device)
        got, _ = _three_steps(name, "inductor", device)
        torch.testing.assert_close(got, want, **TOLERANCE[device], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_aot_eager_grouped_step_equals_eager(device):
    """The grouped step's masked group gradients (one backward per group through one forward) under aot_eager, the
    backend model.compile accepts for it: rows and weights as eager."""
    torch._dynamo.reset()
    want, want_rows = _three_steps("gsa", None, device, scale="euclidean", z=0.5)
    got, got_rows = _three_steps("gsa", "aot_eager", device, scale="euclidean", z=0.5)
    torch.testing.assert_close(got_rows, want_rows, **TOLERANCE[device])
    torch.testing.assert_close(got, want, **TOLERANCE[device])
