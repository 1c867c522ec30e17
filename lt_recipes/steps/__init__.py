"""Training steps on one core: the plain step, SAM and its long-tail peers, and the paper's grouped step.

`create_step(name, model, optimizer, **options)` builds any registered step (`list_steps()`); every step has
`step(loss_fn, targets, alpha=1.0) -> StepStats`, where `loss_fn(idx)` returns the per-sample losses of batch rows
`idx`. The registry imports nothing heavy; the classes below load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .registry import (GKP_PREFIX, StepInfo, create_step, list_methods, list_steps, method_modules, method_of,
                       register_step, split_method, step_class, step_info, uses_memory_groups)

# public name -> module that defines it (imported on first access, so importing the registry stays torch-free)
_LAZY = {"StepCore": "core", "StepStats": "core", "LossScaler": "core", "LossFn": "core", "TrainingRun": "core",
         "PlainStep": "plain",
         "SAM": "sam", "ASAM": "sam", "FriendlySAM": "sam", "ImbSAM": "sam", "FocalSAM": "sam", "CCSAM": "cc_sam",
         "GBG": "gbg", "GroupedSAM": "gsa", "ReleasedGSA": "released"}

__all__ = ["GKP_PREFIX", "StepInfo", "create_step", "list_methods", "list_steps", "method_modules", "method_of",
           "register_step", "split_method", "step_class", "step_info", "uses_memory_groups", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
