"""Certified robustness per unit of compute (issue 19): the randomized-smoothing baselines and their
analytic variants under one trainer; writes docs/certified.md.

    python experiments/certified.py --mnist-dir DIR [--device cuda] [--workers 2]

Stages, each resumable (rerun the same command after a crash):
  1. train: experiments/certified.toml, every method at each time budget;
  2. evaluate: CERTIFY (Cohen et al.) of every run at its training sigma on --certify-images test
     images (every (10000 / N)-th), n0 = 100, n = --certify-n, alpha = 0.001; then the analytic
     expectation of its logits against Monte Carlo (``momentreg tightness``);
  3. export: each run's config, metrics, history, certify.json, tightness.json and per-image TSV
     to docs/results/certified/;
  4. doc: docs/certified.md and its figure, from those files alone (ACRs from the TSVs).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from study import (
    certify_command,
    data_dirs,
    export,
    fmt,
    parse_stages,
    provenance,
    run_jobs,
    study_parser,
    tightness_command,
)

from momentreg.plots import plt
from momentreg.rundir import (
    CERTIFY_FILE,
    CONFIG,
    HISTORY,
    METRICS,
    TIGHTNESS_FILE,
    certify_tsv,
    read_json,
)
from momentreg.sweep import load_spec, sweep
from momentreg.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "experiments" / "certified.toml"
TASK = "mnist"
STAGES = ("train", "evaluate", "export", "doc")
RADII = (0.5, 1.0, 1.5, 2.0)
SAMPLED = ("noise", "stability", "consistency", "macer")
TIGHTNESS_IMAGES, TIGHTNESS_SAMPLES = 50, 2000
DIVERGED = 10.0  # a run diverged if its last validation loss is over this many times its best
# Published ACRs of LeNet on MNIST (all 10,000 test images, N = 100,000, alpha = 0.001), from
# the certification logs of jh-jeong/smoothing-consistency as issue 19 quotes them (SmoothAdv for
# scale).
ANCHORS = {
    "noise": {0.25: 0.911, 0.5: 1.558, 1.0: 1.618},
    "stability": {0.25: 0.915, 0.5: 1.572, 1.0: 1.634},
    "macer": {0.25: 0.920, 0.5: 1.590, 1.0: 1.595},
    "consistency": {0.25: 0.928, 0.5: 1.655, 1.0: 1.738},
    "SmoothAdv": {0.25: 0.932, 0.5: 1.687, 1.0: 1.779},
}


def train(runs: Path, mnist: Path, device: str, workers: int, settings: dict) -> None:
    spec = {**load_spec(str(SPEC)), "data_dir": str(mnist), "device": device, **settings}
    counts = sweep(spec, runs / TASK, workers=workers, progress=True)
    if counts["failed"]:
        print(f"{counts['failed']} runs failed; see their error.txt", file=sys.stderr)


def evaluate(runs: Path, images: int, n: int, device: str, workers: int) -> None:
    """CERTIFY, then the analytic expectation against Monte Carlo (``momentreg tightness`` on the
    first TIGHTNESS_IMAGES test images at the run's sigma), of every run that has not had them."""
    jobs = []
    for run in sorted((runs / TASK / "runs").iterdir()):
        if not (run / METRICS).exists() or read_json(run / METRICS).get("constant_predictions"):
            continue  # a run that predicts one class is left out of the study
        sigma = read_json(run / CONFIG)["sigma"]
        done = read_json(run / CERTIFY_FILE) if (run / CERTIFY_FILE).exists() else {}
        job = []
        if done.get(f"{sigma:g}", {}).get("images") != images:
            smoothing = {"sigma": sigma, "n0": 100, "alpha": 0.001}
            job.append(certify_command(run, device, smoothing, n, images, 10_000))
        if not (run / TIGHTNESS_FILE).exists():
            job.append(tightness_command(run, device, sigma, TIGHTNESS_IMAGES, TIGHTNESS_SAMPLES))
        if job:
            jobs.append(job)
    run_jobs(jobs, workers)


def read_tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return [
            {"radius": float(r["radius"]), "correct": int(r["correct"])}
            for r in csv.DictReader(f, delimiter="\t")
        ]


def certified(tsv: list[dict]) -> dict:
    """ACR (radius of correct predictions, 0 elsewhere), its standard error, and certified
    accuracy (%) at RADII, from a per-image certification table."""
    radii = [r["radius"] * r["correct"] for r in tsv]
    n = len(radii)
    acr = sum(radii) / n
    se = math.sqrt(sum((r - acr) ** 2 for r in radii) / (n - 1) / n) if n > 1 else math.nan
    at = {r: 100.0 * sum(x >= r for x in radii) / n for r in RADII}
    return {"images": n, "acr": acr, "se": se, "at": at}


def label(config: dict) -> str:
    depth = " (all layers)" if config.get("moment_depth") == "all" else ""
    return config["method"] + depth


def val_losses(run: Path) -> list[float]:
    with open(run / HISTORY) as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f)]


