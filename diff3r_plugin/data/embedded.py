"""Embedded scenes: textured rooms ray-cast from the photographs that scikit-image ships.

Nothing is downloaded. Each scene is an indoor-like room (the inside of an axis-aligned box:
floor, ceiling, back, front and side walls) with one to three textured boxes standing on the
floor, some rotated about the vertical axis. Every face shows one of the photographs bundled
inside the scikit-image wheel (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ...; see
:data:`PHOTOS`); the grey ones are replicated to RGB and tinted. Images are rendered by **exact
ray casting**: closed-form ray/slab intersection, nearest hit, bilinear texture lookup, and
anti-aliasing by supersampling ``s x s`` rays per pixel. No Gaussian rasterizer is involved, so
the scenes are an independent ground truth for feed-forward 3DGS models and for the test-time
optimization layer.

Conventions (the upstream ones, see ``UPSTREAM.md`` section 2):

* ``extrinsics``: camera-to-world 4x4, OpenCV axes (+x right, +y down, +z forward).
* ``intrinsics``: normalized 3x3 K (``fx/W``, ``fy/H``, ``cx = cy = 0.5``), square pixels.
* ``images``: float32 ``[3, H, W]`` in ``[0, 1]``; pixel ``(i, j)`` has its centre at the
  normalized coordinate ``((i + 0.5) / W, (j + 0.5) / H)``.
* ``depths``: the z coordinate, in the camera frame, of the surface hit by the ray through the
  pixel centre (not the ray length).
* The world frame has +y pointing down (gravity), like an upright OpenCV camera.

Cameras follow a RealEstate10K-like walk: a smooth forward or sideways path of 0.8 to 1.8 units
with small yaw, pitch and roll changes, and a horizontal field of view of 50 to 65 degrees.
Visible depths lie between about 1.4 and 10.5 units (200 seeds checked). ``near`` is 0.5
(lowered if a surface were ever closer) and ``far`` is 1.1 times the largest depth in the view,
so ``[near, far]`` bounds what each view sees.

Seeds and splits: a scene is a pure function of its seed (layout, textures, trajectory), and the
layout does not depend on ``num_views`` or ``image_shape`` (more views sample the same path more
densely). Training scenes use seeds in ``[0, 10000)`` (:data:`TRAIN_SEEDS`); held-out evaluation
scenes use seeds ``>= 10000`` (:data:`HELD_OUT_SEED_START`). :meth:`EmbeddedDataset.held_out`
builds the held-out set, and a dataset whose seeds straddle the boundary is refused.

Example:
    >>> scene = make_scene(seed=0, num_views=8, image_shape=(64, 64))
    >>> batch = make_example(scene, context=(0, 7), target=(2, 5))
    >>> loader = torch.utils.data.DataLoader(EmbeddedDataset(100), batch_size=4,
    ...                                      collate_fn=collate)
"""

import functools
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from jaxtyping import Float, Int64
from torch import Tensor

from ..errors import DataError, ShapeError

__all__ = [
    "TRAIN_SEEDS",
    "HELD_OUT_SEED_START",
    "PHOTOS",
    "Box",
    "SceneLayout",
    "EmbeddedScene",
    "SceneIndexError",
    "load_textures",
    "make_scene",
    "make_example",
    "collate",
    "EmbeddedDataset",
    "save_preview",
]

#: Seeds of training scenes.
TRAIN_SEEDS = range(0, 10000)
#: First seed of the held-out evaluation scenes (all seeds ``>= 10000`` are held out).
HELD_OUT_SEED_START = 10000

# Photographs stored inside the scikit-image wheel itself. The others in ``skimage.data``
# (``kidney``, ``lily``, ``skin``, ``eagle``, ``brain``, ``cells3d``, ...) need a pooch download
# and are deliberately left out so that scenes build offline. ``cat`` is left out too: it is
# the same photograph as ``chelsea``.
_COLOR_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
    "hubble_deep_field", "retina",
)
_GRAY_PHOTOS = (
    "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell", "page", "text",
)
#: All photographs a scene may use, in a fixed order (the order is part of a seed's meaning).
PHOTOS: Tuple[str, ...] = _COLOR_PHOTOS + _GRAY_PHOTOS

