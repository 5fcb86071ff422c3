"""Closed-form Gaussian moments through ReLU and affine layers.

Shapes: every function here is elementwise or a layer op; ``mean`` and ``var`` are tensors of
the same layer input shape (or broadcastable to it: a batch-1 variance against a batch).

For a Gaussian pre-activation ``h ~ N(mu, s^2)`` and ``z = mu / s``:

    E[relu(h)]   = mu * Phi(z) + s * phi(z)                 (``relu_mean``)
    E[relu(h)^2] = (mu^2 + s^2) * Phi(z) + mu * s * phi(z)

The variance is evaluated in the cancellation-free form
``s^2 * (Phi(z) * (1 + z^2 * Phi(-z)) - z * phi(z) * (Phi(z) - Phi(-z)) - phi(z)^2)``.
"""

from __future__ import annotations

import math
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

__all__ = [
    "relu_mean",
    "relu_moments",
    "affine_moments",
    "affine_relu_affine_moments",
    "set_compile",
]


def _cdf(z: torch.Tensor) -> torch.Tensor:
    # erfc keeps full relative precision in the lower tail; torch.special.ndtr is 1 + erf and
    # loses it below z ~ -6
    return 0.5 * torch.special.erfc(z * -_INV_SQRT_2)


def _pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _forward_kernel(mu: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = mu / s
    return mu * _cdf(z) + s * _pdf(z), z


def _backward_kernel(z: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grad * _cdf(z), grad * _pdf(z)


# torch.compile fuses each kernel into one loop over memory (the cost of an elementwise multiply);
# eager mode runs ~6 separate elementwise ops. Compilation needs a C++ compiler on CPU.
_compile_wanted = os.environ.get("MOMENTREG_COMPILE", "1") not in ("0", "false", "no")
_compiled: dict[str, object] = {}


def set_compile(enabled: bool) -> None:
    """Switch the ``torch.compile`` path of :func:`relu_mean` (env MOMENTREG_COMPILE=0: off)."""
    global _compile_wanted
    _compile_wanted = bool(enabled)


def _compile_available() -> bool:
    return _compile_wanted and shutil.which(os.environ.get("CXX", "g++")) is not None


def _kernels():
    if not _compile_available():
        return _forward_kernel, _backward_kernel
    if not _compiled:
        _compiled["fwd"] = torch.compile(_forward_kernel, dynamic=True)
        _compiled["bwd"] = torch.compile(_backward_kernel, dynamic=True)
    return _compiled["fwd"], _compiled["bwd"]


class _ReLUMean(torch.autograd.Function):
    """T(mu, s) with analytic gradients dT/dmu = Phi(z), dT/ds = phi(z); saves only z."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        fwd, _ = _kernels()
        out, z = fwd(mu, s)
        ctx.save_for_backward(z)
        ctx.s_shape = s.shape
        ctx.mu_shape = mu.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        _, bwd = _kernels()
        g_mu, g_s = bwd(z, grad)
        g_mu = g_mu.sum_to_size(ctx.mu_shape) if ctx.needs_input_grad[0] else None
        g_s = g_s.sum_to_size(ctx.s_shape) if ctx.needs_input_grad[1] else None
        return g_mu, g_s


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _safe_std(var: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # sqrt of a variance floored at the smallest normal number: var = 0 gives relu(mu) to within
    # sqrt(tiny) * phi(0) (~5e-20 in float32) and finite gradients everywhere.
    return var.to(dtype).clamp_min(torch.finfo(dtype).tiny).sqrt()


def relu_mean(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[relu(h)] for h ~ N(mean, var), elementwise. ``var`` broadcasts to ``mean``'s shape.

    Half-precision inputs are computed in float32 and returned in their own dtype.
    """
    dtype = _compute_dtype(mean)
    out = _ReLUMean.apply(mean.to(dtype), _safe_std(var, dtype))
    return out.to(mean.dtype)


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of relu(h) for h ~ N(mean, var), elementwise; both of ``mean``'s shape."""
    dtype = _compute_dtype(mean)
    mu = mean.to(dtype)
    s = _safe_std(var, dtype)
    out_mean = _ReLUMean.apply(mu, s)
    # beyond |z| = 1e3 every tail term below is exactly 0; the clamp keeps 0 * inf out
    z = (mu / s).clamp(-1e3, 1e3)
    cdf, sf, pdf = _cdf(z), _cdf(-z), _pdf(z)
    ratio = cdf * (1 + z * z * sf) - z * pdf * (cdf - sf) - pdf * pdf
    out_var = var.to(dtype).clamp_min(0) * ratio.clamp_min(0)
    return out_mean.to(mean.dtype), out_var.expand_as(out_mean).to(mean.dtype)


def affine_moments(
    layer: nn.Module, mean: torch.Tensor | None, var: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Propagate an independent Gaussian (per-element ``var``) through one affine layer.

    mean -> layer(mean); var -> the same op with squared weights and no bias. Supported layers:
    ``nn.Linear``, ``nn.Conv2d`` (any stride, padding, dilation, groups, zero padding),
    ``nn.Flatten``, ``nn.Identity`` and :class:`momentreg.models.Normalize`. ``mean`` may be None
    to propagate only the variance (the variance does not depend on the mean).
    """
    from momentreg.models import Normalize  # local: models imports nothing from here

    m = None if mean is None else layer(mean)
    if isinstance(layer, nn.Linear):
        v = F.linear(var, layer.weight * layer.weight)
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={layer.padding_mode!r} is not supported")
        v = F.conv2d(
            var,
            layer.weight * layer.weight,
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
    elif isinstance(layer, Normalize):
        v = var / (layer.std * layer.std)
    elif isinstance(layer, (nn.Flatten, nn.Identity)):
        v = layer(var)
    else:
        raise ValueError(f"not an affine layer momentreg can propagate moments through: {layer!r}")
    return m, v


def affine_relu_affine_moments(
    first: nn.Module, second: nn.Module, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output moments of ``second(relu(first(x)))`` for x ~ N(mean, diag(var)).

    The mean is exact (Bibi, Alfadly and Ghanem, CVPR 2018, Theorem 1): each post-ReLU unit's mean
    depends only on its own Gaussian marginal. The variance assumes the post-ReLU units are
    independent (it ignores the correlations that ``first`` induces), so it is an approximation.
    ``first`` and ``second`` are affine layers accepted by :func:`affine_moments`.
    """
    h_mean, h_var = affine_moments(first, mean, var)
    r_mean, r_var = relu_moments(h_mean, h_var)
    return affine_moments(second, r_mean, r_var)
