"""The certified study's second seeds: how far another draw of the training (initialization,
batch order, noise) moves a run's ACR. The page's standard errors are over the test images only;
every comparison on it sets one run of a method against one run of another."""

from __future__ import annotations

import math
import statistics

from certified_results import row_order
from certified_verdict import goal_pairs

from momentreg.tables import markdown_table


def seed_spread(pairs: list[tuple[dict, dict]]) -> float:
    """The root mean square of the ACR differences between two seeds of one run: an estimate of
    sqrt(2) x the standard deviation of a run's ACR over training draws (both seeds certify the
    same images, so the images' sampling mostly cancels)."""
    return math.sqrt(sum((a["acr"] - b["acr"]) ** 2 for a, b in pairs) / len(pairs))


def seed_table(pairs: list[tuple[dict, dict]], unit: str) -> str:
    """Each pair: the run, its two seeds' ACRs (± the images' standard error), their difference
    and two standard errors of it over the images."""
    body = [
        [
            a["label"],
            f"{a['sigma']:g}",
            f"{a['budget']:g}",
            f"{b['seed']}",
            f"{a['acr']:.3f} ± {a['se']:.3f}",
            f"{b['acr']:.3f} ± {b['se']:.3f}",
            f"{b['acr'] - a['acr']:+.3f}",
            f"{2 * math.hypot(a['se'], b['se']):.3f}",
        ]
        for a, b in sorted(pairs, key=lambda p: row_order(p[0]))
    ]
    header = ["method", "sigma", f"budget ({unit})", "other seed", "ACR, seed 0",
              "ACR, other seed", "difference", "2 SE (images)"]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrrr")


def seed_lines(pairs, rows, unit: str, macer_factor: int) -> list[str]:
    """What the second seeds say of the page's comparisons: their spread at each budget against
    the images' standard error, and how many of the goal's pairs still clear two standard errors
    once the training draw is counted. A gap's variance is then both runs' squared image
    standard errors plus half the squared spread at each run's budget (at a budget without second
    seeds, the spread over all of them)."""
    if not pairs:
        return []
    budgets = sorted({a["budget"] for a, _ in pairs})
    spread = {b: seed_spread([p for p in pairs if p[0]["budget"] == b]) for b in budgets}
    pooled = seed_spread(pairs)

    def train_var(r):
        return spread.get(r["budget"], pooled) ** 2 / 2

    apart = sum(abs(b["acr"] - a["acr"]) > 2 * math.hypot(a["se"], b["se"]) for a, b in pairs)
    se = statistics.median(r["se"] for pair in pairs for r in pair)
    goal = goal_pairs(rows, unit, macer_factor)
    held = [(a, b) for _, a, b in goal if a["acr"] - b["acr"] > 2 * math.hypot(a["se"], b["se"])]
    still = [(a, b) for a, b in held if a["acr"] - b["acr"] > 2 * math.sqrt(
        train_var(a) + train_var(b) + a["se"] ** 2 + b["se"] ** 2)]  # fmt: skip
    at = []
    for b in budgets:
        moves = [abs(y["acr"] - x["acr"]) for x, y in pairs if x["budget"] == b]
        at.append(
            f"up to {max(moves):.3f} at {b:g} {unit} ({len(moves)} run"
            f"{'s' * (len(moves) > 1)}, root mean square "
            f"{spread[b]:.3f})"
        )
    return [
        "- **A second seed:** runs trained again with another seed moved their ACR by "
        + " and ".join(at)
        + f"; the median standard error over the images is {se:.3f}, and {apart} of "
        f"{len(pairs)} moves exceed two standard errors of the images. Counting a training draw "
        "of that spread in every run (its budget's, or all seeds' where its budget has none), "
        f"{len(still)} of the {len(held)} goal comparisons that hold by more than two standard "
        "errors still do (the section on second seeds below).",
    ]
