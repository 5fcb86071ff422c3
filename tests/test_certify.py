"""CERTIFY against a classifier whose smoothed probabilities are known in closed form."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from momentreg.errors import ConfigError
from momentreg.evaluation import certify as certify_module
from momentreg.evaluation.certify import (
    ABSTAIN,
    acr_gap,
    certified_radii,
    certify,
    certify_images,
    format_tsv,
    lower_confidence_bound,
    mean_and_se,
    predict,
    read_tsv,
    sample_counts,
    summarize,
)
from momentreg.runs.run import certify_run
from momentreg.runs.rundir import certify_partial, certify_tsv, clear_run
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


def _five_images():
    model, x, _ = _linear(margin=0.05)
    images = x + 0.1 * torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    return model, images, torch.tensor([1, 0, 1, 1, 0])


# Each image takes 4 forward passes: n0 = 20 samples in one batch of 128, n = 300 in three.
PASSES = 4


def _certify_into(run, model, images, labels, crash_after=None):
    """(certify_run's summary, the model's forward passes) of a certification into ``run``; with
    ``crash_after``, the process is interrupted (KeyboardInterrupt) after that many passes."""
    run.mkdir(exist_ok=True)
    passes = []

    def count(*_):
        passes.append(1)
        if crash_after is not None and len(passes) > crash_after:
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(count)
    try:
        settings = {"sigma": SIGMA, "n0": 20, "n": 300, "batch": 128, "seed": 6, "stride": 3}
        return certify_run(run, model, images, labels, progress=False, **settings), len(passes)
    finally:
        hook.remove()


def _rows(run):
    """The per-image TSV without its time column."""
    lines = (run / certify_tsv(SIGMA)).read_text().splitlines()
    return [line.rsplit("\t", 1)[0] for line in lines]


def test_a_certification_killed_halfway_continues_to_the_uninterrupted_rows(tmp_path, monkeypatch):
    model, images, labels = _five_images()
    monkeypatch.setattr(certify_module, "_SAMPLES_PER_READ", 2 * (20 + 300))  # groups 2, 2, 1
    whole, _ = _certify_into(tmp_path / "whole", model, images, labels)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # killed in the second group of images
        _certify_into(run, model, images, labels, crash_after=2 * PASSES + 2)
    assert (run / certify_partial(SIGMA)).exists() and not (run / certify_tsv(SIGMA)).exists()

    resumed, passes = _certify_into(run, model, images, labels)
    assert passes == 3 * PASSES  # the first group's two images are not certified again
    assert _rows(run) == _rows(tmp_path / "whole")  # the same stream of noise, continued
    assert {**resumed, "seconds_per_image": 0} == {**whole, "seconds_per_image": 0}
    assert not (run / certify_partial(SIGMA)).exists()


def test_an_interrupted_certification_of_other_weights_starts_over(tmp_path, monkeypatch):
    model, images, labels = _five_images()
    monkeypatch.setattr(certify_module, "_SAMPLES_PER_READ", 2 * (20 + 300))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _certify_into(run, model, images, labels, crash_after=2 * PASSES + 2)
    with torch.no_grad():
        model[1].bias[1] += 0.02  # retrained, say: the rows kept belong to another model
    _, passes = _certify_into(run, model, images, labels)
    assert passes == 5 * PASSES  # every image certified again
    _certify_into(tmp_path / "fresh", model, images, labels)
    assert _rows(run) == _rows(tmp_path / "fresh")

    (run / certify_partial(SIGMA)).write_bytes(b"torn")  # a torn file is not read either
    assert _certify_into(run, model, images, labels)[1] == 5 * PASSES
    (run / certify_partial(SIGMA)).write_bytes(b"torn")
    clear_run(run)
    assert not list(run.iterdir())  # train --force leaves nothing of the old certification


def _table_rows(gen: np.random.Generator, n: int, shift: float = 0.0) -> list[dict]:
    correct = gen.uniform(size=n) < 0.8
    return [
        {"idx": 3 * i, "label": i % 10, "predict": i % 10 if c else -1, "correct": int(c),
         "radius": float(f"{gen.uniform(0.1, 1.0) + shift:.3}") if c else 0.0, "time": 0.5}
        for i, c in enumerate(correct)
    ]  # fmt: skip


def test_a_certification_table_reads_back_into_its_acr_and_radii(tmp_path):
    rows = _table_rows(np.random.default_rng(0), 50)
    path = tmp_path / "certify-sigma0.25.tsv"
    path.write_text(format_tsv(rows))
    read = read_tsv(path)
    assert rows == read  # every column, the radii as written (3 significant digits)
    radii = certified_radii(read)
    assert list(radii) == [r["idx"] for r in rows]
    direct = np.array([r["radius"] * r["correct"] for r in rows])
    acr, se = mean_and_se(list(radii.values()))
    assert acr == pytest.approx(summarize(read)["acr"]) == pytest.approx(direct.mean())
    assert se == pytest.approx(direct.std(ddof=1) / np.sqrt(len(direct)))
    (tmp_path / "other.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ConfigError, match="not a certification table"):
        read_tsv(tmp_path / "other.tsv")


def test_the_gap_between_two_runs_is_paired_over_shared_images():
    gen = np.random.default_rng(1)
    a = certified_radii(_table_rows(gen, 200))
    b = {i: max(0.0, r - 0.05 + gen.normal(0, 0.01)) for i, r in a.items()}  # a's, a little less
    gap, se = acr_gap(a, b)
    diffs = np.array([a[i] - b[i] for i in a])
    assert gap == pytest.approx(diffs.mean())
    assert se == pytest.approx(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    unpaired = {i + 1: r for i, r in b.items()}  # other images: the standard errors add
    gap2, se2 = acr_gap(a, unpaired)
    assert gap2 == pytest.approx(gap)
    assert se2 == pytest.approx(np.hypot(mean_and_se(list(a.values()))[1],
                                         mean_and_se(list(b.values()))[1]))  # fmt: skip
    assert se < se2 / 5  # what the runs share cancels
