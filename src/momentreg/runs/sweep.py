"""Sweeps: a TOML grid of ``momentreg train`` runs, resumable, on local processes or a Ray cluster.

A spec holds common settings (scalars, or lists that are crossed) and ``[[methods]]`` blocks with
each method's own axes, so alpha is swept only for moment and folds only for augment::

    epochs = 3
    lr = 1e-3
    seed = [0, 1]
    [[methods]]
    method = "clean"
    [[methods]]
    method = "moment"
    sigma = [0.5, 1.0]
    alpha = [1.0]

Keys are ``momentreg train`` options with ``_`` for ``-`` (``data_dir``, ``batch_size``...). Each
run lives in ``DIR/runs/<readable-name>-<config-hash>/`` with the layout of ``momentreg train``.
A run is done when its metrics.json exists, failed when its error.txt does, running while the
process named in its ``.lock`` lives; anything else is pending and is (re)started with --resume.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from momentreg.errors import ConfigError, MomentregError
from momentreg.runs.run import RunConfig
from momentreg.runs.rundir import (
    CERTIFY_FILE,
    CONFIG,
    ERROR,
    LOCK,
    METRICS,
    read_json,
    write_json,
)
from momentreg.training.methods import ANALYTIC, METHODS, WEIGHTED

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "CertifyAfter",
    "child_env",
    "expand",
    "load_spec",
    "PRESETS",
    "run_dir_name",
    "sweep",
    "status",
]

_PAPER_AUGMENT = {
    "method": "augment",
    "folds": [2, 6, 11, 21],
    "sigma": [0.125, 0.25, 0.325, 0.5, 1.0],
}
_PAPER_MOMENT = {
    "method": "moment",
    "alpha": [0.5, 1, 1.5, 2, 5, 10, 20],
    "sigma": [0.125, 0.25, 0.325, 0.5, 1, 2, 5, 10, 20],
}
# The paper's grids: clean baseline, N-fold augmentation and the regularizer, full protocol.
PRESETS = {
    f"paper-{dataset}-{model}": {
        "model": model,
        "dataset": dataset,
        "epochs": 100,
        "methods": [{"method": "clean"}, _PAPER_AUGMENT, _PAPER_MOMENT],
    }
    for model, dataset in [
        ("lenet", "mnist"),
        ("lenet", "fashion-mnist"),
        ("lenet", "cifar10"),
        ("alexnet", "cifar10"),
        ("alexnet", "cifar100"),
    ]
}
STATES = ("done", "running", "failed", "pending")


class SpecError(MomentregError):
    """A sweep spec that cannot be read or expanded."""


def load_spec(spec: str) -> dict:
    """A preset name or the path of a TOML file -> the spec dict."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{spec}: no such file and no preset ({', '.join(PRESETS)})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{spec} is not valid TOML ({e})") from None


def parse_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (``--set``) -> (key, value), the value read as TOML (a number, a list, a
    quoted string), else as the bare string (a path)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _axes(block: dict) -> list[dict]:
    keys = list(block)
    values = [v if isinstance(v, list) else [v] for v in block.values()]
    if any(len(v) == 0 for v in values):
        raise SpecError("a list in the sweep spec is empty")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def expand(spec: dict) -> list[dict]:
    """The product of the common axes with each method block's axes, as flat run configs."""
    common = {k: v for k, v in spec.items() if k != "methods"}
    blocks = spec.get("methods", [{}])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise SpecError("'methods' must be a list of tables ([[methods]] blocks)")
    runs, seen = [], set()
    for block in blocks:
        for combo in _axes({**common, **block}):
            key = json.dumps(combo, sort_keys=True)
            if key not in seen:
                seen.add(key)
                runs.append(combo)
    return runs


