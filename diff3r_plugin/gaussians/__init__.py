from .layout import (GROUPS, GaussianLayout, GaussianParams, UpstreamExtras, build_covariance,
                     from_upstream, quat_to_rotmat, random_params, rotmat_to_quat, to_upstream)

__all__ = ["GROUPS", "GaussianLayout", "GaussianParams", "UpstreamExtras", "build_covariance",
           "from_upstream", "quat_to_rotmat", "random_params", "rotmat_to_quat", "to_upstream"]
