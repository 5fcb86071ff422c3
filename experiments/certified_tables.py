"""The certified study's tables and figures (docs/certified.md, certified-passes.md and
certified-gpu.md), from the exported runs alone: one row per certified run, with its ACR and
certified accuracies computed from its per-image TSV."""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path

from certified import CLEAN_EPOCHS, STUDIES, TASK, Study
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from study import fmt, made_with

from momentreg.core.smoothing_losses import MACER_BETA
from momentreg.evaluation import certify
from momentreg.runs.export import cell
from momentreg.runs.rundir import CONFIG, HISTORY, METRICS, TIGHTNESS_FILE, certify_tsv, read_json
from momentreg.runs.sweep import expand, load_spec, run_dir_name
from momentreg.tables import markdown_table
from momentreg.training.config import upgrade_recorded
from momentreg.training.methods import METHODS

RADII = (0.0, 0.5, 1.0, 1.5, 2.0)  # 0: the smoothed classifier's accuracy (abstaining is wrong)
SAMPLED = ("noise", "stability", "consistency", "macer")
DIVERGED = 10.0  # a run diverged if its last validation loss is over this many times its best
# Published ACRs of LeNet on MNIST (all 10,000 test images, N = 100,000, alpha = 0.001), from the
# certification logs of jh-jeong/smoothing-consistency (SmoothAdv for scale).
ANCHORS = {
    "noise": {0.25: 0.911, 0.5: 1.558, 1.0: 1.618},
    "stability": {0.25: 0.915, 0.5: 1.572, 1.0: 1.634},
    "macer": {0.25: 0.920, 0.5: 1.590, 1.0: 1.595},
    "consistency": {0.25: 0.928, 0.5: 1.655, 1.0: 1.738},
    "SmoothAdv": {0.25: 0.932, 0.5: 1.687, 1.0: 1.779},
}


# -- rows -----------------------------------------------------------------------------------------


def label(config: dict) -> str:
    """The method, and how its analytic expectation is made or its noisy copies counted where
    that is not the default: "macer-analytic (all layers)", "macer (2 noisy copies)"."""
    notes = ["all layers"] if config.get("moment_depth") == "all" else []
    copies = own_copies(config)
    if config["method"] in ("macer", "macer-analytic") and copies:
        notes.append(f"{copies} noisy {'copy' if copies == 1 else 'copies'}")
    if config.get("seed", 0):
        notes.append(f"seed {config['seed']}")
    return config["method"] + (f" ({', '.join(notes)})" if notes else "")


def own_copies(config: dict) -> int:
    """The noisy copies a run set where they are not its method's default (0 where they are),
    its config.json read as ``upgrade_recorded`` reads one of an earlier momentreg."""
    samples = upgrade_recorded(config).get("samples")
    return 0 if samples in (None, METHODS[config["method"]].copies) else samples


def budget(config: dict, unit: str) -> float:
    """What a run was given: seconds of training steps, clean epochs of compute, or epochs."""
    return config[{"s": "time_budget", CLEAN_EPOCHS: "pass_budget"}.get(unit, "epochs")]


def batches(results: Path) -> dict[str, str]:
    """method -> the ``--methods`` value of the last command in results/command.txt that names
    it (a partial rerun, whose runs ran beside each other), or nothing (the full study's)."""
    made, commands = {}, results / "command.txt"
    for line in commands.read_text().splitlines() if commands.exists() else []:
        words = line.replace("--methods=", "--methods ").split()
        if "--methods" in words[:-1]:
            value = words[words.index("--methods") + 1]
            made.update(dict.fromkeys(value.split(","), value))
    return made


