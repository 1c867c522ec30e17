"""The training run: data, model, loss, optimizer, method, epochs, evaluation, checkpoints and artifacts.

Runs the same way under `python train.py`, `accelerate launch train.py` and `torchrun train.py` (any number of
processes, bf16/fp16/no mixed precision); `data.batch_size` is per process. Every epoch reseeds all generators from
(seed, epoch, rank) and the sampler is a function of (seed, epoch), so resuming from the last epoch checkpoint
reproduces an uninterrupted run exactly on the CPU. Only the main process logs and writes files; per-epoch
metrics are reduced over all processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from typing import Any, Mapping

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import faults
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, atomic_write_csv, atomic_write_json, atomic_write_text,
                         check_identity, check_output_dir, evaluation_identity, has_checkpoint, load_checkpoint,
                         load_resumable, previous_path, save_checkpoint, size_report)
from .config import flatten
from .sections import Recipe
from .data import LTData, build_data, build_loaders, normalize_uint8
from .distributed import check_data_root, check_same_resume
from .errors import CheckpointError, ConfigError, NonFiniteError
from .labels import method_label
from .losses import create_loss
from .method import Method, create_method
from .metrics import format_table, split_report, topk_accuracy
from .models import create_lt_model
from .optim import create_optimizer, scaled_lr

_logger = logging.getLogger(__name__)

# Recipe keys that may differ when a run is resumed: where things are, how fast and how they are logged, not what is
# trained (data.num_workers changes nothing but speed: each draw is augmented from its own seed, lt_recipes.data.loader;
# data.eval_batch_size stays: it is the Fisher's batch unless gkp.fisher_batch_size is set).
RESUMABLE_CHANGES = frozenset({"data.root", "data.num_workers", "log_interval", "log_with", "checkpoint_interval",
                               "groups.bank_spill_dir", "gsa.backend", "gsa.batched", "gsa.batch_chunk",
                               "model.pretrained_path"})
# The parts of the launch (`_launch`) a resumed run must keep: they change the numbers a run computes.
LAUNCH_IDENTITY = ("mixed_precision", "num_processes")

TRACKER_PROJECT = "lt-recipes"  # Accelerate's project name: tensorboard logs to <output>/lt-recipes


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint is kept and how to continue. train.py logs it as one
    line and exits with code 130 (not a user-input error of lt_recipes.errors: a KeyboardInterrupt still)."""


