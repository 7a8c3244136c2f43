"""The Diff3R layer: inner solvers, the Hessian operator, implicit (IFT + PCG) and unrolled
backward, diagnostics."""

from .. import forward_ad_setup  # noqa: F401  (quiets torch's jit deprecation warning)
from .diagnostics import BackwardRecord, Diff3RInfo
from .hessian import HessianOperator
from .implicit import implicit_solve
from .layer import Diff3RLayer, check_lambda, diff3r_layer
from .objective import Objective
from .pcg import PCGResult, pcg
from .views import ContextViews

__all__ = ["BackwardRecord", "ContextViews", "Diff3RInfo", "Diff3RLayer", "HessianOperator", "Objective",
           "PCGResult", "check_lambda", "diff3r_layer", "implicit_solve", "pcg"]
