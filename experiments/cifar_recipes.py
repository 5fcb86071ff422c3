"""docs/cifar.md's section on the paper's own recipes on a CPU: the per-step logs of AlexNet under
SGD (experiments/alexnet_sgd.py) and the short runs of experiments/recipes-cpu.toml, as tables,
for docs/cifar.md.

    momentreg sweep experiments/recipes-cpu.toml --out runs/recipes-cpu --workers 2
    momentreg sweep export runs/recipes-cpu --to docs/results/cifar/recipes-cpu
"""

from __future__ import annotations

import csv
from pathlib import Path

from momentreg.runs.rundir import CONFIG, ERROR, HISTORY, METRICS, read_json
from momentreg.tables import markdown_table

STEPS = "alexnet-sgd"  # the per-step logs, beside the runs in the study's results
RUNS = "recipes-cpu"
DATA = {"cifar10": "CIFAR-10 (JPEG copy)", "cifar100": "CIFAR-100 (rebuilt)"}
VARIANTS = {  # experiments/alexnet_sgd.py's variants: the loss and the learning rate
    "clean": ("CE", "0.1"),
    "clean-double-lr": ("CE", "0.2"),
    "sum": ("CE + CE_moment (the paper's sum)", "0.1"),
    "convex": ("(CE + CE_moment) / 2 (convex)", "0.1"),
    "half-lr": ("CE + CE_moment (the paper's sum)", "0.05"),
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _step_row(path: Path) -> list[str]:
    variant, _, sigma = path.stem.rpartition("-sigma")
    rows = list(csv.DictReader(path.open()))
    last = rows[-50:]  # the last 50 steps
    moment = [float(r["moment"]) for r in last if r["moment"]]
    finite_s = [float(r["s_min"]) for r in rows if r.get("s_min")]
    validated = [r for r in rows if r["val_accuracy"]]
    loss, lr = VARIANTS[variant]
    return [
        loss,
        "" if variant.startswith("clean") else sigma,
        lr,
        str(len(rows)),
        f"{_mean([float(r['clean']) for r in last]):.3f}",
        f"{_mean(moment):.3f}" if moment else "",
        f"{max(float(r['grad_norm']) for r in rows):.2f}",
        f"{min(finite_s):.3f}" if finite_s else "",
        f"{float(rows[-1]['logit_max']):.2f}",
        f"{float(validated[-1]['val_accuracy']):.2f} (step {validated[-1]['step']})"
        if validated
        else "",
        next((f"step {r['step']}: {r['nonfinite']}" for r in rows if r["nonfinite"]), "none"),
    ]


def steps_table(folder: Path) -> str:
    header = ["loss", "sigma", "lr", "steps", "clean term", "moment term", "max grad norm",
              "smallest s", "largest logit", "val. accuracy", "first non-finite"]  # fmt: skip

    def key(path: Path) -> tuple:
        variant, _, sigma = path.stem.rpartition("-sigma")
        return float(sigma), list(VARIANTS).index(variant)

    paths = sorted(folder.glob("*.csv"), key=key)
    return markdown_table(header, [_step_row(p) for p in paths])


def _run_row(run: Path, clean: dict[tuple, float]) -> list[str]:
    config = read_json(run / CONFIG)
    task = (config["model"], DATA[Path(config["data_dir"]).name])
    if not (run / METRICS).exists():
        error = (run / ERROR).read_text().splitlines()[0] if (run / ERROR).exists() else ""
        state = f"failed: {error}" if error else "not finished"
        return [*task, config["method"], "", "", state, "", "", ""]
    metrics = read_json(run / METRICS)
    history = list(csv.DictReader((run / HISTORY).open()))
    acc = metrics["test_accuracy"]
    moment = config["method"] == "moment"
    return [
        *task,
        config["method"],
        f"{config['sigma']:g}" if moment else "",
        config["moment_weighting"] if moment else "",
        f"{acc:.2f}",
        f"{100 * acc / clean[task]:.0f}%" if task in clean else "",
        f"{metrics['gnr']:.2f}",
        ", ".join(f"{float(r['val_accuracy']):.2f}" for r in history)
        + (" (collapsed)" if any(r.get("collapsed") == "True" for r in history) else ""),
    ]


def runs_table(folder: Path) -> str:
    runs = sorted(p for p in folder.iterdir() if (p / CONFIG).exists())
    configs = {run: read_json(run / CONFIG) for run in runs}
    clean = {
        (c["model"], DATA[Path(c["data_dir"]).name]): read_json(run / METRICS)["test_accuracy"]
        for run, c in configs.items()
        if c["method"] == "clean" and (run / METRICS).exists()
    }
    runs.sort(key=lambda r: (configs[r]["model"], configs[r]["method"] != "clean",
                             configs[r]["sigma"]))  # fmt: skip
    header = ["model", "data", "method", "sigma", "weighting", "test accuracy", "of clean's",
              "GNR", "val. accuracy per epoch"]  # fmt: skip
    return markdown_table(header, [_run_row(run, clean) for run in runs])


def blocks(results: Path) -> dict[str, str]:
    """docs/cifar.md's blocks of the recipes on a CPU."""
    return {
        "recipes-steps": steps_table(results / STEPS),
        "recipes-runs": runs_table(results / RUNS),
    }
