"""The noise corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019): Gaussian, shot,
impulse and speckle noise at severities 1 to 5, with the published constants, and the published
files' layout.

Each corruption maps an image x in [0, 1] to a noisy one, clipped to [0, 1] and quantized to uint8
as the published files are (``uint8(255 * x)``, which truncates):

    gaussian_noise  x + c * n,  n ~ N(0, 1)          c = 0.04, 0.06, 0.08, 0.09, 0.10
    shot_noise      Poisson(c * x) / c               c = 500, 250, 100, 75, 50
    impulse_noise   each value set to 0 or 1 (even odds) with probability c
                                                     c = 0.01, 0.02, 0.03, 0.05, 0.07
    speckle_noise   x + x * c * n,  n ~ N(0, 1)       c = 0.06, 0.10, 0.12, 0.16, 0.20

The draws come from a ``torch.Generator`` on the images' device, batch by batch, so a seed gives
the same corrupted set on every run of a machine; the authors drew with NumPy, so our corrupted
images are draws of the same distribution, not their files. Where you have the files
(``<corruption>.npy``: 5 x 10,000 images, severity 1 first; ``labels.npy``), ``load_cifar_c``
reads them, and the evaluation uses them instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from momentreg.data.datasets import to_float
from momentreg.errors import ConfigError, DatasetError

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "apply",
    "shot_distribution",
    "shot_table",
    "to_uint8",
    "load_cifar_c",
    "corruption_accuracy",
]

CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
}
SEVERITIES = (1, 2, 3, 4, 5)
PER_SEVERITY = 10_000  # images per severity in a published file


def _constant(name: str, severity: int) -> float:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be 1 to 5, got {severity}")
    return CORRUPTIONS[name][severity - 1]


def _draws(name: str, x: torch.Tensor, c: float, gen: torch.Generator | None) -> tuple:
    """The random draws of one corruption for float images ``x``."""
    if name in ("gaussian_noise", "speckle_noise"):
        return (torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype),)
    if name == "shot_noise":
        return (torch.poisson(x * c, generator=gen),)
    flip = torch.rand(x.shape, generator=gen, device=x.device) < c
    salt = torch.rand(x.shape, generator=gen, device=x.device) < 0.5
    return flip, salt


def apply(name: str, x: torch.Tensor, c: float, draws: tuple) -> torch.Tensor:
    """The corruption's formula on float images ``x`` [N, C, H, W] in [0, 1], given its draws
    (a standard normal tensor; Poisson counts of rate c * x; or impulse's flip and salt masks);
    returns the clipped images, before quantization."""
    if name == "gaussian_noise":
        out = x + c * draws[0]
    elif name == "speckle_noise":
        out = x + x * c * draws[0]
    elif name == "shot_noise":
        out = draws[0] / c
    else:
        flip, salt = draws
        out = torch.where(flip, salt.to(x.dtype), x)
    return out.clamp(0, 1)


def shot_distribution(c: float) -> torch.Tensor:
    """Row v: the exact distribution (float64 [256, 256]) of shot noise's uint8 output for the
    uint8 input v, ``to_uint8(apply("shot_noise", v / 255, c, (Poisson(c * v / 255),)))``: the
    Poisson law of the float32 rate that ``torch.poisson`` would see, each count mapped to its
    output by the same float32 operations."""
    levels = to_float(torch.arange(256, dtype=torch.uint8))
    rates = (levels * c).double()[:, None]  # float32 products, as torch.poisson's input
    top = math.ceil(c) + 1  # every count above maps to 255
    counts = torch.arange(top + 1, dtype=torch.float64)
    pmf = torch.exp(torch.xlogy(counts, rates) - rates - torch.lgamma(counts + 1))  # [256, top+1]
    outputs = to_uint8((counts.float() / c).clamp(0, 1)).long()  # each count's output
    table = torch.zeros(256, 256, dtype=torch.float64).index_add_(1, outputs, pmf)
    table[:, 255] += (1 - pmf.sum(1)).clamp(min=0)  # counts above top
    return table / table.sum(1, keepdim=True)


@functools.lru_cache(maxsize=16)
def shot_table(c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker's alias tables of :func:`shot_distribution`: (acceptance probabilities float64
    [256, 256], aliases int64 [256, 256])."""
    return _alias(shot_distribution(c).numpy())


@functools.lru_cache(maxsize=32)
def _flat_table(c: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shot_table` flattened on ``device``, moved there once per process."""
    return tuple(t.to(device).flatten() for t in shot_table(c))


def _alias(table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Vose's alias method for each row of ``table`` [R, K] (rows sum to 1)."""
    rows, k = table.shape
    prob, alias = np.ones((rows, k)), np.tile(np.arange(k), (rows, 1))
    for r in range(rows):
        scaled = (table[r] * k).tolist()
        small = [i for i in range(k) if scaled[i] < 1]
        large = [i for i in range(k) if scaled[i] >= 1]
        row_prob, row_alias = prob[r].tolist(), alias[r].tolist()
        while small and large:
            s, g = small.pop(), large.pop()
            row_prob[s], row_alias[s] = scaled[s], g
            scaled[g] -= 1 - scaled[s]
            (small if scaled[g] < 1 else large).append(g)
        prob[r], alias[r] = row_prob, row_alias
    return torch.from_numpy(prob), torch.from_numpy(alias)


def _shot_uint8(images: torch.Tensor, c: float, gen: torch.Generator | None) -> torch.Tensor:
    """Shot noise on uint8 ``images`` by the alias tables: one uniform draw per value, its
    integer part (of 256 times it) the candidate output and its fraction the acceptance draw,
    in place of a Poisson draw (the same distribution)."""
    prob, alias = _flat_table(float(c), images.device)
    u = torch.rand(images.shape, generator=gen, device=images.device, dtype=torch.float64) * 256
    candidate = u.long()
    index = images.long() * 256 + candidate
    return torch.where(u - candidate < prob[index], candidate, alias[index]).to(torch.uint8)


def corrupt(
    images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``images`` (uint8 in [0, 255] or float in [0, 1], [N, C, H, W]) with corruption ``name`` at
    ``severity``, as uint8 [N, C, H, W] on the images' device. Shot noise on uint8 images is drawn
    by :func:`shot_table`'s alias tables (the same distribution as a Poisson draw, at a fraction
    of its cost on a CPU).

    Example:
        >>> images = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
        >>> gen = torch.Generator().manual_seed(0)
        >>> corrupt(images, "impulse_noise", 5, gen).shape
        torch.Size([2, 3, 4, 4])
    """
    c = _constant(name, severity)
    if name == "shot_noise" and images.dtype == torch.uint8:
        return _shot_uint8(images, c, generator)
    x = to_float(images)
    return to_uint8(apply(name, x, c, _draws(name, x, c, generator)))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as the published files store them: ``uint8(255 * x)``, truncated."""
    return (x * 255).to(torch.uint8)


def load_cifar_c(folder: str | Path, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [10000, C, H, W], int64 labels [10000]) of one corruption and severity from
    the published layout: ``folder/<name>.npy`` holds 5 x 10,000 images [N, H, W, C], severity 1
    first, and ``folder/labels.npy`` their labels."""
    _constant(name, severity)
    folder = Path(folder)
    files = folder / f"{name}.npy", folder / "labels.npy"
    for path in files:
        if not path.is_file():
            raise DatasetError(f"{path} is missing: CIFAR-10-C has <corruption>.npy and labels.npy")
    images = np.load(files[0], mmap_mode="r")
    labels = np.load(files[1], mmap_mode="r")
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DatasetError(
            f"{files[0]} is not a CIFAR-10-C file: expected uint8 [N, H, W, C] with one label "
            f"per image in labels.npy, got {images.dtype} {tuple(images.shape)} and "
            f"{len(labels)} labels"
        )
    per = len(images) // len(SEVERITIES)
    if per * len(SEVERITIES) != len(images):
        raise DatasetError(f"{files[0]} holds {len(images)} images, not 5 severities of equal size")
    part = slice((severity - 1) * per, severity * per)
    chosen = torch.from_numpy(np.array(images[part])).permute(0, 3, 1, 2)  # a copy, writable
    return chosen.contiguous(), torch.from_numpy(np.asarray(labels[part], dtype=np.int64))


@torch.inference_mode()
def corruption_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: tuple[str, ...] = tuple(CORRUPTIONS),
    *,
    seed: int = 0,
    batch_size: int = 256,
    cifar_c: str | Path | None = None,
    device=None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Accuracy (%) under each corruption at severities 1 to 5: name -> [5 accuracies].

    ``images`` uint8 or float [N, C, H, W], ``labels`` [N]: the clean test set, corrupted here,
    batch by batch on the model's device, with a generator seeded by ``seed`` for each corruption
    and severity (the same corrupted set on every run with the same batch size). With
    ``cifar_c`` (a folder of the published files) the published corrupted images and their
    labels are read instead, and ``images``, ``labels`` and ``seed`` are not used. Costs one
    forward pass per image, corruption and severity (20 per image for all four).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = {}
    try:
        for k, name in enumerate(names):
            result[name] = []
            for severity in tqdm(SEVERITIES, desc=name, disable=not progress, leave=False):
                if cifar_c is not None:
                    x_all, y_all = load_cifar_c(cifar_c, name, severity)
                else:
                    x_all, y_all = images, labels
                gen = torch.Generator(device=device).manual_seed(seed + 10 * k + severity)
                hits = torch.zeros((), dtype=torch.long, device=device)
                for start in range(0, len(y_all), batch_size):
                    x = x_all[start : start + batch_size].to(device)
                    y = y_all[start : start + batch_size].to(device)
                    if cifar_c is None:
                        x = corrupt(x, name, severity, gen)
                    hits += (model(to_float(x)).argmax(1) == y).sum()
                result[name].append(100.0 * hits.item() / len(y_all))
    finally:
        model.train(was_training)
    return result
