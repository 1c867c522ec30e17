"""The recipe's optimizer through timm's registry (`optim` section), with timm's learning-rate rule.

Any name of `timm.optim.list_optimizers()` works (or `lookahead_<name>`). timm's factory passes `momentum` only to
optimizers that have one; the other optional keys (`nesterov`, `eps`, `betas`) are passed only when the optimizer's
constructor takes them, so `optim.opt=adamw` never receives `nesterov`. The optimizer is the base optimizer of
SAM / GSA / GKP+GSA too: those steps call its `step()` on the gradients they assemble.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, get_optimizer_info

from .errors import OptimizerError
from .sections import OptimConfig

_logger = logging.getLogger(__name__)

# Optional recipe keys, passed only to optimizers whose constructor names them (momentum goes through timm).
_OPTIONAL_ARGS = ("nesterov", "eps", "betas")


def scaled_lr(optim_cfg: OptimConfig, global_batch_size: int) -> float:
    """`optim.lr`, or with `optim.lr_base` set timm's rule: lr_base * global_batch / lr_base_size (`linear`) or its
    square root (`sqrt`); unset `lr_base_scale` means sqrt for Ada*/LAMB optimizers and linear otherwise, as timm."""
    if optim_cfg.lr_base is None:
        return float(optim_cfg.lr)
    scale = optim_cfg.lr_base_scale
    if scale is None:
        scale = "sqrt" if any(o in optim_cfg.opt.lower() for o in ("ada", "lamb")) else "linear"
    ratio = global_batch_size / optim_cfg.lr_base_size
    return float(optim_cfg.lr_base) * (ratio ** 0.5 if scale == "sqrt" else ratio)


def optimizer_args(optim_cfg: OptimConfig) -> tuple[dict[str, Any], list[str]]:
    """(optional arguments the optimizer's constructor takes, names of set optional keys it does not take)."""
    name = optim_cfg.opt.lower().split("_")[-1]
    try:
        info = get_optimizer_info(name)
        params = inspect.signature(get_optimizer_class(info, bind_defaults=False)).parameters
    except (ValueError, ImportError, AssertionError) as e:  # unknown name, missing package, CUDA-only class
        raise OptimizerError(f"optim.opt={optim_cfg.opt!r} cannot be created here: {e}") from None
    if info.second_order:
        raise OptimizerError(f"optim.opt={optim_cfg.opt!r} is a second-order optimizer: it needs "
                             "backward(create_graph=True), which these training steps do not run")
    wanted = {k: getattr(optim_cfg, k) for k in _OPTIONAL_ARGS if getattr(optim_cfg, k) is not None}
    unused = [k for k in wanted if k not in params]
    if "momentum" not in params:
        unused.insert(0, "momentum")
    return {k: (tuple(v) if k == "betas" else v) for k, v in wanted.items() if k in params}, unused


def create_optimizer(model: torch.nn.Module, optim_cfg: OptimConfig,
                     global_batch_size: int) -> torch.optim.Optimizer:
    """timm's optimizer for `model` (no weight decay on biases and norm weights, as timm) at `scaled_lr`."""
    lr = scaled_lr(optim_cfg, global_batch_size)
    kwargs, unused = optimizer_args(optim_cfg)
    optimizer = create_optimizer_v2(model, opt=optim_cfg.opt, lr=lr, weight_decay=optim_cfg.weight_decay,
                                    momentum=optim_cfg.momentum, **kwargs)
    rule = "" if optim_cfg.lr_base is None else (
        f" (optim.lr_base {optim_cfg.lr_base:g} x global batch {global_batch_size} / {optim_cfg.lr_base_size}"
        f", {optim_cfg.lr_base_scale or 'timm default scale'})")
    _logger.info("optimizer %s%s: lr %.6g%s%s", optim_cfg.opt, "".join(f", {k}={v}" for k, v in kwargs.items()),
                 lr, rule, f"; {optim_cfg.opt} takes no {', '.join(unused)}: not passed" if unused else "")
    return optimizer
