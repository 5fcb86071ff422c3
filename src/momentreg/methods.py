"""The training methods, one loss each: ``(model, x, y, noisy, cfg, gen, split) -> (loss,
logits)``, registered in ``LOSSES`` by name.

x [B, C, H, W] float, y [B] int64; noisy: bool [B], the augmentation copies of the batch; cfg: the
run's ``TrainConfig`` (``momentreg.train_config``, which imports this module for the names of
the methods); gen: the device generator that draws the noise; split: an explicit (head, tail)
for the regularizer, or None. Clean training, N-fold augmentation, Cohen et al.'s noise training
and the paper's moment regularizer are here; the randomized-smoothing baselines live in
``momentreg.smoothing_losses`` and are adapted to this signature by ``_smoothing``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momentreg import smoothing_losses
from momentreg.regularizer import moment_loss

__all__ = ["LOSSES", "METHODS", "ANALYTIC", "COPIES", "WEIGHTED", "step_loss"]


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
    extra = _noise(x, cfg, gen) if cfg.moment_noise and cfg.sigma > 0 else None
    loss, parts = moment_loss(
        model, x, y, cfg.sigma, cfg.alpha, split, depth=cfg.moment_depth, loss=cfg.moment_loss,
        noisy=extra, weighting=cfg.moment_weighting,
    )  # fmt: skip
    return loss, parts["logits"]


def _smoothing(name: str, analytic: bool):
    """A randomized-smoothing baseline (``momentreg.smoothing_losses``) as a method; ``alpha`` is
    its lambda, ``moment_depth`` the depth of its analytic expectation."""
    fn = getattr(smoothing_losses, f"{name}_loss")

    def loss(model, x, y, noisy, cfg, gen, split):
        kwargs = {"analytic": analytic, "depth": cfg.moment_depth, "split": split}
        if name == "consistency":
            kwargs.update(copies=cfg.samples or 2, eta=cfg.eta)
        elif name == "macer":
            kwargs.update(copies=cfg.samples or None, beta=cfg.macer_beta, gamma=cfg.macer_gamma)
        return fn(model, x, y, cfg.sigma, cfg.alpha, gen, **kwargs)

    loss.__name__ = f"{name}{'_analytic' if analytic else ''}_loss"
    return loss


LOSSES = {
    "clean": clean_loss,
    "augment": augment_loss,
    "noise": noise_loss,
    "moment": moment_method_loss,
    **{
        name + suffix: _smoothing(name, bool(suffix))
        for name in ("stability", "consistency", "macer")
        for suffix in ("", "-analytic")
    },
}
ANALYTIC = ("moment", "stability-analytic", "consistency-analytic", "macer-analytic")
COPIES = ("consistency", "macer", "macer-analytic")  # the methods whose noisy copies can be set
WEIGHTED = tuple(m for m in LOSSES if m not in ("clean", "augment", "noise"))  # alpha matters
METHODS = tuple(LOSSES)


def step_loss(model, x, y, noisy, cfg, gen, split=None):
    """The loss of one batch under ``cfg.method`` and the logits it saw."""
    return LOSSES[cfg.method](model, x, y, noisy, cfg, gen, split)
