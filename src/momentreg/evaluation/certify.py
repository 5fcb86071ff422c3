"""Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019): PREDICT and CERTIFY for the
smoothed classifier g(x) = argmax_c P(f(x + n) = c), n ~ N(0, sigma^2 I), of any base classifier f.

CERTIFY picks the top class from n0 noisy samples, estimates its probability from n fresh ones,
takes the one-sided Clopper-Pearson lower bound pA at confidence 1 - alpha and returns the L2 radius
sigma * Phi^-1(pA), or abstains when pA < 1/2. With probability at least 1 - alpha over the noise,
g is constant within that radius. Images are in [0, 1]; the noise is not clipped.
"""

from __future__ import annotations

import csv
import datetime
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn
from tqdm.auto import tqdm

from momentreg.errors import ConfigError

__all__ = [
    "ABSTAIN",
    "RADII",
    "certify_line",
    "certified_accuracy",
    "sample_counts",
    "lower_confidence_bound",
    "predict",
    "certify",
    "certify_images",
    "summarize",
    "format_tsv",
    "read_tsv",
    "certified_radii",
    "mean_and_se",
    "acr_gap",
]

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.inference_mode()
def _device_counts(model, x, sigma, n, batch, generator) -> torch.Tensor:
    """``sample_counts`` left on x's device: int64 [K]. Counted by scatter_add, not bincount,
    which on a GPU reads the largest class back to size its output (a wait per batch)."""
    counts = None
    for start in range(0, n, batch):
        size = min(batch, n - start)
        noise = torch.randn((size, *x.shape), generator=generator, device=x.device)
        logits = model(x.unsqueeze(0) + sigma * noise)
        if counts is None:
            counts = torch.zeros(logits.shape[1], dtype=torch.long, device=x.device)
        top = logits.argmax(1)
        counts.scatter_add_(0, top, torch.ones_like(top))
    return counts


def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    n: int,
    batch: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """How often each class wins over ``n`` noisy copies of one image x [C, H, W]; int64 [K]."""
    return _device_counts(model, x, sigma, n, batch, generator).cpu()


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion."""
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def predict(model, x, sigma, n, alpha, batch, generator) -> int:
    """Cohen et al.'s PREDICT: the top class, or ABSTAIN unless it beats the runner-up at level
    alpha (two-sided binomial test of the top-two counts)."""
    counts = sample_counts(model, x, sigma, n, batch, generator)
    top2 = counts.topk(2)
    n_a, n_b = (int(c) for c in top2.values)
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


@torch.inference_mode()
def _selection_and_count(model, x, sigma, n0, n, batch, generator) -> torch.Tensor:
    """CERTIFY's draws for one image, on its device: [c_A, count of c_A among the n samples]."""
    c_a = _device_counts(model, x, sigma, n0, batch, generator).argmax().view(1)
    # gather, not counts[c_a]: indexing by a one-element tensor reads it back to the host
    return torch.cat([c_a, _device_counts(model, x, sigma, n, batch, generator).gather(0, c_a)])


def _radius(c_a: int, n_a: int, sigma, n, alpha) -> tuple[int, float]:
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, sigma * float(norm.ppf(p_a))


