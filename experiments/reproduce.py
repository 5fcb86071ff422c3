r"""Reproduce the paper's central MNIST claim with our code, and write docs/reproduction.md.

    python experiments/reproduce.py --mnist-dir ../shared/datasets/mnist \
        --fashion-dir /usr/share/datasets/fashion-mnist [--device cuda --workers 8]

Stages, each resumable (rerun the same command after a crash):
  1. the sweeps experiments/mnist-lenet.toml and experiments/fashion-lenet.toml into --runs;
  2. on MNIST, the six attacks on the first --attack-images test images for the fair-comparison
     winner of each method (clean, moment, augment, noise);
  3. every finished run's config, metrics, attacks and history copied to docs/results/reproduction/
     (checkpoints stay in --runs);
  4. docs/reproduction.md and its figures, from those copies alone.
``--stages doc`` runs stage 4 alone, from the committed copies.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study import (
    PAPER,
    ROOT,
    attack_commands,
    attack_table,
    attack_winners,
    data_dirs,
    export,
    image_counts,
    method_order,
    parse_stages,
    provenance,
    run_jobs,
    study_parser,
    task_figures,
)

from momentreg.evaluation.attacks import ATTACK_LABELS, ATTACKS
from momentreg.runs import report
from momentreg.runs.rundir import ATTACKS_FILE, read_json
from momentreg.runs.sweep import load_spec, sweep
from momentreg.tables import markdown_table

TASKS = {  # name -> (spec, dataset label)
    "mnist-lenet": (ROOT / "experiments" / "mnist-lenet.toml", "MNIST"),
    "fashion-lenet": (ROOT / "experiments" / "fashion-lenet.toml", "Fashion-MNIST"),
}
STAGES = ("train", "attack", "export", "doc")


def run_sweeps(runs: Path, data_dirs: dict, device: str, workers: int, settings: dict) -> None:
    """Both sweeps at once, each with up to ``workers`` trainings in parallel."""

    def one(task: str) -> tuple[str, dict]:
        spec = {**load_spec(str(TASKS[task][0])), "data_dir": str(data_dirs[task])}
        spec.update(device=device, **settings)
        return task, sweep(spec, runs / task, workers=workers, progress=False)

    with ThreadPoolExecutor(len(TASKS)) as pool:
        for task, counts in pool.map(one, TASKS):
            print(f"{task}: {counts}", flush=True)
            if counts["failed"]:
                status = f"momentreg sweep status {runs / task}"
                sys.exit(f"{task}: {counts['failed']} runs failed: {status}")


def run_attacks(runs: Path, images: dict[str, int], device: str) -> None:
    """The attacks on each MNIST winner, the winners in parallel."""
    rows = report.collect(runs / "mnist-lenet")
    winners = attack_winners(rows).values()
    jobs = [
        attack_commands(runs / "mnist-lenet" / "runs" / r["run"], images, device) for r in winners
    ]
    run_jobs(jobs, len(jobs))


# -- the document ---------------------------------------------------------------------------------


def _spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f}, {len(values)} seeds)"


def _settings(spec: dict) -> str:
    keys = ("model", "epochs", "lr", "batch_size")
    return ", ".join(f"{k.replace('_', ' ')} {spec[k]}" for k in keys if k in spec)


def _find(rows, method, **fields) -> list[dict]:
    return [r for r in rows if r["method"] == method and all(r[k] == v for k, v in fields.items())]


def _task_section(task: str, rows: list[dict], attacks_images, figures: Path) -> list[str]:
    spec_path, label = TASKS[task]
    spec = load_spec(str(spec_path))
    fair = report.fair_comparison(rows, 0.0)
    sel = fair["selected"]
    fair_title = f"most robust run per group with accuracy >= clean mean {fair['threshold']:.2f}"
    task_figures(rows, sel, figures, task, f"LeNet / {label}", fair_title)
    rel = figures.name
    md = [
        f"## {label}",
        "",
        f"Spec `{spec_path.relative_to(ROOT)}`: {_settings(spec)}; {len(rows)} runs.",
        "",
        "### All runs",
        "",
        report.runs_table(sorted(rows, key=method_order), names=False),
        "",
        f"![accuracy and GNR against training sigma]({rel}/{task}-vs-sigma.png)",
        "",
        "### Fair comparison",
        "",
        f"Runs compete when their test accuracy is at least the mean clean accuracy "
        f"({fair['threshold']:.2f}); the most robust run of each group wins. Groups with no run "
        "that accurate are absent.",
        "",
        report.fair_table(sel),
        "",
        f"![fair comparison]({rel}/{task}-fair.png)",
        "",
        f"![consistency curves of the winners]({rel}/{task}-curves.png)",
        "",
    ]
    attacked = [r for r in rows if any(r[f"energy_{k}"] is not None for k in ATTACK_LABELS)]
    if attacked:
        clean = next((r for r in attacked if r["method"] == "clean"), None)
        md += [
            "### Minimal adversarial perturbations",
            "",
            "Mean energy (mean squared perturbation per pixel) over those of the first "
            f"{image_counts(attacks_images)} test images that the model classifies correctly, "
            "for the fair-comparison winner of each method (`momentreg evaluate RUN --attacks "
            "...`); in brackets the ratio to the clean model.",
            "",
            attack_table(attacked, clean),
            "",
        ]
    return md


def _mean_of(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _range(rows: list[dict], key: str) -> float:
    return max(r[key] for r in rows) - min(r[key] for r in rows)


def _energy_ratios(rows: list[dict], method: str) -> dict[str, float]:
    """Attack label -> energy of the attacked ``method`` run over that of the attacked clean run."""
    attacked = {r["method"]: r for r in rows if r["energy_pgd"] is not None}
    if "clean" not in attacked or method not in attacked:
        return {}
    a, c = attacked[method], attacked["clean"]
    return {
        ATTACK_LABELS[k]: a[f"energy_{k}"] / c[f"energy_{k}"]
        for k in ATTACK_LABELS
        if a[f"energy_{k}"] and c[f"energy_{k}"]
    }


# The rules of the verdicts, shared by the verdict table and the conclusions' headlines.
PAPER_GAIN = 97.32 - 77.45  # the paper's GNR gain of the regularizer at sigma 1 over clean
PAR_POINTS = 1.0  # "on par" with 21-fold augmentation: within this many GNR points, or better
GROWTH = 100  # "up to two orders of magnitude" larger minimal perturbations


def _word(holds: bool) -> str:
    return "reproduced" if holds else "not reproduced"


def _verdicts(rows: list[dict]) -> list[str]:
    """The paper's claims, each checked against our MNIST runs by the rule in its verdict."""
    clean, m1 = _find(rows, "clean"), _find(rows, "moment", sigma=1.0, alpha=1.0)
    clean_acc, m1_acc = _mean_of(clean, "test_accuracy"), _mean_of(m1, "test_accuracy")
    clean_gnr, m1_gnr = _mean_of(clean, "gnr"), _mean_of(m1, "gnr")
    spread = max(_range(clean, "test_accuracy"), _range(m1, "test_accuracy"))
    if m1_acc >= clean_acc:
        acc_verdict = "reproduced"
    elif clean_acc - m1_acc <= spread:
        acc_verdict = f"unresolved: the loss is within the seed-to-seed spread ({spread:.2f})"
    else:
        acc_verdict = "not reproduced: the loss exceeds the seed-to-seed spread"
    lines = [
        "| claim (paper) | ours (means over seeds) | verdict |",
        "|---|---|---|",
        f"| the regularizer at sigma 1.0 is more robust than clean (GNR 97.32 vs 77.45) | "
        f"GNR {m1_gnr:.2f} vs {clean_gnr:.2f} ({m1_gnr - clean_gnr:+.2f}) | "
        f"{'reproduced' if m1_gnr > clean_gnr else 'not reproduced'}, a "
        f"{'smaller' if m1_gnr - clean_gnr < PAPER_GAIN else 'larger'} gain than the "
        "paper's |",
        f"| ... without losing clean accuracy (99.00 vs 98.50) | "
        f"accuracy {m1_acc:.2f} vs {clean_acc:.2f} ({m1_acc - clean_acc:+.2f}) | {acc_verdict} |",
    ]
    aug21 = _find(rows, "augment", folds=21)
    if aug21:
        best_moment = max(_find(rows, "moment"), key=lambda r: r["gnr"])
        a = aug21[0]
        gap = best_moment["gnr"] - a["gnr"]
        lines.append(
            f"| the regularizer is on par with 21-fold augmentation (Fig. 3a) | best moment "
            f"run ({report.describe(best_moment)}) GNR {best_moment['gnr']:.2f}; "
            f"{report.describe(a)} GNR {a['gnr']:.2f} | "
            f"{_word(gap >= -PAR_POINTS)} ({gap:+.2f} GNR points; "
            "rule: within 1 point or better) |"
        )
    ratios = _energy_ratios(rows, "moment")
    if ratios:
        top = max(ratios, key=ratios.get)
        lines.append(
            "| minimal adversarial perturbations grow by up to two orders of magnitude | "
            f"growth {min(ratios.values()):.1f}x to {ratios[top]:.1f}x ({top}) | "
            f"{_word(ratios[top] >= GROWTH)} (rule: 100x) |"
        )
    return lines


