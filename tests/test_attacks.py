import pytest
import torch
from torch import nn

from momentreg.attacks import ATTACKS, minimal_perturbations, summarize
from momentreg.data import load_dataset, to_float, train_val_split
from momentreg.models import Normalize
from momentreg.training import train


def _linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16))
        model[1].bias.zero_()
    return model.eval()


def _near_boundary_images(model, n=12):
    """Images around 0.5 whose distance to the decision boundary is small (box never binds)."""
    gen = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * torch.randn(n, 1, 4, 4, generator=gen)
    with torch.no_grad():
        labels = model(x).argmax(1)
    return x, labels


@pytest.mark.parametrize("attack,norm", [("deepfool", "l2"), ("pgd", "linf"), ("fgsm", "linf")])
def test_minimal_perturbation_of_a_linear_classifier_is_within_2_percent(attack, norm):
    model = _linear_model()
    x, labels = _near_boundary_images(model)
    w = model[1].weight[1] - model[1].weight[0]
    margin = (x.flatten(1) @ w + model[1].bias[1] - model[1].bias[0]).abs()
    true = margin / (w.norm() if norm == "l2" else w.abs().sum())
    result = minimal_perturbations(model, x, labels, attack, tol=0.005)
    assert result.success.all()
    d = result.perturbations.flatten(1)
    found = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
    ratio = found / true
    print(attack, ratio)
    assert ((ratio > 0.999) & (ratio < 1.02)).all(), ratio


@pytest.fixture(scope="module")
def small_trained():
    torch.manual_seed(0)
    images, labels = load_dataset("mnist-sample", split="train")
    tr, va = train_val_split(images[:2000], labels[:2000], 0.1, seed=0)
    net = nn.Sequential(
        Normalize([0.13], [0.31]),
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 12 * 12, 10),
    )
    train(net, tr, va, epochs=3, lr=3e-3, batch_size=64, progress=False)
    test_x, test_y = load_dataset("mnist-sample", split="test")
    return net.eval(), to_float(test_x[:16]), test_y[:16]


@pytest.fixture(scope="module")
def all_results(small_trained):
    net, x, y = small_trained
    return {name: minimal_perturbations(net, x, y, name, tol=0.02, seed=0) for name in ATTACKS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_succeeds_flips_and_respects_bounds(small_trained, all_results, name):
    net, x, y = small_trained
    result = all_results[name]
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    assert result.excluded == int((~correct).sum())
    assert result.success.float().mean() > 0.9, summarize(result)
    adv = x[correct][result.success] + result.perturbations[result.success]
    assert adv.min() >= -1e-6 and adv.max() <= 1 + 1e-6
    with torch.no_grad():
        assert (net(adv).argmax(1) != y[correct][result.success]).all()


@pytest.mark.slow
def test_random_noise_needs_more_energy_than_adversarial_directions(all_results):
    energy = {k: summarize(r)["energy_median"] for k, r in all_results.items()}
    print(energy)
    for noise in ("aga", "aua"):
        assert energy[noise] > energy["pgd"] and energy[noise] > energy["deepfool"]


@pytest.mark.slow
def test_summary_fields(all_results):
    s = summarize(all_results["fgsm"])
    assert {
        "success_rate",
        "energy_mean",
        "energy_median",
        "l2_mean",
        "l2_median",
        "linf_mean",
        "linf_median",
        "excluded_misclassified",
    } <= set(s)
    assert s["energy_median"] == pytest.approx(s["l2_median"] ** 2 / 784, rel=0.5)


def test_unknown_attack():
    with pytest.raises(ValueError, match="unknown attack"):
        minimal_perturbations(_linear_model(), torch.rand(2, 1, 4, 4), torch.zeros(2).long(), "cw")
