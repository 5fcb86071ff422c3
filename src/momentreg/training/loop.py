"""The training loop of every method (``momentreg.training.methods``) under a ``TrainConfig``:
epochs of index-selected batches, validation, the learning-rate schedule, early stopping, time
budgets, atomic per-epoch checkpoints and exact resume.

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
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from momentreg.core.regularizer import Split, moment_loss
from momentreg.data.datasets import to_float
from momentreg.errors import CheckpointError, ConfigError, TrainingError
from momentreg.files import atomic_save, atomic_write
from momentreg.training.config import TrainConfig, upgrade_recorded
from momentreg.training.cost import passes_per_image
from momentreg.training.methods import step_loss

__all__ = [
    "TrainConfig",  # train()'s settings, from momentreg.training.config
    "TrainState",
    "CollapseWarning",
    "train",
    "train_one_epoch",
    "load_checkpoint",
    "model_weights",
]

CHECKPOINT = "checkpoint.pt"  # what train writes into its out_dir
HISTORY = "history.csv"


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


def model_weights(ckpt: dict) -> dict:
    """The weights a checkpoint's run ends with: once finished, its best-validation weights (or
    its last epoch's, for a run with keep="last"); before, the weights of its last epoch."""
    keep = ckpt.get("identity", {}).get("config", {}).get("keep", "best")
    return ckpt["best"]["state"] if ckpt["finished"] and keep == "best" else ckpt["model"]


def _write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in history for k in row))  # older rows may lack some
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue().encode())


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer.name == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.optimizer.lr,
        momentum=cfg.optimizer.momentum,
        nesterov=cfg.optimizer.nesterov and cfg.optimizer.momentum > 0,
        weight_decay=cfg.optimizer.weight_decay,
    )


@torch.inference_mode()
def _validate(model, images, labels, batch_size, device) -> tuple[float, float, bool]:
    """(mean loss, accuracy %, whether the predictions collapsed: at least ``COLLAPSE_SHARE`` of
    the images, and twice as many as the most common label has, get one class). Each batch's
    loss, hits and predictions stay on the device until the end: one read for the epoch; the
    losses are summed in Python's float64, in order."""
    model.eval()
    parts, counts = [], 0
    for i in range(0, len(labels), batch_size):
        x, y = (
            to_float(images[i : i + batch_size].to(device)),
            labels[i : i + batch_size].to(device),
        )
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        hits = (pred == y).sum()  # exact in float32 up to 2^24 images a batch
        counts = counts + torch.bincount(pred, minlength=logits.shape[1])
        parts.append(torch.stack([loss.float(), hits.float()]))
    common = torch.bincount(labels.to(device)).max()
    parts.append(torch.stack([counts.max(), common]).float())
    *rows, (top, label_top) = torch.stack(parts).tolist()
    losses, hits = zip(*rows, strict=True)
    loss, correct = sum(losses), int(sum(hits))
    collapsed = top >= COLLAPSE_SHARE * len(labels) and top >= 2 * label_top
    return loss / len(labels), 100.0 * correct / len(labels), collapsed


class CollapseWarning(UserWarning):
    """Validation predictions collapsed onto one class: the run is not learning."""


COLLAPSE_SHARE = 0.9  # of the validation images given one class, for a collapse


