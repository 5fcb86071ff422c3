"""How faithful is the regularizer's surrogate? Expected logits under Gaussian noise, three ways.

For a model split at its first ReLU, f(x) = tail(relu(head(x))), with pre-activation moments
(mu, s) and the exact post-ReLU mean T(mu, s), compare with a Monte Carlo estimate of E[f(x + n)]:

- ``analytic``: tail(T(mu, s)), the paper's approximation (what ``expected_logits`` returns);
- ``linearized``: Bibi et al. (CVPR 2018)'s two-stage linearization: the tail is replaced by its
  first-order expansion at the clean post-ReLU activations r0 = relu(head(x)), which turns the
  network into Affine-ReLU-Affine form, whose mean Theorem 1 gives exactly:
  tail(r0) + J_tail(r0) (T(mu, s) - r0), computed with one forward-mode product (torch.func.jvp)
  instead of the whole Jacobian;
- ``all_layers``: means and variances pushed through every layer (assumed density filtering,
  ``expected_logits(..., depth="all")``), for ``nn.Sequential`` models.

The first two are exact when the tail is affine. Errors are relative L2 distances of the logit
vectors to the Monte Carlo mean, per image; the Monte Carlo standard error is the noise floor.

The randomized-smoothing losses need probabilities, the soft smoothed classifier
E[softmax(beta f(x + n))] (beta 1: MACER's and consistency's mean prediction; 16: MACER's hinge),
which their analytic variants replace by ``smoothing_losses.analytic_probs``: softmax(beta
tail(T)) from the first layer, the pairwise-probit ``expected_softmax`` from all layers. Their
distance to the Monte Carlo mean of softmax(beta f(x + n)) is the total variation,
0.5 sum_k |p_k - q_k|, per image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp
from tqdm.auto import tqdm

from momentreg.core.moments import relu_mean
from momentreg.core.regularizer import Split, head_moments, output_moments, split_at_first_relu
from momentreg.core.smoothing_losses import (
    MACER_BETA,
    MACER_GAMMA,
    analytic_logits,
    in_hinge,
    soft_radius_gap,
    softmax_of,
)

__all__ = [
    "ESTIMATES",
    "estimates",
    "monte_carlo",
    "tightness",
]


ESTIMATES = ("analytic", "linearized", "all_layers")
SOFT_BETAS = (1.0, MACER_BETA)  # the soft smoothed classifier's: MACER's NLL and its hinge


@torch.no_grad()
def estimates(
    model: nn.Module, x: torch.Tensor, sigma: float, split: Split | None = None
) -> dict[str, torch.Tensor]:
    """name -> expected logits [B, K] for images x [B, C, H, W]: ``analytic``, ``linearized`` and,
    for an ``nn.Sequential`` model, ``all_layers`` (moments through every layer, depth="all")."""
    head, tail = split_at_first_relu(model) if split is None else split
    h, var = head_moments(head, sigma, x)
    expected = relu_mean(h, var)
    clean = torch.relu(h)
    at_clean, correction = jvp(tail, (clean,), (expected - clean,))
    out = {"analytic": tail(expected), "linearized": at_clean + correction}
    if isinstance(model, nn.Sequential) and split is None:
        out["all_layers"] = output_moments(model, x, sigma)[0]
    return out


@torch.no_grad()
def soft_estimates(
    model: nn.Module, x: torch.Tensor, sigma: float, betas, split: Split | None = None
) -> dict[tuple[str, float], torch.Tensor]:
    """(name, beta) -> the analytic variants' E[softmax(beta f(x + n))] [B, K] for each of
    ``betas``: ``analytic`` (first layer) and, for an ``nn.Sequential`` model, ``all_layers``;
    each depth's logit moments computed once."""
    depths = {"analytic": "first"}
    if isinstance(model, nn.Sequential) and split is None:
        depths["all_layers"] = "all"
    out = {}
    for name, depth in depths.items():
        moments = analytic_logits(model, x, sigma, split, depth)
        out.update({(name, beta): softmax_of(*moments, beta) for beta in betas})
    return out


