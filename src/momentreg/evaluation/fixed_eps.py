"""Fixed-budget attacks with one epsilon per image, batched: Linf PGD, FGSM, and repeated additive
Gaussian or uniform noise of a given L2 norm.

Each function follows its Foolbox 3 counterpart step for step (``LinfPGD`` without random start,
``LinfFastGradientAttack``, ``L2RepeatedAdditiveGaussianNoiseAttack`` and
``L2RepeatedAdditiveUniformNoiseAttack`` with ``check_trivial=False``), so on one shared epsilon
and the same random draws it returns the same points; Foolbox stays the reference
(tests/test_attacks.py). What Foolbox cannot do is take a different epsilon for each image of a
batch: an epsilon search that bisects every image's own threshold would otherwise attack one
group of images per distinct epsilon.

Shapes: ``x`` [N, C, H, W] in [0, 1], ``labels`` [N] (the true classes), ``eps`` [N]. Each
function returns ``(adv, success)``: the attacked images [N, C, H, W] and a bool [N] that says
whether the model misclassifies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from momentreg.errors import ConfigError

__all__ = ["additive_noise", "fgsm", "misclassified", "pgd"]


def misclassified(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [N]: whether the model's prediction on ``x`` differs from ``labels``."""
    with torch.no_grad():
        return model(x).argmax(1) != labels


def _per_image(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return eps.to(x).view(-1, *([1] * (x.dim() - 1)))


def _input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor,
    *,
    steps: int = 40,
    rel_stepsize: float = 1 / 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linf PGD from the clean image: ``steps`` signed-gradient ascent steps of
    ``rel_stepsize * eps`` on the cross-entropy, each projected onto the eps-ball and the [0, 1]
    box. Success is judged on the last iterate, as Foolbox does."""
    e = _per_image(eps, x)
    adv = x.clone()
    for _ in range(steps):
        adv = adv + rel_stepsize * e * _input_gradient(model, adv, labels).sign()
        adv = (x + torch.minimum(torch.maximum(adv - x, -e), e)).clamp(0, 1)
    return adv, misclassified(model, adv, labels)


def fgsm(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One signed-gradient step of size eps (Goodfellow et al. 2015), clipped to [0, 1]."""
    return pgd(model, x, labels, eps, steps=1, rel_stepsize=1.0)


def additive_noise(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor,
    *,
    distribution: str,
    repeats: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``repeats`` draws of ``distribution`` noise ("gaussian" or "uniform" on [-1, 1]),
    each scaled to L2 norm eps and clipped to [0, 1]; the first draw that flips an image is kept.
    Draws come from torch's global generator, one [N, C, H, W] tensor per repeat, and stop once
    every image has flipped."""
    if distribution not in ("gaussian", "uniform"):
        raise ConfigError(f"unknown noise {distribution!r}; choose gaussian or uniform")
    e = _per_image(eps, x)
    result, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(repeats):
        if found.all():
            break
        if distribution == "gaussian":
            p = torch.randn(x.shape, dtype=x.dtype, device=x.device)
        else:
            p = torch.rand(x.shape, dtype=x.dtype, device=x.device) * 2 - 1
        norms = p.flatten(1).norm(dim=1).view_as(e)
        adv = (x + e / norms * p).clamp(0, 1)
        new = misclassified(model, adv, labels) & ~found
        result[new] = adv[new]
        found |= new
    return result, found
