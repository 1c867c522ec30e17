"""Optimizers: every timm optimizer gets only the arguments it takes; timm's lr rule; SAM and GKP+GSA train on top
of SGD, AdamW and LAMB."""
import math

import pytest
import torch
from timm.optim import Lamb, get_optimizer_info, list_optimizers

from lt_recipes.sections import OptimConfig
from lt_recipes.config import load_recipe
from lt_recipes.optim import OptimizerError, create_optimizer, scaled_lr


def _optim(**kw):
    return OptimConfig(**kw)


@pytest.mark.parametrize("name", list_optimizers())
def test_every_timm_optimizer_gets_only_the_arguments_it_takes(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    info = get_optimizer_info(name)
    cuda_only = isinstance(info.opt_class, str) and info.opt_class.startswith(("apex.", "bitsandbytes."))
    if info.second_order or (cuda_only and not torch.cuda.is_available()):
        with pytest.raises(OptimizerError, match=f"optim.opt='{name}'"):
            create_optimizer(model, _optim(opt=name), 64)
        return
    opt = create_optimizer(model, _optim(opt=name, nesterov=False), 64)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    group = opt.param_groups[0]
    assert group["lr"] == 0.1
    if "nesterov" in group and name not in ("sgd", "momentum"):
        assert group["nesterov"] is False  # the recipe's value reached the optimizers that take one
    assert all(math.isfinite(float(p.sum())) for p in model.parameters())


def test_sgd_keeps_the_recipe_nesterov_and_momentum_adamw_gets_neither():
    model = torch.nn.Linear(4, 3)
    sgd = create_optimizer(model, _optim(opt="sgd", momentum=0.8, nesterov=False), 64).param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"]) == (0.8, False)  # timm's own sgd default is nesterov=True
    adamw = create_optimizer(model, _optim(opt="adamw", lr=1e-3, betas=[0.8, 0.9], eps=1e-6), 64).param_groups[0]
    assert "momentum" not in adamw and "nesterov" not in adamw and adamw["betas"] == (0.8, 0.9) and adamw["eps"] == 1e-6


def test_lr_rule_follows_timm():
    assert scaled_lr(_optim(lr=0.3), 1024) == 0.3  # no lr_base: optim.lr as given
    assert scaled_lr(_optim(lr_base=0.1, lr_base_size=256), 512) == pytest.approx(0.2)  # sgd: linear
    assert scaled_lr(_optim(opt="adamw", lr_base=1e-3, lr_base_size=256), 1024) == pytest.approx(2e-3)  # sqrt
    assert scaled_lr(_optim(opt="lamb", lr_base=1e-3, lr_base_size=256, lr_base_scale="linear"), 1024) == \
        pytest.approx(4e-3)
    assert scaled_lr(_optim(lr_base=0.1, lr_base_size=256, lr_base_scale="sqrt"), 64) == pytest.approx(0.05)


BASE_OPTIMIZERS = {"sgd": (torch.optim.SGD, "momentum_buffer", 0.05),
                   "adamw": (torch.optim.AdamW, "exp_avg", 1e-3),
                   "lamb": (Lamb, "exp_avg", 1e-3)}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("method", ["sam", "gkp_gsa"])
@pytest.mark.parametrize("opt", sorted(BASE_OPTIMIZERS))
def test_sam_and_gkp_gsa_step_through_each_base_optimizer(method, opt, tmp_path):
    """The method's step ends in the base optimizer's step: its state fills, the loss stays finite, GSA perturbs."""
    from lt_recipes.engine import Trainer

    cls, state_key, lr = BASE_OPTIMIZERS[opt]
    cfg = load_recipe("digits_lt", [f"method={method}", f"optim.opt={opt}", f"optim.lr={lr}", "epochs=2",
                                    "groups.start_epoch=1", "data.batch_size=128", "sched.warmup_epochs=0"])
    trainer = Trainer(cfg, str(tmp_path))
    res = trainer.fit()
    base = trainer.optimizer.optimizer
    assert type(base) is cls
    assert all(state_key in s for s in base.state.values()) and len(base.state) == len(list(trainer.model.parameters()))
    assert res["skipped_steps"] == 0 and all(math.isfinite(r["train_loss"]) for r in trainer.rows)
    if method == "gkp_gsa":
        assert trainer.rows[1]["rho_g0"] > 0 and trainer.rows[1]["num_groups"] >= 1
