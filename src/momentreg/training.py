"""Training with the paper's protocol: clean, N-fold Gaussian augmentation, Cohen-style noise
training, and the analytic moment regularizer; atomic per-epoch checkpoints and exact resume.

Data are (images uint8 or float [N, C, H, W], labels int64 [N]) tensors held in memory; batches are
index-selected from them (no loader processes). Early stopping and the learning-rate schedule follow
the clean validation cross-entropy for every method.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from momentreg.data import to_float
from momentreg.errors import CheckpointError, TrainingError
from momentreg.regularizer import DEPTHS, MOMENT_LOSSES, Split, moment_loss
from momentreg.rundir import CHECKPOINT, HISTORY, atomic_write, pause_for_tests

__all__ = ["TrainConfig", "PROTOCOLS", "METHODS", "train", "load_checkpoint"]

METHODS = ("clean", "augment", "noise", "moment")


@dataclasses.dataclass
class TrainConfig:
    """Every training setting. ``folds`` is N of N-fold augmentation (N = 1 is clean)."""

    method: str = "clean"
    sigma: float = 0.0
    alpha: float = 1.0
    folds: int = 1
    moment_depth: str = "first"  # moment: "first" (the paper) or "all" layers
    moment_loss: str = "mean"  # moment: "mean" or "expected-ce" (needs moment_depth="all")
    moment_noise: bool = False  # moment: the first term sees a freshly noised batch (hybrid)
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 1000
    epochs: int = 100
    plateau_factor: float = 0.9
    plateau_patience: int = 3
    early_stop: int = 10
    time_budget: float = 0.0  # stop once the training steps took this many seconds (0: no limit)
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.moment_depth not in DEPTHS:
            raise ValueError(f"unknown moment depth {self.moment_depth!r}; choose from {DEPTHS}")
        if self.moment_loss not in MOMENT_LOSSES:
            raise ValueError(f"unknown moment loss {self.moment_loss!r}; choose {MOMENT_LOSSES}")
        if self.moment_loss == "expected-ce" and self.moment_depth != "all":
            raise ValueError("moment loss expected-ce needs moment depth all (the output variance)")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        checks = {
            "sigma": self.sigma >= 0 and math.isfinite(self.sigma),
            "alpha": self.alpha >= 0 and math.isfinite(self.alpha),
            "folds": self.folds >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1,
            "weight_decay": self.weight_decay >= 0,
            "momentum": self.momentum >= 0,
            "plateau_factor": 0 < self.plateau_factor < 1,
            "plateau_patience": self.plateau_patience >= 0,
            "early_stop": self.early_stop >= 1,
            "time_budget": self.time_budget >= 0 and math.isfinite(self.time_budget),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {bad[0].replace('_', '-')}: {getattr(self, bad[0])}")


# The paper's protocol per model; any field can be overridden.
PROTOCOLS: dict[str, dict] = {
    "lenet": dict(
        optimizer="adam",
        lr=1e-4,
        batch_size=1000,
        weight_decay=0.0,
        plateau_factor=0.9,
        plateau_patience=3,
        early_stop=10,
    ),
    "alexnet": dict(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        batch_size=128,
        plateau_factor=0.5,
        plateau_patience=5,
        early_stop=20,
    ),
    "resnet18": dict(  # the usual CIFAR recipe, with the plateau schedule of the other models
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        batch_size=128,
        plateau_factor=0.1,
        plateau_patience=10,
        early_stop=30,
    ),
    "resnet20": dict(  # He et al. 2016, with the plateau schedule of the other models
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        batch_size=128,
        plateau_factor=0.1,
        plateau_patience=10,
        early_stop=30,
    ),
}


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickle code runs); clear errors if bad."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable momentreg checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise CheckpointError(f"{path} is not a momentreg checkpoint (format 1)")
    return ckpt


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def _write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in history for k in row))  # older rows may lack some
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue().encode())


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@torch.inference_mode()
def _validate(model, images, labels, batch_size, device) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch_size):
        x, y = (
            to_float(images[i : i + batch_size].to(device)),
            labels[i : i + batch_size].to(device),
        )
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    return loss / len(labels), 100.0 * correct / len(labels)


def _rng_state(cpu_gen: torch.Generator, dev_gen: torch.Generator) -> dict:
    return {"cpu": cpu_gen.get_state(), "device": dev_gen.get_state()}


def train(
    model: nn.Module,
    train_set: tuple[torch.Tensor, torch.Tensor],
    val_set: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    identity: dict | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tensorboard: bool = False,
    split: Split | None = None,
    **overrides,
) -> list[dict]:
    """Train ``model`` in place and leave it with its best-validation weights; return the history.

    ``overrides`` set TrainConfig fields (``method="moment", sigma=1.0, alpha=1.0``, ...). With
    ``out_dir`` a checkpoint and ``history.csv`` are written atomically after every epoch;
    ``resume=True`` continues from that checkpoint and ends with the same weights as an
    uninterrupted run. ``identity`` (e.g. model and dataset names) is stored in the checkpoint and
    must match on resume, as must every config field but ``epochs``. With ``time_budget`` the run
    ends inside the epoch in which its training steps (timed on the host, the step's loss read back)
    have taken that many seconds (the first step of the call, which compiles, is not counted); that
    partial epoch is validated and checkpointed like any other. Where it stops depends on the clock,
    so such a run is not bit-for-bit repeatable.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    device = torch.device(device)
    images, labels = train_set
    n = len(labels)
    if n == 0 or len(val_set[1]) == 0:
        raise ValueError("the training and validation sets must not be empty")
    images, labels = images.to(device), labels.to(device)
    val_images, val_labels = val_set[0].to(device), val_set[1].to(device)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    cpu_gen = torch.Generator().manual_seed(cfg.seed)
    dev_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    identity = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "epochs"},
        **(identity or {}),
    }
    history: list[dict] = []
    best = {"val_loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    bad_epochs, start = 0, 0

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_identity(ckpt.get("identity", {}), identity, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        cpu_gen.set_state(ckpt["rng"]["cpu"])
        dev_gen.set_state(ckpt["rng"]["device"])
        history, best, bad_epochs = ckpt["history"], ckpt["best"], ckpt["bad_epochs"]
        start = ckpt["epoch"]
        if ckpt["stopped"] or start >= cfg.epochs:
            _write_history(out / HISTORY, history)  # a kill may have left the previous one
            model.load_state_dict(best["state"])
            return history

    writer = _tensorboard_writer(out) if tensorboard else None
    pausing = out is not None and "MOMENTREG_TEST_PAUSE" in os.environ  # crash tests only
    elapsed = history[-1]["train_seconds"] if history else 0.0
    # The time budget counts training steps only (not validation or checkpoint writes), and not
    # the first step of each call: it pays one-time costs such as compiling the ReLU kernels.
    step_count = history[-1].get("steps", 0) if history else 0
    step_seconds = history[-1].get("step_seconds", 0.0) if history else 0.0
    warm = False
    folds = cfg.folds if cfg.method == "augment" else 1
    steps = math.ceil(n * folds / cfg.batch_size)
    stopped = False
    epoch_bar = tqdm(
        range(start, cfg.epochs),
        desc="epochs",
        disable=not progress,
        initial=start,
        total=cfg.epochs,
    )
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n * folds, generator=cpu_gen).to(device)
        total_loss, total_correct = 0.0, torch.zeros((), dtype=torch.long, device=device)
        seen, out_of_time = 0, False
        for step in tqdm(
            range(steps), desc=f"epoch {epoch + 1}", disable=not progress, leave=False
        ):
            t_step = time.perf_counter()
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = to_float(images[idx % n]), labels[idx % n]
            loss, logits = _step_loss(model, x, y, idx >= n, cfg, dev_gen, split)
            loss_value = loss.item()  # the step's one host-device sync
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"non-finite loss ({loss_value}) at epoch {epoch + 1}, batch {step + 1}; "
                    + ("the last good checkpoint is kept" if out else "no checkpoint was written")
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss_value * len(y)
            total_correct += (logits.argmax(1) == y).sum()  # stays on the device
            seen += len(y)
            step_count += 1
            step_seconds += time.perf_counter() - t_step if warm else 0.0
            warm = True
            if pausing:
                pause_for_tests("mid-epoch", f"{out}/epoch{epoch + 1}/step{step + 1}/")
            if cfg.time_budget and step_seconds >= cfg.time_budget:
                out_of_time = True  # the last epoch is a partial one
                break
        val_loss, val_acc = _validate(model, val_images, val_labels, cfg.batch_size, device)
        scheduler.step(val_loss)
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()),
            }
            bad_epochs = 0
        else:
            bad_epochs += 1
        elapsed += time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "train_loss": total_loss / seen,
            "train_accuracy": 100.0 * int(total_correct) / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
            "train_seconds": elapsed,
            "steps": step_count,
            "step_seconds": step_seconds,
        }
        history.append(row)
        epoch_bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.2f}")
        if writer is not None:
            for key, value in row.items():
                writer.add_scalar(key, value, epoch + 1)
        stopped = bad_epochs >= cfg.early_stop or out_of_time
        if out is not None:
            finished = stopped or epoch + 1 == cfg.epochs
            _save_checkpoint(
                ckpt_path,
                {
                    "format": 1,
                    "identity": identity,
                    "epoch": epoch + 1,
                    "finished": finished,
                    "stopped": stopped,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(cpu_gen, dev_gen),
                    "history": history,
                    "best": best,
                    "bad_epochs": bad_epochs,
                },
            )
            _write_history(out / HISTORY, history)
            pause_for_tests("after-epoch", f"{out}/epoch{epoch + 1}")
        if stopped:
            break
    if writer is not None:
        writer.close()
    model.load_state_dict(best["state"])
    return history