def _identity(cfg: dict[str, Any], data: LTData) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes from it: the main keys, named first in errors,
    then every other recipe key except RESUMABLE_CHANGES."""
    return {"recipe": cfg["name"], "dataset": cfg["data"]["dataset"],
            "imbalance_ratio": cfg["data"]["imbalance_ratio"], "num_classes": data.num_classes,
            "model": cfg["model"]["name"], "loss": cfg["loss"]["name"], "method": cfg["method"],
            "seed": cfg["seed"], "epochs": cfg["epochs"],
            "config": {k: v for k, v in flatten(cfg).items() if k not in RESUMABLE_CHANGES}}


def _launch(accelerator: Accelerator) -> dict[str, Any]:
    """How the run was launched, beside its recipe: the resolved mixed precision, the process count and the device
    type (args.yaml, results.json and the checkpoint's identity)."""
    return {"mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
            "device": accelerator.device.type}


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, (list, tuple)):
        return [x.to(device, non_blocking=True) for x in inputs]
    return inputs.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, accelerator: Accelerator, k: int = 5,
            progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k predicted labels [N, min(k, C)], best first, and true labels [N] of every sample in `loader`, gathered
    over processes, each sample exactly once; with a `progress` title, a tqdm bar on the main process's terminal."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    show = accelerator.is_main_process and sys.stderr.isatty() and progress is not None
    for inputs, target in tqdm(loader, desc=progress, leave=False, disable=not show):
        with accelerator.autocast():
            logits = model(_to_device(inputs, accelerator.device))
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        p, t = accelerator.gather_for_metrics((top, target.to(accelerator.device)))
        preds.append(p.cpu())
        targets.append(t.cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


class Evaluator:
    """The one evaluation path: a model on a split (Top-1, Top-5, Many / Medium / Few, per class), used for validation
    every epoch, the test report at the end of training and validate.py's checkpoint evaluation."""

    def __init__(self, loaders: Mapping[str, Any], accelerator: Accelerator, train_counts: list[int]) -> None:
        self.loaders = dict(loaders)
        self.accelerator = accelerator
        self.train_counts = train_counts

    def evaluate(self, model: torch.nn.Module, split: str, progress: str | None = None) -> dict[str, Any]:
        """Top-1, Top-5 (None with fewer than 5 classes), Many / Medium / Few, per-class accuracy and the sample count
        of `model` on `split` (a name of the loaders); `progress` titles a tqdm bar (`predict`)."""
        preds, targets = predict(model, self.loaders[split], self.accelerator, progress=progress)
        rep = split_report(preds[:, 0], targets, self.train_counts)
        return {"top1": rep["top1"], "top5": topk_accuracy(preds, targets, 5), "many": rep["many"],
                "medium": rep["medium"], "few": rep["few"], "per_class": rep["per_class"],
                "num_test_evaluated": int(len(targets))}

    def report(self, split: str, model: torch.nn.Module, ema: torch.nn.Module | None, title: str) -> dict[str, Any]:
        """The results of `model` on `split` with `train_counts`, and under "ema" those of its EMA weights when
        there are; the main process logs each table under `title`."""
        loader = self.loaders[split]
        if self.accelerator.is_main_process:
            _logger.info("evaluating %d images in %d batches for the %s%s", len(loader.dataset), len(loader), title,
                         " (and again with the EMA weights)" if ema is not None else "")
        results = {**self.evaluate(model, split, progress=title), "train_counts": self.train_counts}
        if ema is not None:
            results["ema"] = self.evaluate(ema, split, progress=f"{title}, EMA")
        if self.accelerator.is_main_process:
            _log_report(title, results)
            if ema is not None:
                _log_report(f"{title} of the EMA weights", results["ema"])
        return results


def reduce_sums(accelerator: Accelerator, *values: float) -> list[float]:
    """Each value summed over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def launch_warning(env: Mapping[str, str]) -> str | None:
    """The warning for a launch that asked for several processes but runs one, else None.

    Accelerate's simple launcher (`accelerate launch --cpu`, or no `--multi_gpu` with fewer than two GPUs) starts
    one process whatever `--num_processes` says; for more than one it still exports MASTER_ADDR/MASTER_PORT, which a
    one-process launch never does, while a real multi-process launch also exports WORLD_SIZE.
    """
    if "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env or "WORLD_SIZE" in env:
        return None
    return ("accelerate launch was asked for more than one process but started only this one: its simple launcher, "
            "used with --cpu or without --multi_gpu, runs a single process. For N processes run "
            "`accelerate launch --multi_gpu --num_processes N train.py ...` on GPUs, or "
            "`torchrun --nproc_per_node N train.py ...` (GPUs, or gloo on the CPU). Training with 1 process: the "
            "global batch is data.batch_size.")


def loader_config() -> DataLoaderConfiguration:
    """How Accelerate's prepared loaders move batches: with non-blocking copies (from the pinned memory the loaders use
    on a GPU), which its default (non_blocking=False) would make blocking whatever the engine asks."""
    return DataLoaderConfiguration(non_blocking=True)


def _accelerator(mixed_precision: str | None, **kw: Any) -> Accelerator:
    """The Accelerator of a train.py / validate.py process: gloo DDP on the CPU under torchrun, and a loud warning
    when a multi-process launch came up as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Accelerate picks gloo on the CPU only when asked to: without this, torchrun on a machine without a GPU
    # would start independent single-process runs that overwrite each other's files.
    cpu = world > 1 and not torch.cuda.is_available()
    kw = {"dataloader_config": loader_config(), **kw}
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kw) if mixed_precision \
        else Accelerator(cpu=cpu, **kw)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but Accelerate set up {accelerator.num_processes}")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # torch's CPU autocast runs bf16 only: fp16 would silently train in fp32
        raise ConfigError("mixed precision fp16 needs a CUDA GPU and this run is on the CPU, where it would silently "
                          "run in fp32: use --mixed-precision bf16 (or no), or run on a GPU")
    warning = launch_warning(os.environ)
    if warning:
        _logger.warning("%s\n%s\n%s", "!" * 100, warning, "!" * 100)
    return accelerator


