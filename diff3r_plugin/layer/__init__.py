"""The Diff3R layer: inner solvers, implicit (IFT + PCG) and unrolled backward, diagnostics."""

from .. import forward_ad_setup  # noqa: F401  (quiets torch's jit deprecation warning)
from .diagnostics import Diff3RInfo
from .layer import Diff3RLayer, check_lambda, diff3r_layer, implicit_solve
from .objective import Objective
from .pcg import PCGResult, pcg
from .views import ContextViews

__all__ = ["ContextViews", "Diff3RInfo", "Diff3RLayer", "Objective", "PCGResult", "check_lambda",
           "diff3r_layer", "implicit_solve", "pcg"]