def _step_loss(model, x, y, noisy, cfg: TrainConfig, gen, split):
    """Loss of one batch and the logits it saw. noisy: bool [B], marks augmentation copies."""
    if cfg.method == "moment":
        noise = None
        if cfg.moment_noise and cfg.sigma > 0:
            noise = torch.randn(x.shape, generator=gen, device=x.device).mul_(cfg.sigma)
        loss, parts = moment_loss(
            model,
            x,
            y,
            cfg.sigma,
            cfg.alpha,
            split,
            depth=cfg.moment_depth,
            loss=cfg.moment_loss,
            noisy=noise,
        )
        return loss, parts["logits"]
    if cfg.method in ("noise", "augment") and cfg.sigma > 0:
        noise = torch.randn(x.shape, generator=gen, device=x.device).mul_(cfg.sigma)
        x = x + (noise if cfg.method == "noise" else noise * noisy.view(-1, 1, 1, 1))
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def _check_identity(stored: dict, wanted: dict, path: Path) -> None:
    # a setting added after the checkpoint was written counts as its default
    config = {**dataclasses.asdict(TrainConfig()), **stored.get("config", {})}
    config.pop("epochs", None)
    flat_stored = {**config, **{k: v for k, v in stored.items() if k != "config"}}
    flat_wanted = {**wanted["config"], **{k: v for k, v in wanted.items() if k != "config"}}
    diffs = [
        f"{k}: checkpoint {flat_stored.get(k)!r}, this run {flat_wanted.get(k)!r}"
        for k in sorted(set(flat_stored) | set(flat_wanted))
        if flat_stored.get(k) != flat_wanted.get(k)
    ]
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run: " + "; ".join(diffs))


def _tensorboard_writer(out: Path | None):
    if out is None:
        raise ValueError("tensorboard logging needs an output directory")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(
            "--tensorboard needs the tensorboard package: pip install 'momentreg[tensorboard]'"
        ) from None
    return SummaryWriter(str(out / "tensorboard"))
