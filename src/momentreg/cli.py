"""The ``momentreg`` command: train, evaluate, demo.

Every user mistake ends with ``momentreg: error: <one line>`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from momentreg import __version__
from momentreg.data import DATASET_NAMES, IMAGEFOLDER, load_dataset, to_float, train_val_split
from momentreg.errors import MomentregError
from momentreg.imagefolder import imagefolder_classes
from momentreg.malloc import keep_freed_memory
from momentreg.models import MODELS, build_model, input_spec, is_factory
from momentreg.regularizer import check_regularizable
from momentreg.robustness import accuracy, gaussian_robustness
from momentreg.rundir import atomic_write, clear_run, read_json, write_json
from momentreg.training import CHECKPOINT, METHODS, PROTOCOLS, TrainConfig, train
from momentreg.training import load_checkpoint as _load_checkpoint

USAGE_ERROR = 2
USER_MODEL_HELP = "the FILE.py:FUNCTION the run was trained with, to allow running it again"


class UsageError(MomentregError):
    """Bad arguments or paths: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as the CLI reports every mistake: one line."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"momentreg: error: {message} (see {self.prog} --help)\n")


# -- argument types ------------------------------------------------------------------------------


def _number(kind, lo=None, strict=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if kind is float and value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite: {text!r}")
        if lo is not None and (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}: {text!r}")
        return value

    return parse


nonneg_float, pos_float = _number(float, 0), _number(float, 0, strict=True)
nonneg_int, pos_int = _number(int, 0), _number(int, 0, strict=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None


def _model_name(text: str) -> str:
    if text in MODELS or is_factory(text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(sorted(MODELS))}, or FILE.py:FUNCTION)"
    )


# -- output directories ---------------------------------------------------------------------------


def prepare_out_dir(out: Path, resume: bool, force: bool) -> bool:
    """Check --out before any work; returns whether the directory already existed."""
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


# -- commands -------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="lenet",
        type=_model_name,
        help=f"{', '.join(sorted(MODELS))}, or your own: path/to/file.py:function or "
        "package.module:function, called as function(channels, size, classes) -> nn.Module "
        "on images in [0, 1] (trained with the LeNet protocol unless you set it)",
    )
    p.add_argument("--dataset", default="mnist-sample", choices=DATASET_NAMES)
    p.add_argument("--data-dir", type=Path, help="folder with the official dataset files")
    p.add_argument("--download", action="store_true", help="fetch missing files (checksummed)")
    p.add_argument("--method", default="clean", choices=METHODS)
    p.add_argument("--sigma", type=nonneg_float, default=0.0, help="training noise std (pixels)")
    p.add_argument("--alpha", type=nonneg_float, default=1.0, help="weight of the moment term")
    p.add_argument("--folds", type=pos_int, default=1, help="N of N-fold augmentation")
    p.add_argument(
        "--moment-depth",
        choices=("first", "all"),
        help="moment: moments to the first ReLU (the paper, default) or through all layers",
    )
    p.add_argument(
        "--moment-loss",
        choices=("mean", "expected-ce"),
        help="moment: CE of the expected logits (default) or the expected CE (needs depth all)",
    )
    p.add_argument(
        "--moment-noise",
        action="store_true",
        default=None,
        help="moment: the first term sees freshly noised images (noise training + analytic term)",
    )
    protocol = "defaults: the paper's protocol for --model (LeNet: Adam 1e-4, batch 1000)"
    g = p.add_argument_group("optimization", protocol)
    g.add_argument("--optimizer", choices=("adam", "sgd"))
    g.add_argument("--lr", type=pos_float)
    g.add_argument("--momentum", type=nonneg_float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=nonneg_float)
    g.add_argument("--batch-size", type=pos_int)
    g.add_argument("--epochs", type=pos_int, default=100, help="at most this many epochs")
    g.add_argument("--plateau-factor", type=pos_float)
    g.add_argument("--plateau-patience", type=nonneg_int)
    g.add_argument("--early-stop", type=pos_int, help="patience of early stopping (epochs)")
    g.add_argument(
        "--time-budget",
        type=pos_float,
        help="stop once the training steps took this many seconds (validation not counted)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-limit",
        type=pos_int,
        help="use only the first N training images (of an image folder, which is sorted by "
        "class: N drawn at random with --seed)",
    )
    p.add_argument("--val-fraction", type=pos_float, default=0.1)
    p.add_argument("--gnr-limit", type=pos_int, help="GNR on the first N test images only")
    p.add_argument("--noise-samples", type=pos_int, default=1, help="noise draws per GNR level")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {**PROTOCOLS.get(args.model, PROTOCOLS["lenet"])}
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.val_fraction >= 1:
        raise UsageError(f"--val-fraction must be below 1, got {args.val_fraction}")
    cfg = TrainConfig(**settings)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def load_splits(args) -> tuple[tuple, tuple, tuple]:
    images, labels = load_dataset(args.dataset, args.data_dir, "train", args.download)
    if args.train_limit and args.dataset == IMAGEFOLDER:  # sorted by class: a random subset
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
        keep = pick[: args.train_limit].sort().values
        images, labels = images[keep], labels[keep]
    elif args.train_limit:
        images, labels = images[: args.train_limit], labels[: args.train_limit]
    train_set, val_set = train_val_split(images, labels, args.val_fraction, seed=args.seed)
    return train_set, val_set, load_dataset(args.dataset, args.data_dir, "test", args.download)


