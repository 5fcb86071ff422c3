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

import functools
import math
import os
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

__all__ = [
    "relu_mean",
    "relu_and_mean",
    "relu_moments",
    "affine_moments",
    "affine_relu_affine_moments",
    "max_moments",
    "maxpool_moments",
    "network_moments",
    "set_compile",
]


def _cdf(z: torch.Tensor) -> torch.Tensor:
    # erfc keeps full relative precision in the lower tail; torch.special.ndtr is 1 + erf and
    # loses it below z ~ -6
    return 0.5 * torch.special.erfc(z * -_INV_SQRT_2)


def _pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _forward_kernel(mu: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T(mu, s), Phi(mu / s)); the backward reuses Phi instead of recomputing erfc."""
    z = mu / s
    cdf = _cdf(z)
    return mu * cdf + s * _pdf(z), cdf


def _backward_kernel(mu, s, cdf, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad * dT/dmu, grad * dT/ds), both of ``grad``'s shape: dT/dmu = Phi(z), dT/ds = phi(z)."""
    return grad * cdf, grad * _pdf(mu / s)


def _stacked_forward_kernel(mu, s) -> tuple[torch.Tensor, torch.Tensor]:
    """([relu(mu); T(mu, s)] [2B, ...], Phi(mu / s) [B, ...]): the concatenation is fused."""
    out, cdf = _forward_kernel(mu, s)
    return torch.cat([torch.relu(mu), out]), cdf


