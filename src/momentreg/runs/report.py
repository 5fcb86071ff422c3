"""The sweep report: results.csv, the paper's figures and the fair comparison, as Markdown + PNG.

Fair comparison (the paper's Figures 3 and 7): per model and dataset, only runs whose test accuracy
is at least the clean baseline's (mean over clean seeds) minus a tolerance compete; the most robust
(highest GNR) run of each method group wins.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from momentreg.errors import ConfigError
from momentreg.evaluation.attacks import ATTACK_LABELS  # noqa: E402
from momentreg.runs.plots import plot_certified, plot_consistency  # noqa: E402
from momentreg.runs.rundir import CERTIFY_FILE, METRICS, read_json, read_run  # noqa: E402
from momentreg.runs.sweep import MOMENT_VARIANTS, moment_variants  # noqa: E402
from momentreg.tables import fmt, markdown_table  # noqa: E402
from momentreg.training.methods import ANALYTIC, WEIGHTED  # noqa: E402

__all__ = [
    "TOLERANCE",
    "collect",
    "describe",
    "fair_comparison",
    "fair_table",
    "group_of",
    "plot_fair",
    "plot_vs_sigma",
    "runs_table",
    "write_report",
]

# accuracy points a run may lose against the clean baseline and still compete
TOLERANCE = {
    "mnist": 0.0,
    "mnist-sample": 0.0,
    "fashion-mnist": 0.0,
    "cifar10": 0.39,
    "cifar100": 0.75,
}
COLUMNS = [
    "run",
    "model",
    "dataset",
    "method",
    "sigma",
    "alpha",
    "folds",
    "seed",
    "epochs",
    "test_accuracy",
    "gnr",
    "train_seconds",
    "seconds_per_epoch",
    *[f"energy_{k}" for k in ATTACK_LABELS],
]


def run_row(run: Path) -> dict:
    """One finished run as a row with the COLUMNS keys (plus its GNR curve)."""
    config, metrics, attacks = read_run(run)
    row = {
        "run": run.name,
        **{k: config.get(k) for k in COLUMNS[1:8]},
        **{k: metrics.get(k) for k in COLUMNS[8:13]},
    }
    for key in ATTACK_LABELS:
        row[f"energy_{key}"] = attacks.get(key, {}).get("energy_mean")
    row["gnr_curve"] = metrics.get("gnr_curve")
    row["constant_predictions"] = bool(metrics.get("constant_predictions"))
    row.update({key: config.get(key) for key, *_ in MOMENT_VARIANTS})
    row["time_budget"] = config.get("time_budget") or None
    row["steps"], row["step_seconds"] = metrics.get("steps"), metrics.get("step_seconds")
    certify = run / CERTIFY_FILE
    row["certify"] = read_json(certify) if certify.exists() else {}
    return row


def collect(sweep_dir: Path) -> list[dict]:
    """One row per finished run under ``sweep_dir/runs`` (or ``sweep_dir`` itself)."""
    root = sweep_dir / "runs" if (sweep_dir / "runs").is_dir() else sweep_dir
    return [run_row(run) for run in sorted(root.iterdir()) if (run / METRICS).exists()]


# The paper's Table 1/4 layout: one row per run, mean attack energies, then GNR and accuracy.
TABLE1_HEADER = [*COLUMNS[1:7], "run", *ATTACK_LABELS.values(), "GNR", "ACC"]


def table1_row(row: dict) -> list[str]:
    return [
        row["model"],
        row["dataset"],
        row["method"],
        str(row["sigma"]),
        str(row["alpha"]) if row["method"] in WEIGHTED else "",
        str(row["folds"]) if row["method"] == "augment" else "",
        row["run"],
        *[fmt(row[f"energy_{k}"], ".3g") for k in ATTACK_LABELS],
        fmt(row["gnr"]),
        fmt(row["test_accuracy"]),
    ]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def group_of(row: dict) -> str:
    """The method group a run competes in: clean, noise, moment, or augment per N."""
    if row["method"] == "augment":
        return f"augment N={row['folds']}"
    if row["method"] in ANALYTIC:
        return row["method"] + moment_variant(row)
    return row["method"]


def moment_variant(row: dict) -> str:
    """'' for the paper's regularizer, else e.g. ' (all layers, expected CE, noisy)'."""
    labels = [label for _, label in moment_variants(row)]
    return f" ({', '.join(labels)})" if labels else ""


