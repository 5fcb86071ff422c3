import copy
import math

import pytest
import torch
from torch import nn

from momentreg.core.regularizer import check_regularizable
from momentreg.data.datasets import load_dataset, to_float, train_val_split
from momentreg.errors import CheckpointError, TrainingError
from momentreg.evaluation.robustness import accuracy
from momentreg.models.zoo import build_model
from momentreg.training.loop import (
    TrainConfig,
    TrainState,
    _budget_lr,
    _step_config,
    _StepClock,
    _train_step,
    _validate,
    load_checkpoint,
    model_weights,
    train,
    train_one_epoch,
)
from momentreg.training.methods import ANALYTIC
from tests.helpers import SHARED_MNIST, HostReads, needs_mnist, step_cases, tiny_net


def _sample(n=300):
    images, labels = load_dataset("mnist-sample", split="train")
    return train_val_split(images[:n], labels[:n], 0.2, seed=0)


FAST = dict(lr=1e-2, batch_size=50, progress=False)


@pytest.mark.parametrize("method", ["clean", "augment", "noise", "moment"])
def test_every_method_trains_and_is_deterministic(method):
    tr, va = _sample()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = tiny_net()
        history = train(net, tr, va, method=method, sigma=0.3, folds=3, epochs=2, **FAST)
        states.append(net.state_dict())
    assert len(history) == 2
    assert history[-1]["val_accuracy"] > 30
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("method, depth, samples", step_cases())
def test_a_training_step_waits_for_the_device_once(method, depth, samples):
    """The loss and gradient norm read back (the non-finite checks) are a step's one host-device
    sync: on a GPU shared by many runs every further one costs a round of the other runs' work."""
    torch.manual_seed(0)
    net = tiny_net()
    cfg = TrainConfig.from_flat(
        dict(method=method, sigma=0.5, alpha=1.0, moment_depth=depth, folds=2, samples=samples)
    )
    state = TrainState.start(net, cfg, torch.device("cpu"))
    split = check_regularizable(net, depth) if method in ANALYTIC else None
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    noisy = torch.arange(8) % 2 == 0
    _train_step(state, x, y, noisy, cfg, split)  # the optimizer makes its state at its first step
    steps = [t["step"] for t in state.optimizer.state.values() if "step" in t]
    with HostReads(on_host=steps) as reads:
        _train_step(state, x, y, noisy, cfg, split)
    assert reads.ops == ["tolist"]


@pytest.mark.parametrize("method", ["noise", "consistency-analytic"])
def test_an_epoch_waits_once_a_step_and_a_few_times_an_epoch(method):
    """The loop around the steps adds no wait per step: an epoch of 8 steps reads the device 4
    more times than one of 4 steps (the sampling order, the accuracy count: once an epoch)."""
    images = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10
    reads = []
    for n in (32, 64):  # 4 and 8 steps of 8
        net = tiny_net()
        cfg = TrainConfig.from_flat(
            dict(  # SGD: Adam's step counts are read on the host, a CPU tensor on GPUs too
                method=method, sigma=0.5, alpha=1.0, batch_size=8, sigma_warmup=100, optimizer="sgd"
            )
        )
        state = TrainState.start(net, cfg, torch.device("cpu"))
        split = check_regularizable(net) if method in ANALYTIC else None
        with HostReads() as r:
            train_one_epoch(state, images[:n], labels[:n], cfg, _StepClock(), split, False)
        reads.append(len(r.ops))
    assert reads[1] - reads[0] == 4


def test_validation_waits_for_the_device_once_per_sum_not_per_batch():
    images, labels = (torch.rand(50, 1, 28, 28) * 255).to(torch.uint8), torch.arange(50) % 10
    net = tiny_net()
    expected = [
        (nn.functional.cross_entropy(net(to_float(images)), labels).item(),
         100.0 * (net(to_float(images)).argmax(1) == labels).float().mean().item())
    ]  # fmt: skip
    with HostReads() as reads:
        result = _validate(net, images, labels, 8, "cpu")  # 7 batches
    assert reads.ops == ["tolist"]
    assert result[:2] == pytest.approx(expected[0], rel=1e-6)


def test_augment_epoch_visits_n_folds_of_the_data():
    tr, va = _sample()
    net = tiny_net()
    seen = []
    net.register_forward_pre_hook(lambda m, inp: seen.append(len(inp[0])) if m.training else None)
    train(net, tr, va, method="augment", sigma=0.3, folds=4, epochs=1, **FAST)
    assert sum(seen) == 4 * len(tr[1])


