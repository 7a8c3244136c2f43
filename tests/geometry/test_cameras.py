"""Tests of the camera conventions module: se(3) exponential, rigid inverses, FoV and checks."""

import math

import pytest
import torch

from diff3r_plugin.errors import CameraConventionError, NonFiniteError, ShapeError
from diff3r_plugin.geometry.cameras import (apply_pose_delta, check_cameras, focal_pixels,
                                            fov_to_normalized_focal, get_fov, invert_rigid,
                                            look_at, normalize_intrinsics, opengl_to_opencv,
                                            se3_exp, skew)

F64 = torch.float64


def _twist(tau: torch.Tensor) -> torch.Tensor:
    """4x4 matrix of the se(3) element [rho, theta] (independent of the code under test)."""
    rho, th = tau[..., :3], tau[..., 3:]
    m = torch.zeros(*tau.shape[:-1], 4, 4, dtype=tau.dtype)
    m[..., 0, 1], m[..., 0, 2] = -th[..., 2], th[..., 1]
    m[..., 1, 0], m[..., 1, 2] = th[..., 2], -th[..., 0]
    m[..., 2, 0], m[..., 2, 1] = -th[..., 1], th[..., 0]
    m[..., :3, 3] = rho
    return m


def _random_c2w(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[:, :, 0] *= torch.linalg.det(q)[:, None]
    t = torch.randn(n, 3, generator=gen, dtype=F64)
    out = torch.eye(4, dtype=F64).repeat(n, 1, 1)
    out[:, :3, :3], out[:, :3, 3] = q, t
    return out


def _k(fx=0.9, fy=0.9, cx=0.5, cy=0.5):
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=F64)


# -------------------------------------------------------------------------------- se(3)


def test_se3_exp_at_zero_is_identity():
    out = se3_exp(torch.zeros(2, 3, 6, dtype=F64))
    assert out.shape == (2, 3, 4, 4)
    assert torch.equal(out, torch.eye(4, dtype=F64).expand(2, 3, 4, 4))


@pytest.mark.parametrize("magnitude", [1e-7, 1e-5, 1e-3, 0.1, 1.0, 2.5, 3.1, 5.0])
def test_se3_exp_matches_matrix_exp(magnitude):
    gen = torch.Generator().manual_seed(int(magnitude * 1000) + 1)
    tau = torch.randn(16, 6, generator=gen, dtype=F64)
    tau[:, 3:] = tau[:, 3:] / tau[:, 3:].norm(dim=-1, keepdim=True) * magnitude
    tau[:, :3] *= max(magnitude, 0.3)
    ref = torch.linalg.matrix_exp(_twist(tau))
    got = se3_exp(tau)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    rot = got[:, :3, :3]
    torch.testing.assert_close(rot.transpose(-1, -2) @ rot, torch.eye(3, dtype=F64).expand(16, 3, 3),
                               rtol=0, atol=1e-12)


