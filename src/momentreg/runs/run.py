"""One training run as library code: its configuration, training it into a run directory, loading
it back, and evaluating it. The CLI, the sweeps, the demo and the study scripts all go through here.

    config = RunConfig.from_settings({"model": "lenet", "dataset": "mnist", "data_dir": "mnist/",
                                      "method": "moment", "sigma": 1.0})
    metrics = train_run(config, Path("runs/x"))          # config.json ... metrics.json
    config_dict, model = load_run(Path("runs/x"), "cpu")  # the best weights
    certify_run(Path("runs/x"), model, *test_subset(config_dict, limit=500, stride=20), sigma=0.25)

A run directory's files are named in ``momentreg.runs.rundir``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from momentreg import __version__
from momentreg.core.regularizer import check_regularizable
from momentreg.data.datasets import (
    DATASET_NAMES,
    IMAGEFOLDER,
    load_dataset,
    to_float,
    train_val_split,
)
from momentreg.data.imagefolder import imagefolder_classes
from momentreg.errors import ConfigError, MomentregError, UsageError
from momentreg.evaluation.robustness import gaussian_robustness, prediction_stats
from momentreg.files import update_json
from momentreg.models.weights import load_weights, sha256_of
from momentreg.models.zoo import MODELS, build_model, input_spec, is_factory
from momentreg.runs.rundir import (
    ATTACKS_FILE,
    CERTIFY_FILE,
    CHECKPOINT,
    CONFIG,
    METRICS,
    atomic_save,
    atomic_write,
    certify_partial,
    certify_tsv,
    clear_run,
    read_json,
    write_json,
)
from momentreg.training.config import FLAT_FIELDS, PROTOCOLS, TrainConfig, upgrade_recorded
from momentreg.training.cost import passes_per_image
from momentreg.training.loop import load_checkpoint, model_weights, train
from momentreg.training.methods import ANALYTIC

__all__ = [
    "RunConfig",
    "environment",
    "train_run",
    "load_run",
    "test_subset",
    "evaluate_accuracy",
    "attack_run",
    "certify_run",
    "prepare_out_dir",
]

TRAIN_FIELDS = set(FLAT_FIELDS)  # the flat names of every training setting
# written into config.json by train_run, not settings
_RECORDED = ("version", "input_spec", "weights_sha256")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run: the data and model, evaluation limits, the device, and the
    TrainConfig. Its flat form (``flat()``; config.json, sweep specs, ``train`` options) names
    every field at one level."""

    model: str = "lenet"
    dataset: str = "mnist-sample"
    data_dir: str | None = None
    download: bool = False
    train_limit: int | None = None
    val_fraction: float = 0.1
    gnr_limit: int | None = None
    noise_samples: int = 1
    device: str = "cpu"
    weights: str | None = None  # start from this plain state_dict (a user's trained model)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @classmethod
    def from_settings(cls, settings: dict, recorded: bool = False) -> RunConfig:
        """Flat settings -> a validated RunConfig. Training fields not given come from the
        model's protocol (``train_config.PROTOCOLS``; a user model gets LeNet's). ``recorded``:
        the settings come from a config.json, perhaps of an earlier momentreg
        (``upgrade_recorded``)."""
        if recorded:
            settings = upgrade_recorded(settings)
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"train"}
        unknown = set(settings) - run_fields - TRAIN_FIELDS - set(_RECORDED)
        if unknown:
            raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}")
        model = settings.get("model", "lenet")
        train_settings = {**PROTOCOLS.get(model, PROTOCOLS["lenet"])}
        train_settings.update({k: v for k, v in settings.items() if k in TRAIN_FIELDS})
        run = {k: v for k, v in settings.items() if k in run_fields}
        for key in ("data_dir", "weights"):
            if run.get(key) is not None:
                run[key] = str(run[key])
        try:
            config = cls(**run, train=TrainConfig.from_flat(train_settings))
            config.validate()
        except TypeError as e:  # e.g. "epochs": "ten" in a JSON or TOML file
            raise ConfigError(f"a setting has the wrong type ({e})") from None
        return config

    def flat(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("train")
        return {**fields, **self.train.flat()}

    def validate(self) -> None:
        if self.model not in MODELS and not is_factory(self.model):
            raise ConfigError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.dataset not in DATASET_NAMES:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {DATASET_NAMES}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("train_limit", "gnr_limit", "noise_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"invalid {name.replace('_', '-')}: {value}")
        self.train.validate()


def device_of(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a torch.device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None


def prepare_out_dir(out: Path, resume: bool, force: bool) -> bool:
    """Check an output directory before any work; returns whether it already existed."""
    existed = out.exists()
    if existed and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if existed and any(out.iterdir()) and not (resume or force):
        raise UsageError(
            f"--out {out} is not empty: pass --resume to continue or --force to overwrite"
        )
    parent = out if existed else next((p for p in out.parents if p.exists()), Path("."))
    try:  # a real write probe: permission bits say nothing for root or a read-only mount
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".momentreg-probe-"))
    except OSError as e:
        raise UsageError(f"--out {out} is not writable ({e.strerror})") from None
    return existed


def check_free_space(out: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold the checkpoint twice (old and new copy during the
    atomic write); a checkpoint holds the weights four times (current, best, two Adam moments)."""
    need = 8 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        raise UsageError(
            f"{out}: {free / 2**20:.1f} MiB free, but checkpoints of this model need about "
            f"{need / 2**20:.1f} MiB"
        )


def load_splits(config: RunConfig) -> tuple[tuple, tuple, tuple]:
    """(train, validation, test) sets (uint8 images, labels) of a run."""
    images, labels = load_dataset(config.dataset, config.data_dir, "train", config.download)
    limit, seed = config.train_limit, config.train.seed
    if limit and config.dataset == IMAGEFOLDER:  # sorted by class: a random subset
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        keep = pick[:limit].sort().values
        images, labels = images[keep], labels[keep]
    elif limit:
        images, labels = images[:limit], labels[:limit]
    train_set, val_set = train_val_split(images, labels, config.val_fraction, seed=seed)
    test_set = load_dataset(config.dataset, config.data_dir, "test", config.download)
    return train_set, val_set, test_set


def robustness_metrics(model, images, labels, gnr_images, noise_samples, seed, device, progress):
    """Test accuracy on float ``images`` and GNR (with its curve) on the first ``gnr_images``."""
    stats = prediction_stats(model, images, labels, device=device)
    gnr, sigmas, consistency = gaussian_robustness(
        model,
        images[:gnr_images],
        noise_samples=noise_samples,
        seed=seed,
        device=device,
        progress=progress,
    )
    return {
        **stats,
        "gnr": gnr,
        "gnr_images": min(gnr_images, len(labels)),
        "gnr_noise_samples": noise_samples,
        "gnr_curve": {"sigmas": sigmas.tolist(), "consistency": consistency.tolist()},
    }


def environment(device: torch.device | str | None = None) -> dict:
    """Where results are made: the date, the Python and torch versions, the GPU (the name of
    ``device`` if it is a CUDA one; with no device, of the current CUDA device if there is one,
    else None), the CPU count and the platform. A run records it in its metrics.json, a study
    beside its runs."""
    device = None if device is None else torch.device(device)
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def train_run(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    tensorboard: bool = False,
) -> dict:
    """Train one run into ``out`` (config.json, checkpoint.pt, history.csv, metrics.json) and
    return its metrics. ``resume`` continues an interrupted run (a finished one is returned as
    it is); ``force`` first clears what an earlier run left there (rundir.clear_run)."""
    cfg = config.train
    device = device_of(config.device)
    existed = prepare_out_dir(out, resume, force)
    if resume and (out / METRICS).exists():
        return read_json(out / METRICS)  # finished: nothing to train or evaluate again
    train_set, val_set, test_set = load_splits(config)
    spec = None
    if config.dataset == IMAGEFOLDER:  # the model is shaped by the folder's images
        classes = len(imagefolder_classes(config.data_dir))
        spec = input_spec(torch.cat([train_set[0], val_set[0]]), classes)
    torch.manual_seed(cfg.seed)
    model = build_model(config.model, config.dataset, spec)
    if cfg.method in ANALYTIC:  # a model the regularizer cannot split fails before any writing
        check_regularizable(model, cfg.method_settings.moment_depth)
    digest = None
    if config.weights is not None:  # the user's weights, checked before anything is written
        if not (resume and (out / CHECKPOINT).exists()):
            load_weights(model, config.weights)
        digest = sha256_of(config.weights)
    check_free_space(next(p for p in (out, *out.parents) if p.exists()), model)
    if force and not resume and existed:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {**config.flat(), "device": str(device)}
    recorded = {"input_spec": spec, "weights_sha256": digest}
    write_json(out / CONFIG, {"version": __version__, **flat, **recorded})
    t0 = time.perf_counter()
    # the step's FLOPs, counted before training: a model the counter cannot take fails now
    batch = [t[: cfg.optimizer.batch_size].to(device) for t in train_set]
    passes = passes_per_image(model.to(device), to_float(batch[0]), batch[1], cfg)
    history = train(
        model,
        train_set,
        val_set,
        cfg,
        out_dir=out,
        resume=resume,
        identity={"model": config.model, "dataset": config.dataset, "version": __version__},
        device=device,
        progress=progress,
        tensorboard=tensorboard,
        passes=passes,  # counted once, for the metrics and a pass budget
    )
    images, labels = to_float(test_set[0]), test_set[1]
    gnr_images = config.gnr_limit or len(labels)
    metrics = robustness_metrics(
        model, images, labels, gnr_images, config.noise_samples, cfg.seed, device, progress
    )
    best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
    kept_epoch = best_epoch if cfg.schedule.keep == "best" else len(history)  # its end weights
    metrics.update(
        epochs=len(history),
        best_epoch=best_epoch,
        kept_epoch=kept_epoch,
        train_seconds=history[-1]["train_seconds"],
        steps=history[-1].get("steps"),  # absent in checkpoints older than the budget
        step_seconds=history[-1].get("step_seconds"),
        seconds_per_epoch=history[-1]["train_seconds"] / len(history),
        passes_per_image=passes,  # a step's FLOPs over a clean step's (momentreg.training.cost)
        wall_seconds=time.perf_counter() - t0,
        environment=environment(device),  # where it was made: a study may mix runs of two days
    )
    write_json(out / METRICS, metrics)
    return metrics


def load_run(run: Path, device, model_name: str | None = None) -> tuple[dict, torch.nn.Module]:
    """(config, model with the run's best weights) of a finished or interrupted run. A run whose
    model comes from a user factory loads only when ``model_name`` names that factory again:
    building it runs the factory's code, which must be code the user names, not a run folder."""
    config = read_json(run / CONFIG)
    if is_factory(config["model"]) and model_name != config["model"]:
        raise UsageError(
            f"{run} was trained on the model of {config['model']}; loading it runs that code, so "
            f"name it: --model {config['model']}"
        )
    ckpt = load_checkpoint(run / CHECKPOINT)
    model = build_model(config["model"], config["dataset"], config.get("input_spec"))
    try:
        model.load_state_dict(model_weights(ckpt))
    except RuntimeError as e:
        raise MomentregError(f"{run / CHECKPOINT} does not fit {config['model']}: {e}") from None
    return config, model.to(device)


def test_subset(
    config: dict, data_dir=None, limit: int | None = None, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images, labels) of a run's test set: every ``stride``-th image, then the first
    ``limit`` (a class-balanced subset of a test set sorted by class, such as an image folder's)."""
    images, labels = load_dataset(config["dataset"], data_dir or config["data_dir"], "test")
    return to_float(images[::stride][:limit]), labels[::stride][:limit]


def evaluate_accuracy(run: Path, model, images, labels, *, gnr: bool, noise_samples: int = 1,
                      seed: int = 0, device="cpu", progress: bool = True) -> dict:  # fmt: skip
    """Recompute test accuracy (and with ``gnr`` the GNR and its curve) into the run's
    metrics.json, keeping its other entries; returns the updated metrics."""
    path = run / METRICS
    metrics = read_json(path) if path.exists() else {}
    if gnr:
        metrics.update(
            robustness_metrics(
                model, images, labels, len(labels), noise_samples, seed, device, progress
            )
        )
    else:
        metrics.update(prediction_stats(model, images, labels, device=device))
    metrics["test_images"] = len(labels)
    write_json(path, metrics)
    return metrics


def attack_run(run: Path, model, images, labels, attacks: list[str], *, tol: float = 0.01,
               seed: int = 0, stride: int = 1, progress: bool = True) -> dict:  # fmt: skip
    """Minimal perturbations of each attack into the run's attacks.json, written after every
    attack so that a crash keeps the finished ones; returns all of the run's attack results."""
    from momentreg.evaluation.attacks import minimal_perturbations

    path = run / ATTACKS_FILE
    results = read_json(path) if path.exists() else {}
    for name in attacks:
        result = minimal_perturbations(
            model, images, labels, name, tol=tol, seed=seed, progress=progress
        )
        summary = {**result.summary(), "tol": tol, "seed": seed, "stride": stride}
        results = update_json(path, {name: {**summary, "test_images": len(labels)}})
    return results


def certify_run(run: Path, model, images, labels, *, sigma: float, n0: int = 100,
                n: int = 100_000, alpha: float = 0.001, batch: int = 1000, seed: int = 0,
                stride: int = 1, progress: bool = True) -> dict:  # fmt: skip
    """Cohen et al.'s CERTIFY for every image: certify-sigma<S>.tsv (per image, ``idx`` the index
    in the test set when ``images`` are its every ``stride``-th) and this sigma's summary in
    certify.json; returns the summary.

    Until it ends, the rows so far and the noise generator's state are kept in
    certify-sigma<S>.partial.pt after each group of images, so that a call killed halfway is
    continued by the next one with the same model weights, images, settings, kind of device and
    torch version, to the rows an uninterrupted call gives (certify.certify_images); anything
    else starts over."""
    from momentreg.evaluation.certify import certify_images, format_tsv, summarize

    if not alpha < 1:
        raise UsageError(f"--alpha must be below 1, got {alpha}")
    partial = run / certify_partial(sigma)
    device = next(model.parameters()).device.type  # the generator's state is of its device
    drawn_with = [sigma, n0, n, alpha, batch, seed, device, torch.__version__]
    fingerprint = _fingerprint(model, images, labels, drawn_with)
    done, state = _certified_so_far(partial, fingerprint)
    if done and progress:
        print(f"resuming the certification at image {len(done) + 1} of {len(labels)}")

    def keep(rows, generator_state):
        atomic_save(partial, {"fingerprint": fingerprint, "rows": rows, "state": generator_state})

    rows = certify_images(
        model, images, labels, sigma, n0=n0, n=n, alpha=alpha, batch=batch, seed=seed,
        progress=progress, done=done, state=state, checkpoint=keep,
    )  # fmt: skip
    for row in rows:  # the TSV's idx is the test-set index: images are every stride-th
        row["idx"] *= stride
    atomic_write(run / certify_tsv(sigma), format_tsv(rows).encode())
    settings = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "stride": stride}
    results = update_json(run / CERTIFY_FILE, {f"{sigma:g}": {**summarize(rows), **settings}})
    partial.unlink(missing_ok=True)
    return results[f"{sigma:g}"]


def _fingerprint(model, images, labels, settings: list) -> str:
    """A digest of the model's weights, the images, their labels and ``settings``."""
    digest = hashlib.sha256(repr(settings).encode())
    for t in (*model.state_dict().values(), images, labels):
        digest.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _certified_so_far(partial: Path, fingerprint: str) -> tuple[list[dict] | None, object]:
    """(rows, generator state) of an interrupted certification of the same ``fingerprint``, else
    (None, None): a file of another model, images or settings, or one that cannot be read."""
    if not partial.exists():
        return None, None
    try:
        kept = torch.load(partial, map_location="cpu", weights_only=True)
    except Exception:  # torn or not ours: certify from the start
        return None, None
    if not isinstance(kept, dict) or kept.get("fingerprint") != fingerprint:
        return None, None
    return kept["rows"], kept["state"]
