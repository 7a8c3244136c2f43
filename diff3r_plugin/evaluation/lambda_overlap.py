"""Where does Λ grow? The ratio of Λ outside and inside the context views' overlap.

The method's qualitative claim: the predicted proximal weights Λ are larger where the context
views do not constrain the scene, in particular where only one of them sees it. With
``seen[v, g]`` true when the mean of Gaussian ``g`` lies in front of context camera ``v``
(depth above ``near``) and projects inside its image,

    ratio = mean{ Λ_g : Σ_v seen[v, g] = 1 } / mean{ Λ_g : seen[v, g] for every v },

with Λ_g the mean of the Gaussian's means-group weights. Occlusion is ignored: "seen" means
"inside the frustum". A ratio above 1 supports the claim.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..geometry.cameras import invert_rigid

__all__ = ["frustum_visibility", "lambda_overlap_ratio"]


def frustum_visibility(
    means: Float[Tensor, "gaussian 3"],
    extrinsics: Float[Tensor, "view 4 4"],
    intrinsics: Float[Tensor, "view 3 3"],
    near: Float[Tensor, "view"] | float = 1e-6,
) -> Bool[Tensor, "view gaussian"]:
    """``seen[v, g]``: mean ``g`` in front of camera ``v`` and inside its normalized image."""
    w2c = invert_rigid(extrinsics)                                   # [v, 4, 4]
    cam = torch.einsum("vij,gj->vgi", w2c[:, :3, :3], means) + w2c[:, None, :3, 3]
    depth = cam[..., 2]
    near_t = torch.as_tensor(near, dtype=means.dtype, device=means.device).reshape(-1, 1)
    in_front = depth > near_t
    uvw = torch.einsum("vij,vgj->vgi", intrinsics, cam)
    uv = uvw[..., :2] / depth.clamp_min(1e-12)[..., None]
    inside = ((uv >= 0) & (uv <= 1)).all(dim=-1)
    return in_front & inside


def lambda_overlap_ratio(
    lam_means: Float[Tensor, "gaussian *xyz"],
    means: Float[Tensor, "gaussian 3"],
    extrinsics: Float[Tensor, "view 4 4"],
    intrinsics: Float[Tensor, "view 3 3"],
    near: Float[Tensor, "view"] | float = 1e-6,
) -> dict:
    """``{"ratio", "one_view", "all_views", "num_one_view", "num_all_views"}`` for one scene.

    ``lam_means`` is the means group of Λ (``[gaussian]`` or ``[gaussian, 3]``). ``ratio`` is
    ``None`` when one of the two sets is empty (then there is nothing to compare).
    """
    if lam_means.ndim == 2:
        lam_means = lam_means.mean(dim=-1)
    if lam_means.shape[0] != means.shape[0]:
        raise ValueError(f"lambda_overlap_ratio: {lam_means.shape[0]} Λ rows for "
                         f"{means.shape[0]} Gaussians")
    seen = frustum_visibility(means, extrinsics, intrinsics, near).sum(dim=0)
    views = extrinsics.shape[0]
    one = seen == 1
    every = seen == views
    lam = lam_means.detach().double()
    one_mean = float(lam[one].mean()) if bool(one.any()) else None
    all_mean = float(lam[every].mean()) if bool(every.any()) else None
    ratio = None if one_mean is None or all_mean is None or views < 2 else one_mean / all_mean
    return {"ratio": ratio, "one_view": one_mean, "all_views": all_mean,
            "num_one_view": int(one.sum()), "num_all_views": int(every.sum())}
