"""The analytic moment regularizer: loss = CE(f(x), y) + alpha * CE(E[f(x + n)], y).

The network is split at its first ReLU, f = tail(relu(head(x))) with ``head`` affine. For
n ~ N(0, diag(sigma^2)) the pre-activation head(x + n) is Gaussian with mean head(x) and variance
head_variance(sigma^2) (the head with squared weights, no bias), so E[relu(.)] is exact and
E[f(x + n)] ~ tail(relu_mean(head(x), head_variance)): one extra pass through the tail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from momentreg.models import Normalize
from momentreg.moments import affine_moments, relu_mean

__all__ = ["split_at_first_relu", "head_variance", "expected_logits", "moment_loss"]

AFFINE_HEAD_LAYERS = (Normalize, nn.Conv2d, nn.Linear, nn.Flatten, nn.Identity)
Split = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def split_at_first_relu(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """Split an ``nn.Sequential`` (nested ones too) into (affine head, tail) around its first ReLU.

    The two halves share the model's modules (and so its parameters). Raises ``ValueError`` naming
    the first layer before the ReLU that is not affine, or when there is no ReLU.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"split_at_first_relu needs an nn.Sequential, got {type(model).__name__}; "
            "pass split=(head, tail) yourself for other models"
        )
    leaves = _leaves(model)
    for i, layer in enumerate(leaves):
        if isinstance(layer, nn.ReLU):
            if i == 0:
                raise ValueError("the model starts with a ReLU: there is no affine head before it")
            return nn.Sequential(*leaves[:i]), nn.Sequential(*leaves[i + 1 :])
        if not isinstance(layer, AFFINE_HEAD_LAYERS):
            raise ValueError(
                f"layer {i} ({layer!r}) before the first ReLU is not affine; the head may only "
                f"hold {', '.join(t.__name__ for t in AFFINE_HEAD_LAYERS)}"
            )
    raise ValueError("the model has no nn.ReLU to split at")


def _sigma_tensor(sigma: float | torch.Tensor, input_shape: torch.Size, like: torch.Tensor):
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.lt(0).any() or not torch.isfinite(sigma).all():
        raise ValueError("sigma must be finite and >= 0")
    try:
        shape = torch.broadcast_shapes(sigma.shape, input_shape)
    except RuntimeError:
        shape = None
    if shape != input_shape:
        raise ValueError(
            f"sigma of shape {tuple(sigma.shape)} does not broadcast to one input of shape "
            f"{tuple(input_shape)}"
        )
    return sigma.expand(input_shape)


def head_variance(head: nn.Module, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Variance of head(x + n), n ~ N(0, diag(sigma^2)); shape [1, *head output shape].

    Computed once at batch size 1: it does not depend on x, only on its shape [B, *input_shape].
    """
    var = (_sigma_tensor(sigma, x.shape[1:], x) ** 2).unsqueeze(0)
    for layer in _leaves(head):
        _, var = affine_moments(layer, None, var)
    return var


def _split(model: nn.Module, split: Split | None) -> Split:
    return split_at_first_relu(model) if split is None else split


def expected_logits(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    split: Split | None = None,
) -> torch.Tensor:
    """Approximate E[model(x + n)], n ~ N(0, diag(sigma^2)): tail(relu_mean(head(x), head var)).

    x: [B, *input_shape]; sigma: a float or a tensor broadcastable to input_shape (per-pixel
    levels); returns [B, classes]. ``split=(head, tail)`` for non-Sequential models: ``head`` an
    affine module (or Sequential of them) as accepted by :func:`split_at_first_relu`, ``tail`` any
    callable.
    """
    head, tail = _split(model, split)
    return tail(relu_mean(head(x), head_variance(head, sigma, x)))


def moment_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    alpha: float,
    split: Split | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(model(x), y) + alpha * CE(expected_logits(model, x, sigma), y).

    The head runs once; the clean and expected activations go through the tail in one batched
    call of size 2B. Returns (total, {"clean": ..., "moment": ..., "logits": clean logits [B, K]}).
    Note: a BatchNorm in train mode inside the tail sees both halves as one batch.
    """
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    head, tail = _split(model, split)
    h = head(x)
    both = tail(torch.cat([torch.relu(h), relu_mean(h, head_variance(head, sigma, x))]))
    logits, expected = both.split(x.shape[0])
    clean = F.cross_entropy(logits, y)
    moment = F.cross_entropy(expected, y)
    return clean + alpha * moment, {"clean": clean, "moment": moment, "logits": logits}
