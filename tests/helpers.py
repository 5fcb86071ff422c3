"""What the tests share: small real data they make (IDX files, CIFAR pickles), the shared MNIST
location, and models written the way users write them (their own forward, F.relu, residuals)."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="../shared MNIST absent"
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
        from momentreg.regularizer import moment_loss

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
