"""Exact ray casting of an embedded scene layout: textures, ray/box slabs, bilinear lookup.

Each face shows a photograph bundled inside the scikit-image wheel (nothing is downloaded),
pre-filtered with LANCZOS to a texture size matched to the sampling rate. Rays are cast in
closed form (ray/slab intersection, nearest hit) and shaded by a bilinear texture lookup times
the face's Lambert gain; no Gaussian rasterizer is involved.
"""

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from jaxtyping import Float, Int64
from torch import Tensor

from ...errors import DataError
from ...geometry.projection import pixel_centers
from .layout import PHOTOS, SceneLayout, _rot_y

# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_photo(name: str, size: int) -> Tensor:
    import skimage.data
    from PIL import Image

    try:
        array = np.asarray(getattr(skimage.data, name)())
    except Exception as error:  # pooch missing, file absent, renamed in a newer skimage
        raise DataError(f"scikit-image photo {name!r} could not be loaded offline: {error}") \
            from error
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    array = array[..., :3]
    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(np.ascontiguousarray(array[top:top + s, left:left + s]))
    # LANCZOS pre-filters: together with a texture size matched to the sampling rate this is
    # the anti-aliasing of the texture itself; supersampling handles edges and the rest.
    square = square.resize((size, size), Image.LANCZOS)
    texture = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
    return texture.permute(2, 0, 1).contiguous()


def _texture_size(image_shape: Tuple[int, int], supersample: int) -> int:
    samples = supersample * max(image_shape)
    return int(min(512, max(64, 2 ** math.ceil(math.log2(samples)))))


def load_textures(
    size: int = 128, names: Sequence[str] = PHOTOS,
) -> Float[Tensor, "photo 3 size size"]:
    """Load (and cache) photos as square RGB textures.

    Call it once before timing :func:`make_scene`, or in each ``DataLoader`` worker, to pay the
    one-off decoding cost up front.

    Args:
        size: Side length in texels.
        names: Photo names, a subset of :data:`PHOTOS`.

    Returns:
        The textures stacked in the order of ``names``, float32 in ``[0, 1]``.

    Raises:
        DataError: A name is unknown or its photo cannot be loaded offline.
    """
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise DataError(f"unknown photo(s) {unknown}; available: {list(PHOTOS)}")
    return torch.stack([_load_photo(n, int(size)) for n in names])


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------


def _intersect_box(
    origins: Float[Tensor, "ray 3"],
    directions: Float[Tensor, "ray 3"],
    half: Float[Tensor, "3"],
    inside: bool,
) -> Tuple[Float[Tensor, " ray"], Int64[Tensor, " ray"], Float[Tensor, "ray 3"]]:
    """Closed-form ray/box intersection in the box frame (slab method).

    Returns:
        ``t`` (``inf`` where missed), the face id ``2 * axis + (sign > 0)``, the local hit point.
    """
    # Rays parallel to a slab give +-inf slab distances, which is the right limit, as long as
    # we never divide 0 by 0.
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t_lo = (-half - origins) / safe
    t_hi = (half - origins) / safe
    if inside:
        # From inside the room the ray leaves through the nearest exit slab.
        t_exit = torch.maximum(t_lo, t_hi)
        t, axis = t_exit.min(dim=-1)
        positive = torch.gather(directions, 1, axis[:, None])[:, 0] > 0
        hit = t > 0
    else:
        t_enter = torch.minimum(t_lo, t_hi)
        t, axis = t_enter.max(dim=-1)
        t_leave = torch.maximum(t_lo, t_hi).min(dim=-1).values
        positive = torch.gather(directions, 1, axis[:, None])[:, 0] < 0
        hit = (t <= t_leave) & (t > 1e-6)
    t = torch.where(hit, t, torch.full_like(t, math.inf))
    points = origins + torch.where(hit, t, torch.zeros_like(t))[:, None] * directions
    return t, 2 * axis + positive.long(), points


def _face_uv(
    points: Float[Tensor, "ray 3"],
    face: Int64[Tensor, " ray"],
    half: Float[Tensor, "3"],
    inside: bool,
) -> Tuple[Float[Tensor, " ray"], Float[Tensor, " ray"]]:
    """Texture coordinates in ``[0, 1]^2`` on the hit face, photos upright and not mirrored."""
    axis = face // 2
    sign = (face % 2).to(points.dtype) * 2 - 1
    # sigma * e_axis is the normal facing the viewer. For a vertical face the image "right"
    # direction is down x forward = e_y x (-sigma e_axis): +sigma e_z for x-faces and
    # -sigma e_x for z-faces; image "down" is world +y.
    sigma = -sign if inside else sign
    hx, hy, hz = half[0], half[1], half[2]
    u_x_face = (sigma * points[:, 2] + hz) / (2 * hz)
    u_z_face = (-sigma * points[:, 0] + hx) / (2 * hx)
    u_y_face = (points[:, 0] + hx) / (2 * hx)
    v_vertical = (points[:, 1] + hy) / (2 * hy)
    v_y_face = (hz - points[:, 2]) / (2 * hz)  # far edge of a floor at the top of the photo
    u = torch.where(axis == 0, u_x_face, torch.where(axis == 2, u_z_face, u_y_face))
    v = torch.where(axis == 1, v_y_face, v_vertical)
    return u.clamp(0.0, 1.0), v.clamp(0.0, 1.0)


def _tile_counts(half: Sequence[float]) -> List[Tuple[int, int]]:
    """Repeat a square photo along the long side of a face so it is not stretched > ~1.5x."""
    counts = []
    for axis in range(3):
        if axis == 0:
            len_u, len_v = half[2], half[1]
        elif axis == 1:
            len_u, len_v = half[0], half[2]
        else:
            len_u, len_v = half[0], half[1]
        ratio = len_u / len_v
        tiles = (max(1, round(ratio)), max(1, round(1.0 / ratio)))
        counts += [tiles, tiles]
    return counts


