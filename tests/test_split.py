"""The regularizer on any nn.Module: torch.fx splits at the first ReLU, on models written here."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentreg.core.regularizer import (
    expected_logits,
    head_moments,
    moment_loss,
    split_at_first_relu,
)
from momentreg.core.split import trace_split
from momentreg.models.zoo import build_model
from tests.helpers import MomentLossOf, TinyResNet


class MethodReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().view(x.size(0), -1))


class SkipOverReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(torch.flatten(F.relu(h) + h, 1))


class TanhHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.fc(torch.flatten(F.relu(h), 1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(F.relu(x))


def _bn_scale(bn, batch):
    var = batch.var(dim=(0, 2, 3), unbiased=False) if bn.training else bn.running_var
    return bn.weight / torch.sqrt(var + bn.eps)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resnet_expected_logits_match_a_hand_written_eq3(mode):
    torch.manual_seed(0)
    net = TinyResNet()
    with torch.no_grad():  # running statistics that differ from the defaults
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    getattr(net, mode)()
    x, sigma = torch.rand(6, 3, 8, 8), 0.1
    # Eq. 3 by hand: mu = head(x); s^2 = conv with squared weights of sigma^2 / 0.25^2, scaled by
    # the BatchNorm's factor squared; T = mu Phi(mu/s) + s phi(mu/s); then the tail
    z = net.conv1((x - 0.5) / 0.25)
    scale = _bn_scale(net.bn1, z).view(1, -1, 1, 1)
    mu = (
        F.batch_norm(z, None, None, net.bn1.weight, net.bn1.bias, True) if mode == "train" else None
    )
    mu = net.bn1.eval()(z) if mode == "eval" else mu
    getattr(net, mode)()
    var = F.conv2d(torch.full((1, 3, 8, 8), sigma**2 / 0.25**2), net.conv1.weight**2, padding=1)
    s = torch.sqrt(var * scale**2)
    normal = torch.distributions.Normal(0.0, 1.0)
    t = mu * normal.cdf(mu / s) + s * normal.log_prob(mu / s).exp()
    expected = net.reference_tail(t)
    torch.testing.assert_close(expected_logits(net, x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_split_reassembles_the_model_and_shares_its_parameters():
    net = TinyResNet().eval()
    head, tail = split_at_first_relu(net)
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(tail(torch.relu(head(x))), net(x))
    params = {id(p) for p in net.parameters()}
    assert {id(p) for p in [*head.parameters(), *tail.parameters()]} <= params
    assert split_at_first_relu(net) is split_at_first_relu(net)  # traced once per model


def test_affine_tail_expectation_is_exact_against_monte_carlo():
    torch.manual_seed(0)

    class AffineTail(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc = nn.Linear(3 * 4 * 4, 4)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x * 2.0 - 1.0)), 1))

    net = AffineTail().double()
    x, sigma, n = torch.rand(2, 1, 6, 6, dtype=torch.float64), 0.3, 200_000
    with torch.no_grad():
        noisy = x.unsqueeze(1) + sigma * torch.randn(2, n, 1, 6, 6, dtype=torch.float64)
        samples = net(noisy.view(-1, 1, 6, 6)).view(2, n, 4)
        mc, se = samples.mean(1), samples.std(1) / math.sqrt(n)
        analytic = expected_logits(net, x, sigma)
    assert ((analytic - mc).abs() < 4 * se).all()


def test_relu_as_a_method_and_view_with_the_batch_size():
    net = MethodReLU()
    x = torch.rand(5, 1, 8, 8)
    head, tail = split_at_first_relu(net)
    torch.testing.assert_close(tail(torch.relu(head(x))), net(x))
    mean, var = head_moments(head, 0.2, x)
    reference = F.conv2d(torch.full((1, 1, 8, 8), 0.04), net.conv.weight**2)
    torch.testing.assert_close(var, reference)
    loss, parts = moment_loss(net, x, torch.tensor([0, 1, 2, 0, 1]), sigma=0.2, alpha=1.0)
    assert torch.isfinite(loss) and parts["logits"].shape == (5, 3)


def test_a_skip_over_the_relu_is_refused_naming_the_node():
    with pytest.raises(ValueError, match=r"add in forward, line \d+ reads conv \(Conv2d\)"):
        split_at_first_relu(SkipOverReLU())


def test_a_non_affine_head_is_refused_naming_the_op_and_its_line():
    line = inspect.getsourcelines(TanhHead.forward)[1] + 1
    with pytest.raises(ValueError, match=f"tanh in forward, line {line} is not affine"):
        split_at_first_relu(TanhHead())


def test_a_model_fx_cannot_trace_asks_for_an_explicit_split():
    with pytest.raises(ValueError, match=r"cannot trace DataDependent .*split=\(head, tail\)"):
        split_at_first_relu(DataDependent())


def test_moments_through_all_layers_refuse_a_custom_model():
    with pytest.raises(ValueError, match="nn.Sequential"):
        expected_logits(TinyResNet(), torch.rand(2, 3, 8, 8), 0.1, depth="all")


@pytest.mark.parametrize(
    "name, dataset, shape",
    [("lenet", "mnist", (1, 28, 28)), ("alexnet", "cifar10", (3, 32, 32))]
    + [("resnet20", "cifar10", (3, 32, 32))],
)
def test_traced_split_gives_the_sequential_numbers(name, dataset, shape):
    torch.manual_seed(0)
    net = build_model(name, dataset)
    x, y = torch.rand(4, *shape), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    sequential = moment_loss(net, x, y, 0.3, 1.0)[0]
    net.load_state_dict(state)  # BatchNorm running statistics as before
    traced = moment_loss(net, x, y, 0.3, 1.0, split=trace_split(net))[0]
    assert torch.equal(sequential, traced)


def test_gradcheck_through_a_traced_split_float64():
    torch.manual_seed(0)
    loss = MomentLossOf(TinyResNet(classes=3).double().eval(), torch.tensor([0, 2]), 0.2, 1.5)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    names = ["net.conv1.weight", "net.bn1.weight", "net.layer2.conv1.weight", "net.fc.bias"]
    params = [loss.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def fn(inp, *ps):
        return torch.func.functional_call(loss, dict(zip(names, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)
