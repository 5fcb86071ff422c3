"""Szegedy et al.'s L-BFGS attack image by image on scipy's L-BFGS-B: the reference that the
batched ``momentreg.evaluation.lbfgs.lbfgs_attack`` is checked against (tests/test_attacks.py,
benchmarks).

Foolbox 3 has no L-BFGS attack, so this direct transcription of the method (c * ||d||^2 +
CE(x + d, runner-up class) in the box, the same search over c) is the reference. It returns
``(delta, success)`` like the batched attack, at about 20x its cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from tqdm.auto import tqdm

from momentreg.evaluation.fixed_eps import misclassified

__all__ = ["lbfgs_scipy"]


def _lbfgs_one(model, x1, label, target, max_c_steps, maxiter):
    """One image [1, C, H, W]: the smallest flipping perturbation over a search on c, or None."""
    x0 = x1.double().cpu().numpy().ravel()
    bounds = [(0.0, 1.0)] * len(x0)

    def to_image(flat):
        return torch.tensor(flat, dtype=torch.float32, device=x1.device).view_as(x1)

    def objective(flat, c):
        adv = to_image(flat).requires_grad_(True)
        loss = F.cross_entropy(model(adv), target)
        (grad,) = torch.autograd.grad(loss, adv)
        d = flat - x0
        return c * float(d @ d) + loss.item(), 2 * c * d + grad.double().cpu().numpy().ravel()

    found, lo, hi, c = None, 0.0, None, 1e-2  # a larger c favours a smaller perturbation
    for _ in range(max_c_steps):
        res = minimize(
            objective,
            x0,
            args=(c,),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": maxiter},
        )
        adv = to_image(res.x)
        if misclassified(model, adv, label).item():
            found, lo = adv, c
            c = c * 10 if hi is None else (c + hi) / 2
        else:
            hi = c
            c = c / 10 if found is None else (lo + c) / 2
    return None if found is None else found - x1


def lbfgs_scipy(model, x, labels, max_c_steps=8, maxiter=100, progress=False):
    """Szegedy et al.'s box-constrained L-BFGS toward the runner-up class, image by image."""
    with torch.no_grad():
        runner_up = model(x).scatter(1, labels[:, None], -math.inf).argmax(1)
    deltas, success = torch.zeros_like(x), torch.zeros(len(x), dtype=torch.bool)
    # One image per model call: intra-op threads only fight scipy's BLAS threads (7x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in tqdm(range(len(x)), desc="L-BFGS", disable=not progress, leave=False):
            d = _lbfgs_one(
                model, x[i : i + 1], labels[i : i + 1], runner_up[i : i + 1], max_c_steps, maxiter
            )
            if d is not None:
                deltas[i], success[i] = d[0], True
    finally:
        torch.set_num_threads(threads)
    return deltas, success
