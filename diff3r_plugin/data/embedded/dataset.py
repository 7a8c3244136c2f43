"""Upstream-shaped examples and a map-style dataset over embedded scenes."""

import operator
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ...errors import DataError, ShapeError
from ..example import upstream_example, upstream_views
from .layout import HELD_OUT_SEED_START
from .scene import EmbeddedScene, _check_image_shape, make_scene


class SceneIndexError(DataError, IndexError):
    """A view or scene index is out of range.

    Derives from ``IndexError`` too, so that Python's sequence protocol and ``DataLoader``
    samplers treat it as the end of the data.
    """


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
    return upstream_views(scene.images[index], scene.extrinsics[index], scene.intrinsics[index],
                          scene.near[index], scene.far[index], indices)


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
    return upstream_example(_views(scene, ctx), _views(scene, tgt), scene.key)


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
