"""The paper's SGD recipe (AlexNet) with the regularizer: the weighting of its two terms, and what
a run that fails or collapses says."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentreg.core.regularizer import MomentRegularizer, expected_logits, moment_loss
from momentreg.errors import TrainingError
from momentreg.models.zoo import build_model
from momentreg.runs.run import RunConfig
from momentreg.training.loop import (
    CollapseWarning,
    TrainConfig,
    TrainState,
    _train_step,
    _validate,
    load_checkpoint,
    train,
)
from tests.helpers import cli, tiny_net


def _batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.arange(n) % 10


@pytest.mark.parametrize("alpha", [0.5, 1.0, 20.0])
def test_the_convex_weighting_is_the_papers_sum_over_one_plus_alpha(alpha):
    torch.manual_seed(0)
    net, (x, y) = tiny_net(), _batch()
    direct = F.cross_entropy(net(x), y) + alpha * F.cross_entropy(expected_logits(net, x, 0.5), y)
    total, parts = moment_loss(net, x, y, 0.5, alpha, weighting="convex")
    assert torch.allclose(total, direct / (1 + alpha), rtol=1e-6)
    assert torch.allclose(parts["clean"] + alpha * parts["moment"], direct, rtol=1e-6)
    summed, _ = MomentRegularizer(net, 0.5, alpha)(x, y)  # the paper's sum stays the default
    assert torch.allclose(summed, direct, rtol=1e-6)
    convex, _ = MomentRegularizer(net, 0.5, alpha, weighting="convex")(x, y)
    assert torch.allclose(convex, total, rtol=1e-6)


def test_an_unknown_weighting_is_refused():
    net, (x, y) = tiny_net(), _batch()
    with pytest.raises(ValueError, match="weighting"):
        moment_loss(net, x, y, 0.5, 1.0, weighting="mean")
    with pytest.raises(ValueError, match="weighting"):
        MomentRegularizer(net, 0.5, weighting="mean")
    with pytest.raises(ValueError, match="moment weighting"):
        TrainConfig.from_flat(dict(method="moment", moment_weighting="mean")).validate()


def _first_step(settings: dict) -> dict[str, torch.Tensor]:
    """The weight change of one training step of AlexNet under the settings' protocol (from the
    same initial weights and batch), without weight decay: the loss's part of the step."""
    settings = {"model": "alexnet", "dataset": "cifar10", "weight_decay": 0.0, **settings}
    config = RunConfig.from_settings(settings)
    torch.manual_seed(0)
    model = build_model("alexnet", "cifar10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainState.start(model, config.train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32, generator=gen), torch.arange(16) % 10
    _train_step(state, x, y, torch.zeros(16, dtype=torch.bool), config.train, None)
    return {k: v - before[k] for k, v in model.state_dict().items()}


def test_the_alexnet_protocol_takes_a_clean_sized_sgd_step_with_the_regularizer():
    """The failure of the paper's AlexNet recipe, at its smallest: with the paper's sum, an SGD
    step of the regularized loss is 1 + alpha times a clean step where the two terms agree (small
    sigma), so lr 0.1 acts as lr 0.2 and AlexNet collapses to one class or diverges
    (docs/cifar.md). The protocol's weighting takes a clean-sized step."""
    clean = _first_step({"method": "clean"})
    moment = _first_step({"method": "moment", "sigma": 1e-4, "alpha": 1.0, "sigma_warmup": 0})
    weight = "1.weight"  # the first convolution
    ratio = moment[weight].norm() / clean[weight].norm()
    assert ratio == pytest.approx(1.0, abs=0.01)
    paper = _first_step({"method": "moment", "sigma": 1e-4, "alpha": 1.0, "sigma_warmup": 0,
                         "moment_weighting": "sum"})  # fmt: skip
    assert paper[weight].norm() / clean[weight].norm() == pytest.approx(2.0, abs=0.02)


def test_the_protocols_weigh_the_moment_term_by_their_optimizer():
    alexnet = RunConfig.from_settings({"model": "alexnet", "dataset": "cifar10"}).train
    lenet = RunConfig.from_settings({"model": "lenet", "dataset": "cifar10"}).train
    assert (alexnet.optimizer.name, alexnet.method_settings.moment_weighting) == ("sgd", "convex")
    assert (lenet.optimizer.name, lenet.method_settings.moment_weighting) == ("adam", "sum")


def _diverging(tmp_path, method):
    """A run whose SGD steps are far too large (one a epoch): finite for a few epochs, then not."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10
    torch.manual_seed(0)
    net = tiny_net()
    settings = dict(method=method, sigma=0.5, alpha=1.0, optimizer="sgd", lr=1e6, momentum=0.0)
    cfg = TrainConfig.from_flat(
        dict(settings, batch_size=48, epochs=50, sigma_warmup=0, early_stop=50)
    )
    with pytest.raises(TrainingError) as failure:
        train(net, (images[:48], labels[:48]), (images[48:], labels[48:]), cfg,
              out_dir=tmp_path, progress=False)  # fmt: skip
    return str(failure.value)


def test_a_non_finite_step_names_its_step_and_term_and_keeps_the_last_good_epoch(tmp_path):
    message = _diverging(tmp_path, "moment")
    assert "non-finite" in message and " at step " in message, message
    assert "of the loss (clean " in message or "gradient" in message, message
    assert "\n" not in message
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    epochs = ckpt["epoch"]
    assert epochs >= 1 and f"(epoch {epochs})" in message
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    rows = (tmp_path / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + epochs  # the header and every finished epoch


def _constant_net(favoured: int) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        net[1].bias[favoured] = 5.0
    return net


def test_a_validation_that_predicts_one_class_is_a_collapse_unless_the_labels_are_one_class():
    images = torch.rand(40, 1, 2, 2)
    balanced = torch.arange(40) % 10
    assert _validate(_constant_net(3), images, balanced, 16, "cpu")[2]
    skewed = torch.where(torch.arange(40) < 30, 3, balanced)  # 75% of the labels are class 3
    assert not _validate(_constant_net(3), images, skewed, 16, "cpu")[2]
    loss, acc, collapsed = _validate(tiny_net(), torch.rand(40, 1, 28, 28), balanced, 16, "cpu")
    assert not collapsed


def test_a_collapse_is_flagged_in_the_history_and_warned_of_at_once():
    images = (torch.rand(50, 1, 2, 2) * 255).to(torch.uint8)
    labels = torch.arange(50) % 10
    net = _constant_net(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(net, (images[:40], labels[:40]), (images[40:], labels[40:]),
                        lr=1e-9, epochs=2, batch_size=20, progress=False)  # fmt: skip
    assert [row["collapsed"] for row in history] == [True, True]
    collapses = [w for w in caught if issubclass(w.category, CollapseWarning)]
    assert len(collapses) == 1 and "epoch 1" in str(collapses[0].message)


@pytest.mark.slow
def test_the_cli_sets_and_records_the_weighting(tmp_path):
    from tests.helpers import QUICK

    out = tmp_path / "run"
    args = ["train", "--method", "moment", "--sigma", "0.5", "--moment-weighting", "convex"]
    code, _, err = (lambda r: (r.returncode, r.stdout, r.stderr))(
        cli(*args, "--out", str(out), *QUICK)
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["moment_weighting"] == "convex"
    bad = cli(*args, "--out", str(tmp_path / "bad"), *QUICK, "--moment-weighting", "mean")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
