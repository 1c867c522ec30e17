"""The training run: data, model, loss, optimizer, method, epochs, evaluation, checkpoints and artifacts.

Runs the same way under `python train.py` and `accelerate launch train.py` (any number of processes, bf16/fp16/no
mixed precision). Every epoch reseeds all generators from (seed, epoch, rank) and the sampler is a function of
(seed, epoch), so resuming from the last epoch checkpoint reproduces an uninterrupted run exactly on the CPU.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from . import faults
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, atomic_write_csv, atomic_write_json, atomic_write_yaml,
                         load_checkpoint, save_checkpoint)
from .config import flatten
from .data import LTData, build_data, build_loaders
from .losses import create_loss
from .method import Method, NonFiniteError, create_method, method_label
from .metrics import format_table, split_report
from .models import create_lt_model

_logger = logging.getLogger(__name__)


# Recipe keys that may differ when a run is resumed: where things are and how fast they load, not what is trained.
RESUMABLE_CHANGES = frozenset({"data.root", "data.num_workers", "data.eval_batch_size", "log_interval",
                               "checkpoint_interval", "groups.bank_spill_dir", "gsa.backend", "model.pretrained_path"})


def _identity(cfg: dict[str, Any], data: LTData) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes from it: the main keys, named first in errors,
    then every other recipe key except RESUMABLE_CHANGES."""
    return {"recipe": cfg["name"], "dataset": cfg["data"]["dataset"],
            "imbalance_ratio": cfg["data"]["imbalance_ratio"], "num_classes": data.num_classes,
            "model": cfg["model"]["name"], "loss": cfg["loss"]["name"], "method": cfg["method"],
            "seed": cfg["seed"], "epochs": cfg["epochs"],
            "config": {k: v for k, v in flatten(cfg).items() if k not in RESUMABLE_CHANGES}}


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, (list, tuple)):
        return [x.to(device, non_blocking=True) for x in inputs]
    return inputs.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every sample in `loader`, gathered over processes, each sample exactly once."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for inputs, target in loader:
        with accelerator.autocast():
            logits = model(_to_device(inputs, accelerator.device))
        p, t = accelerator.gather_for_metrics((logits.argmax(dim=1), target.to(accelerator.device)))
        preds.append(p.cpu())
        targets.append(t.cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


class Trainer:
    """One training run in one output directory."""

    def __init__(self, cfg: dict[str, Any], output_dir: str, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.accelerator = accelerator or Accelerator()
        acc = self.accelerator
        set_seed(cfg["seed"])
        self.data = build_data(cfg)
        self.model = create_lt_model(cfg["model"], self.data.num_classes, self.data.in_chans).to(acc.device)
        self.criterion = create_loss(cfg["loss"], self.data.train_counts, cfg["epochs"]).to(acc.device)
        train_loader, val_loader, test_loader = build_loaders(self.data, cfg)
        self.method: Method = create_method(cfg, self.model, self.criterion, self.data, acc)
        o, s = cfg["optim"], cfg["sched"]
        optimizer = create_optimizer_v2(self.model, opt=o["opt"], lr=o["lr"], weight_decay=o["weight_decay"],
                                        momentum=o["momentum"], nesterov=o["nesterov"])
        self.scheduler = None
        if s["sched"] != "none":
            self.scheduler, _ = create_scheduler_v2(
                optimizer, sched=s["sched"], num_epochs=cfg["epochs"], decay_milestones=s["decay_milestones"],
                decay_epochs=s["decay_milestones"][0] if s["decay_milestones"] else 30, decay_rate=s["decay_rate"],
                min_lr=s["min_lr"], warmup_lr=s["warmup_lr"], warmup_epochs=s["warmup_epochs"])
        (self.ddp_model, self.optimizer, self.train_loader, self.val_loader,
         self.test_loader) = acc.prepare(self.model, optimizer, train_loader, val_loader, test_loader)
        self.method.bind(self.ddp_model, self.optimizer, self.val_loader)
        self.rows: list[dict[str, Any]] = []
        self.start_epoch = 0

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT_NAME)

    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "identity": _identity(self.cfg, self.data),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "method": self.method.state_dict(),
            "rows": self.rows,
        }

    def resume(self) -> None:
        """Continue from the checkpoint in the output directory (a fresh start when there is none yet)."""
        if not os.path.exists(self.checkpoint_path):
            _logger.info("no checkpoint in %s yet: starting from scratch", self.output_dir)
            return
        state = load_checkpoint(self.checkpoint_path, expect=_identity(self.cfg, self.data))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict(state["method"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.checkpoint_path} does not fit this run: {e}") from None
        self.rows = list(state["rows"])
        self.start_epoch = int(state["epoch"]) + 1
        _logger.info("resumed from %s at epoch %d", self.checkpoint_path, self.start_epoch)

    # ---- training -------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        acc = self.accelerator
        self.method.epoch_start(epoch)
        self.criterion.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)  # Accelerate's loader passes it on to our EpochSampler
        self.ddp_model.train()
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False,
                   disable=not acc.is_main_process or not sys.stderr.isatty())
        for step, (inputs, targets) in enumerate(bar):
            loss = self.method.train_step(_to_device(inputs, acc.device), targets.to(acc.device), epoch, step)
            faults.hit("step")
            if loss is not None:
                total += loss
                count += 1
                bar.set_postfix(loss=f"{loss:.4f}")
        return {"train_loss": total / max(count, 1)}

    def fit(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            atomic_write_yaml(os.path.join(self.output_dir, "args.yaml"), cfg)
        for epoch in range(self.start_epoch, cfg["epochs"]):
            set_seed(_epoch_seed(cfg["seed"], epoch), device_specific=True)
            t0 = time.time()
            row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch(epoch))
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            preds, targets = predict(self.ddp_model, self.val_loader, acc)
            row["val_top1"] = 100.0 * (preds == targets).double().mean().item() if len(targets) else math.nan
            row.update(self.method.epoch_end(epoch))
            row["time"] = time.time() - t0
            self.rows.append(row)
            _logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in row.items()))
            if acc.is_main_process:
                atomic_write_csv(os.path.join(self.output_dir, "summary.csv"), self.rows)
                for name, obj in self.method.artifacts().items():
                    atomic_write_json(os.path.join(self.output_dir, name), obj)
                if (epoch + 1) % cfg["checkpoint_interval"] == 0 or epoch + 1 == cfg["epochs"]:
                    self._check_finite_weights(epoch)
                    save_checkpoint(self.checkpoint_path, self.state_dict(epoch))
            acc.wait_for_everyone()
        return self.report()

    def _check_finite_weights(self, epoch: int) -> None:
        bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"weights became non-finite by the end of epoch {epoch} ({', '.join(bad[:5])}); "
                                 "not writing a checkpoint (the previous one is kept)")

    def report(self) -> dict[str, Any]:
        """Final test evaluation; results.json from the main process."""
        acc, cfg = self.accelerator, self.cfg
        preds, targets = predict(self.ddp_model, self.test_loader, acc)
        rep = split_report(preds, targets, self.data.train_counts)
        results = {
            "recipe": cfg["name"], "method": method_label(cfg), "dataset": cfg["data"]["dataset"],
            "imbalance_ratio": cfg["data"]["imbalance_ratio"], "seed": cfg["seed"], "epochs": cfg["epochs"],
            "top1": rep["top1"], "many": rep["many"], "medium": rep["medium"], "few": rep["few"],
            "per_class": rep["per_class"], "train_counts": self.data.train_counts,
            "num_test_evaluated": int(len(targets)),
            "num_processes": acc.num_processes, "skipped_steps": self.method.skipped_steps,
        }
        if acc.is_main_process:
            atomic_write_json(os.path.join(self.output_dir, "results.json"), results)
            _logger.info("test results:\n%s", format_table(rep))
        acc.wait_for_everyone()
        return results


def run(cfg: dict[str, Any], output_dir: str, resume: bool = False, mixed_precision: str | None = None) -> dict[str, Any]:
    """Train `cfg` into `output_dir`; with `resume`, continue from the checkpoint there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Accelerate picks gloo on the CPU only when asked to: without this, torchrun on a machine without a GPU
    # would start independent single-process runs that overwrite each other's files.
    cpu = world > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu) if mixed_precision else Accelerator(cpu=cpu)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but Accelerate set up {accelerator.num_processes}")
    if not resume and os.path.exists(os.path.join(output_dir, CHECKPOINT_NAME)):
        raise CheckpointError(f"{output_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it "
                              "or choose another --output")
    trainer = Trainer(cfg, output_dir, accelerator)
    if resume:
        trainer.resume()
    return trainer.fit()
