"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_consistency(curves: dict[str, dict], path: Path, title: str = "") -> None:
    """curves: label -> {"sigmas": [...], "consistency": [...]} (as in metrics.json's gnr_curve)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, curve in curves.items():
        ax.plot(curve["sigmas"], [100 * c for c in curve["consistency"]], marker=".", label=label)
    ax.set_xlabel("test noise level sigma (noise norm = sigma * sqrt(d), pixels in [0, 1])")
    ax.set_ylabel("prediction unchanged (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
