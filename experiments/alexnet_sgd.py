"""Why AlexNet with the moment regularizer fails under the paper's SGD protocol: per-step logs.

Trains AlexNet on an image folder (CIFAR-10, JPEG copy) with the paper's protocol (SGD lr 0.1,
Nesterov momentum 0.9, weight decay 5e-4, batch 128, no noise warm-up) and writes one CSV row per
step: the clean and moment terms, the total loss, the gradient norm, the smallest and largest
head std s, the largest |mu / s|, the largest logit, and the first non-finite value with where it
appeared (head mean, head variance, the square root, the ReLU mean, the logits, a loss term, the
ReLU-mean backward, a parameter gradient, or a parameter after the optimizer step).

    python experiments/alexnet_sgd.py --cifar-dir .data/cifar10 --variant sum --sigma 0.125 \
        --steps 1500 --out docs/results/alexnet-sgd/sum-0.125.csv

Variants: ``clean``; ``sum`` (the paper's Eq. 2, CE + alpha * CE_moment); ``convex`` (the same
divided by 1 + alpha, the authors' code's weighting); ``half-lr`` (the sum at lr / 2); and
``clean-double-lr`` (clean at lr * 2: what the sum's gradient is for a moment term equal to the
clean one). The run stops at the first non-finite value.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from momentreg.core.moments import _safe_std, relu_and_mean
from momentreg.core.regularizer import head_moments, split_at_first_relu
from momentreg.data.datasets import to_float
from momentreg.models.zoo import build_model, input_spec
from momentreg.runs.run import RunConfig, load_splits
from momentreg.training.loop import _optimizer

VARIANTS = ("clean", "sum", "convex", "half-lr", "clean-double-lr")
COLUMNS = ("step", "epoch", "clean", "moment", "loss", "grad_norm", "s_min", "s_max", "z_max",
           "logit_max", "val_accuracy", "nonfinite")  # fmt: skip


def _bad(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


class Probe:
    """Where the first non-finite value of a step appears, in the order the step computes."""

    def __init__(self):
        self.where: str | None = None

    def check(self, name: str, t: torch.Tensor) -> None:
        if self.where is None and _bad(t.detach()):
            self.where = name

    def on_grad(self, name: str):
        def hook(grad):
            self.check(name, grad)

        return hook


def forward(model, split, x, y, sigma, moment: bool, probe: Probe):
    """(clean CE, moment CE or None, logits, stats): the regularizer's step, with probes."""
    if not moment:
        logits = model(x)
        probe.check("logits", logits)
        return F.cross_entropy(logits, y), None, logits, {}
    head, tail = split
    mu, var = head_moments(head, sigma, x)
    probe.check("head mean", mu)
    probe.check("head variance", var)
    s = _safe_std(var, var.dtype)  # the std the ReLU-mean kernel uses
    probe.check("square root", s)
    stacked = relu_and_mean(mu, var)
    probe.check("ReLU mean", stacked)
    if stacked.requires_grad:
        stacked.register_hook(probe.on_grad("ReLU-mean backward (grad of its output)"))
    if mu.requires_grad:
        mu.register_hook(probe.on_grad("ReLU-mean backward (grad of head mean)"))
    logits, expected = tail(stacked).split(x.shape[0])
    probe.check("logits", torch.cat([logits, expected]))
    stats = {
        "s_min": s.min().item(),
        "s_max": s.max().item(),
        "z_max": (mu / s).abs().max().item(),
    }
    return F.cross_entropy(logits, y), F.cross_entropy(expected, y), logits, stats


@torch.no_grad()
def accuracy(model, images, labels, batch=1000) -> float:
    model.eval()
    hits = sum(
        (model(to_float(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(labels), batch)
    )
    model.train()
    return 100.0 * hits / len(labels)


def run(args) -> int:
    torch.manual_seed(args.seed)
    config = RunConfig.from_settings(
        {"model": "alexnet", "dataset": "imagefolder", "data_dir": args.cifar_dir}
    )
    (images, labels), (val_images, val_labels), _ = load_splits(config)
    classes = int(labels.max()) + 1
    spec = input_spec(torch.cat([images, val_images]), classes)
    model = build_model("alexnet", "imagefolder", spec)
    split = split_at_first_relu(model)
    cfg = config.train  # the protocol's SGD, its learning rate scaled by the variant
    lr = cfg.optimizer.lr * {"half-lr": 0.5, "clean-double-lr": 2.0}.get(args.variant, 1.0)
    optimizer = _optimizer(model, cfg.replace(lr=lr))
    moment = args.variant not in ("clean", "clean-double-lr")
    scale = 1 / (1 + args.alpha) if args.variant == "convex" else 1.0
    gen = torch.Generator().manual_seed(args.seed)
    batch = cfg.optimizer.batch_size
    steps_per_epoch = math.ceil(len(labels) / batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        model.train()
        perm = None
        for step in range(1, args.steps + 1):
            i = (step - 1) % steps_per_epoch
            if i == 0:
                perm = torch.randperm(len(labels), generator=gen)
            idx = perm[i * batch : (i + 1) * batch]
            x, y = to_float(images[idx]), labels[idx]
            probe = Probe()
            terms = forward(model, split, x, y, args.sigma, moment, probe)
            clean, moment_term, logits, stats = terms
            loss = clean if moment_term is None else clean + args.alpha * moment_term
            loss = loss * scale
            probe.check("clean term", clean)
            if moment_term is not None:
                probe.check("moment term", moment_term)
            optimizer.zero_grad(set_to_none=True)
            if probe.where is None:
                loss.backward()
                for name, p in model.named_parameters():
                    probe.check(f"gradient of {name}", p.grad)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else 0
            if probe.where is None:
                optimizer.step()
                for name, p in model.named_parameters():
                    probe.check(f"parameter {name} after the step", p)
            end_of_epoch = i == steps_per_epoch - 1 or step == args.steps or probe.where is not None
            row = {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch + 1,
                "clean": clean.item(),
                "moment": "" if moment_term is None else moment_term.item(),
                "loss": loss.item(),
                "grad_norm": float(norm),
                "logit_max": logits.detach().abs().max().item(),
                "val_accuracy": accuracy(model, val_images, val_labels) if end_of_epoch else "",
                "nonfinite": probe.where or "",
                **stats,
            }
            writer.writerow(row)
            f.flush()
            if step % 50 == 0 or probe.where:
                print(f"step {step}: " + ", ".join(f"{k} {row.get(k, '')}" for k in COLUMNS[2:]),
                      flush=True)  # fmt: skip
            if probe.where:
                print(f"first non-finite value at step {step}: {probe.where}")
                return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cifar-dir", type=Path, required=True, help="train/<class>/, test/<class>/")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--sigma", type=float, default=0.125)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the per-step CSV")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