# The moment variants beyond the paper's regularizer: the config key, the value that turns the
# variant on, its token in run names and its label in reports.
MOMENT_VARIANTS = (
    ("moment_depth", "all", "all", "all layers"),
    ("moment_loss", "expected-ce", "expected-ce", "expected CE"),
    ("moment_noise", True, "noisy", "noisy"),
    ("moment_weighting", "convex", "convex", "convex weighting"),
)


def moment_variants(config: dict) -> list[tuple[str, str]]:
    """(run-name token, report label) of each variant ``config`` turns on, in a fixed order."""
    return [(token, label) for key, on, token, label in MOMENT_VARIANTS if config.get(key) == on]


def run_dir_name(config: dict) -> str:
    """``<method>-<axes>-<hash>``: readable, and unique for the exact config."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    parts = [config.get("method", "clean")]
    axes = (("sigma", "s"), ("alpha", "a"), ("samples", "m"), ("folds", "n"), ("seed", "seed"))
    for key, short in axes:
        if key in config and (key != "alpha" or parts[0] in WEIGHTED):
            parts.append(f"{short}{config[key]}")
    if parts[0] in ANALYTIC:
        parts += [token for token, _ in moment_variants(config)]
    for key, short in (("time_budget", "t"), ("step_budget", "steps"), ("pass_budget", "p")):
        if config.get(key):
            parts.append(f"{short}{config[key]}")
    return "-".join(str(p) for p in parts) + f"-{digest}"


def validate(configs: list[dict]) -> list[RunConfig]:
    """Every run's RunConfig, built now, so a typo fails before any training starts."""
    runs = []
    for config in configs:
        try:
            runs.append(RunConfig.from_settings(config))
        except ValueError as e:  # from_settings reports wrong types as ValueError too
            raise SpecError(f"invalid run in the spec: {json.dumps(config)} ({e})") from None
    return runs