def test_se3_exp_pure_translation_and_pure_rotation():
    tau = torch.tensor([0.3, -0.2, 0.5, 0.0, 0.0, 0.0], dtype=F64)
    out = se3_exp(tau)
    assert torch.equal(out[:3, :3], torch.eye(3, dtype=F64))
    torch.testing.assert_close(out[:3, 3], tau[:3], rtol=0, atol=0)
    tau = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.pi / 2], dtype=F64)  # 90 deg about z
    out = se3_exp(tau)
    torch.testing.assert_close(out[:3, :3], torch.tensor(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("at", ["zero", "tiny", "finite"])
def test_se3_exp_jvp_matches_finite_differences(at):
    gen = torch.Generator().manual_seed(2)
    tangent = torch.randn(3, 6, generator=gen, dtype=F64)
    base = {"zero": torch.zeros(3, 6, dtype=F64),
            "tiny": 1e-6 * torch.randn(3, 6, generator=gen, dtype=F64),
            "finite": torch.randn(3, 6, generator=gen, dtype=F64)}[at]
    out, jvp = torch.func.jvp(se3_exp, (base,), (tangent,))
    assert bool(torch.isfinite(jvp).all())
    h = 1e-6
    fd = (se3_exp(base + h * tangent) - se3_exp(base - h * tangent)) / (2 * h)
    torch.testing.assert_close(jvp, fd, rtol=0, atol=1e-8)
    if at == "zero":
        # d exp(t xi) / dt at 0 is the twist matrix itself.
        torch.testing.assert_close(jvp, _twist(tangent), rtol=0, atol=1e-15)
        # Reverse mode at 0 agrees too (the layer differentiates the pose both ways).
        x = base.clone().requires_grad_(True)
        w = torch.randn(3, 4, 4, generator=gen, dtype=F64)
        (g,) = torch.autograd.grad((se3_exp(x) * w).sum(), x)
        assert bool(torch.isfinite(g).all())
        assert float((g * tangent).sum()) == pytest.approx(float((jvp * w).sum()), abs=1e-12)


def test_apply_pose_delta():
    c2w = _random_c2w(4, seed=3)
    zero = torch.zeros(4, 6, dtype=F64)
    torch.testing.assert_close(apply_pose_delta(c2w, zero), c2w, rtol=0, atol=1e-14)
    tau = 0.2 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    new = apply_pose_delta(c2w, tau)
    # new_w2c = exp(tau) @ w2c.
    ref = torch.linalg.inv(torch.linalg.matrix_exp(_twist(tau)) @ torch.linalg.inv(c2w))
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- rigid transforms


def test_invert_rigid():
    c2w = _random_c2w(10, seed=1)
    inv = invert_rigid(c2w)
    torch.testing.assert_close(inv, torch.linalg.inv(c2w), rtol=0, atol=1e-13)
    torch.testing.assert_close(inv @ c2w, torch.eye(4, dtype=F64).expand(10, 4, 4), rtol=0, atol=1e-13)
    torch.testing.assert_close(invert_rigid(inv), c2w, rtol=0, atol=1e-13)
    assert torch.equal(inv[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64).expand(10, 4))
    # Differentiable.
    x = c2w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(invert_rigid, (x,))


def test_skew_is_cross_product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, generator=gen, dtype=F64)
    torch.testing.assert_close((skew(a) @ b[..., None])[..., 0], torch.linalg.cross(a, b),
                               rtol=0, atol=1e-15)


def test_look_at_is_opencv_and_proper():
    eye = torch.tensor([0.2, -0.1, 0.3], dtype=F64)
    target = torch.tensor([0.0, 0.0, 4.0], dtype=F64)
    c2w = look_at(eye, target)
    rot = c2w[:3, :3]
    assert float(torch.linalg.det(rot)) == pytest.approx(1.0, abs=1e-12)
    fwd = (target - eye) / (target - eye).norm()
    torch.testing.assert_close(rot[:, 2], fwd, rtol=0, atol=1e-12)  # +z forward
    assert float(rot[1, 1]) > 0.9  # +y down: camera y is roughly world +y (up is -y)
    torch.testing.assert_close(c2w[:3, 3], eye, rtol=0, atol=0)
    check_cameras(c2w[None], _k()[None])


def test_opengl_to_opencv_flips_y_and_z():
    c2w = _random_c2w(2, seed=4)
    out = opengl_to_opencv(c2w)
    torch.testing.assert_close(out[:, :3, 0], c2w[:, :3, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :3, 1], -c2w[:, :3, 1], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :3, 2], -c2w[:, :3, 2], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :3, 3], c2w[:, :3, 3], rtol=0, atol=0)


# ----------------------------------------------------------------------- intrinsics/FoV


@pytest.mark.parametrize("fx,fy", [(0.9, 0.9), (1.0, 0.6), (0.35, 2.0)])
def test_get_fov_centred(fx, fy):
    fov = get_fov(_k(fx, fy))
    torch.testing.assert_close(fov, torch.tensor([2 * math.atan(0.5 / fx), 2 * math.atan(0.5 / fy)],
                                                 dtype=F64), rtol=0, atol=1e-14)
    # The FoV-only pixel focal length equals fx * W for a centred principal point.
    torch.testing.assert_close(focal_pixels(_k(fx, fy), (48, 64)),
                               torch.tensor([fx * 64, fy * 48], dtype=F64), rtol=1e-12, atol=0)
    # Batched.
    ks = torch.stack([_k(fx, fy), _k(fy, fx)])[None]
    assert get_fov(ks).shape == (1, 2, 2)
    torch.testing.assert_close(get_fov(ks)[0, 1], fov.flip(0), rtol=0, atol=1e-14)