def evaluate_model(model, test_set, gnr_limit, noise_samples, seed, device, progress) -> dict:
    images, labels = to_float(test_set[0]), test_set[1]
    acc = accuracy(model, images, labels, device=device)
    n = gnr_limit or len(labels)
    gnr, sigmas, consistency = gaussian_robustness(
        model, images[:n], noise_samples=noise_samples, seed=seed, device=device, progress=progress
    )
    return {
        "test_accuracy": acc,
        "gnr": gnr,
        "gnr_images": n,
        "gnr_noise_samples": noise_samples,
        "gnr_curve": {"sigmas": sigmas.tolist(), "consistency": consistency.tolist()},
    }


def run_training(args: argparse.Namespace, out: Path) -> dict:
    """Train one run into ``out`` (config.json, checkpoint.pt, history.csv, metrics.json)."""
    cfg = resolve_config(args)
    device = _device(args.device)
    existed = prepare_out_dir(out, args.resume, args.force)
    if args.resume and (out / "metrics.json").exists():
        return read_json(out / "metrics.json")  # finished: nothing to train or evaluate again
    train_set, val_set, test_set = load_splits(args)
    spec = None
    if args.dataset == IMAGEFOLDER:  # the model is shaped by the folder's images
        classes = len(imagefolder_classes(args.data_dir))
        spec = input_spec(torch.cat([train_set[0], val_set[0]]), classes)
    torch.manual_seed(cfg.seed)
    model = build_model(args.model, args.dataset, spec)
    if cfg.method == "moment":  # a model the regularizer cannot split fails before any writing
        check_regularizable(model, cfg.moment_depth)
    check_free_space(next(p for p in (out, *out.parents) if p.exists()), model)
    if args.force and not args.resume and existed:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "version": __version__,
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "train_limit": args.train_limit,
        "val_fraction": args.val_fraction,
        "device": str(device),
        "gnr_limit": args.gnr_limit,
        "noise_samples": args.noise_samples,
        "input_spec": spec,
        **dataclasses.asdict(cfg),
    }
    write_json(out / "config.json", config)
    t0 = time.perf_counter()
    history = train(
        model,
        train_set,
        val_set,
        cfg,
        out_dir=out,
        resume=args.resume,
        identity={"model": args.model, "dataset": args.dataset, "version": __version__},
        device=device,
        progress=not args.quiet,
        tensorboard=args.tensorboard,
    )
    metrics = evaluate_model(
        model, test_set, args.gnr_limit, args.noise_samples, cfg.seed, device, not args.quiet
    )
    metrics.update(
        epochs=len(history),
        best_epoch=max(history, key=lambda r: -r["val_loss"])["epoch"],
        train_seconds=history[-1]["train_seconds"],
        steps=history[-1].get("steps"),  # absent in checkpoints older than the budget
        step_seconds=history[-1].get("step_seconds"),
        seconds_per_epoch=history[-1]["train_seconds"] / len(history),
        wall_seconds=time.perf_counter() - t0,
    )
    write_json(out / "metrics.json", metrics)
    return metrics


