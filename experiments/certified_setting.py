"""The setting bullets of docs/certified.md and docs/certified-gpu.md: what was trained, for how
long and in which batches, how it was certified, and how its cost is counted."""

from __future__ import annotations

from pathlib import Path

from certified_results import batches, methods_option
from certified_study import CLEAN_EPOCHS, TASK

from momentreg.runs.rundir import CONFIG, METRICS, read_json


def later_batches(rows: list[dict], trained: list[dict], made: dict[str, str]) -> list[str]:
    """A bullet for each partial rerun (``made``: certified_results.batches): which runs it
    trained (``trained``: the config of every trained run), how many at once, and where and when
    (as its certified ``rows`` recorded it)."""
    lines = []
    for value in sorted(set(made.values())):
        count = len([c for c in trained if made.get(c["method"]) == value])
        places = {
            (e["gpu"] or f"{e['cpus']} CPU cores", e["torch"], e["python"], e["date"])
            for e in (r["environment"] for r in rows if r["batch"] == value)
            if e
        }
        where = " on {} (torch {}, Python {}, {})".format(*places.pop()) if len(places) == 1 else ""
        lines.append(
            f"- The command with `--methods {value}` trained the runs of those methods again, "
            f"{count} at once{where}, in place of the earlier runs of their cells (git history "
            "keeps those). Their step seconds are against the noise training beside them."
        )
    return lines


def _listed(values) -> str:
    """'a, b and c' of the sorted ``values``."""
    *rest, last = [f"{v:g}" for v in sorted(values)]
    return f"{', '.join(rest)} and {last}" if rest else last


def _macer_budgets(rows: list[dict]) -> str:
    """Which budgets MACER ran at: with its 16 noisy copies, and with each few-copy count (the
    control, labelled with its copies)."""
    at: dict[int, set] = {}
    for r in rows:
        if r["method"] == "macer":
            at.setdefault(r["copies"], set()).add(r["budget"])
    parts = [f"with its 16 noisy copies at {_listed(at.pop(0))}"] if 0 in at else []
    few = [
        f"with {c} noisy cop{'y' if c == 1 else 'ies'} at {_listed(b)}"
        for c, b in sorted(at.items())
    ]
    parts += ["labelled so, " + " and ".join(few)] if few else []
    return "MACER " + ", and, ".join(parts)


