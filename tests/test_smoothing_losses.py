"""The randomized-smoothing losses against direct computations written out image by image and
copy by copy in float64, on the same noise; their analytic expectation against Monte Carlo."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentreg.core import smoothing_losses as sl
from momentreg.core.regularizer import expected_logits, output_moments
from momentreg.training.loop import TrainConfig, train
from tests.helpers import QUICK, cli


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(),
        nn.Linear(8, 4),
    ).double()  # fmt: skip


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 3])


def _draws(x, copies, seed):
    """The noise the loss draws from a generator seeded ``seed``: one [copies * B, ...] tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((copies * len(x), *x.shape[1:]), generator=gen, dtype=x.dtype)


def _softmax(z):  # one row, by hand
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def _row(net, image):
    return net(image[None])[0].tolist()


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _entropy(p):
    return -sum(pi * math.log(pi) for pi in p)


SIGMA = 0.3


@pytest.mark.parametrize("loss", [sl.stability_loss, sl.consistency_loss, sl.macer_loss])
@pytest.mark.parametrize("analytic", [False, True])
def test_a_bad_sigma_is_a_clear_error_sampled_or_analytic(loss, analytic):
    """The sampled losses would take a negative sigma for its absolute value (the noise is
    symmetric) where the analytic ones refuse it: both refuse it, and NaN."""
    net, (x, y) = _net(), _batch()
    for bad in (-0.3, math.nan):
        with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
            loss(net, x, y, bad, 1.0, None, analytic=analytic)
    if loss is sl.macer_loss:
        with pytest.raises(ValueError, match="macer_loss needs sigma as a number"):
            loss(net, x, y, torch.full((1, 6, 6), SIGMA, dtype=x.dtype), 1.0, None)
    else:  # a per-pixel sigma works, and is the number's loss when uniform
        uniform = torch.full((1, 6, 6), SIGMA, dtype=x.dtype)
        got = loss(net, x, y, uniform, 1.0, torch.Generator().manual_seed(0), analytic=analytic)
        want = loss(net, x, y, SIGMA, 1.0, torch.Generator().manual_seed(0), analytic=analytic)
        torch.testing.assert_close(got[0], want[0])


def test_stability_loss_is_ce_plus_lambda_kl_clean_to_noisy():
    net, (x, y) = _net(), _batch()
    noise = _draws(x, 1, 5)
    loss, _ = sl.stability_loss(net, x, y, SIGMA, 2.0, torch.Generator().manual_seed(5))
    total = 0.0
    for b in range(len(x)):
        clean, noisy = _row(net, x[b]), _row(net, x[b] + SIGMA * noise[b])
        p, q = _softmax(clean), _softmax(noisy)
        total += -math.log(p[y[b]]) + 2.0 * _kl(p, q)
    assert loss.item() == pytest.approx(total / len(x), rel=1e-9)


@pytest.mark.parametrize("copies", [2, 3])
def test_consistency_loss_matches_the_authors_form(copies):
    net, (x, y) = _net(), _batch()
    noise = _draws(x, copies, 7)
    loss, _ = sl.consistency_loss(
        net, x, y, SIGMA, 5.0, torch.Generator().manual_seed(7), copies=copies, eta=0.5
    )
    total = 0.0
    for b in range(len(x)):
        probs = [_softmax(_row(net, x[b] + SIGMA * noise[i * len(x) + b])) for i in range(copies)]
        mean = [sum(p[k] for p in probs) / copies for k in range(4)]
        ce = sum(-math.log(p[y[b]]) for p in probs) / copies
        kl = sum(_kl(mean, p) for p in probs) / copies
        total += ce + 5.0 * kl + 0.5 * _entropy(mean)
    assert loss.item() == pytest.approx(total / len(x), rel=1e-9)


def test_macer_loss_matches_a_direct_computation_of_its_hinge():
    net, (x, y) = _net(), _batch()
    copies, beta, gamma, lbd = 16, 2.0, 8.0, 3.0
    noise = _draws(x, copies, 9)
    loss, _ = sl.macer_loss(
        net, x, y, SIGMA, lbd, torch.Generator().manual_seed(9), copies=copies, beta=beta,
        gamma=gamma,
    )  # fmt: skip
    ndtri = torch.distributions.Normal(0.0, 1.0).icdf
    total, hinged = 0.0, 0
    for b in range(len(x)):
        rows = [_row(net, x[b] + SIGMA * noise[i * len(x) + b]) for i in range(copies)]
        g = [sum(_softmax(r)[k] for r in rows) / copies for k in range(4)]
        g_beta = [sum(_softmax([beta * v for v in r])[k] for r in rows) / copies for k in range(4)]
        total -= math.log(g[y[b]] + 1e-10)
        order = sorted(range(4), key=lambda k: -g_beta[k])
        if order[0] == y[b]:
            top, second = torch.tensor(g_beta[order[0]]), torch.tensor(g_beta[order[1]])
            gap = float(ndtri(top) - ndtri(second))
            if gap <= gamma:
                total += lbd * SIGMA / 2 * (gamma - gap)
                hinged += 1
    assert hinged >= 1  # the case exercises the hinge
    assert loss.item() == pytest.approx(total / len(x), rel=1e-6)


