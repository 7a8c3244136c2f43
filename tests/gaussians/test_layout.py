"""Tests of the optimizable Gaussian layout and the exact upstream conversions."""

import math

import pytest
import torch

from diff3r_plugin.errors import (DTypeError, InvalidCovarianceError, LayoutMismatchError,
                                  NonFiniteError, ShapeError)
from diff3r_plugin.gaussians.layout import (GROUPS, GaussianLayout, GaussianParams,
                                            build_covariance, from_upstream, quat_to_rotmat,
                                            random_params, rotmat_to_quat, to_upstream)

F64 = torch.float64


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(q)
    q[:, :, 0] *= det[:, None]  # proper rotations
    return q


def _random_upstream(b, g, *, d_sh=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rot = _random_rotations(b * g, gen).reshape(b, g, 3, 3)
    scales = 0.01 + 0.5 * torch.rand(b, g, 3, generator=gen, dtype=F64)
    cov = rot @ torch.diag_embed(scales ** 2) @ rot.transpose(-1, -2)
    means = torch.randn(b, g, 3, generator=gen, dtype=F64)
    harm = torch.randn(b, g, 3, d_sh, generator=gen, dtype=F64)
    opac = 0.05 + 0.9 * torch.rand(b, g, generator=gen, dtype=F64)
    return means, cov, harm, opac, scales


def _axis_angle_matrix(axis, angle):
    axis = torch.as_tensor(axis, dtype=F64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]],
                     dtype=F64)
    return torch.eye(3, dtype=F64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


# ------------------------------------------------------------------------- layout sizes


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
@pytest.mark.parametrize("pose_views", [0, 2])
def test_group_slices_are_contiguous_and_sized(sh_degree, pose_views):
    g = 7
    layout = GaussianLayout(g, sh_degree, pose_views)
    d = (sh_degree + 1) ** 2
    sizes = {"means": 3 * g, "log_scales": 3 * g, "quats": 4 * g, "opacity_logits": g,
             "sh_dc": 3 * g, "sh_rest": 3 * (d - 1) * g, "pose": 6 * pose_views}
    assert layout.d_sh == d
    slices = layout.slices
    assert list(slices) == list(GROUPS)
    start = 0
    for group in GROUPS:
        s = slices[group]
        assert s.start == start and s.stop - s.start == sizes[group] == layout.group_numel(group)
        start = s.stop
    assert layout.numel == start == sum(sizes.values())
    idx = layout.group_index()
    for i, group in enumerate(GROUPS):
        assert bool((idx[slices[group]] == i).all())
    assert idx.numel() == layout.numel


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_flatten_unflatten_round_trip(sh_degree):
    gen = torch.Generator().manual_seed(3)
    params = random_params(2, 5, sh_degree=sh_degree, num_pose_views=2, generator=gen, dtype=F64)
    params.pose = torch.randn(2, 2, 6, generator=gen, dtype=F64)
    layout = params.layout
    assert layout == GaussianLayout(5, sh_degree, 2)
    vec = params.flatten()
    assert vec.shape == (2, layout.numel)
    # Each group is a contiguous, group-major slice holding that attribute in order.
    for group, s in layout.slices.items():
        assert torch.equal(vec[:, s], getattr(params, group).reshape(2, -1))
    back = GaussianParams.unflatten(vec, layout)
    for group in GROUPS:
        assert torch.equal(getattr(back, group), getattr(params, group))
    assert torch.equal(back.flatten(), vec)
    # unflatten gives views: gradients flow back to the flat vector slice by slice.
    v = vec.clone().requires_grad_(True)
    GaussianParams.unflatten(v, layout).opacity_logits.sum().backward()
    expect = torch.zeros_like(vec)
    expect[:, layout.slices["opacity_logits"]] = 1
    assert torch.equal(v.grad, expect)


@pytest.mark.user_errors
def test_unflatten_wrong_length_raises():
    layout = GaussianLayout(4, 1)
    with pytest.raises(LayoutMismatchError, match="layout"):
        GaussianParams.unflatten(torch.zeros(1, layout.numel + 1), layout)
    with pytest.raises(LayoutMismatchError):
        layout.split(torch.zeros(layout.numel))


def test_per_group():
    layout = GaussianLayout(3, 1, 1)
    values = {"means": 1.0, "log_scales": 2.0, "quats": 3.0, "opacity_logits": 4.0,
              "sh_dc": 5.0, "sh_rest": 6.0, "pose": 7.0}
    vec = layout.per_group(values, batch=2, dtype=F64)
    assert vec.shape == (2, layout.numel) and vec.dtype == F64
    for group, s in layout.slices.items():
        assert bool((vec[:, s] == values[group]).all())
    # default fills missing groups; rows are independent copies.
    vec2 = layout.per_group({"means": 0.5}, default=1e-3)
    assert bool((vec2[:, layout.slices["means"]] == 0.5).all())
    assert bool((vec2[:, layout.slices["pose"]] == 1e-3).all())
    vec[0, 0] = -1
    assert float(vec[1, 0]) == 1.0
    with pytest.raises(LayoutMismatchError, match="no value"):
        layout.per_group({"means": 1.0})
    with pytest.raises(LayoutMismatchError, match="unknown"):
        layout.per_group({**values, "colours": 1.0})
    # An empty group (no pose views) needs no value.
    no_pose = GaussianLayout(3, 0)
    vals = {k: v for k, v in values.items() if k != "pose"}
    assert no_pose.per_group(vals).shape == (1, no_pose.numel)


@pytest.mark.user_errors
def test_invalid_layouts_raise():
    with pytest.raises(ShapeError, match="sh_degree"):
        GaussianLayout(3, 4)
    with pytest.raises(ShapeError):
        GaussianLayout(-1)
    with pytest.raises(ShapeError):
        GaussianParams(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 4),
                       torch.zeros(1, 3), torch.zeros(1, 2, 3, 1), torch.zeros(1, 2, 3, 0))
    with pytest.raises(ShapeError, match="square"):
        GaussianParams(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 4),
                       torch.zeros(1, 2), torch.zeros(1, 2, 3, 1), torch.zeros(1, 2, 3, 4))


