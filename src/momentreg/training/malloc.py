"""glibc malloc settings for CPU training: keep freed memory for the next step.

A training step allocates and frees activations of tens of MB (LeNet's first layer at batch 1000
is 100 MB). glibc serves any block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free, so every step faults all of those pages in
again. Serving every block from the heap and never trimming it makes the next step reuse the
same pages. The cost: the process keeps its peak memory until it exits, plus what the heap
loses to fragmentation. ``python -m benchmarks`` measures both sides (docs/performance.md).

The ``momentreg`` command and ``python -m benchmarks`` call :func:`keep_freed_memory` at start;
``MOMENTREG_KEEP_FREED_MEMORY=0`` turns it off. In your own training script call it once, or
preload jemalloc or tcmalloc. CUDA memory is unaffected (PyTorch caches it itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and never return freed heap to the system
    (glibc ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)``); process-wide.

    Returns True when both settings took effect; False, changing nothing, where the C library is
    not glibc (musl, macOS, Windows) or the environment sets MOMENTREG_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get("MOMENTREG_KEEP_FREED_MEMORY", "1") in ("0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # the parameter numbers above are glibc's
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
