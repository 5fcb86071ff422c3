import math
import shutil
import sys

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from torch import nn

from momentreg.core import moments
from momentreg.core.moments import (
    affine_moments,
    affine_relu_affine_moments,
    relu_mean,
    relu_moments,
)

mpmath.mp.dps = 50


def _exact(mu: float, s: float) -> tuple[float, float]:
    """E[relu] and Var[relu] of N(mu, s^2) in 50-digit arithmetic."""
    mu, s = mpmath.mpf(mu), mpmath.mpf(s)
    z = mu / s
    cdf, pdf = mpmath.ncdf(z), mpmath.npdf(z)
    m1 = mu * cdf + s * pdf
    m2 = (mu**2 + s**2) * cdf + mu * s * pdf
    return float(m1), float(m2 - m1**2)


GRID_MU = np.linspace(-5, 5, 41)
GRID_S = np.logspace(-4, 1, 21)


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> np.ndarray:
    # values below 1e-290 underflow float64 anyway: compare those absolutely
    return np.abs(got - want) <= rel * np.abs(want) + 1e-290


def test_relu_moments_match_exact_closed_form_float64():
    mu, s = np.meshgrid(GRID_MU, GRID_S)
    mean, var = relu_moments(torch.tensor(mu), torch.tensor(s**2))
    want = np.vectorize(_exact)(mu, s)
    ok_mean = _close(mean.numpy(), want[0], 1e-6)
    ok_var = _close(var.numpy(), want[1], 1e-6)
    assert ok_mean.all(), (mu[~ok_mean], s[~ok_mean])
    assert ok_var.all(), (mu[~ok_var], s[~ok_var], var.numpy()[~ok_var], want[1][~ok_var])
    assert torch.equal(relu_mean(torch.tensor(mu), torch.tensor(s**2)), mean)


@pytest.mark.parametrize("mu,s", [(-2.0, 1.0), (0.3, 0.2), (1.5, 3.0), (-0.1, 10.0), (4.0, 1e-2)])
def test_relu_moments_match_numerical_integration(mu, s):
    def density(x):
        return stats.norm.pdf(x, mu, s)

    lo, hi = 0.0, max(mu, 0) + 40 * s
    m1, _ = integrate.quad(lambda x: x * density(x), lo, hi, points=[mu] if mu > 0 else None)
    m2, _ = integrate.quad(lambda x: x * x * density(x), lo, hi, points=[mu] if mu > 0 else None)
    mean, var = relu_moments(torch.tensor(mu, dtype=torch.float64), torch.tensor(s * s))
    assert mean.item() == pytest.approx(m1, rel=1e-6)
    assert var.item() == pytest.approx(m2 - m1 * m1, rel=1e-6)


@pytest.mark.parametrize("mu,s", [(-1.0, 0.5), (0.0, 1.0), (2.0, 1.5), (0.7, 0.1)])
def test_relu_moments_match_monte_carlo(mu, s):
    gen = torch.Generator().manual_seed(1)
    samples = torch.relu(mu + s * torch.randn(2_000_000, generator=gen, dtype=torch.float64))
    mean, var = relu_moments(torch.tensor(mu, dtype=torch.float64), torch.tensor(s * s))
    n = samples.numel()
    se_mean = samples.std() / math.sqrt(n)
    sq = (samples - samples.mean()) ** 2
    se_var = sq.std() / math.sqrt(n)
    assert abs(mean - samples.mean()) < 4 * se_mean
    assert abs(var - samples.var()) < 4 * se_var


def test_zero_variance_limit_is_relu_with_finite_gradients():
    mu = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 2.0], requires_grad=True)
    var = torch.zeros(5, requires_grad=True)
    mean, out_var = relu_moments(mu, var)
    assert torch.allclose(mean, torch.relu(mu.detach()), atol=1e-18)
    assert torch.all(out_var == 0)
    (mean.sum() + out_var.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(var.grad).all()
    assert torch.equal(mu.grad[[0, 1, 3, 4]], torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_no_nan_for_extreme_inputs_in_low_precision(dtype):
    mu = torch.tensor([-1e4, -60.0, -1.0, 0.0, 1.0, 60.0, 1e4]).to(dtype).repeat(4)
    var = torch.tensor([0.0, 1e-30, 1.0, 1e4]).repeat_interleave(7).to(dtype)
    mu.requires_grad_(True)
    mean, out_var = relu_moments(mu, var)
    assert mean.dtype == dtype
    assert torch.isfinite(mean).all() and torch.isfinite(out_var).all()
    mean.float().sum().backward()
    assert torch.isfinite(mu.grad).all()


_FLOAT_WIDTHS = {torch.float16: 16, torch.bfloat16: 32, torch.float32: 32, torch.float64: 64}


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(list(_FLOAT_WIDTHS)),
    data=st.data(),
)
def test_relu_moments_never_nan_for_any_finite_input(dtype, data):
    """Any finite mu and variance (0, subnormal, huge, huge |mu|/sigma) give finite moments that
    obey E[relu] >= max(mu, 0) (Jensen), Var >= 0, and finite gradients."""
    width = _FLOAT_WIDTHS[dtype]
    finite = st.floats(allow_nan=False, allow_infinity=False, width=width)
    mu_list = data.draw(st.lists(finite, min_size=1, max_size=8))
    var_list = data.draw(st.lists(finite.map(abs), min_size=len(mu_list), max_size=len(mu_list)))
    mu = torch.tensor(mu_list, dtype=torch.float64).to(dtype)
    var = torch.tensor(var_list, dtype=torch.float64).to(dtype)
    if dtype == torch.bfloat16:  # bfloat16 has float32's range: keep the values it can hold
        ok = torch.isfinite(mu) & torch.isfinite(var)
        mu, var = mu[ok], var[ok]
    mu.requires_grad_(True)
    mean, out_var = relu_moments(mu, var)
    assert torch.isfinite(mean).all() and torch.isfinite(out_var).all()
    assert (out_var >= 0).all()
    m, r = mean.double(), torch.relu(mu.detach()).double()
    assert (m >= r - 1e-2 * r.abs() - 1e-6).all()  # Jensen, up to the dtype's rounding
    mean.double().sum().backward()
    assert torch.isfinite(mu.grad).all()
    assert torch.isfinite(relu_mean(mu.detach(), var)).all()


def test_gradcheck_relu_moments_float64_including_tiny_sigma():
    mu = torch.tensor([-2.0, -0.5, 0.0, 0.4, 3.0, 0.01, -0.02], dtype=torch.float64)
    s = torch.tensor([1.0, 0.3, 2.0, 1e-3, 5.0, 1e-3, 2e-3], dtype=torch.float64)
    mu.requires_grad_(True)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, sd: relu_moments(m, sd * sd), (mu, s))
    assert torch.autograd.gradcheck(lambda m, sd: relu_mean(m, sd * sd), (mu, s))


