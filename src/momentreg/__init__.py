"""momentreg: train classifiers that stay correct under additive Gaussian input noise, by an
analytic moment regularizer, and measure how robust they are."""

__version__ = "0.1.0"  # first: modules that record it import it from here

from momentreg.data import load_dataset
from momentreg.models import Normalize, build_model
from momentreg.moments import (
    affine_moments,
    affine_relu_affine_moments,
    relu_mean,
    relu_moments,
)
from momentreg.regularizer import (
    MomentRegularizer,
    expected_logits,
    head_moments,
    head_variance,
    moment_loss,
    split_at_first_relu,
)
from momentreg.robustness import gaussian_robustness
from momentreg.smoothing_losses import (
    analytic_probs,
    consistency_loss,
    expected_softmax,
    macer_loss,
    stability_loss,
)
from momentreg.training import TrainConfig, train

__all__ = [
    "evaluate",
    "load_dataset",
    "gaussian_robustness",
    "train",
    "TrainConfig",
    "Normalize",
    "build_model",
    "affine_moments",
    "affine_relu_affine_moments",
    "relu_mean",
    "relu_moments",
    "MomentRegularizer",
    "expected_logits",
    "head_moments",
    "head_variance",
    "moment_loss",
    "split_at_first_relu",
    "analytic_probs",
    "consistency_loss",
    "expected_softmax",
    "macer_loss",
    "stability_loss",
    "__version__",
]


def __getattr__(name: str):
    """``momentreg.evaluate`` (the robustness card) is imported when first asked for: it draws
    with matplotlib, which a training process need not load."""
    if name == "evaluate":
        from momentreg.card import evaluate

        return evaluate
    raise AttributeError(f"module 'momentreg' has no attribute {name!r}")
