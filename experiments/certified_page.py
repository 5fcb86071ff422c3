"""docs/certified.md and docs/certified-gpu.md with their figures, written from the exported
results alone (certified_results) with the verdict of certified_verdict."""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import NormalDist

from certified_budgets import budget_line, budget_pairs, budget_table, draw_line
from certified_results import (
    left_out_runs,
    load_rows,
    missing_runs,
    row_order,
    uncertified_runs,
    untested,
)
from certified_seeds import at_seconds, at_steps, seed_lines, seed_table
from certified_setting import setting
from certified_study import (
    ANCHOR_TOLERANCE,
    ANCHORS,
    CLEAN_EPOCHS,
    DIVERGED,
    RADII,
    SAMPLED,
    STUDIES,
    TASK,
    TIGHTNESS_IMAGES,
    TIGHTNESS_SAMPLES,
    Study,
    authors_copies,
    unit_name,
)
from certified_verdict import anchor_check, goal_pairs, verdict
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from study import fmt, provenance

from momentreg.core.smoothing_losses import MACER_BETA, MACER_GAMMA
from momentreg.runs.rundir import CERTIFY_FILE, TIGHTNESS_FILE, read_json
from momentreg.runs.sweep import load_spec
from momentreg.tables import markdown_table


def results_table(rows: list[dict], unit: str) -> str:
    """One sigma's runs."""
    header = ["method", f"budget ({unit})", "steps", "epoch kept", "passes per image",
              "step seconds (x noise)", "compute (M image-passes)", "ACR",
              *[f"cert. acc. r={r:g}" for r in RADII], "clean acc.", "GNR"]  # fmt: skip
    body = [
        [
            r["label"],
            f"{r['budget']:g}",
            str(r["steps"]),
            f"{r['kept_epoch']} of {r['epochs']}",
            f"{r['passes']:.2f}",
            f"{r['step_cost']:.2f}" if r["step_cost"] else "-",
            f"{r['compute'] / 1e6:.3f}",
            f"{r['acr']:.3f} ± {r['se']:.3f}",
            *[f"{r['at'][x]:.0f}" for x in RADII],
            fmt(r["accuracy"]),
            fmt(r["gnr"]),
        ]
        for r in sorted(rows, key=row_order)
    ]
    return markdown_table(header, body, align="lrrrrrrr" + "r" * len(RADII) + "rr")


def anchor_table(rows, sigmas, left_out: dict[float, set], unit: str, not_certified) -> str:
    """The published ACRs beside each method's run at its largest budget, per sigma."""

    def cell(name: str, sigma: float) -> str:
        runs = [
            r for r in rows if r["method"] == name and r["sigma"] == sigma and authors_copies(r)
        ]
        if runs:
            r = max(runs, key=lambda r: r["budget"])
            return f"{r['acr']:.3f} ({r['budget']:g} {unit})"
        if name in not_certified.get(sigma, set()):
            return "trained, not certified"
        return "left out (one class)" if name in left_out.get(sigma, set()) else "not run"

    header = ["method"] + [
        f"{col}, sigma {s:g}" for s in sigmas for col in ("published", "ours (budget)")
    ]
    body = [
        [name] + [x for s in sigmas for x in (f"{acr[s]:.3f}", cell(name, s))]
        for name, acr in ANCHORS.items()
    ]
    return markdown_table(header, body, align="l" + "rr" * len(sigmas))


