import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentreg import (
    expected_logits,
    head_moments,
    head_variance,
    moment_loss,
    split_at_first_relu,
)
from momentreg.core.moments import relu_mean
from momentreg.models.zoo import Normalize, build_model, lenet
from tests.helpers import HostReads, MomentLossOf, theorem1_mean, two_layer


def test_expected_logits_is_exact_for_an_affine_tail():
    net = two_layer()
    x = torch.rand(5, 1, 3, 4, dtype=torch.float64)
    sigma = 0.05 + torch.rand(1, 3, 4, dtype=torch.float64)  # per-pixel levels
    got = expected_logits(net, x, sigma)
    assert torch.allclose(got, theorem1_mean(net, x, sigma), rtol=1e-5, atol=1e-8)


def test_expected_logits_affine_tail_matches_monte_carlo():
    net = two_layer()
    x = torch.rand(1, 1, 3, 4, dtype=torch.float64)
    sigma = 0.3
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = torch.cat(
            [
                net(x + sigma * torch.randn(50_000, 1, 3, 4, generator=gen, dtype=torch.float64))
                for _ in range(10)
            ]
        )
        got = expected_logits(net, x, sigma)[0]
    se = out.std(0) / math.sqrt(out.shape[0])
    assert (abs(got - out.mean(0)) < 4 * se).all()


def test_sigma_zero_gives_one_plus_alpha_times_clean_loss():
    # float64: in float32 the stacked batch's logits differ from net(x)'s by rounding (1e-7),
    # over allclose's atol on an untrained net's near-zero logits
    net = build_model("lenet", "mnist").double()
    x, y = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    total, parts = moment_loss(net, x, y, sigma=0.0, alpha=1.5)
    clean = F.cross_entropy(net(x), y)
    assert torch.allclose(total, 2.5 * clean, rtol=1e-6)
    assert torch.allclose(parts["logits"], net(x))


def test_moment_term_is_the_clean_loss_at_sigma_zero_and_moves_away_with_sigma():
    net = build_model("lenet", "mnist")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    _, p0 = moment_loss(net, x, y, sigma=0.0, alpha=1.0)
    torch.testing.assert_close(p0["moment"], p0["clean"])  # no noise: E[f(x)] = f(x)
    gaps = [
        (moment_loss(net, x, y, sigma=s, alpha=1.0)[1]["moment"] - p0["clean"]).abs().item()
        for s in (0.01, 0.1, 1.0)
    ]
    assert 0 < gaps[0] < gaps[1] < gaps[2]


