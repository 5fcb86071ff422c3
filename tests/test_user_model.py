"""`momentreg train --model FILE.py:FUNCTION`: the user's own model from the command line."""

import json

import pytest

from momentreg.cli import main

FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, channels, size, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * (size // 4) ** 2, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.max_pool2d(x, 4), 1))


def make(channels, size, classes):
    return Net(channels, size, classes)


def broken(channels, size, classes):
    raise RuntimeError("no such width")


def tanh_head(channels, size, classes):
    return nn.Sequential(nn.Conv2d(channels, 2, 3), nn.Tanh(), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(classes))
"""
QUICK = ["--train-limit", "300", "--epochs", "1", "--batch-size", "50", "--lr", "1e-3"]
QUICK += ["--gnr-limit", "20", "--quiet"]


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY)
    return path


def test_train_moment_then_certify_a_user_model(tmp_path, factory_file, capsys):
    spec = f"{factory_file}:make"
    out = tmp_path / "run"
    args = ["train", "--model", spec, "--method", "moment", "--sigma", "0.5", *QUICK]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == spec
    certify = ["--certify", "--n0", "10", "--n", "50", "--batch", "50", "--limit", "4"]
    assert main(["evaluate", str(out), "--quiet", "--model", spec, *certify]) == 0
    assert json.loads((out / "certify.json").read_text())["0.25"]["images"] == 4
    capsys.readouterr()
    # the run names its factory, but loading it runs code: the user must name it again
    assert main(["evaluate", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--model {spec}" in err[0]


def test_a_module_function_name_from_the_python_path(tmp_path, factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    out = tmp_path / "run"
    assert main(["train", "--model", "mymodel:make", *QUICK, "--out", str(out)]) == 0
    assert (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "function, message",
    [
        ("broken", "the factory failed for 1 channels, size 28, 10 classes (RuntimeError"),
        ("missing", "has no function 'missing'"),
        ("tanh_head", "is not affine"),
    ],
)
def test_a_bad_factory_is_one_line_and_writes_nothing(
    tmp_path, factory_file, capsys, function, message
):
    out = tmp_path / "run"
    args = ["train", "--model", f"{factory_file}:{function}", "--method", "moment", *QUICK]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_a_missing_factory_file_is_one_line(tmp_path, capsys):
    assert main(["train", "--model", "nope/model.py:make", *QUICK, "--out", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err


BUGGY = """
from torch import nn


class Buggy(nn.Module):
    def __init__(self, channels, size, classes):
        super().__init__()
        self.fc = nn.Linear(channels * size * size, classes)

    def forward(self, x):
        raise ValueError("a bug in the model's forward")


def make(channels, size, classes):
    return Buggy(channels, size, classes)
"""


@pytest.mark.slow
def test_a_bug_in_a_user_model_keeps_its_traceback(tmp_path):
    """Only momentreg's own errors are one line: a ValueError from a bug is not a usage error."""
    from tests.helpers import QUICK, cli

    (tmp_path / "buggy.py").write_text(BUGGY)
    done = cli("train", "--model", f"{tmp_path / 'buggy.py'}:make", "--out", str(tmp_path / "r"),
               *QUICK)  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "a bug in the model's forward" in done.stderr