def fair_comparison(rows: list[dict], tolerance: float, group=group_of) -> dict:
    """Among rows of one model/dataset: the highest-GNR row per group with accuracy >= threshold.

    threshold = mean clean accuracy - tolerance; ``group(row)`` names a row's group (default: N-fold
    augmentation per N). The clean group always has a winner (its most accurate run if none clears
    the mean). Returns {"baseline_accuracy", "threshold", "selected"}.
    """
    clean = [r for r in rows if r["method"] == "clean"]
    if not clean:
        raise ConfigError("the fair comparison needs at least one clean run")
    baseline = sum(r["test_accuracy"] for r in clean) / len(clean)
    threshold = baseline - tolerance
    selected: dict[str, dict] = {}
    for row in rows:
        if row["test_accuracy"] < threshold - 1e-9:
            continue
        name = group(row)
        if name not in selected or row["gnr"] > selected[name]["gnr"]:
            selected[name] = row
    if "clean" not in selected:
        selected["clean"] = max(clean, key=lambda r: r["test_accuracy"])
    order = sorted(selected, key=lambda g: (g != "clean", g))
    return {
        "baseline_accuracy": baseline,
        "threshold": threshold,
        "selected": {g: selected[g] for g in order},
    }


def describe(row: dict) -> str:
    if row["method"] in WEIGHTED:
        variant = moment_variant(row) if row["method"] in ANALYTIC else ""
        return f"{row['method']} sigma={row['sigma']} alpha={row['alpha']}" + variant
    if row["method"] == "augment":
        return f"augment N={row['folds']} sigma={row['sigma']}"
    if row["method"] == "noise":
        return f"noise sigma={row['sigma']}"
    return "clean"


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def plot_vs_sigma(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy and GNR against training sigma per method group (the paper's Figure 2)."""
    fig = Figure(figsize=(11, 4), dpi=110)
    axes = fig.subplots(1, 2)
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] != "clean":
            label = f"moment alpha={r['alpha']}" if r["method"] == "moment" else group_of(r)
            series[label][r["sigma"]].append(r)
    clean = [r for r in rows if r["method"] == "clean"]
    for ax, key, name in ((axes[0], "test_accuracy", "test accuracy (%)"), (axes[1], "gnr", "GNR")):
        for label, by_sigma in sorted(series.items()):
            sigmas = sorted(by_sigma)
            ax.plot(
                sigmas,
                [mean(r[key] for r in by_sigma[s]) for s in sigmas],
                marker="o",
                label=label,
            )
        if clean:
            ax.axhline(mean(r[key] for r in clean), color="k", ls="--", label="clean")
        ax.set_xscale("symlog", linthresh=0.1)
        ticks = sorted({s for by_sigma in series.values() for s in by_sigma})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.set_xlabel("training sigma")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_fair(selected: dict, path: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    groups = list(selected)
    gnrs = [selected[g]["gnr"] for g in groups]
    bars = ax.bar(range(len(groups)), gnrs, color=["0.5"] + ["C0"] * (len(groups) - 1))
    for bar, g in zip(bars, groups, strict=True):
        r = selected[g]
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"{describe(r)}\nacc {r['test_accuracy']:.2f}",
            ha="center",
            va="bottom",
            fontsize=6,
        )
    ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
    ax.set_ylabel("GNR")
    ax.set_ylim(min(gnrs) - 10, 105)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def fair_table(selected: dict[str, dict]) -> str:
    """The fair comparison's winners (group -> row) as a Markdown table."""
    return markdown_table(
        ["group", "winner", "test accuracy", "GNR", "training s"],
        [
            [
                g,
                describe(r),
                fmt(r["test_accuracy"]),
                fmt(r["gnr"]),
                fmt(r["train_seconds"], ".0f"),
            ]
            for g, r in selected.items()
        ],
    )


def _certify_section(rows: list[dict], out: Path, tag: str) -> list[str]:
    """Certified accuracy against radius for the runs with certify.json (Cohen et al. 2019)."""
    entries = [(r, sigma, c) for r in rows for sigma, c in sorted(r["certify"].items())]
    if not entries:
        return []
    plot_certified(
        {f"{describe(r)}, smoothing sigma={s}": c["certified_accuracy"] for r, s, c in entries},
        out / f"{tag}-certified.png",
        "randomized smoothing: certified accuracy",
    )
    radii = list(entries[0][2]["certified_accuracy"])
    return [
        "### Randomized smoothing (Cohen et al. 2019)",
        "",
        markdown_table(
            ["run", "smoothing sigma", "images", "n", "ACR", *[f"cert. acc. r={x}" for x in radii]],
            [
                [describe(r), s, c["images"], c["n"], fmt(c["acr"], ".3f")]
                + [fmt(c["certified_accuracy"].get(x)) for x in radii]
                for r, s, c in entries
            ],
        ),
        "",
        f"![certified accuracy against radius]({tag}-certified.png)",
        "",
    ]


def write_report(sweep_dir: Path, out: Path, tolerance: float | None = None) -> Path:
    """Write results.csv, report.md and its PNG figures into ``out``; returns report.md's path."""
    rows = collect(sweep_dir)
    if not rows:
        raise ConfigError(f"no finished runs under {sweep_dir}")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    md = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(rows)} finished runs; every number below is in `results.csv`.",
        "",
    ]
    constant = [r["run"] for r in rows if r["constant_predictions"]]
    if constant:
        md += [
            "Left out of every comparison, table and figure below: runs that predict one class for "
            f"every test image (their GNR of 100 means nothing): {', '.join(constant)}.",
            "",
        ]
    by_task = defaultdict(list)
    for r in rows:
        if not r["constant_predictions"]:
            by_task[(r["model"], r["dataset"])].append(r)
    for (model, dataset), task_rows in sorted(by_task.items()):
        tag = f"{model}-{dataset}"
        md += [f"## {model} on {dataset}", ""]
        plot_vs_sigma(task_rows, out / f"{tag}-vs-sigma.png", f"{model} / {dataset}")
        md += [f"![accuracy and GNR against training sigma]({tag}-vs-sigma.png)", ""]
        tol = TOLERANCE.get(dataset, 0.0) if tolerance is None else tolerance
        if any(r["method"] == "clean" for r in task_rows):
            md += _fair_section(task_rows, tol, out, tag, f"{model} / {dataset}")
        md += _all_runs_section(task_rows)
        md += _attack_section(task_rows)
        md += _certify_section(task_rows, out, tag)
        md += _cost_section(task_rows)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _fair_section(rows: list[dict], tol: float, out: Path, tag: str, name: str) -> list[str]:
    fair = fair_comparison(rows, tol)
    sel = fair["selected"]
    title = (
        f"most robust run per method with accuracy >= {fair['threshold']:.2f} "
        f"(clean {fair['baseline_accuracy']:.2f} - {tol})"
    )
    plot_fair(sel, out / f"{tag}-fair.png", title)
    plot_consistency(
        {describe(r): r["gnr_curve"] for r in sel.values()},
        out / f"{tag}-curves.png",
        f"selected runs, {name}",
    )
    return [
        "### Fair comparison",
        "",
        f"Runs compete when their test accuracy is at least {fair['threshold']:.2f} "
        f"(mean clean accuracy {fair['baseline_accuracy']:.2f} minus tolerance {tol}).",
        "",
        fair_table(sel),
        "",
        f"![fair comparison]({tag}-fair.png)",
        "",
        f"![consistency of the selected runs]({tag}-curves.png)",
        "",
    ]


