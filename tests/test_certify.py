"""CERTIFY against a classifier whose smoothed probabilities are known in closed form."""

import math

import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from momentreg import certify as certify_module
from momentreg.certify import (
    ABSTAIN,
    certify,
    certify_images,
    format_tsv,
    lower_confidence_bound,
    predict,
    sample_counts,
    summarize,
)
from tests.helpers import HostReads

SIGMA = 0.25


def _linear(margin: float, d: int = 16, seed: int = 0):
    """Two classes split by the hyperplane w.x + b = 0; returns (model, x, true pA of class 1).

    Under x + n, n ~ N(0, sigma^2 I): P(class 1) = Phi((w.x + b) / (sigma ||w||)), so the exact
    certified radius is sigma * Phi^-1(pA) = (w.x + b) / ||w||, the distance to the hyperplane.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.rand(1, 4, 4, generator=g, dtype=torch.float64)
    b = margin * w.norm() - w @ x.flatten()
    layer = nn.Linear(d, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.zeros(d), w]))
        layer.bias.copy_(torch.tensor([0.0, float(b)]))
    p_a = float(norm.cdf(margin / SIGMA))
    return nn.Sequential(nn.Flatten(), layer), x, p_a


def test_clopper_pearson_bound_is_the_exact_binomial_tail():
    for k, n, alpha in [(80, 100, 0.05), (999, 1000, 0.001), (1, 10, 0.1)]:
        p = lower_confidence_bound(k, n, alpha)
        assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)  # P(X >= k | p) = alpha
    assert lower_confidence_bound(0, 10, 0.05) == 0.0


def test_certified_radius_converges_to_the_distance_to_the_boundary():
    model, x, p_a = _linear(margin=0.3)
    true_radius = SIGMA * norm.ppf(p_a)
    assert true_radius == pytest.approx(0.3)
    g = torch.Generator().manual_seed(1)
    radii = {}
    for n in (1_000, 100_000):
        c, radii[n] = certify(model, x, SIGMA, 100, n, 0.001, 10_000, g)
        assert c == 1
        assert radii[n] <= true_radius
    print(f"true radius {true_radius:.4f}, certified {radii}")
    assert radii[100_000] == pytest.approx(true_radius, abs=0.01)
    assert radii[1_000] < radii[100_000]


def test_lower_bound_holds_at_the_stated_confidence_in_repeated_trials():
    model, x, p_a = _linear(margin=0.2)
    alpha, trials, n = 0.05, 400, 300
    g = torch.Generator().manual_seed(2)
    misses = 0
    for _ in range(trials):
        c, radius = certify(model, x, SIGMA, 50, n, alpha, n, g)
        # a bound above the truth certifies a radius larger than the true one
        misses += c == 1 and radius > SIGMA * norm.ppf(p_a)
    limit = alpha * trials + 3 * math.sqrt(trials * alpha * (1 - alpha))
    print(f"{misses} of {trials} bounds above the true pA (allowed {limit:.0f})")
    assert misses <= limit


def test_abstains_on_the_decision_boundary_and_predicts_far_from_it():
    g = torch.Generator().manual_seed(3)
    on, x_on, _ = _linear(margin=0.0)
    assert certify(on, x_on, SIGMA, 100, 2_000, 0.001, 2_000, g) == (ABSTAIN, 0.0)
    assert predict(on, x_on, SIGMA, 2_000, 0.001, 2_000, g) == ABSTAIN
    far, x_far, _ = _linear(margin=0.5)
    assert predict(far, x_far, SIGMA, 2_000, 0.001, 2_000, g) == 1


def test_summary_counts_certified_accuracy_and_acr():
    rows = [
        {"idx": 0, "label": 1, "predict": 1, "radius": 0.6, "correct": 1, "time": 0.5},
        {"idx": 1, "label": 0, "predict": 0, "radius": 0.2, "correct": 1, "time": 0.5},
        {"idx": 2, "label": 0, "predict": 1, "radius": 0.9, "correct": 0, "time": 0.5},
        {"idx": 3, "label": 2, "predict": ABSTAIN, "radius": 0.0, "correct": 0, "time": 0.5},
    ]
    s = summarize(rows)
    assert s["certified_accuracy"] == {"0": 50.0, "0.25": 25.0, "0.5": 25.0, "0.75": 0.0, "1": 0.0}
    assert s["acr"] == pytest.approx(0.2) and s["abstained"] == 1
    tsv = format_tsv(rows).splitlines()
    assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert tsv[4].split("\t")[:5] == ["3", "2", "-1", "0.0", "0"]


def test_certify_images_is_seeded_and_checks_its_arguments():
    model, x, _ = _linear(margin=0.3)
    images, labels = x.repeat(3, 1, 1, 1), torch.tensor([1, 1, 0])
    a = certify_images(model, images, labels, SIGMA, n0=20, n=500, batch=250, seed=5)
    b = certify_images(model, images, labels, SIGMA, n0=20, n=500, batch=250, seed=5)
    assert [r["radius"] for r in a] == [r["radius"] for r in b]
    assert [r["correct"] for r in a] == [1, 1, 0]
    with pytest.raises(ValueError, match="sigma > 0"):
        certify_images(model, images, labels, 0.0)


def test_certify_images_in_groups_draws_what_certify_draws_image_by_image(monkeypatch):
    """Reading results back per group (the last one partial) keeps CERTIFY's stream of noise."""
    model, x, _ = _linear(margin=0.05)
    images = x + 0.1 * torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 0, 1, 1, 0])
    n0, n = 20, 300
    monkeypatch.setattr(certify_module, "_SAMPLES_PER_READ", 2 * (n0 + n))  # groups 2, 2, 1
    with HostReads() as reads:
        rows = certify_images(model, images, labels, SIGMA, n0=n0, n=n, batch=128, seed=6)
    assert reads.ops == ["tolist"] * 4  # the labels, then one read per group of images
    g = torch.Generator().manual_seed(6)
    one_by_one = []  # Cohen et al.'s CERTIFY written out, image by image, from the counts
    for im in images:
        c_a = int(sample_counts(model, im, SIGMA, n0, 128, g).argmax())
        p_a = lower_confidence_bound(int(sample_counts(model, im, SIGMA, n, 128, g)[c_a]), n, 0.001)
        one_by_one.append((c_a, SIGMA * norm.ppf(p_a)) if p_a >= 0.5 else (ABSTAIN, 0.0))
    assert [(r["predict"], r["radius"]) for r in rows] == one_by_one
    assert [r["idx"] for r in rows] == [0, 1, 2, 3, 4]
    assert len({r["radius"] for r in rows}) >= 3  # the images differ: a misplaced one shows
