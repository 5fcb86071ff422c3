"""The CIFAR-10-C noise corruptions against a direct NumPy computation of their formulas, their
draws against their distributions, and the published files' layout."""

import doctest

import numpy as np
import pytest
import torch

from momentreg.errors import ConfigError, DatasetError
from momentreg.evaluation import corruptions
from momentreg.evaluation.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    apply,
    corrupt,
    load_cifar_c,
    shot_distribution,
    shot_table,
    to_uint8,
)

RNG = np.random.default_rng(0)
X = RNG.uniform(0, 1, (4, 3, 8, 8))


def _numpy(name: str, x: np.ndarray, c: float, draws: tuple) -> np.ndarray:
    """The published formulas (before quantization), written out in NumPy."""
    if name == "gaussian_noise":
        return np.clip(x + draws[0] * c, 0, 1)
    if name == "speckle_noise":
        return np.clip(x + x * draws[0] * c, 0, 1)
    if name == "shot_noise":
        return np.clip(draws[0] / c, 0, 1)
    out = x.copy()
    flip, salt = draws
    out[flip & salt] = 1
    out[flip & ~salt] = 0
    return out


def _numpy_draws(name: str, x: np.ndarray, c: float) -> tuple:
    if name in ("gaussian_noise", "speckle_noise"):
        return (RNG.standard_normal(x.shape),)
    if name == "shot_noise":
        return (RNG.poisson(x * c).astype(np.float64),)
    return RNG.uniform(size=x.shape) < c, RNG.uniform(size=x.shape) < 0.5


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_each_corruption_is_its_published_formula_on_fixed_draws(name, severity):
    c = CORRUPTIONS[name][severity - 1]
    draws = _numpy_draws(name, X, c)
    expected = _numpy(name, X, c, draws)
    got = apply(name, torch.from_numpy(X), c, tuple(torch.from_numpy(d) for d in draws))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_quantization_truncates_as_numpys_uint8():
    x = np.array([0.0, 0.5, 0.999, 1.0, 1 / 255, 0.99999 / 255, 254.9 / 255])
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)).numpy(), np.uint8(x * 255))


def _fits(samples: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's chi-square of the samples' 256 value counts against ``p``: below its degrees of
    freedom plus 5 standard deviations, and no value drawn that ``p`` rules out."""
    counts = torch.bincount(samples.long(), minlength=256).double()
    expected = p * len(samples)
    possible = expected > 0
    chi2 = float(((counts - expected)[possible] ** 2 / expected[possible]).sum())
    df = int(possible.sum()) - 1
    return counts[~possible].sum() == 0 and chi2 < df + 5 * (2 * max(df, 1)) ** 0.5


@pytest.mark.parametrize("c", [500, 75, 50])
def test_shot_noise_on_uint8_images_is_drawn_from_the_formulas_distribution(c):
    """The table is the law of the float pipeline (a Poisson draw, then the formula and
    quantization), Vose's tables give exactly the table, and the draws follow it."""
    table = shot_distribution(c)
    prob, alias = shot_table(c)
    implied = prob / 256
    implied = implied.index_put((torch.arange(256)[:, None].expand(256, 256), alias),
                                (1 - prob) / 256, accumulate=True)  # fmt: skip
    torch.testing.assert_close(implied, table, rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(c)
    for v in (0, 1, 37, 128, 254, 255):
        x = torch.full((400_000,), v, dtype=torch.uint8)
        direct = to_uint8(apply("shot_noise", x.float() / 255, c,
                                (torch.poisson(x.float() / 255 * c, generator=gen),)))  # fmt: skip
        severity = CORRUPTIONS["shot_noise"].index(c) + 1
        drawn = corrupt(x, "shot_noise", severity, gen)
        assert _fits(direct, table[v]) and _fits(drawn, table[v]), v


def test_the_draws_have_their_distributions():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((20, 3, 32, 32), 0.5)
    images = (x * 255).round().to(torch.uint8)  # 128
    base = images.float() / 255
    shot = corrupt(images, "shot_noise", 5, gen).float() / 255  # c = 50: mean x, variance x / c
    assert shot.mean().item() == pytest.approx(base.mean().item(), abs=0.005)
    assert shot.var().item() == pytest.approx(base.mean().item() / 50, rel=0.05)
    impulse = corrupt(images, "impulse_noise", 5, gen)  # 7% of the values set to 0 or 255
    assert (impulse != images).float().mean().item() == pytest.approx(0.07, abs=0.005)
    assert (impulse == 255).sum().item() == pytest.approx((impulse == 0).sum().item(), rel=0.1)
    noisy = corrupt(images, "gaussian_noise", 3, gen).float() / 255  # std 0.08, few clipped
    assert (noisy - base).std().item() == pytest.approx(0.08, rel=0.03)
    speckle = corrupt(images, "speckle_noise", 5, gen).float() / 255  # std x * 0.2
    assert (speckle - base).std().item() == pytest.approx(0.2 * base.mean().item(), rel=0.03)


def test_a_seed_gives_the_same_corrupted_images_and_another_does_not():
    images = torch.from_numpy((X * 255).astype(np.uint8))
    draw = [
        corrupt(images, "gaussian_noise", 2, torch.Generator().manual_seed(s)) for s in (1, 1, 2)
    ]
    assert draw[0].dtype == torch.uint8 and torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])


