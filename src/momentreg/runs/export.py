"""A sweep's results without its checkpoints: the small files of each run, to commit or share.

``export_sweep(DIR, DEST)`` copies, for every finished run under ``DIR/runs``, its config,
metrics, history and whatever evaluations wrote (attacks.json, certify.json with its per-image
TSVs, tightness.json) to ``DEST/<run>/``; for a failed run, its config and error.txt (why it
failed). Checkpoints and pending runs stay behind.

``DEST`` holds one run per cell, the run folder's name without its config hash (``noise-s0.5``):
an exported run replaces a run of its cell already in ``DEST`` that the sweep does not hold, one
made with other settings. Runs of other cells are kept, so exporting a sweep that reran a few
cells updates those cells of earlier results and leaves the rest as they were.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from momentreg.runs.rundir import CERTIFY_TSVS, CHECKPOINT, CONFIG, ERROR, METRICS, RUN_FILES

__all__ = ["Exported", "cell", "export_sweep"]

# What a finished run's export holds: every file of a run but its checkpoint (and its per-image
# certification TSVs).
SMALL_FILES = tuple(name for name in RUN_FILES if name != CHECKPOINT)


def cell(run: str) -> str:
    """A run folder's name without its config hash: the cell of the grid it fills."""
    return run.rsplit("-", 1)[0]


@dataclass
class Exported:
    """What ``export_sweep`` did: the runs copied (finished and failed), the runs of ``DEST`` it
    replaced, and those of other cells it left in place."""

    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _files(run: Path) -> list[Path] | None:
    """The files of ``run`` to export; None for a run neither finished nor failed."""
    if (run / METRICS).exists():
        return [run / name for name in SMALL_FILES] + sorted(run.glob(CERTIFY_TSVS))
    if (run / ERROR).exists():
        return [run / CONFIG, run / ERROR]
    return None


def export_sweep(sweep_dir: Path, dest: Path) -> Exported:
    """Copy the small files of the runs under ``sweep_dir/runs`` to ``dest/<run>/`` (see the
    module's docstring).

    Args:
        sweep_dir: a sweep's directory (``momentreg sweep --out``).
        dest: the results folder; made if missing.

    Returns:
        An ``Exported``: the run names copied, replaced and kept.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> run = root / "sweep" / "runs" / "clean-0a1b2c3d"
        >>> run.mkdir(parents=True)
        >>> for name in ("config.json", "metrics.json", "checkpoint.pt"):
        ...     _ = (run / name).write_text("{}")
        >>> export_sweep(root / "sweep", root / "results").finished
        ['clean-0a1b2c3d']
        >>> sorted(p.name for p in (root / "results" / "clean-0a1b2c3d").iterdir())
        ['config.json', 'metrics.json']
    """
    root, done = sweep_dir / "runs", Exported()
    runs = {run: _files(run) for run in sorted(root.iterdir())} if root.is_dir() else {}
    runs = {run: files for run, files in runs.items() if files is not None}
    names = {run.name for run in runs}
    cells = {cell(name) for name in names}
    for old in sorted(dest.iterdir()) if dest.is_dir() else []:
        if old.is_dir() and old.name not in names:
            if cell(old.name) in cells:
                shutil.rmtree(old)
                done.replaced.append(old.name)
            else:
                done.kept.append(old.name)
    for run, files in runs.items():
        (dest / run.name).mkdir(parents=True, exist_ok=True)
        for path in (p for p in files if p.exists()):
            shutil.copy2(path, dest / run.name / path.name)
        (done.finished if (run / METRICS).exists() else done.failed).append(run.name)
    dest.mkdir(parents=True, exist_ok=True)
    return done