def _row(run: Path, config: dict, metrics: dict, unit: str, batch: str) -> dict:
    radii = certify.certified_radii(tsv := certify.read_tsv(run / certify_tsv(config["sigma"])))
    acr, se = certify.mean_and_se(list(radii.values()))
    with open(run / HISTORY) as f:
        losses = [float(r["val_loss"]) for r in csv.DictReader(f)]
    return {
        "run": run.name, "label": label(config), "method": config["method"],
        "depth": config.get("moment_depth", "first"), "copies": own_copies(config),
        "seed": config.get("seed", 0), "sigma": config["sigma"], "budget": budget(config, unit),
        "step_budget": config.get("step_budget", 0), "pass_budget": config.get("pass_budget", 0),
        "batch": batch, "seconds": metrics["step_seconds"], "steps": metrics["steps"],
        "kept_epoch": metrics.get("kept_epoch", metrics["best_epoch"]),
        "epochs": metrics["epochs"], "keep": config.get("keep", "best"),
        "delay": config.get("alpha_delay", 0),
        "seconds_per_step": metrics["step_seconds"] / metrics["steps"],
        "passes": metrics["passes_per_image"],
        "compute": metrics["steps"] * config["batch_size"] * metrics["passes_per_image"],
        "val_losses": losses, "accuracy": metrics["test_accuracy"], "gnr": metrics["gnr"],
        "images": len(radii), "acr": acr, "se": se, "radii": radii,
        "at": certify.certified_accuracy(tsv, RADII),
    }  # fmt: skip


def runs(folder: Path):
    """(run folder, config, metrics) of each trained run."""
    for run in sorted(folder.iterdir()):
        if (run / METRICS).exists():
            yield run, read_json(run / CONFIG), read_json(run / METRICS)


def load_rows(folder: Path, unit: str) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """One row per certified run of seed 0, with its step cost; and (seed-0 row, row of another
    seed) for each certified run of another seed whose seed-0 run (same method, depth, copies and
    sigma) is certified too: at the same budget, or, for a run with a step budget, the one that
    took that many steps (the pair's second row then takes its budget)."""
    made = batches(folder.parent)
    rows = [
        _row(run, c, m, unit, made.get(c["method"], ""))
        for run, c, m in runs(folder)
        if (run / certify_tsv(c["sigma"])).exists() and not m.get("constant_predictions")
    ]
    seen = {}
    for r in rows:  # two runs of one cell: the page would set either against the others
        key = (r["label"], r["sigma"], r["budget"], r["step_budget"])
        if key in seen:
            sys.exit(
                f"{folder} holds two runs of {r['label']} at sigma {r['sigma']:g}, budget "
                f"{r['budget']:g}: {seen[key]} and {r['run']}; remove the stale one"
            )
        seen[key] = r["run"]

    def first_seed_of(a, r):
        same = all(a[k] == r[k] for k in ("method", "depth", "copies", "sigma"))
        at = a["steps"] == r["step_budget"] if r["step_budget"] else a["budget"] == r["budget"]
        return same and at

    first = [r for r in rows if not r["seed"]]
    pairs = []
    for r in (r for r in rows if r["seed"]):
        a = next((a for a in first if first_seed_of(a, r)), None)
        if a is not None:
            pairs.append((a, {**r, "budget": a["budget"]}))
    return with_step_cost(first), pairs


def row_order(row: dict) -> tuple:
    return row["sigma"], row["method"] not in SAMPLED, row["label"], row["budget"]


def with_step_cost(rows: list[dict]) -> list[dict]:
    """Each row with ``step_cost``: its seconds per step over those of noise training made in the
    same batch at the same sigma and budget, or at the largest budget noise training has there
    (None without one)."""
    noise = {(r["batch"], r["sigma"], r["budget"]): r["seconds_per_step"]
             for r in rows if r["method"] == "noise"}  # fmt: skip
    for r in rows:
        at = (r["batch"], r["sigma"])
        budgets = [b for *key, b in noise if tuple(key) == at]
        base = noise.get((*at, r["budget"])) or (noise[(*at, max(budgets))] if budgets else None)
        r["step_cost"] = r["seconds_per_step"] / base if base else None
    return rows


