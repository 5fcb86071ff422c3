"""Measuring a trained model: GNR, minimal adversarial perturbations, randomized-smoothing
certification, the noise corruptions, the surrogate's tightness, and the robustness card."""
