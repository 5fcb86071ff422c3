r"""Beyond the paper: which training recipe buys the most robustness per unit of training
compute? Writes docs/beyond.md.

    python experiments/beyond.py --mnist-dir ../shared/datasets/mnist \
        --fashion-dir /usr/share/datasets/fashion-mnist [--workers 2]

Stages, each resumable (rerun the same command after a crash):
  1. train: experiments/beyond.toml on MNIST, then on Fashion-MNIST (never both at once: every run
     has a wall-clock budget, so the machine must carry the same load throughout);
  2. evaluate: at the largest budget, the six attacks and randomized-smoothing certification for
     the most robust run of each method group that keeps the clean run's accuracy;
  3. export: every finished run's config, metrics, attacks, certificates and history copied to
     docs/results/beyond/ (checkpoints stay in --runs);
  4. doc: docs/beyond.md's tables and figures, from those copies alone (pages.py).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from statistics import NormalDist

import pages
from matplotlib import colormaps
from matplotlib.figure import Figure
from study import (
    ROOT,
    attack_commands,
    attack_images,
    attack_winners,
    certify_command,
    data_dirs,
    export,
    fmt,
    made_with,
    parse_stages,
    run_jobs,
    study_parser,
    sweep_tasks,
)

from momentreg.evaluation.attacks import ATTACK_LABELS, ATTACKS
from momentreg.runs import report
from momentreg.runs.sweep import load_spec
from momentreg.tables import markdown_table

SPEC = ROOT / "experiments" / "beyond.toml"
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
STAGES = ("train", "evaluate", "export", "doc")
SMOOTHING_SIGMA = 0.25
# accuracy points a run may lose against the clean run of its budget and still compete; the
# headline rule is HEADLINE (GNR alone rewards a model that predicts one class everywhere)
TOLERANCES = (0.0, 1.0, 2.0, 5.0)
HEADLINE = 1.0
LEARNED = 50.0  # test accuracy (%) below which a run counts as not having learned


def _at(rows: list[dict], budget: float) -> list[dict]:
    return [r for r in rows if r["time_budget"] == budget]


def winners(rows: list[dict]) -> dict[str, dict]:
    """group -> the run that the headline rule picks at the largest budget."""
    top = _at(rows, max(r["time_budget"] for r in rows))
    return attack_winners(top, group=report.group_of, tolerance=HEADLINE)


def evaluate(runs: Path, args) -> None:
    """Attacks and certification of every dataset's winners, ``args.workers`` models at once."""
    images = {a: args.attack_images for a in ATTACKS} | {"lbfgs": args.lbfgs_images}
    sigma, jobs = f"{SMOOTHING_SIGMA:g}", []
    for dataset in args.datasets:
        for row in winners(report.collect(runs / dataset)).values():
            run = runs / dataset / "runs" / row["run"]
            commands = attack_commands(run, images, args.device)
            done = row["certify"].get(sigma, {})
            if (done.get("images"), done.get("n")) != (args.certify_images, args.certify_n):
                n, limit = args.certify_n, args.certify_images
                commands.append(certify_command(run, args.device, SMOOTHING_SIGMA, n, limit))
            jobs.append(commands)
    run_jobs(jobs, args.workers)


# -- the page's blocks ----------------------------------------------------------------------------

ANALYTIC = "moment"  # the groups whose name starts with it use the analytic expectation


def _order(group: str) -> tuple:
    rank = ["clean", "noise", "augment N=2", "augment N=6"]
    return (rank.index(group) if group in rank else len(rank), group)


def _by(rows: list[dict], key) -> dict[str, list[dict]]:
    """key(row) -> its rows, in the order of the groups (clean, noise, augment, moment...)."""
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (_order(report.group_of(r)), r["sigma"], r["seed"])):
        out.setdefault(key(r), []).append(r)
    return out


def label(row: dict) -> str:
    """One training recipe (all budgets): the run's description, and its seed unless 0."""
    return report.describe(row) + (f" seed={row['seed']}" if row["seed"] else "")


def step_costs(rows: list[dict]) -> dict[str, float]:
    """group -> median seconds per training step over its runs (steps after the first)."""
    return {
        g: statistics.median(r["step_seconds"] / (r["steps"] - 1) for r in rs)
        for g, rs in _by(rows, report.group_of).items()
    }


