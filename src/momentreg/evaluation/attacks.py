"""Minimal adversarial perturbations: PGD, FGSM, additive Gaussian (AGA) and uniform (AUA) noise,
L-BFGS (Szegedy et al. 2014) and DeepFool-L2.

Each attack returns, per test image, the smallest perturbation it finds that changes the model's
prediction (model in eval mode, images in [0, 1]). The fixed-epsilon attacks (PGD, FGSM, AGA, AUA;
``momentreg.evaluation.fixed_eps``, batched with one epsilon per image and checked against
Foolbox 3) are turned into minimal-perturbation measurements by
``momentreg.evaluation.eps_search``: each image's threshold is bracketed from a linearized estimate
and bisected to a relative tolerance, every round one batched attack run. PGD runs without random
start, so its search is deterministic and comparable with FGSM. L-BFGS is batched too
(``momentreg.evaluation.lbfgs``); DeepFool is Foolbox's (``pip install "momentreg[foolbox]"``).
Every reported perturbation is re-checked; images misclassified when clean are excluded and counted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from momentreg.errors import ConfigError
from momentreg.evaluation import fixed_eps
from momentreg.evaluation.eps_search import linear_estimate, minimal_epsilon
from momentreg.evaluation.fixed_eps import misclassified
from momentreg.evaluation.lbfgs import lbfgs_attack

__all__ = [
    "Attack",
    "ATTACKS",
    "ATTACK_LABELS",
    "AttackResult",
    "minimal_perturbations",
    "summarize",
]


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


@dataclass(frozen=True)
class Attack:
    """One attack: the ``norm`` its perturbations are measured in ("linf" or "l2"), its ``label``
    in the paper's Table 1, a ``description`` with its per-image budget, and how it runs: a
    fixed-epsilon attack ``fixed(model, x, y, eps [M]) -> (adv, success)`` that the epsilon search
    makes minimal, or an attack minimal by itself ``direct(model, x, y) -> (delta, success)``.
    ``check`` (if any) runs before any work: a missing dependency fails at once."""

    name: str
    norm: str
    label: str
    description: str
    fixed: Callable | None = None
    direct: Callable | None = None
    check: Callable | None = None

    def one_batch(self, model, x, y, tol: float, max_eps: float):
        """(delta, success, runs) for one batch: ``runs`` counts attack runs per image (1 for an
        attack that needs no epsilon search)."""
        if self.direct is not None:
            return (*self.direct(model, x, y), torch.ones(len(x), dtype=torch.long))
        start = linear_estimate(model, x, y, "linf" if self.norm == "linf" else "noise")
        search = functools.partial(self.fixed, model)
        return minimal_epsilon(search, x, y, start, tol=tol, max_eps=max_eps)


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


ATTACKS = {
    a.name: a
    for a in (
        Attack(
            "pgd",
            "linf",
            "PGD",
            "Linf PGD, 40 steps of 0.033*eps, no random start; eps search",
            fixed=fixed_eps.pgd,
        ),  # fmt: skip
        Attack(
            "lbfgs",
            "l2",
            "LBF",
            "box-projected L-BFGS on c*||d||^2 + CE(x+d, runner-up "
            "class), 8 values of c x 20 iterations per image, batched",
            direct=lbfgs_attack,
        ),  # fmt: skip
        Attack(
            "fgsm",
            "linf",
            "GSM",
            "FGSM (one Linf gradient-sign step); eps search",
            fixed=fixed_eps.fgsm,
        ),  # fmt: skip
        Attack(
            "aga",
            "l2",
            "AGA",
            "additive Gaussian noise of L2 norm eps, 20 draws per eps; eps search",
            fixed=functools.partial(fixed_eps.additive_noise, distribution="gaussian"),
        ),  # fmt: skip
        Attack(
            "aua",
            "l2",
            "AUA",
            "additive uniform noise of L2 norm eps, 20 draws per eps; eps search",
            fixed=functools.partial(fixed_eps.additive_noise, distribution="uniform"),
        ),  # fmt: skip
        Attack(
            "deepfool",
            "l2",
            "DF2",
            "DeepFool L2, <= 50 steps, 10 candidate classes, overshoot 0.01",
            direct=_deepfool,
            check=_foolbox,
        ),  # fmt: skip
    )
}
ATTACK_LABELS = {name: a.label for name, a in ATTACKS.items()}  # a view, for tables


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
    spec = ATTACKS[attack]
    if spec.check is not None:
        spec.check()  # before any work
    model.eval()
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    correct = ~misclassified(model, images, labels)
    x, y = images[correct], labels[correct]
    torch.manual_seed(seed)
    max_eps = 1.0 if spec.norm == "linf" else math.sqrt(images[0].numel())
    deltas, success, runs = [], [], []
    for start in tqdm(range(0, len(x), batch_size), desc=attack, disable=not progress):
        bx, by = x[start : start + batch_size], y[start : start + batch_size]
        d, ok, r = spec.one_batch(model, bx, by, tol, max_eps)
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
