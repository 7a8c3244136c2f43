"""The torch renderer's gather/scatter of per-pair data: derivatives of every order that keep
only the index, and the memory that a Hessian-vector graph through the renderer holds (the
unrolled reference builds one such graph per inner step)."""

import torch

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.gaussians.layout import GaussianParams
from diff3r_plugin.render import render_params
from diff3r_plugin.render.torch_backend import build_plan, gather_rows, scatter_rows
from diff3r_plugin.render.common import project

F64 = torch.float64


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(7, 3, generator=gen, dtype=F64)
    index = torch.tensor([0, 3, 3, 6, 1, 0, 2, 5, 3])
    return src, index


def test_gather_scatter_values_match_index_ops():
    src, index = _data()
    assert torch.equal(gather_rows(src, index), src.index_select(0, index))
    rows = torch.randn(index.numel(), 3, dtype=F64)
    expected = torch.zeros(7, 3, dtype=F64).index_add(0, index, rows)
    assert torch.equal(scatter_rows(rows, index, 7), expected)


def test_gather_scatter_first_and_second_derivatives():
    src, index = _data()
    rows = torch.randn(index.numel(), 3, dtype=F64)

    # A non-linear function through both, so that second derivatives are not trivially zero.
    def f(s, r):
        g = gather_rows(s, index)
        return scatter_rows(torch.sin(g) * r, index, 7) ** 2

    s = src.clone().requires_grad_(True)
    r = rows.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (s, r))
    assert torch.autograd.gradgradcheck(f, (s, r))


def test_gather_scatter_forward_mode_matches_reverse():
    src, index = _data()
    tangent = torch.randn_like(src)

    def f(s):
        return scatter_rows(torch.exp(gather_rows(s, index)), index, 7)

    _, jvp = torch.func.jvp(f, (src,), (tangent,))
    jac = torch.autograd.functional.jacobian(f, src)  # [7, 3, 7, 3]
    assert torch.allclose(jvp, torch.einsum("abcd,cd->ab", jac, tangent), atol=1e-12)


def test_hessian_vector_graph_holds_no_per_pair_gradient_copies():
    """Saved bytes per composited pair of ``grad(E, create_graph=True)``: the graph keeps the
    pair indices and a few per-pair products, not the per-pair gradient of the gathered
    attributes (with autograd's own index ops it held about 290 bytes per pair here, now about
    190)."""
    scene = make_scene(512, 32, 2, seed=3)
    theta = scene.params.flatten().clone().requires_grad_(True)
    layout = scene.params.layout

    target = torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        p = GaussianParams.unflatten(theta, layout)
        out = render_params(p, scene.extrinsics, scene.intrinsics, scene.near, scene.far,
                            scene.image_shape).color
        energy = 0.5 * ((out - target) ** 2).sum()
        grad = torch.autograd.grad(energy, theta, create_graph=True)[0]
    with torch.no_grad():
        proj = project(p.means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
                       scene.intrinsics, scene.near, scene.image_shape, "e3nn")
        pairs = build_plan(proj, scene.image_shape).num_pairs
    per_pair = sum(seen.values()) / pairs
    assert pairs > 10_000
    assert 50 < per_pair < 230, per_pair
    # The graph still differentiates: a Hessian-vector product through it is finite and non-zero
    # (its values are checked in float64 by the gradgradcheck above and the layer's tests).
    v = torch.randn_like(theta)
    hv = torch.autograd.grad(grad, theta, v)[0]
    assert torch.isfinite(hv).all() and hv.norm() > 0


def test_plan_int32_and_int64_index_paths_agree(monkeypatch):
    """Box enumeration and pixel sort run in int32 when the indices fit, else in int64: both
    give the same plan (with and without chunking over Gaussians)."""
    import diff3r_plugin.render.torch_backend as tb

    scene = make_scene(600, 24, 2, seed=5, batch=2)
    p = scene.params
    proj = project(p.means, p.covariances(), p.harmonics, p.opacities(), scene.extrinsics,
                   scene.intrinsics, scene.near, scene.image_shape, "e3nn")
    for chunk in (1 << 24, 700):
        a = build_plan(proj, scene.image_shape, chunk_pairs=chunk)
        monkeypatch.setattr(tb, "_INT32_LIMIT", 0)
        b = build_plan(proj, scene.image_shape, chunk_pairs=chunk)
        monkeypatch.undo()
        assert a.num_pairs > 1000
        for name in ("gaussian", "pixel", "seg_start", "px", "py"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
