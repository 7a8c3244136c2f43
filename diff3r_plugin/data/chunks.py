"""pixelSplat/MVSplat ``.torch`` chunks (RealEstate10K, ACID, DL3DV) and evaluation indices.

File format (``src/dataset/dataset_re10k.py`` in pixelSplat, MVSplat, NoPoSplat, DepthSplat):

* ``<root>/<stage>/NNNNNN.torch`` is ``torch.save(list_of_scenes)``; every scene is a dict with
  ``key`` (str), ``url`` (str), ``timestamps`` (int64 ``[N]``), ``cameras`` (float32 ``[N, 18]``)
  and ``images`` (a list of N uint8 1-D tensors holding *encoded* JPEG/PNG bytes).
* ``cameras[n] = [fx, fy, cx, cy, 0, 0, w2c[0, :], w2c[1, :], w2c[2, :]]``: the intrinsics are
  normalized by the width/height of the stored image and ``w2c`` is the row-major 3x4
  **world-to-camera** matrix in OpenCV axes. Like upstream we return its inverse
  (camera-to-world) as ``extrinsics``.
* ``<root>/<stage>/index.json`` maps every scene key to the chunk file that holds it.

Evaluation-index files (``assets/evaluation_index_re10k.json`` upstream) map a scene key to
``{"context": [i, j], "target": [k, ...]}`` (NoPoSplat adds ``"overlap"``) or ``null``.

:func:`make_example` builds the upstream ``BatchedExample`` (batch size 1) and, when asked for
another resolution, applies the upstream crop shim (``src/dataset/shims/crop_shim.py``):
scale with PIL LANCZOS so that both sides cover the target, centre-crop, rescale fx/fy.
"""

import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int64
from PIL import Image
from torch import Tensor

from ..errors import DataError, NonFiniteError, ShapeError
from ..geometry.cameras import check_cameras
from .example import upstream_example, upstream_views

__all__ = [
    "ChunkDataset",
    "EvalEntry",
    "Scene",
    "load_chunk",
    "load_evaluation_index",
    "make_example",
    "write_chunk",
]

# What the upstream loaders actually read; ``url`` and ``timestamps`` are metadata only.
_REQUIRED_KEYS = ("key", "cameras", "images")
_MAX_LISTED = 5


@dataclass
class Scene:
    """One decoded scene of a chunk.

    Attributes:
        key: Scene id (e.g. the RealEstate10K clip id).
        images: ``[N, 3, H, W]`` float32 RGB in ``[0, 1]``.
        extrinsics: ``[N, 4, 4]`` float32 camera-to-world matrices, OpenCV axes.
        intrinsics: ``[N, 3, 3]`` float32 normalized K (row 0 / W, row 1 / H).
        timestamps: ``[N]`` int64 (microseconds into the video for RE10K/ACID).
        url: Source URL ("" when the chunk has none).
    """

    key: str
    images: Float[Tensor, "view 3 height width"]
    extrinsics: Float[Tensor, "view 4 4"]
    intrinsics: Float[Tensor, "view 3 3"]
    timestamps: Int64[Tensor, " view"]
    url: str = ""

    @property
    def num_views(self) -> int:
        """Number of views N."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the stored images."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])


@dataclass(frozen=True)
class EvalEntry:
    """One scene of an evaluation index (upstream ``IndexEntry``).

    Attributes:
        context: Chunk-local indices of the context views.
        target: Chunk-local indices of the target views.
        overlap: NoPoSplat's overlap (a float or a bucket name such as "large"), else None.
    """

    context: tuple[int, ...]
    target: tuple[int, ...]
    overlap: float | str | None = None


# --------------------------------------------------------------------------------------------
# Reading chunks
# --------------------------------------------------------------------------------------------


def _short(text: object, limit: int = 300) -> str:
    # torch.load's unpickling errors can be pages long; the first lines carry the cause.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_chunk_file(path: Path) -> list[dict[str, Any]]:
    """``torch.load`` a chunk and check only what is needed to find scenes in it.

    Per-scene checks happen in :func:`_scene_from_raw`, so one broken scene does not make
    the other scenes of a 100 MB chunk unreadable.
    """
    if not path.is_file():
        raise DataError(f"chunk file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise DataError(
            f"cannot read chunk file {path}: it is corrupt, truncated or not a torch.save file "
            f"({type(exc).__name__}: {_short(exc)})"
        ) from exc
    if not isinstance(data, list):
        raise DataError(
            f"chunk file {path}: expected a list of scene dicts (pixelSplat format), "
            f"got {type(data).__name__}"
        )
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(
                f"chunk file {path}: entry {i} is a {type(item).__name__}, expected a dict with "
                f"keys {', '.join(_REQUIRED_KEYS)}"
            )
        if not isinstance(item.get("key"), str):
            raise DataError(
                f"chunk file {path}: entry {i} has no string 'key' (keys present: "
                f"{sorted(map(str, item))})"
            )
    return data


def _image_size(data: Tensor, where: str) -> tuple[int, int]:
    """``(W, H)`` read from the encoded header only (no decoding)."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return image.size
    except Exception as exc:
        raise DataError(f"{where}: the image bytes are not a readable JPEG/PNG ({_short(exc)})") from exc