def load_rows(folder: Path) -> list[dict]:
    rows = []
    for run in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (run / METRICS).exists():
            continue
        config, metrics = read_json(run / CONFIG), read_json(run / METRICS)
        tsv = run / certify_tsv(config["sigma"])
        if not tsv.exists() or metrics.get("constant_predictions"):
            continue
        images_seen = metrics["steps"] * config["batch_size"]
        rows.append(
            {
                "run": run.name,
                "label": label(config),
                "method": config["method"],
                "sigma": config["sigma"],
                "budget": config["time_budget"],
                "steps": metrics["steps"],
                "kept": f"{metrics['best_epoch']} of {metrics['epochs']}",
                "seconds_per_step": metrics["step_seconds"] / metrics["steps"],
                "passes": metrics["passes_per_image"],
                "compute": images_seen * metrics["passes_per_image"],  # clean image-passes
                "val_losses": val_losses(run),
                "accuracy": metrics["test_accuracy"],
                "gnr": metrics["gnr"],
                **certified(read_tsv(tsv)),
            }
        )
    return with_step_cost(rows)


def _order(row: dict) -> tuple:
    analytic = row["method"] not in SAMPLED
    return (row["sigma"], analytic, row["label"], row["budget"])


def with_step_cost(rows: list[dict]) -> list[dict]:
    """Each row with ``step_cost``: its seconds per step over noise training's at the same sigma
    and budget, or at the largest budget noise training has at that sigma (None without one)."""
    noise = {
        (r["sigma"], r["budget"]): r["seconds_per_step"] for r in rows if r["method"] == "noise"
    }
    for r in rows:
        budgets = [b for s, b in noise if s == r["sigma"]]
        base = noise.get((r["sigma"], r["budget"])) or (
            noise[(r["sigma"], max(budgets))] if budgets else None
        )
        r["step_cost"] = r["seconds_per_step"] / base if base else None
    return rows


def results_table(rows: list[dict]) -> str:
    """One sigma's runs."""
    header = ["method", "budget (s)", "steps", "epoch kept", "passes per image",
              "step seconds (x noise)", "compute (M image-passes)", "ACR",
              *[f"cert. acc. r={r:g}" for r in RADII], "clean acc.", "GNR"]  # fmt: skip
    body = [
        [
            r["label"],
            f"{r['budget']:g}",
            str(r["steps"]),
            r["kept"],
            f"{r['passes']:.2f}",
            f"{r['step_cost']:.2f}" if r["step_cost"] else "-",
            f"{r['compute'] / 1e6:.3f}",
            f"{r['acr']:.3f} ± {r['se']:.3f}",
            *[f"{r['at'][x]:.0f}" for x in RADII],
            fmt(r["accuracy"]),
            fmt(r["gnr"]),
        ]
        for r in sorted(rows, key=_order)
    ]
    return markdown_table(header, body, align="lrrrrrrr" + "r" * len(RADII) + "rr")


def anchor_table(rows: list[dict], sigmas: list[float], left_out: dict[float, set]) -> str:
    """The published ACRs beside each method's run at its largest budget, per sigma."""

    def cell(name: str, sigma: float) -> str:
        runs = [r for r in rows if r["method"] == name and r["sigma"] == sigma]
        if runs:
            r = max(runs, key=lambda r: r["budget"])
            return f"{r['acr']:.3f} ({r['budget']:g} s)"
        return "left out (one class)" if name in left_out.get(sigma, set()) else "not run"

    header = ["method"] + [
        f"{col}, sigma {s:g}" for s in sigmas for col in ("published", "ours (budget)")
    ]
    body = [
        [name] + [x for s in sigmas for x in (f"{acr[s]:.3f}", cell(name, s))]
        for name, acr in ANCHORS.items()
    ]
    return markdown_table(header, body, align="l" + "rr" * len(sigmas))


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """a's ACR minus b's, and two standard errors of that difference."""
    return a["acr"] - b["acr"], 2 * math.hypot(a["se"], b["se"])


def _compare(a: dict, b: dict) -> str:
    """'a >= b' or 'a < b', and whether the gap exceeds two standard errors of the difference."""
    gap, two_se = _gap(a, b)
    sign = ">=" if gap >= 0 else "<"
    resolved = "resolved" if abs(gap) > two_se else "within two standard errors"
    return f"{a['acr']:.3f} {sign} {b['acr']:.3f} ({resolved}: gap {gap:+.3f}, 2 SE {two_se:.3f})"


