"""Certified robustness per unit of compute: the randomized-smoothing baselines and their
analytic variants under one trainer; writes docs/certified.md (--study cpu) or
docs/certified-gpu.md (--study gpu).

    python experiments/certified.py --mnist-dir DIR [--workers 2]
    python experiments/certified.py --study gpu --mnist-dir DIR --device cuda [--deadline 480]

Two studies (STUDIES): "cpu", every method for budgets of training-step seconds
(experiments/certified.toml), certified with n = 10,000 on 100 images; "gpu", the anchors' 90
epochs (experiments/certified-gpu.toml), n = 100,000 on 500 images. Stages, each resumable (rerun
the same command after a crash):
  1. train: the study's spec, --workers runs at once;
  2. evaluate: CERTIFY (Cohen et al.) of every run at its training sigma on --certify-images test
     images (every (10000 / N)-th), n0 = 100, n = --certify-n, alpha = 0.001; then the analytic
     expectation of its logits against Monte Carlo (``momentreg tightness``). With the train stage
     it starts on each run as soon as that run is trained, --eval-workers jobs at once, noise
     training's first (EVAL_ORDER); --deadline stops both stages after that many seconds, killing
     what still runs (export then takes what finished);
  3. export: each run's config, metrics, history, certify.json, tightness.json and per-image TSV
     to docs/results/<study>/;
  4. doc: docs/<study>.md and its figures, from those files alone (ACRs from the TSVs).

--methods M1,M2 trains only those methods of the spec, a partial rerun (say, with other settings
after a change to the spec): the export puts its runs in place of the committed runs of the same
cells (method, sigma, weight, budget) and keeps the others, and the page says which command made
which runs.

This file runs the stages; what the study is lives in certified_study.py, the exported runs as
rows in certified_results.py, the verdict in certified_verdict.py, the page's setting bullets in
certified_setting.py, the second seeds in certified_seeds.py and the page in certified_page.py.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from certified_page import write_doc
from certified_study import (
    STUDIES,
    TASK,
    TIGHTNESS_IMAGES,
    TIGHTNESS_SAMPLES,
    Study,
    eval_rank,
)
from study import certify_command, data_dirs, export, parse_stages, study_parser, tightness_command

from momentreg.runs.rundir import CERTIFY_FILE, CONFIG, METRICS, TIGHTNESS_FILE, read_json
from momentreg.runs.sweep import child_env, load_spec, sweep

STAGES = ("train", "evaluate", "export", "doc")
POLL = 5  # seconds between looks for newly trained runs


def chosen(spec: dict, methods: list[str] | None) -> dict:
    """The spec with only the entries of ``methods`` (None: all of them)."""
    if methods is None:
        return spec
    return {**spec, "methods": [m for m in spec["methods"] if m["method"] in methods]}


def train(study: Study, runs: Path, mnist: Path, device: str, workers: int, settings: dict,
          methods: list[str] | None = None):  # fmt: skip
    spec = {**load_spec(str(study.spec)), "data_dir": str(mnist), "device": device, **settings}
    spec = chosen(spec, methods)
    counts = sweep(spec, runs / TASK, workers=workers, progress=True)
    if counts["failed"]:
        print(f"{counts['failed']} runs failed; see their error.txt", file=sys.stderr)


def evaluation_jobs(study: Study, runs: Path, images: int, n: int, device: str):
    """The commands that the trained runs still need, each list in ``eval_rank`` order: (CERTIFY
    of each run at its sigma, the analytic expectation against Monte Carlo: ``momentreg
    tightness`` on the first TIGHTNESS_IMAGES test images at the run's sigma). A run that
    predicts one class is left out of the study."""
    certify, tightness = [], []
    folder = runs / TASK / "runs"
    for run in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (run / METRICS).exists() or read_json(run / METRICS).get("constant_predictions"):
            continue
        config = read_json(run / CONFIG)
        sigma, rank = config["sigma"], eval_rank(config)
        done = read_json(run / CERTIFY_FILE) if (run / CERTIFY_FILE).exists() else {}
        if done.get(f"{sigma:g}", {}).get("images") != images:
            smoothing = {"sigma": sigma, "n0": 100, "alpha": 0.001}
            argv = certify_command(run, device, smoothing, n, images, 10_000, study.batch)
            certify.append(((rank, sigma), argv))
        if not (run / TIGHTNESS_FILE).exists():
            argv = tightness_command(run, device, sigma, TIGHTNESS_IMAGES, TIGHTNESS_SAMPLES)
            tightness.append(((rank, sigma), argv))
    return [argv for _, argv in sorted(certify)], [argv for _, argv in sorted(tightness)]


def evaluate(study, runs, images, n, device, workers, trainer=None, deadline=math.inf) -> int:
    """Run the evaluation jobs, ``workers`` at once, until none is left and ``trainer`` (the
    train stage's thread, if it runs beside) has ended, or until the monotonic clock passes
    ``deadline`` (a job still running then is killed). The tightness jobs wait until training has
    ended and every certification has started, so that they never hold up one. Returns the
    number of failed jobs; their output is printed."""
    started, failed = set(), 0
    env = child_env(max(1, (os.cpu_count() or 1) // workers))

    def run(argv):
        timeout = deadline - time.monotonic() if deadline < math.inf else None
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(workers) as pool:
        running = {}
        while time.monotonic() < deadline:
            training = trainer is not None and trainer.is_alive()
            certify, tightness = evaluation_jobs(study, runs, images, n, device)
            todo = [a for a in certify if tuple(a) not in started]
            if not todo and not training:
                todo = [a for a in tightness if tuple(a) not in started]
            for argv in todo[: workers - len(running)]:
                started.add(tuple(argv))
                running[pool.submit(run, argv)] = argv
            if not running:
                if not training:
                    break
                time.sleep(POLL)  # until the next run is trained
                continue
            done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
            for future in done:
                argv = running.pop(future)
                try:
                    proc = future.result()
                except subprocess.TimeoutExpired:
                    print(f"past the deadline, killed: {' '.join(argv[2:5])}", file=sys.stderr)
                    continue
                if proc.returncode:
                    failed += 1
                    print(f"failed: {' '.join(argv)}\n{proc.stderr}", file=sys.stderr)
                else:
                    print(f"{time.strftime('%H:%M:%S')} done: {' '.join(argv[3:5])}", flush=True)
    return failed


def train_and_evaluate(study: Study, args, mnist: Path | None) -> None:
    """The train and evaluate stages of ``args.stages``, evaluating each run once it is trained;
    after ``args.deadline`` seconds (0: none) whatever still runs is killed, by leaving through
    os._exit (the sweep's runs die with their parent). A study of seconds (``study.unit``)
    evaluates only after training has ended: a job beside a run would take CPU time from its
    budget and so cut its steps."""
    deadline = time.monotonic() + args.deadline if args.deadline else math.inf

    def left() -> float | None:
        return max(0.0, deadline - time.monotonic()) if deadline < math.inf else None

    trainer = None
    if "train" in args.stages:
        trainer = threading.Thread(
            target=train,
            args=(study, args.runs, mnist, args.device, args.workers, dict(args.set), args.methods),
            daemon=True,
        )
        trainer.start()
        if study.unit == "s":
            trainer.join(left())
    failed = 0
    if "evaluate" in args.stages:
        images, n = args.certify_images, args.certify_n
        failed = evaluate(study, args.runs, images, n, args.device, args.eval_workers, trainer,
                          deadline)  # fmt: skip
    if trainer is not None:
        trainer.join(left())
        if trainer.is_alive():
            print(f"the deadline ({args.deadline:g} s) stopped the training", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
    if failed:
        sys.exit(f"{failed} evaluation jobs failed")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", choices=STUDIES, default="cpu")
    study = STUDIES[pre.parse_known_args()[0].study]
    p = study_parser(__doc__, study.name, workers=study.workers)
    p.add_argument("--study", choices=STUDIES, default="cpu", help="which version (STUDIES)")
    p.add_argument("--certify-images", type=int, default=study.images)
    p.add_argument("--certify-n", type=int, default=study.n, help="noise samples per image")
    p.add_argument("--eval-workers", type=int, default=study.workers, help="evaluations at once")
    p.add_argument(
        "--deadline", type=float, default=0, help="stop training and evaluating then (s)"
    )
    p.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        help="train only these methods of the spec (comma-separated): a partial rerun, whose "
        "runs the export puts in place of the committed runs of their cells",
    )
    args, args.stages = parse_stages(p, STAGES)
    known = {m["method"] for m in load_spec(str(study.spec))["methods"]}
    if args.methods and set(args.methods) - known:
        unknown = ", ".join(sorted(set(args.methods) - known))
        p.error(f"--methods: {unknown} not in {study.spec.name}; it has {', '.join(sorted(known))}")
    mnist = None
    if "train" in args.stages:
        mnist = data_dirs(p, args, {TASK: ("--mnist-dir", args.mnist_dir)})[TASK]
    if {"train", "evaluate"} & args.stages:
        train_and_evaluate(study, args, mnist)
    if "export" in args.stages:
        export(args.runs, args.results, [TASK])
    if "doc" in args.stages:
        write_doc(study, args.results, args.doc)


if __name__ == "__main__":
    main()