def load_run(run: Path, device, model_name: str | None = None) -> tuple[dict, torch.nn.Module]:
    """(config, model with the run's best weights) of a finished or interrupted run. A run whose
    model comes from a user factory loads only when ``model_name`` names that factory again:
    building it runs the factory's code, which must be code the user names, not a run folder."""
    config = read_json(run / "config.json")
    if is_factory(config["model"]) and model_name != config["model"]:
        raise UsageError(
            f"{run} was trained on the model of {config['model']}; loading it runs that code, so "
            f"name it: --model {config['model']}"
        )
    ckpt = _load_checkpoint(run / CHECKPOINT)
    model = build_model(config["model"], config["dataset"], config.get("input_spec"))
    state = ckpt["best"]["state"] if ckpt["finished"] else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise MomentregError(f"{run / CHECKPOINT} does not fit {config['model']}: {e}") from None
    return config, model.to(device)


def cmd_train(args) -> None:
    metrics = run_training(args, args.out)
    print(
        f"test accuracy {metrics['test_accuracy']:.2f}%  GNR {metrics['gnr']:.2f}  "
        f"{metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s -> {args.out}"
    )


def cmd_evaluate(args) -> None:
    """Recompute accuracy (and GNR with --gnr) into metrics.json, and/or attacks into attacks.json,
    and/or smoothing certificates into certify.json. With only --attacks or --certify, metrics.json
    is left as it is.
    """
    device = _device(args.device)
    config, model = load_run(args.run, device, args.model)
    images, labels = load_dataset(config["dataset"], args.data_dir or config["data_dir"], "test")
    images, labels = images[:: args.stride][: args.limit], labels[:: args.stride][: args.limit]
    if args.gnr or not (args.attacks or args.certify):
        metrics_path = args.run / "metrics.json"
        metrics = read_json(metrics_path) if metrics_path.exists() else {}
        metrics["test_accuracy"] = accuracy(model, to_float(images), labels, device=device)
        metrics["test_images"] = len(labels)
        if args.gnr:
            metrics.update(
                evaluate_model(
                    model,
                    (images, labels),
                    None,
                    args.noise_samples,
                    args.seed,
                    device,
                    not args.quiet,
                )
            )
        write_json(metrics_path, metrics)
        line = f"test accuracy {metrics['test_accuracy']:.2f}% on {len(labels)} images"
        print(line + (f"  GNR {metrics['gnr']:.2f}" if args.gnr else ""))
    if args.attacks:
        run_attacks(args, model, to_float(images), labels)
    if args.certify:
        run_certify(args, model, to_float(images), labels)


def run_certify(args, model, images, labels) -> None:
    """certify-sigma<S>.tsv (per image) and certify.json (summary per sigma) in the run."""
    from momentreg.certify import certify_images, format_tsv, summarize

    if not args.alpha < 1:
        raise UsageError(f"--alpha must be below 1, got {args.alpha}")
    rows = certify_images(
        model,
        images,
        labels,
        args.sigma,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch=args.batch,
        seed=args.seed,
        progress=not args.quiet,
    )
    atomic_write(args.run / f"certify-sigma{args.sigma:g}.tsv", format_tsv(rows).encode())
    path = args.run / "certify.json"
    results = read_json(path) if path.exists() else {}
    summary = summarize(rows)
    results[f"{args.sigma:g}"] = {
        **summary,
        **{k: getattr(args, k) for k in ("sigma", "n0", "n", "alpha", "seed", "stride")},
    }
    write_json(path, results)
    radii = summary["certified_accuracy"]
    print(
        f"sigma {args.sigma:g}: certified accuracy "
        + ", ".join(f"{v:.1f}% at {r}" for r, v in radii.items())
        + f"; ACR {summary['acr']:.3f}; abstained {summary['abstained']}/{summary['images']}"
    )


def _attack_list(text: str) -> list[str]:
    from momentreg.attacks import ATTACKS

    names = list(ATTACKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown attack {unknown[0] if unknown else text!r}; choose from "
            f"{', '.join(ATTACKS)} or all"
        )
    return names


def run_attacks(args, model, images, labels) -> None:
    from momentreg.attacks import minimal_perturbations

    path = args.run / "attacks.json"
    results = read_json(path) if path.exists() else {}
    for name in args.attacks:
        result = minimal_perturbations(
            model, images, labels, name, tol=args.tol, seed=args.seed, progress=not args.quiet
        )
        results[name] = {
            **result.summary(),
            "tol": args.tol,
            "seed": args.seed,
            "test_images": len(labels),
            "stride": args.stride,
        }
        write_json(path, results)  # after each attack: a crash keeps the finished ones
    print(format_attack_table(results))