def acr_gap(a: dict, b: dict) -> tuple[float, float]:
    """a's ACR minus b's, and two standard errors of that difference over the test images (those
    of the per-image differences: both runs certified the same images)."""
    gap, se = certify.acr_gap(a["radii"], b["radii"])
    return gap, 2 * se


# -- comparisons ----------------------------------------------------------------------------------


def comparisons(rows: list[dict], unit: str, factor: int) -> list[tuple[str, dict, dict]]:
    """(kind, run, run set against it) per sigma. The goal: at each budget of consistency, the
    best analytic variant against it; each macer-analytic against MACER at ``factor`` x its
    budget, where it had at most a quarter of MACER's compute (as budgeted in a study of
    counted compute, as measured otherwise). Outside it: macer-analytic against sampled MACER
    with as many noisy copies as its passes per image; noise training against the best run."""
    out = []
    for sigma in sorted({r["sigma"] for r in rows}):
        at = sorted((r for r in rows if r["sigma"] == sigma), key=row_order)
        analytic = [r for r in at if r["method"] == "macer-analytic"]
        for cons in (r for r in at if r["method"] == "consistency"):
            rivals = [r for r in at if r["method"] not in SAMPLED and r["budget"] == cons["budget"]]
            if rivals:
                best = max(rivals, key=lambda r: r["acr"])
                out.append((f"goal: best of {len(rivals)} analytic vs consistency", best, cons))
        macers = [r for r in at if r["method"] == "macer" and not r["copies"]]
        for macer, r in itertools.product(macers, analytic):
            if factor * r["budget"] == macer["budget"]:
                key = "budget" if unit == CLEAN_EPOCHS else "compute"
                within = r[key] <= macer[key] / 4
                kind = "goal: vs MACER" if within else "not in the goal: over a quarter"
                out.append((f"{kind} at {factor}x the budget", r, macer))
        for r, m in itertools.product(analytic, at):
            if (
                m["method"] == "macer"
                and m["budget"] == r["budget"]
                and m["copies"] == round(r["passes"])
            ):
                out.append(("control: vs MACER at the same passes", r, m))
        for b in sorted({r["budget"] for r in at if r["method"] == "noise"}):
            same = [r for r in at if r["budget"] == b]
            noise, best = (
                next(r for r in same if r["method"] == "noise"),
                max(same, key=lambda r: r["acr"]),
            )
            if best is not noise:
                out.append(("baseline: noise vs the best run", noise, best))
    return out


def _run(r: dict) -> str:
    return f"{r['label']} ({r['budget']:g})"


def _gap(a: dict, b: dict) -> list[str]:
    gap, two_se = acr_gap(a, b)
    return [f"{gap:+.3f}", f"{two_se:.3f}"]


def comparison_table(pairs: list[tuple[str, dict, dict]], unit: str) -> str:
    header = ["comparison", "sigma", f"run ({unit})", "ACR", f"against ({unit})", "ACR", "gap",
              "2 SE (images)", "compute ratio"]  # fmt: skip
    body = [
        [kind, f"{a['sigma']:g}", _run(a), f"{a['acr']:.3f}", _run(b), f"{b['acr']:.3f}"]
        + [*_gap(a, b), f"{a['compute'] / b['compute']:.2f}"]
        for kind, a, b in pairs
    ]
    return markdown_table(header, body, align="lrlrlrrrr")


