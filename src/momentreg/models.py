"""The paper's networks. Every model takes images in [0, 1], shape [B, C, H, W], and normalizes them
in its first layer, so noise levels, attacks and bounds are always in pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "Normalize",
    "lenet",
    "alexnet",
    "resnet20",
    "build_model",
    "input_spec",
    "DATASETS",
    "MODELS",
]


class Normalize(nn.Module):
    """Per-channel affine map (x - mean) / std on [B, C, H, W]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# name -> (channels, size, classes, per-channel mean, per-channel std) of the training images.
DATASETS: dict[str, tuple[int, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "mnist": (1, 28, 10, (0.1307,), (0.3081,)),
    "fashion-mnist": (1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": (3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS["mnist-sample"] = DATASETS["mnist"]


def lenet(channels: int, size: int, classes: int, normalize: Normalize) -> nn.Sequential:
    """LeNet of the paper: two 5x5 convs (32, 64) with 2x2 max-pooling, FC 1024, FC classes."""
    flat = 64 * (size // 4) ** 2
    return nn.Sequential(
        normalize,
        nn.Conv2d(channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 1024),
        nn.ReLU(),
        nn.Linear(1024, classes),
    )


def alexnet(channels: int, size: int, classes: int, normalize: Normalize) -> nn.Sequential:
    """AlexNet adapted to 32x32 inputs (no dropout), as in the paper."""
    if size != 32:
        raise ValueError(f"alexnet is defined for 32x32 inputs, got {size}x{size}")
    return nn.Sequential(
        normalize,
        nn.Conv2d(channels, 64, 11, stride=4, padding=5),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.MaxPool2d(2, 2),
        nn.ReLU(),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.MaxPool2d(2, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the
    shape changes), then ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet20(channels: int, size: int, classes: int, normalize: Normalize) -> nn.Sequential:
    """ResNet-20 for CIFAR (He et al. 2016): a conv-BN-ReLU stem, 3 stages of 3 basic blocks with
    16, 32 and 64 channels, global average pooling, FC. The stem is the moment regularizer's
    head (Normalize, Conv2d, BatchNorm2d)."""
    blocks, inputs = [], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(3):
            blocks.append(BasicBlock(inputs, width, 2 if stage > 0 and i == 0 else 1))
            inputs = width
    return nn.Sequential(
        normalize,
        nn.Conv2d(channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


MODELS = {"lenet": lenet, "alexnet": alexnet, "resnet20": resnet20}


def input_spec(images: torch.Tensor, classes: int) -> tuple:
    """(channels, size, classes, per-channel mean, per-channel std) of training images uint8 or
    float [N, C, H, W] in [0, 1]: what ``build_model`` needs for a dataset outside ``DATASETS``
    (an image folder). Square images only, as the models' ``size`` is one side."""
    _, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"the models take square images, these are {width}x{height}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, len(images), 10_000):  # bounded memory for large sets
        chunk = images[i : i + 10_000].to(torch.float64) / scale
        mean += chunk.sum((0, 2, 3))
        square += chunk.square().sum((0, 2, 3))
    count = len(images) * height * width
    mean /= count
    std = (square / count - mean.square()).clamp_min(1e-12).sqrt()
    return channels, height, classes, tuple(mean.tolist()), tuple(std.tolist())


def build_model(name: str, dataset: str, spec: Sequence | None = None) -> nn.Sequential:
    """Registry: ``build_model("lenet", "mnist")`` picks channels, size, classes, normalization.
    For a dataset outside ``DATASETS`` (an image folder) pass ``spec``, from ``input_spec``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if spec is None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    channels, size, classes, mean, std = DATASETS[dataset] if spec is None else spec
    return MODELS[name](channels, size, classes, Normalize(mean, std))
