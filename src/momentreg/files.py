"""Files written whole or not at all: atomic writes, torch.save through them, JSON in and out."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path

import torch

from momentreg.errors import MomentregError

__all__ = ["atomic_write", "atomic_save", "write_json", "read_json", "update_json"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, whole.
    Each call writes its own temporary file, so that two processes writing one path at once
    leave one of the two files, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:  # the umask's permissions, as a plain open gives
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


def lock_file(path: Path) -> Path:
    """The file ``update_json`` locks to update ``path``: .NAME.lock beside it."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path``'s lock file (``lock_file``) meanwhile; where the
    platform has no ``fcntl`` (Windows), no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms the tests run on
        yield
        return
    with open(lock_file(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_json(path: Path, changes: dict) -> dict:
    """Set the keys of ``changes`` in the JSON object at ``path`` (made if absent) and return it
    whole. The read and the write hold a lock, so that processes updating one file at once (two
    evaluations of one run) keep each other's keys."""
    path = Path(path)
    with _locked(path):
        data = read_json(path) if path.exists() else {}
        data.update(changes)
        write_json(path, data)
    return data