def test_keeps_best_validation_weights_and_stops_early(tmp_path):
    tr, va = _sample()
    net = tiny_net()
    history = train(
        net,
        tr,
        va,
        epochs=30,
        early_stop=2,
        lr=0.5,
        batch_size=50,
        progress=False,
        out_dir=tmp_path,
    )
    best = min(history, key=lambda r: r["val_loss"])
    assert len(history) < 30 and len(history) - best["epoch"] == 2
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["best"]["epoch"] == best["epoch"]
    assert all(torch.equal(net.state_dict()[k], ckpt["best"]["state"][k]) for k in ckpt["model"])


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_chooses_the_weights_the_run_ends_with(tmp_path, keep):
    """At a rate this high the validation loss is lowest before the last epoch, so the two
    choices differ; the model, and what a finished checkpoint loads, are the chosen weights."""
    tr, va = _sample()
    torch.manual_seed(0)
    net = tiny_net()
    history = train(
        net, tr, va, epochs=6, lr=0.5, batch_size=50, progress=False, out_dir=tmp_path, keep=keep
    )
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert min(history, key=lambda r: r["val_loss"])["epoch"] < len(history)  # they differ
    chosen = ckpt["best"]["state"] if keep == "best" else ckpt["model"]
    other = ckpt["model"] if keep == "best" else ckpt["best"]["state"]
    assert any(not torch.equal(chosen[k], other[k]) for k in chosen)
    assert all(torch.equal(net.state_dict()[k], chosen[k]) for k in chosen)
    assert all(torch.equal(model_weights(ckpt)[k], chosen[k]) for k in chosen)


def test_time_budget_ends_the_run_in_the_step_that_crosses_it(tmp_path):
    tr, va = _sample()  # 240 training images: 5 steps per epoch
    budget = 0.05  # no early stop: on a fast machine 10 epochs without progress fit in 0.05 s
    kwargs = dict(epochs=1000, time_budget=budget, early_stop=1000, out_dir=tmp_path, **FAST)
    history = train(tiny_net(), tr, va, **kwargs)
    last = history[-1]
    steps = last["steps"]
    assert last["step_seconds"] >= budget
    assert steps < 1000 * 5 and len(history) == math.ceil(steps / 5)
    assert [r["steps"] for r in history[:-1]] == [5 * (i + 1) for i in range(len(history) - 1)]
    # the crossing step ends it: earlier epochs stayed under the budget
    assert all(r["step_seconds"] < budget for r in history[:-1])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["stopped"]
    again = train(tiny_net(), tr, va, resume=True, **kwargs)
    assert again == history  # a finished budget run does not train on when resumed


@pytest.mark.parametrize(
    "budget, clocks",
    [  # (steps, seconds) of the clock
        ({"time_budget": 9.0}, [(100, t) for t in (0.0, 2.99, 3.01, 3.07, 6.01, 8.99)]),
        ({"step_budget": 90}, [(n, 1e6) for n in (0, 29, 30, 31, 60, 89)]),
    ],
)
def test_budget_step_rate_and_deferral_follow_the_budget(budget, clocks):
    """The anchors' recipe as shares of a budget of 9 s or 90 steps: lr / 10 at a third and two
    thirds of it; MACER's term off for its first 0.34 (3.06 s, 30.6 steps). Under a time budget
    the steps do not matter, under a step budget the seconds do not."""
    cfg = TrainConfig.from_flat(dict(
        method="macer", sigma=0.5, alpha=16.0, lr=0.01, lr_gamma=0.1, lr_schedule="budget-step",
        lr_step_budget=1 / 3, alpha_delay_budget=0.34, **budget,
    ))  # fmt: skip
    cfg.validate()
    opt = torch.optim.SGD(tiny_net().parameters(), lr=cfg.optimizer.lr)
    rates = [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4]
    alphas = [0.0, 0.0, 0.0, 16.0, 16.0, 16.0]
    for (steps, seconds), lr, alpha in zip(clocks, rates, alphas, strict=True):
        clock = _StepClock(steps=steps, seconds=seconds)
        _budget_lr(opt, cfg, clock)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        assert _step_config(cfg, 1, clock).alpha == alpha
    by_epoch = TrainConfig.from_flat(dict(method="macer", alpha=16.0, alpha_delay=2))
    assert [_step_config(by_epoch, e, _StepClock()).alpha for e in (1, 2, 3)] == [0, 0, 16]


