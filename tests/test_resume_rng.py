"""A resumed GPU run draws what an uninterrupted one would: every epoch starts by seeding every generator, the CUDA
ones included, from (seed, epoch, rank), so no generator state needs to travel in the checkpoint (the CPU resume
tests in test_engine.py and test_faults.py show the rest: a killed run resumes to the same result)."""
from __future__ import annotations

import pytest
import torch

from lt_recipes.config import load_recipe
from lt_recipes.engine import _epoch_seed, run


@pytest.mark.usefixtures("single_thread")
def test_every_epoch_reseeds_the_cuda_generators_from_seed_and_epoch(tmp_path, monkeypatch) -> None:
    seeded: list[int] = []
    # torch.manual_seed and Accelerate's set_seed both seed CUDA through this (lazily, without a GPU)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(int(seed)))
    cfg = load_recipe("digits_lt", ["epochs=2", "method=none", "seed=3"])
    run(cfg, str(tmp_path / "run"))
    assert sorted(set(seeded)) == [3, _epoch_seed(3, 0), _epoch_seed(3, 1)], seeded  # the build, then each epoch
    assert seeded.index(_epoch_seed(3, 0)) < seeded.index(_epoch_seed(3, 1))