def setting(study, results: Path, rows: list[dict], sigmas: list[float], images: int, n: int):
    """The page's setting bullets: what was trained, for how long, and how it was certified."""
    sig = _listed(sigmas)
    lenet = (
        "the anchors' LeNet (`smoothing-lenet`: conv 20-50, fc 500, raw pixels) and recipe (SGD "
        "0.01, momentum 0.9, weight decay 1e-4, batch 256)"
    )
    if study.unit in ("s", CLEAN_EPOCHS):
        listed = _listed({r["budget"] for r in rows})
        macer = _macer_budgets(rows)
        trained = [
            f"- The smallest informative version of the certified study, made without a GPU: "
            f"MNIST, sigma "
            f"{sig}, {lenet}, but each run trains for a budget of training-step seconds instead "
            f"of 90 epochs (experiments/certified.toml): {listed} s, {macer}. Every method gets "
            "the same seconds, so a dearer step means fewer steps: the budget is the compute."
            if study.unit == "s"
            else f"- The study of [certified.md](certified.md) at equal counted compute instead "
            f"of equal seconds: MNIST, sigma {sig}, {lenet}, each run trained for a budget of "
            f"clean epochs of FLOPs (`--pass-budget`; experiments/certified-passes.toml): it "
            "stops after the steps whose counted compute (steps x batch x its step's passes per "
            f"image) fits in {listed} clean epochs of the training images, {macer}. Every "
            "method gets the same FLOPs on any machine and under any load, so a dearer step "
            "means fewer steps; on the CPU with the same threads (one a run here) a run "
            "repeats bit for bit."
        ]
        delay = "the first 0.34 of their budget"
        seconds = (
            "*Step seconds* against noise training's at the same budget (MACER's against noise "
            "training's at the largest)"
            + (
                "."
                if study.unit == "s"
                else ", measured while two certifications ran beside the two trainings on the 2 "
                "cores: rough, and not the budget."
            )
        )
        kept = (
            "Each run keeps its best-validation epoch (the last one may be partial), so two "
            "budgets can keep the same weights."
        )
    else:
        made = batches(results)
        configs = [
            read_json(d / CONFIG) for d in (results / TASK).iterdir() if (d / METRICS).exists()
        ]
        runs = len([c for c in configs if not made.get(c["method"])])
        commands = (results / "command.txt").read_text().splitlines()
        calls = len([line for line in commands if methods_option(line) is None])
        first = (
            f"- The {runs} runs trained at once"
            if not made
            else f"- The first calls' {runs} runs here trained at once with the earlier runs of "
            + ", ".join(sorted(made))
        )
        resumed = (
            f", over {calls} calls of the command above"
            + (" (the lines without `--methods`)" if made else "")
            + ", each resuming the runs the one before left at its deadline (from their last "
            "epoch's checkpoints)"
            if calls > 1
            else ""
        )
        noise_only = [
            s for s in sigmas if {r["method"] for r in rows if r["sigma"] == s} == {"noise"}
        ]
        trained = [
            f"- The certified study on a GPU: MNIST, sigma {sig}, {lenet} for its 90 epochs, the "
            "learning rate / 10 at epochs 30 and 60 (experiments/certified-gpu.toml). Every "
            "method trains the same epochs, so its cost is its passes per image."
            + (
                " At sigma " + " and ".join(f"{s:g}" for s in noise_only) + " only noise "
                "training, to check it against the anchors."
                if noise_only
                else ""
            ),
            f"{first}, each its own process on one GPU, beside the certification of the runs "
            f"done before them{resumed}: a run's step seconds depend on what ran beside it, so the "
            "seconds below are rough and the passes per image are the cost to compare.",
            *later_batches(rows, configs, made),
        ]
        delay = "their first 31 epochs"
        seconds = "*Step seconds* against noise training's at the same sigma, as measured."
        kept = "Which epoch's weights each run keeps: the section on them below."
    macer_copies = (
        "; macer-analytic labelled with noisy copies trains its NLL on them and keeps the "
        "analytic mean for its hinge"
        if any(r["method"] == "macer-analytic" and r["copies"] for r in rows)
        else ""
    )
    return [
        *trained,
        f"- CERTIFY (Cohen et al.) at the training sigma on {images} test images (every "
        f"{10_000 // images}th), n0 = 100, n = {n:,}, alpha = 0.001. ACR: the mean certified "
        "radius (0 for a wrong or abstained prediction), ± its standard error over the images "
        "(a gap between two runs, which certify the same images: that of the per-image "
        "differences, so what the images share cancels); "
        "certified accuracy (%) at each radius (at r = 0 the smoothed classifier's accuracy, an "
        "abstention counted as wrong). Every ACR below is computed from the committed per-image "
        "TSVs.",
        "- Cost, two ways. *Passes per image*: the FLOPs of one training step (forward and "
        "backward, counted by `torch.utils.flop_counter` in `momentreg.training.cost`) over those "
        "of a "
        "clean step on the same batch; noise training is 1, sampled consistency 2, MACER 16. "
        f"{seconds} The compute column is steps x batch x passes per image, in "
        f"millions of clean image-passes. {kept}",
        "- Methods and their weights (lambda) are the authors' MNIST settings "
        f"(src/momentreg/core/smoothing_losses.py); MACER and its analytic variants train {delay} "
        "with the regularizer off (the authors defer it for 31 of 90 epochs). The "
        "analytic variants replace the Monte Carlo mean by the analytic expectation (first-layer "
        "moments, or all layers with a pairwise-probit E[softmax]); consistency-analytic keeps one "
        f"noisy copy{macer_copies}."
        + (
            " `moment` is the paper's regularizer."
            if any(r["method"] == "moment" for r in rows)
            else ""
        ),
    ]
