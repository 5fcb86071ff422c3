import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from momentreg.cli.main import main
from momentreg.evaluation.attacks import ATTACK_LABELS
from momentreg.runs.report import fair_comparison, group_of, write_report
from momentreg.runs.sweep import (
    PRESETS,
    CertifyAfter,
    SpecError,
    child_env,
    expand,
    load_spec,
    pid_alive,
    run_dir_name,
    status,
    sweep,
)
from tests.helpers import cli

TINY = """
train_limit = 200
epochs = 1
batch_size = 50
lr = 1e-3
gnr_limit = 20
"""
SPEC = (
    TINY
    + """[[methods]]
method = "clean"
seed = [0, 1]
[[methods]]
method = "moment"
sigma = [0.5, 1.0]
alpha = 2.0
[[methods]]
method = "augment"
sigma = 0.5
folds = 2
[[methods]]
method = "noise"
sigma = 0.5
"""
)
TIMING = {"train_seconds", "seconds_per_epoch"}


def _spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def test_expand_crosses_per_method_axes():
    runs = expand({"epochs": 2, "seed": [0, 1], "methods": [
        {"method": "clean"},
        {"method": "moment", "sigma": [0.5, 1], "alpha": [1, 2]},
        {"method": "augment", "sigma": 0.5, "folds": [2, 6]},
    ]})  # fmt: skip
    assert len(runs) == 2 * (1 + 4 + 2)
    assert all("alpha" not in r for r in runs if r["method"] != "moment")
    assert all("folds" not in r for r in runs if r["method"] != "augment")
    assert len({run_dir_name(r) for r in runs}) == len(runs)


def test_moment_variants_and_budgets_get_their_own_names_and_groups():
    base = {"method": "moment", "sigma": 0.5, "time_budget": 60}
    variants = [
        base,
        {**base, "moment_depth": "all"},
        {**base, "moment_depth": "all", "moment_loss": "expected-ce"},
        {**base, "moment_noise": True},
        {**base, "time_budget": 180},
        {**base, "time_budget": 0, "step_budget": 500},
        {**base, "time_budget": 0, "pass_budget": 3},
    ]
    names = [run_dir_name(v).rsplit("-", 1)[0] for v in variants]
    assert names == [
        "moment-s0.5-t60",
        "moment-s0.5-all-t60",
        "moment-s0.5-all-expected-ce-t60",
        "moment-s0.5-noisy-t60",
        "moment-s0.5-t180",
        "moment-s0.5-steps500",
        "moment-s0.5-p3",
    ]
    groups = [group_of({"folds": 1, **v}) for v in variants[:4]]
    assert len(set(groups)) == 4 and groups[0] == "moment"


def test_paper_presets_have_the_paper_grids():
    runs = expand(load_spec("paper-mnist-lenet"))
    assert sum(r["method"] == "augment" for r in runs) == 4 * 5
    assert sum(r["method"] == "moment" for r in runs) == 7 * 9
    assert sum(r["method"] == "clean" for r in runs) == 1
    assert set(PRESETS) >= {"paper-cifar10-alexnet", "paper-cifar100-alexnet"}


