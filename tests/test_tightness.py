"""The surrogate check: exact on affine tails, a table on real models."""

import pytest
import torch
from torch import nn

from momentreg.cli.main import main
from momentreg.evaluation.tightness import estimates, hinge_share, monte_carlo, tightness
from momentreg.models.zoo import Normalize
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
    mc, se, _ = monte_carlo(net, x, 0.3, 20_000, 2_000, torch.Generator().manual_seed(0))
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


def test_monte_carlo_soft_classifier_is_the_mean_softmax_of_the_same_draws():
    net = two_layer()
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    mc, _, soft = monte_carlo(net, x, 0.4, 30, 7, torch.Generator().manual_seed(5), (1.0, 16.0))
    gen = torch.Generator().manual_seed(5)
    draws = [torch.randn((n, *x.shape), generator=gen) for n in (7, 7, 7, 7, 2)]
    logits = torch.cat([net((x + 0.4 * d).flatten(0, 1)).view(len(d), 3, -1) for d in draws])
    assert torch.allclose(mc, logits.mean(0))
    for beta in (1.0, 16.0):
        probs, se = soft[beta]
        assert torch.allclose(probs, (beta * logits).softmax(2).mean(0))
        assert torch.allclose(se, (beta * logits).softmax(2).std(0) / 30**0.5)


def test_soft_classifier_distances_vanish_without_noise_and_grow_with_it():
    """softmax(beta tail(T)) misses E[softmax(beta f)] by Jensen's gap even where T is exact (an
    affine tail); the all-layer probit form prices the logits' variance and misses less."""
    net = two_layer()
    x = torch.rand(20, 1, 3, 4, dtype=torch.float64)
    quiet, noisy = tightness(net, x, [1e-4, 0.5], samples=4000, batch=500)
    for name in ("analytic", "all_layers"):
        assert quiet[f"{name}_tv_beta16_median"] < 1e-3
        assert noisy[f"{name}_tv_beta16_median"] > 3 * noisy["mc_tv_floor_beta16"]
    assert noisy["all_layers_tv_beta16_median"] < noisy["analytic_tv_beta16_median"]
    assert noisy["analytic_tv_beta1_median"] < noisy["analytic_tv_beta16_median"]
    for name in ("mc", "analytic", "all_layers"):
        assert 0 <= noisy[f"{name}_hinge_share"] <= 100


def test_the_hinge_acts_where_the_soft_radius_gap_is_finite_and_at_most_gamma():
    probs = torch.tensor(
        [
            [0.5, 0.3, 0.2],  # gap 0.52: counted
            [1.0, 0.0, 0.0],  # g1 = 1: infinite gap
            [1 - 1e-20, 1e-20, 0.0],  # gap 9.2 > 8
            [0.9, 0.05, 0.05],  # gap 2.93: counted
        ],
        dtype=torch.float64,
    )
    assert hinge_share(probs) == 50.0
    assert hinge_share(probs, gamma=0.5) == 0.0
    # g2 <= 1 - g1 makes the gap at least 2 Phi^-1(g1): above 8 once g1 > Phi(4) = 0.99997
    near_one = torch.tensor([[1 - 1e-4, 1e-4, 0.0], [1 - 1e-5, 1e-5, 0.0]], dtype=torch.float64)
    assert hinge_share(near_one) == 50.0


@pytest.mark.slow
def test_tightness_command_writes_json_table_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *QUICK, "--out", str(run)).returncode == 0
    report = tmp_path / "doc" / "tightness.md"
    args = ["tightness", str(run), "--sigmas", "0.1,0.5", "--limit", "4", "--mc-samples", "40"]
    assert main([*args, "--report", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| run | sigma |" in out and (run / "tightness.json").exists()
    assert "![relative error](tightness.png)" in report.read_text()
    assert (tmp_path / "doc" / "tightness.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as bad:
        main(["tightness", str(run), "--sigmas", "0,x"])
    assert bad.value.code == 2