def _conclusions(mnist: list[dict], fashion: list[dict]) -> list[str]:
    """What the numbers say, in words; every figure is computed from the rows."""
    clean_acc = _mean_of(_find(mnist, "clean"), "test_accuracy")
    clean_gnr = _mean_of(_find(mnist, "clean"), "gnr")
    best_moment = max(_find(mnist, "moment"), key=lambda r: r["gnr"])
    augment = _find(mnist, "augment")
    beaten = [a for a in augment if a["gnr"] > best_moment["gnr"]]
    cheapest = min(augment, key=lambda r: r["folds"])
    noise = max(_find(mnist, "noise"), key=lambda r: r["test_accuracy"])
    gain = best_moment["gnr"] - clean_gnr
    robust = "reproduced" if gain > 0 else "not reproduced"
    robust += ", but smaller" if gain < PAPER_GAIN else ", and larger"
    aug21 = _find(mnist, "augment", folds=21)
    on_par = bool(aug21) and best_moment["gnr"] - aug21[0]["gnr"] >= -PAR_POINTS
    out = [
        "## What we conclude",
        "",
        f"- **Robustness gain: {robust}.** The regularizer raises GNR on MNIST "
        f"from {clean_gnr:.2f} (clean, mean of seeds) to {best_moment['gnr']:.2f} "
        f"({report.describe(best_moment)}), at {best_moment['test_accuracy']:.2f}% accuracy "
        f"against {clean_acc:.2f}%. Our moment GNR is close to the paper's 97.32; our clean "
        "baseline is far more robust than the paper's 77.45, so the gain shrinks. We think the "
        f"budget explains the baseline: {max(r['epochs'] for r in mnist)} epochs of Adam 1e-3 "
        "with best-validation selection, "
        "against Adam 1e-4 to convergence; a longer run would tell (`--set epochs=100 --set "
        "lr=1e-4 --set batch_size=1000` on the sweep).",
        f"- **On par with N-fold augmentation: {_word(on_par)}.** {len(beaten)} of "
        f"{len(augment)} augmentation runs are more robust than the best moment run, among them "
        f"the cheapest ({report.describe(cheapest)}: GNR {cheapest['gnr']:.2f} at "
        f"{cheapest['test_accuracy']:.2f}%), whose epoch costs about as much as a moment epoch "
        "(2 passes; see docs/performance.md for measured step costs).",
        f"- **Against the recipe users know:** Cohen-style noise training "
        f"({report.describe(noise)}) reaches GNR {noise['gnr']:.2f} at "
        f"{noise['test_accuracy']:.2f}% for the cost of clean training.",
    ]
    ratios = _energy_ratios(mnist, "moment")
    if ratios:
        aug = _energy_ratios(mnist, "augment")
        out.append(
            f"- **Adversarial perturbations: {_word(max(ratios.values()) >= GROWTH)}.** The "
            "minimal perturbations of "
            f"the moment model are {min(ratios.values()):.1f}x to {max(ratios.values()):.1f}x "
            "those of the clean model, not up to 100x"
            + (
                f"; the augmentation winner's are {min(aug.values()):.1f}x to "
                f"{max(aug.values()):.1f}x."
                if aug
                else "."
            )
            + " We cannot tell from the paper which attack budgets its figures used; ours are "
            "listed in `momentreg evaluate --help`."
        )
    if fashion:
        f_clean = _find(fashion, "clean")
        fc_acc, fc_gnr = _mean_of(f_clean, "test_accuracy"), _mean_of(f_clean, "gnr")
        robust = [r for r in sorted(fashion, key=method_order) if r["method"] != "clean"]
        line = "- **Fashion-MNIST** (never in the paper), against clean "
        line += f"(GNR {fc_gnr:.2f}, {fc_acc:.2f}%): " + "; ".join(
            f"{report.describe(r)}: GNR {r['gnr'] - fc_gnr:+.2f}, accuracy "
            f"{r['test_accuracy'] - fc_acc:+.2f}"
            for r in robust
        )
        if not any(r["test_accuracy"] >= fc_acc for r in robust):
            line += ". No robust run keeps the clean accuracy, so the fair comparison has only "
            line += "the clean run"
        out.append(line + ".")
    return out + [""]