@pytest.mark.slow
def test_bad_specs_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(str(bad))
    with pytest.raises(SpecError, match="no such file and no preset"):
        load_spec(str(tmp_path / "missing.toml"))
    with pytest.raises(SpecError, match="invalid run"):
        sweep({"sigma": -1.0}, tmp_path / "out", progress=False)
    result = subprocess.run([sys.executable, "-m", "momentreg", "sweep", str(bad), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """6 tiny runs, killed after 2 finish, then resumed."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec, out = _spec_file(tmp), tmp / "local"
    cmd = [sys.executable, "-m", "momentreg", "sweep", str(spec), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("runs/*/metrics.json"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    assert len(finished) == 2
    # the training child dies with its parent (PR_SET_PDEATHSIG)
    children = [int(lock.read_text().split()[0]) for lock in out.glob("runs/*/.lock")]
    deadline = time.time() + 20
    while any(pid_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in children)
    states = status(out)
    assert len(states["done"]) == 2 and len(states["running"]) == 0
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return out, finished, resumed.stdout


@pytest.mark.slow
def test_killed_sweep_resumes_exactly_the_other_four(local_sweep):
    out, finished, stdout = local_sweep
    assert "skipped done 2" in stdout and "ran 4" in stdout and "finished 4" in stdout
    for name, mtime in finished.items():  # the two finished runs were not trained again
        assert (out / "runs" / name / "metrics.json").stat().st_mtime_ns == mtime
    assert len(status(out)["done"]) == 6


@pytest.mark.slow
def test_report_renders_from_a_fresh_sweep(local_sweep, tmp_path):
    out = Path(shutil.copytree(local_sweep[0], tmp_path / "sweep"))  # certified below: a copy
    run = sorted(out.glob("runs/*"))[0]
    smoothing = ["--certify", "--limit", "2", "--n0", "10", "--n", "100", "--batch", "100"]
    assert main(["evaluate", str(run), *smoothing, "--quiet"]) == 0
    report = write_report(out, tmp_path / "report")
    text = report.read_text()
    assert "### Fair comparison" in text and "### Training cost" in text
    assert "### Randomized smoothing" in text
    for png in ("vs-sigma", "fair", "curves", "certified"):
        assert (tmp_path / "report" / f"lenet-mnist-sample-{png}.png").stat().st_size > 10_000
    assert len(_rows(tmp_path / "report" / "results.csv")) == 6


@pytest.mark.slow
def test_ray_backend_gives_the_same_results(local_sweep, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out, _, _ = local_sweep
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        counts = sweep(expand_spec := load_spec(str(_spec_file(tmp_path))), tmp_path / "ray",
                       backend="ray", progress=False)  # fmt: skip
    finally:
        ray.shutdown()
    assert counts["finished"] == len(expand(expand_spec)) == 6
    write_report(out, tmp_path / "local-report")
    write_report(tmp_path / "ray", tmp_path / "ray-report")
    assert _rows(tmp_path / "local-report" / "results.csv") == _rows(
        tmp_path / "ray-report" / "results.csv"
    )


def _row(method, acc, gnr, **kw):
    return {"method": method, "test_accuracy": acc, "gnr": gnr, "sigma": kw.get("sigma", 0.0),
            "alpha": kw.get("alpha"), "folds": kw.get("folds"), "name": kw.get("name")}  # fmt: skip


def test_fair_comparison_on_a_hand_made_table():
    rows = [
        _row("clean", 98.0, 70.0, name="c0"),
        _row("clean", 99.0, 72.0, name="c1"),  # baseline = mean 98.5
        _row("moment", 99.1, 90.0, name="m-ok"),
        _row("moment", 98.4, 99.0, name="m-too-inaccurate"),
        _row("moment", 98.5, 93.0, name="m-best"),  # exactly at the threshold: competes
        _row("augment", 99.0, 80.0, folds=2, name="a2"),
        _row("augment", 98.6, 95.0, folds=21, name="a21"),
        _row("augment", 97.0, 99.9, folds=21, name="a21-bad"),
        _row("noise", 90.0, 99.0, name="n-bad"),
    ]
    fair = fair_comparison(rows, tolerance=0.0)
    assert fair["baseline_accuracy"] == pytest.approx(98.5)
    winners = {g: r["name"] for g, r in fair["selected"].items()}
    assert winners == {"clean": "c1", "moment": "m-best", "augment N=2": "a2",
                       "augment N=21": "a21"}  # fmt: skip
    assert list(fair["selected"])[0] == "clean"
    loose = fair_comparison(rows, tolerance=1.6)
    assert loose["selected"]["augment N=21"]["name"] == "a21-bad"
    assert loose["selected"]["moment"]["name"] == "m-too-inaccurate"
    assert "noise" not in loose["selected"]
    with pytest.raises(ValueError, match="clean run"):
        fair_comparison(rows[2:], 0.0)


def test_a_run_beside_others_gets_its_share_of_threads_for_ops_and_the_compiler(monkeypatch):
    """torch.compile's worker pool defaults to one process per core in every run: 15 runs on 16
    cores would start 240. A value the user set is kept."""
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    env = child_env(2)
    assert env["OMP_NUM_THREADS"] == "2" and env["TORCHINDUCTOR_COMPILE_THREADS"] == "2"
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
    assert child_env(1)["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
    assert child_env(None) == dict(os.environ)  # a run alone: the environment as it is


THEN_SPEC = (
    TINY
    + """[[methods]]
method = "clean"
[[methods]]
method = "noise"
sigma = 0.5
"""
)


@pytest.mark.slow
def test_a_sweep_stops_at_its_deadline_then_trains_and_certifies_each_run(tmp_path):
    spec, out = tmp_path / "spec.toml", tmp_path / "sweep"
    spec.write_text(THEN_SPEC)
    cmd = [sys.executable, "-m", "momentreg", "sweep", str(spec), "--out", str(out), "--quiet"]
    cut = subprocess.run([*cmd, "--deadline", "1"], capture_output=True, text=True, timeout=120)
    assert cut.returncode == 0, cut.stderr
    assert "left by the deadline 2" in cut.stdout and "failed 0" in cut.stdout
    assert status(out)["pending"] and not list(out.glob("runs/*/.lock"))  # resumable, unlocked
    certify = ["--then", "certify", "--certify-limit", "4", "--certify-n0", "10", "--certify-n",
               "50", "--certify-batch", "50", "--workers", "2"]  # fmt: skip
    done = subprocess.run([*cmd, *certify], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "finished 2" in done.stdout and "certified 1" in done.stdout, done.stdout
    noise, clean = (next(out.glob(f"runs/{m}*")) for m in ("noise", "clean"))
    made = json.loads((noise / "certify.json").read_text())
    assert list(made) == ["0.5"] and made["0.5"]["images"] == 4 and made["0.5"]["n"] == 50
    assert not (clean / "certify.json").exists()  # trained without noise: no sigma of its own
    again = subprocess.run([*cmd, *certify, "--certify-sigma", "0.25"], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "ran 2" in again.stdout and "certified 2" in again.stdout
    assert set(json.loads((noise / "certify.json").read_text())) == {"0.5", "0.25"}
    assert list(json.loads((clean / "certify.json").read_text())) == ["0.25"]


def test_certify_settings_without_then_are_one_line(tmp_path, capsys):
    from momentreg.cli.main import main

    spec = tmp_path / "spec.toml"
    spec.write_text(THEN_SPEC)
    code = main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--certify-n", "5"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "momentreg: error: --certify-n needs --then certify"
    )


def test_certify_after_builds_the_evaluate_command_on_the_runs_device_or_the_one_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sigma": 0.5, "device": "cuda:1"}))
    argv = CertifyAfter(limit=50, n=1000).argv(tmp_path)
    assert argv[:5] == ["evaluate", str(tmp_path), "--certify", "--sigma", "0.5"]
    assert argv[argv.index("--device") + 1] == "cuda:1" and argv[argv.index("--n") + 1] == "1000"
    argv = CertifyAfter(sigma=0.25, device="cpu").argv(tmp_path)
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--sigma") + 1] == "0.25"
    (tmp_path / "config.json").write_text(json.dumps({"sigma": 0.0}))
    assert CertifyAfter().argv(tmp_path) is None  # trained without noise: nothing to certify at


@pytest.mark.slow
def test_export_copies_every_finished_run_without_its_checkpoint(local_sweep, tmp_path):
    out, dest = local_sweep[0], tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "momentreg", "sweep", "export", str(out),
                             "--to", str(dest)], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "exported 6 finished and 0 failed runs" in result.stdout
    for run in (out / "runs").iterdir():
        copied = sorted(p.name for p in (dest / run.name).iterdir())
        assert copied == ["config.json", "history.csv", "metrics.json"], copied
        for name in copied:
            assert (dest / run.name / name).read_bytes() == (run / name).read_bytes()


def _run_folder(root: Path, name: str, *files: str) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    for file in files:
        (run / file).write_text(f"{name}/{file}")
    return run


def test_export_replaces_stale_runs_of_a_cell_and_keeps_the_other_cells(tmp_path):
    from momentreg.runs.export import export_sweep

    sweep_dir, dest = tmp_path / "sweep", tmp_path / "results"
    for name in ("noise-s0.5-aaaaaaaa", "clean-bbbbbbbb"):  # an earlier export
        _run_folder(dest.parent / "old", name, "config.json", "metrics.json")
    export_sweep(dest.parent / "old", dest)
    _run_folder(sweep_dir, "noise-s0.5-cccccccc", "config.json", "metrics.json", "checkpoint.pt",
                "certify.json", "certify-sigma0.5.tsv", "certify-sigma0.5.partial.pt")  # fmt: skip
    _run_folder(sweep_dir, "macer-s0.5-dddddddd", "config.json", "error.txt", "checkpoint.pt")
    _run_folder(sweep_dir, "moment-s1.0-eeeeeeee", "config.json", "checkpoint.pt")  # pending

    done = export_sweep(sweep_dir, dest)
    assert (done.finished, done.failed) == (["noise-s0.5-cccccccc"], ["macer-s0.5-dddddddd"])
    assert (done.replaced, done.kept) == (["noise-s0.5-aaaaaaaa"], ["clean-bbbbbbbb"])
    held = {p.name: sorted(f.name for f in p.iterdir()) for p in dest.iterdir()}
    assert held == {
        "clean-bbbbbbbb": ["config.json", "metrics.json"],
        "noise-s0.5-cccccccc": ["certify-sigma0.5.tsv", "certify.json", "config.json",
                                "metrics.json"],
        "macer-s0.5-dddddddd": ["config.json", "error.txt"],
    }  # fmt: skip
    assert (dest / "clean-bbbbbbbb" / "config.json").read_text() == "clean-bbbbbbbb/config.json"


def test_export_of_a_folder_that_is_no_sweep_is_one_line(tmp_path):
    result = cli("sweep", "export", str(tmp_path), "--to", str(tmp_path / "d"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(f"{tmp_path} is not a sweep directory: it has no runs/")
    assert not (tmp_path / "d").exists()


def test_attack_table_gives_each_energy_and_its_ratio_to_the_baseline():
    from momentreg.runs.report import attack_table

    def row(method, energy, gnr):
        energies = {f"energy_{k}": energy for k in ATTACK_LABELS}
        return {"method": method, "gnr": gnr, "test_accuracy": 99.0, **energies}

    clean, noise = row("clean", 0.5, 70.0), {**row("noise", 2.0, 90.0), "sigma": 0.5}
    noise["energy_pgd"] = None  # not run
    lines = attack_table([clean, noise], clean).splitlines()
    assert lines[2].startswith("| clean | 0.5 | 0.5 |") and lines[2].endswith("| 70.00 | 99.00 |")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    pgd = 1 + list(ATTACK_LABELS).index("pgd")
    assert cells[0] == "noise sigma=0.5" and cells[pgd] == "n/a"
    assert [c for i, c in enumerate(cells[1:-2], 1) if i != pgd] == ["2 (4.0x)"] * 5
