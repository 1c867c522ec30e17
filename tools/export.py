#!/usr/bin/env python3
"""Export a trained run's weights as a timm state dict.

    python tools/export.py RUN_DIR [--best] [--ema] [--out FILE.safetensors|FILE.pth] [--recipe R]

Reads RUN_DIR/args.yaml (or the recipe R) and checkpoint.pt (model_best.pt with --best; the EMA weights with --ema)
and writes the backbone under timm's own keys (our `encoder.` prefix dropped). A plain linear classifier goes under
the timm model's classifier key (e.g. `fc` for ResNets, `head.fc` for the CIFAR ResNets), so that

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=C), num_classes=C)

is the trained model (num_classes in the overlay too: timm drops a pretrained classifier whose class count differs
from the architecture's default). The overlay also carries the run's evaluation preprocessing (input size and
channels, mean/std, interpolation, crop_pct), so `timm.data.resolve_data_config(model=model)` preprocesses as the run
did; the same pretrained_cfg is written beside the weights as FILE.json in the form of timm's config.json (renamed
config.json, beside the weights renamed model.safetensors, a folder loads with `timm.create_model("local-dir:DIR")`).
A cosine classifier (scale * cos(x, w)) has no timm layer, and the BCL heads (proj_head, proto_head) are for training
only: then the file holds the backbone alone, the tool says so, and `num_classes=0` gives the feature extractor. The
CIFAR ResNets need `import lt_recipes.models` first (it registers them). The tool checks its own output: the timm
model built from the file must reproduce the run's logits (or features) on a random batch. Default FILE:
RUN_DIR/<checkpoint name>[_ema].safetensors.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
from typing import Any

import timm
import torch
from safetensors.torch import save as safetensors_bytes

from lt_recipes.checkpoint import (BEST_NAME, CHECKPOINT_NAME, atomic_write_bytes, atomic_write_json,
                                   check_output_dir, evaluation_identity, load_checkpoint)
from lt_recipes.config import load_recipe
from lt_recipes.data import dataset_info, eval_data_config
from lt_recipes.errors import CheckpointError, LTRecipesError
from lt_recipes.models import LTModel, create_lt_model

_logger = logging.getLogger("export")


def timm_state_dict(model: LTModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the model's weights under the timm backbone's keys, names of the parts left out)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.encoder.state_dict().items()}
    left_out = [name for name in ("proj_head", "proto_head") if getattr(model, name) is not None]
    if isinstance(model.classifier, torch.nn.Linear):
        key = model.encoder.pretrained_cfg["classifier"]
        state[f"{key}.weight"] = model.classifier.weight.detach().cpu().clone()
        state[f"{key}.bias"] = model.classifier.bias.detach().cpu().clone()
    else:
        left_out.insert(0, f"classifier ({type(model.classifier).__name__})")
    return state, left_out


def _write(path: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if path.endswith(".safetensors"):
        data = safetensors_bytes(state, metadata=metadata)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    atomic_write_bytes(path, data)


def overlay(path: str, num_classes: int, data_config: dict[str, Any],
            architecture_cfg: dict[str, Any]) -> dict[str, Any]:
    """timm's pretrained_cfg_overlay for the file: its class count and the run's data config (`eval_data_config`),
    also as the test-time size and crop where the architecture's own cfg has them (timm would use those otherwise)."""
    test = {f"test_{k}": data_config[k] for k in ("input_size", "crop_pct") if f"test_{k}" in architecture_cfg}
    return dict(file=path, num_classes=num_classes, **data_config, **test)


@torch.no_grad()
def check_in_timm(model: LTModel, name: str, cfg_overlay: dict[str, Any]) -> float:
    """Build the timm model from the exported file and return the largest difference from the run's outputs."""
    num_classes, input_size = cfg_overlay["num_classes"], cfg_overlay["input_size"]
    timm_model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=input_size[0],
                                   pretrained_cfg_overlay=cfg_overlay).eval()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    want = model.eval()(x) if num_classes else model.eval().forward_features(x)
    return float((timm_model(x) - want).abs().max())


