"""Moments through every layer (assumed density filtering) against Monte Carlo."""

import pytest
import torch
from torch import nn

from momentreg import expected_logits
from momentreg.core.moments import max_moments, maxpool_moments, network_moments
from momentreg.core.regularizer import output_moments
from momentreg.data.datasets import load_dataset, to_float, train_val_split
from momentreg.models.zoo import build_model
from momentreg.training.loop import train


def _draws(mean, var, n, gen):
    return mean + var.sqrt() * torch.randn(n, *mean.shape, generator=gen, dtype=mean.dtype)


def test_clark_max_of_two_gaussians_is_exact():
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.tensor([0.0, 1.0, -2.0, 3.0, 0.5]), torch.tensor([0.0, -1.0, 2.0, 3.0, 0.5])
    v1, v2 = torch.tensor([1.0, 0.5, 2.0, 1e-8, 0.0]), torch.tensor([1.0, 2.0, 0.1, 1e-8, 0.0])
    m1, m2, v1, v2 = (t.double() for t in (m1, m2, v1, v2))
    mean, var = max_moments(m1, v1, m2, v2)
    n = 400_000
    mc = torch.maximum(_draws(m1, v1, n, gen), _draws(m2, v2, n, gen))
    se_mean, se_var = mc.std(0) / n**0.5, mc.var(0) * (2 / (n - 1)) ** 0.5
    assert ((mean - mc.mean(0)).abs() <= 4 * se_mean + 1e-9).all()
    assert ((var - mc.var(0)).abs() <= 4 * se_var + 1e-9).all()


def test_maxpool_moments_match_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    var = 0.2 + torch.rand(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    n = 100_000
    draws = _draws(mean, var, n, gen).flatten(0, 1)
    pair = nn.MaxPool2d((1, 2))  # two entries per window: Clark is exact
    m, v = maxpool_moments(pair, mean, var)
    mc = pair(draws).view(n, *m.shape)
    assert ((m - mc.mean(0)).abs() <= 4 * mc.std(0) / n**0.5).all()
    assert ((v - mc.var(0)).abs() <= 4 * mc.var(0) * (2 / n) ** 0.5).all()
    square = nn.MaxPool2d(2)  # four entries: pairwise folding is an approximation
    m, v = maxpool_moments(square, mean, var)
    mc = square(draws).view(n, *m.shape)
    rel = ((m - mc.mean(0)).abs() / mc.std(0)).max()
    print(f"2x2 max-pool: largest mean error {rel:.3f} standard deviations")
    assert rel < 0.05
    with pytest.raises(ValueError, match="padding 0"):
        maxpool_moments(nn.MaxPool2d(2, padding=1), mean, var)


def test_network_moments_of_an_affine_relu_affine_net_have_the_exact_mean():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    x = torch.rand(5, 1, 3, 4, dtype=torch.float64)
    mean, var = network_moments(list(net), x, torch.full((1, 1, 3, 4), 0.09, dtype=torch.float64))
    assert torch.allclose(mean, expected_logits(net, x, 0.3), atol=1e-10)
    assert var.shape == mean.shape and (var > 0).all()


@pytest.mark.slow
def test_all_layers_beat_the_first_layer_on_lenet_against_monte_carlo():
    torch.manual_seed(0)
    images, labels = load_dataset("mnist-sample", split="train")
    train_set, val_set = train_val_split(images[:2000], labels[:2000], 0.1, seed=0)
    net = build_model("lenet", "mnist")
    train(net, train_set, val_set, epochs=1, lr=1e-3, batch_size=100, progress=False)
    net.eval()
    test_x, _ = load_dataset("mnist-sample", split="test")
    x = to_float(test_x[:10])
    gen = torch.Generator().manual_seed(0)
    for sigma in (0.25, 0.5):
        with torch.no_grad():  # 1000 draws per image, 100 per image in each forward pass
            copies = x.repeat(100, 1, 1, 1)
            mc = torch.stack(
                [
                    net(copies + sigma * torch.randn(copies.shape, generator=gen)).view(100, 10, -1)
                    for _ in range(10)
                ]
            ).mean((0, 1))
            errors = {
                depth: ((expected_logits(net, x, sigma, depth=depth) - mc).norm(dim=1)
                        / mc.norm(dim=1)).median().item()
                for depth in ("first", "all")
            }  # fmt: skip
        print(f"sigma {sigma}: median relative error of the expected logits {errors}")
        assert errors["all"] < errors["first"]
    mean, var = output_moments(net, x, 0.5)
    assert mean.shape == var.shape == (10, 10) and torch.isfinite(var).all()
    with pytest.raises(ValueError, match="depth"):
        expected_logits(net, x, 0.5, depth="some")


def test_max_moments_and_output_moments_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(2)
    args = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2)]
    variances = [0.1 + torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(2)]
    inputs = tuple(t.requires_grad_() for t in (args[0], variances[0], args[1], variances[1]))
    assert torch.autograd.gradcheck(lambda *t: max_moments(*t), inputs)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: output_moments(net, z, 0.3), (x,))


def test_expected_cross_entropy_matches_monte_carlo_for_small_variance():
    from momentreg.core.regularizer import expected_cross_entropy

    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    var = 0.02 * torch.rand(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    z = mean + var.sqrt() * torch.randn(200_000, 4, 5, generator=gen, dtype=torch.float64)
    mc = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.repeat(200_000)).item()
    plain = torch.nn.functional.cross_entropy(mean, y).item()
    approx = expected_cross_entropy(mean, var, y).item()
    print(f"E[CE] Monte Carlo {mc:.6f}, second order {approx:.6f}, CE of the mean {plain:.6f}")
    assert abs(approx - mc) < 0.1 * abs(mc - plain)  # captures the variance correction


@pytest.mark.parametrize(
    "settings",
    [
        dict(moment_depth="all"),
        dict(moment_depth="all", moment_loss="expected-ce"),
        dict(moment_noise=True),
        dict(moment_depth="all", moment_noise=True),
    ],
)
def test_moment_variants_train_deterministically(settings):
    images, labels = load_dataset("mnist-sample", split="train")
    train_set, val_set = train_val_split(images[:300], labels[:300], 0.2, seed=0)

    def run(**variant):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4 * 4 * 4, 10),
        )  # fmt: skip
        hist = train(
            net, train_set, val_set, method="moment", sigma=0.5, epochs=2, lr=1e-2,
            batch_size=50, progress=False, **variant,
        )  # fmt: skip
        return hist, net

    (h1, n1), (h2, n2) = run(**settings), run(**settings)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert all(torch.equal(a, b) for a, b in zip(n1.parameters(), n2.parameters(), strict=True))
    plain, _ = run()  # the paper's regularizer on the same data: the variant must change training
    assert [r["train_loss"] for r in plain] != [r["train_loss"] for r in h1]


def test_expected_ce_needs_depth_all():
    images, labels = load_dataset("mnist-sample", split="train")
    train_set, val_set = train_val_split(images[:100], labels[:100], 0.2, seed=0)
    with pytest.raises(ValueError, match="needs moment depth all"):
        train(build_model("lenet", "mnist"), train_set, val_set, method="moment",
              moment_loss="expected-ce", progress=False)  # fmt: skip
