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
  4. doc: docs/beyond.md and its figures, from those copies alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study import (  # noqa: E402
    ROOT,
    attack_commands,
    attack_winners,
    data_dirs,
    energy_cell,
    export,
    fmt,
    image_counts,
    parse_stages,
    provenance,
    run_jobs,
    study_parser,
)

from momentreg.evaluation.attacks import ATTACK_LABELS, ATTACKS  # noqa: E402
from momentreg.runs import report  # noqa: E402
from momentreg.runs.rundir import ATTACKS_FILE, read_json  # noqa: E402
from momentreg.runs.sweep import load_spec, sweep  # noqa: E402
from momentreg.tables import markdown_table

SPEC = ROOT / "experiments" / "beyond.toml"
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
STAGES = ("train", "evaluate", "export", "doc")
SMOOTHING_SIGMA = 0.25
# accuracy points a run may lose against the clean run of its budget and still compete; the
# headline rule is HEADLINE (GNR alone rewards a model that predicts one class everywhere)
TOLERANCES = (0.0, 1.0, 2.0, 5.0)
HEADLINE = 1.0


def train(runs: Path, data_dirs: dict, device: str, workers: int, settings: dict) -> None:
    for dataset, data_dir in data_dirs.items():
        spec = {**load_spec(str(SPEC)), "dataset": dataset, "data_dir": str(data_dir)}
        spec.update(device=device, **settings)
        counts = sweep(spec, runs / dataset, workers=workers, progress=False)
        print(f"{dataset}: {counts}", flush=True)
        if counts["failed"]:
            sys.exit(
                f"{dataset}: {counts['failed']} runs failed: momentreg sweep status "
                f"{runs / dataset}"
            )


def _at(rows: list[dict], budget: float) -> list[dict]:
    return [r for r in rows if r["time_budget"] == budget]


def at_largest_budget(rows: list[dict]) -> list[dict]:
    return _at(rows, max(r["time_budget"] for r in rows))


def winners(rows: list[dict]) -> dict[str, dict]:
    """group -> the run that the headline rule picks at the largest budget."""
    return attack_winners(at_largest_budget(rows), group=report.group_of, tolerance=HEADLINE)


def evaluate(runs: Path, args) -> None:
    """Attacks and certification of every dataset's winners, ``args.workers`` models at once."""
    images = {a: args.attack_images for a in ATTACKS}
    images["lbfgs"] = args.lbfgs_images
    sigma = f"{SMOOTHING_SIGMA:g}"
    jobs = []
    for dataset in args.datasets:
        for row in winners(report.collect(runs / dataset)).values():
            run = runs / dataset / "runs" / row["run"]
            commands = attack_commands(run, images, args.device)
            done = row["certify"].get(sigma, {})
            if (done.get("images"), done.get("n")) != (args.certify_images, args.certify_n):
                commands.append(
                    [sys.executable, "-m", "momentreg", "evaluate", str(run), "--quiet"]
                    + ["--certify", "--sigma", sigma, "--n", str(args.certify_n)]
                    + ["--limit", str(args.certify_images), "--device", args.device]
                )
            jobs.append(commands)
    run_jobs(jobs, args.workers)


# -- the document ---------------------------------------------------------------------------------

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


LEARNED = 50.0  # test accuracy (%) below which a run counts as not having learned


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
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    left_out = sorted({label(r) for r in rows if r["test_accuracy"] < LEARNED})
    learned = [r for r in rows if label(r) not in left_out]
    for i, (name, rs) in enumerate(_by(learned, label).items()):
        rs = sorted(rs, key=lambda r: r["time_budget"])
        style = "-" if rs[0]["method"] == ANALYTIC else "--"
        for ax, key in zip(axes, ("gnr", "test_accuracy"), strict=True):
            x, y = [r["time_budget"] for r in rs], [r[key] for r in rs]
            ax.plot(x, y, style, marker="o", color=plt.cm.tab20.colors[i % 20], label=name)
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
    plt.close(fig)


