"""The per-channel normalization layer: the affine first layer of the model zoo's networks,
which the moment math pushes means and variances through."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize"]


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
