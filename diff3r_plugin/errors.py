"""Typed errors raised by diff3r-plugin.

Every error names the offending input so that a user can fix it without reading the code.
All derive from :class:`Diff3RError`, which itself derives from ``ValueError`` so that code
written against plain ``ValueError`` keeps working.
"""


class Diff3RError(ValueError):
    """Base class of all errors raised by the plugin on bad input or failed solves."""


class ShapeError(Diff3RError):
    """A tensor has the wrong number of dimensions or inconsistent sizes."""


class DTypeError(Diff3RError):
    """A tensor has an unsupported dtype (e.g. integers where floats are needed)."""


class ValueRangeError(Diff3RError):
    """A value lies outside its admissible range (e.g. opacities outside [0, 1], near <= 0)."""


class NonFiniteError(Diff3RError):
    """A tensor contains NaN or Inf."""


class InvalidCovarianceError(Diff3RError):
    """A covariance matrix is not symmetric positive definite."""


class CameraConventionError(Diff3RError):
    """Camera matrices do not follow the expected convention (OpenCV c2w, normalized K)."""


class InvalidLambdaError(Diff3RError):
    """Uncertainty weights (Lambda) are not strictly positive and finite."""


class LayoutMismatchError(Diff3RError):
    """Two parameter vectors do not share the same Gaussian layout."""


class SolverDivergedError(Diff3RError):
    """The inner optimization produced non-finite values and the policy is ``raise``."""


class PCGNotConvergedError(Diff3RError):
    """PCG did not reach its tolerance within maxiter and the policy is ``raise``."""


class DataError(Diff3RError):
    """A dataset file, chunk or evaluation index is malformed or missing."""


class ConfigError(Diff3RError):
    """A configuration key or value is invalid."""


class UnknownAdapterError(Diff3RError, KeyError):
    """No adapter is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(Diff3RError, RuntimeError):
    """A renderer backend cannot be used here (e.g. gsplat without CUDA)."""


class IntegrationError(Diff3RError, RuntimeError):
    """The plugin cannot hook into an upstream program (class not found, Hydra too old, ...)."""
