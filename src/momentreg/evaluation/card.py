"""A robustness card for any classifier on images in [0, 1]: clean accuracy, GNR and its curve,
accuracy under CIFAR-10-C's noise corruptions, and where asked minimal adversarial perturbations
and randomized-smoothing certificates, each number with its image count and seed.

    card = evaluate(model, images, labels, name="my model")   # a Card
    write_card(card, Path("cards/mine"))                        # card.json, card.md, card.png
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from momentreg.data.datasets import to_float
from momentreg.errors import ConfigError
from momentreg.evaluation.attacks import ATTACKS, minimal_perturbations, summarize
from momentreg.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corruption_accuracy
from momentreg.evaluation.robustness import gaussian_robustness, prediction_stats
from momentreg.tables import markdown_table

__all__ = ["Card", "Certification", "evaluate", "write_card", "read_card", "compare_cards"]


@dataclasses.dataclass(frozen=True)
class Certification:
    """Settings of Cohen et al.'s CERTIFY for a card
    (``momentreg.evaluation.certify.certify_images``): noise std ``sigma``, ``n0`` samples to pick
    the class, ``n`` to bound its probability, failure probability ``alpha``, ``batch`` noisy
    copies per forward pass, on the first ``images`` test images (all by default)."""

    sigma: float = 0.25
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    images: int | None = None


@dataclasses.dataclass
class Card:
    """What ``evaluate`` measured. Accuracies in percent; ``corruptions`` maps a corruption to its
    accuracy at severities 1 to 5; ``corruption_source`` is "generated" (momentreg's draws, seeded
    by ``seed``) or the folder of the published files."""

    name: str
    images: int
    seed: int
    clean_accuracy: float
    gnr: float
    gnr_images: int
    gnr_curve: dict
    corruptions: dict
    corruption_source: str
    attacks: dict = dataclasses.field(default_factory=dict)
    certified: dict | None = None

    def corruption_means(self) -> dict[str, float]:
        """Each corruption's accuracy, averaged over its five severities."""
        return {name: sum(accs) / len(accs) for name, accs in self.corruptions.items()}

    def mean_corruption_accuracy(self) -> float | None:
        """The mean over every corruption and severity (None without corruptions)."""
        means = list(self.corruption_means().values())
        return sum(means) / len(means) if means else None


def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    name: str = "model",
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS),
    cifar_c: str | Path | None = None,
    gnr_images: int | None = None,
    attacks: tuple[str, ...] = (),
    attack_images: int | None = None,
    tol: float = 0.01,
    certify: Certification | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = False,
) -> Card:
    """Measure ``model`` on test images (uint8 or float in [0, 1], [N, C, H, W]) and labels [N].

    GNR runs on the first ``gnr_images`` (all by default), the corruptions on every image (or on
    the published files in ``cifar_c``), each of ``attacks`` (a key of
    ``momentreg.evaluation.attacks.ATTACKS``: minimal perturbations found to relative tolerance
    ``tol``) on the first ``attack_images``, and with ``certify`` the smoothed model is certified.
    The model is left in the mode it came in.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.arange(20) % 3
        >>> card = evaluate(net, x, y, corruptions=("shot_noise",))
        >>> card.images, len(card.corruptions["shot_noise"])
        (20, 5)
    """
    if len(images) != len(labels) or len(labels) == 0:
        raise ConfigError(f"{len(images)} images and {len(labels)} labels: need as many, not 0")
    device = device or next(model.parameters()).device
    was_training = model.training
    x = to_float(images)
    stats = prediction_stats(model, x, labels, batch_size, device)
    count = min(gnr_images or len(labels), len(labels))
    gnr, sigmas, consistency = gaussian_robustness(
        model, x[:count], seed=seed, batch_size=batch_size, device=device, progress=progress
    )
    accs = corruption_accuracy(
        model, images, labels, tuple(corruptions), seed=seed, batch_size=batch_size,
        cifar_c=cifar_c, device=device, progress=progress,
    )  # fmt: skip
    try:
        found = _attacks(model, x[:attack_images], labels[:attack_images], attacks, tol, seed,
                         progress)  # fmt: skip
        certified = _certified(model, x, labels, certify, seed, progress) if certify else None
    finally:
        model.train(was_training)
    return Card(
        name=name,
        images=len(labels),
        seed=seed,
        clean_accuracy=stats["test_accuracy"],
        gnr=gnr,
        gnr_images=count,
        gnr_curve={"sigmas": sigmas.tolist(), "consistency": consistency.tolist()},
        corruptions=accs,
        corruption_source="generated" if cifar_c is None else str(cifar_c),
        attacks=found,
        certified=certified,
    )


def _attacks(model, x, labels, names, tol, seed, progress) -> dict:
    return {
        name: summarize(
            minimal_perturbations(model, x, labels, name, tol=tol, seed=seed, progress=progress)
        )
        for name in names
    }


def _certified(model, x, labels, settings: Certification, seed, progress) -> dict:
    from momentreg.evaluation.certify import certified_accuracy, certify_images, summarize

    count = min(settings.images or len(labels), len(labels))
    rows = certify_images(
        model, x[:count], labels[:count], settings.sigma, n0=settings.n0, n=settings.n,
        alpha=settings.alpha, batch=settings.batch, seed=seed, progress=progress,
    )  # fmt: skip
    summary = summarize(rows)
    largest = max([r["radius"] for r in rows if r["correct"]], default=0.0)
    radii = [largest * i / 40 for i in range(41)] if largest > 0 else [0.0]
    curve = certified_accuracy(rows, radii)
    summary.pop("seconds_per_image")
    return {
        **dataclasses.asdict(settings),
        **summary,
        "seed": seed,
        "curve": {"radii": list(curve), "accuracy": list(curve.values())},
    }