def test_gradcheck_moment_loss_small_lenet_float64():
    net = lenet(1, 8, 3, Normalize([0.5], [0.25])).double()
    loss = MomentLossOf(net, torch.tensor([0, 2]), sigma=0.3, alpha=2.0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    names = ["net.1.weight", "net.4.bias", "net.10.bias"]  # head conv, tail conv, last linear
    params = [loss.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def fn(inp, *ps):
        return torch.func.functional_call(loss, dict(zip(names, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_per_pixel_sigma_matches_scalar_and_zero_region_is_noise_free():
    net = build_model("lenet", "mnist")
    x = torch.rand(3, 1, 28, 28)
    scalar = expected_logits(net, x, 0.4)
    per_pixel = expected_logits(net, x, torch.full((28, 28), 0.4))
    assert torch.allclose(scalar, per_pixel, atol=1e-5)
    head, _ = split_at_first_relu(net)
    mask = torch.zeros(1, 28, 28)
    mask[..., :10] = 0.5
    var = head_variance(head, mask, x)
    assert var.shape == (1, 32, 28, 28)
    assert (var[..., 13:] == 0).all() and (var[..., :12] > 0).all()


@pytest.mark.parametrize("bad", [torch.ones(2, 28, 28), torch.ones(27), torch.ones(3, 1, 1)])
def test_sigma_of_wrong_shape_is_a_clear_error(bad):
    net = build_model("lenet", "mnist")
    with pytest.raises(ValueError, match="does not broadcast to one input of shape"):
        expected_logits(net, torch.rand(2, 1, 28, 28), bad)


@pytest.mark.parametrize(
    "bad", [-0.1, math.nan, math.inf, torch.tensor(-0.1), torch.tensor(math.nan)]
)
def test_negative_or_non_finite_sigma_is_an_error(bad):
    with pytest.raises(ValueError, match="sigma must be"):
        expected_logits(build_model("lenet", "mnist"), torch.rand(2, 1, 28, 28), bad)


def test_a_tensor_sigma_is_read_once_until_it_changes():
    """A per-pixel sigma made once costs one host read (a sync on an accelerator), not one a step;
    an in-place write to it, or a new tensor, is checked again."""
    net = build_model("lenet", "mnist")
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    sigma = torch.full((1, 28, 28), 0.2)
    reads = []
    for _ in range(3):
        with HostReads() as seen:
            moment_loss(net, x, y, sigma, alpha=1.0)
        reads.append(seen.ops)
    assert reads == [["__bool__"], [], []]
    sigma[0, 3, 4] = -1.0  # bumps its version counter
    with pytest.raises(ValueError, match="sigma must be finite and >= 0 everywhere"):
        moment_loss(net, x, y, sigma, alpha=1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0 everywhere"):
        moment_loss(net, x, y, sigma, alpha=1.0)  # the failed check is not remembered
    with HostReads() as seen:
        moment_loss(net, x, y, sigma.abs(), alpha=1.0)
    assert seen.ops == ["__bool__"]
    with torch.inference_mode():
        frozen = torch.full((1, 28, 28), math.inf)
    with pytest.raises(ValueError, match="sigma must be finite"):
        expected_logits(net, x, frozen)  # no version counter: checked every call


def test_a_number_and_a_tensor_sigma_give_the_same_bits():
    """A number is filled on the device without a host check there; the result is the tensor's."""
    head, _ = split_at_first_relu(build_model("lenet", "mnist"))
    x = torch.rand(2, 1, 28, 28)
    for sigma in (0.1, 0.25, 1.0 / 3):
        as_tensor = head_variance(head, torch.tensor(sigma), x)
        assert torch.equal(head_variance(head, sigma, x), as_tensor)


def test_head_variance_is_computed_at_batch_size_one():
    net = build_model("alexnet", "cifar10")
    head, _ = split_at_first_relu(net)
    x = torch.rand(64, 3, 32, 32)
    assert head_variance(head, 0.1, x).shape == (1, 64, 8, 8)
    mean, var = head_moments(head, 0.1, x)  # what moment_loss uses
    assert mean.shape == (64, 64, 8, 8) and var.shape == (1, 64, 8, 8)


def test_split_handles_nested_sequentials_and_shares_parameters():
    inner = nn.Sequential(Normalize([0.5], [0.5]), nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    net = nn.Sequential(inner, nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    head, tail = split_at_first_relu(net)
    assert len(head) == 3 and len(tail) == 1
    assert tail[0].weight is net[2][0].weight
    x = torch.rand(5, 1, 2, 2)
    assert torch.allclose(tail(torch.relu(head(x))), net(x))


@pytest.mark.parametrize(
    "net,name",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.ReLU()), "Tanh"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()), "MaxPool2d"),
        (nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Dropout()), nn.ReLU()), "Dropout"),
    ],
)
def test_non_affine_layer_before_first_relu_is_named(net, name):
    with pytest.raises(ValueError, match=name):
        split_at_first_relu(net)


def test_model_without_relu_is_refused_sequential_or_traced():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        split_at_first_relu(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="Linear has no ReLU"):
        split_at_first_relu(nn.Linear(2, 2))  # not Sequential: traced with torch.fx


def test_explicit_split_for_non_sequential_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.stem(x)).flatten(1))

    net = Net()
    x = torch.rand(2, 1, 6, 6)
    split = (net.stem, lambda r: net.fc(r.flatten(1)))
    got = expected_logits(net, x, 0.2, split=split)
    var = head_variance(net.stem, 0.2, x)
    assert torch.allclose(got, net.fc(relu_mean(net.stem(x), var).flatten(1)))
    assert torch.allclose(expected_logits(net, x, 0.0, split=split), net(x), atol=1e-6)


