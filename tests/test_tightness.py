"""The surrogate check: exact on affine tails, a table on real models."""

import pytest
import torch
from torch import nn

from momentreg.cli import main
from momentreg.models import Normalize
from momentreg.tightness import estimates, monte_carlo, tightness
from tests.helpers import QUICK, cli, theorem1_mean, two_layer


def test_both_estimates_are_exact_for_an_affine_tail():
    net = two_layer()
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    found = estimates(net, x, 0.3)
    analytic, linearized = found["analytic"], found["linearized"]
    assert torch.allclose(found["all_layers"], analytic, rtol=1e-9, atol=1e-12)
    exact = theorem1_mean(net, x, torch.full((1, 3, 4), 0.3, dtype=torch.float64))
    assert torch.allclose(analytic, exact, rtol=1e-9, atol=1e-12)
    assert torch.allclose(linearized, exact, rtol=1e-9, atol=1e-12)
    mc, se = monte_carlo(net, x, 0.3, 20_000, 2_000, torch.Generator().manual_seed(0))
    assert ((analytic - mc).abs() <= 4 * se).all()


def test_affine_tail_reports_errors_at_the_monte_carlo_noise_floor():
    net = two_layer()
    x = torch.rand(20, 1, 3, 4, dtype=torch.float64)
    rows = tightness(net, x, [0.1, 0.5], samples=4000, batch=500)
    for r in rows:
        assert r["analytic_error_median"] == pytest.approx(r["linearized_error_median"], rel=1e-9)
        assert r["analytic_error_median"] <= 3 * r["mc_relative_se"]


def test_nonlinear_tail_separates_the_two_estimates():
    torch.manual_seed(0)
    net = nn.Sequential(
        Normalize([0.2], [0.5]), nn.Flatten(), nn.Linear(12, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3),
    ).double()  # fmt: skip
    x = torch.rand(8, 1, 3, 4, dtype=torch.float64)
    found = estimates(net, x, 0.5)
    assert not torch.allclose(found["analytic"], found["linearized"])
    rows = tightness(net, x, [0.05, 1.0], samples=4000, batch=500)
    assert rows[1]["analytic_error_median"] > rows[0]["analytic_error_median"]


@pytest.mark.slow
def test_tightness_command_writes_json_table_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *QUICK, "--out", str(run)).returncode == 0
    report = tmp_path / "doc" / "tightness.md"
    args = ["tightness", str(run), "--sigmas", "0.1,0.5", "--limit", "4", "--samples", "40"]
    assert main([*args, "--report", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| run | sigma |" in out and (run / "tightness.json").exists()
    assert "![relative error](tightness.png)" in report.read_text()
    assert (tmp_path / "doc" / "tightness.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as bad:
        main(["tightness", str(run), "--sigmas", "0,x"])
    assert bad.value.code == 2