def test_relu_mean_broadcasts_a_batch_one_variance():
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(1, 3, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(relu_mean, (mu, var))


@pytest.mark.parametrize("var_batch", [1, 5])
def test_relu_and_mean_is_relu_stacked_on_relu_mean_with_exact_gradients(var_batch):
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(var_batch, 3, dtype=torch.float64) + 0.1).requires_grad_(True)
    want = torch.cat([torch.relu(mu), relu_mean(mu, var)])
    assert torch.equal(moments.relu_and_mean(mu, var), want)
    assert torch.autograd.gradcheck(moments.relu_and_mean, (mu, var))


def test_relu_and_mean_rejects_a_variance_of_another_batch():
    with pytest.raises(ValueError, match="batch size 1 or 4"):
        moments.relu_and_mean(torch.zeros(4, 3), torch.ones(2, 3))


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("fn", [relu_mean, moments.relu_and_mean], ids=["mean", "stacked"])
def test_compile_matches_eager(fn):
    mu = torch.randn(64, 8, requires_grad=True)
    var = (torch.rand(1, 8) + 0.01).requires_grad_(True)
    weights = torch.randn(128 if fn is moments.relu_and_mean else 64, 8)

    def run():
        out = fn(mu, var)
        return (out, *torch.autograd.grad((out * weights).sum(), (mu, var)))

    eager = run()
    moments.set_compile(True)
    try:
        compiled = run()
    finally:
        moments.set_compile(False)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6)


def test_a_failed_compilation_falls_back_to_the_eager_kernels(monkeypatch):
    """A compiler that fails (Triton without Python's headers, say) costs a warning and the
    compiled speed, not the run: the eager result, and no further attempt."""
    monkeypatch.setenv("CXX", sys.executable)  # a "compiler" that exists: compilation is tried

    def broken(*args):
        raise RuntimeError("backend compiler failed: Python.h not found")

    monkeypatch.setitem(moments._compiled, "mean", (broken, broken))
    mu = torch.randn(16, 4, requires_grad=True)
    var = torch.rand(1, 4) + 0.1
    eager = torch.autograd.grad(moments.relu_mean(mu, var).sum(), mu)[0]
    moments.set_compile(True)
    try:
        with pytest.warns(UserWarning, match="Python.h not found"):
            out = moments.relu_mean(mu, var)
        assert torch.equal(torch.autograd.grad(out.sum(), mu)[0], eager)
        assert not moments._compile_available()  # off for the rest of the process
    finally:
        moments.set_compile(False)


def _mc_moments(fn, mean, var, n, gen):
    """Monte Carlo mean, its standard error and the variance of fn(x), x ~ N(mean, diag(var))."""
    outs = []
    for _ in range(n // 10_000):
        x = mean + var.sqrt() * torch.randn(
            10_000, *mean.shape[1:], generator=gen, dtype=mean.dtype
        )
        outs.append(fn(x))
    out = torch.cat(outs)
    return out.mean(0), out.std(0) / math.sqrt(out.shape[0]), out.var(0)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(6, 4),
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
    ],
)
def test_affine_moments_match_monte_carlo(layer):
    layer = layer.double()
    shape = (1, 6) if isinstance(layer, nn.Linear) else (1, layer.in_channels, 7, 7)
    mean = torch.randn(shape, dtype=torch.float64)
    var = torch.rand(shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m, v = affine_moments(layer, mean, var)
        mc_mean, se, mc_var = _mc_moments(layer, mean, var, 200_000, gen)
    assert (abs(m[0] - mc_mean) < 4 * se).all()
    assert torch.allclose(v[0], mc_var, rtol=0.02)


@pytest.mark.parametrize(
    "first,second,shape",
    [
        (nn.Linear(5, 7), nn.Linear(7, 3), (1, 5)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(3, 2, 2), (1, 2, 6, 6)),
    ],
)
def test_affine_relu_affine_mean_is_exact_against_monte_carlo(first, second, shape):
    first, second = first.double(), second.double()
    mean = torch.randn(shape, dtype=torch.float64)
    var = 0.5 * torch.rand(shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m, v = affine_relu_affine_moments(first, second, mean, var)
        mc_mean, se, _ = _mc_moments(
            lambda x: second(torch.relu(first(x))), mean, var, 400_000, gen
        )
    assert (abs(m[0] - mc_mean) < 4 * se).all(), (m[0] - mc_mean) / se
    assert (v >= 0).all()


def test_affine_moments_rejects_non_affine_layers():
    with pytest.raises(ValueError, match="Tanh"):
        affine_moments(nn.Tanh(), None, torch.ones(1, 3))
