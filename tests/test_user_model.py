"""`momentreg train --model FILE.py:FUNCTION`: the user's own model from the command line."""

import json

import pytest

from momentreg.cli.main import main

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


def _plain_loop_weights(factory_file, path):
    """A model trained by a plain PyTorch loop on the bundled sample, saved as a state_dict."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from momentreg.data.datasets import load_dataset, to_float

    unit = importlib.util.spec_from_file_location("users_model", factory_file)
    module = importlib.util.module_from_spec(unit)
    unit.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.make(1, 28, 10)
    images, labels = load_dataset("mnist-sample", split="train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(0, 600, 50):
        loss = F.cross_entropy(model(to_float(images[i : i + 50])), labels[i : i + 50])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), path)


def test_evaluate_fine_tune_evaluate_compare_a_model_trained_elsewhere(tmp_path, factory_file):
    """The README's path for a model a user already has, on the bundled sample."""
    weights, model = tmp_path / "mine.pt", f"{factory_file}:make"
    _plain_loop_weights(factory_file, weights)
    card = ["--corruptions", "gaussian_noise,shot_noise", "--limit", "100", "--quiet"]
    assert main(["evaluate", "--model", model, "--weights", str(weights), "--dataset",
                 "mnist-sample", "--card", str(tmp_path / "before"), "--name", "before",
                 *card]) == 0  # fmt: skip
    tune = ["--train-limit", "2000", "--epochs", "2", "--batch-size", "50", "--lr", "1e-3",
            "--sigma-warmup", "0", "--gnr-limit", "20", "--quiet"]  # fmt: skip
    assert main(["train", "--model", model, "--weights", str(weights), "--method", "moment",
                 "--sigma", "1.0", "--out", str(tmp_path / "tuned"), *tune]) == 0  # fmt: skip
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    from momentreg.models.weights import sha256_of

    assert config["weights_sha256"] == sha256_of(weights)
    assert main(["evaluate", str(tmp_path / "tuned"), "--model", model, "--card",
                 str(tmp_path / "after"), "--name", "after", *card]) == 0  # fmt: skip
    assert main(["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--out",
                 str(tmp_path / "both")]) == 0  # fmt: skip
    table = (tmp_path / "both" / "compare.md").read_text()
    assert "| measure | before | after |" in table and "GNR" in table
    assert (tmp_path / "both" / "compare.png").stat().st_size > 0
    before = json.loads((tmp_path / "before" / "card.json").read_text())
    after = json.loads((tmp_path / "after" / "card.json").read_text())
    assert before["images"] == 100 and set(before["corruptions"]) == {"gaussian_noise",
                                                                     "shot_noise"}  # fmt: skip
    assert after["gnr"] > before["gnr"] + 10, (before["gnr"], after["gnr"])  # what it bought
    import torch

    from momentreg.data.datasets import load_dataset, to_float
    from momentreg.models.zoo import build_model

    model = build_model(f"{factory_file}:make", "mnist-sample")
    model.load_state_dict(torch.load(weights, weights_only=True))
    x, y = load_dataset("mnist-sample", split="test")
    direct = (model.eval()(to_float(x[:100])).argmax(1) == y[:100]).float().mean().item()
    assert before["clean_accuracy"] == pytest.approx(100 * direct)


@pytest.mark.parametrize(
    "weights, message",
    [
        ("missing", "no such file"),
        ("code", "not a plain state_dict"),
        ("other", "missing keys for this model"),
        ("shape", "has shape"),
    ],
)
def test_bad_weights_are_one_line_and_exit_2(tmp_path, factory_file, capsys, weights, message):
    import torch
    from torch import nn

    path = tmp_path / "w.pt"
    if weights == "code":
        torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled module: needs code to load
    elif weights == "other":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif weights == "shape":
        from momentreg.models.zoo import build_model

        state = build_model(f"{factory_file}:make", "mnist-sample").state_dict()
        state["fc.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
    args = ["--dataset", "mnist-sample", "--card", str(tmp_path / "c"), "--quiet"]
    code = main(["evaluate", "--model", f"{factory_file}:make", "--weights", str(path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_the_card_of_a_user_model_holds_attacks_and_certificates(tmp_path, factory_file, capsys):
    import torch

    from momentreg.models.zoo import build_model

    weights, model = tmp_path / "w.pt", f"{factory_file}:make"
    torch.manual_seed(0)
    torch.save(build_model(model, "mnist-sample").state_dict(), weights)
    args = ["evaluate", "--model", model, "--weights", str(weights), "--dataset", "mnist-sample",
            "--limit", "20", "--corruptions", "gaussian_noise", "--attacks", "fgsm,aga",
            "--certify", "--n0", "10", "--n", "100", "--quiet"]  # fmt: skip
    assert main([*args, "--alpha", "1.5", "--card", str(tmp_path / "bad")]) == 2  # old spelling
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "momentreg: warning: --alpha is deprecated here and will be removed; use "
        "--failure-probability",
        "momentreg: error: --failure-probability must be below 1, got 1.5",
    ]
    assert main([*args, "--card", str(tmp_path / "card")]) == 0
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    assert set(card["attacks"]) == {"fgsm", "aga"} and card["certified"]["images"] == 20
    shown = capsys.readouterr().out
    assert "fgsm: median minimal Linf perturbation" in shown and "ACR, sigma 0.25" in shown
    assert not (tmp_path / "card" / "attacks.json").exists()  # the card holds them
