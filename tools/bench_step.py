"""Time one full training step of SGD, every registered step (lt_recipes.steps), the grouped step in its modes, and the
naive step, side by side.

Kinds: sgd (torch's own loop); every registered step by its name with its recipe defaults (none: the plain step on
the step core; sam, asam, fsam, imbsam, focal_sam, cc_sam, gbg over the grouping below); `[gkp_]gsa_<group grads>[_<pass>]`, the grouped step (direction h_g) without or with GKP: group
gradients `masked` (exact: one forward, G backward passes) or `share` (Eq. 11's split of the one batch gradient: one
pass), then the perturbed pass: the recipes' default (no suffix), `per_group` (one offset pass over the group-sorted
batch) or `per_group_exact` (one whole-batch pass per group); `[gkp_]gsa_masked_batched`: the default grouped
step with `gsa.batched` (its G whole-batch passes as one vmapped pass, which the pass count sees as one forward and one
backward), and for it and its sequential
form the perturbed passes alone are timed too (`perturbed_pass_times`); gkp_released: the released script's step (one pass at
theta, one at the averaged FriendlySAM perturbation) with GKP; naive: the masked-loss oracle written the plain way
(one whole-batch forward/backward per group for the group gradients and one per perturbed group: 2G passes). The kinds run on the
same model, batch and groups; every repeat times each kind once in turn, so machine load affects all of them alike,
and the table reports medians and ratios to SAM. Groups, anchors and Fisher are real: a memory bank is filled with
snapshots, cut with spectral clustering, and the Fisher is estimated with the exact estimator, before anything is
timed. Each kind's forward and full backward passes per step are counted in one untimed step (hooks on the model and on
its first parameter's gradient; CC-SAM's head-only passes are not full passes), and its device-to-host
synchronisations in another (lt_recipes.host_sync: the calls that wait for a GPU, counted the same on any device).
`--json` prints one JSON object as the last line.

    python tools/bench_step.py                       # resnet32_cifar, batch 128, G=4, CPU
    python tools/bench_step.py --device cuda --amp bf16 --batch 256
    python tools/bench_step.py --batch 8 --img-size 4 --kinds sam,gsa_masked,gsa_masked_batched   # dispatch-bound
    python tools/bench_step.py --device cuda --amp bf16 --model resnet50 --batch 64 --img-size 224 --num-classes 1000
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import TensorDataset

from lt_recipes import equations
from lt_recipes.batchnorm import frozen_bn_stats
from lt_recipes.choices import CANCELLING_DIRECTIONS, GROUP_GRADS, PERTURBATIONS
from lt_recipes.data import long_tail_counts
from lt_recipes.gkp import estimate_fisher, gkp_strength
from lt_recipes.grouping import MemoryBank, compute_groups
from lt_recipes.host_sync import count_host_syncs
from lt_recipes.models import is_classifier, ordered_parameters
from lt_recipes.steps import GroupedSAM, create_step, list_steps, step_info
from lt_recipes.models import create_lt_model
from lt_recipes.sections import GBGConfig, GSAConfig, ModelConfig, section_class
from lt_recipes.steps import ReleasedGSA

# kind -> (with GKP, group_grads, perturbation), from the option tuples the step accepts: `[gkp_]gsa_<group grads>`
# with the recipes' default perturbed pass, `[gkp_]gsa_<group grads>_<pass>` with another (not the averaged pass,
# which the h_g directions cancel in)
_DEFAULT_PASS = GSAConfig.perturbation
_PASSES = [p for p in sorted(PERTURBATIONS, key=lambda p: p != _DEFAULT_PASS)
           if not (p == "averaged" and "gsa" in CANCELLING_DIRECTIONS)]
GROUPED_KINDS = {f"{'gkp_' if gkp else ''}gsa_{grads}{'' if pert == _DEFAULT_PASS else '_' + pert}":
                 (gkp, grads, pert) for pert in _PASSES for grads in GROUP_GRADS for gkp in (False, True)}
# `<kind>_batched`: the same step with gsa.batched (the per_group_exact passes as one vmapped pass)
BATCHED_KINDS = {f"{k}_batched": v for k, v in GROUPED_KINDS.items() if v[1] == "masked" and v[2] == "per_group_exact"}
# every registered step with its recipe defaults (the steps on memory-based groups, the grouped step and the released
# one, are timed on a grouping below)
REGISTERED = [s for s in list_steps() if step_info(s).grouping != "memory"]
KINDS = ["sgd", *REGISTERED, *GROUPED_KINDS, *BATCHED_KINDS, "gkp_released", "naive"]


class NaiveGSA:
    """The grouped step the plain way (the tests' oracle, in float32): for each group a whole-batch forward and the
    gradient of its masked mean loss, then for each group a whole-batch pass at theta + eps_g (adaptive scaling)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, group_of_class: torch.Tensor,
                 group_sizes: list[int]) -> None:
        self.model, self.opt, self.group_of_class, self.sizes = model, opt, group_of_class, group_sizes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.z, self.clamp = 0.1, (0.002, 0.003)

    def step(self, x: torch.Tensor, y: torch.Tensor, autocast: Callable) -> None:
        gid = self.group_of_class[y]
        present = [g for g in range(len(self.sizes)) if bool((gid == g).any())]
        grads = {}
        for g in present:
            with autocast():
                losses = F.cross_entropy(self.model(x), y, reduction="none")
            grads[g] = torch.cat([gr.reshape(-1) for gr in
                                  torch.autograd.grad(losses.float()[gid == g].mean(), self.params)])
        theta = parameters_to_vector(self.params).detach().clone()
        glob = sum(float((gid == g).sum()) / len(y) * grads[g] for g in present)
        d = theta.numel()
        for g in present:
            h = equations.ascent_direction("gsa", grads[g], glob)
            norm = equations.scaled_norm("adaptive", h, theta)
            rho = equations.gsa_radius(self.z, float(theta.norm()), norm, d, self.sizes[g], self.clamp)
            vector_to_parameters(theta + equations.gsa_perturbation("adaptive", h, theta, rho), self.params)
            with frozen_bn_stats(self.model), autocast():
                losses = F.cross_entropy(self.model(x), y, reduction="none")
                (losses.float()[gid == g].sum() / len(y)).backward()
        vector_to_parameters(theta, self.params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)


