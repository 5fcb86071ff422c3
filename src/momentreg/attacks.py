"""Minimal adversarial perturbations: PGD, FGSM, additive Gaussian (AGA) and uniform (AUA) noise,
L-BFGS (Szegedy et al. 2014) and DeepFool-L2.

Each attack returns, per test image, the smallest perturbation it finds that changes the model's
prediction (model in eval mode, images in [0, 1]). The fixed-epsilon attacks (PGD, FGSM, AGA, AUA;
``momentreg.fixed_eps``, batched with one epsilon per image and checked against Foolbox 3) are
turned into minimal-perturbation measurements by ``momentreg.eps_search``: each image's threshold
is bracketed from a linearized estimate and bisected to a relative tolerance, every round one
batched attack run. PGD runs without random start, so its search is deterministic and comparable
with FGSM. L-BFGS is batched too (``momentreg.lbfgs``); DeepFool is Foolbox's. Every reported
perturbation is re-checked; images misclassified when clean are excluded and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from momentreg import fixed_eps
from momentreg.eps_search import linear_estimate, minimal_epsilon
from momentreg.errors import ConfigError
from momentreg.fixed_eps import misclassified
from momentreg.lbfgs import lbfgs_attack

__all__ = ["ATTACKS", "ATTACK_LABELS", "AttackResult", "minimal_perturbations", "summarize"]

# name -> (norm searched over, description with the per-image budget)
ATTACKS = {
    "pgd": ("linf", "Linf PGD, 40 steps of 0.033*eps, no random start; eps search"),
    "lbfgs": (
        "l2",
        "box-projected L-BFGS on c*||d||^2 + CE(x+d, runner-up class), 8 values of c x 20 "
        "iterations per image, batched",
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
    the attack failed) and whether it succeeded; ``excluded`` counts misclassified clean images;
    ``runs`` counts the attack runs each image's epsilon search made (1 without a search)."""

    name: str
    perturbations: torch.Tensor  # [M, C, H, W]
    success: torch.Tensor  # bool [M]
    excluded: int
    runs: torch.Tensor  # int64 [M]

    def summary(self) -> dict:
        return summarize(self)


def _search_attack(name: str, model: nn.Module):
    """The fixed-epsilon attack behind ``name`` as ``(x, labels, eps [M]) -> (adv, success)``."""
    if name == "pgd":
        return lambda x, y, eps: fixed_eps.pgd(model, x, y, eps)
    if name == "fgsm":
        return lambda x, y, eps: fixed_eps.fgsm(model, x, y, eps)
    noise = {"aga": "gaussian", "aua": "uniform"}[name]
    return lambda x, y, eps: fixed_eps.additive_noise(model, x, y, eps, distribution=noise)


def _foolbox():
    """Foolbox, which DeepFool needs: an optional dependency (``momentreg[foolbox]``)."""
    try:
        import foolbox
    except ImportError:
        raise ConfigError(
            "the deepfool attack needs Foolbox: pip install 'momentreg[foolbox]'"
        ) from None
    return foolbox


def _deepfool(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    attack = fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.01)
    adv, _, _ = attack(fmodel, x, fb.criteria.Misclassification(labels), epsilons=None)
    return adv - x, torch.ones(len(x), dtype=torch.bool)


def _one_batch(model, attack, x, y, tol, max_eps):
    """(delta, success, runs) for one batch: ``runs`` counts attack runs per image (1 for the
    attacks that need no epsilon search)."""
    ones = torch.ones(len(x), dtype=torch.long)
    if attack == "lbfgs":
        return (*lbfgs_attack(model, x, y), ones)
    if attack == "deepfool":
        return (*_deepfool(model, x, y), ones)
    norm = ATTACKS[attack][0]
    start = linear_estimate(model, x, y, "linf" if norm == "linf" else "noise")
    return minimal_epsilon(_search_attack(attack, model), x, y, start, tol=tol, max_eps=max_eps)


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
    """The smallest perturbation ``attack`` finds, per image, that changes ``model``'s
    prediction; every one is re-checked, images misclassified when clean are left out.

    Args:
        model: the classifier (put in eval mode).
        images: float test images in [0, 1].
        labels: their true classes.
        attack: a key of ``ATTACKS`` (its norm and budget are there).
        tol: the relative tolerance of the epsilon search.
        seed: seeds torch's global generator (the noise attacks draw from it).
        batch_size, progress: images per batched attack run, a progress bar.

    Returns:
        An :class:`AttackResult`: the perturbations, which succeeded, how many images were left
        out, and attack runs per image; ``summarize`` gives its success rate and sizes.

    Shape:
        images: [N, C, H, W]; labels: [N]; result.perturbations: [M, C, H, W] for the M
        correctly classified images.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x = torch.rand(8, 3, 2, 2)
        >>> y = net(x).argmax(1)  # every image correctly classified
        >>> result = minimal_perturbations(net, x, y, "fgsm")
        >>> result.perturbations.shape, result.excluded
        (torch.Size([8, 3, 2, 2]), 0)
        >>> flipped = net(x + result.perturbations).argmax(1) != y
        >>> bool((flipped == result.success).all())  # each success changes the prediction
        True
    """
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    if attack == "deepfool":
        _foolbox()  # before any work
    model.eval()
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    correct = ~misclassified(model, images, labels)
    x, y = images[correct], labels[correct]
    torch.manual_seed(seed)
    max_eps = 1.0 if ATTACKS[attack][0] == "linf" else math.sqrt(images[0].numel())
    deltas, success, runs = [], [], []
    for start in tqdm(range(0, len(x), batch_size), desc=attack, disable=not progress):
        bx, by = x[start : start + batch_size], y[start : start + batch_size]
        d, ok, r = _one_batch(model, attack, bx, by, tol, max_eps)
        adv = bx + d
        valid = (adv >= -1e-6).flatten(1).all(1) & (adv <= 1 + 1e-6).flatten(1).all(1)
        ok = ok.to(device) & valid & misclassified(model, adv, by)  # re-check every result
        deltas.append(torch.where(ok.view(-1, 1, 1, 1), d, torch.zeros_like(d)).cpu())
        success.append(ok.cpu())
        runs.append(r)
    empty = torch.zeros(0, *images.shape[1:])
    return AttackResult(
        name=attack,
        perturbations=torch.cat(deltas) if deltas else empty,
        success=torch.cat(success) if success else torch.zeros(0, dtype=torch.bool),
        excluded=int((~correct).sum()),
        runs=torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long),
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
        "runs_per_image": float(result.runs.double().mean()) if len(result.runs) else math.nan,
    }
    stats = {"energy": (d**2).mean(1), "l2": d.norm(dim=1), "linf": d.abs().amax(1)}
    for key, values in stats.items():
        arr = values.numpy()
        out[f"{key}_mean"] = float(np.mean(arr)) if len(arr) else math.nan
        out[f"{key}_median"] = float(np.median(arr)) if len(arr) else math.nan
    return out