def test_unknown_corruptions_and_severities_are_refused():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match="severity must be 1 to 5"):
        corrupt(images, "shot_noise", 6)


def test_the_published_layout_is_read_by_severity(tmp_path):
    per, size = 4, 8
    images = RNG.integers(0, 256, (5 * per, size, size, 3), dtype=np.uint8)
    labels = RNG.integers(0, 10, 5 * per, dtype=np.uint8)
    np.save(tmp_path / "shot_noise.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    got, got_labels = load_cifar_c(tmp_path, "shot_noise", 3)
    np.testing.assert_array_equal(got.numpy(), images[2 * per : 3 * per].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(got_labels.numpy(), labels[2 * per : 3 * per])
    assert got.dtype == torch.uint8 and got_labels.dtype == torch.int64
    with pytest.raises(DatasetError, match="gaussian_noise.npy is missing"):
        load_cifar_c(tmp_path, "gaussian_noise", 1)
    np.save(tmp_path / "speckle_noise.npy", images.astype(np.float32))
    with pytest.raises(DatasetError, match="not a CIFAR-10-C file"):
        load_cifar_c(tmp_path, "speckle_noise", 1)


def test_the_docstring_example_runs():
    assert doctest.testmod(corruptions).failed == 0


def test_the_constants_are_the_published_ones():
    """hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py: the severities' constants."""
    assert CORRUPTIONS == {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    }


def _brightness_model() -> torch.nn.Module:
    """Class 1 for images brighter than mid-grey, else 0: its accuracy moves with the noise."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[1] = 1.0 / (3 * 8 * 8)
        net[1].bias.copy_(torch.tensor([0.5, 0.0]))
    return net


def test_corruption_accuracy_is_the_accuracy_on_the_corrupted_images():
    from momentreg.evaluation.corruptions import corruption_accuracy

    images = torch.from_numpy(RNG.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8))
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    net = _brightness_model()
    result = corruption_accuracy(net, images, labels, ("shot_noise", "gaussian_noise"), seed=3,
                                 batch_size=64)  # fmt: skip
    assert list(result) == ["shot_noise", "gaussian_noise"] and len(result["shot_noise"]) == 5
    for k, name in enumerate(result):  # one batch: the generator of (seed, corruption, severity)
        for severity in (1, 5):
            gen = torch.Generator().manual_seed(3 + 10 * k + severity)
            noisy = corrupt(images, name, severity, gen).float() / 255
            direct = 100.0 * (net(noisy).argmax(1) == labels).float().mean().item()
            assert result[name][severity - 1] == pytest.approx(direct)


def test_corruption_accuracy_reads_the_published_files_where_given(tmp_path):
    from momentreg.evaluation.corruptions import corruption_accuracy

    images = RNG.integers(0, 256, (5 * 6, 8, 8, 3), dtype=np.uint8)
    labels = RNG.integers(0, 2, 5 * 6, dtype=np.uint8)
    np.save(tmp_path / "impulse_noise.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    net = _brightness_model()
    result = corruption_accuracy(net, None, None, ("impulse_noise",), cifar_c=tmp_path)
    for severity in SEVERITIES:
        x, y = load_cifar_c(tmp_path, "impulse_noise", severity)
        direct = 100.0 * (net(x.float() / 255).argmax(1) == y).float().mean().item()
        assert result["impulse_noise"][severity - 1] == pytest.approx(direct)
