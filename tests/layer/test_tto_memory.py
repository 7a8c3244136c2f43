"""A TTO without the unrolled graph holds one step's renderer state, whatever its length.

The compiled composite keeps its pair list in its autograd node; an energy kept on the graph
from one Adam step to the next (e.g. through ``torch.where``) used to keep every earlier step's
pair list alive, so a 100-step evaluation TTO grew by the size of a pair list per step.
"""

import gc

import pytest
import torch

from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.gaussians.layout import GROUPS
from diff3r_plugin.layer import ContextViews
from diff3r_plugin.layer.inner import adam_solve
from diff3r_plugin.layer.layer import learning_rates
from diff3r_plugin.layer.objective import Objective
from diff3r_plugin.render.api import render_params


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("create_graph", [False, True])
def test_live_tensors_during_adam_do_not_grow_with_the_step_count(create_graph):
    s = make_scene(24, 12, 2, seed=0)
    layout = s.params.layout
    images = render_params(s.params, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images, s.extrinsics, s.intrinsics, s.near, s.far)
    theta0 = s.params.flatten() + 0.05
    lam = layout.per_group({g: 1.0 for g in GROUPS})
    config = Diff3RConfig(steps=12, inner_solver="adam", stationarity_tol=0.0)
    obj = Objective.for_layer(views, layout, config, theta0, "torch")
    counts = []
    energy = obj.energy

    def counting_energy(*args, **kwargs):  # live tensors at every energy evaluation
        counts.append(_live_tensors())
        return energy(*args, **kwargs)

    object.__setattr__(obj, "energy", counting_energy)
    t0 = theta0.clone().requires_grad_(create_graph)
    res = adam_solve(obj, t0, lam, learning_rates(config, layout, theta0), 12,
                     create_graph=create_graph)
    assert int(res.steps.min()) == 12 and len(counts) == 13
    growth = counts[-1] - counts[3]
    if create_graph:
        # The unrolled graph does keep every step (this is what the check measures).
        assert growth > 9 * 5
    else:
        assert growth <= 2, counts