class _Caster:
    """Tensors of one layout, ready to cast many rays at once."""

    def __init__(self, layout: SceneLayout, texture_size: int) -> None:
        boxes = layout.boxes
        names = sorted({name for box in boxes for name in box.photos}, key=PHOTOS.index)
        self.textures = load_textures(texture_size, names)
        self.size = texture_size
        # [photo * S * S, 3] so that one gather fetches a texel of any photo.
        self.texels = self.textures.permute(0, 2, 3, 1).reshape(-1, 3)
        self.boxes = boxes
        self.rotations = [torch.tensor(_rot_y(b.yaw), dtype=torch.float32) for b in boxes]
        self.centers = [torch.tensor(b.center, dtype=torch.float32) for b in boxes]
        self.halves = [torch.tensor(b.half, dtype=torch.float32) for b in boxes]
        # Material m = 6 * box + face.
        self.photo_index = torch.tensor([names.index(n) for b in boxes for n in b.photos])
        self.gains = torch.tensor([g for b in boxes for g in b.gains], dtype=torch.float32)
        self.tiles = torch.tensor([t for b in boxes for t in _tile_counts(b.half)],
                                  dtype=torch.float32)

    def cast(self, origins: Float[Tensor, "ray 3"], directions: Float[Tensor, "ray 3"],
             shade: bool) -> Tuple[Float[Tensor, " ray"], Optional[Float[Tensor, "ray 3"]]]:
        """Nearest hit ``t`` along (unnormalized) ``directions`` and, if ``shade``, its colour."""
        best_t = torch.full(origins.shape[:1], math.inf)
        best_m = torch.zeros(origins.shape[:1], dtype=torch.long)
        best_u = torch.zeros(origins.shape[:1])
        best_v = torch.zeros(origins.shape[:1])
        for k, box in enumerate(self.boxes):
            rot = self.rotations[k]
            # Row-vector form of R^T (p - c): world to box-local.
            local_o = (origins - self.centers[k]) @ rot
            local_d = directions @ rot
            t, face, points = _intersect_box(local_o, local_d, self.halves[k], box.inside)
            closer = t < best_t
            best_t = torch.where(closer, t, best_t)
            if shade:
                u, v = _face_uv(points, face, self.halves[k], box.inside)
                best_m = torch.where(closer, 6 * k + face, best_m)
                best_u = torch.where(closer, u, best_u)
                best_v = torch.where(closer, v, best_v)
        if not shade:
            return best_t, None
        return best_t, self._lookup(best_m, best_u, best_v)

    def _lookup(self, material: Int64[Tensor, " ray"], u: Float[Tensor, " ray"],
                v: Float[Tensor, " ray"]) -> Float[Tensor, "ray 3"]:
        size = self.size
        tiles = self.tiles[material]
        coords = torch.stack([u, v], dim=-1) * tiles
        # Position inside the tile; the clamp keeps u = 1 on the last tile instead of wrapping.
        coords = coords - torch.minimum(coords.floor(), tiles - 1)
        xy = coords * size - 0.5  # texel centres at (k + 0.5) / size
        xy0 = xy.floor()
        frac = xy - xy0
        xy0 = xy0.long()
        x0 = xy0[:, 0].clamp(0, size - 1)
        x1 = (xy0[:, 0] + 1).clamp(0, size - 1)
        y0 = xy0[:, 1].clamp(0, size - 1)
        y1 = (xy0[:, 1] + 1).clamp(0, size - 1)
        base = self.photo_index[material] * size * size
        fx, fy = frac[:, :1], frac[:, 1:]
        colour = ((1 - fx) * (1 - fy) * self.texels[base + y0 * size + x0]
                  + fx * (1 - fy) * self.texels[base + y0 * size + x1]
                  + (1 - fx) * fy * self.texels[base + y1 * size + x0]
                  + fx * fy * self.texels[base + y1 * size + x1])
        return (colour * self.gains[material]).clamp(0.0, 1.0)


def _pixel_rays(
    extrinsics: Float[Tensor, "view 4 4"],
    intrinsics: Float[Tensor, "view 3 3"],
    image_shape: Tuple[int, int],
    offsets: Float[Tensor, "sample 2"],
) -> Tuple[Float[Tensor, "ray 3"], Float[Tensor, "ray 3"]]:
    """World rays for every (view, row, column, sub-sample), directions with camera z = 1.

    With z = 1 in the camera frame, the ray parameter at a hit *is* the camera-frame depth.
    """
    h, w = image_shape
    xy = torch.stack([pixel_centers(h, w, offset=(ox, oy)) for ox, oy in offsets.tolist()])
    x, y = xy.reshape(-1, h, w, 2).unbind(-1)  # [s, h, w] each
    fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
    cx, cy = intrinsics[:, 0, 2], intrinsics[:, 1, 2]
    dirs = torch.stack([
        (x[None] - cx[:, None, None, None]) / fx[:, None, None, None],
        (y[None] - cy[:, None, None, None]) / fy[:, None, None, None],
        torch.ones((extrinsics.shape[0],) + x.shape),
    ], dim=-1)  # [v, s, h, w, 3]
    # Sub-samples last so that a pixel's rays are contiguous and average with one reshape.
    dirs = dirs.permute(0, 2, 3, 1, 4)  # [v, h, w, s, 3]
    world = torch.einsum("vij,vhwsj->vhwsi", extrinsics[:, :3, :3], dirs)
    origins = extrinsics[:, None, None, None, :3, 3].expand_as(world)
    return origins.reshape(-1, 3), world.reshape(-1, 3)
