"""What the study scripts in experiments/ share: the fair-comparison winners, jobs of
``momentreg`` commands, the record of where runs were made, the export of their small files, the
page head and the attack table, and the command-line options and stages every study has.

A study script (reproduce.py, beyond.py, cifar.py) imports this module, never another script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from momentreg import tables
from momentreg.evaluation.attacks import ATTACK_LABELS
from momentreg.runs import report
from momentreg.runs.plots import plot_consistency
from momentreg.runs.run import environment
from momentreg.runs.rundir import (
    ATTACKS_FILE,
    CERTIFY_FILE,
    CERTIFY_TSVS,
    CONFIG,
    ERROR,
    HISTORY,
    METRICS,
    TIGHTNESS_FILE,
    read_json,
    write_json,
)
from momentreg.runs.sweep import child_env, load_spec, parse_setting
from momentreg.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
# A run's small files, exported beside the study page (checkpoints stay with the runs).
COPIED = (CONFIG, METRICS, ATTACKS_FILE, CERTIFY_FILE, HISTORY, TIGHTNESS_FILE)
# Paper (Table 1, LeNet on MNIST): (accuracy, GNR) of clean and of the regularizer at sigma 1.0,
# alpha 1.
PAPER = {"clean": (98.50, 77.45), "moment sigma=1.0": (99.00, 97.32)}
METHOD_RANK = {"clean": 0, "moment": 1, "augment": 2, "noise": 3}


def fmt(value, spec=".2f") -> str:
    """A number for a table; "n/a" where there is none."""
    return tables.fmt(value, spec) or "n/a"


def method_order(row: dict):
    """Sort key of runs in the study tables: method, N, sigma, alpha, seed."""
    return METHOD_RANK[row["method"]], row["folds"], row["sigma"], row["alpha"], row["seed"]


def attack_winners(
    rows: list[dict], group=lambda r: r["method"], tolerance: float = 0.0
) -> dict[str, dict]:
    """group (default: method) -> the run that the fair comparison picks (highest GNR at >= clean
    accuracy - tolerance); a group with no run that accurate is represented by its most accurate
    run."""
    chosen = report.fair_comparison(rows, tolerance, group=group)["selected"]
    for name in {group(r) for r in rows} - set(chosen):
        runs = [r for r in rows if group(r) == name]
        chosen[name] = max(runs, key=lambda r: r["test_accuracy"])
    return chosen


def attack_commands(
    run: Path, images: dict[str, int], device: str, test_size: int | None = None
) -> list[list[str]]:
    """The ``momentreg evaluate --attacks`` commands that ``run`` still needs (``images``: attack ->
    test images); attacks already done on that many images are skipped. With ``test_size`` the
    images are every (test_size // n)-th of the test set (class-balanced on a sorted folder)."""
    done = read_json(run / ATTACKS_FILE) if (run / ATTACKS_FILE).exists() else {}
    todo = defaultdict(list)
    for attack, n in images.items():
        if done.get(attack, {}).get("test_images") != n:
            todo[n].append(attack)
    return [
        [sys.executable, "-m", "momentreg", "evaluate", str(run), "--quiet"]
        + ["--attacks", ",".join(attacks), "--limit", str(n), "--device", device]
        + ([] if test_size is None else ["--stride", str(max(1, test_size // n))])
        for n, attacks in todo.items()
    ]


def certify_command(
    run: Path, device: str, smoothing: dict, n: int, images: int, test_size: int, batch=10_000
):
    """``momentreg evaluate RUN --certify`` argv: CERTIFY at ``smoothing`` (sigma, n0, alpha) with
    ``n`` samples on every (test_size // images)-th of ``images`` test images, ``batch`` noisy
    copies per forward pass."""
    s = smoothing
    return (
        [sys.executable, "-m", "momentreg", "evaluate", str(run), "--quiet", "--device", device]
        + ["--certify", "--batch", str(batch), "--sigma", str(s["sigma"]), "--n0", str(s["n0"])]
        + ["--n", str(n), "--failure-probability", str(s["alpha"])]
        + ["--limit", str(images), "--stride", str(max(1, test_size // images))]
    )


def tightness_command(run: Path, device: str, sigma: float, images: int, samples: int):
    """``momentreg tightness RUN`` argv: the analytic expected logits against a Monte Carlo mean of
    ``samples`` draws, at ``sigma`` on the first ``images`` test images (tightness.json)."""
    return [
        sys.executable,
        "-m",
        "momentreg",
        "tightness",
        str(run),
        "--quiet",
        "--device",
        device,
    ] + ["--sigmas", f"{sigma:g}", "--limit", str(images), "--mc-samples", str(samples)]


def run_jobs(jobs: list[list[list[str]]], workers: int) -> None:
    """Each job is a list of commands run in turn; up to ``workers`` jobs at once, sharing the
    CPU cores between them."""
    workers = max(1, min(workers, len(jobs)))
    env = child_env(max(1, (os.cpu_count() or 1) // workers))

    def run_job(commands):
        for argv in commands:
            subprocess.run(argv, env=env, check=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_job, jobs))


def record_environment(runs: Path, command: str) -> None:
    """Where and how the runs are made: exported beside their metrics. A command that resumes
    the runs with other options is added as a line of its own to command.txt."""
    runs.mkdir(parents=True, exist_ok=True)
    add_commands(runs / "command.txt", [command])
    write_json(runs / "environment.json", environment())


def add_commands(path: Path, commands: list[str]) -> None:
    """Append to the command.txt at ``path`` each of ``commands`` it does not hold yet."""
    before = path.read_text().splitlines() if path.exists() else []
    new = [c for c in dict.fromkeys(commands) if c not in before]
    if new:
        path.write_text("".join(line + "\n" for line in [*before, *new]))


def cell(run: str) -> str:
    """A run folder's name without its config hash: the study's cell it fills (method, sigma,
    weight, budget; sweep.run_dir_name)."""
    return run.rsplit("-", 1)[0]


def export(runs: Path, results: Path, tasks) -> None:
    """Copy the small files of every finished run (COPIED and its per-image certification TSVs),
    and the config and error.txt of every failed one, to results/<task>/<run>/, with the runs'
    command.txt and environment.json.

    Results hold one run per cell: an exported run replaces an earlier one of its cell made with
    other settings (another config hash), which is said. A partial rerun thus adds to the results
    of the first: while any earlier run remains, command.txt gains the new commands and
    environment.json stays the earlier one (each run records where it was made in its
    metrics.json)."""
    kept_before = False
    for task in tasks:
        root = runs / task / "runs"
        exported = {}
        for run in sorted(root.iterdir()) if root.is_dir() else []:
            if (run / METRICS).exists():
                exported[run] = [run / name for name in COPIED] + sorted(run.glob(CERTIFY_TSVS))
            elif (run / ERROR).exists():
                exported[run] = [run / CONFIG, run / ERROR]  # a failed run: why it failed
        names = {run.name for run in exported}
        cells = {cell(name) for name in names}
        folder = results / task
        for old in sorted(folder.iterdir()) if folder.is_dir() else []:
            if old.name in names:
                continue
            if cell(old.name) in cells:
                shutil.rmtree(old)
                print(f"replaced {task}/{old.name}: a run of its cell with other settings is new")
            else:
                kept_before = True
        for run, paths in exported.items():
            dest = folder / run.name
            dest.mkdir(parents=True, exist_ok=True)
            for path in paths:
                if path.exists():
                    shutil.copy2(path, dest / path.name)
    results.mkdir(parents=True, exist_ok=True)
    if kept_before and (results / "environment.json").exists():  # a partial rerun: add to it
        add_commands(results / "command.txt", (runs / "command.txt").read_text().splitlines())
    else:
        for name in ("command.txt", "environment.json"):
            shutil.copy2(runs / name, results / name)


def image_counts(images: dict[str, int]) -> str:
    """'400' or '400 (LBF: 100)': the usual count, and the attacks that ran on another."""
    common = max(set(images.values()), key=list(images.values()).count)
    others = [f"{ATTACK_LABELS[a]}: {n}" for a, n in images.items() if n != common]
    return f"{common}" + (f" ({', '.join(others)})" if others else "")


def energy_cell(row: dict, clean: dict | None, key: str) -> str:
    value = row[f"energy_{key}"]
    if value is None:
        return "n/a"
    if clean is None or row is clean or not clean[f"energy_{key}"]:
        return f"{value:.3g}"
    return f"{value:.3g} ({value / clean[f'energy_{key}']:.1f}x)"


def attack_table(rows: list[dict], clean: dict | None) -> str:
    """Table 1's layout: per run the mean energy of each attack (with its ratio to ``clean``),
    then GNR and accuracy."""
    return markdown_table(
        ["run", *ATTACK_LABELS.values(), "GNR", "ACC"],
        [
            [
                report.describe(r),
                *[energy_cell(r, clean, k) for k in ATTACK_LABELS],
                fmt(r["gnr"]),
                fmt(r["test_accuracy"]),
            ]
            for r in sorted(rows, key=method_order)
        ],
    )


def made_with(results: Path) -> str:
    """Where the runs in ``results`` were made: the commands (command.txt) and the machine
    (environment.json), as a table."""
    env = read_json(results / "environment.json")
    commands = (results / "command.txt").read_text().split("\n")
    hardware = env["gpu"] or f"{env['cpus']} CPU cores"
    return markdown_table(
        ["command", "machine", "torch", "Python", "date"],
        [[f"`{c}`", hardware, env["torch"], env["python"], env["date"]] for c in commands if c],
    )


def spec_table(specs: dict[str, Path], keys=("model", "epochs", "lr", "batch_size")) -> str:
    """The settings every run of each spec shares (name -> spec file)."""
    rows = []
    for name, path in specs.items():
        spec = load_spec(str(path))
        settings = ", ".join(f"{k.replace('_', ' ')} {spec[k]}" for k in keys if k in spec)
        rows.append([name, f"`{path.relative_to(ROOT)}`", settings])
    return markdown_table(["task", "spec", "settings"], rows)


def study_parser(doc: str, name: str, workers: int) -> argparse.ArgumentParser:
    """The options every study script shares; ``name`` names its runs, results and doc."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mnist-dir", type=Path, help="the official MNIST files (train stage)")
    p.add_argument("--fashion-dir", type=Path, help="the official Fashion-MNIST files")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / name, help="the run folders")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--workers", type=int, default=workers, help="trainings (evaluations) at once")
    p.add_argument(
        "--results", type=Path, default=ROOT / "docs/results" / name, help="the exported results"
    )
    p.add_argument("--doc", type=Path, default=ROOT / f"docs/{name}.md", help="the page written")
    p.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec setting in every sweep (for smoke tests: --set epochs=1)",
    )
    return p


def parse_stages(p: argparse.ArgumentParser, stages: tuple[str, ...]):
    """(args, the chosen stages) with a --stages option."""
    p.add_argument(
        "--stages",
        default=",".join(stages),
        help="comma-separated subset; --stages doc rewrites the page from the committed files",
    )
    args = p.parse_args()
    chosen = set(args.stages.split(","))
    if chosen - set(stages):
        p.error(f"--stages: choose from {','.join(stages)}")
    return args, chosen


def data_dirs(p: argparse.ArgumentParser, args, given: dict) -> dict[str, Path]:
    """The train stage's start: task -> data directory (``given``: task -> (option, path)); a
    missing one is a usage error naming it. Then the whole command (without --stages: the command
    that makes everything) and the machine are recorded in RUNS/command.txt and
    environment.json."""
    missing = sorted({option for option, path in given.values() if path is None})
    if missing:
        p.error(f"training needs {' and '.join(missing)}")
    argv = sys.argv[1:]
    if "--stages" in argv:
        del argv[argv.index("--stages") : argv.index("--stages") + 2]
    script = Path(sys.argv[0]).name
    record_environment(args.runs, f"python experiments/{script} " + " ".join(argv))
    return {task: path for task, (_, path) in given.items()}


def task_figures(
    rows: list[dict], selected: dict, figures: Path, task: str, title: str, fair_title: str
) -> None:
    """A task's three figures in ``figures``: accuracy and GNR against sigma (every run), the
    fair comparison's winners (``selected``) and their GNR curves."""
    report.plot_vs_sigma(rows, figures / f"{task}-vs-sigma.png", title)
    report.plot_fair(selected, figures / f"{task}-fair.png", fair_title)
    plot_consistency(
        {report.describe(r): r["gnr_curve"] for r in selected.values()},
        figures / f"{task}-curves.png",
        f"fair-comparison winners, {title}",
    )
