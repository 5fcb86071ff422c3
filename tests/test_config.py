"""TrainConfig's groups, its flat form (config.json, sweep specs, the command line), each method's
explicit noisy copies, and settings recorded by an earlier momentreg read as they were meant."""

import dataclasses
import json

import pytest
import torch

from momentreg import TrainConfig, train
from momentreg.errors import CheckpointError, ConfigError
from momentreg.runs.run import RunConfig
from momentreg.training.config import Budget, MethodSettings, Optimizer, Schedule
from momentreg.training.loop import CHECKPOINT, load_checkpoint
from tests.helpers import tiny_net


def test_the_flat_form_names_every_grouped_field_once_and_round_trips():
    cfg = TrainConfig(
        method="macer", sigma=0.5, alpha=16.0, seed=3,
        optimizer=Optimizer(name="sgd", lr=0.01, batch_size=256),
        schedule=Schedule(epochs=90, lr_schedule="step", keep="last"),
        budget=Budget(passes=3.0), method_settings=MethodSettings(samples=4),
    )  # fmt: skip
    flat = cfg.flat()
    assert (flat["optimizer"], flat["lr"], flat["pass_budget"], flat["keep"]) == (
        "sgd",
        0.01,
        3.0,
        "last",
    )
    groups = [dataclasses.fields(g) for g in (Optimizer, Schedule, Budget, MethodSettings)]
    assert len(flat) == 4 + sum(len(g) for g in groups)  # method, sigma, alpha, seed
    assert TrainConfig.from_flat(flat) == cfg
    assert json.loads(json.dumps(flat)) == flat  # config.json holds it as it stands
    assert cfg.replace(lr=0.1).optimizer == Optimizer(name="sgd", lr=0.1, batch_size=256)
    with pytest.raises(ConfigError, match="unknown training setting 'learning_rate'"):
        TrainConfig.from_flat({"learning_rate": 0.1})


@pytest.mark.parametrize(
    "method, copies", [("consistency", 2), ("macer", 16), ("macer-analytic", 0), ("clean", 0)]
)
def test_each_method_draws_its_own_default_copies_and_records_them(method, copies):
    cfg = TrainConfig(method=method)
    cfg.validate()
    assert cfg.copies == copies and cfg.flat()["samples"] == copies
    assert TrainConfig.from_flat(cfg.flat()).copies == copies  # recorded, it reads back the same


def test_a_zero_is_zero_copies_not_the_authors_default():
    with pytest.raises(ConfigError, match="consistency draws at least one noisy copy"):
        TrainConfig(method="consistency", method_settings=MethodSettings(samples=0)).validate()
    with pytest.raises(ConfigError, match="moment has none to set"):
        TrainConfig(method="moment", method_settings=MethodSettings(samples=2)).validate()
    TrainConfig(method="macer-analytic", method_settings=MethodSettings(samples=0)).validate()
    with pytest.raises(ConfigError, match="samples: 0; macer draws at least one"):
        RunConfig.from_settings({"method": "macer", "samples": 0})  # a new spec or option
    # switching the method of a config whose copies were left to the method keeps them so
    assert TrainConfig(method="consistency").replace(method="macer").copies == 16


def test_a_config_json_of_an_earlier_momentreg_reads_as_it_was_meant():
    """Before the defaults were explicit, config.json recorded 0 for "the method's default"."""
    old = {"method": "consistency", "sigma": 0.5, "alpha": 5.0, "samples": 0}
    assert RunConfig.from_settings(old, recorded=True).train.copies == 2
    old = {"method": "macer-analytic", "sigma": 0.5, "alpha": 6.0, "samples": 0}
    assert RunConfig.from_settings(old, recorded=True).train.copies == 0  # none, as it meant


def test_a_checkpoint_of_an_earlier_momentreg_resumes_and_another_run_is_refused(tmp_path):
    """The checkpoint's identity recorded samples 0 for consistency's default two copies: the
    run resumes; a run with other copies is refused."""
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))
    settings = dict(method="consistency", sigma=0.3, alpha=1.0, batch_size=20, sigma_warmup=0)
    history = train(tiny_net(), data, data, out_dir=tmp_path, epochs=1, **settings)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt["identity"]["config"]["samples"] == 2
    ckpt["identity"]["config"]["samples"] = 0  # as an earlier momentreg wrote it
    torch.save(ckpt, tmp_path / CHECKPOINT)
    assert (
        train(tiny_net(), data, data, out_dir=tmp_path, resume=True, epochs=1, **settings)
        == history
    )
    with pytest.raises(CheckpointError, match="samples: checkpoint 2, this run 3"):
        train(tiny_net(), data, data, out_dir=tmp_path, resume=True, epochs=1, samples=3,
              **settings)  # fmt: skip