def _decode_image(data: Tensor, where: str) -> np.ndarray:
    """Decode encoded bytes to an ``[H, W, 3]`` uint8 array."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise DataError(f"{where}: cannot decode the image bytes ({_short(exc)})") from exc


def _validate_raw(raw: Mapping[str, Any], source: str) -> int:
    """Check one raw scene dict without decoding its images; return its number of views."""
    key = raw["key"]
    where = f"scene '{key}' in {source}"
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {', '.join(repr(m) for m in missing)}; a pixelSplat chunk "
            f"scene needs {', '.join(_REQUIRED_KEYS)} (keys present: {sorted(map(str, raw))})"
        )

    cameras = raw["cameras"]
    if not isinstance(cameras, Tensor) or cameras.ndim != 2 or cameras.shape[1] != 18:
        got = tuple(cameras.shape) if isinstance(cameras, Tensor) else type(cameras).__name__
        raise DataError(f"{where}: 'cameras' must be a float tensor [N, 18], got {got}")
    if not cameras.is_floating_point():
        raise DataError(f"{where}: 'cameras' must be floating point, got {cameras.dtype}")
    n = int(cameras.shape[0])
    if n == 0:
        raise DataError(f"{where}: the scene has no views")
    bad_rows = (~torch.isfinite(cameras).all(dim=1)).nonzero().flatten().tolist()
    if bad_rows:
        raise NonFiniteError(f"{where}: 'cameras' contain NaN or Inf in view(s) {bad_rows[:10]}")

    images = raw["images"]
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = f"{len(images)} entries" if isinstance(images, (list, tuple)) else type(images).__name__
        raise DataError(f"{where}: 'images' must be a list of {n} encoded images (one per camera), got {got}")
    for i, data in enumerate(images):
        if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__
            raise DataError(f"{where}: image {i} must be a 1-D uint8 tensor of encoded bytes, got {got}")

    timestamps = raw.get("timestamps")
    if timestamps is not None and (not isinstance(timestamps, Tensor) or timestamps.numel() != n):
        got = tuple(timestamps.shape) if isinstance(timestamps, Tensor) else type(timestamps).__name__
        raise DataError(f"{where}: 'timestamps' must be a tensor of {n} values, got {got}")
    url = raw.get("url", "")
    if not isinstance(url, str):
        raise DataError(f"{where}: 'url' must be a string, got {type(url).__name__}")

    # Sizes come from the headers, so the check covers every view even when only a few are decoded.
    sizes = [_image_size(data, f"{where}, image {i}") for i, data in enumerate(images)]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise DataError(
                f"{where}: all images of a scene must share one size, but image 0 is "
                f"{sizes[0][0]}x{sizes[0][1]} and image {i} is {size[0]}x{size[1]} (width x height)"
            )
    return n


def _scene_from_raw(raw: Mapping[str, Any], source: str, views: Sequence[int] | None = None) -> Scene:
    """Validate one raw scene dict and decode it (all views, or only ``views``)."""
    n = _validate_raw(raw, source)
    key, images, cameras = raw["key"], raw["images"], raw["cameras"]
    where = f"scene '{key}' in {source}"
    timestamps = raw.get("timestamps")
    if timestamps is None:
        # Hand-made chunks sometimes omit them; view order is then the only time we know.
        timestamps = torch.arange(n, dtype=torch.int64)

    selected = list(range(n)) if views is None else list(views)
    pixels = np.stack([_decode_image(images[i], f"{where}, image {i}") for i in selected])
    image_tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    cams = cameras[selected].double()
    intrinsics = torch.zeros(len(selected), 3, 3, dtype=torch.float64)
    intrinsics[:, 0, 0] = cams[:, 0]
    intrinsics[:, 1, 1] = cams[:, 1]
    intrinsics[:, 0, 2] = cams[:, 2]
    intrinsics[:, 1, 2] = cams[:, 3]
    intrinsics[:, 2, 2] = 1.0
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(selected), 1, 1)
    w2c[:, :3, :] = cams[:, 6:].reshape(-1, 3, 4)
    # Inverting in float64 keeps c2w accurate to float32 rounding even for large translations.
    c2w, info = torch.linalg.inv_ex(w2c)
    singular = [selected[i] for i in (info != 0).nonzero().flatten().tolist()]
    if singular:
        raise DataError(f"{where}: the world-to-camera matrix of view(s) {singular} is singular")
    # A zero focal length or a scaled (non-rigid) w2c decodes without complaint but makes every
    # later projection wrong; reject it here, naming the scene.
    check_cameras(c2w, intrinsics, name=where)

    return Scene(
        key=key,
        images=image_tensor,
        extrinsics=c2w.float(),
        intrinsics=intrinsics.float(),
        timestamps=timestamps.reshape(-1)[selected].to(torch.int64),
        url=raw.get("url", ""),
    )


def load_chunk(path: str | Path) -> list[Scene]:
    """Load and decode every scene of one ``.torch`` chunk.

    Args:
        path: Chunk file, e.g. ``re10k/test/000000.torch``.

    Returns:
        The scenes in file order.

    Raises:
        DataError: The file is missing, corrupt, or a scene is malformed (missing key, images of
            different sizes, undecodable bytes, a singular w2c).
        NonFiniteError: A camera row contains NaN or Inf.
        CameraConventionError: A non-positive focal length, a non-rigid (e.g. scaled) w2c or
            intrinsics in pixel units.
    """
    path = Path(path)
    return [_scene_from_raw(raw, str(path)) for raw in _read_chunk_file(path)]


# --------------------------------------------------------------------------------------------
# Datasets made of many chunks
# --------------------------------------------------------------------------------------------


def _listed(keys: Iterable[str]) -> str:
    keys = list(keys)
    head = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


class ChunkDataset:
    """Random access to the scenes of a pixelSplat-format dataset directory.

    Accepts either the dataset root (``<root>/<stage>/index.json``, as the upstream configs'
    ``dataset.roots``) or a directory that holds the chunks and ``index.json`` directly.
    Chunks are loaded lazily and only the last one is kept in memory (upstream chunks are
    about 100 MB, and evaluation visits scenes chunk by chunk). Images are decoded per scene.

    Args:
        root: Dataset root or stage directory.
        stage: Sub-directory to use when ``root`` is a dataset root ("train" or "test").

    Raises:
        DataError: No ``index.json`` is found, or it is not a ``{key: file}`` JSON object.
    """

    def __init__(self, root: str | Path, stage: str = "test") -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset directory {root} does not exist")
        for directory in (root / stage, root):
            if (directory / "index.json").is_file():
                break
        else:
            raise DataError(
                f"no index.json in {root / stage} or {root}: expected a pixelSplat-format dataset "
                f"(<root>/{stage}/index.json mapping scene keys to NNNNNN.torch chunk files)"
            )
        self.directory: Path = directory
        self.index_path: Path = directory / "index.json"
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {self.index_path}: {_short(exc)}") from exc
        if not isinstance(index, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in index.items()
        ):
            raise DataError(
                f"{self.index_path}: expected a JSON object mapping scene keys to chunk file names "
                '(e.g. {"5aca87f95a9412c6": "000000.torch"})'
            )
        self.index: dict[str, str] = index
        self._cached_path: Path | None = None
        self._cached_scenes: dict[str, Mapping[str, Any]] = {}

    def keys(self) -> list[str]:
        """Scene keys in index order."""
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def chunk_path(self, key: str) -> Path:
        """Chunk file that holds scene ``key`` according to the index."""
        if key not in self.index:
            raise DataError(
                f"scene '{key}' is not in {self.index_path} ({len(self.index)} scenes, e.g. "
                f"{_listed(self.index)})"
            )
        return self.directory / self.index[key]

    def _raw(self, key: str) -> tuple[Mapping[str, Any], str]:
        path = self.chunk_path(key)
        if path != self._cached_path:
            if not path.is_file():
                raise DataError(
                    f"{self.index_path} maps scene '{key}' to {self.index[key]}, but {path} does not exist"
                )
            scenes = _read_chunk_file(path)
            self._cached_scenes = {raw["key"]: raw for raw in scenes}
            self._cached_path = path
        raw = self._cached_scenes.get(key)
        if raw is None:
            raise DataError(
                f"{self.index_path} maps scene '{key}' to {path.name}, but that chunk does not contain "
                f"it (it holds {_listed(self._cached_scenes)})"
            )
        return raw, str(path)

    def __getitem__(self, key: str) -> Scene:
        """Load and decode scene ``key`` (all views)."""
        raw, source = self._raw(key)
        return _scene_from_raw(raw, source)

    def make_example(
        self,
        key: str,
        entry: EvalEntry | None,
        image_shape: tuple[int, int] | None = None,
        near: float = 1.0,
        far: float = 100.0,
    ) -> dict[str, Any]:
        """Like :func:`make_example` on ``self[key]``, but decodes only the views it needs.

        A RE10K test clip has up to ~300 frames; decoding all of them for two context and three
        target views would dominate evaluation time.
        """
        raw, source = self._raw(key)
        entry = _check_entry(key, entry)
        _check_indices(key, entry, _validate_raw(raw, source))
        needed = sorted(set(entry.context) | set(entry.target))
        scene = _scene_from_raw(raw, source, needed)
        position = {view: i for i, view in enumerate(needed)}
        return _build_example(scene, entry, position, image_shape, near, far)


# --------------------------------------------------------------------------------------------
# Evaluation index
# --------------------------------------------------------------------------------------------


def _index_list(value: Any, where: str, field: str) -> tuple[int, ...]:
    # bool is an int subclass; true/false in an index file is a mistake, not view 1/0.
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: '{field}' must be a list of integer view indices, got {value!r}")
    negative = [v for v in value if v < 0]
    if negative:
        raise DataError(f"{where}: '{field}' has negative view indices {negative}")
    return tuple(value)


def load_evaluation_index(path: str | Path) -> dict[str, EvalEntry | None]:
    """Read an upstream evaluation-index JSON file.

    Args:
        path: e.g. ``assets/evaluation_index_re10k.json``.

    Returns:
        ``{scene_key: EvalEntry | None}``; ``None`` marks scenes the upstream index skips.

    Raises:
        DataError: The file is missing, is not JSON, or an entry has the wrong types.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"evaluation index {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read evaluation index {path}: {_short(exc)}") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"evaluation index {path}: expected a JSON object {{scene_key: {{\"context\": [...], "
            f"\"target\": [...]}} | null}}, got a {type(data).__name__}"
        )
    result: dict[str, EvalEntry | None] = {}
    for key, value in data.items():
        where = f"evaluation index {path}, scene '{key}'"
        if value is None:
            result[key] = None
            continue
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected an object with 'context' and 'target' or null, got {value!r}")
        missing = [f for f in ("context", "target") if f not in value]
        if missing:
            raise DataError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
        context = _index_list(value["context"], where, "context")
        target = _index_list(value["target"], where, "target")
        if not context:
            raise DataError(f"{where}: 'context' is empty")
        overlap = value.get("overlap")
        if isinstance(overlap, bool) or not (overlap is None or isinstance(overlap, (int, float, str))):
            raise DataError(f"{where}: 'overlap' must be a number, a string or null, got {overlap!r}")
        if isinstance(overlap, int):
            overlap = float(overlap)
        result[key] = EvalEntry(context=context, target=target, overlap=overlap)
    return result