def redrawn_table(goal: list[tuple[str, dict, dict]], pairs: list[tuple[dict, dict]]) -> str:
    """The goal's comparisons whose two runs both have a second seed at their steps: the gap
    with seed 0 and with the second seeds, and their mean."""
    again = {a["run"]: b for a, b in pairs if b["step_budget"] or b["pass_budget"]}
    body = []
    for _, a, b in goal:
        if a["run"] in again and b["run"] in again:
            a2, b2 = again[a["run"]], again[b["run"]]
            mean = (acr_gap(a, b)[0] + acr_gap(a2, b2)[0]) / 2
            body.append(
                [f"{a['sigma']:g}", _run(a), _run(b), *_gap(a, b), *_gap(a2, b2), f"{mean:+.3f}"]
            )
    header = ["sigma", "run", "against", "gap, seed 0", "2 SE", "gap, seed 1", "2 SE", "mean gap"]
    return markdown_table(header, body, align="lllrrrrr") if body else "None."


# -- tables ---------------------------------------------------------------------------------------


def results_table(rows: list[dict], unit: str) -> str:
    """One sigma's runs."""
    header = ["method", f"budget ({unit})", "steps", "epoch kept", "passes per image",
              "step seconds (x noise)", "compute (M image-passes)", "ACR",
              *[f"cert. acc. r={r:g}" for r in RADII], "clean acc.", "GNR"]  # fmt: skip
    body = [
        [r["label"], f"{r['budget']:g}", str(r["steps"]), f"{r['kept_epoch']} of {r['epochs']}",
         f"{r['passes']:.2f}", f"{r['step_cost']:.2f}" if r["step_cost"] else "-",
         f"{r['compute'] / 1e6:.3f}", f"{r['acr']:.3f} ± {r['se']:.3f}",
         *[f"{r['at'][x]:.0f}" for x in RADII], fmt(r["accuracy"]), fmt(r["gnr"])]
        for r in sorted(rows, key=row_order)
    ]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrrr" + "r" * len(RADII) + "rr")


def anchor_table(rows: list[dict], sigmas: list[float], unit: str, missing: dict) -> str:
    """The published ACRs beside each method's run at its largest budget, per sigma
    (``missing``: (method, sigma) -> why it has no certified run)."""

    def ours(name: str, sigma: float) -> str:
        at = [r for r in rows if r["method"] == name and r["sigma"] == sigma and not r["copies"]]
        if at:
            r = max(at, key=lambda r: r["budget"])
            return f"{r['acr']:.3f} ({r['budget']:g} {unit})"
        return missing.get((name, sigma), "not run")

    header = ["method"] + [
        f"{c}, sigma {s:g}" for s in sigmas for c in ("published", "ours (budget)")
    ]
    body = [[name] + [x for s in sigmas for x in (f"{acr[s]:.3f}", ours(name, s))]
            for name, acr in ANCHORS.items()]  # fmt: skip
    return markdown_table(header, body, align="l" + "rr" * len(sigmas))


def anchor_check(rows: list[dict], sigmas: list[float]) -> str:
    """Our noise training at its largest budget against the published ACR, per sigma."""
    body = []
    for sigma in sigmas:
        ours = [r for r in rows if r["method"] == "noise" and r["sigma"] == sigma]
        if ours:
            r = max(ours, key=lambda r: r["budget"])
            gap = r["acr"] - ANCHORS["noise"][sigma]
            body.append(
                [
                    f"{sigma:g}",
                    f"{r['acr']:.3f} ± {r['se']:.3f}",
                    f"{ANCHORS['noise'][sigma]:.3f}",
                    f"{gap:+.3f}",
                    f"{2 * r['se']:.3f}",
                ]
            )
    return markdown_table(["sigma", "ours", "published", "gap", "2 SE (ours)"], body)


def seed_table(pairs: list[tuple[dict, dict]], unit: str) -> str:
    """Each pair: the run, its two seeds' steps and ACRs, their difference and two standard
    errors of it over the images."""
    body = [
        [a["label"], f"{a['sigma']:g}", f"{a['budget']:g}", f"{b['seed']}", f"{a['steps']}",
         f"{b['steps']}", f"{a['acr']:.3f} ± {a['se']:.3f}", f"{b['acr']:.3f} ± {b['se']:.3f}",
         f"{b['acr'] - a['acr']:+.3f}", f"{acr_gap(a, b)[1]:.3f}"]
        for a, b in sorted(pairs, key=lambda p: row_order(p[0]))
    ]  # fmt: skip
    header = ["method", "sigma", f"budget ({unit})", "other seed", "steps, seed 0",
              "steps, other seed", "ACR, seed 0", "ACR, other seed", "difference",
              "2 SE (images)"]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrrrrr")


