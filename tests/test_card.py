"""The robustness card: its numbers are what the measuring functions give, and its files
round-trip."""

import doctest
import json
import sys

import pytest
import torch

from momentreg.errors import ConfigError
from momentreg.evaluation import card as card_module
from momentreg.evaluation.attacks import minimal_perturbations, summarize
from momentreg.evaluation.card import Certification, compare_cards, evaluate, read_card, write_card
from momentreg.evaluation.certify import certify_images
from momentreg.evaluation.certify import summarize as certify_summary
from momentreg.evaluation.corruptions import corruption_accuracy
from momentreg.evaluation.robustness import accuracy, gaussian_robustness
from tests.helpers import tiny_net


def _data(n=60):
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    return images, torch.arange(n) % 10


def test_the_card_holds_what_the_measuring_functions_give():
    torch.manual_seed(0)
    net, (images, labels) = tiny_net(), _data()
    card = evaluate(net, images, labels, name="tiny", corruptions=("gaussian_noise",), seed=4,
                    gnr_images=30, batch_size=25)  # fmt: skip
    x = images.float() / 255
    assert card.clean_accuracy == pytest.approx(accuracy(net, x, labels))
    gnr, _, consistency = gaussian_robustness(net, x[:30], seed=4, batch_size=25)
    assert card.gnr == pytest.approx(gnr) and card.gnr_images == 30
    assert card.gnr_curve["consistency"] == pytest.approx(consistency.tolist())
    direct = corruption_accuracy(net, images, labels, ("gaussian_noise",), seed=4, batch_size=25)
    assert card.corruptions == direct and card.corruption_source == "generated"
    means = card.corruption_means()
    assert means["gaussian_noise"] == pytest.approx(sum(direct["gaussian_noise"]) / 5)
    assert card.mean_corruption_accuracy() == pytest.approx(means["gaussian_noise"])
    assert (card.images, card.seed, card.name) == (60, 4, "tiny")


def test_a_written_card_reads_back_and_shows_its_numbers(tmp_path):
    torch.manual_seed(0)
    net, (images, labels) = tiny_net(), _data(20)
    card = evaluate(net, images, labels, corruptions=("shot_noise", "impulse_noise"))
    paths = write_card(card, tmp_path / "card")
    assert [p.name for p in paths] == ["card.json", "card.md", "card.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert read_card(tmp_path / "card") == card
    table = (tmp_path / "card" / "card.md").read_text()
    assert f"| {card.clean_accuracy:.2f} |" in table and f"| {card.gnr:.2f} |" in table
    assert f"| {card.mean_corruption_accuracy():.2f} | 20 x 5 | 0 |" in table  # count and seed


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_attacks_and_certification_on_the_card_are_what_their_functions_give(tmp_path):
    torch.manual_seed(0)
    net, (images, labels) = tiny_net(), _data(24)
    settings = Certification(sigma=0.5, n0=20, n=200, batch=100, images=12)
    card = evaluate(net, images, labels, corruptions=("gaussian_noise",), attacks=("fgsm", "aga"),
                    attack_images=16, certify=settings, seed=3)  # fmt: skip
    assert net.training  # left in the mode it came in
    x = images.float() / 255
    for name in ("fgsm", "aga"):
        direct = summarize(minimal_perturbations(net, x[:16], labels[:16], name, seed=3))
        assert card.attacks[name] == pytest.approx(direct, nan_ok=True)
    rows = certify_images(net, x[:12], labels[:12], 0.5, n0=20, n=200, batch=100, seed=3)
    direct = certify_summary(rows)
    certified = card.certified
    assert certified["images"] == 12 and certified["seed"] == 3 and certified["sigma"] == 0.5
    assert certified["acr"] == pytest.approx(direct["acr"])
    assert certified["certified_accuracy"] == direct["certified_accuracy"]
    curve = certified["curve"]
    assert curve["accuracy"][0] == pytest.approx(direct["certified_accuracy"]["0"])
    assert curve["accuracy"] == sorted(curve["accuracy"], reverse=True)  # falls with the radius
    paths = write_card(card, tmp_path / "card")
    assert read_card(paths[0]) == card
    table = paths[1].read_text()
    assert f"| {card.attacks['fgsm']['linf_median']:.4g} |" in table
    assert f"| {certified['acr']:.3f} | 12 | 3 |" in table
    plain = evaluate(net, images, labels, corruptions=("gaussian_noise",), name="plain")
    write_card(plain, tmp_path / "plain")
    assert _png_width(paths[2]) > 1.4 * _png_width(tmp_path / "plain" / "card.png")  # 3 panels
    table, figure = compare_cards([plain, card], tmp_path / "both")
    text = table.read_text()
    assert "fgsm: median minimal Linf perturbation" in text and "ACR, sigma 0.5" in text
    assert _png_width(figure) > 1.4 * 1100


def test_a_card_written_before_attacks_and_certificates_reads(tmp_path):
    torch.manual_seed(0)
    card = evaluate(tiny_net(), *_data(10), corruptions=())
    path = write_card(card, tmp_path)[0]
    old = json.loads(path.read_text())
    del old["attacks"], old["certified"]
    path.write_text(json.dumps(old))
    assert read_card(path) == card


def test_deepfool_without_foolbox_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'momentreg\[foolbox\]'"):
        minimal_perturbations(
            tiny_net(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), "deepfool"
        )


def test_images_and_labels_of_different_counts_are_refused():
    images, labels = _data(10)
    with pytest.raises(ConfigError, match="10 images and 9 labels"):
        evaluate(tiny_net(), images, labels[:9])


def test_the_docstring_example_runs():
    assert doctest.testmod(card_module).failed == 0
