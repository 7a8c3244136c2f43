"""Bad-input contract of the chunk reader and writer (``load_chunk``, ``write_chunk``).

The chunks are generated here (8 x 8 images): a valid scene is written with ``write_chunk``,
then its raw dict is edited the way a broken converter would.
"""

import math
import tempfile
from pathlib import Path

import torch
from contract_base import Call, Case, ContractTester, Raises

from diff3r_plugin.data.chunks import Scene, load_chunk, write_chunk
from diff3r_plugin.errors import CameraConventionError, DataError, NonFiniteError, ShapeError

_TMP = tempfile.TemporaryDirectory(prefix="diff3r-contract-")


def scene(n: int = 2) -> Scene:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen).float() / 255
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, 0, 3] = torch.arange(n) * 0.1
    k = torch.tensor([[0.9, 0, 0.5], [0, 0.9, 0.5], [0, 0, 1]]).repeat(n, 1, 1)
    return Scene("s0", images, c2w, k, torch.arange(n, dtype=torch.int64))


def chunk_with(edit, name: str):
    """A chunk file whose first scene's raw dict went through ``edit``."""
    def build():
        path = Path(_TMP.name) / f"{name}.torch"
        write_chunk(path, [scene()])
        raw = torch.load(path, weights_only=False)
        edit(raw[0])
        torch.save(raw, path)
        return Call(load_chunk, dict(path=path))
    return build


def cams(fn):
    def edit(raw):
        raw["cameras"] = fn(raw["cameras"].clone())
    return edit


def setcol(index, value):
    def fn(c):
        c[:, index] = value
        return c
    return fn


def scale_w2c(c):
    c[:, 6:] *= 2.0  # w2c = 2 [R | t]: not rigid
    return c


def garbage(path_name):
    def build():
        path = Path(_TMP.name) / path_name
        path.write_bytes(b"not a torch file")
        return Call(load_chunk, dict(path=path))
    return build


class TestLoadChunk(ContractTester):
    ENTRY = "load_chunk"
    CASES = [
        Case("zero focal length", chunk_with(cams(setcol(0, 0.0)), "fx0"), Raises(CameraConventionError, "focal")),
        Case("non-rigid w2c", chunk_with(cams(scale_w2c), "scaled"), Raises(CameraConventionError, "orthonormal")),
        Case("singular w2c", chunk_with(cams(setcol(slice(6, 18), 0.0)), "singular"), Raises(DataError, "singular")),
        Case("NaN camera", chunk_with(cams(setcol(2, math.nan)), "nan"), Raises(NonFiniteError, "NaN")),
        Case("intrinsics in pixels", chunk_with(cams(setcol(2, 320.0)), "pixels"),
             Raises(CameraConventionError, "normalized")),
        Case("cameras of the wrong shape", chunk_with(cams(lambda c: c[:, :17]), "shape"),
             Raises(DataError, "[N, 18]")),
        Case("missing key", chunk_with(lambda raw: raw.pop("images"), "missing"), Raises(DataError, "missing key")),
        Case("undecodable image", chunk_with(lambda raw: raw["images"].__setitem__(0, torch.zeros(10, dtype=torch.uint8)),
                                             "undecodable"), Raises(DataError, "image")),
        Case("missing file", lambda: Call(load_chunk, dict(path=Path(_TMP.name) / "absent.torch")),
             Raises(DataError, "does not exist")),
        Case("corrupt file", garbage("garbage.torch"), Raises(DataError, "garbage.torch")),
    ]

    def good_call(self) -> Call:
        return chunk_with(lambda raw: None, "good")()


def write_with(**fields):
    def build():
        s = scene()
        values = dict(key=s.key, images=s.images, extrinsics=s.extrinsics, intrinsics=s.intrinsics)
        for k, f in fields.items():
            values[k] = f(values[k].clone())
        return Call(write_chunk, dict(path=Path(_TMP.name) / "written.torch", scenes=[values]))
    return build


def setitem(t, index, value):
    t[index] = value
    return t


class TestWriteChunk(ContractTester):
    ENTRY = "write_chunk"
    CASES = [
        Case("singular extrinsics", write_with(extrinsics=lambda e: e * 0), Raises(DataError, "singular")),
        Case("non-rigid extrinsics", write_with(extrinsics=lambda e: setitem(e, (slice(None), slice(0, 3), slice(0, 3)),
                                                                              2 * torch.eye(3))),
             Raises(CameraConventionError, "orthonormal")),
        Case("zero focal length", write_with(intrinsics=lambda k: setitem(k, (slice(None), 0, 0), 0.0)),
             Raises(CameraConventionError, "focal")),
        Case("NaN image", write_with(images=lambda i: setitem(i, (0, 0, 0, 0), math.nan)), Raises(NonFiniteError, "images")),
        Case("images of the wrong shape", write_with(images=lambda i: i[:, :2]), Raises(ShapeError, "[N, 3, H, W]")),
        Case("unknown image format", lambda: Call(write_chunk, dict(path=Path(_TMP.name) / "w.torch", scenes=[scene()],
                                                                      image_format="gif")),
             Raises(DataError, "image_format")),
    ]

    def good_call(self) -> Call:
        return Call(write_chunk, dict(path=Path(_TMP.name) / "good_write.torch", scenes=[scene()]))
