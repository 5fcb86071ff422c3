"""The files of a run directory: atomic writes, JSON in and out, and one run as a table row.

A run directory (``momentreg train --out``) holds config.json, checkpoint.pt, history.csv,
metrics.json and, with --tensorboard, tensorboard/; ``evaluate --attacks`` adds attacks.json,
``evaluate --certify`` certify.json and certify-sigma<S>.tsv (and, until it ends,
certify-sigma<S>.partial.pt), ``momentreg tightness`` tightness.json. ``clear_run`` removes all of
them, so nothing of an old model outlives ``train --force``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from momentreg.files import atomic_save, atomic_write, lock_file, read_json, write_json
from momentreg.training.loop import CHECKPOINT, HISTORY  # the files training writes

__all__ = [
    "atomic_write",
    "atomic_save",
    "write_json",
    "read_json",
    "read_run",
    "clear_run",
    "certify_tsv",
    "certify_partial",
    "RUN_FILES",
]

# The files of a run directory: training writes the first four, evaluations the others.
CONFIG = "config.json"
METRICS = "metrics.json"
ATTACKS_FILE = "attacks.json"
CERTIFY_FILE = "certify.json"
TIGHTNESS_FILE = "tightness.json"
ERROR = "error.txt"  # a sweep's record of a failed run
LOCK = ".lock"  # a sweep's record of the process training a run
RUN_FILES = (CONFIG, CHECKPOINT, HISTORY, METRICS, ATTACKS_FILE, CERTIFY_FILE, TIGHTNESS_FILE)


CERTIFY_TSVS = "certify-sigma*.tsv"  # a glob: one file per smoothing sigma
CERTIFY_PARTS = "certify-sigma*.partial.pt"  # an interrupted certification's rows and noise state


def certify_tsv(sigma: float) -> str:
    """The per-image certification file of one smoothing sigma."""
    return f"certify-sigma{sigma:g}.tsv"


def certify_partial(sigma: float) -> str:
    """Where a certification at ``sigma`` keeps its progress until it ends (run.certify_run)."""
    return f"certify-sigma{sigma:g}.partial.pt"


def clear_run(run: Path) -> None:
    """Remove what training and evaluations wrote into ``run`` (and nothing else of the folder)."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
        lock_file(run / name).unlink(missing_ok=True)  # update_json's
    for path in [*run.glob(CERTIFY_TSVS), *run.glob(CERTIFY_PARTS)]:
        path.unlink()
    shutil.rmtree(run / "tensorboard", ignore_errors=True)


def read_run(run: Path) -> tuple[dict, dict, dict]:
    """(config, metrics, attacks) of a finished run; attacks is {} when none were run."""
    attacks = run / ATTACKS_FILE
    return (
        read_json(run / CONFIG),
        read_json(run / METRICS),
        read_json(attacks) if attacks.exists() else {},
    )
