import pytest
import torch
from torch import nn

from momentreg.evaluation.robustness import default_sigmas, gaussian_robustness, sphere_noise
from tests.helpers import HostReads


class Constant(nn.Module):
    """Ignores its input: always class 3."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        logits = torch.zeros(len(x), 10, device=x.device) + self.bias
        logits[:, 3] = 1
        return logits


def test_sphere_noise_has_exact_norm_for_every_sample():
    gen = torch.Generator().manual_seed(0)
    for radius in (0.0, 0.3, 5.0, 14.0):
        n = sphere_noise((500, 1, 28, 28), radius, gen)
        assert torch.allclose(n.flatten(1).norm(dim=1), torch.full((500,), radius), atol=1e-4)


def test_noise_added_by_gnr_has_norm_sigma_sqrt_d():
    norms = {}

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.clean = None

        def forward(self, x):
            if self.clean is None:
                self.clean = x.clone()
            else:
                norms.setdefault(len(norms), (x - self.clean).flatten(1).norm(dim=1))
            return torch.zeros(len(x), 2)

    images = torch.rand(7, 3, 4, 4)
    sigmas = torch.tensor([0.0, 0.1, 0.5])
    gaussian_robustness(Recorder(), images, sigmas=sigmas, batch_size=100)
    d = images[0].numel()
    assert torch.allclose(norms[0], torch.full((7,), 0.1 * d**0.5), rtol=1e-5)
    assert torch.allclose(norms[1], torch.full((7,), 0.5 * d**0.5), rtol=1e-5)


def test_gnr_of_a_constant_classifier_is_100():
    gnr, sigmas, consistency = gaussian_robustness(Constant(), torch.rand(50, 1, 28, 28))
    assert gnr == pytest.approx(100.0)
    assert torch.equal(sigmas, default_sigmas()) and len(sigmas) == 30
    assert (consistency == 1).all()


def test_gnr_is_low_for_a_model_that_reads_noise():
    """A random linear classifier on pure-noise images (zero mean, std 0.05): its clean margins
    are of the noise's own size, so small test noise flips it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False))
    images = 0.05 * torch.randn(200, 1, 28, 28)
    gnr, _, consistency = gaussian_robustness(model, images, noise_samples=1)
    assert gnr < 40
    assert consistency[0] == 1 and consistency[-1] < 0.3


def test_gnr_is_seeded_and_more_samples_are_stricter():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    images = torch.rand(300, 3, 4, 4)
    a = gaussian_robustness(model, images, seed=5, batch_size=64)
    b = gaussian_robustness(model, images, seed=5, batch_size=64)
    assert a[0] == b[0] and torch.equal(a[2], b[2])
    strict = gaussian_robustness(model, images, seed=5, noise_samples=8, batch_size=64)
    assert (strict[2] <= a[2] + 0.05).all() and strict[0] < a[0]


def test_gnr_trapezoid_area_on_known_curve():
    """Consistency 1, then 0 from the second level on: area = half of the first interval."""

    class FlipsOnNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.ref = None

        def forward(self, x):
            if self.ref is None:
                self.ref = x
            same = (x - self.ref[: len(x)]).flatten(1).norm(dim=1) < 1e-9
            return torch.stack([same.float(), (~same).float()], 1)

    sigmas = torch.linspace(0, 1, 5)
    gnr, _, consistency = gaussian_robustness(FlipsOnNoise(), torch.rand(4, 1, 2, 2), sigmas)
    assert consistency.tolist() == [1, 0, 0, 0, 0]
    assert gnr == pytest.approx(100 * 0.5 * 0.25)


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_samples"):
        gaussian_robustness(Constant(), torch.rand(2, 1, 2, 2), noise_samples=0)
    with pytest.raises(ValueError, match="sigmas"):
        gaussian_robustness(Constant(), torch.rand(2, 1, 2, 2), sigmas=[0.1])


def test_gnr_waits_for_the_device_no_more_with_more_batches_or_sigmas():
    """The counts stay on the device: the reads (of the sigmas, on the host, and of the final
    counts) are the same for one batch and three levels as for four batches and five."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.rand(20, 1, 4, 4)
    reads = []
    for batch_size, levels in ((20, 3), (6, 5)):
        sigmas = torch.linspace(0, 0.2, levels, dtype=torch.float64)
        with HostReads() as r:
            gaussian_robustness(model, images, sigmas=sigmas, batch_size=batch_size, device="cpu")
        reads.append(r.ops)
    assert reads[0] == reads[1] and reads[0].count("cpu") == 1