# ------------------------------------------------------------------ rotations/quaternions


def test_quaternion_round_trip_all_pivots():
    gen = torch.Generator().manual_seed(0)
    rot = _random_rotations(200, gen)
    # Include rotations by ~pi about each axis (the x/y/z pivots of Shepperd's method).
    extra = torch.stack([_axis_angle_matrix(a, math.pi - 1e-3) for a in torch.eye(3)])
    rot = torch.cat([rot, extra, torch.eye(3, dtype=F64)[None]])
    q = rotmat_to_quat(rot)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(len(rot), dtype=F64), rtol=0, atol=1e-12)
    assert bool((q[:, 0] >= 0).all())
    torch.testing.assert_close(quat_to_rotmat(q), rot, rtol=0, atol=1e-12)
    # quat_to_rotmat normalizes its input.
    torch.testing.assert_close(quat_to_rotmat(3.7 * q), rot, rtol=0, atol=1e-12)


def test_build_covariance_matches_definition():
    q = torch.tensor([math.cos(0.35), 0.0, 0.0, math.sin(0.35)], dtype=F64)  # 0.7 rad about z
    ls = torch.log(torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    r = _axis_angle_matrix([0, 0, 1], 0.7)
    expect = r @ torch.diag(torch.tensor([0.01, 0.04, 0.09], dtype=F64)) @ r.T
    torch.testing.assert_close(build_covariance(ls, q), expect, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------- upstream bridge


def test_upstream_round_trip_float64():
    means, cov, harm, opac, _ = _random_upstream(2, 50, d_sh=16, seed=1)
    params, extras = from_upstream(means, cov, harm, opac, num_pose_views=2)
    assert params.layout == GaussianLayout(50, 3, 2)
    assert extras.num_projected == 0 and extras.num_opacity_clamped == 0
    assert torch.equal(params.pose, torch.zeros(2, 2, 6, dtype=F64))
    m2, c2, h2, o2 = to_upstream(params, extras)
    torch.testing.assert_close(m2, means, rtol=0, atol=1e-12)
    torch.testing.assert_close(c2, cov, rtol=0, atol=1e-6 * float(cov.abs().max()))
    torch.testing.assert_close(c2, cov, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(h2, harm, rtol=0, atol=0)
    torch.testing.assert_close(o2, opac, rtol=1e-10, atol=1e-12)
    # Layout -> upstream -> layout reproduces the covariance (the parameters may differ by
    # eigenvector order/sign, the covariance may not).
    p2, _ = from_upstream(*to_upstream(params))
    torch.testing.assert_close(p2.covariances(), params.covariances(), rtol=1e-8, atol=1e-12)


def test_specific_rotated_anisotropic_covariance():
    axis = torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3.0
    angle = 0.7
    rot = _axis_angle_matrix(axis, angle)
    scales = torch.tensor([0.05, 0.1, 0.3], dtype=F64)  # ascending: eigh keeps the axis order
    cov = rot @ torch.diag(scales ** 2) @ rot.T
    params, _ = from_upstream(torch.zeros(1, 1, 3, dtype=F64), cov[None, None],
                              torch.zeros(1, 1, 3, 1, dtype=F64), torch.full((1, 1), 0.5, dtype=F64))
    got_scales = params.scales()[0, 0]
    torch.testing.assert_close(got_scales.sort().values, scales, rtol=1e-10, atol=0)
    got_rot = params.rotations()[0, 0]
    assert float(torch.linalg.det(got_rot)) == pytest.approx(1.0, abs=1e-12)
    # Same principal axes: got_rot^T rot is a signed identity (eigenvectors up to sign).
    signed = got_rot.T @ rot
    torch.testing.assert_close(signed.abs(), torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    aligned = got_rot * torch.sign(torch.diagonal(signed))[None, :]
    torch.testing.assert_close(aligned, rot, rtol=0, atol=1e-10)
    # Its rotation axis and angle are those of the input.
    r = aligned
    got_axis = torch.stack([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    got_angle = math.acos((float(torch.trace(r)) - 1) / 2)
    torch.testing.assert_close(got_axis / got_axis.norm(), axis, rtol=0, atol=1e-10)
    assert got_angle == pytest.approx(angle, abs=1e-10)
    # And the largest-scale axis is rot's third column.
    big = got_rot[:, int(got_scales.argmax())]
    assert abs(float(big @ rot[:, 2])) == pytest.approx(1.0, abs=1e-12)


def test_degree4_harmonics_pass_through():
    means, cov, harm, opac, _ = _random_upstream(1, 6, d_sh=25, seed=2)
    params, extras = from_upstream(means, cov, harm, opac)
    assert params.layout.sh_degree == 3
    assert params.harmonics.shape[-1] == 16
    assert torch.equal(params.harmonics, harm[..., :16])
    assert torch.equal(extras.harmonics_high, harm[..., 16:])
    # Changing the optimized coefficients leaves 16..24 untouched.
    params.sh_rest = params.sh_rest + 1.0
    _, _, h2, _ = to_upstream(params, extras)
    assert h2.shape[-1] == 25
    assert torch.equal(h2[..., 16:], harm[..., 16:])
    torch.testing.assert_close(h2[..., 1:16], harm[..., 1:16] + 1.0, rtol=0, atol=0)
    # An explicit lower degree moves more coefficients to the pass-through part.
    p1, e1 = from_upstream(means, cov, harm, opac, sh_degree=1)
    assert p1.harmonics.shape[-1] == 4 and e1.harmonics_high.shape[-1] == 21
    assert torch.equal(to_upstream(p1, e1)[2], harm)
    with pytest.raises(ShapeError):
        from_upstream(means, cov, harm[..., :4], opac, sh_degree=2)


@pytest.mark.parametrize("gap", [0.0, 1e-12, 1e-9])
def test_isotropic_covariance_gradients_are_finite(gap):
    cov = (0.04 * torch.eye(3, dtype=F64) + gap * torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=F64)))
    gen = torch.Generator().manual_seed(0)
    rot = _random_rotations(1, gen)[0]
    cov = (rot @ cov @ rot.T)[None, None].clone().requires_grad_(True)
    params, extras = from_upstream(torch.zeros(1, 1, 3, dtype=F64), cov,
                                   torch.zeros(1, 1, 3, 1, dtype=F64), torch.full((1, 1), 0.5, dtype=F64))
    w = torch.randn(3, generator=gen, dtype=F64)
    wq = torch.randn(4, generator=gen, dtype=F64)
    loss = (params.log_scales[0, 0] * w).sum() + (params.quats[0, 0] * wq).sum()
    loss = loss + to_upstream(params, extras)[1].square().sum()
    (grad,) = torch.autograd.grad(loss, cov)
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().max()) < 1e3
    torch.testing.assert_close(params.scales()[0, 0], torch.full((3,), 0.2, dtype=F64), rtol=1e-6, atol=0)


def _sym_from_vec(v):
    """Symmetric 3x3 from its 6 upper-triangular entries (a symmetric parameterization)."""
    idx = torch.triu_indices(3, 3)
    m = v.new_zeros(*v.shape[:-1], 3, 3)
    m[..., idx[0], idx[1]] = v
    return m + m.transpose(-1, -2) - torch.diag_embed(torch.diagonal(m, dim1=-2, dim2=-1))


def test_from_upstream_gradients_match_finite_differences():
    rot = _axis_angle_matrix([0.3, -0.5, 0.8], 1.1)
    cov0 = rot @ torch.diag(torch.tensor([0.01, 0.04, 0.16], dtype=F64)) @ rot.T
    idx = torch.triu_indices(3, 3)
    v0 = cov0[idx[0], idx[1]].clone()
    zeros3 = torch.zeros(1, 1, 3, dtype=F64)
    harm = torch.zeros(1, 1, 3, 1, dtype=F64)
    opac = torch.full((1, 1), 0.5, dtype=F64)

    def composite(v):
        params, _ = from_upstream(zeros3, _sym_from_vec(v)[None, None], harm, opac)
        return to_upstream(params)[1][0, 0]

    def log_scales(v):
        params, _ = from_upstream(zeros3, _sym_from_vec(v)[None, None], harm, opac)
        return params.log_scales[0, 0]

    x = v0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(composite, (x,), eps=1e-7, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(log_scales, (x,), eps=1e-7, atol=1e-6, rtol=1e-5)
    # The composite is the identity on symmetric matrices: its Jacobian is that of _sym_from_vec.
    jac = torch.autograd.functional.jacobian(composite, v0)
    jac_ref = torch.autograd.functional.jacobian(_sym_from_vec, v0)
    torch.testing.assert_close(jac, jac_ref, rtol=0, atol=1e-8)
    # log-scales: d(0.5 log lambda_i) / dSigma = 0.5 e_i e_i^T / lambda_i.
    jac_ls = torch.autograd.functional.jacobian(log_scales, v0)
    evals, evecs = torch.linalg.eigh(cov0)
    for i in range(3):
        ref = 0.5 * torch.outer(evecs[:, i], evecs[:, i]) / evals[i]
        ref_v = (ref + ref.T - torch.diag(torch.diagonal(ref)))[idx[0], idx[1]]
        torch.testing.assert_close(jac_ls[i], ref_v, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- bad inputs


def test_non_psd_covariance_raises_or_projects():
    means, cov, harm, opac, _ = _random_upstream(1, 5, seed=4)
    cov = cov.clone()
    cov[0, 1] = torch.diag(torch.tensor([0.02, -0.01, 0.03], dtype=F64))
    cov[0, 3] = torch.diag(torch.tensor([0.02, 0.0, 0.03], dtype=F64))
    with pytest.raises(InvalidCovarianceError, match="positive definite"):
        from_upstream(means, cov, harm, opac)
    params, extras = from_upstream(means, cov, harm, opac, on_invalid="project")
    assert extras.num_projected == 2
    for t in (params.log_scales, params.quats):
        assert bool(torch.isfinite(t).all())
    c2 = to_upstream(params)[1]
    assert bool((torch.linalg.eigvalsh(c2)[..., 0] > 0).all())
    good = [0, 2, 4]
    torch.testing.assert_close(c2[0, good], cov[0, good], rtol=1e-8, atol=1e-12)
    # The projected one keeps its positive eigenvalues.
    torch.testing.assert_close(torch.linalg.eigvalsh(c2[0, 1])[1:],
                               torch.tensor([0.02, 0.03], dtype=F64), rtol=1e-8, atol=0)


def test_flat_but_valid_covariance_is_accepted():
    """KNOWN BUG (layout.py, ``check_covariances``: ``evals[0] <= rel_tol * evals[-1]`` with
    ``rel_tol=1e-6``): a symmetric positive definite covariance whose scale ratio exceeds 1000
    (a flat "surfel" Gaussian, e.g. scales 0.1, 0.1, 5e-5, common with NoPoSplat's softplus
    scales) is rejected in float64 as "not symmetric positive definite", although the renderer
    accepts it and the eigen-decomposition is exact. The tolerance should depend on the dtype
    (a few ulps of the largest eigenvalue), or only eigenvalues <= 0 should count."""
    scales = torch.tensor([0.1, 0.1, 5e-5], dtype=F64)
    rot = _axis_angle_matrix([1.0, -2.0, 0.5], 0.9)
    cov = (rot @ torch.diag(scales ** 2) @ rot.T)[None, None]
    assert float(torch.linalg.eigvalsh(cov)[0, 0, 0]) > 0  # SPD
    params, extras = from_upstream(torch.zeros(1, 1, 3, dtype=F64), cov,
                                   torch.zeros(1, 1, 3, 1, dtype=F64),
                                   torch.full((1, 1), 0.5, dtype=F64))
    assert extras.num_projected == 0
    torch.testing.assert_close(params.scales()[0, 0].sort().values, scales.sort().values,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(to_upstream(params)[1], cov, rtol=0, atol=1e-14)


def test_asymmetric_covariance_raises():
    means, cov, harm, opac, _ = _random_upstream(1, 3, seed=5)
    cov = cov.clone()
    cov[0, 0, 0, 1] += 0.05
    with pytest.raises(InvalidCovarianceError):
        from_upstream(means, cov, harm, opac)


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_upstream_raises(index, bad):
    inputs = list(_random_upstream(1, 3, seed=6)[:4])
    t = inputs[index].clone()
    t.reshape(-1)[1] = bad
    inputs[index] = t
    name = ["means", "covariances", "harmonics", "opacities"][index]
    with pytest.raises(NonFiniteError, match=name):
        from_upstream(*inputs)


@pytest.mark.parametrize("index,shape", [
    (0, (1, 3, 2)), (0, (3, 3)), (1, (1, 3, 3)), (1, (1, 2, 3, 3)), (2, (1, 3, 3)),
    (2, (1, 3, 2, 4)), (2, (1, 3, 3, 5)), (3, (1, 3, 1)), (3, (3,)),
])
@pytest.mark.user_errors
def test_wrong_upstream_shapes_raise(index, shape):
    inputs = list(_random_upstream(1, 3, seed=7)[:4])
    inputs[index] = torch.ones(shape, dtype=F64)
    with pytest.raises(ShapeError):
        from_upstream(*inputs)


@pytest.mark.user_errors
def test_integer_upstream_raises():
    inputs = list(_random_upstream(1, 3, seed=7)[:4])
    inputs[0] = inputs[0].long()
    with pytest.raises(DTypeError, match="float"):
        from_upstream(*inputs)


def test_extreme_opacities_are_clamped_and_counted():
    means, cov, harm, opac, _ = _random_upstream(1, 5, seed=8)
    opac = opac.clone()
    opac[0, 0], opac[0, 2], opac[0, 3] = 0.0, 1.0, 1.0
    params, extras = from_upstream(means, cov, harm, opac, opacity_eps=1e-6)
    assert extras.num_opacity_clamped == 3
    assert bool(torch.isfinite(params.opacity_logits).all())
    o = params.opacities()[0]
    assert float(o[0]) == pytest.approx(1e-6, rel=1e-6)
    assert float(o[2]) == pytest.approx(1 - 1e-6, abs=1e-12)
    torch.testing.assert_close(o[[1, 4]], opac[0, [1, 4]], rtol=1e-12, atol=0)