def format_attack_table(results: dict) -> str:
    lines = [
        "| attack | success | energy mean | energy median | L2 median | Linf median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['success_rate']:.3f} | {r['energy_mean']:.3g} | "
            f"{r['energy_median']:.3g} | {r['l2_median']:.3g} | {r['linf_median']:.3g} |"
        )
    return "\n".join(lines)


def cmd_table(args) -> None:
    from momentreg.report import TABLE1_HEADER, markdown_table, run_row, table1_row

    rows = [table1_row(run_row(run)) for run in args.runs]
    markdown = markdown_table(TABLE1_HEADER, rows)
    print(markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "table.md", (markdown + "\n").encode())
        buf = io.StringIO()
        csv.writer(buf).writerows([TABLE1_HEADER, *rows])
        atomic_write(args.out / "table.csv", buf.getvalue().encode())
        print(f"wrote {args.out / 'table.md'} and {args.out / 'table.csv'}")


def _float_list(text: str) -> list[float]:
    values = [_number(float, 0, strict=True)(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers: {text!r}")
    return values


def cmd_tightness(args) -> None:
    """Analytic and linearized expected logits against Monte Carlo, per run and sigma."""
    from momentreg.tightness import tightness

    device = _device(args.device)
    table = {}
    for run in args.runs:
        config, model = load_run(run, device, args.model)
        images, _ = load_dataset(config["dataset"], args.data_dir or config["data_dir"], "test")
        rows = tightness(
            model,
            to_float(images[: args.limit]),
            args.sigmas,
            samples=args.samples,
            batch=args.batch,
            seed=args.seed,
            progress=not args.quiet,
        )
        write_json(run / "tightness.json", {"rows": rows})
        table[run.name] = rows
    markdown = format_tightness(table)
    print(markdown)
    if args.report:
        from momentreg.plots import plot_tightness

        prepare_out_dir(args.report.parent, resume=True, force=False)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        figure = args.report.with_suffix(".png")
        plot_tightness(table, figure)
        command = (
            f"momentreg tightness {' '.join(str(r) for r in args.runs)} --sigmas "
            f"{','.join(f'{x:g}' for x in args.sigmas)} --limit {args.limit} --samples "
            f"{args.samples} --seed {args.seed} --report {args.report}"
        )
        text = TIGHTNESS_INTRO.format(command=command, limit=args.limit, samples=args.samples)
        text += f"{markdown}\n\n![relative error]({figure.name})\n"
        atomic_write(args.report, text.encode())
        print(f"wrote {args.report} and {figure}")


TIGHTNESS_INTRO = """# How faithful is the regularizer's surrogate?

Made by `{command}` (see `momentreg.tightness`). For the first {limit} test images and each input
noise level sigma, the expected logits E[f(x + n)] are estimated by Monte Carlo ({samples} draws per
image) and compared with

- **analytic**: tail(T(mu, s)), the paper's one-layer approximation that the regularizer trains
  with (`momentreg.expected_logits`);
- **linearized**: Bibi et al. (CVPR 2018)'s two-stage linearization, the tail replaced by its
  first-order expansion at the clean post-ReLU activations, then Theorem 1 exactly;
- **all_layers**: means and variances pushed through every layer, ReLUs exactly and max-pooling by
  Clark's moments, treating units as independent (`expected_logits(..., depth="all")`).

Errors are median relative L2 distances between logit vectors; the noise floor is the Monte Carlo
standard error on the same scale, below which an error cannot be resolved. Agreement is the share
of images whose expected argmax matches the Monte Carlo argmax.

"""


def format_tightness(table: dict[str, list[dict]]) -> str:
    from momentreg.tightness import ESTIMATES

    rows = [r for rs in table.values() for r in rs]
    names = [n for n in ESTIMATES if any(f"{n}_error_median" in r for r in rows)]
    lines = [
        "| run | sigma | MC noise floor | "
        + " | ".join(f"{n} error (median)" for n in names)
        + " | "
        + " | ".join(f"{n} argmax agrees (%)" for n in names)
        + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(names)),
    ]
    for run, rows in table.items():
        for r in rows:
            errors = [f"{r[f'{n}_error_median']:.4f}" for n in names]
            agree = [f"{r[f'{n}_argmax_agreement']:.1f}" for n in names]
            lines.append(
                f"| {run} | {r['sigma']:g} | {r['mc_relative_se']:.4f} | "
                + " | ".join(errors + agree)
                + " |"
            )
    return "\n".join(lines)


def cmd_demo(args) -> None:
    from momentreg.plots import plot_consistency

    out: Path = args.out
    runs = {
        "clean": dict(method="clean"),
        f"augment N={args.folds} sigma={args.augment_sigma}": dict(
            method="augment", folds=args.folds, sigma=args.augment_sigma
        ),
        f"moment sigma={args.moment_sigma} alpha={args.alpha}": dict(
            method="moment", sigma=args.moment_sigma, alpha=args.alpha
        ),
    }
    prepare_out_dir(out, resume=True, force=False)
    rows = []
    for i, (label, settings) in enumerate(runs.items()):
        run_dir = out / f"{i}-{settings['method']}"
        argv = [
            "--dataset",
            "mnist-sample",
            "--epochs",
            str(args.epochs),
            "--lr",
            "1e-3",
            "--batch-size",
            "128",
            "--seed",
            str(args.seed),
            "--device",
            args.device,
        ]
        for key, value in settings.items():
            argv += [f"--{key}", str(value)]
        argv += ["--train-limit", str(args.train_limit), "--gnr-limit", str(args.gnr_limit)]
        run_args = build_parser().parse_args(["train", *argv, "--out", str(run_dir), "--resume"])
        run_args.quiet = args.quiet
        print(f"[{i + 1}/{len(runs)}] {label}", flush=True)
        metrics_path = run_dir / "metrics.json"
        if metrics_path.exists():
            metrics = read_json(metrics_path)
        else:
            metrics = run_training(run_args, run_dir)
        rows.append((label, metrics))
    table = format_demo_table(rows)
    print(table)
    (out / "table.md").write_text(table + "\n")
    plot_consistency(
        {label: m["gnr_curve"] for label, m in rows},
        out / "consistency.png",
        title="LeNet on the bundled MNIST sample",
    )
    print(f"wrote {out / 'table.md'} and {out / 'consistency.png'}")


def format_demo_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| method | test accuracy (%) | GNR | training seconds |", "|---|---:|---:|---:|"]
    for label, m in rows:
        lines.append(
            f"| {label} | {m['test_accuracy']:.2f} | {m['gnr']:.2f} | {m['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_setting(text: str) -> tuple[str, object]:
    from momentreg.sweep import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string such as a path
    return key.strip(), parsed


def cmd_sweep(args) -> None:
    from momentreg import sweep

    if args.spec == "status":
        if args.dir is None:
            raise UsageError("usage: momentreg sweep status DIR")
        states = sweep.status(args.dir)
        for state in sweep.STATES:
            print(f"{state:8s} {len(states[state])}")
            for name in states[state] if state in ("running", "failed") else []:
                error = args.dir / "runs" / name / "error.txt"
                detail = error.read_text().splitlines()[0] if error.exists() else ""
                print(f"  {name} {detail}")
        return
    if args.out is None:
        raise UsageError("momentreg sweep SPEC needs --out DIR")
    spec = {**sweep.load_spec(args.spec), **dict(args.set or [])}
    configs = sweep.expand(spec)
    if args.dry_run:
        sweep.validate(configs, args.out)
        for config in configs:
            print(sweep.run_dir_name(config), " ".join(sweep.train_argv(config, Path("RUN"))[1:]))
        print(f"{len(configs)} runs")
        return
    prepare_out_dir(args.out, resume=True, force=False)
    counts = sweep.sweep(
        spec,
        args.out,
        backend=args.backend,
        workers=args.workers,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
    )
    print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if counts["failed"]:
        raise MomentregError(f"{counts['failed']} runs failed: momentreg sweep status {args.out}")


def cmd_report(args) -> None:
    from momentreg.report import write_report

    if not args.dir.is_dir():
        raise UsageError(f"{args.dir} is not a directory")
    prepare_out_dir(args.out, resume=True, force=False)
    path = write_report(args.dir, args.out, args.tolerance)
    print(f"wrote {path} and {args.out / 'results.csv'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="momentreg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"momentreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model into --out")
    _train_args(p)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite the run in --out")
    p.set_defaults(func=cmd_train)

    from momentreg.attacks import ATTACKS

    attack_help = "; ".join(f"{k}: {v[1]}" for k, v in ATTACKS.items())
    p = sub.add_parser("evaluate", help="recompute the metrics of a finished run")
    p.add_argument("run", type=Path)
    p.add_argument("--gnr", action="store_true", help="also recompute GNR and its curve")
    p.add_argument("--limit", type=pos_int, help="evaluate on the first N test images")
    p.add_argument(
        "--stride",
        type=pos_int,
        default=1,
        help="every K-th test image (before --limit): a class-balanced subset of a test set "
        "sorted by class, such as an image folder's",
    )
    p.add_argument("--noise-samples", type=pos_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="override the run's data directory")
    p.add_argument("--model", help=USER_MODEL_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--attacks", type=_attack_list, help="comma-separated, or all: " + attack_help)
    p.add_argument("--tol", type=pos_float, default=0.01, help="relative tolerance of eps search")
    g = p.add_argument_group("randomized smoothing (Cohen et al. 2019)")
    g.add_argument("--certify", action="store_true", help="certified L2 radii, smoothed model")
    g.add_argument("--sigma", type=pos_float, default=0.25, help="smoothing noise std (pixels)")
    g.add_argument("--n0", type=pos_int, default=100, help="noise samples to pick the class")
    g.add_argument("--n", type=pos_int, default=100_000, help="samples to bound its probability")
    g.add_argument("--alpha", type=pos_float, default=0.001, help="failure probability")
    g.add_argument("--batch", type=pos_int, default=1000, help="noisy copies per forward pass")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("table", help="the paper's Table 1 layout over runs (Markdown and CSV)")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="also write table.md and table.csv here")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("sweep", help="run a grid of trainings (or: sweep status DIR)")
    p.add_argument("spec", help="a TOML spec, a preset (paper-mnist-lenet, ...), or 'status'")
    p.add_argument("dir", nargs="?", type=Path, help="with 'status': the sweep directory")
    p.add_argument("--out", type=Path, help="the sweep directory")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=pos_int, default=1, help="local: runs at once")
    p.add_argument("--address", help="ray: cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-run", type=pos_int, default=1, help="ray: CPUs per run")
    p.add_argument("--gpus-per-run", type=nonneg_float, default=0.0, help="ray: GPUs per run")
    p.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec setting, e.g. --set data_dir=DIR --set epochs=20",
    )
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="results.csv, figures and the fair comparison of a sweep")
    p.add_argument("dir", type=Path, help="a sweep directory (or a folder of runs)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--tolerance",
        type=nonneg_float,
        help="accuracy points below clean still compared (default per dataset)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tightness", help="the regularizer's surrogate against Monte Carlo")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--sigmas", type=_float_list, default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--limit", type=pos_int, default=50, help="the first N test images")
    p.add_argument("--samples", type=pos_int, default=2000, help="Monte Carlo draws per image")
    p.add_argument("--batch", type=pos_int, default=20, help="draws per image per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="override the runs' data directory")
    p.add_argument("--model", help=USER_MODEL_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--report", type=Path, help="also write this Markdown file and a .png beside it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tightness)

    p = sub.add_parser("demo", help="clean vs augmentation vs moment on the bundled MNIST sample")
    p.add_argument("--out", type=Path, default=Path("momentreg-demo"))
    p.add_argument("--epochs", type=pos_int, default=3)
    p.add_argument("--folds", type=pos_int, default=6)
    p.add_argument("--augment-sigma", type=nonneg_float, default=0.5)
    p.add_argument("--moment-sigma", type=nonneg_float, default=1.0)
    p.add_argument("--alpha", type=nonneg_float, default=1.0)
    p.add_argument("--train-limit", type=pos_int, default=5000, help="training+validation images")
    p.add_argument("--gnr-limit", type=pos_int, default=1000, help="test images for GNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # CPU steps reuse their activations' pages (momentreg/malloc.py)
    try:
        args.func(args)
    except (MomentregError, ValueError) as e:
        print(f"momentreg: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as e:
        print(
            f"momentreg: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("momentreg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
