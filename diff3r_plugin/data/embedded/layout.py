"""Layout sampling of the embedded scenes: room, boxes, face photos and camera walk from a seed.

A layout is a pure function of its seed (numpy PCG64, portable across platforms) and does not
depend on the number of views or the image size: more views sample the same path more densely.
World frame: +y points down (gravity), like an upright OpenCV camera.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

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