# -- the state of a run, and its checkpoint ------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds: the model, optimizer, schedule and random streams, the
    history so far, the best weights and early stopping's count."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    # None for the budget-step schedule, which sets the rate from the step clock (_budget_lr)
    scheduler: (
        torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    )
    cpu_gen: torch.Generator  # the order of examples
    dev_gen: torch.Generator  # the noise
    history: list = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=dict)
    bad_epochs: int = 0
    stopped: bool = False

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, device: torch.device) -> TrainState:
        optimizer = _optimizer(model, cfg)
        if cfg.schedule.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, cfg.schedule.lr_step, cfg.schedule.lr_gamma
            )
        elif cfg.schedule.lr_schedule == "budget-step":
            scheduler = None
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                factor=cfg.schedule.plateau_factor,
                patience=cfg.schedule.plateau_patience,
            )
        best = {"val_loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
        cpu_gen = torch.Generator().manual_seed(cfg.seed)
        dev_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        return cls(model, optimizer, scheduler, cpu_gen, dev_gen, best=best)

    @property
    def epoch(self) -> int:
        """Epochs done."""
        return len(self.history)

    def last(self, key: str, default=0):
        return self.history[-1].get(key, default) if self.history else default

    def to_checkpoint(self, identity: dict, finished: bool) -> dict:
        return {
            "format": 1,
            "identity": identity,
            "epoch": self.epoch,
            "finished": finished,
            "stopped": self.stopped,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "rng": {"cpu": self.cpu_gen.get_state(), "device": self.dev_gen.get_state()},
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.cpu_gen.set_state(ckpt["rng"]["cpu"])
        self.dev_gen.set_state(ckpt["rng"]["device"])
        self.history, self.best = ckpt["history"], ckpt["best"]
        self.bad_epochs, self.stopped = ckpt["bad_epochs"], ckpt["stopped"]

    def end_epoch(self, row: dict) -> None:
        """Record a validated epoch: schedule, best weights, early stopping."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(row["val_loss"])
        elif self.scheduler is not None:
            self.scheduler.step()
        if row["val_loss"] < self.best["val_loss"]:
            state = copy.deepcopy(self.model.state_dict())
            self.best = {"val_loss": row["val_loss"], "epoch": row["epoch"], "state": state}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.history.append(row)


@dataclasses.dataclass
class _StepClock:
    """Training steps and their seconds, for the budget: the first step of each call (which
    compiles the ReLU kernels) is counted as a step but not timed."""

    steps: int = 0
    seconds: float = 0.0
    warm: bool = False

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds if self.warm else 0.0
        self.warm = True

    def share(self, cfg: TrainConfig) -> float:
        """The share of ``cfg``'s time or step budget used so far."""
        return cfg.budget_share(self.steps, self.seconds)

    def spent(self, cfg: TrainConfig) -> bool:
        """Whether ``cfg``'s budget is used up (never without one: its share stays 0)."""
        return self.share(cfg) >= 1


# -- the loop -----------------------------------------------------------------------------------


def _train_step(state: TrainState, x, y, noisy, cfg: TrainConfig, split) -> tuple:
    """One optimizer step; returns (loss, gradient norm, correct predictions on the device).
    Reading the loss and the gradient norm back is the step's one host-device sync; a non-finite
    loss or gradient stops training before the step changes any weight."""
    loss, logits = step_loss(state.model, x, y, noisy, cfg, state.dev_gen, split)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    norm = (
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if grads
        else torch.zeros((), device=loss.device)
    )
    value, grad_norm = torch.stack([loss.detach(), norm.detach().to(loss.dtype)]).tolist()
    if not math.isfinite(value):
        raise TrainingError(f"non-finite {_bad_term(state.model, x, y, cfg, split, value)}")
    if not math.isfinite(grad_norm):
        raise TrainingError(f"non-finite gradient (norm {grad_norm}) of a finite loss ({value})")
    state.optimizer.step()
    return value, grad_norm, (logits.argmax(1) == y).sum()


@torch.no_grad()
def _bad_term(model, x, y, cfg: TrainConfig, split, value: float) -> str:
    """Which term of the regularizer's loss is non-finite on this batch (its clean or its moment
    term), for the error; other methods' losses have one term, ``value``."""
    if cfg.method != "moment":
        return f"loss ({value})"
    m = cfg.method_settings
    _, parts = moment_loss(model, x, y, cfg.sigma, cfg.alpha, split, depth=m.moment_depth,
                           loss=m.moment_loss, weighting=m.moment_weighting)  # fmt: skip
    bad = [name for name in ("clean", "moment") if not torch.isfinite(parts[name])]
    values = ", ".join(f"{name} {parts[name].item()}" for name in ("clean", "moment"))
    terms = f"{' and '.join(bad)} terms" if len(bad) > 1 else f"{(bad or ['total'])[0]} term"
    return f"{terms} of the loss ({values})"


def _step_config(cfg: TrainConfig, epoch: int, clock: _StepClock) -> TrainConfig:
    """The settings of the next step: the regularizer off during ``alpha_delay`` epochs and the
    first ``alpha_delay_budget`` share of the budget, and the noise level ramped up linearly
    over the first ``sigma_warmup`` steps."""
    changes = {}
    if epoch <= cfg.schedule.alpha_delay or clock.share(cfg) < cfg.schedule.alpha_delay_budget:
        changes["alpha"] = 0.0
    if clock.steps < cfg.schedule.sigma_warmup:
        changes["sigma"] = cfg.sigma * (clock.steps + 1) / cfg.schedule.sigma_warmup
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _budget_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, clock: _StepClock) -> None:
    """The budget-step schedule: lr times lr_gamma for every lr_step_budget share of the budget
    the training steps have used (the anchors' "/ 10 at epochs 30 and 60 of 90" as shares of a
    budget of seconds or steps)."""
    decays = math.floor(clock.share(cfg) / cfg.schedule.lr_step_budget)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optimizer.lr * cfg.schedule.lr_gamma**decays


def train_one_epoch(state, images, labels, cfg, clock, split, progress) -> dict:
    """One pass over the training set (N-fold augmentation: N passes, N-1 of them noisy), in a
    seeded order; stops early once ``clock`` is past the budget. Returns the epoch's loss
    and accuracy."""
    state.model.train()
    n = len(labels)
    folds = cfg.method_settings.folds if cfg.method == "augment" else 1
    perm = torch.randperm(n * folds, generator=state.cpu_gen).to(labels.device)
    total_loss, correct, seen = 0.0, torch.zeros((), dtype=torch.long, device=labels.device), 0
    grad_max = 0.0
    epoch = state.epoch + 1
    steps = math.ceil(n * folds / cfg.optimizer.batch_size)
    for step in tqdm(range(steps), desc=f"epoch {epoch}", disable=not progress, leave=False):
        t_step = time.perf_counter()
        idx = perm[step * cfg.optimizer.batch_size : (step + 1) * cfg.optimizer.batch_size]
        x, y = to_float(images[idx % n]), labels[idx % n]
        if cfg.schedule.lr_schedule == "budget-step":
            _budget_lr(state.optimizer, cfg, clock)
        try:
            loss, grad_norm, hits = _train_step(
                state, x, y, idx >= n, _step_config(cfg, epoch, clock), split
            )
        except TrainingError as e:
            where = f"step {clock.steps + 1} (epoch {epoch}, batch {step + 1})"
            raise TrainingError(f"{e} at {where}") from None
        total_loss, correct, seen = total_loss + loss * len(y), correct + hits, seen + len(y)
        grad_max = max(grad_max, grad_norm)
        clock.add(time.perf_counter() - t_step)
        if clock.spent(cfg):
            break  # the last epoch is a partial one
    return {
        "epoch": epoch,
        "train_loss": total_loss / seen,
        "train_accuracy": 100.0 * int(correct) / seen,
        "grad_norm_max": grad_max,
    }


def _pass_budget_as_steps(model, images, labels, cfg: TrainConfig, split, passes) -> TrainConfig:
    """``cfg`` with its pass budget turned into the step budget it allows: a step's cost in clean
    passes per image (``passes``, or counted by momentreg.training.cost on the first batch of
    ``images``),
    and ``pass_budget`` clean epochs of them hold ``cfg.pass_budget_steps`` such steps. The count
    is the same on every call, so a resumed run ends where an uninterrupted one does."""
    if not cfg.budget.passes:
        return cfg
    if passes is None:
        x, y = to_float(images[: cfg.optimizer.batch_size]), labels[: cfg.optimizer.batch_size]
        passes = passes_per_image(model, x, y, cfg, split)
    steps = cfg.pass_budget_steps(passes, len(labels))
    return cfg.replace(pass_budget=0.0, step_budget=steps)


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
    passes: float | None = None,
    **overrides,
) -> list[dict]:
    """Train ``model`` in place and leave it with its best-validation weights (``keep="last"``:
    its last epoch's); return the history.

    ``overrides`` set TrainConfig fields (``method="moment", sigma=1.0, alpha=1.0``, ...; its
    budgets are described there). With ``out_dir`` a checkpoint and ``history.csv`` are written
    atomically after every epoch; ``resume=True`` continues from that checkpoint and ends with the
    same weights as an uninterrupted run. ``identity`` (e.g. model and dataset names) is stored in
    the checkpoint and must match on resume, as must every config field but ``epochs``.

    Args:
        model: the network, trained in place (on ``device``).
        train_set, val_set: ``(images, labels)``, uint8 or float images in [0, 1].
        config: a :class:`TrainConfig` (default: its defaults), changed by ``overrides``.
        out_dir, resume, identity: where checkpoints and history go; continue from them; what
            must match to resume.
        device, progress, tensorboard: where to train; progress bars; TensorBoard logs in
            ``out_dir``.
        split: ``(head, tail)`` for a model torch.fx cannot split.
        passes: the step's passes per image where the caller has counted them (as
            momentreg.training.cost.passes_per_image on a first batch), for ``pass_budget``;
            else the trainer counts them.

    Returns:
        The history: one dict per epoch (loss, accuracies, time, ...), as in history.csv.

    Shape:
        images: [N, C, H, W]; labels: [N].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x, y = torch.rand(64, 1, 2, 2), torch.arange(64) % 2
        >>> history = train(net, (x, y), (x, y), epochs=2, batch_size=16, lr=1e-2,
        ...                 method="moment", sigma=0.5, alpha=1.0, progress=False)
        >>> [row["epoch"] for row in history], "val_accuracy" in history[0]
        ([1, 2], True)
    """
    cfg = (config or TrainConfig()).replace(**overrides)
    cfg.validate()
    device = torch.device(device)
    if len(train_set[1]) == 0 or len(val_set[1]) == 0:
        raise ConfigError("the training and validation sets must not be empty")
    images, labels = train_set[0].to(device), train_set[1].to(device)
    val_images, val_labels = val_set[0].to(device), val_set[1].to(device)
    state = TrainState.start(model.to(device), cfg, device)
    identity = {
        "config": {k: v for k, v in cfg.flat().items() if k != "epochs"},
        **(identity or {}),
    }
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is not None and _restored_and_finished(state, out, identity, cfg):
        _end_weights(model, state, cfg)
        return state.history
    writer = _tensorboard_writer(out) if tensorboard else None
    cfg = _pass_budget_as_steps(model, images, labels, cfg, split, passes)
    try:
        _run_epochs(state, cfg, (images, labels), (val_images, val_labels), out=out,
                    identity=identity, writer=writer, split=split, progress=progress)  # fmt: skip
    finally:
        if writer is not None:
            writer.close()
    _end_weights(model, state, cfg)
    return state.history


