"""No waste in a training step (issue 13 item 5): the loop's cheaper reseeding draws what ``torch.manual_seed`` drew,
its multi-tensor gradient clipping equals PyTorch's per-tensor one, its log window sums without a host sync per stat
as the floats did, and fewstep.bench.profile's split of a step (benchmarks/step_efficiency.py's and fewstep bench's)
puts each op where its definition says."""
from __future__ import annotations

import random
import types

import numpy as np
import torch
from torch.testing import assert_close

from fewstep.train import loop
from fewstep.train.loop import set_random_seed, step_seed


def test_reseeding_draws_what_torch_manual_seed_drew():
    for it in (0, 1, 17):
        s = step_seed(3, 1, it)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        expected = (torch.rand(5), torch.randn(3), torch.randint(0, 1000, (4,)), random.random(), np.random.rand())
        torch.manual_seed(12345)  # some other state first
        set_random_seed(3, 1, it)
        got = (torch.rand(5), torch.randn(3), torch.randint(0, 1000, (4,)), random.random(), np.random.rand())
        for a, b in zip(got[:3], expected[:3]):
            assert torch.equal(a, b)
        assert got[3:] == expected[3:]


def test_multi_tensor_clipping_equals_the_per_tensor_one():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)  # no gradient: skipped by both
    module = torch.nn.Sequential(net, frozen)
    module(torch.randn(16, 4)).pow(2).sum().mul(50).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    run = types.SimpleNamespace(sharded={}, accelerator=types.SimpleNamespace(unscale_gradients=lambda: None))
    player = types.SimpleNamespace(module=module, grad_clip=1.0)
    norm = loop._clip_gradients(run, "generator", player)
    clipped = [p.grad.clone() for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0, foreach=False)
    assert norm > 1.0  # the clip bites
    assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, p in zip(clipped, net.parameters()):
        assert_close(a, p.grad, rtol=1e-6, atol=0)


def test_the_log_window_sums_tensors_as_it_summed_floats():
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1e-8, 3.3, -2.7, 1e7, 0.3)]
    floats = 0.0
    acc = 0.0
    for v in values:
        floats += float(v.item())
        acc = acc + v.detach().float().double()
    window = {"a/loss": [acc, 6.0], "b/loss": [1.5, 2.0]}
    out = loop._window_floats(window)
    assert out == {"a/loss": [floats, 6.0], "b/loss": [1.5, 2.0]}  # bit for bit, and plain floats (checkpoints)
    assert all(type(s) is float for s, _ in out.values())


def test_step_efficiency_puts_network_and_loss_code_where_they_belong():
    """A profiled toy step: a network's forward and backward are network time; the loss code around it, its backward
    nodes and the optimizer are not; the categories add up to the step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import fewstep.bench.profile as se

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(128, 64)
    with se.network_scopes(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            with record_function(se.STEP):
                y = net(x)
                with record_function("loss math"):
                    loss = (y.sin() * 3).exp().mean()  # non-network ops, with backward nodes of their own
                loss.backward()
                opt.step()
                opt.zero_grad()
    totals = se.attribute(list(prof.events()), warmup=1)
    steps, total = totals.pop("step"), totals.pop("total")
    assert steps == 2
    assert totals["network forward"] > 0 and totals[se.NET_BACKWARD] > 0
    assert totals["loss math"] > 0 and totals["backward (autograd engine, non-network nodes)"] > 0
    assert totals["optimizer step"] > 0 and totals["zero_grad"] > 0
    assert abs(sum(totals.values()) - total) < 1e-6 * total
    # the network's backward (two matmuls per Linear) outweighs the backward of the element-wise loss ops
    assert totals[se.NET_BACKWARD] > totals["backward (autograd engine, non-network nodes)"]
