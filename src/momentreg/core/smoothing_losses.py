"""The strong randomized-smoothing training losses, and the same losses with the analytic
expectation in place of their Monte Carlo samples.

Sampled (n_i ~ N(0, sigma^2 I) fresh for every image and step; p = softmax):

- ``stability`` (Zheng et al. 2016; Li et al. 2019): CE(f(x), y) + lambda * KL(p(x) || p(x + n)).
- ``consistency`` (Jeong & Shin 2020), m noisy copies: mean_i CE(f(x + n_i), y)
  + lambda * mean_i KL(pbar || p(x + n_i)) + eta * H(pbar), with pbar = mean_i p(x + n_i).
- ``macer`` (Zhai et al. 2020), k noisy copies: the soft smoothed classifier
  ghat = mean_i p(x + n_i); NLL(log ghat, y) + lambda * sigma / 2 * hinge, where the hinge is
  max(0, gamma - (Phi^-1(g1) - Phi^-1(g2))) over the images the soft classifier gets right, with
  g1 >= g2 the top two entries of mean_i softmax(beta * f(x + n_i)).

Analytic (``*-analytic``): pbar, ghat and the noisy softmax are replaced by ``analytic_probs``
(MACER with ``copies`` >= 1: only its hinge's; its NLL keeps those noisy copies),
an approximation of E[softmax(beta * f(x + n))]: with moments through the first layer (the paper's
split, ``depth="first"``) it is softmax(beta * tail(E[relu(head(x + n))])); with moments through
every layer (``depth="all"``) it is ``expected_softmax`` of the logits' mean and variance (a
pairwise probit approximation). Consistency keeps one noisy copy, with the analytic mean as its
target.

Each loss takes (model, x [B, C, H, W], y [B], sigma, lambda, ...) and returns (loss, logits [B, K]
of the pass its accuracy is read from). Defaults are the authors' MNIST settings (their public code,
EXPERIMENTS.MD of jh-jeong/smoothing-consistency): consistency m = 2, eta = 0.5, lambda = 5 at
sigma 0.5 and 1 (10 at 0.25); stability lambda = 2; MACER k = 16, beta = 16, gamma = 8,
lambda = 16 (6 at sigma 1), its term off for the first 30 epochs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from momentreg.core.moments import relu_and_mean, relu_mean
from momentreg.core.regularizer import (
    Split,
    checked_sigma,
    head_moments,
    output_moments,
    split_at_first_relu,
)
from momentreg.errors import ConfigError

__all__ = [
    "analytic_probs",
    "consistency_loss",
    "macer_loss",
    "expected_softmax",
    "stability_loss",
]


def expected_softmax(mean: torch.Tensor, var: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """E[softmax(beta * z)] for z ~ N(mean, diag(var)) [B, K], by the mean-field (pairwise probit)
    approximation: p_i ~ 1 / sum_j exp(-beta (mu_i - mu_j) / sqrt(1 + pi / 8 * beta^2 (v_i + v_j))),
    renormalized. Unlike softmax(beta * mu / sqrt(1 + pi / 8 * beta^2 v)) it prices the variance of
    each logit difference, and it beats that and softmax(beta * mu) against Monte Carlo
    (tests/test_smoothing_losses.py)."""
    diff = beta * (mean.unsqueeze(2) - mean.unsqueeze(1))  # [B, K, K]: mu_i - mu_j
    scale = torch.sqrt(1 + math.pi / 8 * beta**2 * (var.unsqueeze(2) + var.unsqueeze(1)))
    log_p = -torch.logsumexp(-diff / scale, dim=2)  # in logs: exp(-diff) overflows at beta 16
    return log_p.softmax(1)  # renormalized


def analytic_logits(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    split: Split | None = None,
    depth: str = "first",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits' analytic mean [B, K] under n ~ N(0, sigma^2 I), and with depth="all" their
    variance [B, K] (None for depth="first": the paper's tail of the expected first ReLU)."""
    if depth == "all":
        return output_moments(model, x, sigma)
    head, tail = split or split_at_first_relu(model)
    return tail(relu_mean(*head_moments(head, sigma, x))), None


