"""Does each randomized-smoothing method's training step cost what its FLOPs say? Step seconds
against the floor of its passes per image (docs/certified*.md's two measures of cost) on a
quiet machine, where the studies measure step seconds beside other runs.

    python -m benchmarks.smoothing [--device cpu|cuda] [--quick] [--json benchmarks/smoothing.json]

Every method of docs/certified.md at sigma 0.5 with the study's weights, on the anchors' LeNet
(``smoothing-lenet``, MNIST's shape) and recipe (SGD, batch 256), through the trainer's own step
(``training._train_step``: the loss, its one read back, backward, optimizer step). Per method:
the median seconds of a step over interleaved rounds after a warm-up round (which compiles the
ReLU-mean kernels), its passes per image (``momentreg.training.cost``: the step's FLOPs over a clean
step's) and the ratio of its seconds to passes x a clean step's seconds, the floor a step that
costs only its FLOPs would reach. Above 1: time the FLOPs do not explain (kernel launches, small
ops, waits); below 1: a larger batch's better use of the device (MACER's 16 copies).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.timing import median_times
from momentreg.core.regularizer import check_regularizable
from momentreg.models.zoo import build_model
from momentreg.tables import markdown_table
from momentreg.training.config import PROTOCOLS, TrainConfig
from momentreg.training.cost import passes_per_image
from momentreg.training.loop import TrainState, _train_step
from momentreg.training.malloc import keep_freed_memory
from momentreg.training.methods import ANALYTIC

SIGMA = 0.5
# label -> the TrainConfig settings of the method's runs in experiments/certified.toml at sigma 0.5
METHODS = {
    "clean": {"method": "clean"},
    "noise": {"method": "noise"},
    "stability": {"method": "stability", "alpha": 2.0},
    "consistency": {"method": "consistency", "alpha": 5.0},
    "macer": {"method": "macer", "alpha": 16.0},
    "macer (1 noisy copy)": {"method": "macer", "alpha": 16.0, "samples": 1},
    "macer (2 noisy copies)": {"method": "macer", "alpha": 16.0, "samples": 2},
    "moment": {"method": "moment", "alpha": 1.0},
    "stability-analytic": {"method": "stability-analytic", "alpha": 2.0},
    "consistency-analytic": {"method": "consistency-analytic", "alpha": 5.0},
    "macer-analytic": {"method": "macer-analytic", "alpha": 16.0},
    "macer-analytic (1 noisy copy)": {"method": "macer-analytic", "alpha": 16.0, "samples": 1},
    "macer-analytic (all layers)": {
        "method": "macer-analytic",
        "alpha": 16.0,
        "moment_depth": "all",
    },
}


def make_step(settings: dict, batch: int, device: torch.device):
    """(one training step of the method on a fixed random batch, its passes per image)."""
    recipe = {k: v for k, v in PROTOCOLS["smoothing-lenet"].items() if k != "early_stop"}
    cfg = TrainConfig.from_flat({**recipe, "sigma": SIGMA, "sigma_warmup": 0, **settings})
    cfg.validate()
    torch.manual_seed(0)
    model = build_model("smoothing-lenet", "mnist").to(device)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    noisy = torch.ones(batch, dtype=torch.bool, device=device)
    passes = passes_per_image(model, x, y, cfg)
    split = (
        check_regularizable(model, cfg.method_settings.moment_depth)
        if cfg.method in ANALYTIC
        else None
    )
    state = TrainState.start(model, cfg, device)
    return (lambda: _train_step(state, x, y, noisy, cfg, split)), passes


def run(device: torch.device, batch: int, repeats: int) -> dict:
    steps, passes = {}, {}
    for label, settings in METHODS.items():
        steps[label], passes[label] = make_step(settings, batch, device)
    seconds = median_times(steps, repeats, device)
    clean = seconds["clean"]
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "batch": batch,
        "repeats": repeats,
        "sigma": SIGMA,
        "methods": {
            label: {
                "settings": METHODS[label],
                "seconds": seconds[label],
                "passes_per_image": passes[label],
                "ratio_to_clean": seconds[label] / clean,
                "ratio_to_floor": seconds[label] / (passes[label] * clean),
            }
            for label in METHODS
        },
    }


def markdown(results: dict) -> str:
    """The table docs/performance.md embeds (and the run prints)."""
    rows = [
        [
            label,
            f"{m['seconds'] * 1000:.1f} ms",
            f"{m['passes_per_image']:.2f}",
            f"{m['ratio_to_clean']:.2f}",
            f"**{m['ratio_to_floor']:.2f}**",
        ]
        for label, m in results["methods"].items()
    ]
    header = ["method", "step", "passes per image", "step / clean step", "step / floor"]
    where = results["gpu"] or f"{results['device']}, {results['threads']} threads"
    first, deep = [], []
    for m in results["methods"].values():
        (deep if m["settings"].get("moment_depth") == "all" else first).append(m["ratio_to_floor"])
    spread = f"{min(first):.2f} to {max(first):.2f}"
    return (
        markdown_table(header, rows, align="lrrrr")
        + f"\nsmoothing-lenet, batch {results['batch']}, sigma {results['sigma']:g}, median of "
        f"{results['repeats']} interleaved rounds; {where}, torch {results['torch']}. Step / "
        f"floor: {spread} for every method at the paper's depth"
        + (
            f", {', '.join(f'{r:.2f}' for r in deep)} with moments through every layer"
            if deep
            else ""
        )
        + ".\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.smoothing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 rounds: seconds")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/smoothing.json"))
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the table of a results file"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    keep_freed_memory()  # as the momentreg command runs
    results = run(torch.device(args.device), 32 if args.quick else 256, 2 if args.quick else 7)
    print(markdown(results), end="")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
