"""The suite runs under the jaxtyping import hook (tests/conftest.py): annotations are enforced."""

import pytest
import torch
from jaxtyping import TypeCheckError

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.errors import ShapeError
from diff3r_plugin.geometry.cameras import invert_rigid
from diff3r_plugin.render.api import render


def _inputs(means_shape=None):
    scene = make_scene(8, 8, 2)
    p = scene.params
    means = p.means if means_shape is None else torch.zeros(means_shape)
    return (means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
            scene.intrinsics, scene.near, scene.far, scene.image_shape)


def test_named_axes_are_checked_across_arguments():
    # 7 Gaussians in the means against 8 in the covariances: only the named axes tie them.
    with pytest.raises(TypeCheckError, match="means"):
        render(*_inputs((1, 7, 3)))


def test_single_argument_shapes_are_checked():
    with pytest.raises(TypeCheckError):
        invert_rigid(torch.zeros(4, 3))


@pytest.mark.user_errors
def test_users_get_the_typed_error_without_the_hook():
    with pytest.raises(ShapeError, match="covariances must be"):
        render(*_inputs((1, 7, 3)))