def goal_pairs(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    """The issue's goal as (what, analytic run, sampled run) pairs, per sigma: (1) at each budget
    consistency runs at, the best analytic variant against it; (2) each macer-analytic against
    MACER at 4x its seconds."""
    pairs = []
    for sigma in sorted({r["sigma"] for r in rows}):
        at_sigma = [r for r in rows if r["sigma"] == sigma]
        for cons in sorted((r for r in at_sigma if r["method"] == "consistency"), key=_order):
            analytic = [
                r for r in at_sigma if r["method"] not in SAMPLED and r["budget"] == cons["budget"]
            ]
            if analytic:
                best = max(analytic, key=lambda r: r["acr"])
                what = f"sigma {sigma:g}, {cons['budget']:g} s, against consistency"
                pairs.append((what, best, cons))
        for macer in (r for r in at_sigma if r["method"] == "macer"):
            for r in sorted(at_sigma, key=_order):
                if r["method"] == "macer-analytic" and 4 * r["budget"] == macer["budget"]:
                    what = f"sigma {sigma:g}, MACER's ACR at a quarter of its seconds"
                    pairs.append((what, r, macer))
    return pairs


def verdict(rows: list[dict], sigmas: list[float], left_out: dict[float, set]) -> list[str]:
    """The goal, checked pair by pair, then the plainest baseline against the best run."""
    pairs = goal_pairs(rows)
    lines = []
    for what, a, b in pairs:
        lines.append(
            f"- **{what}:** {a['label']} at {a['budget']:g} s against {b['label']} at "
            f"{b['budget']:g} s: {_compare(a, b)}; compute {a['compute'] / b['compute']:.2f}x "
            "the sampled run's (measured image-passes)."
        )
    for sigma in sigmas:
        if "macer" in left_out.get(sigma, set()):
            lines.append(
                f"- **sigma {sigma:g}, MACER's ACR at a quarter of its seconds:** not tested, "
                "since MACER has no certified result that counts (see the runs left out below)."
            )
    held = [(a, b) for _, a, b in pairs if a["acr"] >= b["acr"]]
    resolved = sum(gap > two_se for gap, two_se in (_gap(a, b) for a, b in held))
    head = (
        "**Verdict:** the goal (an analytic variant at least as certifiably robust as the sampled "
        "method at the same seconds, or as MACER at 4x them) holds in "
        f"{len(held)} of {len(pairs)} comparisons; {resolved} of them by more than two standard "
        "errors."
    )
    for sigma in sigmas:
        for b in sorted({r["budget"] for r in rows if r["method"] == "noise"}):
            at = [r for r in rows if r["sigma"] == sigma and r["budget"] == b]
            noise = next((r for r in at if r["method"] == "noise"), None)
            if noise is None:
                continue
            best = max(at, key=lambda r: r["acr"])
            where = f"- **sigma {sigma:g}, {b:g} s, the plainest baseline:** noise training"
            if best is noise:
                lines.append(
                    f"{where} has the highest ACR of the runs at {b:g} s, {noise['acr']:.3f}."
                )
            else:
                lines.append(
                    f"{where} against the best run, {best['label']}: {_compare(noise, best)}."
                )
    return [head, "", *lines]


def plot(rows: list[dict], sigma: float, path: Path) -> None:
    """ACR against the two costs, one line per method: training-step seconds on this machine, and
    FLOP-counted clean image-passes (which leave out elementwise work)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = sorted({r["label"] for r in rows}, key=lambda n: (n.split()[0] not in SAMPLED, n))
    for ax, key, xlabel in (
        (axes[0], "budget", "training-step seconds (2 CPU cores, one run per core)"),
        (axes[1], "compute", "training compute (millions of clean image-passes, FLOP-counted)"),
    ):
        scale = 1e6 if key == "compute" else 1
        for name in names:
            pts = sorted((r[key] / scale, r["acr"]) for r in rows if r["label"] == name)
            style = "-o" if name.split()[0] in SAMPLED else "--s"
            ax.plot(*zip(*pts, strict=True), style, label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted({r["budget"] for r in rows}) if key == "budget" else [0.03, 0.1, 0.3, 1]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(f"ACR, sigma {sigma:g}")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"MNIST, sigma {sigma:g}: certified radius against training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tightness_table(folder: Path, rows: list[dict], sigma: float) -> str:
    """The analytic expected logits against Monte Carlo on each model of the largest budgets."""
    header = ["method", "budget (s)", "first layer: median error", "argmax agrees",
              "all layers: median error", "argmax agrees", "Monte Carlo floor"]  # fmt: skip
    body = []
    for r in sorted(rows, key=_order):
        path = folder / r["run"] / TIGHTNESS_FILE
        if r["sigma"] != sigma or r["budget"] < 60 or not path.exists():
            continue
        t = read_json(path)["rows"][0]
        body.append(
            [r["label"], f"{r['budget']:g}"]
            + [f"{100 * t['analytic_error_median']:.1f}%", f"{t['analytic_argmax_agreement']:.0f}%"]
            + [f"{100 * t['all_layers_error_median']:.1f}%"]
            + [f"{t['all_layers_argmax_agreement']:.0f}%", f"{100 * t['mc_relative_se']:.2f}%"]
        )
    return markdown_table(header, body, align="lrrrrrr")


def understated(rows: list[dict], factor: float = 1.5) -> list[str]:
    """Runs whose step seconds (against noise training's) exceed their FLOP-counted passes by more
    than ``factor``: the elementwise work the counter leaves out."""
    return [
        f"{r['label']} at sigma {r['sigma']:g}, {r['budget']:g} s ({r['step_cost']:.2f}x noise "
        f"training's step seconds for {r['passes']:.2f} passes)"
        for r in sorted(rows, key=_order)
        if r["step_cost"] and r["step_cost"] > factor * r["passes"]
    ]


def left_out_runs(folder: Path) -> tuple[list[str], dict[float, set]]:
    """The runs that predict one class: a line each, and their methods per sigma."""
    lines, methods = [], {}
    for run in sorted(folder.iterdir()):
        metrics = read_json(run / METRICS) if (run / METRICS).exists() else {}
        if metrics.get("constant_predictions"):
            config = read_json(run / CONFIG)
            methods.setdefault(config["sigma"], set()).add(config["method"])
            lines.append(
                f"{label(config)} at sigma {config['sigma']:g}, {config['time_budget']:g} s "
                f"({metrics['steps']} steps, accuracy {metrics['test_accuracy']:.2f}%)"
            )
    return lines, methods


def diverged_lines(rows: list[dict]) -> list[str]:
    return [
        f"- {r['label']} at sigma {r['sigma']:g}, {r['budget']:g} s: validation loss by epoch "
        + ", ".join(f"{v:.3g}" for v in r["val_losses"])
        + f"; it keeps epoch {r['kept']}."
        for r in sorted(rows, key=_order)
        if r["val_losses"][-1] > DIVERGED * min(r["val_losses"])
    ]


def write_doc(results: Path, doc: Path) -> None:
    rows = load_rows(results / TASK)
    sigmas = sorted({r["sigma"] for r in rows})
    figures = doc.parent / "certified"
    figures.mkdir(parents=True, exist_ok=True)
    for sigma in sigmas:
        plot([r for r in rows if r["sigma"] == sigma], sigma, figures / f"acr-sigma{sigma:g}.png")
    left_out, left_methods = left_out_runs(results / TASK)
    images = rows[0]["images"]
    n = read_json(results / TASK / rows[0]["run"] / CERTIFY_FILE)[f"{rows[0]['sigma']:g}"]["n"]
    budgets = sorted({r["budget"] for r in rows})
    sig = " and ".join(f"{s:g}" for s in sigmas)
    md = provenance(results, "Certified robustness per unit of compute")
    md += [
        "## Setting",
        "",
        f"- The smallest informative version of issue 19, made without a GPU: MNIST, sigma {sig}, "
        "the anchors' LeNet (`smoothing-lenet`: conv 20-50, fc 500, raw pixels) and recipe (SGD "
        "0.01, momentum 0.9, weight decay 1e-4, batch 256), but each run trains for a budget of "
        "training-step seconds instead of 90 epochs (experiments/certified.toml): "
        + ", ".join(f"{b:g}" for b in budgets[:-1])
        + f" and {budgets[-1]:g} s, MACER only at the largest. Every method gets the same seconds, "
        "so a dearer step means fewer steps: the budget is the compute.",
        f"- CERTIFY (Cohen et al.) at the training sigma on {images} test images (every "
        f"{10_000 // images}th), n0 = 100, n = {n:,}, alpha = 0.001. ACR: the mean certified "
        "radius (0 for a wrong or abstained prediction), ± its standard error over the images; "
        "certified accuracy (%) at each radius. Every ACR below is computed from the committed "
        "per-image TSVs.",
        "- Cost, two ways. *Passes per image*: the FLOPs of one training step (forward and "
        "backward, counted by `torch.utils.flop_counter` in `momentreg.cost`) over those of a "
        "clean step on the same batch; noise training is 1, sampled consistency 2, MACER 16. "
        "*Step seconds* against noise training's at the same budget (MACER's against noise "
        "training's at the largest). The compute column is steps x batch x passes per image, in "
        "millions of clean image-passes. Each run keeps its best-validation epoch (the last one "
        "may be partial), so two budgets can keep the same weights.",
        "- Methods and their weights (lambda) are the authors' MNIST settings "
        "(src/momentreg/smoothing_losses.py); MACER and its analytic variants train the first 0.34 "
        "of their budget with the regularizer off (the authors defer it for 31 of 90 epochs). The "
        "analytic variants replace the Monte Carlo mean by the analytic expectation (first-layer "
        "moments, or all layers with a pairwise-probit E[softmax]); consistency-analytic keeps one "
        "noisy copy. `moment` is the paper's regularizer.",
        "",
        "## What we conclude",
        "",
        *verdict(rows, sigmas, left_methods),
        "",
        f"With {images} images and budgets of seconds this is a scaled-down study: read the gaps "
        "with their standard errors. The full one (sigma 0.25, 0.5 and 1.0; 90 epochs; 500 or "
        "10,000 images at n = 100,000; our noise training checked against the anchor within 0.03 "
        "ACR first) needs a GPU session.",
        "",
        "## Results",
        "",
    ]
    for sigma in sigmas:
        at = [r for r in rows if r["sigma"] == sigma]
        md += [
            f"### Sigma {sigma:g}",
            "",
            results_table(at),
            "",
            f"![ACR against training compute, sigma {sigma:g}](certified/acr-sigma{sigma:g}.png)",
            "",
        ]
    slow = understated(rows)
    if slow:
        md += [
            "The FLOP count prices convolutions and matrix products only; elementwise work, such "
            "as the Gaussian moments of every ReLU and pooling layer, is left out. These runs' "
            "step seconds exceed their passes by more than 1.5x: " + "; ".join(slow) + ".",
            "",
        ]
    md += [
        "## The published anchors beside ours",
        "",
        anchor_table(rows, sigmas, left_methods),
        "",
        "Ours are far below the anchors: seconds of CPU training against 90 epochs, on "
        f"{images} images at n = {n:,} (a smaller n caps the radius lower). They compare methods "
        "with each other, not with the published numbers.",
        "",
    ]
    md += [
        "## How close the analytic expectation is on these models",
        "",
        f"`momentreg tightness` on the first {TIGHTNESS_IMAGES} test images, at each run's "
        "sigma: the expected logits E[f(x + n)] of the first-layer split (what `moment` and the "
        "analytic variants' first-layer form train with) and of moments through every layer, "
        f"against a Monte Carlo mean of {TIGHTNESS_SAMPLES:,} draws per image. Median relative L2 "
        "error, the share of images whose argmax matches the Monte Carlo one, and the Monte Carlo "
        "standard error on the same scale (docs/tightness.md explains the measure). Runs of 60 s "
        "and more:",
        "",
    ]
    for sigma in sigmas:
        md += [f"Sigma {sigma:g}:", "", tightness_table(results / TASK, rows, sigma), ""]
    diverged = diverged_lines(rows)
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
        noise = sorted((r for r in rows if r["method"] == "noise"), key=_order)
        md += [
            "## Runs left out",
            "",
            "These runs predict one class for every test image (metrics.json flags them), so they "
            "are in no table, figure or verdict above: " + "; ".join(left_out) + ". For "
            "comparison, noise training took "
            + ", ".join(
                f"{r['steps']} steps in {r['budget']:g} s at sigma {r['sigma']:g}" for r in noise
            )
            + ".",
            "",
        ]
    doc.write_text("\n".join(md))


def main() -> None:
    p = study_parser(__doc__, "certified", workers=2)
    p.add_argument("--certify-images", type=int, default=100)
    p.add_argument("--certify-n", type=int, default=10_000, help="noise samples per image")
    args, stages = parse_stages(p, STAGES)
    if "train" in stages:
        dirs = data_dirs(p, args, {TASK: ("--mnist-dir", args.mnist_dir)})
        train(args.runs, dirs[TASK], args.device, args.workers, dict(args.set))
    if "evaluate" in stages:
        evaluate(args.runs, args.certify_images, args.certify_n, args.device, args.workers)
    if "export" in stages:
        export(args.runs, args.results, [TASK])
    if "doc" in stages:
        write_doc(args.results, args.doc)


if __name__ == "__main__":
    main()
