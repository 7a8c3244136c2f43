"""Differentiable Gaussian renderers with the upstream conventions (see :mod:`.common`).

``render(...)`` dispatches to ``backend="torch"`` (pure PyTorch, CPU/CUDA, reverse and forward
mode AD), ``"gsplat"`` (CUDA) or ``"dense"`` (brute-force reference for tests).
"""

from .api import render, render_params
from .common import Projection, RenderOutput, project
from .torch_backend import PairPlan, build_plan, composite

__all__ = ["PairPlan", "Projection", "RenderOutput", "build_plan", "composite", "project",
           "render", "render_params"]
