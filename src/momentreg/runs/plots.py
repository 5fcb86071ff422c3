"""Figures, drawn on matplotlib Figure objects: no pyplot, no backend switch, no display needed."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_consistency(curves: dict[str, dict], path: Path, title: str = "") -> None:
    """curves: label -> {"sigmas": [...], "consistency": [...]} (as in metrics.json's gnr_curve)."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(curve["sigmas"], [100 * c for c in curve["consistency"]], marker=".", label=label)
    ax.set_xlabel("test noise level sigma (noise norm = sigma * sqrt(d), pixels in [0, 1])")
    ax.set_ylabel("prediction unchanged (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_certified(curves: dict[str, dict[str, float]], path: Path, title: str = "") -> None:
    """curves: label -> {radius: certified accuracy in %} (as in certify.json)."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for label, by_radius in curves.items():
        radii = sorted(by_radius, key=float)
        ax.plot([float(r) for r in radii], [by_radius[r] for r in radii], marker="o", label=label)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_tightness(table: dict[str, list[dict]], path: Path) -> None:
    """Median relative error of the analytic and linearized expected logits against sigma."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for i, (run, rows) in enumerate(table.items()):
        sigmas = [r["sigma"] for r in rows]
        for name, style in (("analytic", "-"), ("linearized", "--"), ("all_layers", "-.")):
            if f"{name}_error_median" not in rows[0]:
                continue
            errors = [r[f"{name}_error_median"] for r in rows]
            ax.plot(sigmas, errors, style, marker="o", color=f"C{i}", label=f"{run}: {name}")
        floor = [r["mc_relative_se"] for r in rows]
        ax.plot(sigmas, floor, ":", color=f"C{i}", label=f"{run}: Monte Carlo noise floor")
    ax.set_xlabel("input noise sigma (pixels in [0, 1])")
    ax.set_ylabel("relative error of expected logits (median)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
