"""The certified study's second seeds: how far another draw of the training (initialization,
batch order, noise) moves a run's ACR, at its first seed's steps (the draw alone) or at its
seconds (the draw and the clock, which sets the steps); and whether the goal's comparisons hold
when both of their runs are drawn again. The page's standard errors are over the test images
only (a gap's, over the per-image differences); every comparison on it sets one run of a method
against one run of another."""

from __future__ import annotations

import math
import statistics

from certified_results import row_order
from certified_verdict import acr_gap, resolved

from momentreg.tables import markdown_table


def seed_spread(pairs: list[tuple[dict, dict]]) -> float:
    """The root mean square of the ACR differences between two seeds of one run: an estimate of
    sqrt(2) x the standard deviation of a run's ACR over training draws (both seeds certify the
    same images, so the images' sampling mostly cancels)."""
    return math.sqrt(sum((a["acr"] - b["acr"]) ** 2 for a, b in pairs) / len(pairs))


def seed_table(pairs: list[tuple[dict, dict]], unit: str) -> str:
    """Each pair: the run, its two seeds' steps and ACRs (± the images' standard error), their
    difference and two standard errors of it over the images."""
    body = [
        [
            a["label"],
            f"{a['sigma']:g}",
            f"{a['budget']:g}",
            f"{b['seed']}",
            f"{a['steps']}",
            f"{b['steps']}",
            f"{a['acr']:.3f} ± {a['se']:.3f}",
            f"{b['acr']:.3f} ± {b['se']:.3f}",
            f"{b['acr'] - a['acr']:+.3f}",
            f"{acr_gap(a, b)[1]:.3f}",
        ]
        for a, b in sorted(pairs, key=lambda p: row_order(p[0]))
    ]
    header = ["method", "sigma", f"budget ({unit})", "other seed", "steps, seed 0",
              "steps, other seed", "ACR, seed 0", "ACR, other seed", "difference",
              "2 SE (images)"]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrrrrr")


def _fixed_steps(r: dict) -> bool:
    """Whether a run's budget fixed its steps (a step budget, or a pass budget) rather than left
    them to the clock."""
    return bool(r["step_budget"] or r.get("pass_budget"))


