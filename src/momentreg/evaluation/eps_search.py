"""The smallest epsilon at which a fixed-epsilon attack succeeds, per image, in few batched runs.

Every image carries its own epsilon. The search starts at a cheap estimate of the image's threshold
(``linear_estimate``: the distance to the decision boundary of the model linearized at the image),
brackets the threshold by doubling or halving from there, then bisects until the bracket
[lo, hi] satisfies hi - lo <= tol * hi: a failure at lo, a success at hi. Each round attacks all
images still searching in one batched call, so a round costs one attack run per active image; the
number of rounds per image is ``runs`` (about log2 of the estimate's error plus
log2(1 / tol), 9 to 11 for PGD on LeNet, against 24 for a 17-point grid followed by bisection).

This is the paper's measure: the reported perturbation is the attack's output at the smallest
successful epsilon found, within a relative ``tol`` of the threshold of that (possibly non-monotone)
attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["linear_estimate", "minimal_epsilon"]

Attack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# 20 draws of a unit-variance Gaussian: the expected largest is about 1.87 (noise attacks keep the
# best of 20 random directions, whose projections on the gradient are ~ N(0, ||g||^2 / d)).
_BEST_OF_20 = 1.87


def linear_estimate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, norm: str):
    """float [N]: each image's distance to the boundary with its runner-up class, for the model
    linearized at the image: margin / ||grad margin||_q, with q = 1 for "linf", 2 for "l2" and for
    "noise" (scaled by sqrt(d) / 1.87: the size at which the best of 20 random directions of that
    norm reaches the boundary)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        runner_up = logits.detach().scatter(1, labels[:, None], -math.inf).argmax(1)
        margin = logits.gather(1, labels[:, None]) - logits.gather(1, runner_up[:, None])
        (grad,) = torch.autograd.grad(margin.sum(), x)
    g = grad.flatten(1)
    dual = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
    est = margin.detach().flatten().clamp_min(0) / dual.clamp_min(1e-12)
    if norm == "noise":
        est = est * math.sqrt(g.shape[1]) / _BEST_OF_20
    return est.cpu()


def minimal_epsilon(
    attack: Attack,
    x: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    *,
    tol: float,
    max_eps: float,
    min_eps: float | None = None,
    factor: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bracket and bisect each image's threshold, starting from ``start`` [N].

    ``attack(x, labels, eps)`` takes [M, C, H, W], [M] and eps [M] and returns ``(adv, success)``.
    Returns ``(delta, success, runs)``: the perturbation at the smallest successful epsilon
    [N, C, H, W] (zeros where the attack failed even at ``max_eps``), bool [N], and the number of
    attack runs spent on each image, int [N]. Images that succeed at ``min_eps`` (default
    ``max_eps * 2**-16``) stop there."""
    n = len(x)
    min_eps = max_eps * 2.0**-16 if min_eps is None else min_eps
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    has_lo = torch.zeros(n, dtype=torch.bool)
    eps = torch.nan_to_num(start.double(), nan=max_eps).clamp(min_eps, max_eps)
    best = torch.zeros_like(x)
    runs = torch.zeros(n, dtype=torch.long)
    while True:
        found = torch.isfinite(hi)
        done = (has_lo & found & (hi - lo <= tol * hi)) | (has_lo & (lo >= max_eps))
        done |= hi <= min_eps
        active = ~done
        if not active.any():
            break
        eps = torch.where(
            found & has_lo,
            (lo + hi) / 2,
            torch.where(
                found,
                (hi / factor).clamp_min(min_eps),
                torch.where(has_lo, (lo * factor).clamp_max(max_eps), eps),
            ),
        )
        idx = torch.nonzero(active).flatten()  # the search's state stays on the CPU
        on_device = idx.to(x.device)
        adv, won = attack(x[on_device], labels[on_device], eps[idx].float().to(x.device))
        best[on_device[won]] = adv[won] - x[on_device[won]]
        won = won.cpu()
        runs[idx] += 1
        hit, miss = idx[won], idx[~won]
        hi[hit] = eps[hit]
        lo[miss], has_lo[miss] = eps[miss], True
    return best, torch.isfinite(hi), runs
