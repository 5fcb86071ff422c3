"""A robustness card for any classifier on images in [0, 1]: clean accuracy, GNR and its curve,
and accuracy under CIFAR-10-C's noise corruptions, each number with its image count and seed.

    card = evaluate(model, images, labels, name="my model")   # a Card
    write_card(card, Path("cards/mine"))                        # card.json, card.md, card.png
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from momentreg.corruptions import CORRUPTIONS, SEVERITIES, corruption_accuracy
from momentreg.data import to_float
from momentreg.errors import ConfigError
from momentreg.robustness import gaussian_robustness, prediction_stats
from momentreg.tables import markdown_table

__all__ = ["Card", "evaluate", "write_card", "read_card", "compare_cards"]


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
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = False,
) -> Card:
    """Measure ``model`` on test images (uint8 or float in [0, 1], [N, C, H, W]) and labels [N].

    GNR runs on the first ``gnr_images`` (all by default), the corruptions on every image (or on
    the published files in ``cifar_c``). The model is left in the mode it came in.

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
    )


def _rows(card: Card) -> list[list[str]]:
    source = "generated" if card.corruption_source == "generated" else "published files"
    rows = [
        ["clean accuracy (%)", f"{card.clean_accuracy:.2f}", str(card.images), str(card.seed)],
        ["GNR", f"{card.gnr:.2f}", str(card.gnr_images), str(card.seed)],
    ]
    for name, mean in card.corruption_means().items():
        rows.append([f"{name}, mean of severities 1-5 (%)", f"{mean:.2f}", source, ""])
    overall = card.mean_corruption_accuracy()
    if overall is not None:
        rows.append(["all corruptions, mean (%)", f"{overall:.2f}", source, ""])
    return rows


def _figure(card: Card, path: Path) -> None:
    fig = Figure(figsize=(10, 4), dpi=110)
    left, right = fig.subplots(1, 2)
    curve = card.gnr_curve
    left.plot(curve["sigmas"], [100 * c for c in curve["consistency"]], marker=".")
    left.set(xlabel="test noise level sigma", ylabel="prediction unchanged (%)",
             title=f"GNR {card.gnr:.2f}")  # fmt: skip
    for name, accs in card.corruptions.items():
        right.plot(SEVERITIES, accs, marker="o", label=name)
    right.axhline(card.clean_accuracy, color="k", ls="--", label="clean")
    right.set(xlabel="severity", ylabel="accuracy (%)", title="noise corruptions")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(card.name)
    fig.tight_layout()
    fig.savefig(path)


def write_card(card: Card, folder: str | Path) -> list[Path]:
    """card.json (every number), card.md (one table) and card.png (the GNR curve; accuracy
    against severity) in ``folder``."""
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
    """compare.md (one row per measure, one column per card) and compare.png (each card's
    accuracy against severity, averaged over its corruptions, and its GNR curve) in
    ``folder``: what a regularizer bought a model, side by side."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    measures = [row[0] for row in _rows(cards[0])]
    values = [{row[0]: row[1] for row in _rows(card)} for card in cards]
    rows = [[m, *(v.get(m, "") for v in values)] for m in measures]
    rows.append(["images (GNR)", *(f"{c.images} ({c.gnr_images})" for c in cards)])
    table = folder / "compare.md"
    table.write_text(markdown_table(["measure", *(c.name for c in cards)], rows) + "\n")
    fig = Figure(figsize=(10, 4), dpi=110)
    left, right = fig.subplots(1, 2)
    for card in cards:
        curve = card.gnr_curve
        left.plot(curve["sigmas"], [100 * c for c in curve["consistency"]], label=card.name)
        if card.corruptions:
            per_severity = [sum(a[i] for a in card.corruptions.values()) / len(card.corruptions)
                            for i in range(len(SEVERITIES))]  # fmt: skip
            right.plot(SEVERITIES, per_severity, marker="o", label=card.name)
    left.set(xlabel="test noise level sigma", ylabel="prediction unchanged (%)", title="GNR curve")
    right.set(xlabel="severity", ylabel="accuracy (%), mean of the corruptions",
              title="noise corruptions")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure = folder / "compare.png"
    fig.savefig(figure)
    return table, figure
