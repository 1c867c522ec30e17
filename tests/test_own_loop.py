"""The own-loop API says what it needs where it is given: set_gkp's shapes and dtypes, gkp_strength's norm, one
create_step signature for every step, the head found by timm's names, the plain step until groups exist."""
import math

import pytest
import timm
import torch
from torch import nn

import lt_recipes.models  # noqa: F401  (registers resnet8_cifar)
from lt_recipes.gkp import estimate_fisher, gkp_strength
from lt_recipes.models import head_rule
from lt_recipes.steps import GroupedSAM, create_step, list_steps, step_info

COUNTS = [30, 20, 10, 5]


class Net(nn.Module):
    """A small net whose head is named `head_name` (timm's usual names: fc, head, classifier)."""

    def __init__(self, head_name: str = "fc"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        setattr(self, head_name, nn.Linear(5, 4))
        self.head_name = head_name

    def forward(self, x):
        return getattr(self, self.head_name)(self.body(x))


def _grouped(model=None):
    model = model or Net()
    return model, GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_set_gkp_checks_shapes_and_dtypes_naming_the_expected_shape():
    _, gsa = _grouped()
    d = gsa.num_covered
    assert d == 3 * 5 + 5  # the body only
    gsa.set_groups([0, 0, 1, 1], [50, 15])
    good = dict(anchors=torch.zeros(2, d), fisher=torch.ones(2, d), strength=gkp_strength([2, 2], [50, 15], 1.0,
                                                                                        "per_samples"))
    gsa.set_gkp(**good)
    gsa.set_gkp(good["anchors"].bfloat16(), good["fisher"].bfloat16(), good["strength"])  # gkp.state_dtype bf16
    for bad, message in [(dict(anchors=torch.zeros(2, d + 4)), rf"anchors must be \[G, {d}\]"),
                         (dict(fisher=torch.ones(d)), rf"fisher must be \[G, {d}\]"),
                         (dict(fisher=torch.ones(3, d)), rf"fisher must be \[G, {d}\].*got \[3, {d}\]"),
                         (dict(anchors=torch.zeros(2, d, dtype=torch.int64)), "anchors must be torch.float32"),
                         (dict(strength=torch.ones(3)), r"strength must be a floating \[G\] = \[2\]"),
                         (dict(anchors=torch.zeros(1, d), fisher=torch.ones(1, d), strength=torch.ones(1)),
                          "group ids up to 1 but 1 anchor rows")]:
        with pytest.raises(ValueError, match=message):
            gsa.set_gkp(**{**good, **bad})


def test_gkp_strength_refuses_a_misspelled_norm():
    assert gkp_strength([2, 1], [30, 5], 10.0, "per_classes").tolist() == [2.5, 5.0]
    for norm in ("per_sample", "bogus"):
        with pytest.raises(ValueError, match="norm must be one of per_samples, per_classes"):
            gkp_strength([2, 1], [30, 5], 10.0, norm)


def test_create_step_takes_the_same_run_facts_for_every_step():
    """class_counts and head_losses are accepted by every step and passed to those that use them."""
    for name in list_steps():
        model = Net("classifier")
        step = create_step(name, model, torch.optim.SGD(model.parameters(), lr=0.1), class_counts=COUNTS,
                           head_losses=lambda z, y: nn.functional.cross_entropy(z, y, reduction="none"))
        assert step.num_covered == 20, name
    for name in (s for s in list_steps() if "class_counts" in step_info(s).uses):
        model = Net()
        with pytest.raises(TypeError, match="needs class_counts"):
            create_step(name, model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("head", ["fc", "head", "classifier"])
def test_the_head_is_found_by_timms_names_and_the_step_says_what_it_covers(head, caplog):
    model = Net(head)
    with caplog.at_level("INFO", logger="lt_recipes"):
        _, gsa = _grouped(model)
    assert gsa.num_covered == 20 and f"leaves out the head: {head}.weight, {head}.bias" in caplog.text
    body = torch.cat([p.detach().reshape(-1) for p in model.body.parameters()])
    assert torch.equal(gsa.covered, body)  # the flat vector bank.update takes, in named_parameters order


def test_get_classifier_names_the_head_of_a_timm_model():
    model = timm.create_model("resnet8_cifar", num_classes=4, in_chans=1)
    rule = head_rule(model)
    assert [n for n, _ in model.named_parameters() if rule(n)] == ["head.fc.weight", "head.fc.bias"]


def test_a_model_without_a_known_head_is_covered_whole_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    _, gsa = _grouped(model)
    assert gsa.num_covered == sum(p.numel() for p in model.parameters()) and "cover all of its parameters" in \
        caplog.text


def test_grouped_step_before_set_groups_names_the_plain_step():
    model, gsa = _grouped()
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 3] * 2)
    loss_fn = lambda idx: nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"set_groups\(group_of_class, group_sizes\) first.*plain_step"):
        gsa.step(loss_fn, y)
    stats = gsa.plain_step(loss_fn, y)
    assert math.isfinite(stats.loss)


def test_estimate_fisher_takes_named_arguments():
    model = Net()
    x, y = torch.randn(12, 3), torch.tensor([0, 1, 2, 3] * 3)
    data = torch.utils.data.TensorDataset(x, y)
    anchors = torch.zeros(2, 20)
    with pytest.raises(TypeError):
        estimate_fisher(model, None, data, y.numpy(), [0, 0, 1, 1], anchors)  # noqa: the old positional form
    fisher = estimate_fisher(model, dataset=data, targets=y, group_of_class=[0, 0, 1, 1], anchors=anchors,
                             batch_size=4)
    assert fisher.shape == (2, 20) and fisher.dtype == torch.float32 and bool((fisher > 0).any())
