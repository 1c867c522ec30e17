"""Run by tests/test_distributed.py, under torchrun or as one plain process: the digits recipe's memory bank filled
from a few deterministic perturbations of the initial model (the same on every rank), then grouped, with anchors
and Fisher; every rank saves what it holds to <out>/rank<R>.pt."""
import os
import sys

import torch
from accelerate import Accelerator

from lt_recipes.cli import setup_logging
from lt_recipes.config import load_recipe
from lt_recipes.engine import Trainer


def main(out: str) -> None:
    setup_logging()
    acc = Accelerator(cpu=True)
    cfg = load_recipe("digits_lt", ["epochs=4", "groups.start_epoch=1", "data.eval_batch_size=16",
                                    "gkp.fisher_batches=3", "groups.num_groups=3"])
    method = Trainer(cfg, out, acc).method
    params = list(method.model.parameters())
    initial = [p.detach().clone() for p in params]
    for k in range(8):
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0 + 0.05 * torch.randn_like(p))
        method._update_bank(k)
    method._regroup(1)
    torch.save({"labels": method.memory_groups.of_class.tolist(), "anchors": method.anchors, "fisher": method.fisher,
                "bank": None if method.bank is None else len(method.bank.uids)},
               os.path.join(out, f"rank{acc.process_index}.pt"))
    if torch.distributed.is_initialized():  # before exit: a live gloo group can abort a rank at teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