def _rows(card: Card) -> list[list[str]]:
    generated = card.corruption_source == "generated"  # else the published files, as they are
    source = [f"{card.images} x 5", str(card.seed)] if generated else ["published files", "-"]
    rows = [
        ["clean accuracy (%)", f"{card.clean_accuracy:.2f}", str(card.images), str(card.seed)],
        ["GNR", f"{card.gnr:.2f}", str(card.gnr_images), str(card.seed)],
    ]
    for name, mean in card.corruption_means().items():
        rows.append([f"{name}, mean of severities 1-5 (%)", f"{mean:.2f}", *source])
    overall = card.mean_corruption_accuracy()
    if overall is not None:
        rows.append(["all corruptions, mean (%)", f"{overall:.2f}", *source])
    for name, a in card.attacks.items():
        norm = "Linf" if ATTACKS[name].norm == "linf" else "L2"
        count = f"{a['images']} of {a['images'] + a['excluded_misclassified']}"
        rows.append([f"{name}: median minimal {norm} perturbation",
                     f"{a[norm.lower() + '_median']:.4g}", count, str(card.seed)])  # fmt: skip
        rows.append(
            [f"{name}: success (%)", f"{100 * a['success_rate']:.1f}", count, str(card.seed)]
        )
    c = card.certified
    if c is not None:
        for radius, value in c["certified_accuracy"].items():
            rows.append([f"certified accuracy at L2 radius {radius}, sigma {c['sigma']:g} (%)",
                         f"{value:.2f}", str(c["images"]), str(c["seed"])])  # fmt: skip
        rows.append(
            [f"ACR, sigma {c['sigma']:g}", f"{c['acr']:.3f}", str(c["images"]), str(c["seed"])]
        )
    return rows


def _figure(card: Card, path: Path) -> None:
    fig = Figure(figsize=(15 if card.certified else 10, 4), dpi=110)
    axes = fig.subplots(1, 3 if card.certified else 2)
    _gnr_panel(axes[0], [card])
    for name, accs in card.corruptions.items():
        axes[1].plot(SEVERITIES, accs, marker="o", label=name)
    axes[1].axhline(card.clean_accuracy, color="k", ls="--", label="clean")
    axes[1].set(xlabel="severity", ylabel="accuracy (%)", title="noise corruptions",
                xticks=SEVERITIES)  # fmt: skip
    if card.certified:
        _certified_panel(axes[2], [card])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(card.name)
    fig.tight_layout()
    fig.savefig(path)


def _gnr_panel(ax, cards: list[Card]) -> None:
    for card in cards:
        curve = card.gnr_curve
        ax.plot(curve["sigmas"], [100 * c for c in curve["consistency"]], marker=".",
                label=f"{card.name}: GNR {card.gnr:.2f}")  # fmt: skip
    ax.set(xlabel="test noise level sigma", ylabel="prediction unchanged (%)", title="GNR curve")


def _certified_panel(ax, cards: list[Card]) -> None:
    for card in cards:
        if card.certified:
            c = card.certified
            radii, accuracy = c["curve"]["radii"], c["curve"]["accuracy"]
            ax.step([*radii, radii[-1]], [*accuracy, 0.0], where="post",  # none beyond the last
                    label=f"{card.name}: sigma {c['sigma']:g}, ACR {c['acr']:.3f}")  # fmt: skip
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)", title="randomized smoothing")


def write_card(card: Card, folder: str | Path) -> list[Path]:
    """card.json (every number), card.md (one table) and card.png (the GNR curve; accuracy
    against severity; with a certification, certified accuracy against radius) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "card.json", folder / "card.md", folder / "card.png"]
    paths[0].write_text(json.dumps(dataclasses.asdict(card), indent=1) + "\n")
    table = markdown_table(["measure", "value", "images", "seed"], _rows(card))
    paths[1].write_text(f"# {card.name}\n\n{table}\n")
    _figure(card, paths[2])
    return paths


def read_card(path: str | Path) -> Card:
    """A Card from its card.json (or the folder holding it)."""
    path = Path(path)
    path = path / "card.json" if path.is_dir() else path
    return Card(**json.loads(path.read_text()))


def compare_cards(cards: list[Card], folder: str | Path) -> tuple[Path, Path]:
    """compare.md (one row per measure, one column per card) and compare.png (each card's GNR
    curve, its accuracy against severity averaged over its corruptions, and its certified
    accuracy against radius where it has one) in ``folder``: what a regularizer bought a model,
    side by side."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    measures = list(dict.fromkeys(row[0] for card in cards for row in _rows(card)))
    values = [{row[0]: row[1] for row in _rows(card)} for card in cards]
    rows = [[m, *(v.get(m, "") for v in values)] for m in measures]
    rows.append(["images (GNR)", *(f"{c.images} ({c.gnr_images})" for c in cards)])
    table = folder / "compare.md"
    table.write_text(markdown_table(["measure", *(c.name for c in cards)], rows) + "\n")
    certified = any(card.certified for card in cards)
    fig = Figure(figsize=(15 if certified else 10, 4), dpi=110)
    axes = fig.subplots(1, 3 if certified else 2)
    _gnr_panel(axes[0], cards)
    for card in cards:
        if card.corruptions:
            per_severity = [sum(a[i] for a in card.corruptions.values()) / len(card.corruptions)
                            for i in range(len(SEVERITIES))]  # fmt: skip
            axes[1].plot(SEVERITIES, per_severity, marker="o", label=card.name)
    axes[1].set(xlabel="severity", ylabel="accuracy (%), mean of the corruptions",
                title="noise corruptions", xticks=SEVERITIES)  # fmt: skip
    if certified:
        _certified_panel(axes[2], cards)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure = folder / "compare.png"
    fig.savefig(figure)
    return table, figure
