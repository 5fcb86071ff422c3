"""The paper's networks. Every model takes images in [0, 1], shape [B, C, H, W], and normalizes them
in its first layer, so noise levels, attacks and bounds are always in pixel units."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from momentreg.core.normalize import Normalize
from momentreg.errors import ConfigError

__all__ = [
    "Normalize",
    "lenet",
    "alexnet",
    "resnet20",
    "resnet18",
    "ResNet18",
    "build_model",
    "input_spec",
    "is_factory",
    "load_factory",
    "DATASETS",
    "MODELS",
]


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


def smoothing_lenet(channels: int, size: int, classes: int, normalize: Normalize) -> nn.Sequential:
    """The LeNet of the randomized-smoothing baselines' MNIST runs (Cohen et al.'s noise training,
    stability training, MACER, consistency: jh-jeong/smoothing-consistency's code/archs/lenet.py):
    5x5 convs of 20 and 50 channels without padding, each with ReLU and 2x2 max-pooling, FC 500, FC
    classes. Like theirs, it sees raw pixels in [0, 1]: ``normalize`` is not used."""
    side = ((size - 4) // 2 - 4) // 2
    flat = 50 * side * side
    return nn.Sequential(
        nn.Conv2d(channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 500),
        nn.ReLU(),
        nn.Linear(500, classes),
    )


def alexnet(channels: int, size: int, classes: int, normalize: Normalize) -> nn.Sequential:
    """AlexNet adapted to 32x32 inputs (no dropout), as in the paper."""
    if size != 32:
        raise ConfigError(f"alexnet is defined for 32x32 inputs, got {size}x{size}")
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


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images in torchvision's style: its own ``forward`` with ``F.relu``,
    a 3x3 conv-BN stem (no max-pooling), 4 stages of 2 basic blocks with 64-512 channels, global
    average pooling, FC; 11.2M parameters for CIFAR-10. Not an ``nn.Sequential``: the regularizer
    splits it with torch.fx (momentreg.core.split), its head being Normalize, the stem conv and
    BN."""

    def __init__(self, channels: int, classes: int, normalize: Normalize):
        super().__init__()
        self.normalize = normalize
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, inputs = [], 64
        for stage, width in enumerate((64, 128, 256, 512)):
            blocks = [BasicBlock(inputs, width, 2 if stage > 0 else 1), BasicBlock(width, width, 1)]
            stages.append(nn.Sequential(*blocks))
            inputs = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(channels: int, size: int, classes: int, normalize: Normalize) -> ResNet18:
    """:class:`ResNet18` (any input size; its pooling is global)."""
    return ResNet18(channels, classes, normalize)


MODELS = {
    "lenet": lenet,
    "smoothing-lenet": smoothing_lenet,
    "alexnet": alexnet,
    "resnet20": resnet20,
    "resnet18": resnet18,
}


def input_spec(images: torch.Tensor, classes: int) -> tuple:
    """(channels, size, classes, per-channel mean, per-channel std) of training images uint8 or
    float [N, C, H, W] in [0, 1]: what ``build_model`` needs for a dataset outside ``DATASETS``
    (an image folder). Square images only, as the models' ``size`` is one side."""
    _, channels, height, width = images.shape
    if height != width:
        raise ConfigError(f"the models take square images, these are {width}x{height}")
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


def is_factory(name: str) -> bool:
    """Whether a model name is a user factory, ``path/to/file.py:function`` or
    ``package.module:function``, rather than one of ``MODELS``."""
    return ":" in name


def load_factory(name: str) -> Callable[[int, int, int], nn.Module]:
    """The function named by ``path/to/file.py:function`` or ``package.module:function``.
    Importing it runs that file's code: call this only for a name the user gave."""
    where, _, function = name.rpartition(":")
    if not where or not function:
        raise ConfigError(f"--model {name}: expected path/to/file.py:function or module:function")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--model {name}: {path} is not a file")
            unit = importlib.util.spec_from_file_location(f"momentreg_user.{path.stem}", path)
            module = importlib.util.module_from_spec(unit)
            sys.modules[unit.name] = module  # pickling and dataclasses look the module up
            unit.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:  # the user's module failed to import: say where, not a traceback
        message = f"--model {name}: importing {where} failed ({type(e).__name__}: {e})"
        raise ConfigError(message) from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ConfigError(f"--model {name}: {where} has no function {function!r}")
    return factory


def build_model(name: str, dataset: str, spec: Sequence | None = None) -> nn.Module:
    """A model of the zoo, shaped for ``dataset``: channels, size, classes and the dataset's
    normalization (a :class:`Normalize` first layer), or a user's factory.

    Args:
        name: a key of ``MODELS`` (lenet, alexnet, resnet18, ...), or a user factory
            (``path/to/file.py:function`` or ``package.module:function``), called as
            ``function(channels, size, classes)``; it must return an ``nn.Module`` taking images
            in [0, 1] (momentreg adds no normalization to it) and returning logits.
        dataset: a key of ``DATASETS``.
        spec: ``(channels, size, classes, mean, std)`` for a dataset outside ``DATASETS`` (an
            image folder; see ``input_spec``).

    Returns:
        The model, freshly initialized.

    Shape:
        input: [B, channels, size, size] in [0, 1]; output: [B, classes].

    Example:
        >>> model = build_model("lenet", "mnist")
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if not is_factory(name) and name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}; choose from {sorted(MODELS)} or FILE.py:FUNCTION"
        )
    if spec is None and dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    channels, size, classes, mean, std = DATASETS[dataset] if spec is None else spec
    if not is_factory(name):
        return MODELS[name](channels, size, classes, Normalize(mean, std))
    try:
        model = load_factory(name)(channels, size, classes)
    except ValueError:
        raise
    except Exception as e:
        raise ConfigError(
            f"--model {name}: the factory failed for {channels} channels, size {size}, "
            f"{classes} classes ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--model {name}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return model