def _dataset_section(dataset: str, rows: list[dict], figures: Path) -> list[str]:
    title = DATASETS[dataset]
    budgets = sorted({r["time_budget"] for r in rows})
    costs = step_costs(rows)
    recipes = _by(rows, label)
    plot_frontier(rows, figures / f"{dataset}-frontier.png", f"LeNet / {title}")

    def cell(recipe, budget):
        r = next((r for r in recipes[recipe] if r["time_budget"] == budget), None)
        if r is None:
            return "n/a"
        return f"{fmt(r['test_accuracy'])} / {fmt(r['gnr'])} ({r['steps']})"

    md = [
        f"## {title}",
        "",
        "### Cost and results at each budget",
        "",
        "Each cell: test accuracy (%) / GNR (training steps done within the budget). Step cost: "
        "the median over the group's runs of seconds per training step, and its ratio to clean.",
        "",
        markdown_table(
            ["run", "s/step", "x clean", *[f"{b:g} s" for b in budgets]],
            [
                [name, f"{costs[g]:.3f}", f"{costs[g] / costs['clean']:.2f}"]
                + [cell(name, b) for b in budgets]
                for name, rs in recipes.items()
                for g in [report.group_of(rs[0])]
            ],
        ),
        "",
        f"![robustness-vs-compute frontier](beyond/{dataset}-frontier.png)",
        "",
        "### Best method per compute budget",
        "",
        "The most robust run (accuracy / GNR) among those that lose at most the given number "
        "of accuracy points against the clean run trained for the same budget; the headline "
        f"rule is {HEADLINE:g} point.",
        "",
        markdown_table(
            ["budget", "clean", *[f"best, loss <= {t:g}" for t in TOLERANCES]],
            [
                [f"{b:g} s", _acc_gnr(w["clean"])]
                + [f"{label(w[t])}: {_acc_gnr(w[t])}" for t in TOLERANCES]
                for b, w in best_per_budget(rows).items()
            ],
        ),
        "",
        "Without a threshold: the runs on the accuracy-GNR Pareto front of each budget (no other "
        f"run that learned, i.e. reached {LEARNED:g}% accuracy, is better on both).",
        "",
        markdown_table(
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
        "",
    ]
    evaluated = [r for r in winners(rows).values() if r["energy_pgd"] is not None or r["certify"]]
    if evaluated:
        sigma = f"{SMOOTHING_SIGMA:g}"
        clean = next((r for r in evaluated if r["method"] == "clean"), None)
        md += [
            f"### Attacks and certificates at {budgets[-1]:g} s",
            "",
            f"The pick of each group under the headline rule (the most robust run that loses at "
            f"most {HEADLINE:g} point of accuracy against clean; its most accurate run when none "
            "qualifies). Attacks: mean energy of the minimal perturbation (mean squared "
            f"perturbation per pixel) over the correctly classified of the first "
            f"{_images(evaluated)} test images, in brackets the ratio to clean. Randomized "
            f"smoothing at sigma {sigma} (Cohen et al. 2019): ACR and certified accuracy at radius "
            f"0.5 on the first {_certified(evaluated, sigma)}.",
            "",
            markdown_table(
                ["group", "run", *ATTACK_LABELS.values(), "ACR", "cert. acc. r=0.5", "GNR", "ACC"],
                [
                    [report.group_of(r), label(r)]
                    + [energy_cell(r, clean, k) for k in ATTACK_LABELS]
                    + [
                        fmt(r["certify"].get(sigma, {}).get("acr"), ".3f"),
                        fmt(r["certify"].get(sigma, {}).get("certified_accuracy", {}).get("0.5")),
                        fmt(r["gnr"]),
                        fmt(r["test_accuracy"]),
                    ]
                    for r in sorted(evaluated, key=lambda r: _order(report.group_of(r)))
                ],
            ),
            "",
        ]
    return md


def _acc_gnr(row: dict) -> str:
    return f"{fmt(row['test_accuracy'])} / {fmt(row['gnr'])}"


def _images(rows: list[dict]) -> str:
    return image_counts({a: v for r in rows for a, v in r["attack_images"].items()})


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


def _conclusions(all_rows: dict[str, list[dict]]) -> list[str]:
    """What the numbers say; every figure is computed from the rows."""
    picks = [w[HEADLINE] for rows in all_rows.values() for w in best_per_budget(rows).values()]
    wins = sum(r["method"] == ANALYTIC for r in picks)
    out = [
        "## What we conclude",
        "",
        f"**Verdict:** an analytic variant is the most robust run at matched compute (accuracy "
        f"loss <= {HEADLINE:g} point against clean) in {wins} of the {len(picks)} dataset-budget "
        "pairs. "
        + (
            "On this evidence the analytic approach is not the best robustness per unit of "
            "training compute; the reasons are below."
            if wins == 0
            else "See below for where."
        ),
        "",
    ]
    for dataset, rows in all_rows.items():
        best = best_per_budget(rows)
        costs = step_costs(rows)
        picks = {b: w[HEADLINE] for b, w in best.items()}
        wins = [b for b, r in picks.items() if r["method"] == ANALYTIC]
        line = (
            f"- **{DATASETS[dataset]}.** Best run per budget (accuracy loss <= {HEADLINE:g} "
            "point): "
            + "; ".join(f"{b:g} s: {label(r)} ({_acc_gnr(r)})" for b, r in picks.items())
            + f". An analytic variant wins at {len(wins)} of {len(picks)} budgets. The best "
            "analytic run under the same rule, and its GNR gap to the winner: "
        )
        gaps = []
        for b, w in best.items():
            rs = [r for r in rows if r["time_budget"] == b and r["method"] == ANALYTIC]
            fair = report.fair_comparison(rs + [w["clean"]], HEADLINE, group=report.group_of)
            analytic = [r for r in fair["selected"].values() if r["method"] == ANALYTIC]
            if analytic:
                a = max(analytic, key=lambda r: r["gnr"])
                gaps.append(f"{b:g} s: {label(a)}, {a['gnr'] - picks[b]['gnr']:+.2f}")
            else:
                gaps.append(f"{b:g} s: none keeps the accuracy")
        line += "; ".join(gaps) + ". Analytic runs on the accuracy-GNR Pareto front: "
        line += "; ".join(
            f"{b:g} s: " + (", ".join(label(r) for r in front if r["method"] == ANALYTIC) or "none")
            for b in best
            for front in [pareto_front(_at(rows, b))]
        )
        ratios = _attack_ratios(list(winners(rows).values()))
        if ratios:
            top = max(ratios, key=ratios.get)
            line += (
                f". Minimal perturbations at {max(best):g} s (geometric mean over the six attacks "
                f"of the energy ratio to clean): largest for {top} ({ratios[top]:.2f}x); "
                + ", ".join(f"{g} {ratios[g]:.2f}x" for g in sorted(ratios, key=_order) if g != top)
            )
        line += ". Step cost against clean: "
        line += ", ".join(
            f"{g} {c / costs['clean']:.2f}x" for g, c in costs.items() if g != "clean"
        )
        out.append(line + ".")
    out += _why(all_rows)
    return out + [""]


def _per_step(rows: list[dict], dataset: str) -> str:
    """The paper's regularizer at the largest budget against the augment N=2 run with the most
    steps that are not more than its own."""
    m = next(r for r in at_largest_budget(rows) if report.group_of(r) == "moment")
    fewer = [r for r in rows if report.group_of(r) == "augment N=2" and r["steps"] <= m["steps"]]
    if not fewer:
        return f"{DATASETS[dataset]}: no augmentation run with as few steps"
    a = max(fewer, key=lambda r: r["steps"])
    return (
        f"on {DATASETS[dataset]} the regularizer after {m['steps']} steps reaches "
        f"{_acc_gnr(m)} (accuracy / GNR), 2-fold augmentation after {a['steps']} steps "
        f"{_acc_gnr(a)}"
    )


def _attack_ratios(picks: list[dict]) -> dict[str, float]:
    """group -> geometric mean over the attacks of its pick's energy over the clean pick's."""
    clean = next(r for r in picks if r["method"] == "clean")
    out = {}
    for r in picks:
        pairs = [(r[f"energy_{k}"], clean[f"energy_{k}"]) for k in ATTACK_LABELS]
        if r is clean or any(a is None or not c for a, c in pairs):
            continue
        out[report.group_of(r)] = math.exp(statistics.mean(math.log(a / c) for a, c in pairs))
    return out


def _why(all_rows: dict[str, list[dict]]) -> list[str]:
    """Why the analytic variants lose or win, from the step counts; and what limits the study."""
    rows = next(iter(all_rows.values()))
    top = at_largest_budget(rows)
    steps = {
        g: statistics.median(r["steps"] for r in rs) for g, rs in _by(top, report.group_of).items()
    }
    dead = sorted(
        {
            f"{label(r)} ({DATASETS[r['dataset']]})"
            for rs in all_rows.values()
            for r in rs
            if r["test_accuracy"] < LEARNED
        }
    )
    return [
        f"- **Why.** At equal wall-clock compute, N-fold augmentation is not N times dearer: "
        "its step costs what a clean step costs (the N is per epoch, not per step), so it is "
        "noise training with a share of clean images. The analytic term is the only one that "
        f"costs more per step, so within {max(r['time_budget'] for r in rows):g} s on "
        f"{DATASETS[rows[0]['dataset']]} the paper's regularizer took {steps['moment']:.0f} steps "
        f"and the all-layer variants about {steps['moment (all layers)']:.0f}, against "
        f"{steps['clean']:.0f} for clean training. Per step: "
        + "; ".join(_per_step(rs, name) for name, rs in all_rows.items())
        + ". The first-layer surrogate is also loose at sigma 0.5 (docs/tightness.md).",
        "- **Limits.** One seed per recipe (two for noise at 0.5 and the hybrid); budgets of at "
        "most about 1.5 epochs of clean training; one sigma per method; step costs of this CPU "
        "(on a GPU the analytic term costs relatively less, docs/performance.md)."
        + (
            f" Runs that did not learn (below {LEARNED:g}% accuracy): {'; '.join(dead)}."
            if dead
            else ""
        ),
    ]


def write_doc(results: Path, doc: Path) -> None:
    figures = doc.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    command = (results / "command.txt").read_text().strip()
    spec = load_spec(str(SPEC))
    all_rows, sections = {}, []
    for dataset in DATASETS:
        if not (results / dataset).is_dir():
            continue
        rows = report.collect(results / dataset)
        for r in rows:
            path = results / dataset / r["run"] / ATTACKS_FILE
            attacks = read_json(path) if path.exists() else {}
            r["attack_images"] = {a: v["test_images"] for a, v in attacks.items()}
        all_rows[dataset] = rows
        sections += _dataset_section(dataset, rows, figures)
    budgets = ", ".join(f"{b:g}" for b in spec["time_budget"])
    md = [
        *provenance(results, "Beyond the paper: robustness per unit of training compute"),
        "## Setting",
        "",
        f"- LeNet (conv 32-64, fc 1024), Adam lr {spec['lr']}, batch {spec['batch_size']}, on "
        "the official MNIST and Fashion-MNIST files; 10% of the training set is held out for "
        "validation, and the best-validation epoch is kept.",
        f"- Matched compute: every run trains for the same wall-clock budget of training steps "
        f"({budgets} seconds; `--time-budget`), so a method gets as many steps as its step cost "
        f"allows. The clock counts only training steps (not validation) and not the first step, "
        "which compiles the ReLU kernels. Runs were two at a time on one core each "
        f"(`--workers {_workers(command)}`), and the two datasets one after the other, with "
        "nothing else on the machine.",
        f"- GNR on the first {spec['gnr_limit']} test images (30 noise levels in [0, 0.5]), "
        "accuracy on all 10,000. Every method trains at sigma 0.5 (noise also at 0.25), seed 0 "
        "(noise at 0.5 and the noisy hybrid also seed 1).",
        "- Groups: `clean`; `noise` (Cohen et al. 2019: fresh noise every step); `augment N` "
        "(the paper's N-fold augmentation); `moment` (the paper's regularizer, first-layer "
        "moments); `moment (all layers)` (mean and variance through every layer, assumed density "
        "filtering with Clark's max for pooling); `moment (all layers, expected CE)` (the "
        "expected cross-entropy under the Gaussian output, probit approximation); "
        "`moment (noisy)` (hybrid: the first term sees a freshly noised batch, plus the "
        "analytic term).",
        "",
        *_conclusions(all_rows),
        *sections,
    ]
    doc.write_text("\n".join(md) + "\n")
    print(f"wrote {doc} and {figures}/*.png")


def _workers(command: str) -> str:
    parts = command.split()
    return parts[parts.index("--workers") + 1] if "--workers" in parts else "2"


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
        train(args.runs, dirs, args.device, args.workers, dict(args.set))
    if "evaluate" in stages:
        evaluate(args.runs, args)
    if "export" in stages:
        export(args.runs, args.results, DATASETS)
    if "doc" in stages:
        write_doc(args.results, args.doc)


if __name__ == "__main__":
    main()