@pytest.mark.parametrize("copies", [1, 3])
def test_macer_analytic_with_noisy_copies_hinges_on_the_analytic_mean(copies):
    """Its NLL is sampled MACER's on the same noisy copies; its hinge is on
    softmax(beta * tail(E[relu(head(x + n))])) instead of the copies' mean."""
    net, (x, y) = _net(), _batch()
    y[:2] = expected_logits(net, x, SIGMA)[:2].argmax(1)  # two rows the hinge counts, one not
    beta, gamma, lbd = 2.0, 8.0, 3.0
    noise = _draws(x, copies, 5)
    loss, logits = sl.macer_loss(
        net, x, y, SIGMA, lbd, torch.Generator().manual_seed(5), copies=copies, beta=beta,
        gamma=gamma, analytic=True,
    )  # fmt: skip
    expected = expected_logits(net, x, SIGMA).tolist()  # first-layer moments
    ndtri = torch.distributions.Normal(0.0, 1.0).icdf
    total, hinged = 0.0, 0
    for b in range(len(x)):
        rows = [_row(net, x[b] + SIGMA * noise[i * len(x) + b]) for i in range(copies)]
        g = [sum(_softmax(r)[k] for r in rows) / copies for k in range(4)]
        g_beta = _softmax([beta * v for v in expected[b]])
        total -= math.log(g[y[b]] + 1e-10)
        order = sorted(range(4), key=lambda k: -g_beta[k])
        if order[0] == y[b]:
            gap = float(
                ndtri(torch.tensor(g_beta[order[0]])) - ndtri(torch.tensor(g_beta[order[1]]))
            )
            if gap <= gamma:
                total += lbd * SIGMA / 2 * (gamma - gap)
                hinged += 1
    assert hinged == 2  # the case exercises the hinge
    assert loss.item() == pytest.approx(total / len(x), rel=1e-6)
    first_copy = [v for b in range(3) for v in _row(net, x[b] + SIGMA * noise[b])]
    assert logits.flatten().tolist() == pytest.approx(first_copy)  # accuracy reads a noisy copy


def test_sampled_macer_without_a_copy_is_a_clear_error():
    net, (x, y) = _net(), _batch()
    with pytest.raises(ValueError, match="copies >= 1"):
        sl.macer_loss(net, x, y, SIGMA, 1.0, torch.Generator(), copies=0)