def _results_header(recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    return {"recipe": recipe.name, "method": method_label(recipe), "dataset": recipe.data.dataset,
            "imbalance_ratio": recipe.data.imbalance_ratio, "seed": recipe.seed, "epochs": recipe.epochs,
            **_launch(accelerator)}


def _log_report(title: str, rep: dict[str, Any]) -> None:
    _logger.info("%s:\n%s", title, format_table(rep))


def _tracker_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The flattened recipe with values trackers accept (lists and null as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(cfg).items()}


class Trainer:
    """One training run in one output directory."""

    def __init__(self, recipe: Recipe, output_dir: str, accelerator: Accelerator | None = None) -> None:
        """`recipe`: the typed recipe, checked when it was built (config.load_recipe); its `to_dict()` is what
        args.yaml, the trackers and the checkpoint identity record."""
        self.recipe = r = recipe
        self.cfg = cfg = recipe.to_dict()
        self.output_dir = output_dir
        self.accelerator = accelerator or Accelerator(dataloader_config=loader_config())
        acc = self.accelerator
        if acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every recipe's images have one size: tune the convolutions once
        set_seed(r.seed)
        _logger.info("recipe %s: method %s (method=%s, loss.name=%s), model %s, %d epochs", r.name, method_label(r),
                     r.method, r.loss.name, r.model.name, r.epochs)
        _logger.info("seed %d (every epoch reseeds from it, the epoch and the rank); %s", r.seed,
                     ", ".join(f"{k} {v}" for k, v in _launch(acc).items()))
        check_data_root(r.data)  # on every process: a node without the data is named, not waited for
        # on a GPU the training batches travel as uint8 and are normalised there (a quarter of the bytes to copy)
        self.data = build_data(r.data, r.seed, uint8_train=acc.device.type == "cuda")
        self.model = create_lt_model(r.model, self.data.num_classes, self.data.in_chans).to(acc.device)
        # timm's EMA copies the model before DDP wraps it and before a step flattens its parameters
        self.ema = ModelEmaV3(self.model, decay=r.ema.decay, use_warmup=r.ema.warmup) \
            if r.ema.decay is not None else None
        self.criterion = create_loss(r.loss, self.data.train_counts, r.epochs).to(acc.device)
        train_loader, val_loader, test_loader = build_loaders(self.data, r.data, r.seed, acc.device)
        self.global_batch_size = r.data.batch_size * acc.num_processes
        self.lr = scaled_lr(r.optim, self.global_batch_size)
        optimizer = create_optimizer(self.model, r.optim, self.global_batch_size)
        self.scheduler = None
        s = r.sched
        if s.sched != "none":
            self.scheduler, _ = create_scheduler_v2(
                optimizer, sched=s.sched, num_epochs=r.epochs, decay_milestones=list(s.decay_milestones),
                decay_epochs=s.decay_milestones[0] if s.decay_milestones else 30, decay_rate=s.decay_rate,
                min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs)
        (self.ddp_model, self.optimizer, self.train_loader, self.val_loader,
         self.test_loader) = acc.prepare(self.model, optimizer, train_loader, val_loader, test_loader)
        self.evaluator = Evaluator({"val": self.val_loader, "test": self.test_loader}, acc, self.data.train_counts)
        self.method: Method = create_method(r, self.model, self.optimizer, self.criterion, self.data, self.val_loader,
                                            acc)
        self.identity = {**_identity(cfg, self.data), **{k: _launch(acc)[k] for k in LAUNCH_IDENTITY}}
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_top1": None, "epoch": None}
        self.start_epoch = 0

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT_NAME)

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """What resuming needs, each tensor once: weights (and EMA), optimizer, scheduler, method, summary rows."""
        return {
            "identity": self.identity,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "method": self.method.state_dict(),
            "rows": self.rows,
            "best": dict(self.best),
        }

    def resume(self) -> None:
        """Continue from the checkpoint in the output directory (the previous one when the latest is unreadable;
        nothing to load when there is none yet: `run` decides whether that is an error)."""
        state = load_resumable(self.checkpoint_path, expect=self.identity)
        if state is None:
            _logger.info("no checkpoint in %s yet: starting the run there", self.output_dir)
            return
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict(state["method"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint in {self.output_dir} does not fit this run: {e}") from None
        self.rows = list(state["rows"])
        self.best = dict(state.get("best") or self.best)
        self.start_epoch = int(state["epoch"]) + 1
        _logger.info("resumed from epoch %d's checkpoint: continuing at epoch %d", state["epoch"], self.start_epoch)

    def _save(self, epoch: int, improved: bool, due: bool) -> None:
        """model_best.pt (weights and EMA) when validation Top-1 improved, then the full checkpoint when due, so a
        kill between the two never leaves a best file older than the checkpoint's record of it."""
        if not (improved or due):
            return
        self._check_finite_weights(epoch)
        if improved:
            state = {"identity": self.identity, "epoch": epoch, "val_top1": self.best["val_top1"],
                     "model": self.model.state_dict(),
                     "ema": self.ema.module.state_dict() if self.ema is not None else None}
            save_checkpoint(os.path.join(self.output_dir, BEST_NAME), state, keep_previous=False, point="best")
        if due:
            state = self.state_dict(epoch)
            nbytes = save_checkpoint(self.checkpoint_path, state)
            prev = previous_path(self.checkpoint_path)
            _logger.info("checkpoint of epoch %d: %s%s", epoch, size_report(state, nbytes),
                         f" (previous kept as {os.path.basename(prev)})" if os.path.exists(prev) else "")

    # ---- training -------------------------------------------------------------------------------------------
    def _log_progress(self, epoch: int, step: int, steps: int, loss: float | None, mean_loss: float, seen: int,
                      elapsed: float) -> None:
        """The progress line of a log interval (the one place the loop reads the step's loss from the device)."""
        per_step = elapsed / (step + 1)
        eta_epoch = per_step * (steps - step - 1)
        eta_run = eta_epoch + per_step * steps * (self.recipe.epochs - epoch - 1)
        lr = self.optimizer.param_groups[0]["lr"]
        _logger.info("epoch %d/%d step %d/%d: loss %s (epoch mean %.4f), lr %.4g, %.0f img/s, eta %s (epoch), %s (run)",
                     epoch, self.recipe.epochs, step + 1, steps, "skipped" if loss is None else f"{loss:.4f}",
                     mean_loss, lr, seen * self.accelerator.num_processes / max(elapsed, 1e-9),
                     datetime.timedelta(seconds=round(eta_epoch)), datetime.timedelta(seconds=round(eta_run)))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch; every `log_interval` steps a progress line (a tqdm bar too when stderr is a terminal).
        Returns the train loss averaged over every image of every process, and the image count. The step's loss
        stays on the device and is summed there: the loop reads it at its log intervals only."""
        acc = self.accelerator
        self.method.epoch_start(epoch)
        self.criterion.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)  # Accelerate's loader passes it on to our EpochSampler
        self.ddp_model.train()
        total, images, seen = 0.0, 0, 0
        steps, interval = len(self.train_loader), self.recipe.log_interval
        show_bar = acc.is_main_process and sys.stderr.isatty()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not show_bar)
        t0 = time.time()
        with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():
            for step, (inputs, targets) in enumerate(bar):
                inputs = _to_device(inputs, acc.device)
                if self.data.train_normalize is not None:
                    inputs = normalize_uint8(inputs, *self.data.train_normalize)
                loss = self.method.train_step(inputs, targets.to(acc.device), epoch, step)
                faults.hit("step")
                seen += len(targets)
                if loss is not None:
                    total = total + loss.detach().double() * len(targets) if isinstance(loss, torch.Tensor) \
                        else total + loss * len(targets)
                    images += len(targets)
                    if self.ema is not None:
                        self.ema.update(self.model, step=epoch * steps + step + 1)
                if acc.is_main_process and ((step + 1) % interval == 0 or step + 1 == steps):
                    last = None if loss is None else float(loss)
                    if last is not None:
                        bar.set_postfix(loss=f"{last:.4f}")
                    self._log_progress(epoch, step, steps, last, float(total) / max(images, 1), seen, time.time() - t0)
        total, images = reduce_sums(acc, float(total), images)
        return {"train_loss": total / images if images else math.nan, "train_images": int(images)}

    def fit(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            launch = ", ".join(f"{k}={v}" for k, v in _launch(acc).items())
            atomic_write_text(os.path.join(self.output_dir, "args.yaml"),
                              f"# launch (not recipe keys; results.json has them too): {launch}\n"
                              + yaml.safe_dump(cfg, sort_keys=False))
        if self.recipe.log_with:
            acc.init_trackers(TRACKER_PROJECT, config=_tracker_config(cfg))
        for epoch in range(self.start_epoch, self.recipe.epochs):
            set_seed(_epoch_seed(self.recipe.seed, epoch), device_specific=True)
            t0 = time.time()
            row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch(epoch))
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            if acc.num_processes > 1:
                # BatchNorm statistics drift apart across ranks (each updates them with its own batches, and the
                # GSA passes bypass DDP's broadcast): evaluate and checkpoint one model, rank 0's, as timm does
                for model in (self.model, self.ema.module if self.ema is not None else None):
                    if model is not None:
                        distribute_bn(model, acc.num_processes, reduce=False)
            row["val_top1"] = self.evaluator.evaluate(self.ddp_model, "val")["top1"]
            if self.ema is not None:
                row["ema_val_top1"] = self.evaluator.evaluate(self.ema.module, "val")["top1"]
            row.update(self.method.epoch_end(epoch))
            row["time"] = time.time() - t0
            self.rows.append(row)
            _logger.info("epoch %d: %s", epoch, _epoch_line(row))
            if self.recipe.log_with:
                acc.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            improved = row["val_top1"] > (self.best["val_top1"] if self.best["val_top1"] is not None else -math.inf)
            if improved:
                self.best = {"val_top1": row["val_top1"], "epoch": epoch}
            if acc.is_main_process:
                atomic_write_csv(os.path.join(self.output_dir, "summary.csv"), [_readable(r) for r in self.rows])
                for name, obj in self.method.artifacts().items():
                    atomic_write_json(os.path.join(self.output_dir, name), obj)
                due = (epoch + 1) % self.recipe.checkpoint_interval == 0 or epoch + 1 == self.recipe.epochs
                self._save(epoch, improved, due)
            acc.wait_for_everyone()
        return self.report()

    def _check_finite_weights(self, epoch: int) -> None:
        bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"weights became non-finite by the end of epoch {epoch} ({', '.join(bad[:5])}); "
                                 "not writing a checkpoint (the previous one is kept)")

    def _weights_note(self) -> str:
        """The run's last log line: which weights the test table is for, and where the best validation epoch's are."""
        last = f"the test results are for the weights of the last epoch ({self.recipe.epochs - 1})" + \
            (" and their EMA" if self.ema is not None else "")
        if self.best["epoch"] is None:
            return f"{last}; there is no {BEST_NAME} (no validation Top-1 to choose one by)"
        best = os.path.join(self.output_dir, BEST_NAME)
        return (f"{last}; {best} holds epoch {self.best['epoch']}'s, the best validation Top-1 "
                f"({self.best['val_top1']:.2f}): validate.py --checkpoint {best} evaluates them")

    def report(self) -> dict[str, Any]:
        """Final test evaluation of the model (and of its EMA); results.json from the main process."""
        acc = self.accelerator
        rep = self.evaluator.report("test", self.ddp_model, None if self.ema is None else self.ema.module,
                                    "test results")
        results = {**_results_header(self.recipe, acc), **rep, "lr": self.lr,
                   "global_batch_size": self.global_batch_size,
                   "best_val_top1": self.best["val_top1"], "best_epoch": self.best["epoch"],
                   "skipped_steps": self.method.skipped_steps}
        if acc.is_main_process:
            atomic_write_json(os.path.join(self.output_dir, "results.json"), results)
            _logger.info("%s", self._weights_note())
        if self.recipe.log_with:
            acc.log({f"test_{k}": v for k, v in rep.items() if isinstance(v, float)}, step=self.recipe.epochs)
            acc.end_training()
        acc.wait_for_everyone()
        return results


# summary.csv's per-group columns (loss_g0, rho_g0, cos_g0, ascent_g0, ...): the epoch log line keeps the groups'
# loss and ascent as one short list each (g0 first, 3 significant digits); the rest is in summary.csv only
_PER_GROUP = re.compile(r"(.+)_g(\d+)$")
_LOGGED_PER_GROUP = ("loss", "ascent")


def _epoch_line(row: dict[str, Any]) -> str:
    """The epoch's summary row for the log: numbers at 4 significant digits, the per-group columns as
    `loss_g=[...]` and `ascent_g=[...]`, so the line stays short at any G."""
    plain, groups = [], defaultdict(list)
    for k, v in row.items():
        m = _PER_GROUP.match(k)
        if m and m.group(1) in _LOGGED_PER_GROUP:
            groups[m.group(1)].append(f"{v:.3g}")
        elif not m and k != "epoch":
            plain.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(plain + [f"{k}_g=[{' '.join(vs)}]" for k, vs in groups.items()])


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """A summary.csv row with floats at 10 significant digits, so 28.999999999999996 reads 29 (results.json and the
    checkpoint keep full precision)."""
    return {k: f"{v:.10g}" if isinstance(v, float) else v for k, v in row.items()}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


def _no_checkpoint(output_dir: str) -> CheckpointError:
    return CheckpointError(f"--resume: {output_dir} holds no checkpoint ({CHECKPOINT_NAME}) to continue: check the "
                           "--output path (--resume-or-start starts the run there when it has none)")


def run(recipe: Recipe, output_dir: str, resume: bool | str = False,
        mixed_precision: str | None = None) -> dict[str, Any]:
    """Train `recipe` into `output_dir`; with `resume`, continue from the checkpoint there (an error when there is
    none; `resume="or_start"`: start from scratch then)."""
    log_with = list(recipe.log_with) if isinstance(recipe.log_with, tuple) else recipe.log_with
    accelerator = _accelerator(mixed_precision, log_with=log_with, project_dir=output_dir)
    ckpt = os.path.join(output_dir, CHECKPOINT_NAME)
    found = has_checkpoint(output_dir)
    if not resume and found:
        raise CheckpointError(f"{output_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it "
                              "or choose another --output")
    if resume is True and not found and accelerator.num_processes == 1:
        raise _no_checkpoint(output_dir)  # before a mistyped folder is created and the data is built
    if accelerator.is_main_process:
        check_output_dir(output_dir)  # before the data and model are built
    trainer = Trainer(recipe, output_dir, accelerator)
    if resume:
        trainer.resume()
        check_same_resume(trainer.start_epoch, trainer.checkpoint_path)  # every process found the same one
        if resume is True and trainer.start_epoch == 0:
            raise _no_checkpoint(output_dir)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        done = [n for n in (ckpt, previous_path(ckpt)) if os.path.exists(n)]
        raise Interrupted(f"interrupted: {done[0]} is kept, add --resume to the same command to continue from it" if done
                          else "interrupted before the first checkpoint: nothing to resume") from None


def evaluate_checkpoint(recipe: Recipe, checkpoint: str, output_dir: str,
                        mixed_precision: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (checkpoint.pt or model_best.pt) of `recipe`'s model on its test split, and its EMA
    weights when it holds them, as the end of training does; writes `output_dir`/results.json (validate.py)."""
    r = recipe
    acc = _accelerator(mixed_precision)
    state = load_checkpoint(checkpoint, expect=evaluation_identity(r.to_dict()))  # before the data is built
    if acc.is_main_process:
        check_output_dir(output_dir)  # so a mistyped checkpoint path leaves no empty folder
    check_data_root(r.data)
    data = build_data(r.data, r.seed)
    check_identity(checkpoint, state["identity"], {"num_classes": data.num_classes})
    if state["identity"].get("recipe", r.name) != r.name:
        _logger.warning("%s was trained with recipe %s and is evaluated with recipe %s (the same dataset, image size, "
                        "classes and model)", checkpoint, state["identity"]["recipe"], r.name)
    test_loader = acc.prepare(build_loaders(data, r.data, r.seed, acc.device)[2])
    models = {}
    for key in ("model", "ema"):
        if state.get(key) is None:
            continue
        models[key] = create_lt_model(dataclasses.replace(r.model, pretrained_path=None), data.num_classes,
                                      data.in_chans)
        try:
            models[key].load_state_dict(state[key])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {checkpoint} does not fit model {r.model.name}: {e}") from None
        models[key].to(acc.device)
    rep = Evaluator({"test": test_loader}, acc, data.train_counts).report("test", models["model"], models.get("ema"),
                                                                          f"{checkpoint}, test split")
    results = {**_results_header(r, acc), "checkpoint": os.path.abspath(checkpoint), "epoch": state["epoch"], **rep}
    if acc.is_main_process:
        atomic_write_json(os.path.join(output_dir, "results.json"), results)
    acc.wait_for_everyone()
    return results
