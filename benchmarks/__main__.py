"""momentreg benchmarks: one process, medians of interleaved timed rounds after warm-up, ratios.

    python -m benchmarks [--quick] [--device cpu|cuda] [--json benchmarks/results.json]

1. training step time per method (LeNet/MNIST batch 1000, AlexNet/CIFAR batch 128), as a ratio to
   a clean step; N-fold augmentation per *clean* image (N x the time of an augmentation step);
   clean and moment steps of ResNet-18 (CIFAR, batch 128), a model with its own forward;
2. the floor of the regularizer: clean step + one forward/backward of the tail on the same batch
   (the backward down to the tail's input, which the moment term needs to train the first layer);
3. GNR over 30 sigmas against its floor of 31 plain forward passes of the same images, and the
   four CIFAR-10-C noise corruptions at five severities against their 20 forward passes;
4. each attack's seconds per image and its ratio to its floor, all six on 400 images (Table 1's
   work for one model), batched L-BFGS against its scipy reference, and certification's noisy
   samples per second against plain forward passes (benchmarks/evaluation.py);
5. peak memory of training steps per method (CUDA: max_memory_allocated above what was allocated
   before the step; CPU, Linux: peak RSS of a fresh child process over 3 steps above its RSS
   before them, also for clean and moment steps with glibc's malloc defaults);
6. scaling of the moment/clean ratio with batch size and input size;
7. data loading: one epoch's batch preparation as a share of a clean epoch;
8. the ReLU mean alone, fused and unfused, against one elementwise multiply of its size;
9. on CPU: the LeNet clean and moment steps with glibc's malloc defaults, before the process
   keeps its freed memory as the ``momentreg`` command does (momentreg/training/malloc.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.evaluation import (
    attacks_markdown,
    bench_attacks,
    bench_certify,
    bench_corruptions,
    certify_markdown,
    targets_markdown,
)
from benchmarks.timing import median_times, sync
from momentreg.core import moments
from momentreg.core.regularizer import split_at_first_relu
from momentreg.evaluation.robustness import gaussian_robustness
from momentreg.models.zoo import DATASETS, build_model
from momentreg.tables import markdown_table
from momentreg.training.loop import TrainConfig
from momentreg.training.malloc import keep_freed_memory
from momentreg.training.methods import step_loss

METHODS = ["clean", "moment", "augment2", "augment6", "augment11", "augment21", "noise"]


def _config(method: str) -> TrainConfig:
    if method.startswith("augment"):
        return TrainConfig.from_flat(
            dict(method="augment", sigma=0.5, folds=int(method[len("augment") :]))
        )
    return TrainConfig(method=method, sigma=0.5, alpha=1.0)


def make_step(model_name, dataset, batch, method, device, size=None):
    """A closure running one optimizer step of ``method`` on a fixed random batch."""
    torch.manual_seed(0)
    model = build_model(model_name, dataset).to(device)
    channels, default_size, classes, _, _ = DATASETS[dataset]
    size = size or default_size
    if size != default_size:  # LeNet at another input size: rebuild the registry's recipe
        from momentreg.models.zoo import MODELS

        model = MODELS[model_name](channels, size, classes, model[0]).to(device)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    cfg = _config(method)
    gen = torch.Generator(device=device).manual_seed(0)
    noisy = (
        torch.arange(batch, device=device) % max(cfg.method_settings.folds, 1) != 0
    )  # (N-1)/N noisy copies

    def step():
        loss, _ = step_loss(model, x, y, noisy, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    head, tail = split_at_first_relu(model)
    with torch.no_grad():
        h = head(x)
    # The moment term trains the head through the tail, so its backward includes the gradient
    # with respect to the tail's input, as the clean step's backward does.
    h.requires_grad_(True)

    def tail_pass():  # the floor's extra work: forward+backward of the tail on the same batch
        h.grad = None
        F.cross_entropy(tail(torch.relu(h)), y).backward()

    return step, tail_pass


def bench_steps(model_name, dataset, batch, device, repeats, methods, size=None) -> dict:
    fns = {}
    for method in methods:
        step, tail_pass = make_step(model_name, dataset, batch, method, device, size)
        fns[method] = step
        if method == "clean":
            fns["tail_pass"] = tail_pass
    out = median_times(fns, repeats, device)
    clean = out["clean"]
    ratios = {}
    for method in methods:
        folds = _config(method).method_settings.folds if method.startswith("augment") else 1
        ratios[method] = folds * out[method] / clean  # per clean image
    ratios["moment_over_floor"] = out["moment"] / (clean + out["tail_pass"])
    return {"seconds": out, "ratio_to_clean": ratios, "batch": batch}


def bench_kernels(device, batch: int, repeats: int) -> dict:
    """The ReLU mean alone on LeNet's first-layer output [batch, 32, 28, 28], forward+backward:
    the fused ``relu_and_mean`` against the same result unfused (ReLU, ``relu_mean``,
    concatenation, two gradients of mu summed), and one elementwise multiply of that size (the
    issue's floor for the elementwise work)."""
    torch.manual_seed(0)
    shape = (batch, 32, 28, 28)
    mu = torch.randn(shape, device=device, requires_grad=True)
    var = (torch.rand(1, *shape[1:], device=device) + 0.1).requires_grad_(True)
    grad = torch.randn(2 * batch, *shape[1:], device=device)
    other = torch.randn(shape, device=device)

    def fused():
        mu.grad = var.grad = None
        moments.relu_and_mean(mu, var).backward(grad)

    def unfused():
        mu.grad = var.grad = None
        torch.cat([torch.relu(mu), moments.relu_mean(mu, var)]).backward(grad)

    def multiply():
        mu.detach() * other

    t = median_times({"fused": fused, "unfused": unfused, "multiply": multiply}, repeats, device)
    return {"batch": batch, "seconds": t, "fused_over_multiply": t["fused"] / t["multiply"]}


def bench_gnr(device, images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model("lenet", "mnist").to(device).eval()
    x = torch.rand(images, 1, 28, 28)
    batch = 256

    def floor():
        with torch.inference_mode():
            for _ in range(31):
                for i in range(0, images, batch):
                    model(x[i : i + batch].to(device))

    def gnr():
        gaussian_robustness(model, x, batch_size=batch, device=device)

    t = median_times({"floor": floor, "gnr": gnr}, repeats, device, warmup=0)
    return {
        "images": images,
        "gnr_seconds": t["gnr"],
        "floor_seconds": t["floor"],
        "ratio": t["gnr"] / t["floor"],
    }


def bench_data_loading(device, images: int, batch: int, repeats: int) -> dict:
    """One clean epoch's batch preparation as training does it (a permutation, then per step an
    index-select of uint8 images and the conversion to float on the device), against the epoch's
    clean steps on the same batches: the share of the epoch spent loading data."""
    from momentreg.data.datasets import to_float

    torch.manual_seed(0)
    data = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (images,)).to(device)
    steps = -(-images // batch)

    def load_epoch():
        perm = torch.randperm(images).to(device)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            to_float(data[idx]), labels[idx]
        sync(device)

    step, _ = make_step("lenet", "mnist", batch, "clean", device)
    t = median_times({"load": load_epoch, "step": step}, repeats, device)
    t_load, t_steps = t["load"], steps * t["step"]
    return {
        "images": images,
        "batch": batch,
        "load_seconds": t_load,
        "steps_seconds": t_steps,
        "share": t_load / (t_load + t_steps),
    }


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_of_step(model_name, dataset, batch, method, steps) -> float:
    """In a fresh process: MiB that ``steps`` training steps add to the resident set at their
    peak (with kept freed memory, later steps show what the heap loses to fragmentation).

    Linux: the peak (VmHWM) is reset through /proc/self/clear_refs right before the steps.
    """
    torch.set_num_threads(1)
    step, _ = make_step(model_name, dataset, batch, method, torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (status_kib("VmHWM") - before) / 1024


GLIBC_DEFAULTS = "+glibc-malloc"  # a memory entry run without keep_freed_memory


def bench_memory(model_name, dataset, batch, device, entries, steps, compiled: bool) -> dict:
    """MiB a training step adds at its peak, per entry (a method, or a method + GLIBC_DEFAULTS).
    CPU: one fresh child process per entry, all at once (peak resident sets do not depend on
    timing). CUDA: allocated memory above what was allocated before the step."""
    if device.type == "cuda":
        out = {}
        for method in entries:
            step, _ = make_step(model_name, dataset, batch, method, device)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            out[method] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            del step
        return {"peak_mib": out, "batch": batch, "steps": 1}
    children = {}
    for entry in entries:
        method = entry.removesuffix(GLIBC_DEFAULTS)
        keep = "0" if entry.endswith(GLIBC_DEFAULTS) else "1"
        children[entry] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", "--memory-child"]
            + [f"{model_name},{dataset},{batch},{method},{steps}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "MOMENTREG_COMPILE": "1" if compiled else "0",
                "MOMENTREG_KEEP_FREED_MEMORY": keep,
            },
        )
    out = {}
    for entry, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        if child.returncode != 0:
            raise RuntimeError(f"memory child for {entry} failed:\n{stderr}")
        out[entry] = float(stdout.split()[-1])
    return {"peak_mib": out, "batch": batch, "steps": steps}


def _floor_ratio(r: dict) -> str:
    return f"{r['ratio_to_clean']['moment_over_floor']:.2f}"


def _steps_table(steps: dict) -> str:
    header = ["method", *(f"{name}, batch {r['batch']}" for name, r in steps.items())]
    rows = []
    for method in next(iter(steps.values()))["ratio_to_clean"]:
        if method != "moment_over_floor":
            cells = [
                f"{r['ratio_to_clean'][method]:.2f} ({r['seconds'][method]:.3f} s)"
                if method in r["ratio_to_clean"]
                else "not run"
                for r in steps.values()
            ]
            rows.append([method, *cells])
    rows.append(
        ["one extra tail pass", *(f"{r['seconds']['tail_pass']:.3f} s" for r in steps.values())]
    )
    rows.append(
        ["moment / (clean + tail pass)", *(f"**{_floor_ratio(r)}**" for r in steps.values())]
    )
    return markdown_table(header, rows, align="l" + "r" * len(steps))


def _malloc_table(default: dict, kept: dict) -> str:
    rows = [
        [method, f"{default['seconds'][method]:.3f}", f"{kept['seconds'][method]:.3f}"]
        for method in ("clean", "tail_pass", "moment")
    ]
    rows.append(["moment / (clean + tail pass)", _floor_ratio(default), _floor_ratio(kept)])
    header = ["seconds per step", "glibc defaults", "freed memory kept"]
    return markdown_table(header, rows, align="lrr")


def _scaling_table(scaling: dict) -> str:
    rows = [
        [
            key,
            f"{r['seconds']['clean']:.3f} s",
            f"{r['seconds']['moment']:.3f} s",
            f"{r['ratio_to_clean']['moment']:.2f}",
            _floor_ratio(r),
        ]
        for key, r in scaling.items()
    ]
    header = ["setting", "clean", "moment", "moment / clean", "moment / (clean + tail)"]
    return markdown_table(header, rows, align="lrrrr")


def _evaluation_table(g: dict, d: dict, c: dict | None) -> str:
    rows = [
        [
            f"GNR, {g['images']} images x 30 sigmas / 31 forward passes",
            f"{g['gnr_seconds']:.2f} s",
            f"{g['floor_seconds']:.2f} s",
            f"{g['ratio']:.2f}",
        ],
    ]
    if c is not None:
        rows.append(
            [
                f"noise corruptions, {c['images']} images x 4 x 5 severities / 20 forward passes",
                f"{c['corruption_seconds']:.2f} s",
                f"{c['floor_seconds']:.2f} s",
                f"{c['ratio']:.2f}",
            ]
        )
    rows += [
        [
            f"batch preparation, {d['images']} images at batch {d['batch']} / clean epoch",
            f"{d['load_seconds']:.3f} s",
            f"{d['load_seconds'] + d['steps_seconds']:.2f} s",
            f"{100 * d['share']:.2f}%",
        ],
    ]
    return markdown_table(["measure", "time", "floor or whole", "ratio"], rows, align="lrrr")


def markdown(results: dict) -> str:
    """The results as the markdown tables docs/performance.md embeds (and the run prints)."""
    steps = results["steps"]
    out = ["### Training step, ratio to a clean step (per clean image)", "", _steps_table(steps)]
    if "malloc_default" in results:
        default = results["malloc_default"]
        title = "glibc's malloc defaults against kept freed memory"
        out += ["", f"### {title} (LeNet, batch {default['batch']})", ""]
        out.append(_malloc_table(default, steps["lenet-mnist"]))
    k, t = results["kernels"], results["kernels"]["seconds"]
    out += ["", f"### The ReLU mean alone, forward+backward, [{k['batch']}, 32, 28, 28]", ""]
    header = ["fused [relu; T]", "unfused", "one elementwise multiply", "fused / multiply"]
    cells = [f"{t['fused']:.3f} s", f"{t['unfused']:.3f} s", f"{t['multiply']:.3f} s"]
    out.append(markdown_table(header, [[*cells, f"{k['fused_over_multiply']:.1f}"]], "rrrr"))
    if "scaling" in results:
        out += ["", "### Scaling with batch size and input size (LeNet)", ""]
        out.append(_scaling_table(results["scaling"]))
    out += ["", "### Evaluation and data loading", ""]
    out.append(
        _evaluation_table(results["gnr"], results["data_loading"], results.get("corruptions"))
    )
    out += [
        "",
        *targets_markdown(results["attacks"], results["certify"], results.get("corruptions")),
    ]
    out += ["", *attacks_markdown(results["attacks"])]
    out += ["", *certify_markdown(results["certify"])]
    for name, m in results["memory"].items():
        out += ["", f"### Peak memory of {m['steps']} training steps, {name}, batch {m['batch']}"]
        peaks = [f"{v:.0f} MiB" for v in m["peak_mib"].values()]
        out += ["", markdown_table(list(m["peak_mib"]), [peaks], align="r" * len(peaks))]
    out += [
        "",
        f"Device {results['device']}, torch {results['torch']}, {results['threads']} threads, "
        f"compile {'on' if results['compile'] else 'off'}, freed memory kept: "
        f"{results['keep_freed_memory']}; the run took {results['benchmark_seconds']:.0f} s.",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--no-compile", action="store_true", help="eager ReLU-mean kernels")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="JSON",
        help="print the tables of a results file; run nothing",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    if args.memory_child:
        model_name, dataset, batch, method, steps = args.memory_child.split(",")
        keep_freed_memory()  # as the momentreg command runs (off: MOMENTREG_KEEP_FREED_MEMORY=0)
        print(peak_rss_of_step(model_name, dataset, int(batch), method, int(steps)))
        return
    device = torch.device(args.device)
    moments.set_compile(not args.no_compile)
    t_start = time.perf_counter()
    results = run(device, args.quick, compiled=not args.no_compile)
    results["benchmark_seconds"] = time.perf_counter() - t_start
    print(markdown(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


def _larger_models(results: dict, section, device, repeats: int, methods: list[str]) -> None:
    """The full run's step timings beyond LeNet on MNIST: AlexNet and ResNet-18 on CIFAR-10, and
    LeNet's moment step against its batch and input size."""
    steps = results["steps"]
    steps["alexnet-cifar10"] = section(
        "steps alexnet-cifar10",
        lambda: bench_steps("alexnet", "cifar10", 128, device, repeats, methods),
    )
    steps["resnet18-cifar10"] = section(
        "steps resnet18-cifar10",  # a model with its own forward, split by torch.fx
        lambda: bench_steps("resnet18", "cifar10", 128, device, 3, ["clean", "moment"]),
    )
    pair = ["clean", "moment"]
    results["scaling"] = section(
        "scaling",
        lambda: {
            "batch 250, 28x28": bench_steps("lenet", "mnist", 250, device, repeats, pair),
            "batch 500, 28x28": bench_steps("lenet", "mnist", 500, device, repeats, pair),
            "batch 1000, 28x28": steps["lenet-mnist"],
            "batch 500, 32x32x3": bench_steps("lenet", "cifar10", 500, device, repeats, pair),
        },
    )


def run(device: torch.device, quick: bool, compiled: bool) -> dict:
    """Every section in order; ``section_seconds`` records how long each took."""
    repeats = 3 if quick else 5
    lenet_batch = 100 if quick else 1000
    methods = ["clean", "moment", "augment2", "augment6"] if quick else METHODS
    results = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "compile": compiled,
        "quick": quick,
        "steps": {},
        "section_seconds": {},
    }

    def section(name, fn):
        t0 = time.perf_counter()
        out = fn()
        results["section_seconds"][name] = time.perf_counter() - t0
        return out

    if device.type == "cpu" and not quick:  # glibc's defaults first: the setting is one-way
        results["malloc_default"] = section(
            "malloc_default",
            lambda: bench_steps("lenet", "mnist", lenet_batch, device, 3, ["clean", "moment"]),
        )
    results["keep_freed_memory"] = keep_freed_memory()
    results["steps"]["lenet-mnist"] = section(
        "steps lenet-mnist",
        lambda: bench_steps("lenet", "mnist", lenet_batch, device, repeats, methods),
    )
    if not quick:
        _larger_models(results, section, device, repeats, methods)
    results["kernels"] = section("kernels", lambda: bench_kernels(device, lenet_batch, repeats))
    results["gnr"] = section("gnr", lambda: bench_gnr(device, 200 if quick else 500, 1))
    results["corruptions"] = section(
        "corruptions", lambda: bench_corruptions(device, 100 if quick else 1000, 1 if quick else 3)
    )
    results["data_loading"] = section(
        "data_loading",
        lambda: bench_data_loading(device, 2000 if quick else 10000, 128, repeats),
    )
    results["attacks"] = section(
        "attacks",
        lambda: bench_attacks(device, 20 if quick else 400, 5 if quick else 50, 2000),
    )
    results["certify"] = section(
        "certify", lambda: bench_certify(device, 2 if quick else 10, 2000 if quick else 10_000)
    )
    entries = ["clean", "moment"] if quick else ["clean", "moment", "augment6", "noise"]
    if device.type == "cpu" and not quick:
        entries += ["clean" + GLIBC_DEFAULTS, "moment" + GLIBC_DEFAULTS]
    results["memory"] = section(
        "memory",
        lambda: {
            "lenet-mnist": bench_memory(
                "lenet", "mnist", lenet_batch, device, entries, 2 if quick else 3, compiled
            )
        },
    )
    return results


if __name__ == "__main__":
    main()
