"""Two-process gloo runs on the CPU: torchrun, exactly as a user would launch a multi-GPU job."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port
from test_gsa import GROUP_OF_CLASS, GROUP_SIZES, Tiny, _batch, _theta
from lt_recipes.gsa import GroupedSAM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, tmp_path, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port())] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("group_grads", ["masked", "share"])
def test_synchronized_gsa_step_equals_single_process_step(tmp_path, group_grads):
    out = tmp_path / "ddp.pt"
    torchrun([os.path.join(ROOT, "tests", "ddp_gsa_worker.py"), str(out), "sync", group_grads], tmp_path)
    got = torch.load(out)
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch(n=24)
    gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), num_groups=4, scale="euclidean", z=0.5,
                     backend="reference", group_grads=group_grads)
    gsa.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    stats = gsa.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y)
    want = _theta(model)
    for theta in got["theta"]:
        assert torch.allclose(theta, want, rtol=1e-5, atol=1e-6)
    assert got["rho"] == pytest.approx(stats.rho, rel=1e-5)
    assert [v for v in got["group_loss"] if not math.isnan(v)] == \
        pytest.approx([v for v in stats.group_loss if not math.isnan(v)], rel=1e-5)


def test_per_replica_gsa_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp.pt"
    torchrun([os.path.join(ROOT, "tests", "ddp_gsa_worker.py"), str(out), "local", "masked"], tmp_path)
    got = torch.load(out)
    assert torch.equal(got["theta"][0], got["theta"][1])


def test_class_balanced_sampler_splits_batches_across_ranks_and_epoch_sums_reduce(tmp_path):
    """Each rank gets its own batches of the one global class-balanced sequence: together exactly that sequence.
    The epoch's train-loss sums and image counts are summed over ranks, and every rank gets the totals."""
    import numpy as np
    from lt_recipes.data import EpochSampler

    out = tmp_path / "sampler.pt"
    torchrun([os.path.join(ROOT, "tests", "ddp_sampler_worker.py"), str(out)], tmp_path)
    ranks = torch.load(out)
    targets = np.repeat(np.arange(5), [40, 20, 10, 5, 3])
    for epoch in (0, 1):
        sampler = EpochSampler(targets, "class_balanced", seed=7)
        sampler.set_epoch(epoch)
        full = list(sampler)
        batches = [full[i:i + 6] for i in range(0, len(full), 6)]
        for rank in (0, 1):  # Accelerate may pad the shorter rank with a batch from the start: ignore that one
            mine = batches[rank::2]
            assert ranks[rank][epoch][:len(mine)] == mine
    assert ranks[0][0] != ranks[0][1]  # a new order every epoch
    assert [r["reduced"] for r in ranks] == [[14.0, 4.0]] * 2  # rank 0: loss 2 x 1 image, rank 1: loss 4 x 3 images
