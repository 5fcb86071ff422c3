"""The ``momentreg`` command: train, evaluate, demo.

Every user mistake (one of momentreg's own errors) ends with ``momentreg: error: <one line>`` and
exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

from momentreg import __version__
from momentreg.core.regularizer import DEPTHS, MOMENT_LOSSES, WEIGHTINGS
from momentreg.data.datasets import DATASET_NAMES, IMAGEFOLDER, load_dataset
from momentreg.data.imagefolder import imagefolder_classes
from momentreg.errors import MomentregError, UsageError
from momentreg.models.zoo import MODELS, build_model, input_spec, is_factory
from momentreg.runs.run import (
    TRAIN_FIELDS,
    RunConfig,
    attack_run,
    certify_run,
    device_of,
    evaluate_accuracy,
    load_run,
    prepare_out_dir,
    test_subset,
    train_run,
)
from momentreg.runs.rundir import read_json
from momentreg.tables import attack_table, markdown_table, write_table
from momentreg.training.config import KEEP, LR_SCHEDULES
from momentreg.training.loop import CollapseWarning
from momentreg.training.malloc import keep_freed_memory
from momentreg.training.methods import METHODS

USAGE_ERROR = 2
USER_MODEL_HELP = "the FILE.py:FUNCTION the run was trained with, to allow running it again"


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


def _setting(text: str) -> tuple[str, object]:
    from momentreg.runs.sweep import parse_setting

    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_name(text: str) -> str:
    if text in MODELS or is_factory(text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(sorted(MODELS))}, or FILE.py:FUNCTION)"
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
    _method_args(p)
    _optimization_args(p)
    _run_args(p)


def _method_args(p: argparse.ArgumentParser) -> None:
    """The method and its own settings."""
    p.add_argument("--method", default="clean", choices=METHODS)
    p.add_argument("--sigma", type=nonneg_float, default=0.0, help="training noise std (pixels)")
    p.add_argument(
        "--alpha",
        type=nonneg_float,
        default=1.0,
        help="weight of the moment term; lambda of stability, consistency and macer",
    )
    p.add_argument("--folds", type=pos_int, default=1, help="N of N-fold augmentation")
    p.add_argument(
        "--moment-depth",
        choices=DEPTHS,
        help="moment: moments to the first ReLU (the paper, default) or through all layers",
    )
    p.add_argument(
        "--moment-loss",
        choices=MOMENT_LOSSES,
        help="moment: CE of the expected logits (default) or the expected CE (needs depth all)",
    )
    p.add_argument(
        "--moment-weighting",
        choices=WEIGHTINGS,
        help="moment: sum, CE + alpha * CE_moment (the paper's Eq. 2), or convex, that divided by "
        "1 + alpha (the authors' code; the default of the SGD protocols, alexnet's)",
    )
    p.add_argument(
        "--moment-noise",
        action="store_true",
        default=None,
        help="moment: the first term sees freshly noised images (noise training + analytic term)",
    )
    p.add_argument(
        "--samples",
        type=nonneg_int,
        help="consistency, macer: noisy copies per image, at least 1 (default 2 and 16, the "
        "authors'); macer-analytic: noisy copies for its NLL term (default 0: none)",
    )
    p.add_argument("--eta", type=nonneg_float, help="consistency: entropy weight (default 0.5)")
    p.add_argument("--macer-beta", type=pos_float, help="macer: inverse temperature (default 16)")
    p.add_argument("--macer-gamma", type=pos_float, help="macer: hinge margin (default 8)")
    p.add_argument(
        "--alpha-delay", type=nonneg_int, help="train this many epochs with the regularizer off"
    )
    p.add_argument(
        "--alpha-delay-budget",
        type=nonneg_float,
        help="train this share of the budget (--time-budget, --step-budget or --pass-budget) "
        "with the regularizer off (0 to 1)",
    )
    p.add_argument(
        "--sigma-warmup",
        type=nonneg_int,
        help="raise the training noise linearly from 0 to --sigma over this many steps",
    )


def _optimization_args(p: argparse.ArgumentParser) -> None:
    """The optimizer, its schedule and the run's budget (defaults: the model's protocol)."""
    protocol = "defaults: the paper's protocol for --model (LeNet: Adam 1e-4, batch 1000)"
    g = p.add_argument_group("optimization", protocol)
    g.add_argument("--optimizer", choices=("adam", "sgd"))
    g.add_argument("--lr", type=pos_float)
    g.add_argument("--momentum", type=nonneg_float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=nonneg_float)
    g.add_argument("--batch-size", type=pos_int)
    g.add_argument("--epochs", type=pos_int, default=100, help="at most this many epochs")
    g.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="budget-step: decay at every --lr-step-budget share of the budget",
    )
    g.add_argument("--lr-step", type=pos_int, help="step schedule: epochs between decays")
    g.add_argument(
        "--lr-step-budget",
        type=pos_float,
        help="budget-step schedule: share of the budget between decays (default 1/3)",
    )
    g.add_argument("--lr-gamma", type=pos_float, help="step schedule: the decay factor")
    g.add_argument("--plateau-factor", type=pos_float)
    g.add_argument("--plateau-patience", type=nonneg_int)
    g.add_argument("--early-stop", type=pos_int, help="patience of early stopping (epochs)")
    g.add_argument(
        "--keep",
        choices=KEEP,
        help="the weights the run ends with: the best validation loss's (default) or the last "
        "epoch's (as the randomized-smoothing baselines' code)",
    )
    g.add_argument(
        "--time-budget",
        type=pos_float,
        help="stop once the training steps took this many seconds (validation not counted)",
    )
    g.add_argument(
        "--step-budget",
        type=pos_int,
        help="stop after this many training steps (repeatable, unlike --time-budget)",
    )
    g.add_argument(
        "--pass-budget",
        type=pos_float,
        help="stop once the steps' counted compute (steps x batch x a step's passes per image, "
        "momentreg.training.cost) reaches this many clean epochs: every method the same FLOPs",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    """Where the run starts from, its data limits, GNR, device and output."""
    p.add_argument(
        "--weights",
        type=Path,
        help="start from this plain state_dict of --model (fine-tuning a model you trained); "
        "the run records its SHA-256",
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


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The RunConfig of ``momentreg train``: its options, or --config FILE (a config.json or a
    sweep's run config) with no other training option."""
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"train"} | TRAIN_FIELDS
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.config is not None:
        changed = [k for k, v in given.items() if v != parser.get_default(k)]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(f"--config takes every setting from {args.config}; drop {flag}")
        given = read_json(args.config)
    try:
        return RunConfig.from_settings(given, recorded=args.config is not None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def warn_if_constant(metrics: dict) -> None:
    """Say on stderr when the model predicts one class for every test image: its GNR of 100
    measures nothing (metrics.json flags it, and reports leave the run out)."""
    if metrics.get("constant_predictions"):
        print(
            "momentreg: warning: the model predicts one class for every test image, so its GNR "
            "means nothing; reports leave this run out",
            file=sys.stderr,
        )


def cmd_train(args) -> None:
    config = run_config(args, args.parser)
    options = {"resume": args.resume, "force": args.force, "tensorboard": args.tensorboard}
    metrics = train_run(config, args.out, **options, progress=not args.quiet)
    print(
        f"test accuracy {metrics['test_accuracy']:.2f}%  GNR {metrics['gnr']:.2f}  "
        f"{metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s -> {args.out}"
    )
    warn_if_constant(metrics)


def _external(args, device) -> tuple[dict, torch.nn.Module]:
    """(a run-like config, the model) of ``evaluate --model ... --weights W.pt --dataset D``."""
    from momentreg.models.weights import load_weights, with_normalization

    if not (args.weights and args.dataset):
        raise UsageError("evaluate needs a RUN, or --model, --weights and --dataset")
    spec = None
    if args.dataset == IMAGEFOLDER:  # the model is shaped by the folder's images
        images = load_dataset(args.dataset, args.data_dir, "test")[0]
        spec = input_spec(images, len(imagefolder_classes(args.data_dir)))
    model = load_weights(build_model(args.model or "lenet", args.dataset, spec), args.weights)
    if args.normalize:
        model = with_normalization(model, *args.normalize)
    config = {"dataset": args.dataset, "data_dir": args.data_dir and str(args.data_dir)}
    return config, model.to(device)


def cmd_evaluate(args) -> None:
    """Recompute accuracy (and GNR with --gnr) into metrics.json, and/or attacks into attacks.json,
    and/or smoothing certificates into certify.json; with --card, the robustness card. A model
    from outside momentreg (--model, --weights, --dataset) writes into --card's folder.
    """
    device = device_of(args.device)
    if args.run is None:
        config, model = _external(args, device)
        if args.card is None:
            raise UsageError("a model outside a run directory needs --card DIR for its results")
    else:
        config, model = load_run(args.run, device, args.model)
    images, labels = test_subset(config, args.data_dir, args.limit, args.stride)
    progress, folder = not args.quiet, args.run
    if args.card is not None:  # the card holds every measure asked for
        _card(args, model, images, labels, device, progress)
        return
    if args.gnr or not (args.attacks or args.certify):
        metrics = evaluate_accuracy(
            args.run, model, images, labels, gnr=args.gnr, noise_samples=args.noise_samples,
            seed=args.seed, device=device, progress=progress,
        )  # fmt: skip
        line = f"test accuracy {metrics['test_accuracy']:.2f}% on {len(labels)} images"
        print(line + (f"  GNR {metrics['gnr']:.2f}" if args.gnr else ""))
        warn_if_constant(metrics)
    if args.attacks:
        results = attack_run(
            folder, model, images, labels, args.attacks, tol=args.tol, seed=args.seed,
            stride=args.stride, progress=progress,
        )  # fmt: skip
        print(attack_table(results))
    if args.certify:
        from momentreg.evaluation.certify import certify_line  # scipy.stats: only when certifying

        summary = certify_run(
            folder, model, images, labels, sigma=args.sigma, n0=args.n0, n=args.n,
            alpha=args.failure_probability, batch=args.batch, seed=args.seed, stride=args.stride,
            progress=progress,
        )  # fmt: skip
        print(certify_line(summary))


def _card(args, model, images, labels, device, progress) -> None:
    from momentreg.evaluation.card import Certification, evaluate, write_card

    if args.certify and not args.failure_probability < 1:
        raise UsageError(f"--failure-probability must be below 1, got {args.failure_probability}")
    settings = dict(sigma=args.sigma, n0=args.n0, n=args.n, batch=args.batch)
    certify = Certification(**settings, alpha=args.failure_probability) if args.certify else None
    prepare_out_dir(args.card, resume=True, force=False)
    card = evaluate(
        model, images, labels, name=args.name or str(args.run or args.weights),
        corruptions=args.corruptions, cifar_c=args.cifar_c, attacks=tuple(args.attacks or ()),
        tol=args.tol, certify=certify, seed=args.seed, device=device, progress=progress,
    )  # fmt: skip
    paths = write_card(card, args.card)
    print((args.card / "card.md").read_text().strip())
    print(f"wrote {', '.join(str(p) for p in paths)}")


def _corruption_list(text: str) -> tuple[str, ...]:
    from momentreg.evaluation.corruptions import CORRUPTIONS

    return tuple(_names(text, CORRUPTIONS, "corruption"))


def _normalize(text: str) -> list[float]:
    values = [_number(float)(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}")
    return values


def cmd_compare(args) -> None:
    from momentreg.evaluation.card import compare_cards, read_card

    cards = []
    for path in args.cards:
        if not (path.is_file() or (path / "card.json").exists()):
            raise UsageError(f"{path} holds no card.json: make one with momentreg evaluate --card")
        cards.append(read_card(path))
    prepare_out_dir(args.out, resume=True, force=False)
    table, figure = compare_cards(cards, args.out)
    print(table.read_text().strip())
    print(f"wrote {table} and {figure}")


def _attack_list(text: str) -> list[str]:
    from momentreg.evaluation.attacks import ATTACKS

    return _names(text, ATTACKS, "attack")


def _names(text: str, known, kind: str) -> list[str]:
    """``all`` or comma-separated names of ``known`` (an attack, a corruption), checked."""
    names = list(known) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {kind} {unknown[0] if unknown else text!r}; choose from "
            f"{', '.join(known)} or all"
        )
    return names


def cmd_table(args) -> None:
    from momentreg.runs.report import TABLE1_HEADER, run_row, table1_row

    rows = [table1_row(run_row(run)) for run in args.runs]
    print(markdown_table(TABLE1_HEADER, rows))
    if args.out:
        markdown, csv_file = write_table(TABLE1_HEADER, rows, args.out)
        print(f"wrote {markdown} and {csv_file}")


def _float_list(text: str) -> list[float]:
    values = [_number(float, 0, strict=True)(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers: {text!r}")
    return values


def cmd_tightness(args) -> None:
    """Analytic and linearized expected logits against Monte Carlo, per run and sigma."""
    from momentreg.runs.tightness import tightness_of_runs, tightness_table, write_report

    options = ("sigmas", "limit", "batch", "seed", "data_dir", "model")
    table = tightness_of_runs(
        args.runs, device_of(args.device), **{k: getattr(args, k) for k in options},
        samples=args.mc_samples, progress=not args.quiet,
    )  # fmt: skip
    print(tightness_table(table))
    if args.report:
        prepare_out_dir(args.report.parent, resume=True, force=False)
        command = (
            f"momentreg tightness {' '.join(str(r) for r in args.runs)} --sigmas "
            f"{','.join(f'{x:g}' for x in args.sigmas)} --limit {args.limit} --mc-samples "
            f"{args.mc_samples} --seed {args.seed} --report {args.report}"
        )
        figure = write_report(table, args.report, command, args.limit, args.mc_samples)
        print(f"wrote {args.report} and {figure}")


def cmd_demo(args) -> None:
    from momentreg.cli.demo import demo

    settings = ("epochs", "folds", "augment_sigma", "moment_sigma", "alpha", "train_limit")
    settings += ("gnr_limit", "seed", "device")
    kwargs = {k: getattr(args, k) for k in settings}
    print(demo(args.out, **kwargs, progress=not args.quiet))
    print(f"wrote {args.out / 'table.md'} and {args.out / 'consistency.png'}")


def cmd_sweep(args) -> None:
    from momentreg.runs import sweep

    if args.spec == "status":
        if args.dir is None:
            raise UsageError("usage: momentreg sweep status DIR")
        print(sweep.status_text(args.dir))
        return
    if args.spec == "export":
        return _export(args)
    if args.out is None:
        raise UsageError("momentreg sweep SPEC needs --out DIR")
    spec = {**sweep.load_spec(args.spec), **dict(args.set or [])}
    configs = sweep.expand(spec)
    if args.dry_run:
        sweep.validate(configs)
        for config in configs:
            settings = " ".join(f"{k}={v}" for k, v in config.items())
            print(sweep.run_dir_name(config), settings)
        print(f"{len(configs)} runs")
        return
    then = _certify_after(args)
    prepare_out_dir(args.out, resume=True, force=False)
    options = ("backend", "workers", "address", "cpus_per_run", "gpus_per_run", "retry_failed")
    counts = sweep.sweep(
        spec, args.out, **{k: getattr(args, k) for k in options}, progress=not args.quiet,
        then=then, deadline=args.deadline,
    )  # fmt: skip
    print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if counts["failed"]:
        raise MomentregError(f"{counts['failed']} runs failed: momentreg sweep status {args.out}")


def _export(args) -> None:
    """momentreg sweep export DIR --to DEST: the runs' small files, for results to commit."""
    from momentreg.runs.export import export_sweep

    if args.dir is None or args.to is None:
        raise UsageError("usage: momentreg sweep export DIR --to DEST")
    if not (args.dir / "runs").is_dir():
        raise UsageError(f"{args.dir} is not a sweep directory: it has no runs/")
    done = export_sweep(args.dir, args.to)
    for name in done.replaced:
        print(f"replaced {name}: a run of its cell with other settings is new")
    print(f"exported {len(done.finished)} finished and {len(done.failed)} failed runs to "
          f"{args.to}; kept {len(done.kept)} runs of other cells")  # fmt: skip


def _certify_after(args):
    """The sweep's --then certify settings (None without --then); --certify-* need it."""
    from momentreg.runs.sweep import CertifyAfter

    fields = [f.name for f in dataclasses.fields(CertifyAfter)]
    given = {f: getattr(args, f"certify_{f}") for f in fields}
    given = {f: v for f, v in given.items() if v is not None}
    if args.then is None:
        if given:
            raise UsageError(
                f"--certify-{next(iter(given)).replace('_', '-')} needs --then certify"
            )
        return None
    then = CertifyAfter(**given)
    if not then.failure_probability < 1:
        raise UsageError("--certify-failure-probability must be below 1")
    return then


def cmd_report(args) -> None:
    from momentreg.runs.report import write_report

    if not args.dir.is_dir():
        raise UsageError(f"{args.dir} is not a directory")
    prepare_out_dir(args.out, resume=True, force=False)
    path = write_report(args.dir, args.out, args.tolerance)
    print(f"wrote {path} and {args.out / 'results.csv'}")


def _evaluate_parser(sub) -> None:
    from momentreg.evaluation.attacks import ATTACKS

    attack_help = "; ".join(f"{k}: {a.description}" for k, a in ATTACKS.items())
    p = sub.add_parser(
        "evaluate", help="recompute a run's metrics, or measure any model (--model, --weights)"
    )
    p.add_argument("run", type=Path, nargs="?", help="a run directory (or give --weights)")
    p.add_argument("--gnr", action="store_true", help="also recompute GNR and its curve")
    p.add_argument("--limit", type=pos_int, help="evaluate on the first N test images")
    stride = "every K-th test image, then --limit (balanced classes in a class-sorted folder)"
    p.add_argument("--stride", type=pos_int, default=1, help=stride)
    p.add_argument("--noise-samples", type=pos_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="override the run's data directory")
    p.add_argument("--model", help=USER_MODEL_HELP + "; with --weights, the model to build")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("a model from outside momentreg, and its robustness card")
    g.add_argument("--weights", type=Path, help="a plain state_dict file (weights_only loading)")
    g.add_argument("--dataset", choices=DATASET_NAMES, help="its test set (with --data-dir)")
    g.add_argument("--normalize", nargs=2, type=_normalize, metavar=("MEAN", "STD"),
                   help="wrap a model that expects normalized inputs: comma-separated per "
                   "channel")  # fmt: skip
    g.add_argument("--card", type=Path, help="write card.json, card.md and card.png here (the "
                   "attacks and certificates asked for go into the card)")  # fmt: skip
    g.add_argument("--name", help="the card's title (default: the run or weights path)")
    g.add_argument("--corruptions", type=_corruption_list, default=_corruption_list("all"),
                   help="CIFAR-10-C noise corruptions for the card: all, or comma-separated "
                   "gaussian_noise,shot_noise,impulse_noise,speckle_noise")  # fmt: skip
    g.add_argument("--cifar-c", type=Path, help="the published CIFAR-10-C files, used instead")
    p.add_argument("--attacks", type=_attack_list, help="comma-separated, or all: " + attack_help)
    p.add_argument("--tol", type=pos_float, default=0.01, help="relative tolerance of eps search")
    g = p.add_argument_group("randomized smoothing (Cohen et al. 2019)")
    g.add_argument("--certify", action="store_true", help="certified L2 radii, smoothed model")
    g.add_argument("--sigma", type=pos_float, default=0.25, help="smoothing noise std (pixels)")
    g.add_argument("--n0", type=pos_int, default=100, help="noise samples to pick the class")
    g.add_argument("--n", type=pos_int, default=100_000, help="samples to bound its probability")
    _renamed(g, "--failure-probability", "--alpha", type=pos_float, default=0.001,
             help="the probability that a certificate is wrong")  # fmt: skip
    g.add_argument("--batch", type=pos_int, default=1000, help="noisy copies per forward pass")
    p.set_defaults(func=cmd_evaluate)


def _sweep_parser(sub) -> None:
    help = "run a grid of trainings (or: sweep status DIR, sweep export DIR --to DEST)"
    p = sub.add_parser("sweep", help=help)
    p.add_argument("spec", help="a TOML spec, a preset (paper-mnist-lenet, ...), status or export")
    p.add_argument("dir", nargs="?", type=Path, help="with status or export: the sweep directory")
    p.add_argument("--out", type=Path, help="the sweep directory")
    p.add_argument("--to", type=Path, help="export: where the runs' small files go")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=pos_int, default=1, help="local: runs at once")
    p.add_argument("--address", help="ray: cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-run", type=pos_int, default=1, help="ray: CPUs per run")
    p.add_argument("--gpus-per-run", type=nonneg_float, default=0.0, help="ray: GPUs per run")
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        metavar="KEY=VALUE",
        help="override a spec setting, e.g. --set data_dir=DIR --set epochs=20",
    )
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument(
        "--deadline",
        type=pos_float,
        metavar="SECONDS",
        help="kill what still runs after this many seconds (the same call resumes)",
    )
    g = p.add_argument_group("certify each run as soon as it has trained")
    g.add_argument("--then", choices=("certify",), help="certify: momentreg evaluate --certify")
    g.add_argument("--certify-sigma", type=pos_float, help="default: each run's training sigma")
    g.add_argument("--certify-limit", type=pos_int, help="test images (default 500)")
    g.add_argument("--certify-stride", type=pos_int, help="every K-th test image (default 1)")
    g.add_argument("--certify-n0", type=pos_int, help="samples to pick the class (default 100)")
    g.add_argument("--certify-n", type=pos_int, help="samples for its bound (default 100000)")
    g.add_argument("--certify-failure-probability", type=pos_float, help="default 0.001")
    g.add_argument("--certify-batch", type=pos_int, help="noisy copies per pass (default 1000)")
    g.add_argument("--certify-device", help="default: each run's training device")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="momentreg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"momentreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model into --out")
    _train_args(p)
    config = "every setting from this JSON file (a run's config.json; what sweeps use)"
    p.add_argument("--config", type=Path, help=config)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite the run in --out")
    p.set_defaults(func=cmd_train, parser=p)

    _evaluate_parser(sub)

    p = sub.add_parser("table", help="the paper's Table 1 layout over runs (Markdown and CSV)")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="also write table.md and table.csv here")
    p.set_defaults(func=cmd_table)

    _sweep_parser(sub)

    p = sub.add_parser("compare", help="robustness cards side by side: one table, one figure")
    p.add_argument("cards", type=Path, nargs="+", help="card folders (momentreg evaluate --card)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="results.csv, figures and the fair comparison of a sweep")
    p.add_argument("dir", type=Path, help="a sweep directory (or a folder of runs)")
    p.add_argument("--out", type=Path, required=True)
    tolerance = "accuracy points below clean still compared (default per dataset)"
    p.add_argument("--tolerance", type=nonneg_float, help=tolerance)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tightness", help="the regularizer's surrogate against Monte Carlo")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--sigmas", type=_float_list, default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--limit", type=pos_int, default=50, help="the first N test images")
    _renamed(p, "--mc-samples", "--samples", type=pos_int, default=2000,
             help="Monte Carlo draws per image")  # fmt: skip
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


_PYTHON_SHOW_WARNING = warnings.showwarning


class _OldSpelling(argparse.Action):
    """A flag's old spelling, kept for one release: it sets the new flag's value and says so."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"momentreg: warning: {option_string} is deprecated here and will be removed; use "
              f"{self.new}", file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def _renamed(group, new: str, old: str, **kwargs) -> None:
    """Add option ``new``, and ``old`` as its deprecated spelling (hidden from --help)."""
    action = group.add_argument(new, **kwargs)
    group.add_argument(old, dest=action.dest, type=kwargs.get("type"), action=_OldSpelling,
                       new=new)  # fmt: skip


def _show_warning(message, category, *args, **kwargs) -> None:
    """momentreg's own warnings as one line on stderr; others as Python shows them."""
    if issubclass(category, CollapseWarning):
        print(f"momentreg: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOW_WARNING(message, category, *args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    keep_freed_memory()  # CPU steps reuse their activations' pages (momentreg/training/malloc.py)
    try:
        args.func(args)
    except MomentregError as e:
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