@pytest.mark.parametrize(
    "name,dataset,shape,classes",
    [
        ("lenet", "mnist", (1, 28, 28), 10),
        ("lenet", "cifar10", (3, 32, 32), 10),
        ("alexnet", "cifar100", (3, 32, 32), 100),
        ("resnet20", "cifar10", (3, 32, 32), 10),
    ],
)
def test_model_registry_shapes(name, dataset, shape, classes):
    net = build_model(name, dataset)
    assert net(torch.rand(2, *shape)).shape == (2, classes)
    assert isinstance(net[0], Normalize)
    split_at_first_relu(net)


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", "mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_model("lenet", "svhn")


def _bn_stem(seed=0):
    """Normalize -> Conv2d -> BatchNorm2d with non-trivial affine parameters and running stats."""
    g = torch.Generator().manual_seed(seed)
    conv, bn = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(0.2 + torch.rand(3, generator=g))
    return nn.Sequential(Normalize([0.4, 0.5], [0.3, 0.2]), conv, bn).double()


def _monte_carlo(fn, x, sigma, samples=20_000):
    """Mean and variance (and their standard errors) of fn(x + n) over Gaussian noise."""
    with torch.no_grad():
        draws = torch.stack([fn(x + sigma * torch.randn_like(x)) for _ in range(samples)])
    mean, var = draws.mean(0), draws.var(0)
    return mean, var, (var / samples).sqrt(), var * math.sqrt(2 / (samples - 1))


def test_batchnorm_stem_in_eval_mode_matches_monte_carlo():
    head = _bn_stem().eval()
    x, sigma = torch.rand(2, 2, 6, 6, dtype=torch.float64), 0.3
    mean, var = head_moments(head, sigma, x)
    mc_mean, mc_var, se_mean, se_var = _monte_carlo(head, x, sigma)
    assert torch.allclose(mean, head(x))
    assert ((mean - mc_mean).abs() <= 4 * se_mean + 1e-12).all()
    assert ((var.expand_as(mc_var) - mc_var).abs() <= 4 * se_var).all()
    assert torch.allclose(head_variance(head, sigma, x), var)  # eval mode: no batch needed


def test_batchnorm_stem_in_train_mode_uses_the_batch_statistics_as_its_affine_map():
    head = _bn_stem().train()
    x, sigma = torch.rand(8, 2, 6, 6, dtype=torch.float64), 0.3
    conv_out = head[1](head[0](x))
    bn = head[2]
    scale = bn.weight / (conv_out.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt()
    shift = bn.bias - scale * conv_out.mean(dim=(0, 2, 3))

    def frozen(z):  # the map this batch's BatchNorm applies, held fixed under the noise
        return head[1](head[0](z)) * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)

    running = bn.running_mean.clone()
    mean, var = head_moments(head, sigma, x)
    assert not torch.equal(bn.running_mean, running)  # one training forward, as usual
    assert torch.allclose(mean, frozen(x), atol=1e-10)
    _, mc_var, _, se_var = _monte_carlo(frozen, x, sigma)
    assert ((var.expand_as(mc_var) - mc_var).abs() <= 4 * se_var).all()
    with pytest.raises(ValueError, match="training mode"):
        head_variance(head, sigma, x)


def test_resnet20_learns_with_the_regularizer_on_cifar_shaped_data():
    from momentreg.training.loop import train

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # a task it can learn in a few steps: the label is the brightest colour channel
    labels = torch.randint(0, 3, (96,), generator=g)
    images = torch.randint(0, 100, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[torch.arange(96), labels] += 150
    net = build_model("resnet20", "cifar10")
    history = train(
        net,
        (images[:64], labels[:64]),
        (images[64:], labels[64:]),
        method="moment",
        sigma=0.25,
        alpha=1.0,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        batch_size=32,
        epochs=3,
        early_stop=3,
        progress=False,
    )
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert max(r["val_accuracy"] for r in history) > 60  # chance is 33
    net.eval()
    assert torch.isfinite(expected_logits(net, images[:4].float() / 255, 0.25)).all()
