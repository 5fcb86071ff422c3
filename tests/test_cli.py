import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from momentreg.cli.main import main
from tests.helpers import QUICK, cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "moment"
    result = cli(
        "train", *QUICK, "--method", "moment", "--sigma", "0.5", "--alpha", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the module's run for a test that writes into it (the original stays as made)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.slow
def test_train_writes_the_run_layout(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "checkpoint.pt",
        "history.csv",
        "metrics.json",
    }
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "moment" and config["alpha"] == 2 and config["sigma"] == 0.5
    assert config["optimizer"] == "adam" and config["plateau_factor"] == 0.9  # LeNet protocol
    assert config["version"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_accuracy", "gnr", "gnr_curve", "epochs", "train_seconds"):
        assert key in metrics
    assert 1.5 < metrics["passes_per_image"] < 2.5  # the moment step: about two clean passes
    assert len(metrics["gnr_curve"]["sigmas"]) == 30
    made = metrics["environment"]  # where it was made: a study may mix runs of two machines
    assert made["torch"] == torch.__version__ and made["gpu"] is None  # trained on the CPU
    made_on = datetime.date.fromisoformat(made["date"])
    assert abs(made_on - datetime.date.today()).days <= 1 and made["cpus"] == os.cpu_count()
    header = (run_dir / "history.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr")


@pytest.mark.slow
def test_evaluate_recomputes_metrics(run_copy, capsys):
    before = json.loads((run_copy / "metrics.json").read_text())
    assert main(["evaluate", str(run_copy), "--gnr", "--limit", "30", "--quiet"]) == 0
    after = json.loads((run_copy / "metrics.json").read_text())
    assert after["gnr_images"] == 30 and after["test_images"] == 30
    assert after["train_seconds"] == before["train_seconds"]
    assert "GNR" in capsys.readouterr().out


@pytest.mark.slow
def test_non_empty_out_needs_resume_or_force(run_dir):
    result = cli("train", *QUICK, "--out", str(run_dir))
    assert result.returncode == 2
    assert "not empty" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sigma", "-1"], "must be >= 0"),
        (["--alpha", "-0.5"], "must be >= 0"),
        (["--folds", "-2"], "must be > 0"),
        (["--sigma", "nan"], "must be finite"),
        (["--model", "vgg"], "invalid choice"),
        (["--dataset", "svhn"], "invalid choice"),
        (["--dataset", "mnist"], "needs --data-dir"),
        (["--val-fraction", "1.5"], "val-fraction"),
        (["--plateau-factor", "2"], "plateau-factor"),
        (["--lr-schedule", "budget-step"], "set time-budget"),
        (["--alpha-delay-budget", "0.3"], "set time-budget"),
        (["--alpha-delay-budget", "1", "--time-budget", "5"], "invalid alpha-delay-budget"),
        (["--lr-step-budget", "1.5", "--time-budget", "5"], "invalid lr-step-budget"),
        (["--time-budget", "5", "--step-budget", "100"], "one budget"),
        (["--step-budget", "3", "--pass-budget", "0.5"], "one budget"),
        (["--step-budget", "0"], "--step-budget"),
        (["--pass-budget", "0"], "--pass-budget"),
        (["--method", "consistency-analytic", "--samples", "3"], "has none to set"),
    ],
)
def test_invalid_arguments_exit_2_with_one_line(tmp_path, args, message, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        code = main(["train", *QUICK, *args, "--out", str(out)])
        raise SystemExit(code)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momentreg: error: ")
    assert message in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_unwritable_out_is_refused_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("train", *QUICK, "--out", str(blocker / "run"))
    assert result.returncode == 2 and "not writable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_of_a_missing_run_is_a_clear_error(tmp_path):
    result = cli("evaluate", str(tmp_path / "nope"))
    assert result.returncode == 2 and "config.json does not exist" in result.stderr


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = cli(
        "demo",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--train-limit",
        "200",
        "--folds",
        "2",
        "--gnr-limit",
        "50",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "| clean |" in result.stdout and "| moment sigma=1.0 alpha=1.0 |" in result.stdout
    assert (out / "consistency.png").stat().st_size > 10_000
    assert len(list(out.glob("*/metrics.json"))) == 3


@pytest.mark.slow
def test_evaluate_attacks_writes_attacks_json_and_table(run_copy, tmp_path, capsys):
    metrics_before = (run_copy / "metrics.json").read_text()
    code = main(
        ["evaluate", str(run_copy), "--attacks", "fgsm,deepfool", "--limit", "4", "--quiet"]
    )
    assert code == 0
    assert (run_copy / "metrics.json").read_text() == metrics_before  # attacks alone leave it
    attacks = json.loads((run_copy / "attacks.json").read_text())
    assert set(attacks) == {"fgsm", "deepfool"}
    assert attacks["fgsm"]["images"] + attacks["fgsm"]["excluded_misclassified"] == 4
    assert "| fgsm |" in capsys.readouterr().out

    assert main(["table", str(run_copy), "--out", str(tmp_path / "t")]) == 0
    table = (tmp_path / "t" / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | dataset | method | sigma | alpha | folds | run | PGD |")
    row = table[2].split("|")
    assert row[3].strip() == "moment" and row[8].strip() == "" and row[10].strip() != ""
    assert (tmp_path / "t" / "table.csv").read_text().startswith("model,dataset,method")


@pytest.mark.slow
def test_unknown_attack_is_a_usage_error(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run_dir), "--attacks", "pgd,cw"])
    assert e.value.code == 2 and "unknown attack 'cw'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_certify_writes_cohens_tsv_and_a_summary(run_copy, capsys):
    args = ["evaluate", str(run_copy), "--certify", "--sigma", "0.25", "--limit", "3"]
    assert main([*args, "--n0", "20", "--n", "200", "--batch", "100", "--quiet"]) == 0
    tsv = (run_copy / "certify-sigma0.25.tsv").read_text().splitlines()
    assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(tsv) == 4
    summary = json.loads((run_copy / "certify.json").read_text())["0.25"]
    assert summary["images"] == 3 and summary["n"] == 200 and summary["alpha"] == 0.001
    assert set(summary["certified_accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert "certified accuracy" in capsys.readouterr().out
    assert main([*args, "--alpha", "1.5"]) == 2
    assert "--alpha must be below 1" in capsys.readouterr().err


@pytest.mark.slow
def test_force_clears_every_evaluation_of_the_old_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    certify = ["--certify", "--n0", "10", "--n", "20", "--batch", "20", "--limit", "3"]
    assert main(["evaluate", str(out), "--quiet", *certify]) == 0
    tightness = ["--limit", "2", "--mc-samples", "20", "--sigmas", "0.5", "--quiet"]
    assert main(["tightness", str(out), *tightness]) == 0
    stale = ["certify.json", "certify-sigma0.25.tsv", "tightness.json"]
    assert all((out / name).exists() for name in stale)
    (out / "notes.txt").write_text("the user's own file")
    assert main(["train", *QUICK, "--seed", "1", "--force", "--out", str(out)]) == 0
    assert not any((out / name).exists() for name in stale)  # report would credit them to it
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert (out / "notes.txt").exists()


@pytest.mark.parametrize(
    "settings, message",
    [({"sigma": "abc"}, "wrong type"), ({"sigmaa": 1}, "unknown setting 'sigmaa'")],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, settings, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_config_of_a_run_retrains_it_and_refuses_other_options(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", *QUICK, "--seed", "3", "--out", str(first)]) == 0
    again = ["train", "--config", str(first / "config.json"), "--quiet"]
    assert main([*again, "--out", str(tmp_path / "again")]) == 0
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, tmp_path / "again"))
    assert a == b and b["seed"] == 3
    capsys.readouterr()
    assert main([*again, "--sigma", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "drop --sigma" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_that_predicts_one_class_is_warned_of(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *QUICK, "--out", str(run)).returncode == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    for state in (ckpt["model"], ckpt["best"]["state"]):
        for key, value in state.items():
            if key.endswith(("weight", "bias")):
                value.zero_()  # every logit 0: class 0 for every image
    torch.save(ckpt, run / "checkpoint.pt")
    assert main(["evaluate", str(run), "--limit", "20", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the model predicts one class for every test image" in err
    assert json.loads((run / "metrics.json").read_text())["constant_predictions"] is True
