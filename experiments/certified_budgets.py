"""The same runs under two kinds of budget: each run of a study of counted compute
(docs/certified-passes.md) beside the run of the same method and sigma in the study of seconds
(docs/certified.md). Their budgets pair by rank (the smallest with the smallest, and so on); a
budget past the other study's largest pairs with none. What differs between the two runs is how
many steps the budget allowed, and the draw as far as the steps differ; the second seeds of the
study of seconds, drawn again at their first seed's steps, say how far the draw alone moves an
ACR."""

from __future__ import annotations

import statistics

from certified_results import row_order
from certified_seeds import at_steps, seed_spread, spread_line
from certified_verdict import acr_gap, apart, resolved

from momentreg.tables import markdown_table


def _ranks(rows: list[dict], other: list[dict]) -> dict[float, float]:
    """The ``other`` study's budgets -> this study's budget of the same rank, for the ranks both
    studies have."""
    mine, theirs = sorted({r["budget"] for r in rows}), sorted({r["budget"] for r in other})
    return dict(zip(theirs, mine, strict=False))


def budget_pairs(rows: list[dict], other: list[dict]) -> list[tuple[dict, dict]]:
    """(row, the ``other`` study's row of the same method, depth, copies and sigma at the budget
    of the same rank) for each row that has one."""
    rank = _ranks(rows, other)
    pairs = []
    for r in sorted(rows, key=row_order):
        match = [
            o
            for o in other
            if rank.get(o["budget"]) == r["budget"]
            and all(o[k] == r[k] for k in ("method", "depth", "copies", "sigma"))
        ]
        pairs += [(r, match[0])] if match else []
    return pairs


def budget_table(pairs: list[tuple[dict, dict]], unit: str, other_unit: str) -> str:
    """Each pair: the run's budget, steps and ACR in both studies, and the difference (this
    study's minus the other's) with two standard errors of it over the images."""
    body = [
        [
            a["label"],
            f"{a['sigma']:g}",
            f"{a['budget']:g}",
            f"{a['steps']}",
            f"{a['acr']:.3f} ± {a['se']:.3f}",
            f"{b['budget']:g}",
            f"{b['steps']}",
            f"{b['acr']:.3f} ± {b['se']:.3f}",
            f"{a['steps'] / b['steps']:.2f}",
            f"{a['acr'] - b['acr']:+.3f}",
            f"{acr_gap(a, b)[1]:.3f}",
        ]
        for a, b in pairs
    ]
    header = ["method", "sigma", f"budget ({unit})", "steps", "ACR", f"budget ({other_unit})",
              "steps", "ACR", "steps ratio", "difference", "2 SE (images)"]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrrrrrr")


def budget_line(pairs: list[tuple[dict, dict]], page: str) -> str:
    """What changing the kind of budget did: the runs' steps ratios, and how far their ACRs
    moved (root mean square, the largest move, and how many beyond two standard errors of the
    images) against the runs of page ``page``."""
    ratios = sorted(a["steps"] / b["steps"] for a, b in pairs)
    beyond = sum(apart(a, b) for a, b in pairs)
    most = max(pairs, key=lambda p: p[0]["steps"] / p[1]["steps"])
    moved = max(pairs, key=lambda p: abs(p[0]["acr"] - p[1]["acr"]))
    return (
        f"- **The same runs at equal seconds** ([{page}]({page}), budgets paired by rank): at "
        f"equal counted compute the {len(pairs)} runs took {ratios[0]:.2f}x to "
        f"{ratios[-1]:.2f}x the steps they took at equal seconds (median "
        f"{statistics.median(ratios):.2f}x; most, {most[0]['label']} at sigma "
        f"{most[0]['sigma']:g}, {most[0]['steps']} steps against {most[1]['steps']}), and their "
        f"ACR moved by a root mean square of {seed_spread(pairs):.3f} (most, {moved[0]['label']} "
        f"at sigma {moved[0]['sigma']:g}: {moved[0]['acr']:.3f} against {moved[1]['acr']:.3f}), "
        f"{beyond} of {len(pairs)} moves beyond two standard errors of the images (the section "
        "on the two studies below)."
    )


def draw_line(rows, goal, other, seeds, own: int, unit: str, page: str) -> str | None:
    """The training draw measured by the ``other`` study's second seeds at their first seed's
    steps (page ``page``; this page has ``own`` such seeds of its own), their budgets renamed to
    this study's of the same rank: how far it moves an ACR at each budget, and how many of this
    page's goal comparisons (``goal``: goal_pairs of ``rows``) that hold by more than two
    standard errors still do once it is counted."""
    rank = _ranks(rows, other)
    drawn = [p for p in at_steps(seeds) if p[0]["budget"] in rank]
    if not drawn:
        return None
    renamed = [({**a, "budget": rank[a["budget"]]}, b) for a, b in drawn]
    held = [(a, b) for _, a, b in goal if resolved(a, b)]
    runs = f"{len(drawn)} run{'s' * (len(drawn) != 1)}"
    mine = f"{runs} against this page's {own}" if own else "this page has none"
    what = (
        f"**A second seed at the first seed's steps, from [{page}]({page})** (budgets paired by "
        f"rank; {mine}):"
    )
    return spread_line(what, renamed, held, unit, where=f"the second seeds of {page}")
