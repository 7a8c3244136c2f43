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

Conventions (those of the upstream repositories, as in :mod:`diff3r_plugin.geometry.cameras`):

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

Modules: :mod:`.layout` (room, boxes and camera walk from a seed), :mod:`.caster` (textures and
exact ray casting), :mod:`.scene` (:func:`make_scene`), :mod:`.dataset` (:func:`make_example`,
:func:`collate`, :class:`EmbeddedDataset`) and :mod:`.preview` (:func:`save_preview`).

Example:
    >>> scene = make_scene(seed=0, num_views=8, image_shape=(64, 64))
    >>> batch = make_example(scene, context=(0, 7), target=(2, 5))
    >>> loader = torch.utils.data.DataLoader(EmbeddedDataset(100), batch_size=4,
    ...                                      collate_fn=collate)
"""

from .caster import load_textures
from .dataset import EmbeddedDataset, SceneIndexError, collate, make_example
from .layout import HELD_OUT_SEED_START, PHOTOS, TRAIN_SEEDS, Box, SceneLayout
from .preview import save_preview
from .scene import EmbeddedScene, make_scene

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
