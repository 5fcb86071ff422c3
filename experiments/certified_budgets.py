"""The same runs under two kinds of budget: each run of a study of counted compute
(docs/certified-passes.md) beside the run of the same method and sigma in the study of seconds
(docs/certified.md). Their budgets pair by rank (the smallest with the smallest, and so on), so the
two studies must have as many budgets. What differs between the two runs is how many steps the
budget allowed, and the draw as far as the steps differ; the second seeds of the study of seconds,
drawn again at their first seed's steps, say how far the draw alone moves an ACR."""

from __future__ import annotations

import statistics

from certified_results import row_order
from certified_seeds import at_steps, seed_spread
from certified_verdict import acr_gap

from momentreg.tables import markdown_table


def budget_pairs(rows: list[dict], other: list[dict]) -> list[tuple[dict, dict]]:
    """(row, the ``other`` study's row of the same method, depth, copies and sigma at the budget
    of the same rank) for each row that has one; none where the studies' budgets differ in
    number."""
    mine, theirs = sorted({r["budget"] for r in rows}), sorted({r["budget"] for r in other})
    if len(mine) != len(theirs):
        return []
    rank = dict(zip(theirs, mine, strict=True))
    pairs = []
    for r in sorted(rows, key=row_order):
        match = [
            o
            for o in other
            if rank[o["budget"]] == r["budget"]
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


def budget_line(pairs: list[tuple[dict, dict]], seeds: list[tuple[dict, dict]], other: str) -> str:
    """What changing the kind of budget did: the runs' steps ratios, how far their ACRs moved
    (root mean square, and how many beyond two standard errors of the images), against how far
    the ``seeds`` of the other study (page ``other``) moved at their first seed's steps."""
    ratios = sorted(a["steps"] / b["steps"] for a, b in pairs)
    apart = sum(abs(gap) > two_se for gap, two_se in (acr_gap(a, b) for a, b in pairs))
    most = max(pairs, key=lambda p: p[0]["steps"] / p[1]["steps"])
    drawn = at_steps(seeds)
    return (
        f"- **The same runs at equal seconds** ([{other}]({other}), budgets paired by rank): "
        f"at equal counted compute the {len(pairs)} runs took {ratios[0]:.2f}x to "
        f"{ratios[-1]:.2f}x the steps they took at equal seconds (median "
        f"{statistics.median(ratios):.2f}x; most, {most[0]['label']} at sigma "
        f"{most[0]['sigma']:g}, {most[0]['steps']} steps against {most[1]['steps']}), and their "
        f"ACR moved by a root mean square of {seed_spread(pairs):.3f}, {apart} of {len(pairs)} "
        "moves beyond two standard errors of the images"
        + (
            f"; a second seed at its first seed's steps moved {len(drawn)} "
            f"run{'s' * (len(drawn) != 1)} there by "
            f"{seed_spread(drawn):.3f}"
            if drawn
            else ""
        )
        + " (the section on the two studies below)."
    )
