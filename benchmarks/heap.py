"""Does a process that keeps its freed memory grow without bound? Resident set over many steps.

    python -m benchmarks.heap [--steps 100] [--method moment] [--batch 1000]
                              [--json benchmarks/heap.json]

Runs the same LeNet training steps in two fresh processes, one with glibc's malloc defaults and
one after ``momentreg.training.malloc.keep_freed_memory()``, and records each one's resident
set after every 10 steps and its peak (VmHWM), in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.__main__ import make_step, status_kib


def trace(method: str, batch: int, steps: int) -> dict:
    """In this process: the resident set after every 10 steps and at its peak, in MiB."""
    from momentreg.training.malloc import keep_freed_memory

    kept = keep_freed_memory()  # honours MOMENTREG_KEEP_FREED_MEMORY, set by the parent
    step, _ = make_step("lenet", "mnist", batch, method, torch.device("cpu"))
    rss = []
    for i in range(steps):
        step()
        if (i + 1) % 10 == 0:
            rss.append(status_kib("VmRSS") / 1024)
    return {"kept": kept, "rss_mib_every_10_steps": rss, "peak_mib": status_kib("VmHWM") / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heap", description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", default="moment")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/heap.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trace(args.method, args.batch, args.steps)))
        return
    results = {"method": args.method, "batch": args.batch, "steps": args.steps}
    for name, keep in (("glibc_defaults", "0"), ("freed_memory_kept", "1")):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.heap", "--child"]
            + ["--steps", str(args.steps), "--method", args.method, "--batch", str(args.batch)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MOMENTREG_KEEP_FREED_MEMORY": keep},
        )
        results[name] = json.loads(child.stdout.splitlines()[-1])
        r = results[name]
        print(
            f"{name}: peak {r['peak_mib']:.0f} MiB; resident every 10 steps: "
            + " ".join(f"{v:.0f}" for v in r["rss_mib_every_10_steps"])
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