def test_step_budget_ends_the_run_after_exactly_that_many_steps_and_repeats(tmp_path):
    tr, va = _sample()  # 240 training images: 5 steps per epoch
    kwargs = dict(epochs=1000, step_budget=12, early_stop=1000, **FAST)
    history = train(tiny_net(), tr, va, out_dir=tmp_path, **kwargs)
    assert [r["steps"] for r in history] == [5, 10, 12]  # the last epoch is a partial one
    assert load_checkpoint(tmp_path / "checkpoint.pt")["finished"]
    assert train(tiny_net(), tr, va, out_dir=tmp_path, resume=True, **kwargs) == history
    a = tiny_net()
    b = copy.deepcopy(a)
    train(a, tr, va, keep="last", **kwargs)
    train(b, tr, va, keep="last", **kwargs)
    weights = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in weights)


@pytest.mark.parametrize("method, passes", [("noise", 1), ("consistency", 2), ("macer", 16)])
def test_a_pass_budget_gives_each_method_the_steps_of_its_counted_compute(tmp_path, method, passes):
    """2.5 clean epochs of 240 training images in batches of 50: 12 noise steps (600 image
    passes), 6 two-copy consistency steps, and at least one 16-copy MACER step (its one step is
    already 3.3 epochs). The run is the step-budgeted run of those steps, weight for weight."""
    tr, va = _sample()
    settings = dict(method=method, sigma=0.5, alpha=2.0, epochs=1000, early_stop=1000, **FAST)
    kwargs = dict(settings, pass_budget=2.5, keep="last")
    a, b = tiny_net(), tiny_net()
    b.load_state_dict(a.state_dict())
    history = train(a, tr, va, out_dir=tmp_path, **kwargs)
    steps = max(1, (2.5 * 240) // (50 * passes))
    assert history[-1]["steps"] == steps and len(history) == math.ceil(steps / 5)
    assert train(tiny_net(), tr, va, out_dir=tmp_path, resume=True, **kwargs) == history
    train(b, tr, va, step_budget=steps, keep="last", **settings)
    weights = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in weights)


def test_a_pass_budget_takes_the_passes_its_caller_counted():
    """run.py counts a step's passes once, for metrics.json, and hands them to the trainer: 2.5
    clean epochs of 240 images at 2 passes are 6 steps, even for noise training (1 pass)."""
    tr, va = _sample()
    kwargs = dict(method="noise", sigma=0.5, epochs=1000, early_stop=1000, **FAST)
    history = train(tiny_net(), tr, va, pass_budget=2.5, passes=2.0, **kwargs)
    assert history[-1]["steps"] == 6


def test_a_pass_budget_rounds_its_steps_down_and_keeps_one():
    cfg = TrainConfig.from_flat(dict(batch_size=256, pass_budget=3.0))
    assert cfg.pass_budget_steps(1.0, 54_000) == 632  # 632.8 steps of one pass
    assert cfg.pass_budget_steps(2.0, 54_000) == 316  # 316.4 steps of two-copy consistency
    assert cfg.pass_budget_steps(1.91, 54_000) == 331  # 331.3 steps of 1.91 passes
    assert cfg.pass_budget_steps(16.0, 54_000) == 39  # 39.55
    assert cfg.pass_budget_steps(2.0, 256 * 2) == 3  # exactly 3 steps: not 2 from rounding
    assert cfg.pass_budget_steps(16.0, 100) == 1  # less than one step: one


def test_a_run_has_one_budget():
    with pytest.raises(ValueError, match="time-budget and step-budget are both set"):
        TrainConfig.from_flat(dict(time_budget=5.0, step_budget=10)).validate()
    with pytest.raises(ValueError, match="step-budget and pass-budget are both set"):
        TrainConfig.from_flat(dict(step_budget=10, pass_budget=2.0)).validate()
    with pytest.raises(ValueError, match="invalid step-budget"):
        TrainConfig.from_flat(dict(step_budget=-1)).validate()
    with pytest.raises(ValueError, match="invalid pass-budget"):
        TrainConfig.from_flat(dict(pass_budget=math.inf)).validate()
    with pytest.raises(ValueError, match="shares of the budget"):
        TrainConfig.from_flat(dict(lr_schedule="budget-step")).validate()
    TrainConfig.from_flat(dict(lr_schedule="budget-step", pass_budget=1.0)).validate()


def test_a_budget_step_run_records_the_decayed_rate(tmp_path):
    tr, va = _sample()
    # quarters of 0.3 s: on a loaded machine a step of 0.3 s is far rarer than one of 0.075 s
    # (which left the last step in the third quarter of a 0.3 s budget in 3 of 8 tries)
    kwargs = dict(FAST, lr_schedule="budget-step", time_budget=1.2, lr_step_budget=0.25)
    history = train(tiny_net(), tr, va, epochs=1000, early_stop=1000, **kwargs)
    # the last step starts after at least 3 of the 4 quarters: lr 1e-2 * 0.1**3
    assert history[-1]["lr"] == pytest.approx(1e-5)
    assert history[0]["lr"] > history[-1]["lr"]