def write_doc(results: Path, doc: Path) -> None:
    """doc (Markdown) and its figures in doc's folder/<doc stem>/, from the files in results."""
    figures = doc.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    sections, mnist_rows, fashion_rows = [], [], []
    for task in TASKS:
        if not (results / task).is_dir():
            continue
        rows = report.collect(results / task)
        images = {}  # attack -> test images it ran on
        for r in rows:
            path = results / task / r["run"] / ATTACKS_FILE
            attacks = read_json(path) if path.exists() else {}
            images.update({a: v["test_images"] for a, v in attacks.items()})
        sections += _task_section(task, rows, images, figures)
        if task == "mnist-lenet":
            mnist_rows = rows
        else:
            fashion_rows = rows
    clean = _find(mnist_rows, "clean")
    m1 = _find(mnist_rows, "moment", sigma=1.0, alpha=1.0)
    md = [
        *provenance(results, "Reproducing the paper's central claim on real MNIST"),
        "## Setting",
        "",
        "- LeNet as in the paper (conv 32-64, fc 1024), the official MNIST files (60,000 train, "
        "10,000 test); 10% of the training set is held out for validation, early stopping and the "
        "learning-rate schedule.",
        "- Budget: a fixed number of epochs of Adam at lr 1e-3 (batch 128) for every method, "
        "instead of the paper's Adam 1e-4 to convergence; the best-validation epoch is kept.",
        "- GNR: 30 noise levels in [0, 0.5], noise of norm sigma*sqrt(784) on all 10,000 test "
        "images, one draw per image and level.",
        "- Methods: `clean`; `moment` (the paper's regularizer, CE(f(x)) + alpha CE(E[f(x+n)]) "
        "with the first-layer analytic mean); `augment` (the paper's N-fold augmentation: every "
        "image plus N-1 noisy copies per epoch, so an epoch costs N clean epochs); `noise` "
        "(Cohen et al. 2019: every step sees freshly noised images, same cost as clean).",
        "",
        "## Paper against ours",
        "",
        markdown_table(
            ["run", "paper ACC", "paper GNR", "our ACC", "our GNR"],
            [
                ["clean", *PAPER["clean"], _spread(clean, "test_accuracy"), _spread(clean, "gnr")],
                [
                    "moment sigma=1.0 alpha=1",
                    *PAPER["moment sigma=1.0"],
                    _spread(m1, "test_accuracy"),
                    _spread(m1, "gnr"),
                ],
            ],
        ),
        "",
        *_verdicts(mnist_rows),
        "",
        *_conclusions(mnist_rows, fashion_rows),
        "Training seconds below are wall-clock times with all runs sharing one machine at "
        "once, not a measure of cost; `python -m benchmarks` measures step costs.",
        "",
        *sections,
    ]
    doc.write_text("\n".join(md) + "\n")
    print(f"wrote {doc} and {figures}/*.png")


def main() -> None:
    p = study_parser(__doc__, "reproduction", workers=1)
    p.add_argument("--attack-images", type=int, default=400)
    p.add_argument("--lbfgs-images", type=int, help="L-BFGS on fewer images (default: all)")
    args, stages = parse_stages(p, STAGES)
    if "train" in stages:
        dirs = data_dirs(
            p,
            args,
            {
                "mnist-lenet": ("--mnist-dir", args.mnist_dir),
                "fashion-lenet": ("--fashion-dir", args.fashion_dir),
            },
        )
        run_sweeps(args.runs, dirs, args.device, args.workers, dict(args.set))
    if "attack" in stages:
        images = {a: args.attack_images for a in ATTACKS}
        images["lbfgs"] = args.lbfgs_images or args.attack_images
        run_attacks(args.runs, images, args.device)
    if "export" in stages:
        export(args.runs, args.results, TASKS)
    if "doc" in stages:
        write_doc(args.results, args.doc)


if __name__ == "__main__":
    main()
