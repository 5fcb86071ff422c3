"""The files of a run directory: atomic writes, JSON in and out, and one run as a table row.

A run directory (``momentreg train --out``) holds config.json, checkpoint.pt, history.csv,
metrics.json and, after ``evaluate --attacks``, attacks.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from momentreg.errors import MomentregError

__all__ = ["atomic_write", "write_json", "read_json", "read_run"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    pause_for_tests("in-write", path)
    os.replace(tmp, path)


def pause_for_tests(point: str, where) -> None:
    """Crash-safety tests set MOMENTREG_TEST_PAUSE=point[:match] to freeze the process here."""
    spec = os.environ.get("MOMENTREG_TEST_PAUSE")
    if not spec:
        return
    want, _, match = spec.partition(":")
    if want == point and match in str(where):
        Path(os.environ["MOMENTREG_TEST_PAUSE_FILE"]).write_text(f"{point} {where}")
        time.sleep(3600)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MomentregError(f"{path} does not exist: is {path.parent} a momentreg run?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MomentregError(f"{path} is corrupted ({e})") from None


def read_run(run: Path) -> tuple[dict, dict, dict]:
    """(config, metrics, attacks) of a finished run; attacks is {} when none were run."""
    attacks = run / "attacks.json"
    return (
        read_json(run / "config.json"),
        read_json(run / "metrics.json"),
        read_json(attacks) if attacks.exists() else {},
    )
