"""What the CIFAR grid's executor must be chosen from, measured on one GPU in one short call.

    python benchmarks/gpu.py --out $OUT/measure.json            # about 3 minutes
    python benchmarks/gpu.py --smoke --out /tmp/measure.json    # the same steps, CPU

1. Training steps per second of one run, through momentreg's own step (``_train_step``: the
   loss, its backward, the one read-back, the optimizer), for LeNet (Adam, batch 1000) and
   AlexNet (SGD, batch 128) at their protocols: clean, moment and 21-fold augmentation (whose
   clean image costs 21 such steps), in fp32, TF32 and under bf16 autocast.
2. k runs at once (1, 4, 8, 16), each a process training LeNet's moment step, with and without
   CUDA MPS (``nvidia-cuda-mps-control -d``, started and stopped here): their summed steps per
   second, and the GPU's utilization sampled by nvidia-smi every 200 ms meanwhile.

The data are random tensors on the device: a step's speed does not depend on the pixels. Writes
one JSON file; the executor is chosen from it, and docs/performance.md records it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from momentreg.runs.run import RunConfig, environment
from momentreg.training.loop import TrainState, _train_step

BATCHES = {"lenet": 1000, "alexnet": 128}  # the protocols'; --smoke: 8 each
METHODS = {
    "clean": {"method": "clean"},
    "moment": {"method": "moment", "sigma": 0.25, "alpha": 1.0},
    "augment21": {"method": "augment", "sigma": 0.25, "folds": 21},
}


def make_step(model: str, method: str, device: torch.device, precision: str):
    """One training step of ``method`` on ``model``'s protocol, as a closure, on a random batch
    (augmentation: every copy in it noisy but one in 21)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    config = RunConfig.from_settings(
        {"model": model, "dataset": "cifar10", "sigma_warmup": 0, **METHODS[method]}
    )
    torch.manual_seed(0)
    from momentreg.models.zoo import build_model

    net = build_model(model, "cifar10").to(device)
    state = TrainState.start(net, config.train, device)
    batch = int(os.environ.get("MOMENTREG_MEASURE_BATCH", BATCHES[model]))
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    noisy = torch.arange(batch, device=device) % 21 != 0
    cast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )

    def step():
        with cast:
            _train_step(state, x, y, noisy, config.train, None)

    return step


def steps_per_second(step, seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Steps a second over ``seconds`` after ``warmup`` steps (the first compiles)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()  # each step reads its loss back: the device is synchronized step by step
        steps += 1
    return steps / (time.perf_counter() - t0)


def single_runs(device: torch.device, seconds: float, precisions, warmup: int) -> list[dict]:
    rows = []
    for model in BATCHES:
        for method in METHODS:
            for precision in precisions:
                step = make_step(model, method, device, precision)
                rate = steps_per_second(step, seconds, device, warmup)
                rows.append({"model": model, "method": method, "precision": precision,
                             "steps_per_s": rate})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


class Utilization:
    """nvidia-smi's GPU utilization, sampled every 200 ms while the block runs (none on CPU)."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[int] = []

    def __enter__(self):
        if self.on:
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen([*query, "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.on:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = [int(v) for v in out.split() if v.strip().isdigit()]

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def mps(start: bool) -> bool:
    """Start (or stop) the CUDA MPS daemon; whether the command exists."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return False
    if start:
        subprocess.run([control, "-d"], check=True)
    else:
        subprocess.run([control], input="quit\n", text=True, check=False)
    time.sleep(1)
    return True


def concurrent(k: int, device: torch.device, seconds: float) -> dict:
    """k processes, each LeNet's moment step: all warm up, then run ``seconds`` together."""
    go = Path(tempfile.mkdtemp()) / "go"
    cmd = [sys.executable, __file__, "--worker", str(go), "--device", str(device),
           "--seconds", str(seconds)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
    for w in workers:
        assert w.stdout.readline().strip() == "ready"
    with Utilization(device) as util:
        go.touch()
        rates = [float(w.stdout.readline()) for w in workers]
    for w in workers:
        w.wait()
    return {"runs": k, "steps_per_s_total": sum(rates), "steps_per_s_per_run": rates,
            "gpu_utilization_mean": util.mean()}  # fmt: skip


def worker(go: Path, device: torch.device, seconds: float) -> None:
    step = make_step("lenet", "moment", device, "fp32")
    for _ in range(3):
        step()
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    print(steps_per_second(step, seconds, device, warmup=0), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="the same steps on the CPU, in seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else args.device)
    if args.worker:
        return worker(args.worker, device, args.seconds)
    if args.smoke:
        os.environ["MOMENTREG_COMPILE"] = "0"  # children too: no kernel compile per process
        os.environ["MOMENTREG_MEASURE_BATCH"] = "8"
    seconds = 0.2 if args.smoke else args.seconds
    precisions = ("fp32", "bf16") if device.type == "cpu" else ("fp32", "tf32", "bf16")
    warmup = 1 if args.smoke else 3
    result = {
        "environment": environment(device),
        "batches": {
            m: int(os.environ.get("MOMENTREG_MEASURE_BATCH", b)) for m, b in BATCHES.items()
        },
        "single": single_runs(device, seconds, precisions, warmup),
    }
    counts = (1, 2) if args.smoke else (1, 4, 8, 16)
    result["concurrent"] = []
    for use_mps in (False, True):
        if use_mps and (device.type != "cuda" or not mps(start=True)):
            continue
        try:
            for k in counts:
                row = {"mps": use_mps, **concurrent(k, device, 2 * seconds)}
                result["concurrent"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            if use_mps:
                mps(start=False)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