# --------------------------------------------------------------------------------------------
# Building upstream-shaped examples
# --------------------------------------------------------------------------------------------


def _check_entry(key: str, entry: EvalEntry | None) -> EvalEntry:
    if entry is None:
        raise DataError(f"scene '{key}' has no evaluation entry (null in the index): skip it")
    if not isinstance(entry, EvalEntry):
        raise DataError(f"scene '{key}': expected an EvalEntry, got {type(entry).__name__}")
    return entry


def _check_indices(key: str, entry: EvalEntry, num_views: int) -> None:
    for field in ("context", "target"):
        for index in getattr(entry, field):
            if not 0 <= index < num_views:
                raise DataError(
                    f"scene '{key}': {field} view index {index} is out of range; the scene has "
                    f"{num_views} views (valid indices 0..{num_views - 1})"
                )


def _rescale_and_crop(
    images: Float[Tensor, "view 3 h_in w_in"],
    intrinsics: Float[Tensor, "view 3 3"],
    shape: tuple[int, int],
) -> tuple[Float[Tensor, "view 3 h_out w_out"], Float[Tensor, "view 3 3"]]:
    """Upstream ``rescale_and_crop``: LANCZOS-scale so both sides cover ``shape``, centre-crop.

    Normalized intrinsics keep cx, cy (the crop is centred) and scale fx, fy by
    ``scaled / cropped`` size. Unlike upstream (which asserts), upscaling is allowed.
    """
    *_, h_in, w_in = images.shape
    h_out, w_out = shape
    scale = max(h_out / h_in, w_out / w_in)
    h_scaled, w_scaled = round(h_in * scale), round(w_in * scale)

    # Upstream goes through uint8 with truncation, (x * 255).clip(0, 255).type(uint8); for images
    # decoded from 8-bit files this is exact.
    pixels = (images * 255).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    resized = np.stack(
        [np.asarray(Image.fromarray(p).resize((w_scaled, h_scaled), Image.Resampling.LANCZOS)) for p in pixels]
    )
    scaled = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0

    # Odd size differences shift the crop by half a pixel, exactly as upstream.
    row = (h_scaled - h_out) // 2
    col = (w_scaled - w_out) // 2
    cropped = scaled[..., row : row + h_out, col : col + w_out].contiguous()
    intrinsics = intrinsics.clone()
    intrinsics[..., 0, 0] *= w_scaled / w_out
    intrinsics[..., 1, 1] *= h_scaled / h_out
    return cropped, intrinsics


