"""Uncertainty head: per-Gaussian features -> proximal weights Lambda (layout order)."""

from .head import NUM_GAUSSIAN_FEATURES, UncertaintyHead, features_from_gaussians, inverse_softplus

__all__ = ["NUM_GAUSSIAN_FEATURES", "UncertaintyHead", "features_from_gaussians", "inverse_softplus"]