def best_per_budget(rows: list[dict]) -> dict[float, dict]:
    """budget -> {"clean": the clean run, tolerance: the most robust run that loses at most that
    many accuracy points against the clean run of the same budget, for each of TOLERANCES}."""
    out = {}
    for budget in sorted({r["time_budget"] for r in rows}):
        rs = [r for r in rows if r["time_budget"] == budget]
        out[budget] = {"clean": next(r for r in rs if r["method"] == "clean")}
        for tolerance in TOLERANCES:
            fair = report.fair_comparison(rs, tolerance, group=report.group_of)["selected"]
            out[budget][tolerance] = max(fair.values(), key=lambda r: r["gnr"])
    return out


def pareto_front(rows: list[dict]) -> list[dict]:
    """The runs that learned and that no other such run beats on both accuracy and GNR."""
    rs = [r for r in rows if r["test_accuracy"] >= LEARNED]
    return [
        r
        for r in rs
        if not any(
            o["test_accuracy"] >= r["test_accuracy"]
            and o["gnr"] >= r["gnr"]
            and (o["test_accuracy"], o["gnr"]) != (r["test_accuracy"], r["gnr"])
            for o in rs
        )
    ]


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    """GNR and accuracy against the training-time budget, one line per recipe, and the best run
    per budget under the headline rule; runs that did not learn are left out (GNR is 100 for a
    model that predicts one class everywhere)."""
    fig = Figure(figsize=(13, 5), dpi=110)
    axes = fig.subplots(1, 2)
    left_out = sorted({label(r) for r in rows if r["test_accuracy"] < LEARNED})
    learned = [r for r in rows if label(r) not in left_out]
    for i, (name, rs) in enumerate(_by(learned, label).items()):
        rs = sorted(rs, key=lambda r: r["time_budget"])
        style = "-" if rs[0]["method"] == ANALYTIC else "--"
        for ax, key in zip(axes, ("gnr", "test_accuracy"), strict=True):
            x, y = [r["time_budget"] for r in rs], [r[key] for r in rs]
            ax.plot(x, y, style, marker="o", color=colormaps["tab20"].colors[i % 20], label=name)
    best = best_per_budget(rows)
    axes[0].plot(
        list(best),
        [w[HEADLINE]["gnr"] for w in best.values()],
        color="black",
        linewidth=3,
        alpha=0.25,
        label=f"best run, accuracy loss <= {HEADLINE:g}",
    )
    for ax, name in zip(axes, ("GNR", "test accuracy (%)"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(list(best), [f"{b:g}" for b in best])
        ax.minorticks_off()
        ax.set_xlabel("training budget (seconds of training steps, log scale)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if left_out:
        title += f"\nleft out, below {LEARNED:g}% accuracy: " + "; ".join(left_out)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def dataset_blocks(dataset: str, rows: list[dict], folder: Path, figures: Path) -> dict[str, str]:
    """A dataset's blocks: cost and results per budget, the best run per budget, the Pareto
    fronts, and the attacks and certificates of the picks; and its frontier figure."""
    budgets = sorted({r["time_budget"] for r in rows})
    costs = step_costs(rows)
    recipes = _by(rows, label)
    plot_frontier(rows, figures / f"{dataset}-frontier.png", f"LeNet / {DATASETS[dataset]}")

    def cell(recipe, budget):
        r = next((r for r in recipes[recipe] if r["time_budget"] == budget), None)
        if r is None:
            return "n/a"
        return f"{fmt(r['test_accuracy'])} / {fmt(r['gnr'])} ({r['steps']})"

    out = {
        f"{dataset}-costs": markdown_table(
            ["run", "s/step", "x clean", *[f"{b:g} s" for b in budgets]],
            [
                [name, f"{costs[g]:.3f}", f"{costs[g] / costs['clean']:.2f}"]
                + [cell(name, b) for b in budgets]
                for name, rs in recipes.items()
                for g in [report.group_of(rs[0])]
            ],
        ),
        f"{dataset}-best": markdown_table(
            ["budget", "clean", *[f"best, loss <= {t:g}" for t in TOLERANCES]],
            [
                [f"{b:g} s", _acc_gnr(w["clean"])]
                + [f"{label(w[t])}: {_acc_gnr(w[t])}" for t in TOLERANCES]
                for b, w in best_per_budget(rows).items()
            ],
        ),
        f"{dataset}-pareto": markdown_table(
            ["budget", "Pareto front (accuracy / GNR)"],
            [
                [
                    f"{b:g} s",
                    "; ".join(
                        f"{label(r)}: {_acc_gnr(r)}"
                        for r in sorted(pareto_front(_at(rows, b)), key=lambda r: -r["gnr"])
                    ),
                ]
                for b in budgets
            ],
        ),
    }
    evaluated = [r for r in winners(rows).values() if r["energy_pgd"] is not None or r["certify"]]
    sigma = f"{SMOOTHING_SIGMA:g}"
    clean = next((r for r in evaluated if r["method"] == "clean"), None)
    out[f"{dataset}-attacks"] = (
        f"Attacked test images: {attack_images(folder, evaluated)}. "
        f"Certified: {_certified(evaluated, sigma)}.\n\n"
        + markdown_table(
            ["group", "run", *ATTACK_LABELS.values(), "ACR", "cert. acc. r=0.5", "GNR", "ACC"],
            [
                [report.group_of(r), label(r)]
                + [report.energy_cell(r, clean, k) for k in ATTACK_LABELS]
                + [
                    fmt(r["certify"].get(sigma, {}).get("acr"), ".3f"),
                    fmt(r["certify"].get(sigma, {}).get("certified_accuracy", {}).get("0.5")),
                    fmt(r["gnr"]),
                    fmt(r["test_accuracy"]),
                ]
                for r in sorted(evaluated, key=lambda r: _order(report.group_of(r)))
            ],
        )
    )
    return out


def _acc_gnr(row: dict) -> str:
    return f"{fmt(row['test_accuracy'])} / {fmt(row['gnr'])}"


def _certified(rows: list[dict], sigma: str) -> str:
    done = [r["certify"][sigma] for r in rows if sigma in r["certify"]]
    if not done:
        return "n/a"
    c = done[0]
    cap = c["sigma"] * NormalDist().inv_cdf(c["alpha"] ** (1 / c["n"]))
    return (
        f"{c['images']} test images, n = {c['n']} noise draws each, failure probability "
        f"{c['alpha']:g} (so no radius can exceed {cap:.2f})"
    )


def blocks(results: Path, figures: Path) -> dict[str, str]:
    """docs/beyond.md's blocks from the exported runs in ``results``."""
    out = {"made": made_with(results)}
    for dataset in DATASETS:
        folder = results / dataset
        out.update(dataset_blocks(dataset, report.collect(folder), folder, figures))
    return out


def _datasets(text: str) -> list[str]:
    """--datasets, checked while parsing (before anything is recorded or run)."""
    names = text.split(",")
    if set(names) - set(DATASETS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(DATASETS)}")
    return names


def main() -> None:
    p = study_parser(__doc__, "beyond", workers=2)
    p.add_argument(
        "--datasets",
        type=_datasets,
        default=list(DATASETS),
        help="train and evaluate these (comma-separated; default: both)",
    )
    p.add_argument("--attack-images", type=int, default=10)
    p.add_argument("--lbfgs-images", type=int, default=5)
    p.add_argument("--certify-images", type=int, default=50)
    p.add_argument("--certify-n", type=int, default=1000, help="noise draws per certified image")
    args, stages = parse_stages(p, STAGES)
    if "train" in stages:
        options = {"mnist": ("--mnist-dir", args.mnist_dir)}
        options["fashion-mnist"] = ("--fashion-dir", args.fashion_dir)
        dirs = data_dirs(p, args, {d: options[d] for d in args.datasets})
        specs = {d: {**load_spec(str(SPEC)), "dataset": d} for d in dirs}
        sweep_tasks(specs, args.runs, dirs, args, at_once=False)  # the same load throughout
    if "evaluate" in stages:
        evaluate(args.runs, args)
    if "export" in stages:
        export(args.runs, args.results, DATASETS)
    if "doc" in stages:
        pages.write("beyond", args.results)


if __name__ == "__main__":
    main()