def measured(folder: Path, rows: list[dict], sigma: float, least: float):
    """(row, its tightness.json row) of each run at ``sigma`` of at least ``least`` budget."""
    for r in sorted(rows, key=row_order):
        path = folder / r["run"] / TIGHTNESS_FILE
        if r["sigma"] == sigma and r["budget"] >= least and path.exists():
            yield r, read_json(path)["rows"][0]


def tightness_table(folder: Path, rows: list[dict], sigma: float, unit: str, least: float) -> str:
    """The analytic expected logits against Monte Carlo on each model of at least ``least``."""
    header = ["method", f"budget ({unit})", "first layer: median error", "argmax agrees",
              "all layers: median error", "argmax agrees", "Monte Carlo floor"]  # fmt: skip
    body = [
        [r["label"], f"{r['budget']:g}", f"{100 * t['analytic_error_median']:.1f}%",
         f"{t['analytic_argmax_agreement']:.0f}%", f"{100 * t['all_layers_error_median']:.1f}%",
         f"{t['all_layers_argmax_agreement']:.0f}%", f"{100 * t['mc_relative_se']:.2f}%"]
        for r, t in measured(folder, rows, sigma, least)
    ]  # fmt: skip
    return markdown_table(header, body, align="lrrrrrr")


def soft_table(folder: Path, rows: list[dict], sigma: float, unit: str, least: float) -> str:
    """MACER's soft smoothed classifier E[softmax(16 f(x + n))] against its analytic stand-ins:
    total variation, and on how many images the hinge can act; "None." if no model was."""
    header = ["method", f"budget ({unit})"]
    header += "first layer: TV|all layers: TV|Monte Carlo floor|hinge acts: Monte Carlo".split("|")
    header += ["first layer", "all layers"]
    b = f"beta{MACER_BETA:g}"
    tv = (f"analytic_tv_{b}_median", f"all_layers_tv_{b}_median", f"mc_tv_floor_{b}")
    share = ("mc_hinge_share", "analytic_hinge_share", "all_layers_hinge_share")
    body = [[r["label"], f"{r['budget']:g}", *(f"{t[k]:.3f}" for k in tv)]
            + [f"{t[k]:.0f}%" for k in share]
            for r, t in measured(folder, rows, sigma, least) if "mc_hinge_share" in t]  # fmt: skip
    return markdown_table(header, body, align="l" + "r" * 7) if body else "None."


def others_table(folder: Path, rows: list[dict], study: Study) -> str:
    """Every run of the spec that the results tables leave out or flag, and why: it predicts one
    class, was not certified or not trained, diverged (its best-validation epoch is certified),
    its tightness was not measured, or it keeps an epoch from before its regularizer."""
    unit, body = study.unit, []
    for run, c, m in runs(folder):
        what = [f"{label(c)}, sigma {c['sigma']:g}, {budget(c, unit):g} {unit}"]
        facts = f"{m['steps']} steps, accuracy {m['test_accuracy']:.2f}, GNR {m['gnr']:.2f}"
        kept = f", epoch kept {m.get('kept_epoch', m['best_epoch'])} of {m['epochs']}"
        if m.get("constant_predictions"):
            body.append([*what, "predicts one class (left out)", facts])
        elif not (run / certify_tsv(c["sigma"])).exists():
            body.append([*what, "trained, not certified", facts + kept])
    for r in sorted(rows, key=row_order):
        what, losses = (
            [f"{r['label']}, sigma {r['sigma']:g}, {r['budget']:g} {unit}"],
            r["val_losses"],
        )
        if losses[-1] > DIVERGED * min(losses):
            body.append(
                [
                    *what,
                    "diverged",
                    f"validation loss {min(losses):.3g} at best, last {losses[-1]:.3g}",
                ]
            )
        if (
            r["budget"] >= study.tightness_from
            and not (folder / r["run"] / TIGHTNESS_FILE).exists()
        ):
            body.append([*what, "tightness not measured", ""])
        if r["kept_epoch"] <= r["delay"]:
            why = f"epoch {r['kept_epoch']}, regularizer from epoch {r['delay'] + 1}"
            body.append([*what, "keeps an epoch before its regularizer", why])
    trained = {cell(run.name) for run, _, _ in runs(folder)}
    for c in expand(load_spec(str(study.spec))):
        if cell(run_dir_name(c)) not in trained:
            body.append([f"{label(c)}, sigma {c['sigma']:g}", "not trained", ""])
    return markdown_table(["run", "why", "facts"], body) if body else "None."