def export(run_dir: str, best: bool = False, ema: bool = False, out: str | None = None,
           recipe: str | None = None) -> dict[str, Any]:
    """Write the timm state dict of a run; returns what was written and how to load it. The model is built from the
    run's args.yaml, or from `recipe` when given (its data and model must match the checkpoint's)."""
    if recipe is None and not os.path.isfile(os.path.join(run_dir, "args.yaml")):
        raise CheckpointError(f"{run_dir} is not a training run directory (no args.yaml; --recipe names the recipe "
                              "of a checkpoint without one)")
    typed = load_recipe(recipe or os.path.join(run_dir, "args.yaml"))
    ckpt = os.path.join(run_dir, BEST_NAME if best else CHECKPOINT_NAME)
    stem = os.path.splitext(os.path.basename(ckpt))[0] + ("_ema" if ema else "")
    path = os.path.abspath(out or os.path.join(run_dir, f"{stem}.safetensors"))
    check_output_dir(os.path.dirname(path))  # before the checkpoint is read and the model built
    state = load_checkpoint(ckpt, expect=evaluation_identity(typed.to_dict()))
    key = "ema" if ema else "model"
    if state.get(key) is None:
        raise CheckpointError(f"{ckpt} holds no {key} weights" + (" (the run had ema.decay=null)" if ema else ""))
    num_classes, in_chans = state["identity"]["num_classes"], dataset_info(typed.data.dataset).in_chans
    data_config = eval_data_config(typed.data.dataset, typed.data, in_chans)
    model = create_lt_model(dataclasses.replace(typed.model, pretrained_path=None), num_classes, in_chans)
    try:
        model.load_state_dict(state[key])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt} does not fit the model of {run_dir}/args.yaml: {e}") from None
    weights, left_out = timm_state_dict(model)
    name = typed.model.name
    head = 0 if left_out and left_out[0].startswith("classifier") else num_classes
    cfg_overlay = overlay(path, head, data_config, model.encoder.pretrained_cfg)
    pretrained_cfg = {k: v for k, v in {**model.encoder.pretrained_cfg, **cfg_overlay}.items() if k != "file"}
    _write(path, weights, {"architecture": name, "num_classes": str(head), "source": os.path.abspath(ckpt),
                           "pretrained_cfg": json.dumps(pretrained_cfg)})
    config_path = os.path.splitext(path)[0] + ".json"
    atomic_write_json(config_path, {"architecture": name, "num_classes": head, "model_args": {"in_chans": in_chans},
                                    "pretrained_cfg": pretrained_cfg})
    diff = check_in_timm(model, name, cfg_overlay)
    # the CIFAR ResNets are registered with timm by lt_recipes.models: the printed code imports it for them
    imports = "import timm, lt_recipes.models" if type(model.encoder).__module__.startswith("lt_recipes") \
        else "import timm"
    call = (f"{imports}\nmodel = timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={cfg_overlay}, "
            f"num_classes={head}" + (f", in_chans={in_chans})" if in_chans != 3 else ")"))
    return {"path": path, "config": config_path, "num_classes": head, "left_out": left_out, "max_abs_diff": diff,
            "call": call, "data_config": data_config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (args.yaml, checkpoint.pt)")
    p.add_argument("--best", action="store_true", help="export model_best.pt instead of the last checkpoint")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with ema.decay set)")
    p.add_argument("--out", default=None, help="output file, .safetensors or .pth (default: in RUN_DIR)")
    p.add_argument("--recipe", default=None, help="recipe to build the model from (default: RUN_DIR/args.yaml)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = export(args.run_dir, args.best, args.ema, args.out, args.recipe)
    except LTRecipesError as e:
        _logger.error("%s", e)
        return 2
    what = "backbone and classifier" if res["num_classes"] else "backbone only"
    print(f"wrote {res['path']} ({what}) and its pretrained_cfg {res['config']}")
    if res["left_out"]:
        print(f"left out: {', '.join(res['left_out'])} (no timm equivalent / training-only); the file is the backbone "
              "(num_classes=0 gives pooled features)" if res["num_classes"] == 0 else
              f"left out: {', '.join(res['left_out'])} (training-only heads)")
    print(f"checked in timm: largest difference from the run's {'logits' if res['num_classes'] else 'features'} "
          f"{res['max_abs_diff']:.3g}")
    print(f"load it with:\n{res['call']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