def _mean_and_se(total: torch.Tensor, total_sq: torch.Tensor, samples: int):
    mean = total / samples
    var = (total_sq / samples - mean * mean).clamp_min(0) * samples / max(samples - 1, 1)
    return mean, (var / samples).sqrt()


@torch.no_grad()
def monte_carlo(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    samples: int,
    batch: int,
    generator,
    betas: tuple[float, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[float, tuple[torch.Tensor, torch.Tensor]]]:
    """Mean of model(x + n) over ``samples`` draws per image and its standard error, each [B, K],
    and for each of ``betas`` the mean of softmax(beta model(x + n)) and its standard error, from
    the same draws."""
    sums = {}  # key -> (sum, sum of squares) over the draws; "logits" or a beta

    def add(key, values):
        s, sq = values.sum(0), (values * values).sum(0)
        sums[key] = (s, sq) if key not in sums else (sums[key][0] + s, sums[key][1] + sq)

    for start in range(0, samples, batch):
        draws = min(batch, samples - start)
        noise = torch.randn((draws, *x.shape), generator=generator, device=x.device)
        logits = model((x.unsqueeze(0) + sigma * noise).flatten(0, 1)).double()
        logits = logits.view(draws, len(x), -1)
        add("logits", logits)
        for beta in betas:
            add(beta, (beta * logits).softmax(2))
    mean, se = _mean_and_se(*sums["logits"], samples)
    return mean, se, {beta: _mean_and_se(*sums[beta], samples) for beta in betas}


def hinge_share(probs: torch.Tensor, gamma: float = MACER_GAMMA) -> float:
    """% of the images [B, K] on which MACER's hinge can act (the label aside): the gap
    Phi^-1(g1) - Phi^-1(g2) of the top two probabilities is finite and at most ``gamma``. As
    g2 <= 1 - g1, the gap is at least 2 Phi^-1(g1): at gamma 8 no image with g1 > Phi(4) =
    0.99997 counts."""
    gap = soft_radius_gap(probs.topk(2, dim=1).values)
    return float(100.0 * in_hinge(gap, gamma).double().mean())


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


def tightness(
    model: nn.Module,
    images: torch.Tensor,
    sigmas: list[float],
    *,
    samples: int = 2000,
    batch: int = 20,
    seed: int = 0,
    split: Split | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per sigma: median and mean relative error of each estimate against Monte Carlo,
    how often its argmax agrees with the Monte Carlo argmax (%), and the Monte Carlo noise floor
    (median relative standard error). ``batch`` images' worth of noise draws go through the model
    at once (``batch`` x len(images) forward passes)."""
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for sigma in tqdm(sigmas, desc="tightness", disable=not progress):
        mc, se, soft = monte_carlo(model, images, sigma, samples, batch, generator, SOFT_BETAS)
        row = {"sigma": sigma, "images": len(images), "samples": samples}
        row["mc_relative_se"] = float((se.norm(dim=1) / mc.norm(dim=1).clamp_min(1e-12)).median())
        for name, est in estimates(model, images, sigma, split).items():
            err = _relative(est, mc)
            row[f"{name}_error_median"] = float(err.median())
            row[f"{name}_error_mean"] = float(err.mean())
            row[f"{name}_argmax_agreement"] = float(
                100.0 * (est.argmax(1) == mc.argmax(1)).double().mean()
            )
        for beta, (_, probs_se) in soft.items():
            row[f"mc_tv_floor_beta{beta:g}"] = float(0.5 * probs_se.sum(1).median())
        row["mc_hinge_share"] = hinge_share(soft[MACER_BETA][0])
        for (name, beta), est in soft_estimates(model, images, sigma, SOFT_BETAS, split).items():
            tv = 0.5 * (est.double() - soft[beta][0]).abs().sum(1)
            row[f"{name}_tv_beta{beta:g}_median"] = float(tv.median())
            if beta == MACER_BETA:
                row[f"{name}_hinge_share"] = hinge_share(est)
        rows.append(row)
    return rows