def _stacked_backward_kernel(mu, s, cdf, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [2B, ...] of the stacked output -> (grad wrt mu [B, ...], grad * dT/ds [B, ...])."""
    batch = mu.shape[0]
    g_mu, g_s = _backward_kernel(mu, s, cdf, grad[batch:])
    return g_mu + torch.where(mu > 0, grad[:batch], 0.0), g_s


# torch.compile fuses each kernel into one loop over memory; eager mode runs ~8 separate
# elementwise ops. Compilation needs a C++ compiler on CPU. The batch reduction of dT/ds stays
# eager (sum_to_size in the backward): inside the kernel, torch 2.13's inductor made it slower.
_compile_wanted = os.environ.get("MOMENTREG_COMPILE", "1") not in ("0", "false", "no")
_compiled: dict[str, object] = {}
_KERNELS = {
    "mean": (_forward_kernel, _backward_kernel),
    "stacked": (_stacked_forward_kernel, _stacked_backward_kernel),
}


def set_compile(enabled: bool) -> None:
    """Switch the ``torch.compile`` path of :func:`relu_mean` and :func:`relu_and_mean`
    (env MOMENTREG_COMPILE=0: off)."""
    global _compile_wanted
    _compile_wanted = bool(enabled)


def _compile_available() -> bool:
    return _compile_wanted and _found(os.environ.get("CXX", "g++"))


@functools.cache
def _found(program: str) -> bool:
    """Whether ``program`` is on PATH, looked up once: the check runs at every kernel call."""
    return shutil.which(program) is not None


def _kernel(kind: str, which: int, *args):
    """Run kernel ``which`` (0 forward, 1 backward) of ``kind``, compiled where it can be.

    Under a dispatch mode (FlopCounterMode, a profiler's) torch.compile does not compile, and
    the kernel then runs eager in every later call of the process: such calls run eager here.
    A compilation that fails (on a GPU, Triton builds its launcher with a C compiler and Python's
    headers) switches the process to the eager kernels with one warning instead of ending the
    run; a real error of the kernel is raised again by the eager one. Inside a user's
    torch.compile the eager kernel is traced into their graph."""
    if torch.compiler.is_compiling() or not _compile_available() or is_in_torch_dispatch_mode():
        return _KERNELS[kind][which](*args)
    if kind not in _compiled:
        _compiled[kind] = tuple(torch.compile(k, dynamic=True) for k in _KERNELS[kind])
    try:
        return _compiled[kind][which](*args)
    except Exception as e:  # any failure of the compiler
        set_compile(False)
        warnings.warn(
            f"torch.compile of the ReLU-mean kernels failed ({type(e).__name__}: "
            f"{str(e)[:500]}); using the eager kernels (MOMENTREG_COMPILE=0 skips the attempt)",
            stacklevel=2,
        )
        return _KERNELS[kind][which](*args)


class _ReLUMean(torch.autograd.Function):
    """T(mu, s) (kind "mean") or [relu(mu); T(mu, s)] (kind "stacked") with analytic gradients
    dT/dmu = Phi(z), dT/ds = phi(z); saves mu, s and Phi(z)."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
        out, cdf = _kernel(kind, 0, mu, s)
        ctx.save_for_backward(mu, s, cdf)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mu, s, cdf = ctx.saved_tensors
        g_mu, g_s = _kernel(ctx.kind, 1, mu, s, cdf, grad)
        g_mu = g_mu.sum_to_size(mu.shape) if ctx.needs_input_grad[0] else None
        g_s = g_s.sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
        return g_mu, g_s, None


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
    out = _ReLUMean.apply(mean.to(dtype), _safe_std(var, dtype), "mean")
    return out.to(mean.dtype)


def relu_and_mean(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``torch.cat([relu(mean), relu_mean(mean, var)])`` in one fused pass: [2B, ...] for
    ``mean`` [B, ...]; ``var`` [1, ...] (a variance shared by the batch) or of ``mean``'s shape.

    The regularizer sends both halves through the tail as one batch; fusing them skips the
    separate ReLU, the concatenation and the sum of their two gradients.
    """
    if var.dim() != mean.dim() or var.shape[0] not in (1, mean.shape[0]):
        raise ValueError(
            f"var {tuple(var.shape)} must have mean's rank {mean.dim()} and batch size 1 or "
            f"{mean.shape[0]}"
        )
    dtype = _compute_dtype(mean)
    out = _ReLUMean.apply(mean.to(dtype), _safe_std(var, dtype), "stacked")
    return out.to(mean.dtype)


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of relu(h) for h ~ N(mean, var), elementwise; both of ``mean``'s shape."""
    dtype = _compute_dtype(mean)
    mu = mean.to(dtype)
    s = _safe_std(var, dtype)
    out_mean = _ReLUMean.apply(mu, s, "mean")
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
    ``nn.BatchNorm2d``, ``nn.Flatten``, ``nn.Identity`` and :class:`momentreg.models.zoo.Normalize`.
    ``mean`` may be None to propagate only the variance (the variance does not depend on the mean),
    except through a BatchNorm in training mode: there the affine map is the normalization by the
    statistics of the batch ``mean`` [B, C, H, W] (what the layer applies to that batch), so the
    batch is needed.
    """
    from momentreg.core.normalize import Normalize

    m = None if mean is None else layer(mean)  # BatchNorm below reads the input ``mean``
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
    elif isinstance(layer, nn.BatchNorm2d):
        v = var * _batchnorm_scale(layer, mean).view(-1, 1, 1) ** 2
    elif isinstance(layer, (nn.Flatten, nn.Identity)):
        v = layer(var)
    else:
        raise ValueError(f"not an affine layer momentreg can propagate moments through: {layer!r}")
    return m, v


def _batchnorm_scale(layer: nn.BatchNorm2d, batch: torch.Tensor | None) -> torch.Tensor:
    """Per-channel factor gamma / sqrt(var + eps) of a BatchNorm2d's affine map: running variance
    in eval mode, the biased variance of ``batch`` (the layer's input) in training mode."""
    if layer.training or layer.running_var is None:
        if batch is None:
            raise ValueError(
                "a BatchNorm2d in training mode normalizes by batch statistics: propagate the "
                "batch mean with the variance (momentreg.head_moments), or call model.eval()"
            )
        var = batch.var(dim=(0, 2, 3), unbiased=False)
    else:
        var = layer.running_var
    scale = torch.rsqrt(var + layer.eps)
    return scale * layer.weight if layer.weight is not None else scale


def max_moments(
    mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of max(X1, X2) for independent X1 ~ N(mean1, var1), X2 ~ N(mean2, var2),
    elementwise: Clark (1961)'s formulas, exact for two variables."""
    dtype = _compute_dtype(mean1)
    m1, m2 = mean1.to(dtype), mean2.to(dtype)
    v1, v2 = var1.to(dtype).clamp_min(0), var2.to(dtype).clamp_min(0)
    theta = _safe_std(v1 + v2, dtype)
    a = ((m1 - m2) / theta).clamp(-1e3, 1e3)  # as in relu_moments: keeps 0 * inf out
    cdf, sf, pdf = _cdf(a), _cdf(-a), _pdf(a)
    mean = m1 * cdf + m2 * sf + theta * pdf
    # E[max^2] - E[max]^2 written around m2 (shifting both by m2 keeps the cancellation small)
    d = m1 - m2
    second = (d * d + v1) * cdf + v2 * sf + d * theta * pdf
    first = d * cdf + theta * pdf
    var = (second - first * first).clamp_min(0)
    return mean.to(mean1.dtype), var.to(mean1.dtype)


def maxpool_moments(
    layer: nn.MaxPool2d, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of max-pooling [B, C, H, W] Gaussians assumed independent: Clark's pairwise max,
    folded over each window and re-approximated as Gaussian after every step (an approximation
    beyond two entries). Supports any kernel and stride without padding or dilation."""
    if _pair(layer.padding) != (0, 0) or _pair(layer.dilation) != (1, 1) or layer.ceil_mode:
        raise ValueError(f"max-pooling moments need padding 0, dilation 1, floor mode: {layer!r}")
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    b, c, h, w = mean.shape
    var = var.expand_as(mean)
    out_h, out_w = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1

    def windows(t):  # [B, C, k*k, out_h * out_w]
        cols = F.unfold(t.reshape(b * c, 1, h, w), kernel, stride=stride)
        return cols.view(b, c, -1, out_h * out_w)

    mw, vw = windows(mean), windows(var)
    m, v = mw[:, :, 0], vw[:, :, 0]
    for k in range(1, mw.shape[2]):
        m, v = max_moments(m, v, mw[:, :, k], vw[:, :, k])
    return m.view(b, c, out_h, out_w), v.view(b, c, out_h, out_w)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def network_moments(
    layers: list[nn.Module], mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assumed density filtering: push (mean, per-element var) through every layer, treating each
    layer's outputs as independent Gaussians. Affine layers as in :func:`affine_moments`, ReLU by
    :func:`relu_moments` (exact per unit), MaxPool2d by :func:`maxpool_moments`, Dropout (eval) as
    identity. The correlations that a layer induces are dropped, so deeper estimates drift."""
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            mean, var = relu_moments(mean, var)
        elif isinstance(layer, nn.MaxPool2d):
            mean, var = maxpool_moments(layer, mean, var)
        elif isinstance(layer, nn.Dropout) and not layer.training:
            continue
        else:
            mean, var = affine_moments(layer, mean, var)
    return mean, var


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
