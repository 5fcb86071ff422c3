"""The compute of a training step, counted rather than timed: passes per image.

A method's cost in seconds depends on the machine and on what else runs on it; its cost in
floating-point operations does not. ``passes_per_image`` counts, with ``torch.utils.flop_counter``,
the FLOPs of one training step of a method (its loss's forward and backward) and divides them by
the FLOPs of clean training on the same batch (one forward and backward per image). Noise training
is 1 pass per image by construction, m-copy consistency about m, MACER with k samples about k; an
analytic variant's head variance and tail passes count for what they cost.

What is counted: the operations FlopCounterMode prices (convolutions, matrix products, attention).
Elementwise and reduction operations (the ReLU mean's erfc, softmax) are not: where a method has
much of them, as moments through every layer do, its step seconds show a cost its passes do not
(docs/certified.md lists those runs).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from momentreg.training.methods import step_loss

__all__ = ["step_flops", "passes_per_image"]


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, split=None) -> int:
    """The FLOPs of one training step of ``cfg.method`` on the batch x [B, C, H, W], y [B]: the
    loss's forward and its backward to the weights. Runs on a copy of the model (and of
    ``split``, its (head, tail) for an analytic method, copied with it), so no weight, running
    statistic or random stream of the caller changes; a tail that is a plain function closing over
    the model is not copied, and the model's BatchNorm statistics then see the batch."""
    model, split = copy.deepcopy((model, split))
    model.train()
    gen = torch.Generator(device=x.device).manual_seed(0)
    noisy = torch.ones(len(y), dtype=torch.bool, device=x.device)  # augmentation: all noised
    with FlopCounterMode(display=False) as counter:
        loss, _ = step_loss(model, x, y, noisy, cfg, gen, split)
        loss.backward()
    return counter.get_total_flops()


def passes_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, split=None) -> float:
    """FLOPs of one ``cfg.method`` training step over those of a clean one (forward and backward,
    one pass per image) on the same batch: the step's cost in clean passes per image. ``split``:
    the model's (head, tail) split for an analytic method, as the trainer takes it."""
    clean = dataclasses.replace(cfg, method="clean")
    return step_flops(model, x, y, cfg, split) / step_flops(model, x, y, clean)
