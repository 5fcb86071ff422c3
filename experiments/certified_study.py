"""What the certified study is: its three versions (STUDIES), the methods it sets against
each other, the radii it reports and the published anchors it checks against. Read by the runner
(certified.py) and the page (certified_page.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from study import ROOT

CLEAN_EPOCHS = "clean epochs"  # a pass budget's unit: the compute of that many clean epochs


@dataclasses.dataclass(frozen=True)
class Study:
    """One version of the study: its runs, results and page are named ``name``."""

    name: str
    spec: Path
    unit: str  # what a run's budget counts: "s" (of training steps), "epochs" or CLEAN_EPOCHS
    macer_factor: int  # MACER's budget over that of the analytic variants set against it
    images: int  # test images certified (--certify-images)
    n: int  # noise samples per image (--certify-n)
    batch: int  # noisy copies per forward pass when certifying
    workers: int  # trainings at once (--workers)
    tightness_from: float  # the tightness tables show runs of at least this budget
    anchor_check: bool  # n and schedule as the anchors': check noise training against them
    against: str = ""  # the study (STUDIES key) whose runs this one trains under another budget


_CPU = Study(
    name="certified",
    spec=ROOT / "experiments/certified.toml",
    unit="s",
    macer_factor=4,
    images=100,
    n=10_000,
    batch=10_000,
    workers=2,
    tightness_from=60,
    anchor_check=False,
)

STUDIES = {
    "cpu": _CPU,
    "passes": dataclasses.replace(  # the CPU study with budgets of counted compute
        _CPU,
        name="certified-passes",
        spec=ROOT / "experiments/certified-passes.toml",
        unit=CLEAN_EPOCHS,
        tightness_from=3,
        against="cpu",
    ),
    "gpu": Study(
        name="certified-gpu",
        spec=ROOT / "experiments/certified-gpu.toml",
        unit="epochs",
        macer_factor=1,
        images=500,
        n=100_000,
        batch=50_000,
        workers=15,
        tightness_from=0,
        anchor_check=True,
    ),
}


def unit_name(unit: str) -> str:
    """A budget's unit in words: "seconds" for "s", else the unit itself."""
    return "seconds" if unit == "s" else unit


TASK = "mnist"


# The order in which trained runs are certified (then checked for tightness): noise training (the
# anchor check) first, then the two sides of the goal's comparisons, then the other methods
# (eval_rank: then the few-copy MACER control).
EVAL_ORDER = ("noise", "macer-analytic", "consistency", "macer", "consistency-analytic",
              "stability", "stability-analytic", "moment")  # fmt: skip


def authors_copies(row: dict) -> bool:
    """Whether a run uses the noisy copies of the authors' runs (samples 0: consistency's 2,
    MACER's 16), as the goal's MACER and the published anchors do."""
    return not row["copies"]


def eval_rank(config: dict) -> int:
    """A run's place in EVAL_ORDER; sampled MACER with a few noisy copies (the control beside
    the goal, not in it) after every other run."""
    if config["method"] == "macer" and config.get("samples"):
        return len(EVAL_ORDER)
    return EVAL_ORDER.index(config["method"])


RADII = (0.0, 0.5, 1.0, 1.5, 2.0)  # 0: the smoothed classifier's accuracy (abstaining is wrong)


SAMPLED = ("noise", "stability", "consistency", "macer")


TIGHTNESS_IMAGES, TIGHTNESS_SAMPLES = 50, 2000


DIVERGED = 10.0  # a run diverged if its last validation loss is over this many times its best


# Published ACRs of LeNet on MNIST (all 10,000 test images, N = 100,000, alpha = 0.001), from
# the certification logs of jh-jeong/smoothing-consistency as the study quotes them (SmoothAdv for
# scale).
ANCHORS = {
    "noise": {0.25: 0.911, 0.5: 1.558, 1.0: 1.618},
    "stability": {0.25: 0.915, 0.5: 1.572, 1.0: 1.634},
    "macer": {0.25: 0.920, 0.5: 1.590, 1.0: 1.595},
    "consistency": {0.25: 0.928, 0.5: 1.655, 1.0: 1.738},
    "SmoothAdv": {0.25: 0.932, 0.5: 1.687, 1.0: 1.779},
}


ANCHOR_TOLERANCE = 0.03  # our noise training within this ACR of the published one
