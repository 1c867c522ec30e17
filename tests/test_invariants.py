"""Invariant (a) end to end: at zero strength, method=gkp_gsa trains the same model as method=none on digits.

Zero strength: gkp.lam=0, gsa.z=0, gsa.rho_clamp=null, alpha 1 -> 1. The memory bank is updated every epoch and
groups, anchors and Fisher are rebuilt every other epoch; none of it may touch the training random stream, the
sampler or the BatchNorm running statistics, and the step itself must be the plain step. Checked for the CE base and
for BCL (two random contrastive views per image, projection heads, cosine classifier).
"""
import csv

import pytest

from lt_recipes.config import load_recipe
from lt_recipes.engine import run

ZERO = ["gkp.lam=0", "gsa.z=0", "gsa.rho_clamp=null", "alpha.start=1.0", "alpha.end=1.0"]
SHORT = ["epochs=4", "groups.start_epoch=1", "groups.interval=2", "data.eval_batch_size=256"]
BCL = ["loss.name=bcl", "data.contrastive_views=2", "model.proj_head=[32, 16]", "model.classifier=cosine"]


def _train(tmp_path, name, sets):
    out = tmp_path / name
    res = run(load_recipe("digits_lt", SHORT + sets), str(out))
    with open(out / "summary.csv") as f:
        return res, [float(r["train_loss"]) for r in csv.DictReader(f)]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("base,group_grads", [("ce", "masked"), ("bcl", "share")])
def test_zero_strength_trains_the_base_model(tmp_path, base, group_grads):
    extra = BCL if base == "bcl" else []
    plain, plain_losses = _train(tmp_path, "plain", extra + ["method=none"])
    grouped, grouped_losses = _train(tmp_path, "grouped", extra + ["method=gkp_gsa", f"gsa.group_grads={group_grads}"]
                                     + ZERO)
    assert grouped["method"].startswith(f"{base}+gkp+gsa")
    for epoch, (a, b) in enumerate(zip(plain_losses, grouped_losses)):
        assert b == pytest.approx(a, rel=1e-4), f"epoch {epoch}: train loss {a} (base) vs {b} (zero strength)"
    assert abs(grouped["top1"] - plain["top1"]) <= 1.0