def count_passes(model: torch.nn.Module, step: Callable[[], object]) -> str:
    """Forward passes of the whole model and full backward passes (through its first parameter) in one call of
    `step`, as "<F>F+<B>B"."""
    counts = {"F": 0, "B": 0}
    first = next(p for p in model.parameters() if p.requires_grad)
    hooks = [model.register_forward_pre_hook(lambda *_: counts.__setitem__("F", counts["F"] + 1)),
             first.register_hook(lambda g: counts.__setitem__("B", counts["B"] + 1))]
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    return f"{counts['F']}F+{counts['B']}B"


def count_syncs(step: Callable[[], object]) -> int:
    """Device-to-host synchronisations in one call of `step`."""
    with count_host_syncs() as syncs:
        step()
    return syncs.count


def build_groups(model: torch.nn.Module, num_classes: int, counts: list[int], G: int, device: torch.device,
                 img: tuple[int, int, int], autocast: Callable) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Real grouping: a bank of perturbed snapshots with random class qualities, spectral groups, anchors, exact Fisher."""
    cov, _ = ordered_parameters(model, is_classifier)
    theta = torch.cat([p.detach().reshape(-1).float().cpu() for p in cov])
    bank = MemoryBank(num_classes)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2 * G + 2):
        bank.update(torch.randn(num_classes, generator=gen),
                    theta + 0.01 * theta.abs().mean() * torch.randn(theta.shape, generator=gen))
    labels = compute_groups(bank, G, counts, seed=0)
    anchors = bank.anchors(labels, int(labels.max()) + 1).to(device)
    n = 4 * num_classes
    xs = torch.randn(n, *img, generator=gen)
    ys = torch.arange(num_classes).repeat(4)
    fisher = estimate_fisher(model, dataset=TensorDataset(xs, ys), targets=ys.numpy(), group_of_class=labels,
                             anchors=anchors, is_excluded=is_classifier, batch_size=64, device=device,
                             autocast=autocast, max_batches=2)
    return labels, anchors, fisher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet32_cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    counts = long_tail_counts(500, args.num_classes, 100.0)
    img = (3, args.img_size, args.img_size)
    probs = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    y = torch.multinomial(probs, args.batch, replacement=True, generator=torch.Generator().manual_seed(1)).to(device)
    x = torch.randn(args.batch, *img, device=device)
    kinds = args.kinds.split(",")

    models, steps, state_bytes = {}, {}, {}
    for kind in kinds:
        torch.manual_seed(0)
        model = create_lt_model(ModelConfig(name=args.model), args.num_classes, 3).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        models[kind] = model
        if kind == "sgd":
            def sgd_step(model=model, opt=opt):
                with autocast():
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
            steps[kind], state_bytes[kind] = sgd_step, 0
        elif kind in REGISTERED:
            info = step_info(kind)
            options = dataclasses.asdict(section_class(info.section)()) if info.section else {}
            run = {"class_counts": counts, "head_losses": lambda z, t: F.cross_entropy(z, t, reduction="none")}
            step = create_step(kind, model, opt, autocast=autocast, **options, **{k: run[k] for k in info.uses})
            if info.grouping == "gradient":
                labels, _, _ = build_groups(model, args.num_classes, counts, GBGConfig.num_groups, device, img,
                                             autocast)
                step.set_groups(labels, [int(np.asarray(counts)[labels == g].sum()) for g in range(labels.max() + 1)])
            steps[kind] = lambda step=step, model=model: step.step(
                lambda i: F.cross_entropy(model(x[i]), y[i], reduction="none"), y)
            state_bytes[kind] = (step.base.numel() + step.flat.rows.numel()) * 4
        elif kind in GROUPED_KINDS or kind in BATCHED_KINDS or kind == "gkp_released":
            with_gkp, group_grads, perturbation = {**GROUPED_KINDS, **BATCHED_KINDS}.get(kind, (True, None, None))
            labels, anchors, fisher = build_groups(model, args.num_classes, counts, args.groups, device, img, autocast)
            G = int(labels.max()) + 1
            if kind == "gkp_released":
                gsa = ReleasedGSA(model, opt, autocast=autocast)
            else:
                gsa = GroupedSAM(model, opt, autocast=autocast, group_grads=group_grads,
                                 perturbation=perturbation, batched=kind in BATCHED_KINDS)
            sizes = [int(np.asarray(counts)[labels == g].sum()) for g in range(G)]
            gsa.set_groups(labels, sizes)
            extra = 0
            if with_gkp:
                classes = [int((labels == g).sum()) for g in range(G)]
                gsa.set_gkp(anchors, fisher, gkp_strength(classes, sizes, 100.0, "per_samples").to(device))
                extra = anchors.numel() * anchors.element_size() + fisher.numel() * fisher.element_size()
            opt.register_step_pre_hook(lambda *_, kind=kind: end_of_passes(kind))
            steps[kind] = lambda gsa=gsa, model=model, kind=kind: gsa.step(
                timed_after_first(lambda i: F.cross_entropy(model(x[i]), y[i], reduction="none"), kind), y,
                alpha=0.8)
            state_bytes[kind] = (gsa.flat.rows.numel() + gsa.base.numel()) * 4 + extra
            if kind == "gkp_released":  # momenta per group, the cascaded direction and the perturbation
                state_bytes[kind] += (gsa.momentum.numel() + 2 * gsa.d) * 4
        elif kind == "naive":
            labels, _, _ = build_groups(model, args.num_classes, counts, args.groups, device, img, autocast)
            G = int(labels.max()) + 1
            naive = NaiveGSA(model, opt, torch.as_tensor(labels, device=device),
                             [int(np.asarray(counts)[labels == g].sum()) for g in range(G)])
            steps[kind] = lambda naive=naive: naive.step(x, y, autocast)
            state_bytes[kind] = sum(p.numel() for p in model.parameters()) * 4
        else:
            raise SystemExit(f"unknown step kind '{kind}' (known: {', '.join(KINDS)})")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the perturbed passes of the masked grouped kinds: from the second call of the loss function (pass 1 calls it
    # once) to the base optimizer's step (so GKP's gradient, added in between, is timed with them)
    pass_start: dict[str, float] = {}
    pass_end: dict[str, float] = {}

    def end_of_passes(kind: str) -> None:
        sync()
        pass_end[kind] = time.perf_counter()

    def timed_after_first(loss_fn: Callable, kind: str) -> Callable:
        calls = [0]

        def fn(i: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 2:
                sync()
                pass_start[kind] = time.perf_counter()
            return loss_fn(i)
        return fn

    passes = {k: count_passes(models[k], steps[k]) for k in kinds}
    syncs = {k: count_syncs(steps[k]) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    pass_times: dict[str, list[float]] = {k: [] for k in kinds if k in BATCHED_KINDS or f"{k}_batched" in BATCHED_KINDS}
    peak: dict[str, int] = {}
    for r in range(args.warmup + args.repeats):
        for kind in kinds:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            steps[kind]()
            sync()
            if r >= args.warmup:
                end = time.perf_counter()
                times[kind].append((end - t0) * 1e3)
                if kind in pass_times:
                    pass_times[kind].append((pass_end[kind] - pass_start[kind]) * 1e3)
            if device.type == "cuda":
                peak[kind] = max(peak.get(kind, 0), torch.cuda.max_memory_allocated())

    med = {k: statistics.median(v) for k, v in times.items()}
    d = sum(p.numel() for p in models[kinds[0]].parameters())
    out = {"model": args.model, "batch": args.batch, "groups": args.groups, "device": str(device), "amp": args.amp,
           "params": d, "repeats": args.repeats, "img_size": args.img_size,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads()}
    for k in kinds:
        out[f"{k}_ms"] = med[k]
        out[f"{k}_state_bytes"] = state_bytes[k]
        out[f"{k}_passes"] = passes[k]
        out[f"{k}_syncs"] = syncs[k]
        if k in peak:
            out[f"{k}_peak_bytes"] = peak[k]
    # medians of the perturbed passes (named so that no key but a kind's time ends in _ms)
    out["perturbed_pass_times"] = {k: statistics.median(v) for k, v in pass_times.items()}
    if "sam" in med:
        for k in kinds:
            if k != "sam":
                out[f"{k}_over_sam"] = med[k] / med["sam"]
    print(f"{args.model} batch {args.batch} G={args.groups} on {out['device_name']} ({args.amp}), "
          f"{args.repeats} interleaved repeats, median ms:")
    print(f"{'step':<25} {'passes':>7} {'syncs':>5} {'median ms':>10} {'/ SAM':>7} {'extra state MB':>15}"
          + ("  peak MB" if peak else ""))
    for k in kinds:
        ratio = f"{med[k] / med['sam']:7.3f}" if "sam" in med else "      -"
        line = f"{k:<25} {passes[k]:>7} {syncs[k]:>5} {med[k]:10.2f} {ratio} {state_bytes[k] / 2**20:15.2f}"
        if k in peak:
            line += f"  {peak[k] / 2**20:7.1f}"
        print(line)
    batched = [k for k in BATCHED_KINDS if k in kinds and k[:-len("_batched")] in kinds]
    if batched:
        print("gsa.batched against the sequential passes (perturbed passes: from their first forward to the "
              "optimizer's step), median ms:")
        print(f"{'step':<25} {'step seq':>9} {'batched':>9} {'ratio':>6} {'passes seq':>11} {'batched':>9} {'ratio':>6}")
        for k in batched:
            seq, pp = k[:-len("_batched")], out["perturbed_pass_times"]
            print(f"{seq:<25} {med[seq]:9.2f} {med[k]:9.2f} {med[k] / med[seq]:6.3f} {pp[seq]:11.2f} {pp[k]:9.2f} "
                  f"{pp[k] / pp[seq]:6.3f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
