"""Device-to-host synchronisations per step, counted for every registered step (with and without GKP, on BCL, the
base with the most passes through its loss) and for the engine's step loop, and held to their budgets
(docs/benchmarks.md): the plain step 1 (the non-finite check), the SAM-type steps 2 (the ascent's and the update's
non-finite checks; CC-SAM: the batch's classes and the update's check), the grouped steps 3 (the batch's group
counts, the group gradients' non-finite check, the update's)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lt_recipes.gkp import gkp_strength
from lt_recipes.host_sync import count_host_syncs, on_host
from lt_recipes.losses import BCL
from lt_recipes.models import LTModel, is_classifier, ordered_parameters
from lt_recipes.steps import create_step, list_steps, step_info
from lt_recipes.steps.core import StepStats

COUNTS = [50, 40, 30, 20, 10, 5]
GROUP_OF_CLASS = [0, 0, 1, 1, 2, 2]
GROUP_SAMPLES = [90, 50, 15]
BUDGET = {"none": 1, "sam": 2, "asam": 2, "fsam": 2, "imbsam": 2, "focal_sam": 2, "cc_sam": 2, "gbg": 3,
          "gsa": 3, "released": 3}


def test_the_counter_sees_each_kind_of_synchronisation():
    x = torch.randn(6)
    with count_host_syncs() as syncs:
        x.sum().item()
        float(x.max())
        if x.sum() > 0:  # bool() of a tensor
            pass
        x[x > 0]  # boolean-mask indexing
        torch.nonzero(x)
        x.tolist()
        torch.tensor([x[0], x[1]])  # a list of tensors
        torch.tensor([1.0, 2.0], device=x.device)  # a blocking host-to-device copy on a GPU
        torch.bincount(torch.tensor([1, 2]))
        x.cpu()
        with on_host():
            x.tolist()
        y = x * 2 + x[torch.arange(6, device=x.device).flip(0)]  # stays on the device
        torch.where(y > 0, y, 0.0)
    assert [name for name, _ in syncs.calls] == ["item", "__float__", "__bool__", "__getitem__", "nonzero", "tolist",
                                                 "tensor", "tensor", "bincount", "cpu"]
    assert all("test_host_sync.py" in where for _, where in syncs.calls)


def _model() -> nn.Module:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
                        nn.BatchNorm1d(10), nn.ReLU())
    return LTModel(enc, 10, len(COUNTS), classifier="cosine", proj_dims=(12, 8))


def _build(name: str, gkp: bool, options: dict | None = None):
    model, loss = _model(), BCL(COUNTS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    uses = step_info(name).uses
    kw = {k: {"class_counts": COUNTS, "head_losses": loss.classification_losses}[k] for k in uses}
    step = create_step(name, model, opt, **kw, **(options or {}))
    if name in ("gbg", "gsa", "released"):
        step.set_groups(GROUP_OF_CLASS, GROUP_SAMPLES)
    if gkp:
        covered, _ = ordered_parameters(model, is_classifier)
        n = sum(p.numel() for p in covered)
        g = torch.Generator().manual_seed(3)
        step.set_gkp(torch.randn(3, n, generator=g) * 0.1, torch.rand(3, n, generator=g),
                     gkp_strength([2, 2, 2], GROUP_SAMPLES, 10.0, "per_samples"), GROUP_OF_CLASS)
    return model, loss, step


def _batches(steps: int = 3, n: int = 16):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, len(COUNTS), (n,), generator=g)
        yield [x, x.flip(2), x.flip(3)], y


def step_syncs(name: str, gkp: bool, variant: dict | None = None) -> list[int]:
    """Host synchronisations of each of three steps of `name` (the first one sets FriendlySAM's momenta)."""
    model, loss, step = _build(name, gkp, variant)
    counts = []
    for views, y in _batches():
        with count_host_syncs() as syncs:
            stats = step.step(lambda idx: loss.per_sample(model, [v[idx] for v in views], y[idx]), y, alpha=0.8)
        assert isinstance(stats, StepStats) and not stats.skipped
        counts.append(syncs.count)
        assert syncs.count <= BUDGET[name], f"{name}{' + GKP' if gkp else ''}: {syncs}"
    return counts


KINDS = [(s, gkp) for s in list_steps() for gkp in (False, True)]


@pytest.mark.parametrize("name,gkp", KINDS, ids=[f"{'gkp_' if g else ''}{s}" for s, g in KINDS])
def test_every_step_keeps_its_synchronisation_budget(name, gkp):
    step_syncs(name, gkp)


@pytest.mark.parametrize("variant", [{"group_grads": "share"}, {"perturbation": "per_group"},
                                     {"perturbation": "averaged", "direction": "sam"}, {"direction": "friendly"},
                                     {"scale": "euclidean", "rho_clamp": None, "regularizer": True},
                                     {"group_grad_ema": 0.5}, {"batched": True}],
                         ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()))
def test_grouped_step_options_keep_the_budget(variant):
    step_syncs("gsa", True, variant)


def test_an_added_synchronisation_fails_the_budget(monkeypatch):
    """The budget test is not vacuous: one `.item()` more in a step's pass fails it."""
    from lt_recipes.steps import core

    upcast = core.upcast
    monkeypatch.setattr("lt_recipes.steps.sam.upcast", lambda t: (t.sum().item(), upcast(t))[1])
    with pytest.raises(AssertionError, match="item at"):
        step_syncs("sam", False)


@pytest.mark.usefixtures("single_thread")
def test_the_engine_step_loop_keeps_the_budget(tmp_path, monkeypatch):
    """method.train_step as the engine calls it, on digits with BCL + GKP + GSA: the grouped method's plain steps
    before the first grouping (1), its grouped steps after (3); the loss comes back on the device, unread."""
    from lt_recipes import grouping_cycle as method_mod
    from lt_recipes.config import load_recipe
    from lt_recipes.engine import run

    seen: list[tuple[bool, int]] = []
    inner = method_mod.GroupedMethod.train_step

    def counted(self, inputs, targets, epoch, step):
        with count_host_syncs() as syncs:
            loss = inner(self, inputs, targets, epoch, step)
        assert isinstance(loss, torch.Tensor)
        seen.append((self.memory_groups is not None, syncs.count))
        assert syncs.count <= (3 if self.memory_groups is not None else 1), str(syncs)
        return loss

    monkeypatch.setattr(method_mod.GroupedMethod, "train_step", counted)
    run(load_recipe("digits_lt", ["epochs=2", "groups.start_epoch=1", "method=gkp_gsa", "loss.name=bcl",
                                  "data.contrastive_views=2", "model.proj_head=[32, 16]", "model.classifier=cosine",
                                  "data.eval_batch_size=256"]), str(tmp_path))
    assert {grouped for grouped, _ in seen} == {False, True}
    assert max(n for grouped, n in seen if not grouped) == 1 and max(n for grouped, n in seen if grouped) == 3
