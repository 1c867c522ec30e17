"""timm's GPU options as recipe keys: `model.channels_last` (NHWC weights, set before a step flattens them, every
consumer of the flat order in one order) and `model.compile` (torch.compile of the steps' forward, exact for a step
or refused for it with a message naming the step).

The compile equality tests run inductor on the smallest BatchNorm net for 3 steps; inductor compiles take seconds
to tens of seconds on a CPU, so they compile the fewest graphs that show the property.
"""
import copy

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


def _recipe(method, backend, **gsa):
    from lt_recipes.sections import GSAConfig
    return Recipe(method=method, data=DataConfig(imbalance_ratio=10.0), model=ModelConfig(compile=backend),
                  gsa=GSAConfig(**gsa))


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


@pytest.mark.usefixtures("single_thread")
def test_channels_last_gkp_run_equals_a_contiguous_one(tmp_path):
    """The digits recipe with GKP (bank anchors, batch-mean Fisher, the GKP gradient) strong enough to steer the
    weights: NHWC weights train to the contiguous run's weights, so Fisher rows, anchors and theta share one order."""
    from lt_recipes.config import load_config
    from lt_recipes.engine import run

    sets = ["epochs=3", "method=gkp", "groups.start_epoch=1", "groups.interval=1", "gkp.lam=1.0e5",
            "alpha.start=0.5", "alpha.end=0.5", "data.val_per_class=5", "data.test_per_class=5"]
    states = {}
    for channels_last in (False, True):
        out = tmp_path / str(channels_last)
        run(load_config("digits_lt", sets + [f"model.channels_last={str(channels_last).lower()}"]), str(out))
        states[channels_last] = torch.load(out / "checkpoint.pt", weights_only=False)
    want, got = states[False]["model"], states[True]["model"]
    assert got["encoder.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
