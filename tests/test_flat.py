"""FlatParams / flatten_model: parameters and gradients as views into flat buffers, module behaviour unchanged."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from lt_recipes.flat import FlatParams, flatten_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    net[0].to(memory_format=torch.channels_last)  # a non-contiguous (but dense) parameter layout
    return net


def _batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _loss(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def _inside(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + size


def _grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def test_flattening_keeps_outputs_identity_and_layout():
    net = _net()
    reference = copy.deepcopy(net)
    params = list(net.parameters())
    strides = [p.stride() for p in params]
    x, _ = _batch()
    (flat,) = flatten_model(net)
    assert list(net.parameters()) == params and all(a is b for a, b in zip(net.parameters(), params))
    assert [p.stride() for p in params] == strides
    assert flat.numel == sum(p.numel() for p in params)
    for p, q in zip(params, reference.parameters()):
        assert _inside(p, flat.data) and torch.equal(p, q)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    flat.data.mul_(0)  # the buffer is the parameters
    assert all(torch.count_nonzero(p) == 0 for p in params)


def test_backward_writes_into_the_grad_buffer():
    net = _net()
    reference = copy.deepcopy(net)
    (flat,) = flatten_model(net)
    batch = _batch()
    _loss(net, batch).backward()
    _loss(reference, batch).backward()
    torch.testing.assert_close(_grads(net), _grads(reference), rtol=0, atol=0)
    for p, o, q in zip(flat.params, flat.offsets, reference.parameters()):
        assert _inside(p.grad, flat.grad)
        # read straight from the buffer, at the parameter's offset and with its strides
        torch.testing.assert_close(flat.grad.as_strided(p.shape, p.stride(), o), q.grad, rtol=0, atol=0)


def test_backward_accumulates_into_the_chosen_row_only():
    """AccumulateGrad adds into an existing .grad in place when grad mode is off during backward: checked here
    rather than assumed (a backward into row g touches no other memory)."""
    net = _net()
    reference = copy.deepcopy(net)
    (flat,) = flatten_model(net, num_rows=3)
    flat.grad.fill_(7.0)
    batch = _batch()
    _loss(reference, batch).backward()
    flat.grads_to_row(1)
    grad_ptrs = [p.grad.data_ptr() for p in net.parameters()]
    _loss(net, batch).backward()
    _loss(net, batch).backward()  # twice: accumulates
    assert [p.grad.data_ptr() for p in net.parameters()] == grad_ptrs
    for p in net.parameters():
        assert _inside(p.grad, flat.rows[1])
    torch.testing.assert_close(_grads(net), 2 * _grads(reference))
    assert torch.count_nonzero(flat.rows[0]) == 0 and torch.count_nonzero(flat.rows[2]) == 0
    assert torch.all(flat.grad == 7.0)
    flat.grads_to_main()
    assert all(_inside(p.grad, flat.grad) for p in net.parameters())
    with pytest.raises(IndexError, match="row 3 out of range for 3 rows"):
        flat.grads_to_row(3)
    flat.resize_rows(5)
    assert flat.rows.shape == (5, flat.numel) and torch.count_nonzero(flat.rows) == 0


def test_state_dict_round_trip_keeps_the_views(tmp_path):
    net = _net()
    (flat,) = flatten_model(net)
    saved = io.BytesIO()
    torch.save(net.state_dict(), saved)
    before = flat.data.clone()
    flat.data.normal_()
    saved.seek(0)
    net.load_state_dict(torch.load(saved, weights_only=True))
    assert torch.equal(flat.data, before)
    assert all(_inside(p, flat.data) for p in net.parameters())


def test_sgd_momentum_step_matches_an_unflattened_copy():
    net = _net()
    reference = copy.deepcopy(net)
    (flat,) = flatten_model(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        batch = _batch(seed=step)
        for model, optimizer in ((net, opt), (reference, ref_opt)):
            optimizer.zero_grad(set_to_none=False)
            _loss(model, batch).backward()
            optimizer.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert _inside(p, flat.data) and _inside(p.grad, flat.grad)
    opt.zero_grad()  # set_to_none=True drops the views ...
    assert all(p.grad is None for p in net.parameters())
    flat.grads_to_main()  # ... and grads_to_main restores them
    assert all(_inside(p.grad, flat.grad) for p in net.parameters())


def test_timm_model():
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    flats = flatten_model(model, num_rows=2)
    assert len(flats) == 1 and flats[0].numel == sum(p.numel() for p in model.parameters())
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    model.train(), reference.train()
    flats[0].grads_to_row(0)
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(_grads(model), _grads(reference), rtol=0, atol=0)
    assert torch.count_nonzero(flats[0].grad) == 0 and torch.count_nonzero(flats[0].rows[1]) == 0


def test_buckets_and_parameter_selection():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[1].half()
    net[0].bias.requires_grad_(False)
    flats = flatten_model(net)
    assert [(f.data.dtype, f.numel) for f in flats] == [(torch.float32, 12), (torch.float16, 10)]
    (only,) = flatten_model(net, params=[net[0].weight, net[0].weight])
    assert only.numel == 12


def test_bad_parameter_lists_are_rejected():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2).double())
    with pytest.raises(ValueError, match="params is empty"):
        FlatParams([])
    with pytest.raises(ValueError, match=r"params\[1\] is torch.float64 on cpu, params\[0\] is torch.float32"):
        FlatParams([a, b])
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \[3\]\) appears twice"):
        FlatParams([a, a])
    base = torch.randn(6)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        FlatParams([nn.Parameter(base[:4]), nn.Parameter(base[2:])])
    with pytest.raises(ValueError, match="num_rows must be >= 0, got -1"):
        FlatParams([a], num_rows=-1)


def test_ddp_single_process(tmp_path):
    """DDP (what Accelerate wraps a model in) over a flattened model: its reducer writes the averaged gradients
    into the existing .grad views, both the main buffer and a group row."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = _net()
        reference = copy.deepcopy(net)
        (flat,) = flatten_model(net, num_rows=2)
        ddp = nn.parallel.DistributedDataParallel(net)
        batch = _batch()
        _loss(reference, batch).backward()
        _loss(ddp, batch).backward()
        torch.testing.assert_close(_grads(net), _grads(reference))
        assert all(_inside(p.grad, flat.grad) for p in net.parameters())
        flat.grads_to_row(1)
        _loss(ddp, batch).backward()
        assert all(_inside(p.grad, flat.rows[1]) for p in net.parameters())
        torch.testing.assert_close(flat.rows[1], flat.grad)
    finally:
        dist.destroy_process_group()
