"""Wall-clock timing on any device: synchronized around the timed call, and medians of
interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn's result, the seconds it took, the device's queued work included)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median_times(fns: dict, repeats: int, device, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` interleaved rounds, after ``warmup``
    rounds: a change in the machine's load between rounds reaches every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[1])
    return {name: statistics.median(t) for name, t in times.items()}
