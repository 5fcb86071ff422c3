"""What the tests share: small real data they make (IDX files, CIFAR pickles), the shared MNIST
location, and models written the way users write them (their own forward, F.relu, residuals)."""

import gzip
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from momentreg.models.zoo import Normalize

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="../shared MNIST absent"
)


# a quick `momentreg train` on the bundled sample: 200 images, one epoch
QUICK = ["--train-limit", "200", "--epochs", "1", "--batch-size", "50", "--lr", "1e-3"]
QUICK += ["--gnr-limit", "20", "--quiet"]


def cli(*args):
    """``python -m momentreg ARGS`` in a child process (its exit code, stdout, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "momentreg", *args], capture_output=True, text=True, timeout=300
    )


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def cifar_batch(n: int, seed: int, label_key: bytes = b"labels") -> bytes:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, 10, n).tolist(),
        b"batch_label": b"made by the tests",
    }
    return pickle.dumps(batch, protocol=2)


class MomentLossOf(nn.Module):
    """x -> moment_loss(net, x, y) as a module, for gradcheck with torch.func.functional_call."""

    def __init__(self, net, y, sigma, alpha):
        super().__init__()
        self.net, self.y, self.sigma, self.alpha = net, y, sigma, alpha

    def forward(self, x):
        from momentreg.core.regularizer import moment_loss

        return moment_loss(self.net, x, self.y, sigma=self.sigma, alpha=self.alpha)[0]


class Block(nn.Module):
    """torchvision's BasicBlock: its own forward, F.relu, a residual sum, optional downsampling."""

    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: normalization written inline, stem conv-BN-F.relu, blocks."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1((x - 0.5) / 0.25)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)

    def reference_tail(self, t):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer2(self.layer1(t)), 1), 1))


def two_layer(d_in=12, hidden=9, classes=4):
    """Normalize, Linear, ReLU, Linear in float64: the affine-ReLU-affine form of Theorem 1."""
    return nn.Sequential(
        Normalize([0.2], [0.5]),
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ).double()


def theorem1_mean(net, x, sigma):
    """Bibi et al. Theorem 1 written with explicit matrices: E[B relu(A x + c) + d]."""
    norm, _, first, _, second = net
    a = first.weight / norm.std.flatten()  # fold the normalization into the first layer
    c = first.bias - a @ norm.mean.flatten().expand(a.shape[1])
    mu = x.flatten(1) @ a.T + c
    s = torch.sqrt((a * a) @ (sigma.flatten() ** 2))
    cdf = 0.5 * torch.erfc(-mu / s / math.sqrt(2))
    pdf = torch.exp(-0.5 * (mu / s) ** 2) / math.sqrt(2 * math.pi)
    return (mu * cdf + s * pdf) @ second.weight.T + second.bias


class HostReads(TorchFunctionMode):
    """Records the calls that make the host wait for the device on an accelerator: reading a
    value (.item(), int(), bool(), .tolist(), .cpu()), indexing by a boolean mask or a 0-dim
    integer tensor, nonzero (their size is data). Seen at the torch-function level, so inside
    ``torch.inference_mode`` too. ``on_host``: tensors that stay on the CPU on an accelerator
    too (Adam's step counts)."""

    WAITS = {
        "item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy",
        "nonzero", "masked_select", "unique",
    }  # fmt: skip

    def __init__(self, on_host=()):
        super().__init__()
        self.on_host, self.ops = {id(t) for t in on_host}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        mask = name == "__getitem__" and _reads_its_index(args[1])
        if (name in self.WAITS or mask) and not (args and id(args[0]) in self.on_host):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _reads_its_index(index) -> bool:
    """An index whose value the host must know: a boolean mask (how many rows) or a
    one-element integer tensor (torch reads it as an int)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor)
        and (p.dtype == torch.bool or (p.dim() == 0 and not p.is_floating_point()))
        for p in parts
    )


def tiny_net() -> nn.Sequential:
    """A small MNIST classifier [B, 1, 28, 28] -> [B, 10] with an affine head (Normalize, conv)."""
    return nn.Sequential(
        Normalize([0.13], [0.31]),
        nn.Conv2d(1, 4, 5, stride=3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def step_cases() -> list[tuple[str, str, int | None]]:
    """(method, moment depth, samples): every training method at the paper's depth (its own
    noisy copies: samples None), the methods with an analytic expectation at depth "all" too,
    and macer-analytic with a noisy copy."""
    from momentreg.training.methods import ANALYTIC, METHODS

    cases = [(m, "first") for m in METHODS] + [(m, "all") for m in ANALYTIC]
    return [(m, depth, None) for m, depth in cases] + [("macer-analytic", "first", 1)]
