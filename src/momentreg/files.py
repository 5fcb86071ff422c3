"""Files written whole or not at all: atomic writes, torch.save through them, JSON in and out."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from momentreg.errors import MomentregError

__all__ = ["atomic_write", "atomic_save", "write_json", "read_json"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. disk full: drop the partial copy, keep the old file
        raise
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def atomic_save(path: Path, obj) -> None:
    """``torch.save`` of ``obj`` to ``path`` through ``atomic_write``: old file or new, whole."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MomentregError(f"{path} does not exist: is {path.parent} a momentreg run?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MomentregError(f"{path} is corrupted ({e})") from None
