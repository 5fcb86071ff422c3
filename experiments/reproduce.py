r"""Reproduce the paper's central MNIST claim with our code, and write docs/reproduction.md.

    python experiments/reproduce.py --mnist-dir ../shared/datasets/mnist \
        --fashion-dir /usr/share/datasets/fashion-mnist [--device cuda --workers 8]

Stages, each resumable (rerun the same command after a crash):
  1. the sweeps experiments/mnist-lenet.toml and experiments/fashion-lenet.toml into --runs;
  2. on MNIST, the six attacks on the first --attack-images test images for the fair-comparison
     winner of each method (clean, moment, augment, noise);
  3. every finished run's config, metrics, attacks and history copied to docs/results/reproduction/
     (checkpoints stay in --runs);
  4. the tables and figures of docs/reproduction.md, from those copies alone (pages.py).
``--stages doc`` runs stage 4 alone, from the committed copies.
"""

from __future__ import annotations

from pathlib import Path

import pages
from study import (
    PAPER,
    ROOT,
    attack_commands,
    attack_images,
    attack_table,
    attack_winners,
    data_dirs,
    export,
    made_with,
    mean_of,
    method_order,
    parse_stages,
    run_jobs,
    study_parser,
    sweep_tasks,
    task_figures,
)

from momentreg.evaluation.attacks import ATTACK_LABELS, ATTACKS
from momentreg.runs import report
from momentreg.runs.sweep import load_spec
from momentreg.tables import markdown_table

TASKS = {"mnist-lenet": "MNIST", "fashion-lenet": "Fashion-MNIST"}  # task -> dataset label
STAGES = ("train", "attack", "export", "doc")


def _spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f}, {len(values)} seeds)"


def _find(rows, method, **fields) -> list[dict]:
    return [r for r in rows if r["method"] == method and all(r[k] == v for k, v in fields.items())]


def _ratios(rows: list[dict], method: str) -> dict[str, float]:
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


def paper_table(rows: list[dict]) -> str:
    """The paper's Table 1 rows beside ours (mean, range and count of seeds)."""
    clean, m1 = _find(rows, "clean"), _find(rows, "moment", sigma=1.0, alpha=1.0)
    return markdown_table(
        ["run", "paper ACC", "paper GNR", "our ACC", "our GNR"],
        [
            ["clean", *PAPER["clean"], _spread(clean, "test_accuracy"), _spread(clean, "gnr")],
            ["moment sigma=1.0 alpha=1", *PAPER["moment sigma=1.0"],
             _spread(m1, "test_accuracy"), _spread(m1, "gnr")],
        ],
    )  # fmt: skip


def claims_table(rows: list[dict]) -> str:
    """The paper's claims on MNIST, each with its numbers and ours (means over seeds)."""
    clean, m1 = _find(rows, "clean"), _find(rows, "moment", sigma=1.0, alpha=1.0)
    acc = {k: mean_of(r, "test_accuracy") for k, r in (("clean", clean), ("m1", m1))}
    gnr = {k: mean_of(r, "gnr") for k, r in (("clean", clean), ("m1", m1))}
    spread = max(max(r["test_accuracy"] for r in x) - min(r["test_accuracy"] for r in x)
                 for x in (clean, m1))  # fmt: skip
    table = [
        ["the regularizer at sigma 1.0 is more robust than clean", "GNR 97.32 vs 77.45",
         f"GNR {gnr['m1']:.2f} vs {gnr['clean']:.2f} ({gnr['m1'] - gnr['clean']:+.2f})"],
        ["... without losing clean accuracy", "accuracy 99.00 vs 98.50",
         f"accuracy {acc['m1']:.2f} vs {acc['clean']:.2f} ({acc['m1'] - acc['clean']:+.2f}; "
         f"seed-to-seed spread {spread:.2f})"],
    ]  # fmt: skip
    aug21, best = (
        _find(rows, "augment", folds=21),
        max(_find(rows, "moment"), key=lambda r: r["gnr"]),
    )
    if aug21:
        a = aug21[0]
        table.append(
            [
                "the regularizer is on par with 21-fold augmentation (Fig. 3a)",
                "on par",
                f"best moment run ({report.describe(best)}) GNR {best['gnr']:.2f}; "
                f"{report.describe(a)} GNR {a['gnr']:.2f} ({best['gnr'] - a['gnr']:+.2f})",
            ]
        )
    for method in ("moment", "augment"):
        ratios = _ratios(rows, method)
        if ratios:
            table.append(
                [
                    f"minimal perturbations grow by up to 100x ({method} winner)",
                    "100x",
                    f"{min(ratios.values()):.1f}x to {max(ratios.values()):.1f}x",
                ]
            )
    return markdown_table(["claim (paper)", "paper", "ours"], table)


def task_blocks(task: str, rows: list[dict], folder: Path, figures: Path) -> dict:
    """A task's blocks (all runs, the fair comparison, the attacks) and its three figures."""
    fair = report.fair_comparison(rows, 0.0)
    title = f"most robust run per group with accuracy >= clean mean {fair['threshold']:.2f}"
    task_figures(rows, fair["selected"], figures, task, f"LeNet / {TASKS[task]}", title)
    blocks = {
        f"{task}-runs": report.runs_table(sorted(rows, key=method_order), names=False),
        f"{task}-fair": f"Threshold (mean clean accuracy): {fair['threshold']:.2f}\n\n"
        + report.fair_table(fair["selected"]),
    }
    attacked = [r for r in rows if r["energy_pgd"] is not None]
    if attacked:
        clean = next((r for r in attacked if r["method"] == "clean"), None)
        blocks[f"{task}-attacks"] = (
            f"Test images: {attack_images(folder, rows)}\n\n" + attack_table(attacked, clean)
        )
    return blocks


def blocks(results: Path, figures: Path) -> dict[str, str]:
    """docs/reproduction.md's blocks from the exported runs in ``results``."""
    out = {"made": made_with(results)}
    for task in TASKS:
        rows = report.collect(results / task)
        out.update(task_blocks(task, rows, results / task, figures))
        if task == "mnist-lenet":
            out["paper"], out["claims"] = paper_table(rows), claims_table(rows)
    return out


def main() -> None:
    p = study_parser(__doc__, "reproduction", workers=1)
    p.add_argument("--attack-images", type=int, default=400)
    p.add_argument("--lbfgs-images", type=int, help="L-BFGS on fewer images (default: all)")
    args, stages = parse_stages(p, STAGES)
    if "train" in stages:
        given = {"mnist-lenet": ("--mnist-dir", args.mnist_dir)}
        given["fashion-lenet"] = ("--fashion-dir", args.fashion_dir)
        specs = {task: load_spec(str(ROOT / "experiments" / f"{task}.toml")) for task in TASKS}
        sweep_tasks(specs, args.runs, data_dirs(p, args, given), args, at_once=True)
    if "attack" in stages:  # the six attacks on each MNIST winner, the winners in parallel
        images = {a: args.attack_images for a in ATTACKS}
        images["lbfgs"] = args.lbfgs_images or args.attack_images
        folder = args.runs / "mnist-lenet"
        winners = attack_winners(report.collect(folder)).values()
        jobs = [attack_commands(folder / "runs" / r["run"], images, args.device) for r in winners]
        run_jobs(jobs, len(jobs))
    if "export" in stages:
        export(args.runs, args.results, TASKS)
    if "doc" in stages:
        pages.write("reproduction", args.results)


if __name__ == "__main__":
    main()