def at_steps(pairs: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """The pairs whose second seed stopped after its first seed's steps (a step budget of
    them, or the same pass budget): they differ only in the draw of the training."""
    return [p for p in pairs if _fixed_steps(p[1])]


def at_seconds(pairs: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """The pairs whose second seed had the same seconds, and so its own number of steps."""
    return [p for p in pairs if not _fixed_steps(p[1])]


def seed_lines(pairs, goal, unit: str) -> list[str]:
    """What the second seeds say of the page's comparisons, for each kind of second seed: their
    spread at each budget against the images' standard error, and how many of the goal's pairs
    still clear two standard errors once the training draw is counted; then the goal's pairs
    whose two runs both have a second seed at their steps, compared seed 1 with seed 1
    (``goal``: the page's goal_pairs)."""
    if not pairs:
        return []
    held = [(a, b) for _, a, b in goal if resolved(a, b)]
    lines = []
    steps, seconds = at_steps(pairs), at_seconds(pairs)
    second = {a["run"]: b for a, b in steps}  # a first seed's run -> its second seed at its steps
    if steps:
        what = "**A second seed at the first seed's steps** (the draw of the training alone):"
        lines.append(spread_line(what, steps, held, unit))
    if seconds:
        ratios = sorted(b["steps"] / a["steps"] for a, b in seconds)
        what = (
            "**A second seed at the same seconds** (the draw and the clock: in the same seconds "
            f"these runs took {ratios[0]:.2f}x to {ratios[-1]:.2f}x their first seed's steps, "
            f"median {statistics.median(ratios):.2f}x):"
        )
        lines.append(spread_line(what, seconds, held, unit) + _both_kinds(second, seconds))
    return lines + _retrained_lines([(a, b) for _, a, b in goal], second, unit)


def _both_kinds(second: dict, seconds) -> str:
    """The runs drawn again both ways: the spread at their first seed's steps (``second``)
    against the spread at the same seconds, which tells how much of the latter the clock made."""
    both = [(a, b) for a, b in seconds if a["run"] in second]
    if not both:
        return ""
    return (
        f" The {len(both)} runs drawn again both ways moved by a root mean square of "
        f"{seed_spread([(a, second[a['run']]) for a, _ in both]):.3f} at their first seed's "
        f"steps and {seed_spread(both):.3f} at the same seconds."
    )


def spread_line(what: str, pairs, held, unit: str, where="the section on second seeds below"):
    """One kind of second seed: how far it moved the ACRs at each budget, against a move's
    standard error over the images, and how many of the ``held`` goal pairs keep a gap over two
    standard errors once a training draw of that spread is counted in both runs (``where``: where
    the seeds are shown). A gap's variance is then its squared standard error over the images
    (acr_gap) plus half the squared spread at each run's budget (at a budget without second seeds,
    the spread over all of them)."""
    budgets = sorted({a["budget"] for a, _ in pairs})
    spread = {b: seed_spread([p for p in pairs if p[0]["budget"] == b]) for b in budgets}
    pooled = seed_spread(pairs)

    def train_var(r):
        return spread.get(r["budget"], pooled) ** 2 / 2

    gaps = [acr_gap(a, b) for a, b in pairs]
    apart = sum(abs(gap) > two_se for gap, two_se in gaps)
    se = statistics.median(two_se / 2 for _, two_se in gaps)
    still = [(a, b) for a, b in held if a["acr"] - b["acr"] > 2 * math.sqrt(
        train_var(a) + train_var(b) + (acr_gap(a, b)[1] / 2) ** 2)]  # fmt: skip
    at = []
    for b in budgets:
        moves = [abs(y["acr"] - x["acr"]) for x, y in pairs if x["budget"] == b]
        at.append(
            f"up to {max(moves):.3f} at {b:g} {unit} ({len(moves)} run"
            f"{'s' * (len(moves) > 1)}, root mean square {spread[b]:.3f})"
        )
    return (
        f"- {what} it moved the ACR by "
        + (", ".join(at[:-1]) + " and " if len(at) > 1 else "")
        + at[-1]
        + f"; a move's standard error over the images (that of its per-image differences) is "
        f"{se:.3f} at the median, and {apart} of {len(pairs)} moves exceed two of theirs. "
        "Counting a training draw "
        "of that spread in every run (its budget's, or all of them where its budget has none), "
        f"{len(still)} of the {len(held)} goal comparisons that hold by more than two standard "
        f"errors still do ({where})."
    )


def _retrained_lines(goal, second: dict, unit: str) -> list[str]:
    """Each goal pair (analytic run, sampled run) whose two runs both have a second seed at their
    steps (``second``): the gap between the first seeds and between the second seeds (does the
    goal hold with either draw?), and the two seeds' mean gap."""

    def gap(a, b):
        diff, two_se = acr_gap(a, b)
        word = "holds" if diff >= 0 else "fails"
        return f"{a['acr']:.3f} against {b['acr']:.3f}, {word} (gap {diff:+.3f}, 2 SE {two_se:.3f})"

    both = [(a, b) for a, b in goal if a["run"] in second and b["run"] in second]
    if not both:
        return []
    first_holds = sum(a["acr"] >= b["acr"] for a, b in both)
    second_holds = sum(second[a["run"]]["acr"] >= second[b["run"]]["acr"] for a, b in both)
    lines = [
        f"- **The goal with both runs drawn again:** of the {len(both)} goal comparisons whose two "
        f"runs both have a second seed at their steps, {first_holds} hold with seed 0 and "
        f"{second_holds} with seed 1:"
    ]
    for a, b in both:
        a2, b2 = second[a["run"]], second[b["run"]]
        mean_gap = (a["acr"] + a2["acr"] - b["acr"] - b2["acr"]) / 2
        lines.append(
            f"  - sigma {a['sigma']:g}: {a['label']} at {a['budget']:g} {unit} against "
            f"{b['label']} at {b['budget']:g} {unit}: seed 0 {gap(a, b)}; seed 1 at the same "
            f"steps {gap(a2, b2)}; the two seeds' mean gap is {mean_gap:+.3f}."
        )
    return lines