def runs_table(rows: list[dict], names: bool = True, extra: dict | None = None) -> str:
    """One line per run: (its name,) method, sigma, alpha, N, seed, accuracy, GNR, epochs, then
    ``extra`` columns (header -> cell of a row), then training seconds; rows in the given order."""
    columns = {"run": lambda r: r["run"]} if names else {}
    columns.update(
        {
            "method": lambda r: r["method"],
            "sigma": lambda r: r["sigma"],
            "alpha": lambda r: r["alpha"] if r["method"] in WEIGHTED else "",
            "N": lambda r: r["folds"] if r["method"] == "augment" else "",
            "seed": lambda r: r["seed"],
            "accuracy": lambda r: fmt(r["test_accuracy"]),
            "GNR": lambda r: fmt(r["gnr"]),
            "epochs": lambda r: r["epochs"],
            **(extra or {}),
            "training s": lambda r: fmt(r["train_seconds"], ".0f"),
        }
    )
    return markdown_table(list(columns), [[cell(r) for cell in columns.values()] for r in rows])


def _all_runs_section(rows: list[dict]) -> list[str]:
    return ["### All runs", "", runs_table(rows), ""]


def energy_cell(row: dict, baseline: dict | None, key: str) -> str:
    """Run ``row``'s mean minimal-perturbation energy under attack ``key``, with its ratio to
    that of ``baseline`` ("0.52 (3.1x)"); "n/a" where the attack did not run or found no image
    it could attack."""
    value = row[f"energy_{key}"]
    if value is None or value != value:  # not run, or no image it could attack (NaN)
        return "n/a"
    if baseline is None or row is baseline or not baseline[f"energy_{key}"]:
        return f"{value:.3g}"
    return f"{value:.3g} ({value / baseline[f'energy_{key}']:.1f}x)"