def test_macer_hinge_leaves_out_rows_with_zero_and_finite_gradients():
    """Rows whose top class is wrong, whose gap is infinite (g1 = 1) or over gamma add nothing,
    and their gradient is 0, not NaN; the others add gamma - (Phi^-1(g1) - Phi^-1(g2))."""
    g = torch.tensor(
        [
            [0.5, 0.3, 0.2],  # counted: gap 0.524
            [0.2, 0.5, 0.3],  # top class is not y
            [1.0, 0.0, 0.0],  # infinite gap
            [0.95, 0.04, 0.01],  # gap 3.4 > gamma
            [0.4, 0.35, 0.25],  # counted: gap 0.132
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    y, gamma = torch.zeros(5, dtype=torch.long), 1.0
    ndtri = torch.distributions.Normal(0.0, 1.0).icdf
    direct = sum(gamma - (ndtri(g[b, 0]) - ndtri(g[b, 1])) for b in (0, 4))
    hinge = sl._macer_hinge(g, y, gamma)
    assert hinge.item() == pytest.approx(direct.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(hinge, g)
    assert torch.isfinite(grad).all() and (grad[1:4] == 0).all() and (grad[[0, 4], :2] != 0).all()
    assert torch.autograd.gradcheck(lambda t: sl._macer_hinge(t, y, gamma), (g,))


def test_analytic_variants_use_the_analytic_expectation_in_place_of_the_samples():
    net, (x, y) = _net(), _batch()
    gen = torch.Generator().manual_seed(3)
    expected = expected_logits(net, x, SIGMA)  # first-layer moments, checked against Monte Carlo
    logits = net(x)
    loss, _ = sl.stability_loss(net, x, y, SIGMA, 2.0, gen, analytic=True)
    direct = F.cross_entropy(logits, y) + 2.0 * F.kl_div(
        expected.log_softmax(1), logits.softmax(1), reduction="batchmean"
    )
    assert loss.item() == pytest.approx(direct.item(), rel=1e-9)
    noise = _draws(x, 1, 4)
    loss, _ = sl.consistency_loss(
        net, x, y, SIGMA, 5.0, torch.Generator().manual_seed(4), analytic=True, eta=0.5
    )
    noisy, p_bar = net(x + SIGMA * noise), expected.softmax(1)
    kl = (p_bar * (p_bar.log() - noisy.log_softmax(1))).sum(1)
    direct = F.cross_entropy(noisy, y) + (5.0 * kl - 0.5 * (p_bar * p_bar.log()).sum(1)).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-9)
    mean, var = output_moments(net, x, SIGMA)
    loss, _ = sl.macer_loss(net, x, y, SIGMA, 0.0, gen, analytic=True, depth="all")
    direct = F.nll_loss((sl.expected_softmax(mean, var) + 1e-10).log(), y)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-9)


@pytest.mark.parametrize("spread,beta", [(0.3, 1.0), (0.3, 16.0), (1.0, 1.0), (1.0, 16.0)])
def test_expected_softmax_beats_the_softmax_of_the_mean_against_monte_carlo(spread, beta):
    gen = torch.Generator().manual_seed(0)
    mean = 2 * torch.randn(64, 10, generator=gen, dtype=torch.float64)
    var = spread * torch.rand(64, 10, generator=gen, dtype=torch.float64)
    z = mean + var.sqrt() * torch.randn(20_000, 64, 10, generator=gen, dtype=torch.float64)
    mc = (beta * z).softmax(2).mean(0)
    err = (sl.expected_softmax(mean, var, beta) - mc).abs().sum(1).mean()
    plain = ((beta * mean).softmax(1) - mc).abs().sum(1).mean()
    print(f"L1 error: mean-field {err:.4f}, softmax of the mean {plain:.4f}")
    assert err < plain
    assert err < (0.03 if spread < 1 else 0.08) * (2 if beta > 1 else 1)


def test_expected_softmax_stays_finite_with_its_gradient_at_large_logit_gaps():
    """MACER's beta of 16 times logit gaps of tens overflows exp(-diff); the training step that
    hit it (docs/certified.md's all-layer run) got a NaN gradient."""
    mean = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    var = torch.tensor([[0.01, 0.01, 0.01]])
    p = sl.expected_softmax(mean, var, beta=16.0)
    p[0, 1].log1p().backward()
    assert torch.isfinite(p).all() and torch.isfinite(mean.grad).all()
    assert p[0, 0].item() == pytest.approx(1.0)


def test_analytic_probs_of_all_layers_track_monte_carlo_on_a_small_net():
    net, (x, _) = _net(), _batch()
    gen = torch.Generator().manual_seed(2)
    draws = x + SIGMA * torch.randn(20_000, *x.shape, generator=gen, dtype=x.dtype)
    mc = net(draws.flatten(0, 1)).softmax(1).view(20_000, len(x), -1).mean(0)
    approx = sl.analytic_probs(net, x, SIGMA, depth="all")
    plain = net(x).softmax(1)
    assert (approx - mc).abs().sum(1).max() < 0.05
    assert (approx - mc).abs().sum() < (plain - mc).abs().sum()


@pytest.mark.parametrize(
    "method", ["stability", "consistency", "macer", "stability-analytic", "consistency-analytic"]
)
def test_each_method_trains_from_the_trainer(method):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(120, 1, 6, 6, generator=gen)
    y = (x.flatten(1)[:, :18].sum(1) > x.flatten(1)[:, 18:].sum(1)).long()
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))
    history = train(
        net, (x[:100], y[:100]), (x[100:], y[100:]), TrainConfig(method=method, sigma=0.1),
        epochs=15, lr=1e-2, batch_size=20, progress=False,
    )  # fmt: skip
    assert history[-1]["train_accuracy"] > 80, history[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, samples", [("stability", 0), ("consistency", 4), ("macer", 4), ("macer-analytic", 1)]
)
def test_each_method_trains_from_the_command_line(tmp_path, method, samples):
    copies = ["--samples", str(samples)] if samples else []
    result = cli(
        "train", "--method", method, "--sigma", "0.25", "--alpha", "2", *copies,
        *QUICK, "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == method and config["samples"] == samples and config["alpha"] == 2.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] > 0
