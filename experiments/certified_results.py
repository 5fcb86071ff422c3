"""The certified study's exported results as rows, one per certified run: its config, cost and
metrics, with the ACR and certified accuracies computed from its per-image TSV; and the runs that
have no such row (one class predicted, not certified, not trained)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from certified_study import CLEAN_EPOCHS, RADII, SAMPLED, Study
from study import cell

from momentreg.evaluation.certify import (
    certified_accuracy,
    certified_radii,
    mean_and_se,
    read_tsv,
)
from momentreg.runs.rundir import CONFIG, HISTORY, METRICS, certify_tsv, read_json
from momentreg.runs.sweep import expand, load_spec, run_dir_name


def certified(tsv: list[dict]) -> dict:
    """ACR (radius of correct predictions, 0 elsewhere), its standard error, certified accuracy
    (%) at RADII, and each image's radius by test index (``radii``, for comparisons paired over
    the images), from a per-image certification table."""
    radii = certified_radii(tsv)
    acr, se = mean_and_se(list(radii.values()))
    return {
        "images": len(radii),
        "acr": acr,
        "se": se,
        "radii": radii,
        "at": certified_accuracy(tsv, RADII),
    }


def label(config: dict) -> str:
    """The method, and how its analytic expectation is made or its noisy copies counted where
    that is not the default: "macer-analytic (all layers)", "macer-analytic (1 noisy copy)",
    "macer (2 noisy copies)"."""
    notes = ["all layers"] if config.get("moment_depth") == "all" else []
    copies = config.get("samples", 0)
    if config["method"] in ("macer", "macer-analytic") and copies:
        notes.append(f"{copies} noisy {'copy' if copies == 1 else 'copies'}")
    if config.get("seed", 0):
        notes.append(f"seed {config['seed']}")
    return config["method"] + (f" ({', '.join(notes)})" if notes else "")


def val_losses(run: Path) -> list[float]:
    with open(run / HISTORY) as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f)]


def kept_epoch(metrics: dict) -> int:
    """The epoch whose weights the run ends with (runs before ``keep``: the best validation)."""
    return metrics.get("kept_epoch", metrics["best_epoch"])


def _kept(config: dict, metrics: dict) -> dict:
    """Which weights a run ends with: the epoch, of how many, the run's ``keep`` and the epochs
    its regularizer was off (alpha_delay)."""
    return {
        "kept_epoch": kept_epoch(metrics),
        "epochs": metrics["epochs"],
        "keep": config.get("keep", "best"),
        "delay": config.get("alpha_delay", 0),
    }


def budget(config: dict, unit: str) -> float:
    """What a run was given: seconds of training steps, clean epochs of compute, or epochs."""
    key = {"s": "time_budget", CLEAN_EPOCHS: "pass_budget"}.get(unit, "epochs")
    return config[key]


def methods_option(command: str) -> str | None:
    """The ``--methods`` value of a study command line (a partial rerun), or None."""
    words = command.split()
    for i, word in enumerate(words):
        if word.startswith("--methods="):
            return word.split("=", 1)[1]
        if word == "--methods" and i + 1 < len(words):
            return words[i + 1]
    return None


def batches(results: Path) -> dict[str, str]:
    """method -> the batch that made its runs: the ``--methods`` value of the last command in
    results/command.txt that names the method (a partial rerun), or "" (the full study's
    commands made it)."""
    made, commands = {}, results / "command.txt"
    for line in commands.read_text().splitlines() if commands.exists() else []:
        value = methods_option(line)
        if value:
            made.update(dict.fromkeys(value.split(","), value))
    return made


def load_rows(folder: Path, unit: str) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """One row per certified run of the first seed (seed 0), with its step cost; and (seed-0
    row, row of another seed) for each certified run of a seed other than 0 whose seed-0 run
    (same method, depth, copies and sigma) is certified too: at the same budget, or, for a run
    with a step budget, the one that took that many steps (the pair's second row then takes its
    budget). Every run is read once."""
    rows = _certified_rows(folder, unit)

    def first_seed_of(a, r):
        same = all(a[k] == r[k] for k in ("method", "depth", "copies", "sigma"))
        return same and (
            a["steps"] == r["step_budget"] if r["step_budget"] else a["budget"] == r["budget"]
        )

    first = [r for r in rows if not r["seed"]]
    pairs = []
    for r in (r for r in rows if r["seed"]):
        a = next((a for a in first if first_seed_of(a, r)), None)
        if a is not None:
            pairs.append((a, {**r, "budget": a["budget"]}))
    return with_step_cost(first), pairs


def _certified_rows(folder: Path, unit: str) -> list[dict]:
    made = batches(folder.parent)
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
                "depth": config.get("moment_depth", "first"),
                "copies": config.get("samples", 0),
                "seed": config.get("seed", 0),
                "sigma": config["sigma"],
                "budget": budget(config, unit),
                "step_budget": config.get("step_budget", 0),
                "pass_budget": config.get("pass_budget", 0),
                "batch": made.get(config["method"], ""),
                "environment": metrics.get("environment"),
                "seconds": metrics["step_seconds"],
                "steps": metrics["steps"],
                **_kept(config, metrics),
                "seconds_per_step": metrics["step_seconds"] / metrics["steps"],
                "passes": metrics["passes_per_image"],
                "compute": images_seen * metrics["passes_per_image"],  # clean image-passes
                "val_losses": val_losses(run),
                "accuracy": metrics["test_accuracy"],
                "gnr": metrics["gnr"],
                **certified(read_tsv(tsv)),
            }
        )
    _refuse_twins(rows, folder)
    return rows


def _refuse_twins(rows: list[dict], folder: Path) -> None:
    """Stop where two runs share method, sigma and budget (say an earlier study's runs left in
    the results beside a rerun's with other settings): the page would set either against the
    other methods."""
    seen = {}
    for r in rows:
        key = (r["label"], r["sigma"], r["budget"], r["step_budget"])
        if key in seen:
            sys.exit(
                f"{folder} holds two runs of {r['label']} at sigma {r['sigma']:g}, budget "
                f"{r['budget']:g}: {seen[key]} and {r['run']}; remove the stale one (or the "
                "folder, and export again)"
            )
        seen[key] = r["run"]


def row_order(row: dict) -> tuple:
    analytic = row["method"] not in SAMPLED
    return (row["sigma"], analytic, row["label"], row["budget"])


def with_step_cost(rows: list[dict]) -> list[dict]:
    """Each row with ``step_cost``: its seconds per step over those of noise training made in the
    same batch (the runs beside it) at the same sigma and budget, or at the largest budget noise
    training has there (None without one)."""
    noise = {
        (r["batch"], r["sigma"], r["budget"]): r["seconds_per_step"]
        for r in rows
        if r["method"] == "noise"
    }
    for r in rows:
        at = (r["batch"], r["sigma"])
        budgets = [b for *key, b in noise if tuple(key) == at]
        base = noise.get((*at, r["budget"])) or (noise[(*at, max(budgets))] if budgets else None)
        r["step_cost"] = r["seconds_per_step"] / base if base else None
    return rows


def left_out_runs(folder: Path, unit: str) -> tuple[list[str], dict[float, set]]:
    """The runs that predict one class: a line each, and their methods per sigma."""
    lines, methods = [], {}
    for run in sorted(folder.iterdir()):
        metrics = read_json(run / METRICS) if (run / METRICS).exists() else {}
        if metrics.get("constant_predictions"):
            config = read_json(run / CONFIG)
            methods.setdefault(config["sigma"], set()).add(config["method"])
            lines.append(
                f"{label(config)} at sigma {config['sigma']:g}, {budget(config, unit):g} {unit} "
                f"({metrics['steps']} steps, accuracy {metrics['test_accuracy']:.2f}%)"
            )
    return lines, methods


def uncertified_runs(folder: Path) -> list[dict]:
    """Each run that trained and predicts more than one class but has no certification at its
    sigma (a study cut short by its deadline): label, method, sigma, accuracy, GNR and which
    weights it keeps."""
    found = []
    for run in sorted(folder.iterdir()):
        if (run / METRICS).exists():
            config, metrics = read_json(run / CONFIG), read_json(run / METRICS)
            tsv = run / certify_tsv(config["sigma"])
            if not metrics.get("constant_predictions") and not tsv.exists():
                found.append(
                    {
                        "label": label(config),
                        "method": config["method"],
                        "sigma": config["sigma"],
                        "accuracy": metrics["test_accuracy"],
                        "gnr": metrics["gnr"],
                        **_kept(config, metrics),
                    }
                )
    return found


def untested(waiting: list[dict]) -> dict[float, set]:
    """sigma -> the methods trained there but not certified (``waiting``: uncertified_runs)."""
    methods = {}
    for r in waiting:
        methods.setdefault(r["sigma"], set()).add(r["method"])
    return methods


def missing_runs(study: Study, folder: Path, waiting: list[dict]) -> tuple[list[str], list[str]]:
    """The spec's runs with no certified result: those trained but not certified (``waiting``,
    with their clean accuracy, GNR and kept epoch), and those with no finished training; a line
    each."""
    uncertified = [
        f"{r['label']} at sigma {r['sigma']:g} (accuracy {r['accuracy']:.2f}%, GNR "
        f"{r['gnr']:.2f}, epoch kept {r['kept_epoch']} of {r['epochs']})"
        for r in waiting
    ]
    trained = {cell(d.name) for d in folder.iterdir() if (d / METRICS).exists()}
    untrained = [
        f"{label(c)} at sigma {c['sigma']:g}"
        + (f", {c['time_budget']:g} s" if c.get("time_budget") else "")
        for c in expand(load_spec(str(study.spec)))
        if cell(run_dir_name(c)) not in trained
    ]
    return uncertified, untrained
