"""The model zoo (LeNet, AlexNet, ResNet-18, ... shaped per dataset), user factories, and
weights trained elsewhere."""

from momentreg.models.weights import load_weights, sha256_of, with_normalization
from momentreg.models.zoo import DATASETS, MODELS, build_model

__all__ = ["DATASETS", "MODELS", "build_model", "load_weights", "sha256_of", "with_normalization"]
