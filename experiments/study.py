"""What the study scripts in experiments/ share: the sweeps of their tasks, the fair-comparison
winners and the ``momentreg`` commands that evaluate them, the export of the runs' small files
with the record of where they were made, the tables every page has, and the command-line options
and stages every study has. A study script imports this module, never another script.
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
from momentreg.runs.export import export_sweep
from momentreg.runs.plots import plot_consistency
from momentreg.runs.run import environment
from momentreg.runs.rundir import ATTACKS_FILE, read_json, write_json
from momentreg.runs.sweep import CertifyAfter, child_env, expand, parse_setting, sweep
from momentreg.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
# Paper (Table 1, LeNet on MNIST): (accuracy, GNR) of clean and of the regularizer at sigma 1.0,
# alpha 1.
PAPER = {"clean": (98.50, 77.45), "moment sigma=1.0": (99.00, 97.32)}
METHOD_RANK = {"clean": 0, "moment": 1, "augment": 2, "noise": 3}
MOMENTREG = [sys.executable, "-m", "momentreg"]


def fmt(value, spec=".2f") -> str:
    """A number for a table; "n/a" where there is none."""
    return tables.fmt(value, spec, missing="n/a")


def mean_of(rows: list[dict], key: str) -> float:
    """The mean of ``key`` over ``rows`` (seeds of one setting)."""
    return sum(r[key] for r in rows) / len(rows)


def method_order(row: dict):
    """Sort key of runs in the study tables: method, N, sigma, alpha, seed."""
    return METHOD_RANK[row["method"]], row["folds"], row["sigma"], row["alpha"], row["seed"]


def sweep_tasks(specs: dict, runs: Path, dirs: dict, args, at_once: bool, strict=True, **options):
    """The sweep of each task's spec (``specs``: task -> spec) into runs/<task> with its data
    directory (``dirs``), the device and --set settings of ``args``, --workers runs at once (0:
    all of them); the tasks all at once or one after another. ``options``: more of ``sweep``'s
    (``then``, ``deadline``, ``workers``). ``strict``: exit where a run failed."""

    def one(task: str) -> tuple[str, dict]:
        spec = {**specs[task], "data_dir": str(dirs[task]), "device": args.device, **dict(args.set)}
        kwargs = {"workers": args.workers or len(expand(spec)), "progress": False, **options}
        return task, sweep(spec, runs / task, **kwargs)

    with ThreadPoolExecutor(len(dirs) if at_once else 1) as pool:
        for task, counts in pool.map(one, dirs):
            print(f"{task}: {counts}", flush=True)
            if strict and counts["failed"]:
                sys.exit(f"{task}: {counts['failed']} runs failed; momentreg sweep status {task}")


def attack_winners(rows: list[dict], group=lambda r: r["method"], tolerance=0.0) -> dict:
    """group (default: method) -> the run that the fair comparison picks (highest GNR at >= clean
    accuracy - tolerance); a group with no run that accurate is represented by its most accurate
    run."""
    chosen = report.fair_comparison(rows, tolerance, group=group)["selected"]
    for name in {group(r) for r in rows} - set(chosen):
        chosen[name] = max((r for r in rows if group(r) == name), key=lambda r: r["test_accuracy"])
    return chosen


def attack_commands(run: Path, images: dict[str, int], device: str, test_size=None) -> list:
    """The ``momentreg evaluate --attacks`` commands that ``run`` still needs (``images``: attack ->
    test images); attacks already done on that many images are skipped. With ``test_size`` the
    images are every (test_size // n)-th of the test set (class-balanced on a sorted folder)."""
    done = read_json(run / ATTACKS_FILE) if (run / ATTACKS_FILE).exists() else {}
    todo = defaultdict(list)
    for attack, n in images.items():
        if done.get(attack, {}).get("test_images") != n:
            todo[n].append(attack)
    return [
        [*MOMENTREG, "evaluate", str(run), "--quiet", "--attacks", ",".join(attacks)]
        + ["--limit", str(n), "--device", device]
        + ([] if test_size is None else ["--stride", str(max(1, test_size // n))])
        for n, attacks in todo.items()
    ]


def certify_command(run: Path, device: str, sigma: float, n: int, images: int, **more) -> list:
    """``momentreg evaluate RUN --certify`` at ``sigma`` (n0 100, alpha 0.001), ``n`` samples
    on ``images`` test images, on ``device``; ``more``: ``CertifyAfter``'s ``stride`` and
    ``batch``: the command a sweep's ``--then certify`` runs."""
    then = CertifyAfter(sigma=sigma, limit=images, n=n, device=device, **more)
    return [*MOMENTREG, *then.argv(run)]


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


def add_commands(path: Path, commands: list[str]) -> None:
    """Append to the command.txt at ``path`` each of ``commands`` it does not hold yet."""
    before = path.read_text().splitlines() if path.exists() else []
    new = [c for c in dict.fromkeys(commands) if c not in before]
    if new:
        path.write_text("".join(line + "\n" for line in [*before, *new]))


def export(runs: Path, results: Path, tasks) -> None:
    """``export_sweep`` of each task's runs to results/<task>/ (checkpoints stay in ``runs``),
    with the runs' command.txt and environment.json. While runs of an earlier export remain (a
    partial rerun), command.txt gains the new commands and environment.json stays the earlier
    one (each run records where it was made)."""
    kept_before = False
    for task in tasks:
        done = export_sweep(runs / task, results / task)
        for name in done.replaced:
            print(f"replaced {task}/{name}: a run of its cell with other settings is new")
        kept_before |= bool(done.kept)
    if kept_before and (results / "environment.json").exists():  # a partial rerun: add to it
        add_commands(results / "command.txt", (runs / "command.txt").read_text().splitlines())
    else:
        for name in ("command.txt", "environment.json"):
            shutil.copy2(runs / name, results / name)


def made_with(results: Path) -> str:
    """Where the runs in ``results`` were made: the commands (command.txt) and the machine
    (environment.json), as a table."""
    env = read_json(results / "environment.json")
    hardware = env["gpu"] or f"{env['cpus']} CPU cores"
    return markdown_table(
        ["command", "machine", "torch", "Python", "date"],
        [[f"`{c}`", hardware, env["torch"], env["python"], env["date"]]
         for c in (results / "command.txt").read_text().splitlines() if c],
    )  # fmt: skip


def attack_images(folder: Path, rows: list[dict]) -> str:
    """'400' or '400 (LBF: 100)': the usual number of test images the rows' attacks ran on,
    and the attacks that ran on another."""
    images = {}
    for r in rows:
        path = folder / r["run"] / ATTACKS_FILE
        images.update(
            {a: v["test_images"] for a, v in (read_json(path) if path.exists() else {}).items()}
        )
    if not images:
        return "none"
    common = max(set(images.values()), key=list(images.values()).count)
    others = [f"{ATTACK_LABELS[a]}: {n}" for a, n in images.items() if n != common]
    return f"{common}" + (f" ({', '.join(others)})" if others else "")


def attack_table(rows: list[dict], clean: dict | None) -> str:
    """Table 1's layout (``report.attack_table``), the runs in the tables' order."""
    return report.attack_table(sorted(rows, key=method_order), clean)


def task_figures(rows: list[dict], selected: dict, figures: Path, task: str, title: str, fair: str):
    """A task's three figures in ``figures``: accuracy and GNR against sigma (every run), the
    fair comparison's winners (``selected``; ``fair``: its title) and their GNR curves."""
    report.plot_vs_sigma(rows, figures / f"{task}-vs-sigma.png", title)
    report.plot_fair(selected, figures / f"{task}-fair.png", fair)
    curves = {report.describe(r): r["gnr_curve"] for r in selected.values()}
    plot_consistency(curves, figures / f"{task}-curves.png", f"fair-comparison winners, {title}")


def study_parser(doc: str, name: str, workers: int) -> argparse.ArgumentParser:
    """The options every study script shares; ``name`` names its runs and results."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mnist-dir", type=Path, help="the official MNIST files (train stage)")
    p.add_argument("--fashion-dir", type=Path, help="the official Fashion-MNIST files")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / name, help="the run folders")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--workers", type=int, default=workers, help="trainings (evaluations) at once")
    p.add_argument("--results", type=Path, default=ROOT / "docs/results" / name, help="exported")
    help = "override a spec setting in every sweep (smoke tests: --set epochs=1)"
    p.add_argument(
        "--set", type=parse_setting, action="append", default=[], metavar="K=V", help=help
    )
    return p


def parse_stages(p: argparse.ArgumentParser, stages: tuple[str, ...]):
    """(args, the chosen stages) with a --stages option."""
    help = "comma-separated subset; doc rewrites the page's tables from the committed files"
    p.add_argument("--stages", default=",".join(stages), help=help)
    args = p.parse_args()
    chosen = set(args.stages.split(","))
    if chosen - set(stages):
        p.error(f"--stages: choose from {','.join(stages)}")
    return args, chosen


def data_dirs(p: argparse.ArgumentParser, args, given: dict) -> dict[str, Path]:
    """Training's start: task -> data directory (``given``: task -> (option, path)); a missing one
    is a usage error naming it. Then the whole command (without --stages) and the machine are
    recorded in RUNS/command.txt and environment.json."""
    missing = sorted({option for option, path in given.values() if path is None})
    if missing:
        p.error(f"training needs {' and '.join(missing)}")
    argv = sys.argv[1:]
    if "--stages" in argv:
        del argv[argv.index("--stages") : argv.index("--stages") + 2]
    args.runs.mkdir(parents=True, exist_ok=True)
    add_commands(
        args.runs / "command.txt",
        [f"python experiments/{Path(sys.argv[0]).name} " + " ".join(argv)],
    )
    write_json(args.runs / "environment.json", environment())
    return {task: path for task, (_, path) in given.items()}