def softmax_of(mean: torch.Tensor, var: torch.Tensor | None, beta: float = 1.0) -> torch.Tensor:
    """E[softmax(beta * z)] from ``analytic_logits``: softmax(beta * mean) without a variance."""
    return (beta * mean).softmax(1) if var is None else expected_softmax(mean, var, beta)


def analytic_probs(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    split: Split | None = None,
    *,
    depth: str = "first",
    beta: float = 1.0,
) -> torch.Tensor:
    """An approximation of E[softmax(beta * model(x + n))], n ~ N(0, sigma^2 I): [B, K]."""
    return softmax_of(*analytic_logits(model, x, sigma, split, depth), beta)


def _noisy(x: torch.Tensor, sigma: float, copies: int, gen) -> torch.Tensor:
    """x repeated ``copies`` times, copy-major [copies * B, ...], each with fresh noise."""
    reps = x.repeat(copies, *([1] * (x.dim() - 1)))
    return reps + sigma * torch.randn(reps.shape, generator=gen, dtype=x.dtype, device=x.device)


def _noisy_and_expected(model, x, sigma, copies, gen, split):
    """The logits of ``copies`` noisy copies of x [copies * B, K] and the first-layer analytic
    expected logits tail(E[relu(head(x + n))]) [B, K], through one call of the tail on both."""
    head, tail = split or split_at_first_relu(model)
    h, var = head_moments(head, sigma, x)
    stacked = torch.cat([torch.relu(head(_noisy(x, sigma, copies, gen))), relu_mean(h, var)])
    return tail(stacked).split([copies * len(x), len(x)])


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row [B], from probabilities p and log-probabilities log q [B, K]."""
    return (p * (p.clamp_min(1e-20).log() - log_q)).sum(1)


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(1e-20).log()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-20).log()).sum(1)


def stability_loss(model, x, y, sigma, lbd, gen, *, analytic=False, depth="first", split=None):
    """CE(f(x), y) + lambda * KL(p(x) || p(x + n)); analytic: KL(p(x) || phat(x))."""
    sigma = checked_sigma(sigma)
    if analytic and depth == "first":  # one head pass, the tail on [relu(h); E[relu(h)]]
        head, tail = split or split_at_first_relu(model)
        logits, expected = tail(relu_and_mean(*head_moments(head, sigma, x))).split(len(x))
        log_q = expected.log_softmax(1)
    elif analytic:
        logits = model(x)
        log_q = _log(analytic_probs(model, x, sigma, depth=depth))
    else:
        logits, noisy = model(torch.cat([x, _noisy(x, sigma, 1, gen)])).split(len(x))
        log_q = noisy.log_softmax(1)
    kl = _kl(logits.softmax(1), log_q)
    return F.cross_entropy(logits, y) + lbd * kl.mean(), logits


def consistency_loss(
    model, x, y, sigma, lbd, gen, *, copies=2, eta=0.5, analytic=False, depth="first", split=None
):
    """Sampled: mean_i CE(f(x + n_i), y) + lambda * mean_i KL(pbar || p_i) + eta * H(pbar) over
    ``copies`` noisy copies. Analytic: one noisy copy, and pbar = ``analytic_probs``."""
    sigma = checked_sigma(sigma)
    if analytic:
        if depth == "first":
            logits, expected = _noisy_and_expected(model, x, sigma, 1, gen, split)
            p_bar = expected.softmax(1)
        else:
            logits = model(_noisy(x, sigma, 1, gen))
            p_bar = analytic_probs(model, x, sigma, depth=depth)
        per_copy = [logits]
    else:
        per_copy = list(model(_noisy(x, sigma, copies, gen)).split(len(x)))
        p_bar = torch.stack([z.softmax(1) for z in per_copy]).mean(0)
    ce = torch.stack([F.cross_entropy(z, y) for z in per_copy]).mean()
    kl = torch.stack([_kl(p_bar, z.log_softmax(1)) for z in per_copy]).mean(0)
    return ce + (lbd * kl + eta * _entropy(p_bar)).mean(), per_copy[0]


MACER_BETA = 16.0  # the authors' inverse temperature of the soft smoothed classifier in the hinge
MACER_GAMMA = 8.0  # the authors' hinge margin


def soft_radius_gap(top: torch.Tensor) -> torch.Tensor:
    """Phi^-1(g1) - Phi^-1(g2) per row [B] of the top two probabilities [B, 2] of a soft smoothed
    classifier: MACER's soft certified radius in units of sigma / 2 (infinite where g1 = 1)."""
    return torch.special.ndtri(top[:, 0]) - torch.special.ndtri(top[:, 1])