# Layout constants (world units). The camera walks in z <= ~2.3 and boxes start at z >= 3.2,
# so no surface comes closer than ~0.9 units to any camera.
_NEAR = 0.5
_FAR_MARGIN = 1.1
_BOX_MIN_Z = 3.2
_WALL_CLEARANCE = 1.3


class SceneIndexError(DataError, IndexError):
    """A view or scene index is out of range.

    Derives from ``IndexError`` too, so that Python's sequence protocol and ``DataLoader``
    samplers treat it as the end of the data.
    """


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A box rotated about the vertical (y) axis, textured on each face.

    Attributes:
        center: World position of the centre, shape ``(3,)``.
        half: Half extents along the box's local x, y, z axes, shape ``(3,)``.
        yaw: Rotation about world +y in radians (local-to-world is ``R_y(yaw)``).
        inside: True for the room (seen from inside), False for an object (seen from outside).
        photos: Photo name per face, ordered ``(-x, +x, -y, +y, -z, +z)`` in the local frame.
        gains: RGB multiplier per face, shape ``(6, 3)``: Lambert shading times a tint.
    """

    center: Tuple[float, float, float]
    half: Tuple[float, float, float]
    yaw: float
    inside: bool
    photos: Tuple[str, ...]
    gains: Tuple[Tuple[float, float, float], ...]


@dataclass(frozen=True)
class SceneLayout:
    """Geometry and camera path of one scene, before any rendering.

    Attributes:
        room: The room, a :class:`Box` with ``inside=True``.
        objects: One to three object boxes standing on the floor.
        hfov: Horizontal field of view in radians.
        path: Parameters of the walk (start, heading, length, bend and bob, yaw/pitch/roll
            schedule), turned into poses by :func:`_camera_poses`.
    """

    room: Box
    objects: Tuple[Box, ...]
    hfov: float
    path: Dict[str, float] = field(default_factory=dict)

    @property
    def boxes(self) -> Tuple[Box, ...]:
        """The room followed by the objects (the order used for material ids)."""
        return (self.room,) + self.objects


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    # Positive yaw turns +z (forward) toward +x (right) in a y-down world.
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _face_normals(yaw: float, inside: bool) -> np.ndarray:
    """World-space normals facing the viewer, shape ``(6, 3)``, faces ordered like ``photos``."""
    normals = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = np.zeros(3)
            # The outward normal of face (axis, sign) is sign*e_axis; a room is seen from inside.
            n[axis] = -sign if inside else sign
            normals.append(_rot_y(yaw) @ n)
    return np.stack(normals)


def _face_gains(rng: np.random.Generator, yaw: float, inside: bool, photos: Sequence[str],
                light: np.ndarray) -> Tuple[Tuple[float, float, float], ...]:
    # View-independent (Lambertian) shading keeps the scene multi-view consistent while still
    # giving faces of different orientation different brightness, a real 3D cue.
    shade = 0.55 + 0.45 * np.clip(_face_normals(yaw, inside) @ light, 0.0, None)
    gains = []
    for k, name in enumerate(photos):
        tint = np.ones(3)
        if name in _GRAY_PHOTOS:
            tint = rng.uniform(0.6, 1.0, size=3)
            tint = tint / tint.max()
        gains.append(tuple(float(g) for g in shade[k] * tint))
    return tuple(gains)


def _sample_layout(seed: int) -> SceneLayout:
    """Draw room, objects, textures and camera path from ``seed`` (numpy PCG64, portable)."""
    rng = np.random.default_rng([seed, 0x3D5CE7E])
    light = np.array([rng.uniform(-0.6, 0.6), -1.0, rng.uniform(-0.9, -0.2)])
    light /= np.linalg.norm(light)

    # Room: the camera starts near the origin at eye height; +y is down, so the floor is at
    # y = eye height and the ceiling at a negative y.
    eye = rng.uniform(1.3, 1.7)
    height = rng.uniform(2.6, 3.2)
    width = rng.uniform(5.5, 7.5)
    x_mid = rng.uniform(-0.5, 0.5)
    z_back = rng.uniform(7.5, 9.5)
    z_front = -rng.uniform(2.0, 3.0)
    floor_y = eye
    room_half = (width / 2, height / 2, (z_back - z_front) / 2)
    room_center = (x_mid, eye - height / 2, (z_back + z_front) / 2)
    order = rng.permutation(len(PHOTOS))
    room_photos = tuple(PHOTOS[i] for i in order[:6])
    room = Box(room_center, room_half, 0.0, True, room_photos,
               _face_gains(rng, 0.0, True, room_photos, light))

    # Objects: prefer photos not already on the walls so that boxes stand out.
    remaining = [PHOTOS[i] for i in order[6:]]
    objects: List[Box] = []
    placed: List[Tuple[float, float, float]] = []  # (x, z, bounding radius)
    x_lo, x_hi = x_mid - width / 2, x_mid + width / 2
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            half = (rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.9), rng.uniform(0.3, 0.8))
            yaw = 0.0 if rng.uniform() < 0.3 else rng.uniform(-math.pi / 4, math.pi / 4)
            radius = math.hypot(half[0], half[2])
            x_range = (x_lo + 0.2 + radius, x_hi - 0.2 - radius)
            z_range = (_BOX_MIN_Z + radius, z_back - 0.2 - radius)
            if x_range[0] >= x_range[1] or z_range[0] >= z_range[1]:
                continue
            x = rng.uniform(*x_range)
            z = rng.uniform(*z_range)
            if all(math.hypot(x - px, z - pz) > radius + pr + 0.1 for px, pz, pr in placed):
                break
        else:
            continue  # no free spot: fewer objects, still deterministic
        placed.append((x, z, radius))
        picks = rng.choice(len(remaining), size=6, replace=False)
        photos = tuple(remaining[i] for i in picks)
        objects.append(Box((x, floor_y - half[1], z), half, yaw, False, photos,
                           _face_gains(rng, yaw, False, photos, light)))

    # Camera walk, RealEstate10K-like: mostly forward, sometimes sideways (a truck shot).
    hfov = math.radians(rng.uniform(50.0, 65.0))
    start = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.1, 0.1), rng.uniform(-0.5, 0.5)])
    yaw0 = math.radians(rng.uniform(-20.0, 20.0))
    if rng.uniform() < 0.6:
        heading = yaw0 + math.radians(rng.uniform(-25.0, 25.0))
    else:
        heading = yaw0 + math.copysign(math.radians(rng.uniform(60.0, 95.0)), rng.uniform(-1, 1))
    length = rng.uniform(0.8, 1.8)
    path = {
        "x0": float(start[0]), "y0": float(start[1]), "z0": float(start[2]),
        "heading": heading, "length": length,
        "bend": rng.uniform(-0.15, 0.15),
        "bob": rng.uniform(0.0, 0.03),
        "yaw0": yaw0, "dyaw": math.radians(rng.uniform(-15.0, 15.0)),
        "wobble": math.radians(rng.uniform(-2.0, 2.0)),
        # Positive pitch looks down: RE10K cameras are mostly level or tilted slightly down.
        "pitch0": math.radians(rng.uniform(-4.0, 12.0)),
        "dpitch": math.radians(rng.uniform(-4.0, 4.0)),
        "roll": math.radians(rng.uniform(-1.5, 1.5)),
    }
    # Shorten the walk until it keeps clear of the side walls and the objects.
    for _ in range(12):
        centers = _camera_centers(path, np.linspace(0.0, 1.0, 33))
        if (centers[:, 0].min() > x_lo + _WALL_CLEARANCE
                and centers[:, 0].max() < x_hi - _WALL_CLEARANCE
                and centers[:, 2].max() < _BOX_MIN_Z - 0.9
                and centers[:, 2].min() > z_front + _WALL_CLEARANCE):
            break
        path["length"] *= 0.7
    return SceneLayout(room, tuple(objects), hfov, path)


def _camera_centers(path: Dict[str, float], times: np.ndarray) -> np.ndarray:
    direction = np.array([math.sin(path["heading"]), 0.0, math.cos(path["heading"])])
    side = np.array([direction[2], 0.0, -direction[0]])
    start = np.array([path["x0"], path["y0"], path["z0"]])
    t = times[:, None]
    # A gentle arc plus a small vertical bob, like a handheld walk-through.
    return (start + path["length"] * t * direction
            + path["bend"] * path["length"] * np.sin(math.pi * t) * side
            + path["bob"] * np.sin(2 * math.pi * t) * np.array([0.0, 1.0, 0.0]))


def _camera_poses(path: Dict[str, float], num_views: int) -> np.ndarray:
    """Camera-to-world matrices (OpenCV axes) at ``num_views`` evenly spaced path times."""
    times = np.linspace(0.0, 1.0, num_views) if num_views > 1 else np.zeros(1)
    centers = _camera_centers(path, times)
    poses = np.tile(np.eye(4), (num_views, 1, 1))
    for i, t in enumerate(times):
        yaw = path["yaw0"] + path["dyaw"] * t + path["wobble"] * math.sin(math.pi * t)
        pitch = path["pitch0"] + path["dpitch"] * t
        # Columns are the camera axes in the world; R_x(-pitch) tilts forward toward +y (down).
        poses[i, :3, :3] = _rot_y(yaw) @ _rot_x(-pitch) @ _rot_z(path["roll"])
        poses[i, :3, 3] = centers[i]
    return poses


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
    rows = torch.arange(h, dtype=torch.float32)
    cols = torch.arange(w, dtype=torch.float32)
    x = (cols[None, None, :] + offsets[:, None, None, 0]) / w  # [s, 1, w]
    y = (rows[None, :, None] + offsets[:, None, None, 1]) / h  # [s, h, 1]
    x, y = torch.broadcast_tensors(x, y)
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddedScene:
    """One ray-cast scene: all views of a camera walk through a textured room.

    Attributes:
        key: Scene name, ``"embedded_<seed>"``.
        images: Float32 colours in ``[0, 1]``.
        extrinsics: Camera-to-world, OpenCV axes.
        intrinsics: Normalized K, ``cx = cy = 0.5``.
        near: Per-view near plane (lower bound on every visible depth).
        far: Per-view far plane (upper bound on every visible depth).
        depths: Ground-truth camera-frame z of the surface through each pixel centre.
        seed: The seed the scene was built from, if any.
        layout: The geometry that was ray-cast, if known (for checks and debugging).
    """

    key: str
    images: Float[Tensor, "view 3 height width"]
    extrinsics: Float[Tensor, "view 4 4"]
    intrinsics: Float[Tensor, "view 3 3"]
    near: Float[Tensor, " view"]
    far: Float[Tensor, " view"]
    depths: Float[Tensor, "view height width"]
    seed: Optional[int] = None
    layout: Optional[SceneLayout] = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ShapeError(f"{self.key}: images must be [N, 3, H, W], "
                             f"got {tuple(self.images.shape)}")
        n, _, h, w = self.images.shape
        expected = {
            "extrinsics": (n, 4, 4), "intrinsics": (n, 3, 3), "near": (n,), "far": (n,),
            "depths": (n, h, w),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ShapeError(f"{self.key}: {name} must have shape {shape} to match images "
                                 f"{tuple(self.images.shape)}, got {got}")

    @property
    def num_views(self) -> int:
        """Number of views ``N``."""
        return self.images.shape[0]

    @property
    def image_shape(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.images.shape[-2:])


def _check_image_shape(image_shape: Any) -> Tuple[int, int]:
    try:
        h, w = (operator.index(s) for s in image_shape)
    except (TypeError, ValueError) as error:
        raise ShapeError(f"image_shape must be two integers (H, W), got {image_shape!r}") \
            from error
    if h < 1 or w < 1:
        raise ShapeError(f"image_shape must be positive, got {(h, w)}")
    return h, w


def make_scene(
    seed: int,
    num_views: int = 8,
    image_shape: Tuple[int, int] = (64, 64),
    supersample: int = 2,
) -> EmbeddedScene:
    """Ray-cast one scene; a pure function of its arguments.

    Args:
        seed: Scene seed, ``>= 0``. Seeds ``< 10000`` are training scenes, seeds ``>= 10000``
            held-out evaluation scenes (see the module docstring).
        num_views: Number of views along the camera walk, evenly spaced in path time.
        image_shape: ``(H, W)`` in pixels.
        supersample: ``s`` for ``s x s`` rays per pixel (anti-aliasing); 1 disables it.

    Returns:
        The scene, with ground-truth depth.

    Raises:
        DataError: ``seed`` is negative or not an integer, or a photo cannot be loaded.
        ShapeError: ``num_views``, ``image_shape`` or ``supersample`` is not a positive integer.
    """
    try:
        seed = operator.index(seed)
    except TypeError as error:
        raise DataError(f"seed must be an integer, got {seed!r}") from error
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    h, w = _check_image_shape(image_shape)
    for name, value in (("num_views", num_views), ("supersample", supersample)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    num_views, supersample = int(num_views), int(supersample)

    layout = _sample_layout(seed)
    extrinsics = torch.tensor(_camera_poses(layout.path, num_views), dtype=torch.float32)
    # Square pixels: the focal length in pixels is shared, so fy/H = fx/W * W/H.
    fx = 0.5 / math.tan(layout.hfov / 2)
    k = torch.tensor([[fx, 0.0, 0.5], [0.0, fx * w / h, 0.5], [0.0, 0.0, 1.0]])
    intrinsics = k.expand(num_views, 3, 3).clone()

    caster = _Caster(layout, _texture_size((h, w), supersample))
    grid = (torch.arange(supersample, dtype=torch.float32) + 0.5) / supersample
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2)
    origins, directions = _pixel_rays(extrinsics, intrinsics, (h, w), offsets)
    _, colour = caster.cast(origins, directions, shade=True)
    images = colour.reshape(num_views, h, w, supersample ** 2, 3).mean(dim=3)
    images = images.permute(0, 3, 1, 2).contiguous()

    # Depth is defined at the pixel centre, a ray that an even supersampling grid never casts.
    origins, directions = _pixel_rays(extrinsics, intrinsics, (h, w),
                                      torch.tensor([[0.5, 0.5]]))
    depth, _ = caster.cast(origins, directions, shade=False)
    depths = depth.reshape(num_views, h, w)
    if not bool(torch.isfinite(depths).all()):
        raise DataError(f"scene {seed}: a ray left the room; the layout sampler is broken")

    flat = depths.reshape(num_views, -1)
    near = torch.minimum(torch.full((num_views,), _NEAR), 0.9 * flat.min(dim=1).values)
    far = _FAR_MARGIN * flat.max(dim=1).values
    return EmbeddedScene(
        key=f"embedded_{seed:06d}", images=images, extrinsics=extrinsics,
        intrinsics=intrinsics, near=near, far=far, depths=depths, seed=seed, layout=layout,
    )


def _check_indices(name: str, indices: Any, num_views: int, key: str) -> List[int]:
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise DataError(f"{key}: {name} indices must be a sequence of ints, got {indices!r}")
    out = []
    for i in indices:
        if isinstance(i, bool):
            raise DataError(f"{key}: {name} index {i!r} is not an integer")
        try:
            i = operator.index(i)
        except TypeError as error:
            raise DataError(f"{key}: {name} index {i!r} is not an integer") from error
        if not 0 <= i < num_views:
            raise SceneIndexError(f"{key}: {name} index {i} is out of range [0, {num_views})")
        out.append(i)
    if not out:
        raise DataError(f"{key}: {name} indices are empty")
    return out


def _views(scene: EmbeddedScene, indices: List[int]) -> Dict[str, Tensor]:
    index = torch.tensor(indices, dtype=torch.int64)
    return {
        "extrinsics": scene.extrinsics[index][None],
        "intrinsics": scene.intrinsics[index][None],
        "image": scene.images[index][None],
        "near": scene.near[index][None],
        "far": scene.far[index][None],
        "index": index[None],
    }


def make_example(scene: EmbeddedScene, context: Tuple[int, ...],
                 target: Tuple[int, ...]) -> Dict[str, Any]:
    """Cut an upstream-shaped ``BatchedExample`` (batch size 1) out of a scene.

    Args:
        scene: The scene.
        context: Context view indices (distinct).
        target: Target view indices (may repeat or overlap the context).

    Returns:
        ``{"context": views, "target": views, "scene": [key]}`` where ``views`` holds
        ``extrinsics [1, v, 4, 4]``, ``intrinsics [1, v, 3, 3]``, ``image [1, v, 3, h, w]``,
        ``near [1, v]``, ``far [1, v]`` and ``index [1, v]`` (int64).

    Raises:
        DataError: Indices are empty, not integers, out of range (:class:`SceneIndexError`)
            or the context repeats a view.
    """
    ctx = _check_indices("context", context, scene.num_views, scene.key)
    tgt = _check_indices("target", target, scene.num_views, scene.key)
    if len(set(ctx)) != len(ctx):
        raise DataError(f"{scene.key}: context indices repeat a view: {ctx}")
    return {"context": _views(scene, ctx), "target": _views(scene, tgt), "scene": [scene.key]}


def collate(examples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Concatenate batched examples along the batch dimension (a ``DataLoader`` collate_fn).

    Args:
        examples: Examples from :func:`make_example` or :class:`EmbeddedDataset` (any batch
            sizes), all with the same numbers of views and image shapes.

    Returns:
        One ``BatchedExample`` whose batch size is the sum of the inputs'.

    Raises:
        DataError: ``examples`` is empty or an example lacks a field.
        ShapeError: Examples disagree on view counts or image shapes.
    """
    examples = list(examples)
    if not examples:
        raise DataError("collate: no examples")
    batch: Dict[str, Any] = {"scene": []}
    for part in ("context", "target"):
        fields = {}
        names = examples[0].get(part, {}).keys() if isinstance(examples[0], dict) else ()
        if not names:
            raise DataError(f"collate: example 0 has no {part!r} views")
        for name in names:
            tensors = []
            for i, example in enumerate(examples):
                try:
                    tensors.append(example[part][name])
                except (KeyError, TypeError) as error:
                    raise DataError(f"collate: example {i} lacks {part}.{name}") from error
            shapes = {tuple(t.shape[1:]) for t in tensors}
            if len(shapes) != 1:
                raise ShapeError(f"collate: {part}.{name} shapes differ across examples: "
                                 f"{sorted(shapes)}")
            fields[name] = torch.cat(tensors, dim=0)
        batch[part] = fields
    for example in examples:
        batch["scene"].extend(example["scene"])
    return batch


