"""Tests of the pixelSplat-format chunk loader against the real RE10K demo scenes."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diff3r_plugin.data import chunks
from diff3r_plugin.data.chunks import (
    ChunkDataset,
    EvalEntry,
    Scene,
    load_chunk,
    load_evaluation_index,
    make_example,
    write_chunk,
)
from diff3r_plugin.errors import DataError, NonFiniteError, ShapeError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEMO = DATA / "re10k_demo"
PADDED = DATA / "re10k_demo_padded360x640"
EXPECTED_VIEWS = {"5aca87f95a9412c6": 12, "322261824c4a3003": 9, "ffa95c3b40609c76": 12}


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture data {path} is not present (see shared/data/README.md)")
    return path


@pytest.fixture(scope="module")
def demo_scenes() -> list[Scene]:
    return load_chunk(_require(DEMO) / "test" / "000000.torch")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _random_scene(key: str, n: int = 3, h: int = 24, w: int = 32, seed: int = 0) -> Scene:
    g = torch.Generator().manual_seed(seed)
    # Images on the 8-bit grid so that PNG round trips are exact.
    images = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.linalg.det(q)[:, None, None].sign()  # proper rotations
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    c2w[:, :3, :3] = q
    c2w[:, :3, 3] = torch.randn(n, 3, generator=g, dtype=torch.float64) * 3
    k = torch.tensor([[0.9, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1]]).repeat(n, 1, 1)
    k[:, 0, 2] += torch.rand(n, generator=g) * 0.02
    return Scene(key, images, c2w.float(), k, torch.arange(n, dtype=torch.int64) * 1000 + 7, f"u/{key}")


def _png_bytes(h: int, w: int, value: int = 128) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buffer, format="PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _raw_scene(key: str, sizes: list[tuple[int, int]]) -> dict:
    n = len(sizes)
    cameras = torch.zeros(n, 18)
    cameras[:, :4] = torch.tensor([1.0, 1.0, 0.5, 0.5])
    cameras[:, 6:] = torch.eye(4)[:3].reshape(12)
    return {
        "key": key,
        "url": "",
        "timestamps": torch.arange(n),
        "cameras": cameras,
        "images": [_png_bytes(h, w) for h, w in sizes],
    }


# ---------------------------------------------------------------------------------------------
# The real demo chunk
# ---------------------------------------------------------------------------------------------


def test_demo_chunk_scenes_and_cameras(demo_scenes: list[Scene]) -> None:
    assert [s.key for s in demo_scenes] == list(EXPECTED_VIEWS)
    for scene in demo_scenes:
        n = EXPECTED_VIEWS[scene.key]
        meta = json.loads((DEMO / "scenes" / scene.key / "cameras.json").read_text())
        assert scene.url == meta["url"]
        assert scene.images.shape == (n, 3, 256, 256) and scene.images.dtype == torch.float32
        assert 0 <= float(scene.images.min()) and float(scene.images.max()) <= 1
        assert scene.extrinsics.shape == (n, 4, 4) and scene.extrinsics.dtype == torch.float32
        assert scene.timestamps.tolist() == [v["timestamp_us"] for v in meta["views"]]

        k = scene.intrinsics.double()
        torch.testing.assert_close(k[:, 0, 2], torch.full((n,), 0.5, dtype=torch.float64))
        torch.testing.assert_close(k[:, 1, 2], torch.full((n,), 0.5, dtype=torch.float64))
        torch.testing.assert_close(k[:, 2], torch.tensor([0.0, 0, 1], dtype=torch.float64).expand(n, 3))
        k_json = torch.tensor([v["K_pixels"] for v in meta["views"]], dtype=torch.float64)
        torch.testing.assert_close(k[:, :2, :2] * 256, k_json[:, :2, :2], atol=1e-3, rtol=0)

        c2w = scene.extrinsics.double()
        rot = c2w[:, :3, :3]
        torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(n, 3, 3),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.linalg.det(rot), torch.ones(n, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(c2w[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(n, 4))

        w2c_json = torch.tensor([v["w2c_opencv"] for v in meta["views"]], dtype=torch.float64)
        torch.testing.assert_close(c2w, torch.linalg.inv(w2c_json), atol=1e-4, rtol=0)
        c2w_json = torch.tensor([v["c2w_opencv"] for v in meta["views"]], dtype=torch.float64)
        torch.testing.assert_close(c2w, c2w_json, atol=1e-4, rtol=0)


def test_demo_images_match_pngs(demo_scenes: list[Scene]) -> None:
    worst = math.inf
    for scene in demo_scenes:
        pngs = sorted((DEMO / "scenes" / scene.key / "images").glob("*.png"))
        assert len(pngs) == scene.num_views
        for view, png in enumerate(pngs):
            reference = np.asarray(Image.open(png).convert("RGB")).astype(np.float64) / 255
            decoded = scene.images[view].permute(1, 2, 0).double().numpy()
            worst = min(worst, _psnr(decoded, reference))
    # JPEG q95 of these frames: about 43-45 dB (shared/data/README.md).
    assert worst > 40


def test_dataset_accepts_root_and_stage_dir(demo_scenes: list[Scene]) -> None:
    by_root = ChunkDataset(DEMO)
    by_stage = ChunkDataset(DEMO / "test")
    assert by_root.keys() == by_stage.keys() == list(EXPECTED_VIEWS)
    assert len(by_root) == 3 and "322261824c4a3003" in by_root
    assert by_root.index_path == DEMO / "test" / "index.json"
    for reference in demo_scenes:
        scene = by_root[reference.key]
        assert torch.equal(scene.images, reference.images)
        assert torch.equal(scene.extrinsics, reference.extrinsics)
        assert torch.equal(scene.intrinsics, reference.intrinsics)


def test_dataset_over_many_chunks_loads_lazily_and_caches(tmp_path: Path, monkeypatch) -> None:
    scenes = [_random_scene(f"scene{i}", n=2 + i % 3, seed=i) for i in range(6)]
    index = {}
    for c in range(3):
        name = f"{c:06d}.torch"
        write_chunk(tmp_path / "test" / name, scenes[2 * c : 2 * c + 2])
        index.update({s.key: name for s in scenes[2 * c : 2 * c + 2]})
    (tmp_path / "test" / "index.json").write_text(json.dumps(index))

    reads = []
    original = chunks._read_chunk_file
    monkeypatch.setattr(chunks, "_read_chunk_file", lambda path: reads.append(path.name) or original(path))
    dataset = ChunkDataset(tmp_path, stage="test")
    assert reads == []  # nothing is read before a scene is asked for
    for key in ["scene5", "scene4", "scene0", "scene1", "scene0", "scene3"]:
        scene = dataset[key]
        reference = scenes[int(key[-1])]
        assert scene.key == key and scene.num_views == reference.num_views
        assert torch.equal(scene.images, reference.images)
    assert reads == ["000002.torch", "000000.torch", "000001.torch"]


# ---------------------------------------------------------------------------------------------
# Round trips of chunks written by write_chunk
# ---------------------------------------------------------------------------------------------


def test_png_chunk_round_trip_is_exact(tmp_path: Path) -> None:
    written = [_random_scene("a", n=3, seed=1), _random_scene("b", n=5, h=16, w=20, seed=2)]
    path = write_chunk(tmp_path / "chunk.torch", written, image_format="png")
    raw = torch.load(path, weights_only=True)  # what the upstream loaders do
    assert [set(r) for r in raw] == [{"key", "url", "timestamps", "cameras", "images"}] * 2
    assert raw[0]["cameras"].shape == (3, 18) and raw[0]["cameras"].dtype == torch.float32
    assert raw[0]["images"][0].dtype == torch.uint8 and raw[0]["images"][0].ndim == 1

    for original, loaded in zip(written, load_chunk(path)):
        assert loaded.key == original.key and loaded.url == original.url
        assert torch.equal(loaded.images, original.images)
        assert torch.equal(loaded.timestamps, original.timestamps)
        torch.testing.assert_close(loaded.intrinsics, original.intrinsics, atol=1e-7, rtol=0)
        torch.testing.assert_close(loaded.extrinsics, original.extrinsics, atol=1e-5, rtol=0)


def test_jpeg_chunk_round_trip_is_close(tmp_path: Path) -> None:
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2])[None].repeat(2, 1, 1, 1)
    scene = _random_scene("smooth", n=2, h=48, w=64)
    scene.images = smooth
    loaded = load_chunk(write_chunk(tmp_path / "c.torch", [scene], image_format="jpeg"))[0]
    assert _psnr(loaded.images.numpy(), smooth.numpy()) > 35


@pytest.mark.user_errors
def test_write_chunk_rejects_bad_scenes(tmp_path: Path) -> None:
    scene = _random_scene("bad", n=2)
    with pytest.raises(ShapeError, match="'bad'.*extrinsics"):
        write_chunk(tmp_path / "x.torch", [{**scene.__dict__, "extrinsics": scene.extrinsics[:1]}])
    images = scene.images.clone()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'bad'"):
        write_chunk(tmp_path / "x.torch", [{**scene.__dict__, "images": images}])
    with pytest.raises(DataError, match="image_format"):
        write_chunk(tmp_path / "x.torch", [scene], image_format="gif")


# ---------------------------------------------------------------------------------------------
# Bad input: every case is a typed error whose message says what and where
# ---------------------------------------------------------------------------------------------


@pytest.mark.user_errors
def test_corrupt_chunk_file(tmp_path: Path) -> None:
    garbage = tmp_path / "000000.torch"
    garbage.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(DataError, match=r"cannot read chunk file .*000000\.torch.*corrupt"):
        load_chunk(garbage)

    truncated = tmp_path / "000001.torch"
    full = (_require(DEMO) / "test" / "000000.torch").read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"000001\.torch.*corrupt, truncated"):
        load_chunk(truncated)

    with pytest.raises(DataError, match="does not exist"):
        load_chunk(tmp_path / "missing.torch")

    not_a_list = tmp_path / "dict.torch"
    torch.save({"key": "x"}, not_a_list)
    with pytest.raises(DataError, match="expected a list of scene dicts"):
        load_chunk(not_a_list)


def test_missing_key_in_scene(tmp_path: Path) -> None:
    raw = _raw_scene("nocams", [(8, 8)])
    del raw["cameras"]
    torch.save([raw], tmp_path / "c.torch")
    with pytest.raises(DataError, match=r"scene 'nocams' in .*c\.torch: missing key\(s\) 'cameras'"):
        load_chunk(tmp_path / "c.torch")


@pytest.mark.user_errors
def test_undecodable_image_bytes(tmp_path: Path) -> None:
    raw = _raw_scene("badjpeg", [(8, 8), (8, 8)])
    raw["images"][1] = torch.tensor(list(b"\xff\xd8 not really a jpeg"), dtype=torch.uint8)
    torch.save([raw], tmp_path / "c.torch")
    with pytest.raises(DataError, match="scene 'badjpeg'.*image 1.*JPEG/PNG"):
        load_chunk(tmp_path / "c.torch")


def test_images_of_different_sizes_in_a_scene(tmp_path: Path) -> None:
    torch.save([_raw_scene("mixed", [(24, 32), (24, 32), (32, 32)])], tmp_path / "c.torch")
    with pytest.raises(DataError, match=r"scene 'mixed'.*image 0 is 32x24 and image 2 is 32x32"):
        load_chunk(tmp_path / "c.torch")


def test_non_finite_cameras(tmp_path: Path) -> None:
    raw = _raw_scene("nan", [(8, 8)] * 3)
    raw["cameras"][2, 9] = float("nan")
    torch.save([raw], tmp_path / "c.torch")
    with pytest.raises(NonFiniteError, match=r"scene 'nan'.*view\(s\) \[2\]"):
        load_chunk(tmp_path / "c.torch")


def test_index_naming_missing_scene_or_file(tmp_path: Path) -> None:
    write_chunk(tmp_path / "000000.torch", [_random_scene("present", n=2)])
    (tmp_path / "index.json").write_text(
        json.dumps({"present": "000000.torch", "ghost": "000000.torch", "lost": "000007.torch"})
    )
    dataset = ChunkDataset(tmp_path)
    assert dataset["present"].num_views == 2
    with pytest.raises(DataError, match=r"scene 'ghost' to 000000\.torch.*does not contain it.*'present'"):
        dataset["ghost"]
    with pytest.raises(DataError, match=r"scene 'lost' to 000007\.torch.*does not exist"):
        dataset["lost"]
    with pytest.raises(DataError, match=r"scene 'nowhere' is not in .*index\.json \(3 scenes"):
        dataset["nowhere"]


def test_dataset_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ChunkDataset(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no index\.json in .*test"):
        ChunkDataset(tmp_path)
    (tmp_path / "index.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object mapping scene keys"):
        ChunkDataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Evaluation index and upstream-shaped examples
# ---------------------------------------------------------------------------------------------


def test_load_evaluation_index_demo_files() -> None:
    two = load_evaluation_index(_require(DEMO) / "evaluation_index_2ctx.json")
    assert two == {key: EvalEntry((0, 3), (1, 2), None) for key in EXPECTED_VIEWS}
    alternate = load_evaluation_index(DEMO / "evaluation_index_alternate.json")
    assert alternate["322261824c4a3003"] == EvalEntry((0, 2, 4, 6, 8), (1, 3, 5, 7))
    assert alternate["5aca87f95a9412c6"].target == tuple(range(1, 12, 2))


@pytest.mark.user_errors
def test_load_evaluation_index_validates(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps({
        "a": {"context": [0, 5], "target": [1, 2, 3]},
        "b": None,
        "c": {"context": [2, 9], "target": [4], "overlap": 0.42},
        "d": {"context": [2, 9], "target": [4], "overlap": "large"},
    }))
    index = load_evaluation_index(path)
    assert index == {
        "a": EvalEntry((0, 5), (1, 2, 3)),
        "b": None,
        "c": EvalEntry((2, 9), (4,), 0.42),
        "d": EvalEntry((2, 9), (4,), "large"),
    }
    bad_cases = {
        '{"s": {"context": [0, "1"], "target": [2]}}': r"scene 's'.*'context' must be a list of integer",
        '{"s": {"context": [0, 1]}}': r"scene 's'.*missing 'target'",
        '{"s": {"context": [0, true], "target": [2]}}': r"'context' must be a list of integer",
        '{"s": {"context": [0, 1], "target": [-2]}}': r"'target' has negative view indices \[-2\]",
        '{"s": {"context": [0, 1], "target": [2], "overlap": [1]}}': "'overlap' must be a number",
        '{"s": [0, 1]}': "expected an object with 'context' and 'target'",
        '[1, 2]': "expected a JSON object",
        '{"s": {': "cannot read evaluation index",
    }
    for text, message in bad_cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            load_evaluation_index(path)
    with pytest.raises(DataError, match="does not exist"):
        load_evaluation_index(tmp_path / "missing.json")


def test_make_example_shapes_and_values(demo_scenes: list[Scene]) -> None:
    scene = demo_scenes[1]
    example = make_example(scene, EvalEntry((0, 3), (1, 2, 8)), near=0.5, far=50.0)
    assert example["scene"] == [scene.key]
    for part, indices in (("context", [0, 3]), ("target", [1, 2, 8])):
        views = example[part]
        v = len(indices)
        assert views["extrinsics"].shape == (1, v, 4, 4)
        assert views["intrinsics"].shape == (1, v, 3, 3)
        assert views["image"].shape == (1, v, 3, 256, 256)
        assert views["index"].dtype == torch.int64 and views["index"].tolist() == [indices]
        assert views["near"].tolist() == [[0.5] * v] and views["far"].tolist() == [[50.0] * v]
        assert torch.equal(views["image"][0], scene.images[indices])
        assert torch.equal(views["extrinsics"][0], scene.extrinsics[indices])
        assert torch.equal(views["intrinsics"][0], scene.intrinsics[indices])
    assert "overlap" not in example["context"]
    with_overlap = make_example(scene, EvalEntry((0, 3), (1,), 0.3))
    torch.testing.assert_close(with_overlap["context"]["overlap"], torch.tensor([[0.3]]))


def test_dataset_make_example_decodes_only_needed_views(demo_scenes: list[Scene]) -> None:
    dataset = ChunkDataset(DEMO)
    entry = EvalEntry((4, 0), (11, 2))
    reference = make_example(demo_scenes[0], entry, image_shape=(64, 64))
    example = dataset.make_example(demo_scenes[0].key, entry, image_shape=(64, 64))
    assert example["scene"] == reference["scene"]
    for part in ("context", "target"):
        assert example[part].keys() == reference[part].keys()
        for name in reference[part]:
            assert torch.equal(example[part][name], reference[part][name]), (part, name)
    assert example["context"]["index"].tolist() == [[4, 0]]


@pytest.mark.user_errors
def test_make_example_out_of_range_index(demo_scenes: list[Scene]) -> None:
    scene = demo_scenes[1]  # 9 views
    message = r"scene '322261824c4a3003': target view index 9 is out of range; the scene has 9 views"
    with pytest.raises(DataError, match=message):
        make_example(scene, EvalEntry((0, 3), (1, 9)))
    with pytest.raises(DataError, match=message):
        ChunkDataset(DEMO).make_example(scene.key, EvalEntry((0, 3), (1, 9)))
    with pytest.raises(DataError, match="context view index -1"):
        make_example(scene, EvalEntry((-1, 3), (1,)))
    with pytest.raises(DataError, match="no evaluation entry"):
        make_example(scene, None)
    with pytest.raises(ShapeError, match="image_shape"):
        make_example(scene, EvalEntry((0,), (1,)), image_shape=(64,))


def test_padded_360x640_cropped_matches_256_variant(demo_scenes: list[Scene]) -> None:
    padded = ChunkDataset(_require(PADDED))
    entry = EvalEntry((0, 3), (1, 2, 5))
    for reference_scene in demo_scenes:
        assert padded[reference_scene.key].image_shape == (360, 640)
        reference = make_example(reference_scene, entry)
        cropped = padded.make_example(reference_scene.key, entry, image_shape=(256, 256))
        for part in ("context", "target"):
            assert cropped[part]["image"].shape == reference[part]["image"].shape
            psnr = _psnr(cropped[part]["image"].numpy(), reference[part]["image"].numpy())
            assert psnr > 30, (reference_scene.key, part, psnr)
            torch.testing.assert_close(cropped[part]["intrinsics"], reference[part]["intrinsics"],
                                       atol=1e-3, rtol=0)
            torch.testing.assert_close(cropped[part]["extrinsics"], reference[part]["extrinsics"],
                                       atol=1e-6, rtol=0)


def test_downscale_to_64_matches_pil_lanczos(demo_scenes: list[Scene]) -> None:
    scene = demo_scenes[2]
    example = make_example(scene, EvalEntry((0, 3), (1,)), image_shape=(64, 64))
    assert example["context"]["image"].shape == (1, 2, 3, 64, 64)
    # A uniform 4x downscale keeps normalized intrinsics unchanged.
    torch.testing.assert_close(example["context"]["intrinsics"][0], scene.intrinsics[[0, 3]])
    pixels = (scene.images[3] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.Resampling.LANCZOS)) / 255.0
    np.testing.assert_allclose(example["context"]["image"][0, 1].permute(1, 2, 0).numpy(), expected,
                               atol=1e-7)


def test_crop_shim_intrinsics_follow_upstream_formula() -> None:
    # 48x80 -> (32, 32): scale 2/3 gives 32x53, crop columns 10..42; fx scales by 53/32.
    scene = _random_scene("wide", n=1, h=48, w=80)
    example = make_example(scene, EvalEntry((0,), (0,)), image_shape=(32, 32))
    k_in, k_out = scene.intrinsics[0], example["context"]["intrinsics"][0, 0]
    torch.testing.assert_close(k_out[0, 0], k_in[0, 0] * 53 / 32)
    torch.testing.assert_close(k_out[1, 1], k_in[1, 1] * 32 / 32)
    torch.testing.assert_close(k_out[:, 2], k_in[:, 2])
    pixels = (scene.images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    scaled = np.asarray(Image.fromarray(pixels).resize((53, 32), Image.Resampling.LANCZOS)) / 255.0
    np.testing.assert_allclose(example["context"]["image"][0, 0].permute(1, 2, 0).numpy(),
                               scaled[:, 10:42], atol=1e-7)
