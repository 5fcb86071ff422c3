"""Certified robustness per unit of compute: the randomized-smoothing baselines and their
analytic variants under one trainer. Its pages are docs/certified.md (--study cpu),
docs/certified-passes.md (--study passes) and docs/certified-gpu.md (--study gpu).

    python experiments/certified.py --mnist-dir DIR [--workers 2]
    python experiments/certified.py --study gpu --mnist-dir DIR --device cuda [--deadline 480]

Three studies (STUDIES): "cpu", every method for budgets of training-step seconds
(experiments/certified.toml), certified with n = 10,000 on 100 images; "passes", the same with
budgets of counted compute (experiments/certified-passes.toml); "gpu", the anchors' 90 epochs
(experiments/certified-gpu.toml), n = 100,000 on 500 images. Stages, each resumable (rerun the
same command after a crash):
  1. run: train and certify, as ``momentreg sweep SPEC --then certify`` does: CERTIFY (Cohen et
     al.) of every run at its training sigma on --certify-images test images (every
     (10000 / N)-th), n0 = 100, n = --certify-n, alpha = 0.001, as soon as the run is trained,
     in its slot of --workers. A study of seconds certifies only once every run is trained
     (--eval-workers at once), so that no certification takes CPU time from a run's budget. Then
     the analytic expectation of each run's logits against Monte Carlo (``momentreg
     tightness``). --deadline stops all of it after that many seconds (the same command resumes);
  2. export: each run's config, metrics, history, certify.json, tightness.json and per-image TSV
     to docs/results/<study>/;
  3. doc: the page's tables and figures, from those files alone (pages.py).

--methods M1,M2 trains only those methods of the spec, a partial rerun: the export puts its runs
in place of the committed runs of the same cells (method, sigma, weight, budget), keeps the
others, and adds the command to the results' command.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pages
from study import MOMENTREG, ROOT, data_dirs, export, parse_stages, study_parser, sweep_tasks

from momentreg.runs.rundir import CONFIG, METRICS, TIGHTNESS_FILE, read_json
from momentreg.runs.sweep import CertifyAfter, child_env, load_spec, run_state

STAGES = ("run", "export", "doc")
TASK = "mnist"
CLEAN_EPOCHS = "clean epochs"  # a pass budget's unit: the compute of that many clean epochs
TIGHTNESS_IMAGES, TIGHTNESS_SAMPLES = 50, 2000


@dataclasses.dataclass(frozen=True)
class Study:
    """One version of the study: its runs, results and page are named ``name``."""

    name: str
    spec: Path
    unit: str  # what a run's budget counts: "s" (of training steps), "epochs" or CLEAN_EPOCHS
    images: int  # test images certified (--certify-images)
    n: int  # noise samples per image (--certify-n)
    batch: int  # noisy copies per forward pass when certifying
    workers: int  # trainings at once (--workers)
    tightness_from: float  # the tightness tables show runs of at least this budget
    macer_factor: int  # MACER's budget over that of the analytic variants set against it


_CPU = Study("certified", ROOT / "experiments/certified.toml", "s", 100, 10_000, 10_000, 2, 60, 4)
STUDIES = {
    "cpu": _CPU,
    "passes": dataclasses.replace(
        _CPU,
        name="certified-passes",
        spec=ROOT / "experiments/certified-passes.toml",
        unit=CLEAN_EPOCHS,
        tightness_from=3,
    ),
    "gpu": Study(
        "certified-gpu",
        ROOT / "experiments/certified-gpu.toml",
        "epochs",
        images=500,
        n=100_000,
        batch=50_000,
        workers=15,
        tightness_from=0,
        macer_factor=1,
    ),
}


def train_and_certify(study: Study, args, mnist: Path, until: float | None) -> None:
    """The sweep of the study's spec (only ``args.methods`` where given), each run certified at
    its sigma once trained, until ``until`` (a ``time.time()``); a study of seconds trains every
    run before it certifies one."""
    spec = load_spec(str(study.spec))
    if args.methods:
        spec["methods"] = [m for m in spec["methods"] if m["method"] in args.methods]
    then = CertifyAfter(
        limit=args.certify_images, stride=max(1, 10_000 // args.certify_images),
        n=args.certify_n, batch=study.batch,
    )  # fmt: skip

    def run(**options) -> None:
        left = None if until is None else max(0.0, until - time.time())
        sweep_tasks(
            {TASK: spec}, args.runs, {TASK: mnist}, args, False, False, deadline=left, **options
        )

    if study.unit == "s":
        run()  # training first: a certification beside a run would take seconds of its budget
        run(then=then, workers=args.eval_workers)
    else:
        run(then=then)


def tightness(runs: Path, device: str, workers: int, until: float | None) -> None:
    """``momentreg tightness`` on each trained run that lacks it, in turn, until ``until`` (a
    ``time.time()``); a run that predicts one class is left out of the study."""
    env = child_env(max(1, (os.cpu_count() or 1) // max(1, workers)))
    for run in sorted((runs / TASK / "runs").glob("*")):
        if run_state(run) != "done" or (run / TIGHTNESS_FILE).exists():
            continue
        if read_json(run / METRICS).get("constant_predictions"):
            continue
        left = None if until is None else until - time.time()
        if left is not None and left <= 0:
            print("the deadline stopped the tightness stage", file=sys.stderr)
            return
        sigma = read_json(run / CONFIG)["sigma"]
        argv = [*MOMENTREG, "tightness", str(run), "--quiet", "--device", device, "--sigmas"]
        argv += [f"{sigma:g}", "--limit", str(TIGHTNESS_IMAGES)]
        argv += ["--mc-samples", str(TIGHTNESS_SAMPLES)]
        try:
            subprocess.run(argv, env=env, check=True, timeout=left)
        except subprocess.TimeoutExpired:  # killed: the same command measures it again
            print(f"the deadline stopped the tightness of {run.name}", file=sys.stderr)
            return


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", choices=STUDIES, default="cpu")
    study = STUDIES[pre.parse_known_args()[0].study]
    p = study_parser(__doc__, study.name, workers=study.workers)
    p.add_argument("--study", choices=STUDIES, default="cpu", help="which version (STUDIES)")
    p.add_argument("--certify-images", type=int, default=study.images)
    p.add_argument("--certify-n", type=int, default=study.n, help="noise samples per image")
    p.add_argument("--eval-workers", type=int, default=study.workers,
                   help="certifications at once once every run of seconds is trained")  # fmt: skip
    p.add_argument("--deadline", type=float, help="stop training and evaluating then (s)")
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
    until = None if args.deadline is None else time.time() + args.deadline
    if "run" in args.stages:
        mnist = data_dirs(p, args, {TASK: ("--mnist-dir", args.mnist_dir)})[TASK]
        train_and_certify(study, args, mnist, until)
        tightness(args.runs, args.device, args.workers, until)
    if "export" in args.stages:
        export(args.runs, args.results, [TASK])
    if "doc" in args.stages:
        pages.write(study.name, args.results)


if __name__ == "__main__":
    main()