def _build_example(
    scene: Scene,
    entry: EvalEntry,
    position: Mapping[int, int],
    image_shape: tuple[int, int] | None,
    near: float,
    far: float,
) -> dict[str, Any]:
    if image_shape is not None:
        if (
            len(image_shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_shape)
        ):
            raise ShapeError(f"image_shape must be two positive ints (height, width), got {image_shape!r}")
        image_shape = (int(image_shape[0]), int(image_shape[1]))
    if not (0 < near < far):
        raise DataError(f"need 0 < near < far, got near={near}, far={far}")

    def views(indices: tuple[int, ...]) -> dict[str, Tensor]:
        pos = torch.tensor([position[i] for i in indices], dtype=torch.int64)
        images = scene.images[pos]
        intrinsics = scene.intrinsics[pos]
        if image_shape is not None and image_shape != scene.image_shape:
            images, intrinsics = _rescale_and_crop(images, intrinsics, image_shape)
        v = len(indices)
        return upstream_views(images, scene.extrinsics[pos], intrinsics,
                              torch.full((v,), float(near), dtype=torch.float32),
                              torch.full((v,), float(far), dtype=torch.float32), indices)

    context = views(entry.context)
    if isinstance(entry.overlap, float):
        # NoPoSplat's evaluation reads context["overlap"] as a [batch, 1] tensor.
        context["overlap"] = torch.tensor([[entry.overlap]], dtype=torch.float32)
    return upstream_example(context, views(entry.target), scene.key)