def pid_alive(pid: int) -> bool:
    """Whether a process lives (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def run_state(run: Path) -> str:
    if (run / METRICS).exists():
        return "done"
    lock = run / LOCK
    if lock.exists():
        try:
            if pid_alive(int(lock.read_text().split()[0])):
                return "running"
        except (ValueError, IndexError):
            pass
    if (run / ERROR).exists():
        return "failed"
    return "pending"


def status(out: Path) -> dict[str, list[str]]:
    """State -> run names of the sweep in ``out``."""
    plan = out / "sweep.json"
    if not plan.exists():
        raise SpecError(f"{out} is not a sweep directory (no sweep.json)")
    names = read_json(plan).get("runs")
    if not isinstance(names, list):
        raise SpecError(f"{plan} has no list of runs: is it a momentreg sweep?")
    result = {s: [] for s in STATES}
    for name in names:
        result[run_state(out / "runs" / name)].append(name)
    return result


def status_text(out: Path) -> str:
    """``momentreg sweep status``: the count of runs per state, naming the running and failed
    runs (with the first line of each failure)."""
    states = status(out)
    lines = []
    for state in STATES:
        lines.append(f"{state:8s} {len(states[state])}")
        for name in states[state] if state in ("running", "failed") else []:
            error = out / "runs" / name / ERROR
            lines.append(f"  {name} {error.read_text().splitlines()[0] if error.exists() else ''}")
    return "\n".join(lines)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the sweep process dies, so no orphan trains on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a run started beside others: ``threads`` CPU threads for its ops and
    for torch.compile's worker pool (by default one worker per core in every process: 15 runs on
    16 cores would start 240). A value the user set is kept."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    return env


CERTIFY_ERROR = "certify-error.txt"  # a run's record of a certification that failed


@dataclass(frozen=True)
class CertifyAfter:
    """Certify each run as soon as it has trained (``momentreg evaluate RUN --certify``): at
    ``sigma``, or at the run's own training sigma where None (a run trained without noise is
    then left uncertified), on ``limit`` test images, every ``stride``-th, with CERTIFY's ``n0``,
    ``n``, ``failure_probability`` and ``batch``, on ``device`` (None: the run's own)."""

    sigma: float | None = None
    limit: int = 500
    stride: int = 1
    n0: int = 100
    n: int = 100_000
    failure_probability: float = 0.001
    batch: int = 1000
    device: str | None = None

    def sigma_for(self, config: dict) -> float:
        """The sigma to certify a run of ``config`` at (0: none, a run trained without noise)."""
        return self.sigma or config.get("sigma") or 0.0

    def argv(self, run: Path) -> list[str] | None:
        """The command's arguments for ``run``, or None where there is no sigma to certify at."""
        config = read_json(run / CONFIG)
        sigma = self.sigma_for(config)
        if sigma <= 0:
            return None
        return [
            "evaluate", str(run), "--certify", "--sigma", f"{sigma:g}", "--n0", str(self.n0),
            "--n", str(self.n), "--failure-probability", f"{self.failure_probability:g}",
            "--batch", str(self.batch), "--limit", str(self.limit), "--stride", str(self.stride),
            "--device", self.device or str(config.get("device", "cpu")), "--quiet",
        ]  # fmt: skip

    def done(self, run: Path) -> bool:
        """Whether ``run`` holds this certification already (or has nothing to certify)."""
        sigma = self.sigma_for(read_json(run / CONFIG))
        if sigma <= 0:
            return True
        if not (run / CERTIFY_FILE).exists():
            return False
        made = read_json(run / CERTIFY_FILE).get(f"{sigma:g}", {})  # certify.json's key
        want = {"n0": self.n0, "n": self.n, "alpha": self.failure_probability,
                "stride": self.stride}  # fmt: skip
        return all(made.get(k) == v for k, v in want.items())


def _child(argv: list[str], run: Path, threads: int | None, deadline: float | None):
    """Run ``momentreg ARGV`` for ``run`` (its pid in the run's lock meanwhile); returns (exit
    code, stderr), or (None, "") where the deadline (a ``time.time()``) killed it first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "momentreg", *argv],
        env=child_env(threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    (run / LOCK).write_text(f"{proc.pid} {os.getpid()}\n")
    try:
        _, err = proc.communicate(timeout=None if deadline is None else deadline - time.time())
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()  # resumable: the checkpoint of the last epoch, the certification's rows
        proc.communicate()
        return None, ""
    finally:
        (run / LOCK).unlink(missing_ok=True)


def _failure(code: int, err: str) -> str:
    message = err.strip().splitlines()[-1] if err.strip() else f"exit code {code}"
    return f"exit code {code}: {message}\n{err}"


def run_one(
    run: str,
    threads: int | None = None,
    then: CertifyAfter | None = None,
    deadline: float | None = None,
) -> str:
    """Train one run (its config.json, written by the sweep) in a child process,
    ``momentreg train --config RUN/config.json --out RUN --resume``, then with ``then`` certify
    it; a child still running at ``deadline`` (a ``time.time()``) is killed, and the next sweep
    resumes it. Returns the run's state. Used by both backends."""
    path = Path(run)
    if deadline is not None and time.time() >= deadline:
        return run_state(path)
    if run_state(path) != "done":
        (path / ERROR).unlink(missing_ok=True)
        argv = ["train", "--config", str(path / CONFIG), "--out", run, "--resume", "--quiet"]
        code, err = _child(argv, path, threads, deadline)
        if code:
            (path / ERROR).write_text(_failure(code, err))
    if then is not None and run_state(path) == "done" and not then.done(path):
        (path / CERTIFY_ERROR).unlink(missing_ok=True)
        code, err = _child(then.argv(path), path, threads, deadline)
        if code:
            (path / CERTIFY_ERROR).write_text(_failure(code, err))
    return run_state(path)


def sweep(
    spec: dict,
    out: Path,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0.0,
    retry_failed: bool = False,
    progress: bool = True,
    then: CertifyAfter | None = None,
    deadline: float | None = None,
) -> dict[str, int]:
    """Run every pending run of ``spec`` into ``out``; returns counts of what happened. With
    ``then`` each run is certified as soon as it has trained (and a finished run that lacks its
    certification is certified); after ``deadline`` seconds whatever still runs is killed, to be
    resumed by the same call."""
    deadline_at = None if deadline is None else time.time() + deadline
    configs = expand(spec)
    resolved = validate(configs)
    out.mkdir(parents=True, exist_ok=True)
    names = [run_dir_name(c) for c in configs]
    plan = out / "sweep.json"
    write_json(plan, {"spec": spec, "runs": names})
    todo, counts = [], {"skipped_done": 0, "skipped_running": 0, "skipped_failed": 0}
    for config, run_config, name in zip(configs, resolved, names, strict=True):
        run = out / "runs" / name
        state = run_state(run)
        if state == "done" and then is not None and not then.done(run):
            todo.append((0.0, str(run)))  # trained: only its certification is left
        elif state == "done" or state == "running" or (state == "failed" and not retry_failed):
            counts[f"skipped_{state}"] += 1
        else:
            run.mkdir(parents=True, exist_ok=True)
            if not (run / CONFIG).exists():  # a started run keeps the config it recorded
                write_json(run / CONFIG, run_config.flat())
            todo.append((_cost(config), str(run)))
    # Longest first, so the slowest run (e.g. 21-fold augmentation) does not start last.
    todo = [run for _, run in sorted(todo, key=lambda t: -t[0])]
    if backend == "local":
        results = _run_local(todo, workers, progress, then, deadline_at)
    elif backend == "ray":
        results = _run_ray(todo, address, cpus_per_run, gpus_per_run, progress, then, deadline_at)
    else:
        raise SpecError(f"unknown backend {backend!r}: local or ray")
    counts["ran"] = len(todo)
    counts["finished"] = sum(r == "done" for r in results)
    counts["failed"] = sum(r == "failed" for r in results)
    if deadline is not None:
        counts["left_by_the_deadline"] = sum(r == "pending" for r in results)
    if then is not None:
        runs = [Path(r) for r in todo]
        wanted = [r for r in runs if run_state(r) == "done" and then.argv(r) is not None]
        counts["certified"] = sum(then.done(r) for r in wanted)
        counts["certify_failed"] = sum((r / CERTIFY_ERROR).exists() for r in runs)
    return counts


def _cost(config: dict) -> float:
    """A run's training cost relative to one clean epoch (N-fold augmentation: N; moment: ~2),
    or to one clean step for a step-budgeted run; a pass-budgeted run costs its budget (clean
    epochs), a time-budgeted one its budget (seconds). The largest start first (an order only: the
    units differ)."""
    budget = config.get("time_budget") or config.get("pass_budget")
    if budget:
        return budget
    method = METHODS.get(config.get("method"))
    if method is not None and method.name == "augment":
        per_pass = config.get("folds", 1)
    elif method is not None and method.copies:  # sampled noisy copies per image
        per_pass = config.get("samples") or method.copies
    else:
        per_pass = 2 if method is not None and method.weighted else 1
    return (config.get("step_budget") or config.get("epochs", 100)) * per_pass


def _run_local(todo, workers, progress, then=None, deadline=None) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_one, run, threads, then, deadline) for run in todo]
        for f in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress):
            results.append(f.result())
    return results


def _run_ray(todo, address, cpus_per_run, gpus_per_run, progress, then=None, deadline=None):
    """Each run is a Ray task with its CPU/GPU needs; ``DIR`` must be on storage all nodes see."""
    try:
        import ray
    except ImportError:
        raise MomentregError("--backend ray needs Ray: pip install 'momentreg[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run)(run_one)
        pending = [remote.remote(run, cpus_per_run, then, deadline) for run in todo]
        results = []
        bar = tqdm(total=len(pending), desc="runs (ray)", disable=not progress)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
        bar.close()
        return results
    finally:
        if started_here:
            ray.shutdown()