def in_hinge(gap: torch.Tensor, gamma: float) -> torch.Tensor:
    """Where MACER's hinge can act on a row [B], the label aside: its gap finite and <= gamma."""
    return torch.isfinite(gap) & (gap <= gamma)


def _macer_hinge(g: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum over the images whose top class is y of max(0, gamma - (Phi^-1(g1) - Phi^-1(g2))),
    where the gap is finite (g1 < 1): MACER's hinge on the soft certified radius.

    The rows left out are masked, not indexed away: a boolean index waits for the device to
    count them (a host sync every step)."""
    top, idx = g.topk(2, dim=1)
    with torch.no_grad():  # pick the rows first: ndtri's gradient at 0 or 1 is infinite
        keep = (idx[:, 0] == y) & in_hinge(soft_radius_gap(top), gamma)
    safe = torch.where(keep.unsqueeze(1), top, 0.5)  # finite ndtri and gradient in every row
    return torch.where(keep, gamma - soft_radius_gap(safe), 0.0).sum()


def macer_loss(
    model,
    x,
    y,
    sigma,
    lbd,
    gen,
    *,
    copies=None,
    beta=MACER_BETA,
    gamma=MACER_GAMMA,
    analytic=False,
    depth="first",
    split=None,
):
    """NLL(log ghat, y) + lambda * sigma / 2 * hinge, averaged over the batch (MACER's loss);
    ghat is the mean softmax over ``copies`` noisy copies (default 16). Analytic: the hinge's
    soft smoothed classifier is ``analytic_probs``. With ``copies`` 0 (the default) so is ghat,
    and no noisy image is seen; with copies >= 1 the NLL keeps the sampled ghat of those copies,
    as consistency-analytic keeps the CE of its one noisy copy. ``sigma`` is a number: the
    hinge's radius is in its units."""
    sigma = checked_sigma(sigma)
    if not isinstance(sigma, float):
        raise ConfigError("macer_loss needs sigma as a number (its radius is in units of sigma)")
    if copies is None:
        copies = 0 if analytic else 16
    if copies < (0 if analytic else 1):
        raise ConfigError(f"macer_loss needs copies >= {0 if analytic else 1}, got {copies}")
    if analytic and not copies:
        moments = analytic_logits(model, x, sigma, split, depth)  # one pass for both betas
        g = softmax_of(*moments)
        g_beta = softmax_of(*moments, beta) if lbd else None
        logits = g.clamp_min(1e-10).log()
    else:
        expected = None
        if analytic and lbd and depth == "first":  # one tail call for the copies and the mean
            noisy, expected = _noisy_and_expected(model, x, sigma, copies, gen, split)
        else:
            noisy = model(_noisy(x, sigma, copies, gen))
        out = noisy.view(copies, len(x), -1)
        g = out.softmax(2).mean(0)
        logits = out[0]
        if not lbd:
            g_beta = None
        elif expected is not None:
            g_beta = (beta * expected).softmax(1)
        elif analytic:
            g_beta = analytic_probs(model, x, sigma, split, depth=depth, beta=beta)
        else:
            g_beta = (beta * out).softmax(2).mean(0)
    nll = F.nll_loss((g + 1e-10).log(), y, reduction="sum")  # as the authors' code
    hinge = _macer_hinge(g_beta, y, gamma) * sigma / 2 if lbd else torch.zeros((), device=x.device)
    return (nll + lbd * hinge) / len(x), logits