def plot(rows: list[dict], sigma: float, path: Path, unit: str) -> None:
    """ACR against the two costs, one line per method: training-step seconds on this machine (the
    budget of a study of seconds; else as measured), and FLOP-counted clean image-passes (which
    leave out elementwise work)."""
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 2, sharey=True)
    names = sorted({r["label"] for r in rows}, key=lambda n: (n.split()[0] not in SAMPLED, n))
    seconds = {
        "s": ("budget", "training-step seconds (2 CPU cores, one run per core)"),
        CLEAN_EPOCHS: ("seconds", "training-step seconds as measured (2 CPU cores, shared)"),
    }.get(unit, ("seconds", "training-step seconds as measured (the runs shared one GPU)"))
    for ax, key, xlabel in (
        (axes[0], *seconds),
        (axes[1], "compute", "training compute (millions of clean image-passes, FLOP-counted)"),
    ):
        scale = 1e6 if key == "compute" else 1
        for name in names:
            pts = sorted((r[key] / scale, r["acr"]) for r in rows if r["label"] == name)
            style = "-o" if name.split()[0] in SAMPLED else "--s"
            ax.plot(*zip(*pts, strict=True), style, label=name)
        ax.set_xscale("log")
        if unit == "s":
            ax.minorticks_off()
            ticks = sorted({r["budget"] for r in rows}) if key == "budget" else [0.03, 0.1, 0.3, 1]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        elif unit == CLEAN_EPOCHS:  # the budgets' compute, and seconds by half-decades
            ax.minorticks_off()
            ticks = (
                sorted({round(r["compute"] / scale, 2) for r in rows})
                if key == "compute"
                else [30, 100, 300, 1000]
            )
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(f"ACR, sigma {sigma:g}")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # off the points
    fig.suptitle(f"MNIST, sigma {sigma:g}: certified radius against training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tightness_table(folder: Path, rows: list[dict], sigma: float, unit: str, least: float) -> str:
    """The analytic expected logits against Monte Carlo on each model of at least ``least``
    budget."""
    header = ["method", f"budget ({unit})", "first layer: median error", "argmax agrees",
              "all layers: median error", "argmax agrees", "Monte Carlo floor"]  # fmt: skip
    body = []
    for r, t in _tightness(folder, rows, sigma, least):
        body.append(
            [r["label"], f"{r['budget']:g}"]
            + [f"{100 * t['analytic_error_median']:.1f}%", f"{t['analytic_argmax_agreement']:.0f}%"]
            + [f"{100 * t['all_layers_error_median']:.1f}%"]
            + [f"{t['all_layers_argmax_agreement']:.0f}%", f"{100 * t['mc_relative_se']:.2f}%"]
        )
    return markdown_table(header, body, align="lrrrrrr")


def soft_table(folder: Path, rows: list[dict], sigma: float, unit: str, least: float) -> str:
    """MACER's soft smoothed classifier E[softmax(16 f(x + n))] against its analytic stand-ins on
    each model measured with it (tightness.json from before it has none): total variation, and
    on how many images the hinge can act; "" if no model was."""
    header = ["method", f"budget ({unit})", "first layer: TV", "all layers: TV",
              "Monte Carlo floor", "hinge acts: Monte Carlo", "first layer",
              "all layers"]  # fmt: skip
    b = f"beta{MACER_BETA:g}"
    tv = (f"analytic_tv_{b}_median", f"all_layers_tv_{b}_median", f"mc_tv_floor_{b}")
    share = ("mc_hinge_share", "analytic_hinge_share", "all_layers_hinge_share")
    body = [
        [r["label"], f"{r['budget']:g}", *(f"{t[k]:.3f}" for k in tv)]
        + [f"{t[k]:.0f}%" for k in share]
        for r, t in _tightness(folder, rows, sigma, least)
        if "mc_hinge_share" in t
    ]
    return markdown_table(header, body, align="l" + "r" * 7) if body else ""


def hinge_lines(folder: Path, rows: list[dict], unit: str, least: float) -> list[str]:
    """Per sigma, on each macer-analytic model measured with it: on how many test images MACER's
    hinge can act under the analytic soft classifier that variant trains with (its depth's),
    against the Monte Carlo one of the same model."""
    lines = []
    for sigma in sorted({r["sigma"] for r in rows}):
        found = []
        for r, t in _tightness(folder, rows, sigma, least):
            if r["method"] == "macer-analytic" and "mc_hinge_share" in t:
                stand_in = "all_layers" if r["depth"] == "all" else "analytic"
                share, mc = t[f"{stand_in}_hinge_share"], t["mc_hinge_share"]
                found.append(
                    f"{r['label']} at {r['budget']:g} {unit}, {share:.0f}% against {mc:.0f}%"
                )
        if found:
            lines.append(
                f"- **sigma {sigma:g}, MACER's hinge under the analytic expectation:** the share "
                f"of the first {TIGHTNESS_IMAGES} test images on which it can act under the soft "
                "classifier each macer-analytic model trains with, against Monte Carlo's on the "
                "same model (the tables at the end): " + "; ".join(found) + "."
            )
    return lines


def _tightness(folder: Path, rows: list[dict], sigma: float, least: float):
    """(row, its tightness.json row) of each run at ``sigma`` of at least ``least`` budget."""
    for r in sorted(rows, key=row_order):
        path = folder / r["run"] / TIGHTNESS_FILE
        if r["sigma"] == sigma and r["budget"] >= least and path.exists():
            yield r, read_json(path)["rows"][0]


def understated(rows: list[dict], unit: str, factor: float = 1.5) -> list[str]:
    """Runs whose step seconds (against noise training's) exceed their FLOP-counted passes by more
    than ``factor``: the elementwise work the counter leaves out."""
    return [
        f"{r['label']} at sigma {r['sigma']:g}, {r['budget']:g} {unit} ({r['step_cost']:.2f}x "
        f"noise training's step seconds for {r['passes']:.2f} passes)"
        for r in sorted(rows, key=row_order)
        if r["step_cost"] and r["step_cost"] > factor * r["passes"]
    ]


def _losses(losses: list[float]) -> str:
    """Validation losses by epoch; of a long run, its best and its last."""
    if len(losses) <= 10:
        return "validation loss by epoch " + ", ".join(f"{v:.3g}" for v in losses)
    best = min(range(len(losses)), key=losses.__getitem__)
    return f"best validation loss {losses[best]:.3g} (epoch {best + 1}), last {losses[-1]:.3g}"


def diverged_lines(rows: list[dict], unit: str) -> list[str]:
    return [
        f"- {r['label']} at sigma {r['sigma']:g}, {r['budget']:g} {unit}: "
        + _losses(r["val_losses"])
        + f"; it keeps epoch {r['kept_epoch']} of {r['epochs']}."
        for r in sorted(rows, key=row_order)
        if r["val_losses"][-1] > DIVERGED * min(r["val_losses"])
    ]


def kept_weights(
    rows: list[dict], waiting: list[dict], unit: str, spec_keep: str = "best"
) -> list[str]:
    """Which epoch's weights each run (certified ``rows``, then the uncertified ``waiting``) ends
    with, against the anchors' last epoch, and the runs whose weights never trained with their
    regularizer (kept from before ``alpha_delay`` ended, or trained no longer than it); what the
    study's spec, which keeps ``spec_keep`` weights, does about them."""
    runs = sorted(rows, key=row_order) + waiting
    keeps = sorted({r["keep"] for r in runs})
    before = [r for r in runs if r["kept_epoch"] < r["epochs"]]
    early = [r for r in runs if r["kept_epoch"] <= r["delay"]]
    lines = [
        f"Every run here keeps its `{'` or `'.join(keeps)}` weights (config.json's `keep`: "
        "`best` is the epoch of lowest clean validation loss, `last` the last epoch, which the "
        f"anchors' code certifies). {len(before)} of {len(runs)} runs keep an earlier epoch than "
        "their last"
        + (
            ": "
            + "; ".join(
                f"{r['label']} at sigma {r['sigma']:g}, epoch {r['kept_epoch']} of {r['epochs']}"
                for r in before
            )
            if before
            else ""
        )
        + "."
    ]
    if early:
        chosen = any(r["kept_epoch"] < r["epochs"] for r in early)
        again = ",".join(dict.fromkeys(r["method"] for r in early))
        advice = (
            f'the spec keeps the last epoch now (`keep = "last"`), and `--methods {again}` '
            "trains these runs again with it."
            if spec_keep == "last"
            else "the next run of this study should keep the last epoch (`--set keep=last`)."
        )
        lines += [
            "",
            "These keep an epoch from before their regularizer was switched on (after "
            f"`alpha_delay` {unit}), so their weights never trained with it: "
            + "; ".join(
                f"{r['label']} at sigma {r['sigma']:g} (epoch {r['kept_epoch']} of "
                f"{r['epochs']}; regularizer from epoch {r['delay'] + 1})"
                for r in early
            )
            + "."
            + (
                " A clean validation loss cannot choose the weights of a method that trades "
                f"clean loss for radius: {advice}"
                if chosen
                else ""
            ),
        ]
    return lines


def _short(unit: str) -> str:
    """What a short CPU study's budgets are: seconds, or a few epochs' compute."""
    return "seconds" if unit == "s" else "a few epochs' compute"


def write_doc(study: Study, results: Path, doc: Path) -> None:
    unit = study.unit
    rows, seeds = load_rows(results / TASK, unit)
    if not rows:
        sys.exit(f"no certified run under {results / TASK}: nothing to write")
    sigmas = sorted({r["sigma"] for r in rows})
    compared = [s for s in sigmas if len({r["method"] for r in rows if r["sigma"] == s}) > 1]
    figures = doc.parent / study.name
    figures.mkdir(parents=True, exist_ok=True)
    for sigma in compared:
        at = [r for r in rows if r["sigma"] == sigma]
        plot(at, sigma, figures / f"acr-sigma{sigma:g}.png", unit)
    left_out, left_methods = left_out_runs(results / TASK, unit)
    waiting = uncertified_runs(results / TASK)
    images = rows[0]["images"]
    n = read_json(results / TASK / rows[0]["run"] / CERTIFY_FILE)[f"{rows[0]['sigma']:g}"]["n"]
    key = next(k for k, v in STUDIES.items() if v is study)
    options = "" if key == "cpu" else f"--study {key} "
    title = "Certified robustness per unit of compute"
    md = provenance(results, title + (", counted" if unit == CLEAN_EPOCHS else ""), options)
    md += ["## Setting", "", *setting(study, results, rows, sigmas, images, n), ""]
    goal = goal_pairs(rows, unit, study.macer_factor)
    other = STUDIES[study.against] if study.against else None
    other_rows, other_seeds = (
        load_rows(results.parent / other.name / TASK, other.unit) if other else ([], [])
    )
    paired = budget_pairs(rows, other_rows)
    md += [
        "## What we conclude",
        "",
        *verdict(rows, goal, sigmas, left_methods, unit, study.macer_factor, untested(waiting)),
        *hinge_lines(results / TASK, rows, unit, study.tightness_from),
        *seed_lines(seeds, goal, unit),
    ]
    if paired:
        page = f"{other.name}.md"
        draw = draw_line(rows, goal, other_rows, other_seeds, len(at_steps(seeds)), unit, page)
        md += [budget_line(paired, page), *([draw] if draw else [])]
    if study.anchor_check:
        md += [
            "",
            f"**Our noise training against the published Cohen ACR** (within {ANCHOR_TOLERANCE:g} "
            "is the study's test that the comparison is fair; the anchors certify all 10,000 "
            f"images, ours {images}, so our standard error bounds how finely this can tell):",
            "",
            *anchor_check(rows, sigmas),
        ]
    else:
        md += [
            "",
            f"With {images} images and budgets of {_short(unit)} this is a scaled-down study: "
            "read the "
            "gaps with their standard errors. The study at the anchors' recipe (sigma 0.25, 0.5 "
            "and 1.0; 90 epochs; 500 images at n = 100,000; our noise training checked against "
            "the anchors) is [certified-gpu.md](certified-gpu.md)."
            + "".join(
                f" The same study with budgets of {s.unit} of counted compute instead of "
                f"{unit_name(unit)} is "
                f"[{s.name}.md]({s.name}.md)."
                for s in STUDIES.values()
                if s.against == key
            ),
        ]
    md += ["", "## Results", ""]
    for sigma in sigmas:
        at = [r for r in rows if r["sigma"] == sigma]
        md += [f"### Sigma {sigma:g}", "", results_table(at, unit), ""]
        if sigma in compared:
            md += [
                f"![ACR against training compute, sigma {sigma:g}]"
                f"({study.name}/acr-sigma{sigma:g}.png)",
                "",
            ]
    slow = understated(rows, unit)
    if slow:
        md += [
            "The FLOP count prices convolutions and matrix products only; elementwise work, such "
            "as the Gaussian moments of every ReLU and pooling layer, is left out. These runs' "
            "step seconds exceed their passes by more than 1.5x: " + "; ".join(slow) + ".",
            "",
        ]
    if seeds:
        md += [
            "## A second seed",
            "",
            "Runs trained again with another seed (initialization, batch order, noise), "
            "certified on the same images. The standard errors everywhere else on this page are "
            "over the test images only, and each comparison sets one run against one run.",
            "",
        ]
        kinds = [
            (at_steps(seeds), "At the first seed's steps: the second seed stopped after exactly "
             "the steps its seed-0 run took (`step_budget`), its schedule (learning-rate steps, "
             "MACER's deferral) at shares of its steps where the first seed's was at shares of "
             "its seconds. The two differ in the draw, and only as far as the first seed's step "
             "times varied in where the schedule turned."
             if unit == "s" else
             "At the first seed's steps: the second seed had the same budget, and so the same "
             "steps and schedule; the two differ in the draw alone."),
            (at_seconds(seeds), "At the same seconds: the second seed had the same budget of "
             "seconds and took its own number of steps, which the machine's speed and load set "
             "when it was trained; the draw and the clock both moved these."),
        ]  # fmt: skip
        for pairs, text in kinds:
            md += [text, "", seed_table(pairs, unit), ""] if pairs else []
    if paired:
        md += [
            "## The two studies",
            "",
            f"Each run beside the run of the same method and sigma in [{other.name}.md]"
            f"({other.name}.md), which had a budget of {unit_name(other.unit)} (budgets paired by "
            "rank). "
            "The steps ratio is this page's steps over that page's.",
            "",
            budget_table(paired, unit, other.unit),
            "",
        ]
    md += [
        "## The published anchors beside ours",
        "",
        anchor_table(rows, sigmas, left_methods, unit, untested(waiting)),
        "",
    ]
    if study.anchor_check:
        spec_keep = load_spec(str(study.spec)).get("keep", "best")
        md += ["## Which weights were certified", "", *kept_weights(rows, waiting, unit, spec_keep)]
        md += [""]
    else:
        md += [
            f"Ours are far below the anchors: {_short(unit)} of CPU training against 90 epochs, on "
            f"{images} images at n = {n:,} (a smaller n caps the radius lower). They compare "
            "methods with each other, not with the published numbers.",
            "",
        ]
    least = f"Runs of {study.tightness_from:g} {unit} and more:" if study.tightness_from else ""
    md += [
        "## How close the analytic expectation is on these models",
        "",
        f"`momentreg tightness` on the first {TIGHTNESS_IMAGES} test images, at each run's "
        "sigma: the expected logits E[f(x + n)] of the first-layer split (what `moment` and the "
        "analytic variants' first-layer form train with) and of moments through every layer, "
        f"against a Monte Carlo mean of {TIGHTNESS_SAMPLES:,} draws per image. Median relative L2 "
        "error, the share of images whose argmax matches the Monte Carlo one, and the Monte Carlo "
        "standard error on the same scale (docs/tightness.md explains the measure)."
        + (f" {least}" if least else ""),
        "",
    ]
    for sigma in sigmas:
        table = tightness_table(results / TASK, rows, sigma, unit, study.tightness_from)
        md += [f"Sigma {sigma:g}:", "", table, ""]
        soft = soft_table(results / TASK, rows, sigma, unit, study.tightness_from)
        if soft:
            md += [
                f"MACER's soft smoothed classifier at sigma {sigma:g}, E[softmax({MACER_BETA:g} "
                "f(x + n))] by Monte Carlo from the same draws, against its analytic stand-ins: "
                f"softmax({MACER_BETA:g} tail(T)) from the first layer, the pairwise probit from "
                "all layers. The median total variation, its floor (half the summed Monte Carlo "
                "standard errors), and the share of images on which MACER's hinge can act, their "
                f"gap Phi^-1(g1) - Phi^-1(g2) finite and at most {MACER_GAMMA:g} (none with g1 "
                f"above {NormalDist().cdf(MACER_GAMMA / 2):.5f}):",
                "",
                soft,
                "",
            ]
    unmeasured = [
        f"{r['label']} at sigma {r['sigma']:g}"
        for r in sorted(rows, key=row_order)
        if r["budget"] >= study.tightness_from
        and not (results / TASK / r["run"] / TIGHTNESS_FILE).exists()
    ]
    if unmeasured:
        md += ["Not measured before the deadline: " + "; ".join(unmeasured) + ".", ""]
    diverged = diverged_lines(rows, unit)
    md += ["## Runs whose training diverged", ""]
    if diverged:
        md += [
            f"Their last validation loss is over {DIVERGED:g}x their best (history.csv); each "
            "keeps its best-validation epoch, which is what the tables certify:",
            "",
            *diverged,
            "",
        ]
    else:
        md += [
            f"None: no run's last validation loss is over {DIVERGED:g}x its best (history.csv).",
            "",
        ]
    if left_out:
        noise = sorted((r for r in rows if r["method"] == "noise"), key=row_order)
        md += [
            "## Runs left out",
            "",
            "These runs predict one class for every test image (metrics.json flags them), so they "
            "are in no table, figure or verdict above: " + "; ".join(left_out) + ". For "
            "comparison, noise training took "
            + ", ".join(
                f"{r['steps']} steps in {r['budget']:g} {unit} at sigma {r['sigma']:g}"
                for r in noise
            )
            + ".",
            "",
        ]
    uncertified, untrained = missing_runs(study, results / TASK, waiting)
    if uncertified or untrained:
        md += ["## Runs of the spec without a result", ""]
        if untrained:
            md += ["Not trained by the commands above: " + "; ".join(untrained) + ".", ""]
        if uncertified:
            md += [
                "Trained, not certified before the deadline: " + "; ".join(uncertified) + ".",
                "",
            ]
    doc.write_text("\n".join(md))