def make_example(
    scene: Scene,
    entry: EvalEntry | None,
    image_shape: tuple[int, int] | None = None,
    near: float = 1.0,
    far: float = 100.0,
) -> dict[str, Any]:
    """Build an upstream ``BatchedExample`` (batch size 1) from a scene and an index entry.

    Args:
        scene: A decoded scene.
        entry: Context/target view indices (chunk-local, as in the upstream index files).
        image_shape: ``(height, width)`` to rescale-and-centre-crop to (upstream crop shim),
            e.g. ``(256, 256)`` for 360x640 frames or ``(64, 64)`` for quick CPU runs; None or
            the stored size keeps the images as they are.
        near: Near plane for every view (RE10K: 1 in MVSplat).
        far: Far plane for every view (RE10K: 100).

    Returns:
        ``{"context": views, "target": views, "scene": [key]}`` where ``views`` has
        ``extrinsics [1, v, 4, 4]`` (c2w), ``intrinsics [1, v, 3, 3]`` (normalized),
        ``image [1, v, 3, h, w]``, ``near [1, v]``, ``far [1, v]``, ``index [1, v]`` (int64),
        plus ``context["overlap"] [1, 1]`` when the entry has a numeric overlap.

    Raises:
        DataError: ``entry`` is None or a view index is out of range.
        ShapeError: ``image_shape`` is not two positive ints.
    """
    entry = _check_entry(scene.key, entry)
    _check_indices(scene.key, entry, scene.num_views)
    identity = {i: i for i in (*entry.context, *entry.target)}
    return _build_example(scene, entry, identity, image_shape, near, far)


