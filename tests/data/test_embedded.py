"""Tests of the embedded, ray-cast scene source (``diff3r_plugin.data.embedded``)."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diff3r_plugin.data.embedded import (
    HELD_OUT_SEED_START,
    PHOTOS,
    EmbeddedDataset,
    EmbeddedScene,
    SceneIndexError,
    collate,
    load_textures,
    make_example,
    make_scene,
    save_preview,
)
from diff3r_plugin.errors import DataError, ShapeError


@pytest.fixture(scope="module")
def scene() -> EmbeddedScene:
    return make_scene(seed=3, num_views=8, image_shape=(64, 64))


def _reproject(scene: EmbeddedScene, a: int, b: int, c2w_b: torch.Tensor = None):
    """Warp view ``b`` into view ``a`` through ``a``'s ground-truth depth.

    Returns the per-pixel mean abs colour error and the mask of pixels that are visible in both
    views (the projected depth matches ``b``'s depth) and away from depth edges.
    """
    h, w = scene.image_shape
    c2w_b = scene.extrinsics[b] if c2w_b is None else c2w_b
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    pixels = torch.stack([xs / w, ys / h, torch.ones_like(xs)], dim=-1)
    cam = (pixels @ torch.linalg.inv(scene.intrinsics[a]).T) * scene.depths[a][..., None]
    world = cam @ scene.extrinsics[a][:3, :3].T + scene.extrinsics[a][:3, 3]
    w2c = torch.linalg.inv(c2w_b)
    cam_b = world @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam_b[..., 2]
    proj = (cam_b / z[..., None]) @ scene.intrinsics[b].T
    grid = (proj[..., :2] * 2 - 1)[None]
    colour = F.grid_sample(scene.images[b][None], grid, align_corners=False)[0]
    # Inverse depth is affine in pixel coordinates on a plane, so bilinear interpolation of it
    # is exact away from edges; across an edge it is wrong and fails the visibility test.
    disparity = F.grid_sample(1 / scene.depths[b][None, None], grid, align_corners=False)[0, 0]
    inside = ((proj[..., 0] > 1 / w) & (proj[..., 0] < 1 - 1 / w)
              & (proj[..., 1] > 1 / h) & (proj[..., 1] < 1 - 1 / h) & (z > 0))
    visible = inside & ((disparity * z - 1).abs() < 0.01)
    # Non-edge pixels of view a: inverse depth has zero second differences on a plane.
    inv = 1 / scene.depths[a]
    dxx = (inv[:, 2:] + inv[:, :-2] - 2 * inv[:, 1:-1]).abs() / inv[:, 1:-1]
    dyy = (inv[2:] + inv[:-2] - 2 * inv[1:-1]).abs() / inv[1:-1]
    planar = torch.zeros(h, w)
    planar[1:-1, 1:-1] = ((dxx[1:-1] < 1e-3) & (dyy[:, 1:-1] < 1e-3)).float()
    planar = -F.max_pool2d(-planar[None, None], 3, 1, 1)[0, 0] > 0.5  # drop edge neighbours
    error = (colour - scene.images[a]).abs().mean(dim=0)
    return error, visible & planar


# ------------------------------------------------------------------------------- determinism


def test_same_seed_is_bitwise_identical():
    a = make_scene(5)
    b = make_scene(5)
    for name in ("images", "extrinsics", "intrinsics", "near", "far", "depths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.key == b.key == "embedded_000005"


def test_different_seeds_differ():
    a, b = make_scene(0), make_scene(1)
    assert (a.images - b.images).abs().mean() > 0.1
    assert (a.extrinsics - b.extrinsics).abs().max() > 0.1
    assert a.layout.room.photos != b.layout.room.photos


def test_layout_does_not_depend_on_view_count_or_resolution():
    # More views sample the same walk more densely: view 0 and the last view coincide.
    a = make_scene(7, num_views=4, image_shape=(32, 48))
    b = make_scene(7, num_views=8, image_shape=(64, 64))
    assert torch.allclose(a.extrinsics[0], b.extrinsics[0])
    assert torch.allclose(a.extrinsics[-1], b.extrinsics[-1])
    assert a.layout == b.layout


# ------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("seed", [0, 3, 10000])
def test_reprojection_through_depth_matches_colours(seed):
    scene = make_scene(seed)
    error, mask = _reproject(scene, 0, 1)
    assert mask.float().mean() > 0.3  # the check covers a good part of the image
    good = error[mask].mean().item()
    assert good < 0.05
    # Same pixels, camera 1 moved 0.3 units sideways and turned 3 degrees: clearly worse.
    wrong = scene.extrinsics[1].clone()
    turn = math.radians(3.0)
    rot = torch.tensor([[math.cos(turn), 0, math.sin(turn)], [0, 1, 0],
                        [-math.sin(turn), 0, math.cos(turn)]], dtype=torch.float32)
    wrong[:3, :3] = wrong[:3, :3] @ rot
    wrong[:3, 3] += wrong[:3, 0] * 0.3
    bad_error, _ = _reproject(scene, 0, 1, wrong)
    bad = bad_error[mask].mean().item()
    assert bad > 3 * good and bad > 0.04, (good, bad)


def test_reprojection_between_far_apart_views(scene):
    error, mask = _reproject(scene, 0, 7)
    assert mask.float().mean() > 0.15
    assert error[mask].mean() < 0.05


def test_depth_points_lie_on_the_geometry(scene):
    h, w = scene.image_shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    pixels = torch.stack([xs / w, ys / h, torch.ones_like(xs)], dim=-1).reshape(-1, 3)
    for v in range(scene.num_views):
        cam = (pixels @ torch.linalg.inv(scene.intrinsics[v]).T).double()
        cam = cam * scene.depths[v].reshape(-1, 1).double()
        c2w = scene.extrinsics[v].double()
        world = cam @ c2w[:3, :3].T + c2w[:3, 3]
        distances = []
        for box in scene.layout.boxes:
            c, s = math.cos(box.yaw), math.sin(box.yaw)
            rot = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
            local = (world - torch.tensor(box.center, dtype=torch.float64)) @ rot
            # Chebyshev box distance: zero on the surface, negative inside.
            sdf = (local.abs() - torch.tensor(box.half, dtype=torch.float64)).amax(dim=-1)
            distances.append(sdf)
            if not box.inside:
                # Nearest hit: no depth point can be inside an object.
                assert sdf.min() > -1e-4
        on_surface = torch.stack(distances).abs().amin(dim=0)
        assert on_surface.max() < 1e-4 * scene.depths[v].max()


def test_depth_is_bounded_by_near_far_and_room_sized(scene):
    for s in (scene, make_scene(10001), make_scene(42)):
        assert torch.all(s.depths > s.near[:, None, None])
        assert torch.all(s.depths < s.far[:, None, None])
        assert torch.all(s.near <= 0.5) and torch.all(s.near > 0)
        assert s.depths.min() > 0.8 and s.depths.max() < 15.0
        assert torch.all(s.far < 16.0) and torch.all(s.far > 4.0)


# ------------------------------------------------------------------------------- cameras


@pytest.mark.parametrize("image_shape", [(64, 64), (48, 80)])
def test_cameras_are_valid(image_shape):
    s = make_scene(11, num_views=6, image_shape=image_shape)
    rot = s.extrinsics[:, :3, :3].double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(6, dtype=torch.float64), atol=1e-5)
    assert torch.equal(s.extrinsics[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(6, 4))
    k = s.intrinsics
    assert torch.all(k[:, 0, 2] == 0.5) and torch.all(k[:, 1, 2] == 0.5)
    assert torch.all(k[:, 0, 1] == 0) and torch.all(k[:, 1, 0] == 0)
    assert torch.equal(k[:, 2], torch.tensor([0.0, 0, 1]).expand(6, 3))
    h, w = image_shape
    # Square pixels and a 50-65 degree horizontal field of view.
    assert torch.allclose(k[:, 0, 0] * w, k[:, 1, 1] * h)
    hfov = torch.rad2deg(2 * torch.atan(0.5 / k[:, 0, 0]))
    assert torch.all(hfov >= 50) and torch.all(hfov <= 65)


def test_trajectory_is_a_smooth_walk(scene):
    centers = scene.extrinsics[:, :3, 3]
    steps = (centers[1:] - centers[:-1]).norm(dim=-1)
    assert steps.min() > 0.02 and steps.max() < 0.4
    # Even spacing in path time: no frame jumps.
    assert steps.max() < 2.0 * steps.min()
    forward = scene.extrinsics[:, :3, 2]
    turn = torch.rad2deg(torch.acos((forward[1:] * forward[:-1]).sum(-1).clamp(-1, 1)))
    assert turn.max() < 6.0
    # Mostly level: the camera's down axis stays close to world +y (gravity).
    down = scene.extrinsics[:, :3, 1]
    assert torch.all(down[:, 1] > math.cos(math.radians(20)))


# -------------------------------------------------------------------------------- images


def test_images_are_textured_and_in_range(scene):
    for s in (scene, make_scene(10002, image_shape=(32, 40), supersample=3)):
        assert s.images.dtype == torch.float32
        assert s.images.min() >= 0 and s.images.max() <= 1
        assert torch.all(s.images.flatten(1).std(dim=1) > 0.05)
        # Real texture, not flat faces: strong local gradients inside faces.
        dx = (s.images[..., 1:] - s.images[..., :-1]).abs().mean()
        assert dx > 0.02


def test_supersampling_antialiases():
    # 2x2 and 3x3 rays per pixel agree far better with each other than with a single ray.
    one, two, three = (make_scene(2, num_views=2, supersample=k).images for k in (1, 2, 3))
    assert (two - three).abs().mean() < 0.6 * (one - three).abs().mean()
    # The depth is cast through the pixel centre regardless of the supersampling.
    assert torch.equal(make_scene(2, num_views=2, supersample=1).depths,
                       make_scene(2, num_views=2, supersample=2).depths)


def test_photos_load_offline():
    textures = load_textures(64)
    assert textures.shape == (len(PHOTOS), 3, 64, 64)
    assert textures.min() >= 0 and textures.max() <= 1
    assert "cat" not in PHOTOS  # same photograph as chelsea


def test_scene_builds_fast():
    load_textures(128)  # one-off photo decoding, cached per process
    make_scene(0)  # warm-up
    # About 0.05 s on an idle 2-core machine; the bound only catches gross regressions, since
    # other jobs on a shared CI machine inflate even CPU time (oversubscribed OpenMP threads).
    start = time.process_time()
    make_scene(1234, num_views=8, image_shape=(64, 64))
    assert time.process_time() - start < 10.0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [
    {"image_shape": (0, 64)}, {"image_shape": (64,)}, {"image_shape": (64, 64, 3)},
    {"image_shape": (64.5, 64)}, {"num_views": 0}, {"supersample": 0}, {"supersample": 1.5},
])
@pytest.mark.user_errors
def test_make_scene_rejects_bad_shapes(kwargs):
    with pytest.raises(ShapeError):
        make_scene(0, **kwargs)


@pytest.mark.user_errors
@pytest.mark.parametrize("seed", [-1, 1.5, "3"])
def test_make_scene_rejects_bad_seeds(seed):
    with pytest.raises(DataError):
        make_scene(seed)


@pytest.mark.user_errors
def test_scene_rejects_inconsistent_tensors(scene):
    with pytest.raises(ShapeError):
        EmbeddedScene("x", scene.images, scene.extrinsics[:3], scene.intrinsics, scene.near,
                      scene.far, scene.depths)
    with pytest.raises(ShapeError):
        EmbeddedScene("x", scene.images[:, :2], scene.extrinsics, scene.intrinsics, scene.near,
                      scene.far, scene.depths)
    with pytest.raises(ShapeError):
        EmbeddedScene("x", scene.images, scene.extrinsics, scene.intrinsics, scene.near,
                      scene.far, scene.depths[..., :-1])


# --------------------------------------------------------------------------- examples


def test_make_example_is_upstream_shaped(scene):
    ex = make_example(scene, context=(0, 7), target=(2, 4, 5))
    assert ex["scene"] == [scene.key]
    for part, v in (("context", 2), ("target", 3)):
        views = ex[part]
        assert views["extrinsics"].shape == (1, v, 4, 4)
        assert views["intrinsics"].shape == (1, v, 3, 3)
        assert views["image"].shape == (1, v, 3, 64, 64)
        assert views["near"].shape == (1, v) and views["far"].shape == (1, v)
        assert views["index"].shape == (1, v) and views["index"].dtype == torch.int64
    assert ex["target"]["index"].tolist() == [[2, 4, 5]]
    assert torch.equal(ex["target"]["image"][0, 1], scene.images[4])
    assert torch.equal(ex["context"]["extrinsics"][0, 1], scene.extrinsics[7])


@pytest.mark.parametrize("context,target,error", [
    ((0, 8), (2,), SceneIndexError), ((-1, 3), (2,), SceneIndexError),
    ((0, 3), (9,), SceneIndexError), ((), (2,), DataError), ((0, 3), (), DataError),
    ((2, 2), (3,), DataError), ((0, 1.0), (3,), DataError), (0, (3,), DataError),
    ((0, True), (3,), DataError),
])
@pytest.mark.user_errors
def test_make_example_rejects_bad_indices(scene, context, target, error):
    with pytest.raises(error):
        make_example(scene, context, target)
    assert issubclass(SceneIndexError, DataError) and issubclass(SceneIndexError, IndexError)


def test_collate_stacks_examples(scene):
    other = make_scene(4)
    batch = collate([make_example(scene, (0, 6), (1, 3)), make_example(other, (1, 7), (2, 5))])
    assert batch["scene"] == [scene.key, other.key]
    assert batch["context"]["image"].shape == (2, 2, 3, 64, 64)
    assert batch["target"]["extrinsics"].shape == (2, 2, 4, 4)
    assert batch["context"]["index"].tolist() == [[0, 6], [1, 7]]
    assert torch.equal(batch["target"]["image"][1, 0], other.images[2])


def test_collate_rejects_mismatches(scene):
    with pytest.raises(DataError):
        collate([])
    with pytest.raises(ShapeError):
        collate([make_example(scene, (0, 6), (1, 3)), make_example(scene, (0, 6), (1, 2, 3))])
    small = make_scene(4, num_views=8, image_shape=(32, 32))
    with pytest.raises(ShapeError):
        collate([make_example(scene, (0, 6), (1, 3)), make_example(small, (0, 6), (1, 3))])


# ---------------------------------------------------------------------------- dataset


def test_dataset_views_are_spread_like_re10k_evaluation():
    ds = EmbeddedDataset(12, num_views=8, image_shape=(32, 32), num_context=2, num_target=3)
    gaps = []
    for i in range(len(ds)):
        context, target = ds.view_indices(i)
        assert len(context) == 2 and len(target) == 3
        assert context[0] < min(target) and max(target) < context[1]
        assert len(set(target)) == 3 and not set(target) & set(context)
        gaps.append(context[1] - context[0])
    assert min(gaps) >= 4 and max(gaps) <= 7 and len(set(gaps)) > 1
    ex = ds[0]
    assert ex["context"]["image"].shape == (1, 2, 3, 32, 32)
    assert ex["scene"] == ["embedded_000000"]
    assert ex["context"]["index"].tolist() == [list(ds.view_indices(0)[0])]


def test_dataset_more_context_views():
    ds = EmbeddedDataset(5, num_views=10, image_shape=(16, 16), num_context=3, num_target=2)
    for i in range(len(ds)):
        context, target = ds.view_indices(i)
        assert list(context) == sorted(set(context))
        assert context[0] < min(target) and max(target) < context[-1]
        assert not set(target) & set(context)


def test_dataset_batches_through_a_dataloader():
    ds = EmbeddedDataset(4, image_shape=(16, 16))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["context"]["image"].shape == (2, 2, 3, 16, 16)
    assert batches[1]["scene"] == ["embedded_000002", "embedded_000003"]
    assert len(list(iter(ds))) == 4


def test_split_convention():
    train = EmbeddedDataset(3, image_shape=(16, 16))
    test = EmbeddedDataset.held_out(3, image_shape=(16, 16))
    assert train.split == "train" and test.split == "test"
    assert list(train.seeds) == [0, 1, 2]
    assert list(test.seeds) == [HELD_OUT_SEED_START + i for i in range(3)]
    assert test[0]["scene"] == [f"embedded_{HELD_OUT_SEED_START:06d}"]
    assert not torch.equal(train[0]["context"]["image"], test[0]["context"]["image"])
    assert list(EmbeddedDataset.held_out(2, offset=5).seeds) == [10005, 10006]
    with pytest.raises(DataError):  # straddles the train / held-out boundary
        EmbeddedDataset(10, seed_offset=HELD_OUT_SEED_START - 5)


@pytest.mark.parametrize("kwargs", [
    {"num_scenes": 0}, {"num_scenes": 2, "seed_offset": -1},
    {"num_scenes": 2, "num_views": 4, "num_context": 2, "num_target": 3},
    {"num_scenes": 2, "num_context": 0}, {"num_scenes": 2, "num_target": 0},
])
def test_dataset_rejects_bad_configuration(kwargs):
    with pytest.raises(DataError):
        EmbeddedDataset(**kwargs)


@pytest.mark.user_errors
def test_dataset_index_errors_and_cache():
    ds = EmbeddedDataset(2, image_shape=(16, 16), cache=True)
    with pytest.raises(SceneIndexError):
        ds[2]
    with pytest.raises(DataError):
        ds["0"]
    assert ds.scene(-1).key == "embedded_000001"
    assert ds.scene(1) is ds.scene(1)


# ---------------------------------------------------------------------------- preview


def test_save_preview_writes_a_png(tmp_path, scene):
    path = save_preview(scene, tmp_path / "sub" / "preview.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        # Two rows (colour, depth) of 8 tiles upscaled 2x from 64 px.
        assert image.size == (8 * 128, 2 * 128)
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    assert array[:128].std() > 0.05