class EmbeddedDataset(torch.utils.data.Dataset):
    """Map-style dataset of embedded scenes with RE10K-evaluation-like view choices.

    Item ``i`` is scene ``seed_offset + i`` as a ``BatchedExample`` with batch size 1 (use
    :func:`collate` as the ``DataLoader`` collate_fn for larger batches). Like a RealEstate10K
    evaluation index entry, the context views are a first and a last view some frames apart
    (with any further context views evenly spaced between them) and the targets are distinct
    views strictly between the first and last context view. The choice is a deterministic
    function of the seed.

    Args:
        num_scenes: Number of scenes.
        seed_offset: Seed of item 0. Training sets must stay below 10000; use
            :meth:`held_out` for the evaluation set.
        num_views: Views rendered per scene.
        image_shape: ``(H, W)``.
        num_context: Context views per example.
        num_target: Target views per example.
        supersample: Anti-aliasing rays per pixel side.
        cache: Keep rendered scenes in memory (about 0.2 MB per 64x64 8-view scene).

    Raises:
        DataError: Non-positive counts, a seed range that mixes training and held-out seeds,
            or too few views for the requested context and targets.
    """

    def __init__(
        self,
        num_scenes: int,
        seed_offset: int = 0,
        num_views: int = 8,
        image_shape: Tuple[int, int] = (64, 64),
        num_context: int = 2,
        num_target: int = 2,
        supersample: int = 2,
        cache: bool = False,
    ) -> None:
        if num_scenes < 1 or seed_offset < 0:
            raise DataError(f"need num_scenes >= 1 and seed_offset >= 0, "
                            f"got {num_scenes}, {seed_offset}")
        if seed_offset < HELD_OUT_SEED_START < seed_offset + num_scenes:
            raise DataError(
                f"seeds [{seed_offset}, {seed_offset + num_scenes}) mix training seeds "
                f"(< {HELD_OUT_SEED_START}) and held-out seeds; use EmbeddedDataset.held_out")
        if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
            raise ShapeError(f"supersample must be a positive integer, got {supersample!r}")
        if num_context < 1 or num_target < 1 or num_context + num_target > num_views:
            raise DataError(
                f"cannot pick {num_context} context and {num_target} target views between "
                f"the context views out of {num_views} views")
        self.num_scenes = int(num_scenes)
        self.seed_offset = int(seed_offset)
        self.num_views = int(num_views)
        self.image_shape = _check_image_shape(image_shape)
        self.num_context = int(num_context)
        self.num_target = int(num_target)
        self.supersample = int(supersample)
        self._cache: Optional[Dict[int, EmbeddedScene]] = {} if cache else None

    @classmethod
    def held_out(cls, num_scenes: int, offset: int = 0, **kwargs: Any) -> "EmbeddedDataset":
        """The held-out evaluation set: seeds ``10000 + offset`` onward.

        Args:
            num_scenes: Number of scenes.
            offset: Skip this many held-out seeds.
            **kwargs: Other constructor arguments.
        """
        return cls(num_scenes, seed_offset=HELD_OUT_SEED_START + offset, **kwargs)

    @property
    def split(self) -> str:
        """``"train"`` for seeds below 10000, ``"test"`` for held-out seeds."""
        return "train" if self.seed_offset < HELD_OUT_SEED_START else "test"

    @property
    def seeds(self) -> range:
        """The scene seeds, in item order."""
        return range(self.seed_offset, self.seed_offset + self.num_scenes)

    def __len__(self) -> int:
        return self.num_scenes

    def _seed(self, index: int) -> int:
        try:
            index = operator.index(index)
        except TypeError as error:
            raise DataError(f"dataset index must be an integer, got {index!r}") from error
        if index < 0:
            index += self.num_scenes
        if not 0 <= index < self.num_scenes:
            raise SceneIndexError(f"scene index out of range [0, {self.num_scenes})")
        return self.seed_offset + index

    def view_indices(self, index: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """The ``(context, target)`` view indices of item ``index``."""
        seed = self._seed(index)
        rng = np.random.default_rng([seed, 0x7A46E7])
        n, c, t = self.num_views, self.num_context, self.num_target
        # The context span must leave room for the targets strictly inside it.
        gap = int(rng.integers(t + c - 1, n))
        first = int(rng.integers(0, n - gap))
        if c == 1:
            context = [first]
        else:
            context = [first + round(k * gap / (c - 1)) for k in range(c)]
        inner = [i for i in range(first + 1, first + gap + (c == 1)) if i not in context]
        target = sorted(int(i) for i in rng.choice(inner, size=t, replace=False))
        return tuple(context), tuple(target)

    def scene(self, index: int) -> EmbeddedScene:
        """The full scene behind item ``index``."""
        seed = self._seed(index)
        if self._cache is not None and seed in self._cache:
            return self._cache[seed]
        scene = make_scene(seed, self.num_views, self.image_shape, self.supersample)
        if self._cache is not None:
            self._cache[seed] = scene
        return scene

    def __getitem__(self, index: int) -> Dict[str, Any]:
        context, target = self.view_indices(index)
        return make_example(self.scene(index), context, target)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for i in range(self.num_scenes):
            yield self[i]


def save_preview(scene: EmbeddedScene, path: Union[str, Path], tile: int = 128,
                 max_views: int = 8) -> Path:
    """Write a PNG grid: the views on top, their depth (inverse, grey) below.

    Args:
        scene: The scene.
        path: Output ``.png`` path (parent folders are created).
        tile: Side of each tile in pixels (nearest-neighbour upscaling, to see real pixels).
        max_views: Show at most this many views, evenly spread.

    Returns:
        The path written.
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = scene.num_views
    picks = np.unique(np.linspace(0, n - 1, min(n, max_views)).round().astype(int))
    h, w = scene.image_shape
    scale = max(1, tile // max(h, w))
    disparity = 1.0 / scene.depths[picks]
    lo, hi = disparity.min(), disparity.max()
    disparity = (disparity - lo) / (hi - lo).clamp_min(1e-8)
    rows = [scene.images[picks], disparity[:, None].expand(-1, 3, -1, -1)]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, 2h, k*w]
    array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(array)
    image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    image.save(path)
    return path