def test_non_finite_loss_names_epoch_and_batch_and_keeps_checkpoint(tmp_path):
    (tr_x, tr_y), va = _sample()
    train(tiny_net(), (tr_x, tr_y), va, epochs=1, out_dir=tmp_path, **FAST)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    bad = to_float(tr_x)
    bad[60] = float("nan")  # one poisoned image: whichever batch draws it fails
    where = r"non-finite loss \(nan\) at step \d+ \(epoch 1, batch \d+\)"
    with pytest.raises(TrainingError, match=where):
        train(tiny_net(), (bad, tr_y), va, epochs=3, **FAST)
    with pytest.raises(TrainingError, match="epoch 2"):
        train(tiny_net(), (bad, tr_y), va, epochs=3, out_dir=tmp_path, resume=True, **FAST)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    tr, va = _sample()
    train(tiny_net(), tr, va, epochs=1, out_dir=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match="method: checkpoint 'clean', this run 'moment'"):
        train(tiny_net(), tr, va, epochs=2, method="moment", out_dir=tmp_path, resume=True, **FAST)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable momentreg checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.slow
@needs_mnist
def test_lenet_one_epoch_on_real_mnist_reaches_97_percent():
    torch.manual_seed(0)
    images, labels = load_dataset("mnist", SHARED_MNIST, "train")
    tr, va = train_val_split(images, labels, 0.1, seed=0)
    net = build_model("lenet", "mnist")
    train(net, tr, va, epochs=1, lr=1e-3, batch_size=128, progress=False)
    test_x, test_y = load_dataset("mnist", SHARED_MNIST, "test")
    acc = accuracy(net, to_float(test_x), test_y)
    print(f"LeNet, 1 epoch on real MNIST: test accuracy {acc:.2f}%")
    assert acc >= 97.0


@pytest.mark.slow
@needs_mnist
def test_noise_training_at_sigma_half_seed_0_learns_with_the_noise_warmup(tmp_path):
    """docs/beyond.md's failure: noise training at sigma 0.5, seed 0, Adam 1e-3, batch 128 on
    MNIST (here its first 20,000 training images). Without the warm-up the first noisy steps kill
    every conv2 channel and the model predicts one class (11.35%); metrics.json flags it and the
    report leaves it out. With the default warm-up (noise ramped over 100 steps) the same run
    learns."""
    import json

    from momentreg.runs.report import write_report
    from tests.helpers import cli

    args = ["train", "--dataset", "mnist", "--data-dir", str(SHARED_MNIST), "--method", "noise"]
    args += ["--sigma", "0.5", "--lr", "1e-3", "--batch-size", "128", "--epochs", "1"]
    args += ["--seed", "0", "--gnr-limit", "100", "--train-limit", "20000", "--quiet"]
    runs = tmp_path / "runs"
    for name, extra in (("warm", []), ("cold", ["--sigma-warmup", "0"])):
        result = cli(*args, *extra, "--out", str(runs / name))
        assert result.returncode == 0, result.stderr
    warm = json.loads((runs / "warm" / "metrics.json").read_text())
    cold = json.loads((runs / "cold" / "metrics.json").read_text())
    assert warm["test_accuracy"] > 95 and not warm["constant_predictions"]
    assert cold["constant_predictions"] and cold["predicted_classes"] == 1
    report = write_report(tmp_path, tmp_path / "report").read_text()
    assert "Left out of every comparison" in report and "cold" in report.split("\n## ")[0]
    assert "| cold" not in report and "warm" in report.split("\n## ", 1)[1]


@pytest.mark.slow
def test_the_noise_warmup_prevents_the_collapse_on_the_bundled_sample(tmp_path):
    """The same failure on the bundled sample (so that CI sees it without ../shared): noise at
    sigma 1, seed 0, Adam 1e-3, batch 128 predicts one class without the warm-up (4 of seeds 0-5
    did) and learns with it."""
    import json

    from tests.helpers import cli

    args = ["train", "--method", "noise", "--sigma", "1.0", "--lr", "1e-3", "--batch-size", "128"]
    args += ["--epochs", "2", "--seed", "0", "--gnr-limit", "20", "--quiet"]
    for name, extra in (("warm", []), ("cold", ["--sigma-warmup", "0"])):
        result = cli(*args, *extra, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    warm = json.loads((tmp_path / "warm" / "metrics.json").read_text())
    cold = json.loads((tmp_path / "cold" / "metrics.json").read_text())
    assert warm["test_accuracy"] > 90 and warm["predicted_classes"] == 10
    assert cold["constant_predictions"] and cold["test_accuracy"] < 15
