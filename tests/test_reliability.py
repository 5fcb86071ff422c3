"""Faults injected into real processes and real files: kills at chosen points, a full disk,
corrupted files, and random command lines. docs/reliability.md lists what each test proves."""

import contextlib
import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from momentreg.cli.main import main
from momentreg.errors import CheckpointError
from momentreg.training.loop import load_checkpoint

pytestmark = pytest.mark.slow  # subprocesses: pytest -m "not slow" skips them

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, "-m", "momentreg", "train", "--train-limit", "300", "--epochs", "3"]
TRAIN += ["--batch-size", "100", "--lr", "1e-3", "--gnr-limit", "20", "--quiet"]
TRAIN += ["--method", "noise", "--sigma", "0.5"]  # uses both random generators: order and noise


def _train(out: Path, *extra, preexec=None, env=None):
    return subprocess.run(
        [*TRAIN, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
        env=env,
    )


def _kill_at(out: Path, point: str, tmp_path: Path) -> None:
    """Start the run, wait until it pauses at ``point`` (see tests/pausing.py), SIGKILL it."""
    pause = tmp_path / "paused"
    env = {**os.environ, "MOMENTREG_TEST_PAUSE": point, "MOMENTREG_TEST_PAUSE_FILE": str(pause)}
    pausing = [sys.executable, "-m", "tests.pausing", *TRAIN[3:]]  # the CLI with pause points
    proc = subprocess.Popen(
        [*pausing, "--out", str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not pause.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert pause.exists(), f"the run never reached {point}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _train(out)
    assert result.returncode == 0, result.stderr
    return out


def _assert_whole(run: Path, checkpoint_epoch: int) -> None:
    """Every file of the run is absent or complete, and the checkpoint is at the expected epoch."""
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == checkpoint_epoch
    json.loads((run / "config.json").read_text())
    rows = list(csv.DictReader(io.StringIO((run / "history.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert checkpoint_epoch - 1 <= len(rows) <= checkpoint_epoch
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize(
    "point, checkpoint_epoch",
    [
        ("mid-epoch:/epoch2/step3/", 1),  # inside an epoch: that epoch is lost, nothing else
        ("after-epoch:/epoch2", 2),  # between epochs
        ("in-write:checkpoint.pt#2", 1),  # new checkpoint complete on disk, not yet renamed
        ("in-write:history.csv#3", 3),  # last checkpoint written, its history not yet
        ("in-write:metrics.json", 3),  # training done, results being written
    ],
)
def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result(
    reference, tmp_path, point, checkpoint_epoch
):
    run = tmp_path / "run"
    _kill_at(run, point, tmp_path)
    _assert_whole(run, checkpoint_epoch)

    resumed = _train(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (run / "history.csv").read_text().count("\n") == 4  # header + 3 epochs
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "gnr", "epochs", "best_epoch"):
        assert metrics[key] == ref_metrics[key], key


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_during_a_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = _train(run, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    (run / "metrics.json").unlink()  # make the finished run resumable for a second epoch
    before = (run / "checkpoint.pt").read_bytes()

    full = _train(run, "--epochs", "2", "--resume", preexec=_limit_file_size(64 * 1024))
    assert full.returncode == 2
    assert full.stderr.startswith("momentreg: error: File too large")
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    class Usage:
        free = 1024

    monkeypatch.setattr("momentreg.runs.run.shutil.disk_usage", lambda path: Usage)
    out = tmp_path / "run"
    args = ["train", "--train-limit", "60", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _train(out, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", ["config.json", "checkpoint.pt", "metrics.json"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_run_files_are_clear_errors_and_stay_as_they_were(
    finished_run, tmp_path, capsys, name, damage
):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    data = (run / name).read_bytes()
    bad = data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10
    (run / name).write_bytes(bad)

    assert main(["evaluate", str(run), "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("momentreg: error:") and name in err and "Traceback" not in err
    assert (run / name).read_bytes() == bad  # nothing rewritten over the damaged file


def test_damaged_sweep_plan_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text('{"runs": [')
    assert main(["sweep", "status", str(tmp_path)]) == 2
    assert "sweep.json is corrupted" in capsys.readouterr().err


# -- random command lines ------------------------------------------------------------------------

TRAIN_VALUES = {
    "--model": ["lenet", "alexnet", "resnet"],
    "--dataset": ["mnist-sample", "mnist", "cifar10", "nope"],
    "--method": ["clean", "moment", "augment", "noise", "bogus"],
    "--sigma": ["0.5", "0", "-1", "nan", "inf", "abc"],
    "--alpha": ["1", "-2", "x"],
    "--folds": ["2", "0", "1.5"],
    "--epochs": ["1", "0", "-1", "two"],
    "--batch-size": ["32", "0", "x"],
    "--lr": ["1e-3", "0", "-1", "nan"],
    "--optimizer": ["adam", "sgd", "rmsprop"],
    "--val-fraction": ["0.2", "0", "1", "1.5"],
    "--plateau-factor": ["0.5", "1", "2"],
    "--device": ["cpu", "cuda", "tpu", "auto"],
    "--data-dir": ["/nonexistent"],
    "--seed": ["3", "-1", "x"],
    "--bogus": ["1"],
}


@st.composite
def train_argv(draw):
    flags = draw(st.lists(st.sampled_from(sorted(TRAIN_VALUES)), unique=True, max_size=6))
    argv = []
    for flag in flags:
        argv += [flag, draw(st.sampled_from(TRAIN_VALUES[flag]))]
    if draw(st.booleans()):
        argv += ["--epochs", "1"]  # argparse keeps the last value: most examples stay cheap
    return argv


def _run_main(argv: list[str]) -> tuple[int, str]:
    """``momentreg argv`` in this process: (exit code, stderr). Uncaught exceptions propagate."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            code = e.code
    return code, err.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=train_argv())
@example(argv=["--dataset", "mnist"])  # valid options, but the data fail to load
@example(argv=["--dataset", "cifar10", "--data-dir", "/nonexistent"])
@example(argv=["--model", "alexnet", "--method", "moment", "--sigma", "0.5"])
def test_random_train_command_lines_exit_0_or_2_and_leave_no_partial_run(argv):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        fixed = ["--train-limit", "60", "--gnr-limit", "10", "--quiet", "--out", str(out)]
        if "--epochs" not in argv:
            fixed += ["--epochs", "1"]
        code, err = _run_main(["train", *fixed, *argv])
        assert code in (0, 2), (code, err)
        assert "Traceback" not in err
        if code == 2:
            assert err.strip(), "an error exit must say why"
            assert not out.exists(), "an error left a partial run directory"
        else:
            assert (out / "metrics.json").exists()


@st.composite
def other_argv(draw, run: str):
    folder = str(Path(run).parent)  # holds only the run (and reports written by this test)
    targets = [run, "/nonexistent/run", "/dev/null", folder]
    command = draw(st.sampled_from(["evaluate", "sweep", "report", "table"]))
    target = draw(st.sampled_from(targets))
    if command == "evaluate":
        argv = [command, target, "--limit", draw(st.sampled_from(["5", "0", "x"]))]
        argv += draw(st.sampled_from([[], ["--attacks", "fgsm"], ["--attacks", "nope"], ["--gnr"]]))
        argv += draw(st.sampled_from([[], ["--device", "cuda"], ["--tol", "-1"]]))
    elif command == "sweep":
        spec = draw(st.sampled_from(["status", "paper-mnist-lenet", "/nonexistent.toml", target]))
        argv = [command, spec]
        argv += draw(st.sampled_from([[], [target], ["--dry-run", "--out", target]]))
        argv += draw(st.sampled_from([[], ["--set", "epochs=0"], ["--set", "novalue"]]))
    elif command == "report":
        argv = [command, target, "--out", draw(st.sampled_from([f"{folder}/report", run]))]
    else:
        argv = [command, target]
    return argv


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_evaluate_sweep_report_command_lines_exit_0_or_2(finished_run, data):
    before = {f.name: f.read_bytes() for f in finished_run.iterdir() if f.is_file()}
    argv = data.draw(other_argv(str(finished_run)))
    code, err = _run_main(argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.strip()
    after = {f.name: f.read_bytes() for f in finished_run.iterdir() if f.is_file()}
    assert before.keys() <= after.keys()  # nothing removed
    assert before["checkpoint.pt"] == after["checkpoint.pt"]  # evaluation never retrains


class _Payload:
    """Pickles to a call of os.system: what a malicious shared checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a readable momentreg checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


_WRITER = """
import sys, time
from pathlib import Path
from momentreg.files import atomic_write, update_json
path, who, what = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(path.parent / f"ready-{who}").touch()
while not (path.parent / "go").exists():  # both start together, once imported
    time.sleep(0.001)
for i in range(200):
    if what == "update":
        update_json(path, {f"{who}{i}": i})
    else:
        atomic_write(path, (who * 1000).encode())
"""


@pytest.mark.parametrize("what", ["update", "write"])
def test_two_processes_writing_one_file_at_once_lose_nothing_and_leave_it_whole(tmp_path, what):
    """Two evaluations of one run at once (an attack on 400 images and L-BFGS on 100) update one
    attacks.json: each keeps the other's keys, and neither trips on the other's temporary file."""
    path = tmp_path / "attacks.json"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), who, what], stderr=subprocess.PIPE
        )
        for who in "ab"
    ]
    while not all((tmp_path / f"ready-{who}").exists() for who in "ab"):
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read().decode()
    if what == "update":
        assert json.loads(path.read_text()) == {f"{w}{i}": i for w in "ab" for i in range(200)}
    else:
        assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert not list(tmp_path.glob(".*.tmp"))