def plot(rows: list[dict], sigma: float, path: Path, unit: str) -> None:
    """ACR against the two costs, one line per method: training-step seconds (the budget of a
    study of seconds; else as measured), and FLOP-counted clean image-passes."""
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
            ax.plot(
                *zip(*pts, strict=True), "-o" if name.split()[0] in SAMPLED else "--s", label=name
            )
        ax.set_xscale("log")
        if unit in ("s", CLEAN_EPOCHS):
            ax.minorticks_off()
            if unit == "s":
                ticks = (
                    sorted({r["budget"] for r in rows}) if key == "budget" else [0.03, 0.1, 0.3, 1]
                )
            else:
                ticks = (sorted({round(r["compute"] / scale, 2) for r in rows})
                         if key == "compute" else [30, 100, 300, 1000])  # fmt: skip
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


def blocks(results: Path, figures: Path, study: str) -> dict[str, str]:
    """A certified page's blocks from the exported runs in ``results``."""
    s = STUDIES[study]
    folder, unit = results / TASK, s.unit
    rows, seeds = load_rows(folder, unit)
    sigmas = sorted({r["sigma"] for r in rows})
    pairs = comparisons(rows, unit, s.macer_factor)
    missing = {}
    for _, c, m in runs(folder):
        why = "left out (one class)" if m.get("constant_predictions") else "trained, not certified"
        missing.setdefault((c["method"], c["sigma"]), why)
    out = {"made": made_with(results), "comparisons": comparison_table(pairs, unit),
           "anchors": anchor_table(rows, sigmas, unit, missing),
           "others": others_table(folder, rows, s)}  # fmt: skip
    for sigma in sigmas:
        at = [r for r in rows if r["sigma"] == sigma]
        out[f"results-sigma{sigma:g}"] = results_table(at, unit)
        if len({r["method"] for r in at}) > 1:
            plot(at, sigma, figures / f"acr-sigma{sigma:g}.png", unit)
        if any(True for _ in measured(folder, rows, sigma, s.tightness_from)):
            out[f"tightness-sigma{sigma:g}"] = tightness_table(
                folder, rows, sigma, unit, s.tightness_from
            )
            out[f"soft-sigma{sigma:g}"] = soft_table(folder, rows, sigma, unit, s.tightness_from)
    if seeds:
        steps = [p for p in seeds if p[1]["step_budget"] or p[1]["pass_budget"]]
        clock = [p for p in seeds if p not in steps]
        out["seeds-steps"] = seed_table(steps, unit) if steps else "None."
        out["seeds-seconds"] = seed_table(clock, unit) if clock else "None."
        out["seeds-goal"] = redrawn_table([p for p in pairs if p[0].startswith("goal")], seeds)
    if s.name == "certified-gpu":
        out["anchor-check"] = anchor_check(rows, sigmas)
    return out