def test_fov_to_normalized_focal_inverts_get_fov():
    fx = fov_to_normalized_focal(60.0)
    assert math.degrees(float(get_fov(_k(fx, fx))[0])) == pytest.approx(60.0, abs=1e-10)


def test_normalize_intrinsics():
    k_px = torch.tensor([[320.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]], dtype=F64)
    k = normalize_intrinsics(k_px, (240, 320))
    torch.testing.assert_close(k, _k(1.0, 1.25, 0.5, 0.5), rtol=0, atol=1e-15)
    with pytest.raises(CameraConventionError, match="normalized"):
        check_cameras(torch.eye(4, dtype=F64)[None], k_px[None])
    check_cameras(torch.eye(4, dtype=F64)[None], k[None])


# ------------------------------------------------------------------------ check_cameras


def _valid():
    return _random_c2w(3, seed=5)[None], _k().expand(1, 3, 3, 3).clone()


def test_check_cameras_accepts_valid():
    check_cameras(*_valid())
    ext, k = _valid()
    check_cameras(ext.float(), k.float())


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_cameras_non_finite(which, bad):
    cams = list(_valid())
    cams[which] = cams[which].clone()
    cams[which][0, 1, 0, 0] = bad
    with pytest.raises(NonFiniteError, match=["extrinsics", "intrinsics"][which]):
        check_cameras(*cams)


def test_check_cameras_shapes():
    ext, k = _valid()
    with pytest.raises(ShapeError, match="extrinsics"):
        check_cameras(ext[..., :3, :], k)
    with pytest.raises(ShapeError, match="intrinsics"):
        check_cameras(ext, k[..., :2, :])
    with pytest.raises(ShapeError, match="disagree"):
        check_cameras(ext, k[:, :2])


def test_check_cameras_integer_dtype():
    ext, k = _valid()
    with pytest.raises(CameraConventionError, match="floating"):
        check_cameras(ext.round().long(), k)
    with pytest.raises(CameraConventionError, match="floating"):
        check_cameras(ext, k.round().int())


def test_check_cameras_pixel_unit_intrinsics():
    ext, k = _valid()
    k = k.clone()
    k[..., 0, 2], k[..., 1, 2] = 128.0, 96.0
    k[..., 0, 0], k[..., 1, 1] = 230.0, 230.0
    with pytest.raises(CameraConventionError, match="pixel units"):
        check_cameras(ext, k)


def test_check_cameras_reflection():
    ext, k = _valid()
    ext = ext.clone()
    ext[0, 2, :3, 1] *= -1  # det -1
    assert float(torch.linalg.det(ext[0, 2, :3, :3])) == pytest.approx(-1.0)
    with pytest.raises(CameraConventionError, match="reflection"):
        check_cameras(ext, k)


def test_check_cameras_other_violations():
    ext, k = _valid()
    bad = ext.clone()
    bad[0, 0, :3, :3] *= 1.1  # scaled, not orthonormal
    with pytest.raises(CameraConventionError, match="orthonormal"):
        check_cameras(bad, k)
    bad = ext.clone()
    bad[0, 0, 3, 0] = 0.5
    with pytest.raises(CameraConventionError, match="last row"):
        check_cameras(bad, k)
    bad_k = k.clone()
    bad_k[0, 1, 0, 0] = -0.9
    with pytest.raises(CameraConventionError, match="focal"):
        check_cameras(ext, bad_k)
    bad_k = k.clone()
    bad_k[0, 1, 2, 2] = 2.0
    with pytest.raises(CameraConventionError, match="last row"):
        check_cameras(ext, bad_k)