# --------------------------------------------------------------------------------------------
# Writing chunks
# --------------------------------------------------------------------------------------------


def _field(scene: Scene | Mapping[str, Any], name: str, default: Any = None) -> Any:
    if isinstance(scene, Mapping):
        return scene.get(name, default)
    return getattr(scene, name, default)


def _to_uint8(images: Tensor, key: str) -> np.ndarray:
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).numpy()
    if not images.is_floating_point():
        raise DataError(f"scene '{key}': images must be uint8 or float in [0, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise NonFiniteError(f"scene '{key}': images contain NaN or Inf")
    # Round (not truncate) so that float images k/255 written and read back are exact.
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_chunk(
    path: str | Path,
    scenes: Iterable[Scene | Mapping[str, Any]],
    image_format: Literal["png", "jpeg"] = "png",
    jpeg_quality: int = 95,
) -> Path:
    """Write scenes as a pixelSplat-format ``.torch`` chunk.

    Args:
        path: Output file (parent directories are created).
        scenes: :class:`Scene` objects or mappings with the same fields (``key``, ``images``
            ``[N, 3, H, W]`` float in [0, 1] or uint8, ``extrinsics`` c2w ``[N, 4, 4]``,
            ``intrinsics`` normalized ``[N, 3, 3]``, optional ``timestamps`` and ``url``).
        image_format: "png" (lossless: round trip is exact) or "jpeg" (as RE10K/ACID).
        jpeg_quality: JPEG quality when ``image_format="jpeg"``.

    Returns:
        The written path. Write ``index.json`` (``{key: file name}``) next to it to use the
        directory with :class:`ChunkDataset` or the upstream loaders.

    Raises:
        ShapeError: Fields have inconsistent shapes.
        NonFiniteError: Images or cameras contain NaN or Inf.
        DataError: Singular extrinsics, and other invalid fields.
        CameraConventionError: Extrinsics that are not rigid camera-to-world matrices, or
            intrinsics that are not normalized with positive focal lengths.
    """
    fmt = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}.get(str(image_format).lower())
    if fmt is None:
        raise DataError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    path = Path(path)
    out = []
    for scene in scenes:
        key = _field(scene, "key")
        if not isinstance(key, str):
            raise DataError(f"every scene needs a string 'key', got {key!r}")
        images = torch.as_tensor(_field(scene, "images"))
        extrinsics = torch.as_tensor(_field(scene, "extrinsics"))
        intrinsics = torch.as_tensor(_field(scene, "intrinsics"))
        if images.ndim != 4 or images.shape[1] != 3:
            raise ShapeError(f"scene '{key}': images must be [N, 3, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        if extrinsics.shape != (n, 4, 4) or intrinsics.shape != (n, 3, 3):
            raise ShapeError(
                f"scene '{key}': expected extrinsics [{n}, 4, 4] and intrinsics [{n}, 3, 3] for {n} "
                f"images, got {tuple(extrinsics.shape)} and {tuple(intrinsics.shape)}"
            )
        for label, t in (("extrinsics", extrinsics), ("intrinsics", intrinsics)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"scene '{key}': {label} contain NaN or Inf")
        timestamps = _field(scene, "timestamps")
        timestamps = (
            torch.arange(n, dtype=torch.int64)
            if timestamps is None
            else torch.as_tensor(timestamps).to(torch.int64).reshape(-1)
        )
        if timestamps.numel() != n:
            raise ShapeError(f"scene '{key}': {timestamps.numel()} timestamps for {n} images")

        extrinsics64 = extrinsics.detach().cpu().double()
        w2c, singular = torch.linalg.inv_ex(extrinsics64)
        if bool((singular != 0).any()):
            views = (singular != 0).nonzero().flatten().tolist()
            raise DataError(f"scene '{key}': the extrinsics of view(s) {views[:10]} are singular; "
                            "expected rigid camera-to-world matrices")
        check_cameras(extrinsics64, intrinsics.detach().cpu().double(), name=f"scene '{key}'")
        k = intrinsics.detach().cpu().double()
        cameras = torch.zeros(n, 18, dtype=torch.float64)
        cameras[:, 0], cameras[:, 1] = k[:, 0, 0], k[:, 1, 1]
        cameras[:, 2], cameras[:, 3] = k[:, 0, 2], k[:, 1, 2]
        cameras[:, 6:] = w2c[:, :3, :].reshape(n, 12)

        encoded = []
        for pixels in _to_uint8(images.detach().cpu(), key):
            buffer = io.BytesIO()
            options = {"quality": int(jpeg_quality)} if fmt == "JPEG" else {}
            Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=fmt, **options)
            encoded.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        out.append(
            {
                "key": key,
                "url": str(_field(scene, "url", "") or ""),
                "timestamps": timestamps.clone(),
                "cameras": cameras.float(),
                "images": encoded,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return path
