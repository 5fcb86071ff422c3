"""Szegedy et al.'s L-BFGS attack, every image of a batch at once.

For each image x with true class y and runner-up class t (the clean model's second most likely
class), minimize ``c * ||z - x||^2 + CE(model(z), t)`` over images z in the box [0, 1], from z = x,
for a per-image constant c found by a search: start at c = 0.01; after a success (z is
misclassified) remember z and raise c (x10 until the first failure, then bisect), after a failure
lower it (/10 until the first success, then bisect); 8 values of c, each minimized from x for 20
iterations (the scipy reference runs 100; on LeNet the two find median energies within 2%, see
docs/performance.md. Starting each c from the previous minimizer instead reaches other local
minima than the reference's, with smaller perturbations, so we do not).

The minimizer is a projected L-BFGS (a memory of 10 pairs, Armijo backtracking along the projected
path; variables held at a bound by their gradient are frozen for the step), run on all images of
the batch in lockstep with per-image histories, step sizes and stopping tests (scipy's L-BFGS-B
tests: relative decrease under 2.2e-9 or projected gradient under 1e-5). The image-by-image scipy
version it replaces is ``tests/lbfgs_scipy.py``, the reference it is checked against
(tests/test_attacks.py, benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["box_lbfgs", "lbfgs_attack"]

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _two_loop(q, S, Y, rho, gamma, newest):
    """The L-BFGS product H q for each row: q [A, D], S and Y [A, m, D], rho [A, m] (0 marks an
    empty slot), gamma [A]; slots are a ring whose most recent entry is ``newest``."""
    m = S.shape[1]
    order = [(newest - i) % m for i in range(m)]
    alphas = []
    for j in order:
        a = rho[:, j] * (S[:, j] * q).sum(1)
        q = q - a[:, None] * Y[:, j]
        alphas.append(a)
    r = gamma[:, None] * q
    for j, a in zip(reversed(order), reversed(alphas), strict=True):
        b = rho[:, j] * (Y[:, j] * r).sum(1)
        r = r + (a - b)[:, None] * S[:, j]
    return r


def box_lbfgs(
    fg: Objective,
    z0: torch.Tensor,
    *,
    maxiter: int = 100,
    memory: int = 10,
    ftol: float = 2.2e-9,
    gtol: float = 1e-5,
    max_backtracks: int = 20,
) -> torch.Tensor:
    """Minimize N independent objectives over [0, 1]^D, one per row of ``z0`` [N, D].

    ``fg(z, rows)`` returns the objectives [M] and their gradients [M, D] at ``z`` [M, D] for the
    rows ``rows`` (int64 [M]). Returns the minimizers [N, D]."""
    n, dim = z0.shape
    z = z0.clone()
    rows = torch.arange(n, device=z.device)
    f, g = fg(z, rows)
    S = torch.zeros(n, memory, dim, dtype=z.dtype, device=z.device)
    Y = torch.zeros_like(S)
    rho = torch.zeros(n, memory, dtype=z.dtype, device=z.device)
    gamma = torch.ones(n, dtype=z.dtype, device=z.device)
    active = ((z - g).clamp(0, 1) - z).abs().amax(1) > gtol
    for it in range(maxiter):
        a = torch.nonzero(active).flatten()
        if len(a) == 0:
            break
        za, fa, ga = z[a], f[a], g[a]
        free = ~(((za <= 0) & (ga > 0)) | ((za >= 1) & (ga < 0)))
        gf = ga * free
        d = -_two_loop(gf, S[a], Y[a], rho[a], gamma[a], (it - 1) % memory) * free
        uphill = (gf * d).sum(1) >= 0
        d[uphill] = -gf[uphill]
        t = torch.ones(len(a), dtype=z.dtype, device=z.device)
        if it == 0:
            t = 1 / d.norm(dim=1).clamp_min(1e-12)
        z_new, f_new, g_new = za.clone(), fa.clone(), ga.clone()
        pending = torch.ones(len(a), dtype=torch.bool, device=z.device)
        for _ in range(max_backtracks):
            p = torch.nonzero(pending).flatten()
            trial = (za[p] + t[p, None] * d[p]).clamp(0, 1)
            ft, gt = fg(trial, a[p])
            ok = ft <= fa[p] + 1e-4 * (ga[p] * (trial - za[p])).sum(1)
            acc = p[ok]
            z_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
            pending[acc] = False
            t[p[~ok]] *= 0.5
            if not pending.any():
                break
        s, y = z_new - za, g_new - ga
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        keep = (sy > 2.2e-16 * yy) & ~pending
        slot = it % memory
        S[a, slot] = torch.where(keep[:, None], s, torch.zeros_like(s))
        Y[a, slot] = torch.where(keep[:, None], y, torch.zeros_like(y))
        rho[a, slot] = torch.where(keep, 1 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        gamma[a] = torch.where(keep, sy / yy.clamp_min(1e-30), gamma[a])
        z[a], f[a], g[a] = z_new, f_new, g_new
        stalled = (fa - f_new) <= ftol * torch.maximum(fa.abs(), f_new.abs()).clamp_min(1)
        flat = ((z_new - g_new).clamp(0, 1) - z_new).abs().amax(1) <= gtol
        active[a] = ~(stalled | flat | pending)
    return z


def lbfgs_attack(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    c_steps: int = 8,
    maxiter: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest flipping perturbation found for each image: ``(delta, success)``,
    [N, C, H, W] (zeros where no c flipped the image) and bool [N]."""
    n = len(x)
    flat_x = x.flatten(1)
    with torch.no_grad():
        target = model(x).scatter(1, labels[:, None], -math.inf).argmax(1)
    c = torch.full((n,), 1e-2, dtype=x.dtype, device=x.device)

    def fg(z, rows):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            d = z - flat_x[rows]
            ce = F.cross_entropy(model(z.view(-1, *x.shape[1:])), target[rows], reduction="none")
            f = c[rows] * (d * d).sum(1) + ce
            (grad,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), grad

    best = torch.zeros_like(x)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    lo = torch.zeros_like(c)
    hi = torch.full_like(c, math.inf)
    for _ in range(c_steps):
        adv = box_lbfgs(fg, flat_x, maxiter=maxiter).view_as(x)  # from x, as the reference
        with torch.no_grad():
            flipped = model(adv).argmax(1) != labels
        best[flipped] = adv[flipped] - x[flipped]
        lo = torch.where(flipped, c, lo)
        hi = torch.where(flipped, hi, c)
        bracketed = torch.isfinite(hi)
        up = torch.where(bracketed, (c + hi) / 2, c * 10)
        down = torch.where(found, (lo + c) / 2, c / 10)  # used where this c failed
        found |= flipped
        c = torch.where(flipped, up, down)
    return best, found
