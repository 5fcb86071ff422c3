"""The training methods, one ``Method`` each, registered in ``METHODS`` by name: its loss
``(model, x, y, noisy, cfg, gen, split) -> (loss, logits)`` and what it needs.

x [B, C, H, W] float, y [B] int64; noisy: bool [B], the augmentation copies of the batch; cfg: the
run's ``TrainConfig`` (``momentreg.training.config``, which imports this module for the names of
the methods); gen: the device generator that draws the noise; split: an explicit (head, tail)
for the regularizer, or None. Clean training, N-fold augmentation, Cohen et al.'s noise training
and the paper's moment regularizer are here; the randomized-smoothing baselines live in
``momentreg.core.smoothing_losses`` and are adapted to this signature here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from momentreg.core import smoothing_losses
from momentreg.core.regularizer import moment_loss

__all__ = ["Method", "METHODS", "ANALYTIC", "COPIES", "WEIGHTED", "step_loss"]


def clean_loss(model, x, y, noisy, cfg, gen, split):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def _noise(x, cfg, gen):
    return torch.randn(x.shape, generator=gen, device=x.device).mul_(cfg.sigma)


def augment_loss(model, x, y, noisy, cfg, gen, split):
    """N-fold augmentation: the copies marked ``noisy`` get fresh Gaussian noise."""
    if cfg.sigma > 0:
        x = x + _noise(x, cfg, gen) * noisy.view(-1, *[1] * (x.dim() - 1))
    return clean_loss(model, x, y, noisy, cfg, gen, split)


def noise_loss(model, x, y, noisy, cfg, gen, split):
    """Cohen et al.'s noise training: every image freshly noised at every visit."""
    if cfg.sigma > 0:
        x = x + _noise(x, cfg, gen)
    return clean_loss(model, x, y, noisy, cfg, gen, split)


def moment_method_loss(model, x, y, noisy, cfg, gen, split):
    """The analytic moment regularizer (and its variants, see ``moment_loss``)."""
    m = cfg.method_settings
    extra = _noise(x, cfg, gen) if m.moment_noise and cfg.sigma > 0 else None
    loss, parts = moment_loss(
        model, x, y, cfg.sigma, cfg.alpha, split, depth=m.moment_depth, loss=m.moment_loss,
        noisy=extra, weighting=m.moment_weighting,
    )  # fmt: skip
    return loss, parts["logits"]


@dataclass(frozen=True)
class Method:
    """One training method: its ``loss`` ``(model, x, y, noisy, cfg, gen, split) -> (loss,
    logits)``; whether ``alpha`` weighs a term of it (``weighted``); whether it needs the model
    split at its first ReLU for an analytic expectation (``analytic``); and, where ``samples``
    sets its noisy copies per image, how many it draws when ``samples`` is not set (``copies``,
    its explicit default; None: it takes no such setting)."""

    name: str
    loss: Callable
    weighted: bool = False
    analytic: bool = False
    copies: int | None = None


def _stability(analytic: bool):
    def loss(model, x, y, noisy, cfg, gen, split):
        return smoothing_losses.stability_loss(
            model, x, y, cfg.sigma, cfg.alpha, gen, analytic=analytic,
            depth=cfg.method_settings.moment_depth, split=split,
        )  # fmt: skip

    return loss


def _consistency(analytic: bool):
    def loss(model, x, y, noisy, cfg, gen, split):
        return smoothing_losses.consistency_loss(
            model, x, y, cfg.sigma, cfg.alpha, gen, copies=cfg.copies,
            eta=cfg.method_settings.eta, analytic=analytic, depth=cfg.method_settings.moment_depth,
            split=split,
        )  # fmt: skip

    return loss


def _macer(analytic: bool):
    def loss(model, x, y, noisy, cfg, gen, split):
        m = cfg.method_settings
        return smoothing_losses.macer_loss(
            model, x, y, cfg.sigma, cfg.alpha, gen, copies=cfg.copies, beta=m.macer_beta,
            gamma=m.macer_gamma, analytic=analytic, depth=m.moment_depth, split=split,
        )  # fmt: skip

    return loss


METHODS = {
    m.name: m
    for m in (
        Method("clean", clean_loss),
        Method("augment", augment_loss),
        Method("noise", noise_loss),
        Method("moment", moment_method_loss, weighted=True, analytic=True),
        Method("stability", _stability(False), weighted=True),
        Method("stability-analytic", _stability(True), weighted=True, analytic=True),
        Method("consistency", _consistency(False), weighted=True, copies=2),
        Method("consistency-analytic", _consistency(True), weighted=True, analytic=True),
        Method("macer", _macer(False), weighted=True, copies=16),
        Method("macer-analytic", _macer(True), weighted=True, analytic=True, copies=0),
    )
}
# Views of METHODS' flags, for membership tests on a run's method name
ANALYTIC = tuple(name for name, m in METHODS.items() if m.analytic)
COPIES = tuple(name for name, m in METHODS.items() if m.copies is not None)
WEIGHTED = tuple(name for name, m in METHODS.items() if m.weighted)


def step_loss(model, x, y, noisy, cfg, gen, split=None):
    """The loss of one batch under ``cfg.method`` and the logits it saw."""
    return METHODS[cfg.method].loss(model, x, y, noisy, cfg, gen, split)