def certify(model, x, sigma, n0, n, alpha, batch, generator) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY for one image: with probability at least 1 - alpha over the noise,
    the smoothed classifier g(x) = argmax_c P(model(x + n) = c), n ~ N(0, sigma^2 I), returns
    the class found here at every point within the certified L2 radius of ``x``.

    Args:
        model: the base classifier (in eval mode).
        x: one image.
        sigma: the smoothing noise std.
        n0: noise samples to choose the class.
        n: noise samples to bound its probability from below.
        alpha: the failure probability.
        batch: noisy copies per forward pass.
        generator: the noise's ``torch.Generator``, on the model's device.

    Returns:
        ``(class, radius)``, or ``(ABSTAIN, 0.0)`` where the bound on the top class's
        probability is below 1/2.

    Shape:
        x: [C, H, W].

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))
        ...     _ = net[1].bias.zero_()
        >>> gen = torch.Generator().manual_seed(0)
        >>> c, radius = certify(net, torch.full((1, 2, 2), 0.5), 0.25, 100, 1000, 0.001, 500, gen)
        >>> c  # the margin, 4, is far beyond the noise: every sample votes for class 0
        0
        >>> bool(abs(radius - 0.25 * norm.ppf(0.001 ** (1 / 1000))) < 1e-9)  # Clopper-Pearson
        True
    """
    c_a, n_a = _selection_and_count(model, x, sigma, n0, n, batch, generator).tolist()
    return _radius(c_a, n_a, sigma, n, alpha)


# Images certified between two reads of their results from the device: a read waits for the
# device, which on a GPU shared by several jobs costs more than an image's samples.
_SAMPLES_PER_READ = 2_000_000


def certify_images(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch: int = 1000,
    seed: int = 0,
    progress: bool = False,
    done: list[dict] | None = None,
    state: torch.Tensor | None = None,
    checkpoint: Callable[[list[dict], torch.Tensor], None] | None = None,
) -> list[dict]:
    """CERTIFY every image [N, C, H, W] (float, [0, 1]); one row per image with the columns of
    locuslab/smoothing's certify.py: idx, label, predict, radius, correct, time.

    The images are certified one after another from one seeded stream of noise, as by
    :func:`certify`, but their results are read from the device in groups (about two million
    samples each); ``time`` is the seconds of an image's group over its size.

    Resuming: after each group ``checkpoint(rows, state)`` gets the rows so far and the noise
    generator's state. Given back as ``done`` and ``state`` (with the same model, images and
    settings), the images of ``done`` are not certified again and the others continue the same
    stream of noise, so the rows are those of one uninterrupted call (but for ``time``)."""
    if not (sigma > 0 and n0 >= 1 and n >= 1 and 0 < alpha < 1 and batch >= 1):
        raise ConfigError("certify needs sigma > 0, n0 >= 1, n >= 1, 0 < alpha < 1 and batch >= 1")
    if (done is None) != (state is None):
        raise ConfigError("resuming needs both the rows done and the generator state after them")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if state is not None:
        generator.set_state(state)
    images, labels = images.to(device), labels.tolist()
    group = max(1, _SAMPLES_PER_READ // (n0 + n))
    rows = list(done or [])
    with tqdm(
        total=len(labels), initial=len(rows), desc=f"certify sigma={sigma}", disable=not progress
    ) as bar:
        for first in range(len(rows), len(labels), group):
            t0 = time.perf_counter()
            drawn = [
                _selection_and_count(model, x, sigma, n0, n, batch, generator)
                for x in images[first : first + group]
            ]
            results = torch.stack(drawn).tolist()  # the group's one wait for the device
            seconds = (time.perf_counter() - t0) / len(results)
            for i, (c_a, n_a) in enumerate(results, start=first):
                c, radius = _radius(c_a, n_a, sigma, n, alpha)
                label = labels[i]
                rows.append(
                    {
                        "idx": i,
                        "label": label,
                        "predict": c,
                        "radius": radius,
                        "correct": int(c == label),
                        "time": seconds,
                    }
                )
            bar.update(len(results))
            if checkpoint is not None and len(rows) < len(labels):
                checkpoint(rows, generator.get_state())
    return rows


def certified_accuracy(rows: list[dict], radii=RADII) -> dict[float, float]:
    """radius -> the share (%) of rows (``correct``, ``radius``) certified correct at it: correct
    and radius >= r (an abstention is never correct, so at r = 0 this is the smoothed
    classifier's accuracy)."""
    total = len(rows)
    return {
        r: 100.0 * sum(row["correct"] and row["radius"] >= r for row in rows) / total for r in radii
    }


def summarize(rows: list[dict], radii=RADII) -> dict:
    """Certified accuracy (%) at each radius (:func:`certified_accuracy`) and the average
    certified radius (ACR: mean of radius over correct predictions, 0 elsewhere)."""
    total = len(rows)
    if total == 0:
        raise ConfigError("no certified images to summarize")
    return {
        "images": total,
        "abstained": sum(r["predict"] == ABSTAIN for r in rows),
        "certified_accuracy": {
            f"{radius:g}": value for radius, value in certified_accuracy(rows, radii).items()
        },
        "acr": sum(r["radius"] for r in rows if r["correct"]) / total,
        "seconds_per_image": sum(r["time"] for r in rows) / total,
    }


def certify_line(summary: dict) -> str:
    """One line of a ``summarize`` result: certified accuracy per radius, ACR, abstentions."""
    radii = ", ".join(f"{v:.1f}% at {r}" for r, v in summary["certified_accuracy"].items())
    return (
        f"sigma {summary['sigma']:g}: certified accuracy {radii}; ACR {summary['acr']:.3f}; "
        f"abstained {summary['abstained']}/{summary['images']}"
    )


def format_tsv(rows: list[dict]) -> str:
    """The per-image table in locuslab/smoothing's format (time as H:MM:SS.ffffff)."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in rows:
        elapsed = datetime.timedelta(seconds=r["time"])
        lines.append(
            f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.3}\t{r['correct']}\t{elapsed}"
        )
    return "\n".join(lines) + "\n"


def read_tsv(path: str | Path) -> list[dict]:
    """The rows of a per-image certification table (:func:`format_tsv`'s layout, which is
    locuslab/smoothing's): idx, label, predict, radius, correct and time (seconds; nan where the
    table has none) of each image."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"idx", "label", "predict", "radius", "correct"} <= set(rows[0]):
        raise ConfigError(f"{path} is not a certification table: its columns are {list(rows[0])}")
    return [
        {"idx": int(r["idx"]), "label": int(r["label"]), "predict": int(r["predict"]),
         "radius": float(r["radius"]), "correct": int(r["correct"]),
         "time": _seconds(r.get("time"))}
        for r in rows
    ]  # fmt: skip


def _seconds(elapsed: str | None) -> float:
    """H:MM:SS.ffffff (the table's time) in seconds; nan for a table without times."""
    if not elapsed:
        return math.nan
    hours, minutes, seconds = elapsed.split(":")
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def certified_radii(rows: list[dict]) -> dict[int, float]:
    """Each image's certified radius by its index (``idx``): the radius of a correct
    prediction, 0 for a wrong one or an abstention. Their mean is the ACR."""
    return {r["idx"]: r["radius"] if r["correct"] else 0.0 for r in rows}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (nan for fewer than two)."""
    n = len(values)
    if n == 0:
        raise ConfigError("no values to average")
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return mean, se


def acr_gap(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Run a's ACR minus run b's, from their :func:`certified_radii`, and the standard error of
    that difference. Where both certified the same images, it is the standard error of the
    per-image differences, so what the runs share (an image easy or hard for both) cancels;
    otherwise the two runs' own standard errors add in quadrature.

    Example:
        >>> a, b = {0: 1.0, 1: 0.5, 2: 0.0}, {0: 0.8, 1: 0.4, 2: 0.0}
        >>> gap, se = acr_gap(a, b)
        >>> round(gap, 3), round(se, 3)
        (0.1, 0.058)
    """
    (mean_a, se_a), (mean_b, se_b) = mean_and_se(list(a.values())), mean_and_se(list(b.values()))
    if a.keys() == b.keys():
        return mean_a - mean_b, mean_and_se([a[i] - b[i] for i in a])[1]
    return mean_a - mean_b, math.hypot(se_a, se_b)
