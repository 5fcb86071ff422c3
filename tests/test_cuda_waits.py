"""On a CUDA device: the hot loops synchronize with the host as often as the CPU-side tests
(tests/helpers.HostReads) say, and no more. torch.cuda's sync debug mode warns at every
synchronizing call, including those inside an op (CUDA's bincount reads its largest value back;
on the CPU nothing shows it). Skipped without a CUDA device."""

import contextlib
import warnings

import pytest
import torch

from momentreg.core.regularizer import check_regularizable
from momentreg.evaluation.certify import certify_images
from momentreg.evaluation.robustness import gaussian_robustness
from momentreg.training.loop import TrainConfig, TrainState, _train_step, _validate
from momentreg.training.methods import ANALYTIC
from tests.helpers import step_cases, tiny_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def cuda_syncs():
    """The warnings of torch.cuda's sync debug mode inside the block: one per synchronization."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _net():
    torch.manual_seed(0)
    return tiny_net().to(CUDA)


@pytest.mark.parametrize("method, depth, samples", step_cases())
def test_a_cuda_training_step_synchronizes_once(method, depth, samples):
    net = _net()
    cfg = TrainConfig.from_flat(
        dict(method=method, sigma=0.5, alpha=1.0, moment_depth=depth, folds=2, samples=samples)
    )
    state = TrainState.start(net, cfg, CUDA)
    split = check_regularizable(net, depth) if method in ANALYTIC else None
    x = torch.rand(8, 1, 28, 28, device=CUDA)
    y, noisy = torch.arange(8, device=CUDA) % 10, torch.arange(8, device=CUDA) % 2 == 0
    _train_step(state, x, y, noisy, cfg, split)  # the optimizer's state, compiled kernels
    with cuda_syncs() as syncs:
        _train_step(state, x, y, noisy, cfg, split)
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the loss read back


def test_cuda_validation_gnr_and_certify_synchronize_once_per_result():
    net = _net()
    images = (torch.rand(40, 1, 28, 28, device=CUDA) * 255).to(torch.uint8)
    labels = torch.arange(40, device=CUDA) % 10
    with cuda_syncs() as syncs:
        _validate(net, images, labels, 8, CUDA)  # 5 batches
    assert len(syncs) == 1
    floats = images.float() / 255
    levels = torch.linspace(0, 0.2, 4, dtype=torch.float64)
    with cuda_syncs() as syncs:
        gaussian_robustness(net, floats, sigmas=levels, batch_size=8, device=CUDA)  # 5 batches
    assert len(syncs) == 1  # the counts, once
    host_labels = labels[:3].cpu()
    with cuda_syncs() as syncs:
        certify_images(net, floats[:3], host_labels, 0.25, n0=10, n=2_000, batch=500)
    assert len(syncs) == 1  # 3 images x 5 batches, one group