def _restored_and_finished(state: TrainState, out: Path, identity: dict, cfg) -> bool:
    """Restore ``state`` from ``out``'s checkpoint, if there is one and it is this run's; True
    if that run has already ended (its history.csv rewritten: a kill may have left an old one)."""
    if not (out / CHECKPOINT).exists():
        return False
    ckpt = load_checkpoint(out / CHECKPOINT)
    _check_identity(ckpt.get("identity", {}), identity, out / CHECKPOINT)
    state.restore(ckpt)
    if state.stopped or state.epoch >= cfg.schedule.epochs:
        _write_history(out / HISTORY, state.history)
        return True
    return False


def _run_epochs(state, cfg, train_set, val_set, *, out, identity, writer, split, progress):
    """The epochs from ``state``'s to the schedule's last or a stop: train, validate, record,
    save."""
    clock = _StepClock(state.last("steps"), state.last("step_seconds", 0.0))
    epochs = tqdm(
        range(state.epoch, cfg.schedule.epochs), desc="epochs", disable=not progress,
        initial=state.epoch, total=cfg.schedule.epochs,
    )  # fmt: skip
    for _ in epochs:
        t0 = time.perf_counter()
        try:
            row = train_one_epoch(state, *train_set, cfg, clock, split, progress)
        except TrainingError as e:
            kept = (
                f"the last good checkpoint (epoch {state.epoch}) and history are kept in {out}"
                if out is not None and state.epoch
                else "no checkpoint was written"
            )
            raise TrainingError(f"{e}; {kept}") from None
        row["val_loss"], row["val_accuracy"], row["collapsed"] = _validate(
            state.model, *val_set, cfg.optimizer.batch_size, val_set[0].device
        )
        if row["collapsed"] and not any(r.get("collapsed") for r in state.history):
            warnings.warn(
                f"epoch {row['epoch']}: the model gives one class to at least "
                f"{COLLAPSE_SHARE:.0%} of the validation images (accuracy "
                f"{row['val_accuracy']:.2f}%): training has collapsed (flagged in the history)",
                CollapseWarning,
                stacklevel=3,
            )
        state.end_epoch(_history_row(row, state, clock, time.perf_counter() - t0))
        state.stopped = state.bad_epochs >= cfg.schedule.early_stop or clock.spent(cfg)
        epochs.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.2f}")
        if writer is not None:
            _log(writer, state)
        if out is not None:
            _save_epoch(
                out, state, identity, finished=state.stopped or state.epoch == cfg.schedule.epochs
            )
        if state.stopped:
            break


