"""The robustness card: its numbers are what the measuring functions give, and its files
round-trip."""

import doctest

import pytest
import torch

from momentreg import card as card_module
from momentreg.card import evaluate, read_card, write_card
from momentreg.corruptions import corruption_accuracy
from momentreg.errors import ConfigError
from momentreg.robustness import accuracy, gaussian_robustness
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
    assert f"{card.mean_corruption_accuracy():.2f}" in table


def test_images_and_labels_of_different_counts_are_refused():
    images, labels = _data(10)
    with pytest.raises(ConfigError, match="10 images and 9 labels"):
        evaluate(tiny_net(), images, labels[:9])


def test_the_docstring_example_runs():
    assert doctest.testmod(card_module).failed == 0
