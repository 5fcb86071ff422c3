"""momentreg: train classifiers that stay correct under additive Gaussian input noise, by an
analytic moment regularizer, and measure how robust they are."""

__version__ = "0.1.0"  # first: modules that record it import it from here

from momentreg.core.moments import (
    affine_moments,
    affine_relu_affine_moments,
    relu_mean,
    relu_moments,
)
from momentreg.core.regularizer import (
    MomentRegularizer,
    expected_logits,
    head_moments,
    head_variance,
    moment_loss,
    split_at_first_relu,
)
from momentreg.core.smoothing_losses import (
    analytic_probs,
    consistency_loss,
    expected_softmax,
    macer_loss,
    stability_loss,
)
from momentreg.data.datasets import load_dataset
from momentreg.evaluation.robustness import gaussian_robustness
from momentreg.models.zoo import Normalize, build_model
from momentreg.training.loop import TrainConfig, train

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
        from momentreg.evaluation.card import evaluate

        return evaluate
    raise AttributeError(f"module 'momentreg' has no attribute {name!r}")