def _end_weights(model: nn.Module, state: TrainState, cfg: TrainConfig) -> None:
    """Leave ``model`` with the weights the run ends with: the best validation loss's, or with
    keep="last" the last epoch's (which it holds already)."""
    if cfg.schedule.keep == "best":
        model.load_state_dict(state.best["state"])


def _save_epoch(out: Path, state: TrainState, identity: dict, finished: bool) -> None:
    """The epoch's checkpoint, then its history.csv, each written atomically."""
    atomic_save(out / CHECKPOINT, state.to_checkpoint(identity, finished))
    _write_history(out / HISTORY, state.history)


def _log(writer, state: TrainState) -> None:
    for key, value in state.history[-1].items():
        writer.add_scalar(key, value, state.epoch)


def _history_row(row: dict, state: TrainState, clock: _StepClock, seconds: float) -> dict:
    """An epoch's history.csv row: ``row`` (epoch, train and validation loss and accuracy, in
    the file's column order), then the timing columns (``seconds``: the epoch's training and
    validation), then the epoch's largest gradient norm and whether its validation collapsed."""
    later = {k: row.pop(k) for k in ("grad_norm_max", "collapsed")}  # columns added later
    return {
        **row,
        "lr": None,  # set by end_epoch, after the schedule's step
        "epoch_seconds": seconds,
        "train_seconds": state.last("train_seconds", 0.0) + seconds,
        "steps": clock.steps,
        "step_seconds": clock.seconds,
        **later,
    }


def _check_identity(stored: dict, wanted: dict, path: Path) -> None:
    # a setting added after the checkpoint was written counts as its default
    recorded = upgrade_recorded({**TrainConfig().flat(), **stored.get("config", {})})
    config = TrainConfig.from_flat(recorded).flat()
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
        raise ConfigError("tensorboard logging needs an output directory")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(
            "--tensorboard needs the tensorboard package: pip install 'momentreg[tensorboard]'"
        ) from None
    return SummaryWriter(str(out / "tensorboard"))
