"""Two-process gloo runs on the CPU: torchrun, exactly as a user would launch a multi-GPU job, on one node or as two
nodes (two torchrun agents on this machine)."""
import json
import math
import os
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F

import preloaded
from conftest import free_port
from test_faults import summary_without_time
from test_gsa import GROUP_OF_CLASS, GROUP_SIZES, Tiny, _batch, _theta
from lt_recipes.steps import GroupedSAM, list_steps, step_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "LT_RECIPES_FAILPOINT"}, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": ROOT}


def torchrun(args, tmp_path, nproc=2, timeout=300):
    python, env = preloaded.command(ENV)
    cmd = [*python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *python[1:]] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def two_nodes(args, cwds, timeout=300):
    """Two torchrun agents as the two nodes of one job (c10d rendezvous on localhost, one process each), node k
    started in cwds[k]; returns each agent's (exit code, stderr). The rendezvous, not --node_rank, decides which
    agent's process becomes global rank 0."""
    port = free_port()
    python, env = preloaded.command(ENV)
    procs = []
    for k, cwd in enumerate(cwds):
        err = open(os.path.join(cwd, "agent.err"), "w+")
        procs.append((subprocess.Popen(
            [*python, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
             str(k), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "lt", *python[1:],
             *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True), err))
    results = []
    for proc, err in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung job: end both agents and their workers
            for other, _ in procs:
                os.killpg(other.pid, signal.SIGKILL)
            raise
        err.seek(0)
        results.append((proc.returncode, err.read()))
        err.close()
    return results


@pytest.mark.parametrize("group_grads", ["masked", "share"])
def test_synchronized_gsa_step_equals_single_process_step(tmp_path, group_grads):
    out = tmp_path / "ddp.pt"
    torchrun([os.path.join(ROOT, "tests", "ddp_gsa_worker.py"), str(out), "sync", group_grads], tmp_path)
    got = torch.load(out)
    torch.manual_seed(0)
    model = Tiny()
    x, y = _batch(n=24)
    gsa = GroupedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), scale="euclidean", z=0.5,
                     backend="reference", group_grads=group_grads)
    gsa.set_groups(GROUP_OF_CLASS, GROUP_SIZES)
    stats = gsa.step(lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), y).host()
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


def test_one_memory_bank_per_run_groups_anchors_and_fisher_as_one_process(tmp_path):
    """Rank 0 alone holds the bank; both ranks get its groups and anchors exactly, and the Fisher of one process
    (the same batches, summed in another order); the log gives the bank's host memory of every process."""
    worker = os.path.join(ROOT, "tests", "ddp_bank_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    python, env = preloaded.command(ENV)
    single = subprocess.run([*python, worker, str(one)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = torchrun([worker, str(two)], tmp_path)
    want = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert want["bank"] >= 4 and max(want["labels"]) + 1 == 3  # a spectral cut of 4+ snapshots into 3 groups
    assert [r["bank"] for r in ranks] == [want["bank"], None]
    for got in ranks:
        assert got["labels"] == want["labels"]
        assert torch.equal(got["anchors"], want["anchors"])
        assert torch.allclose(got["fisher"], want["fisher"], rtol=1e-5, atol=1e-12)
    assert torch.equal(ranks[0]["fisher"], ranks[1]["fisher"])
    memory = [line.split("host memory per process: ")[1] for line in proc.stderr.splitlines()
              if "host memory per process" in line]
    assert len(memory) == 8 and all(m.startswith("rank 0 ") and m.endswith(" MB, rank 1 none") for m in memory)


def test_two_nodes_give_one_node_s_results_and_write_once(tmp_path):
    """Two torchrun agents (nodes) with one process each train as one node with two processes does; each node's
    relative --output is under its own directory, and only the global rank 0's gets files. --resume there (the
    checkpoint on one node only) stops both nodes naming what each found."""
    sets = ["--set", "epochs=2", "--set", "groups.start_epoch=1", "--set", "log_interval=100"]
    train = [os.path.join(ROOT, "train.py"), "--recipe", "digits_lt", "--output", "run", *sets]
    single = tmp_path / "single"
    torchrun([os.path.join(ROOT, "train.py"), "--recipe", "digits_lt", "--output", str(single), *sets], tmp_path)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    results = two_nodes(train, [str(d) for d in nodes])
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    main = [k for k, (_, err) in enumerate(results) if "test results:" in err]
    assert len(main) == 1  # one process logs: global rank 0, wherever the rendezvous put it
    assert not (nodes[1 - main[0]] / "run").exists()
    memory = [line for line in results[main[0]][1].splitlines() if "host memory per process" in line]
    assert memory and all(line.endswith(" MB, rank 1 none") for line in memory)  # one bank for both nodes
    run = nodes[main[0]] / "run"
    got, want = (json.loads((d / "results.json").read_text()) for d in (run, single))
    assert got == want and got["num_processes"] == 2
    assert summary_without_time(run) == summary_without_time(single)
    assert sorted(os.listdir(run)) == sorted(os.listdir(single))
    resumed = two_nodes([*train, "--resume"], [str(d) for d in nodes], timeout=120)
    for code, err in resumed:
        assert code != 0 and "--resume found different checkpoints at run/checkpoint.pt: " in err, err[-3000:]
        assert "epoch 1 on rank" in err and "none on rank" in err


def test_a_data_root_missing_on_one_node_is_named_on_every_node(tmp_path):
    """The same command on two nodes whose data root (relative, so each node's own) exists on one only: both stop
    with an error naming the missing path and the rank and node without it."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    (nodes[0] / "data").mkdir()
    train = [os.path.join(ROOT, "train.py"), "--recipe", "digits_lt", "--output", "run", "--set", "data.dataset=fmnist",
             "--set", "data.root=data"]
    results = two_nodes(train, [str(d) for d in nodes], timeout=120)
    missing = str(nodes[1] / "data")
    for code, err in results:
        assert code != 0
        assert f"data.root='data' does not exist or is not a directory: {missing} on rank " in err, err[-3000:]
        assert "(1 of 2 processes)" in err and str(nodes[0] / "data") not in err
    assert "node " in results[0][1].split(missing)[1].split("\n")[0]


def test_every_step_under_ddp_equals_the_one_process_step_on_the_global_batch(tmp_path):
    """2-process gloo: two steps of every registered step on each rank's half of the batch give, on every rank, the
    parameters of the same steps in one process on the whole batch (ascent directions, class and group gradients
    reduced over ranks)."""
    from test_steps import run_two_steps

    out = tmp_path / "steps.pt"
    torchrun([os.path.join(ROOT, "tests", "ddp_steps_worker.py"), str(out)], tmp_path)
    got = torch.load(out)
    assert set(got) == {s for s in list_steps() if step_info(s).grouping != "memory"}
    for name, thetas in got.items():
        want = run_two_steps(name)
        for theta in thetas:
            torch.testing.assert_close(theta, want, rtol=1e-9, atol=1e-11, msg=name)