def attack_table(rows: list[dict], baseline: dict | None = None) -> str:
    """The paper's Table 1 layout: per run (in the order given) the mean energy of each attack,
    with its ratio to ``baseline``'s (a clean run, say), then GNR and accuracy."""
    return markdown_table(
        ["run", *ATTACK_LABELS.values(), "GNR", "ACC"],
        [[describe(r), *[energy_cell(r, baseline, k) for k in ATTACK_LABELS],
          fmt(r["gnr"], missing="n/a"), fmt(r["test_accuracy"], missing="n/a")] for r in rows],
    )  # fmt: skip


def _attack_section(rows: list[dict]) -> list[str]:
    attacked = [r for r in rows if any(r[f"energy_{k}"] for k in ATTACK_LABELS)]
    if not attacked:
        return []
    clean = [r for r in attacked if r["method"] == "clean"]
    baseline = max(clean, key=lambda r: r["test_accuracy"]) if clean else None
    return [
        "### Minimal perturbation energies (the paper's Table 1 layout)",
        "",
        "In parentheses: the ratio to the energy of the most accurate clean run attacked.",
        "",
        attack_table(attacked, baseline),
        "",
    ]


def _cost_section(rows: list[dict]) -> list[str]:
    cost = defaultdict(list)
    for r in rows:
        cost[group_of(r)].append(r)
    cells = [
        [
            g,
            len(rs),
            fmt(mean(r["train_seconds"] for r in rs), ".0f"),
            fmt(mean(r["seconds_per_epoch"] for r in rs), ".1f"),
            fmt(mean(r["gnr"] for r in rs)),
        ]
        for g, rs in sorted(cost.items())
    ]
    header = ["group", "runs", "mean training s", "mean s / epoch", "mean GNR"]
    return ["### Training cost", "", markdown_table(header, cells), ""]
