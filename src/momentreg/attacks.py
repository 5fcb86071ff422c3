"""Minimal adversarial perturbations: PGD, FGSM, DeepFool-L2, additive Gaussian (AGA) and uniform
(AUA) noise through Foolbox 3, and L-BFGS (Szegedy et al. 2014) on scipy.optimize.

Each attack returns, per test image, the smallest perturbation it finds that changes the model's
prediction (model in eval mode, images in [0, 1]). Fixed-epsilon attacks (PGD, FGSM, AGA, AUA) are
turned into minimal-perturbation measurements by a per-image search over epsilon: a shared
geometric grid brackets each image's threshold, then bisection narrows it to a relative tolerance.
PGD runs without random start, so its search is deterministic and comparable with FGSM. Every
reported perturbation is re-checked; images misclassified when clean are excluded and counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import foolbox as fb
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ATTACKS", "ATTACK_LABELS", "AttackResult", "minimal_perturbations", "summarize"]

# name -> (norm searched over, description with the per-image budget)
ATTACKS = {
    "pgd": ("linf", "Linf PGD, 40 steps of 0.033*eps, no random start; eps search"),
    "lbfgs": (
        "l2",
        "L-BFGS-B on c*||d||^2 + CE(x+d, runner-up class), <= 8 values of c x 100 "
        "iterations per image",
    ),
    "fgsm": ("linf", "FGSM (one Linf gradient-sign step); eps search"),
    "aga": ("l2", "additive Gaussian noise of L2 norm eps, 20 draws per eps; eps search"),
    "aua": ("l2", "additive uniform noise of L2 norm eps, 20 draws per eps; eps search"),
    "deepfool": ("l2", "DeepFool L2, <= 50 steps, 10 candidate classes, overshoot 0.01"),
}
ATTACK_LABELS = {
    "pgd": "PGD",
    "lbfgs": "LBF",
    "fgsm": "GSM",
    "aga": "AGA",
    "aua": "AUA",
    "deepfool": "DF2",
}


@dataclass
class AttackResult:
    """Per evaluated image (correctly classified when clean): the perturbation found (zeros where
    the attack failed) and whether it succeeded; ``excluded`` counts misclassified clean images."""

    name: str
    perturbations: torch.Tensor  # [M, C, H, W]
    success: torch.Tensor  # bool [M]
    excluded: int

    def summary(self) -> dict:
        return summarize(self)


def _foolbox_attack(name: str):
    if name == "pgd":
        return fb.attacks.LinfPGD(rel_stepsize=1 / 30, steps=40, random_start=False)
    if name == "fgsm":
        return fb.attacks.LinfFastGradientAttack(random_start=False)
    if name == "aga":
        return fb.attacks.L2RepeatedAdditiveGaussianNoiseAttack(repeats=20, check_trivial=False)
    if name == "aua":
        return fb.attacks.L2RepeatedAdditiveUniformNoiseAttack(repeats=20, check_trivial=False)
    if name == "deepfool":
        return fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.01)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


def _flips(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != labels


def _eps_search(fmodel, attack, x, labels, tol, max_eps, progress):
    """Per-image smallest epsilon (to relative ``tol``) at which ``attack`` succeeds."""
    n = len(x)
    grid = [max_eps * 2.0**-k for k in range(16, -1, -1)]  # 2^-16 .. 1 of max_eps
    crit = fb.criteria.Misclassification(labels)
    _, advs, ok = attack(fmodel, x, crit, epsilons=grid)
    best = torch.zeros_like(x)
    lo, hi = torch.zeros(n), torch.full((n,), math.inf)
    for k in range(len(grid) - 1, -1, -1):  # from the largest eps down: keep the smallest success
        won = ok[k].cpu()
        best[won] = advs[k][won] - x[won]
        hi[won] = grid[k]
        lo[won] = grid[k - 1] if k > 0 else 0.0
    active = torch.isfinite(hi)
    bar = tqdm(total=int(active.sum()), desc="eps search", disable=not progress, leave=False)
    while True:
        todo = active & (hi - lo > tol * hi)
        if not todo.any():
            break
        mid = (lo + hi) / 2
        groups = defaultdict(list)
        for i in torch.nonzero(todo).flatten().tolist():
            groups[float(mid[i])].append(i)
        for eps, idx in groups.items():
            idx_t = torch.tensor(idx)
            sub_x, sub_y = x[idx_t], labels[idx_t]
            _, adv, won = attack(fmodel, sub_x, fb.criteria.Misclassification(sub_y), epsilons=eps)
            won = won.cpu()
            hi[idx_t[won]] = eps
            lo[idx_t[~won]] = eps
            best[idx_t[won]] = adv[won] - sub_x[won]
        bar.update(int((todo & ~(hi - lo > tol * hi)).sum()))
    bar.close()
    return best, active


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
        if _flips(model, adv, label).item():
            found, lo = adv, c
            c = c * 10 if hi is None else (c + hi) / 2
        else:
            hi = c
            c = c / 10 if found is None else (lo + c) / 2
    return None if found is None else found - x1


def _lbfgs(model, x, labels, max_c_steps=8, maxiter=100, progress=False):
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


def minimal_perturbations(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    *,
    tol: float = 0.01,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = False,
) -> AttackResult:
    """Run one attack on float ``images`` [N, C, H, W] in [0, 1] with true ``labels`` [N]."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    model.eval()
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    correct = ~_flips(model, images, labels)
    x, y = images[correct], labels[correct]
    torch.manual_seed(seed)
    norm = ATTACKS[attack][0]
    max_eps = 1.0 if norm == "linf" else math.sqrt(x[0].numel()) if len(x) else 1.0
    deltas, success = [], []
    for start in tqdm(range(0, len(x), batch_size), desc=attack, disable=not progress):
        bx, by = x[start : start + batch_size], y[start : start + batch_size]
        if attack == "lbfgs":
            d, ok = _lbfgs(model, bx, by, progress=progress)
        else:
            fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
            fb_attack = _foolbox_attack(attack)
            if attack == "deepfool":
                adv, _, _ = fb_attack(fmodel, bx, fb.criteria.Misclassification(by), epsilons=None)
                d, ok = adv - bx, torch.ones(len(bx), dtype=torch.bool)
            else:
                d, ok = _eps_search(fmodel, fb_attack, bx, by, tol, max_eps, progress)
        adv = bx + d
        valid = (adv >= -1e-6).flatten(1).all(1) & (adv <= 1 + 1e-6).flatten(1).all(1)
        ok = ok.to(device) & valid & _flips(model, adv, by)  # re-check every reported perturbation
        deltas.append(torch.where(ok.view(-1, 1, 1, 1), d, torch.zeros_like(d)).cpu())
        success.append(ok.cpu())
    empty = torch.zeros(0, *images.shape[1:])
    return AttackResult(
        name=attack,
        perturbations=torch.cat(deltas) if deltas else empty,
        success=torch.cat(success) if success else torch.zeros(0, dtype=torch.bool),
        excluded=int((~correct).sum()),
    )


def summarize(result: AttackResult) -> dict:
    """Success rate and mean/median energy (mean squared value per pixel), L2 and Linf."""
    d = result.perturbations[result.success].flatten(1).double()
    out = {
        "attack": result.name,
        "images": len(result.success),
        "excluded_misclassified": result.excluded,
        "successes": int(result.success.sum()),
        "success_rate": float(result.success.float().mean()) if len(result.success) else math.nan,
    }
    stats = {"energy": (d**2).mean(1), "l2": d.norm(dim=1), "linf": d.abs().amax(1)}
    for key, values in stats.items():
        arr = values.numpy()
        out[f"{key}_mean"] = float(np.mean(arr)) if len(arr) else math.nan
        out[f"{key}_median"] = float(np.median(arr)) if len(arr) else math.nan
    return out
