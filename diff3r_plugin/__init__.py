"""diff3r-plugin: Diff3R (uncertainty-aware differentiable test-time optimization) for
feed-forward 3D Gaussian Splatting repositories."""

__version__ = "0.1.0"
