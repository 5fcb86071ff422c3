"""Gaussian network robustness (GNR): how often a prediction survives noise of a given norm.

For each level sigma and test image x in [0, 1]^d, noise is drawn uniformly on the sphere of radius
sigma * sqrt(d) (the typical norm of N(0, sigma^2 I_d) noise) and added without clipping; the image
counts as robust when the prediction equals the clean one (with ``noise_samples = m``: all m draws
must agree). GNR is the area under the consistency curve over [sigma_0, sigma_max], normalized to
100 for a classifier that never changes its mind.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from momentreg.errors import ConfigError

__all__ = ["default_sigmas", "sphere_noise", "gaussian_robustness", "accuracy"]


def default_sigmas() -> torch.Tensor:
    """The paper's 30 levels, evenly spaced in [0, 0.5] (pixel units)."""
    return torch.linspace(0, 0.5, 30, dtype=torch.float64)


def sphere_noise(
    shape: tuple[int, ...], radius: float, generator: torch.Generator, device=None
) -> torch.Tensor:
    """Noise of shape [B, *dims], each sample uniform on the sphere of the given L2 radius."""
    n = torch.randn(shape, generator=generator, device=device)
    return n * (radius / n.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (n.dim() - 1))


@torch.inference_mode()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat(
        [
            model(images[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    device=None,
) -> float:
    """Share of correctly classified images, in percent. images: float [N, C, H, W] in [0, 1]."""
    return prediction_stats(model, images, labels, batch_size, device)["test_accuracy"]


def prediction_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    device=None,
) -> dict:
    """Accuracy (percent), the number of distinct classes predicted, and whether that is one: a
    model that predicts one class for every image has a meaningless GNR of 100 and is flagged."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        pred = _predict(model, images, batch_size, device)
    finally:
        model.train(was_training)
    classes = int(pred.unique().numel())
    return {
        "test_accuracy": 100.0 * (pred == labels).float().mean().item(),
        "predicted_classes": classes,
        "constant_predictions": classes == 1 and len(labels) > 1,
    }


@torch.inference_mode()
def gaussian_robustness(
    model: nn.Module,
    images: torch.Tensor,
    sigmas: torch.Tensor | None = None,
    noise_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """GNR of ``model`` on float ``images`` in [0, 1]: the area under the share of images whose
    prediction survives noise of L2 norm sigma * sqrt(d), over the sigma levels, in percent.
    Costs one clean forward pass plus one per nonzero sigma and noise sample over the images
    (in the model's eval mode; the model is left in the mode it came in).

    Args:
        model: the classifier.
        images: test images, float in [0, 1].
        sigmas: the noise levels (default: the paper's 30 levels, 0 to 1).
        noise_samples: draws per image and level; a prediction counts as robust if it survives
            them all.
        seed, batch_size, device, progress: the noise generator's seed, images per forward pass,
            where to run (default: the model's device), a progress bar.

    Returns:
        ``(gnr, sigmas, consistency)``: GNR in percent, the levels, and the share in [0, 1] of
        images whose prediction survives each level.

    Shape:
        images: [N, C, H, W]; sigmas, consistency: [S].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> gnr, sigmas, consistency = gaussian_robustness(net, torch.rand(10, 3, 2, 2))
        >>> 0 <= gnr <= 100, float(consistency[0]), len(sigmas) == len(consistency)
        (True, 1.0, True)
    """
    if noise_samples < 1:
        raise ConfigError("noise_samples must be >= 1")
    sigmas = default_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or len(sigmas) < 2 or (sigmas < 0).any():
        raise ConfigError("sigmas must be a 1-D sequence of at least two levels >= 0")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    d = images[0].numel()
    robust = torch.zeros(len(sigmas), dtype=torch.long, device=device)  # read once, at the end
    levels, batches = sigmas.tolist(), range(0, len(images), batch_size)
    try:
        for start in tqdm(batches, desc="GNR", disable=not progress, leave=False):
            x = images[start : start + batch_size].to(device)
            clean = model(x).argmax(1)
            for k, sigma in enumerate(levels):
                if sigma == 0:
                    robust[k] += len(x)
                    continue
                same = torch.ones_like(clean, dtype=torch.bool)
                for _ in range(noise_samples):
                    noisy = x + sphere_noise(x.shape, sigma * d**0.5, gen, device)
                    same &= model(noisy).argmax(1) == clean
                robust[k] += same.sum()
    finally:
        model.train(was_training)
    consistency = robust.cpu().double() / len(images)
    span = float(sigmas[-1] - sigmas[0])
    gnr = 100.0 * float(torch.trapezoid(consistency, sigmas)) / span
    return gnr, sigmas, consistency
