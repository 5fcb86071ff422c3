"""MomentRegularizer, the loss object for any training loop: equal to a direct computation,
under torch.compile, autocast and DistributedDataParallel, and in a plain loop."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from momentreg import MomentRegularizer, expected_logits
from momentreg.core import moments
from tests.helpers import TinyResNet


class Small(nn.Module):
    """A custom model without BatchNorm (DDP ranks then compute what one process would)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_loss_is_the_papers_formula_computed_directly():
    net = TinyResNet(classes=4).eval()
    x, y = _data()
    loss, parts = MomentRegularizer(net, sigma=0.2, alpha=2.0)(x, y)
    direct = F.cross_entropy(net(x), y) + 2.0 * F.cross_entropy(expected_logits(net, x, 0.2), y)
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(parts["logits"], net(x))


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), torch.tensor([0.1, -0.1])])
def test_a_bad_sigma_fails_at_construction(sigma):
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        MomentRegularizer(Small(), sigma=sigma)


def test_a_model_it_cannot_split_fails_at_construction():
    with pytest.raises(ValueError, match="is not affine"):
        MomentRegularizer(nn.Sequential(nn.Tanh(), nn.ReLU(), nn.Linear(2, 2)), sigma=0.1)
    with pytest.raises(ValueError, match="every layer need an nn.Sequential"):
        MomentRegularizer(TinyResNet(), sigma=0.1, depth="all")


def test_torch_compile_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    net = Small()
    reg = MomentRegularizer(net, sigma=0.3, alpha=1.0)
    x, y = _data()
    eager = reg(x, y)[0]
    eager_grads = torch.autograd.grad(eager, list(net.parameters()))
    compiled = torch.compile(reg, backend="aot_eager")(x, y)[0]
    grads = torch.autograd.grad(compiled, list(net.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_sequential_model_compiles_in_one_graph_with_the_kernels_compile_on(monkeypatch):
    """Inside a user's torch.compile momentreg's own kernel compilation steps aside: the eager
    kernels are traced into the user's graph, with no break (its compiler lookup was one)."""
    monkeypatch.setenv("CXX", sys.executable)  # a compiler is found, as on a dev box
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(384, 4))
    reg = MomentRegularizer(net, sigma=0.3, alpha=1.0)
    x, y = _data()
    eager = reg(x, y)[0]
    moments.set_compile(True)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(reg, backend="aot_eager", fullgraph=True)(x, y)[0]
    finally:
        moments.set_compile(False)
    torch.testing.assert_close(compiled, eager)


def test_bfloat16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    net = Small()
    reg = MomentRegularizer(net, sigma=0.3, alpha=1.0)
    x, y = _data(32)
    full = reg(x, y)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = reg(x, y)[0]
    assert torch.isfinite(half)
    torch.testing.assert_close(half.float(), full, rtol=0.03, atol=0.0)


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    net = Small()
    ddp = DDP(MomentRegularizer(net, sigma=0.3, alpha=1.0))
    x, y = _data(8)
    shard = slice(rank * 4, rank * 4 + 4)
    loss, _ = ddp(x[shard], y[shard])
    loss.backward()
    if rank == 0:
        torch.save([p.grad for p in net.parameters()], out)
    dist.barrier()  # a rank that tears gloo down while the other still writes can abort (CI once)
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a rank aborted there once more ("terminate called without
    # an active exception", SIGABRT: a C++ thread still joinable when its destructor ran).
    os._exit(0)


@pytest.mark.slow
def test_distributed_data_parallel_averages_the_ranks_gradients(tmp_path):
    out = str(tmp_path / "grads.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_rank, args=(2, init, out), nprocs=2, join=True)
    torch.manual_seed(0)
    net = Small()
    reg = MomentRegularizer(net, sigma=0.3, alpha=1.0)
    x, y = _data(8)
    # DDP averages the ranks' gradients: the gradient of the mean of the two shards' losses
    ((reg(x[:4], y[:4])[0] + reg(x[4:], y[4:])[0]) / 2).backward()
    for ddp_grad, p in zip(torch.load(out), net.parameters(), strict=True):
        torch.testing.assert_close(ddp_grad, p.grad)


def test_a_plain_training_loop_learns_a_custom_model():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()  # which channel is brighter
    x[torch.arange(64), y] += 0.5
    net = TinyResNet(classes=2)
    reg = MomentRegularizer(net, sigma=0.1, alpha=1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = reg(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
