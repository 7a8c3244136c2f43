"""Batched PCG (``diff3r_plugin.layer.pcg``) and the Hessian matrix-vector products
(``diff3r_plugin.layer.matvec``) against dense references."""

import pytest
import torch

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews, Objective, pcg
from diff3r_plugin.layer.matvec import (ExactHessian, GaussNewtonAutodiff, GaussNewtonFiniteDifference,
                                        make_matvec)
from diff3r_plugin.render.api import render_params

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def spd(n: int, cond: float, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    """A random SPD matrix with condition number ``cond`` (log-spaced spectrum)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond, dtype=F64)).item(), n, dtype=F64)
    a = (q * evals) @ q.T
    return (0.5 * (a + a.T)).to(dtype)


class DenseMatVec:
    """``matvec(p, idx) = A[idx] p`` that records the scene indices of every call."""

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.calls: list[list[int]] = []

    def __call__(self, p, idx):
        self.calls.append(idx.tolist())
        return torch.einsum("kij,kj->ki", self.a.index_select(0, idx), p)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# PCG on dense SPD systems
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jacobi", [False, True])
def test_pcg_matches_dense_solve_per_scene(jacobi):
    gen = torch.Generator().manual_seed(0)
    n = 40
    conds = [10.0, 1e3, 1e5]
    a = torch.stack([spd(n, c, gen) for c in conds])
    # Also scale rows/columns so that the diagonal differs (the Jacobi case does something).
    d = torch.logspace(-1, 1, n, dtype=F64)
    a = d[:, None] * a * d[None, :]
    rhs = torch.randn(3, n, generator=gen, dtype=F64)
    x_ref = torch.linalg.solve(a, rhs)
    precond = torch.diagonal(a, dim1=1, dim2=2).clone() if jacobi else None
    mv = DenseMatVec(a)
    x, res = pcg(mv, rhs, precond=precond, tol=1e-13, maxiter=5000, check_every=1)
    assert res.converged.tolist() == [True, True, True]
    assert not bool(res.indefinite.any())
    for i in range(3):
        # Forward error <= cond(A) * relative residual, with margin.
        assert rel(x[i], x_ref[i]) < 1e-6, (i, rel(x[i], x_ref[i]))
        true_res = float((rhs[i] - a[i] @ x[i]).norm() / rhs[i].norm())
        assert true_res < 1e-10
    # Harder systems need more iterations: counts are per scene, not a shared maximum.
    its = res.iterations.tolist()
    assert its[0] < its[1] < its[2], its


def test_jacobi_reduces_iterations_on_badly_scaled_system():
    gen = torch.Generator().manual_seed(1)
    n = 60
    # Diagonally dominant, well conditioned core B, then badly scaled by D: A = D B D.
    off = 0.1 * torch.randn(2, n, n, generator=gen, dtype=F64)
    off = 0.5 * (off + off.transpose(1, 2))
    b = off + torch.diag_embed(off.abs().sum(2) + 1.0)
    dscale = torch.logspace(-3, 3, n, dtype=F64)[torch.randperm(n, generator=gen)]
    a = dscale[:, None] * b * dscale[None, :]
    rhs = torch.randn(2, n, generator=gen, dtype=F64)
    x_ref = torch.linalg.solve(a, rhs)
    x_plain, res_plain = pcg(DenseMatVec(a), rhs, tol=1e-8, maxiter=3000, check_every=1)
    diag = torch.diagonal(a, dim1=1, dim2=2).clone()
    x_jac, res_jac = pcg(DenseMatVec(a), rhs, precond=diag, tol=1e-8, maxiter=3000, check_every=1)
    assert bool(res_jac.converged.all())
    it_plain, it_jac = res_plain.iterations, res_jac.iterations
    # With Jacobi the iteration count is that of the well-conditioned B (a handful).
    assert bool((it_jac * 5 < it_plain).all()), (it_jac.tolist(), it_plain.tolist())
    assert int(it_jac.max()) <= 30
    for i in range(2):
        assert rel(x_jac[i], x_ref[i]) < 1e-6


def test_per_scene_convergence_and_active_set():
    gen = torch.Generator().manual_seed(2)
    n = 30
    a = torch.stack([
        spd(n, 100.0, gen),  # scene 0: zero rhs -> never touched
        torch.eye(n, dtype=F64) * 3.0,  # scene 1: trivial, converges in one iteration
        spd(n, 1e4, gen),  # scene 2: hard
    ])
    rhs = torch.randn(3, n, generator=gen, dtype=F64)
    rhs[0] = 0
    mv = DenseMatVec(a)
    x, res = pcg(mv, rhs, tol=1e-10, maxiter=1000, check_every=1)
    its = res.iterations.tolist()
    assert its[0] == 0 and its[1] == 1 and its[2] > 10, its
    assert res.converged.tolist() == [True, True, True]
    assert bool((x[0] == 0).all())
    torch.testing.assert_close(x[1], rhs[1] / 3.0)
    torch.testing.assert_close(x[2], torch.linalg.solve(a[2], rhs[2]), rtol=1e-5, atol=1e-8)
    # The zero-rhs scene is never passed to the matvec; once scene 1 converged (after its
    # first iteration), only the still-active scene 2 is.
    assert mv.calls[0] == [1, 2]
    assert all(c == [2] for c in mv.calls[1:]), mv.calls[:5]
    assert len(mv.calls) == its[2]
    assert all(0 not in c for c in mv.calls)


def test_per_scene_convergence_with_coarse_checks():
    """With ``check_every > 1`` a converged scene leaves the active set at the next check."""
    gen = torch.Generator().manual_seed(3)
    n = 30
    a = torch.stack([torch.eye(n, dtype=F64) * 2.0, spd(n, 1e3, gen)])
    rhs = torch.randn(2, n, generator=gen, dtype=F64)
    mv = DenseMatVec(a)
    x, res = pcg(mv, rhs, tol=1e-10, maxiter=1000, check_every=4)
    assert res.iterations[0] == 4  # ran until the first check
    assert res.iterations[1] > 4
    assert mv.calls[:4] == [[0, 1]] * 4
    assert all(c == [1] for c in mv.calls[4:])
    torch.testing.assert_close(x, torch.linalg.solve(a, rhs), rtol=1e-6, atol=1e-10)


def test_exact_convergence_between_checks_is_not_indefinite():
    a = torch.stack([torch.eye(5, dtype=F64) * 2.0, torch.diag(torch.arange(1.0, 6.0, dtype=F64))])
    rhs = torch.ones(2, 5, dtype=F64)
    x, res = pcg(DenseMatVec(a), rhs, tol=1e-10, maxiter=100, check_every=4)
    assert res.converged.tolist() == [True, True]
    torch.testing.assert_close(x, torch.linalg.solve(a, rhs))
    assert res.indefinite.tolist() == [False, False]


def test_warm_start_at_solution_takes_zero_iterations():
    gen = torch.Generator().manual_seed(4)
    a = torch.stack([spd(25, 50.0, gen), spd(25, 500.0, gen)])
    rhs = torch.randn(2, 25, generator=gen, dtype=F64) * torch.tensor([[1e-3], [1e4]], dtype=F64)
    x_ref = torch.linalg.solve(a, rhs)
    mv = DenseMatVec(a)
    x, res = pcg(mv, rhs, x0=x_ref, tol=1e-8, maxiter=100)
    assert res.iterations.tolist() == [0, 0]
    assert res.converged.tolist() == [True, True]
    assert len(mv.calls) == 1  # only the initial residual b - A x0
    torch.testing.assert_close(x, x_ref, rtol=1e-12, atol=0)
    # A poor warm start still converges to the same answer.
    x2, res2 = pcg(DenseMatVec(a), rhs, x0=x_ref + 0.1 * x_ref.abs().mean(), tol=1e-12, maxiter=500)
    assert bool(res2.converged.all())
    torch.testing.assert_close(x2, x_ref, rtol=1e-8, atol=1e-8 * float(x_ref.abs().max()))


def test_warm_start_for_a_zero_rhs_returns_zero():
    gen = torch.Generator().manual_seed(5)
    a = torch.stack([spd(10, 20.0, gen), spd(10, 20.0, gen)])
    rhs = torch.randn(2, 10, generator=gen, dtype=F64)
    rhs[1] = 0.0
    x0 = torch.randn(2, 10, generator=gen, dtype=F64)
    x, res = pcg(DenseMatVec(a), rhs, x0=x0, tol=1e-10, maxiter=200)
    assert torch.equal(x[1], torch.zeros(10, dtype=F64)) and int(res.iterations[1]) == 0
    torch.testing.assert_close(x[0], torch.linalg.solve(a[0], rhs[0]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scale", [1e-12, 1e-18])
def test_tiny_rhs_float32_is_normalized(scale):
    """Cotangents of 1e-12 (or smaller) in float32: the solve is scale-invariant."""
    gen = torch.Generator().manual_seed(5)
    a64 = torch.stack([spd(20, 20.0, gen), spd(20, 200.0, gen)])
    rhs64 = torch.randn(2, 20, generator=gen, dtype=F64)
    x_ref = torch.linalg.solve(a64, rhs64) * scale
    a = a64.float()
    rhs = (rhs64 * scale).float()
    x, res = pcg(DenseMatVec(a), rhs, precond=torch.diagonal(a, dim1=1, dim2=2).clone(), tol=1e-5,
                 maxiter=200, check_every=1)
    assert x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    assert res.converged.tolist() == [True, True]
    assert 0 < int(res.iterations.min())  # not mistaken for a zero right-hand side
    for i in range(2):
        err = float((x[i].double() - x_ref[i]).norm() / x_ref[i].norm())
        assert err < 1e-3, (i, err)
    # The result is exactly what the unit-scale problem gives, times the scale.
    x1, _ = pcg(DenseMatVec(a), rhs64.float(), precond=torch.diagonal(a, dim1=1, dim2=2).clone(),
                tol=1e-5, maxiter=200, check_every=1)
    torch.testing.assert_close(x / scale, x1, rtol=1e-4, atol=1e-4 * float(x1.abs().max()))


def test_indefinite_system_is_flagged():
    a = torch.diag_embed(torch.tensor([[1.0, 2.0, -3.0, 4.0]], dtype=F64))
    rhs = torch.ones(1, 4, dtype=F64)
    x, res = pcg(DenseMatVec(a), rhs, tol=1e-10, maxiter=50, check_every=1)
    assert bool(res.indefinite[0]) and not bool(res.converged[0])
    assert bool(torch.isfinite(x).all())


# --------------------------------------------------------------------------------------------
# Hessian matrix-vector products on a tiny float64 scene
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """6 Gaussians, 2 views of 8x8, SH degree 1: images rendered from perturbed parameters, so
    the residuals at theta are small but non-zero."""
    s = make_scene(6, 8, 2, dtype=F64, seed=11, sh_degree=1)
    layout = s.params.layout
    theta = s.params.flatten()
    gen = torch.Generator().manual_seed(12)
    p_true = GaussianParams.unflatten(theta + 0.05 * torch.randn(theta.shape, generator=gen, dtype=F64),
                                      layout)
    images = render_params(p_true, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images.clamp(0, 1), s.extrinsics, s.intrinsics, s.near, s.far)
    obj = Objective(views, layout)
    lam = layout.per_group({g: 0.5 for g in GROUPS}, dtype=F64)
    lam = lam * (1 + torch.rand(lam.shape, generator=gen, dtype=F64))  # not a multiple of I
    r = obj.residual(theta)
    assert float(r.abs().max()) > 1e-3  # non-trivial residuals
    jac = torch.autograd.functional.jacobian(lambda t: obj.residual(t[None])[0], theta[0])
    probe = torch.randn(1, layout.numel, generator=gen, dtype=F64)
    return dict(obj=obj, layout=layout, theta=theta, lam=lam, jac=jac, p=probe)


def test_gauss_newton_autodiff_equals_explicit_jacobian(tiny):
    jac, p, lam = tiny["jac"], tiny["p"], tiny["lam"]
    mv = GaussNewtonAutodiff(tiny["obj"], tiny["theta"], tiny["theta"], lam)
    idx = torch.arange(1)
    expected = (jac.T @ (jac @ p[0]) + lam[0] * p[0])[None]
    got = mv(p, idx)
    assert rel(got, expected) < 1e-8, rel(got, expected)
    # The pieces on their own.
    assert rel(mv.jvp(p, idx), (jac @ p[0])[None]) < 1e-10
    u = torch.randn(1, jac.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    assert rel(mv.jt(u, idx), (jac.T @ u[0])[None]) < 1e-10
    assert mv.num_matvecs == 1


def test_finite_difference_jvp_matches_exact(tiny):
    jac, p, lam = tiny["jac"], tiny["p"], tiny["lam"]
    idx = torch.arange(1)
    fd = GaussNewtonFiniteDifference(tiny["obj"], tiny["theta"], tiny["theta"], lam, fd_eps=1e-6)
    exact_jvp = (jac @ p[0])[None]
    err = rel(fd.jvp(p, idx), exact_jvp)
    assert err < 1e-4, err
    # And the whole Gauss-Newton product, through the renderer's own backward for J^T.
    expected = (jac.T @ exact_jvp[0] + lam[0] * p[0])[None]
    assert rel(fd(p, idx), expected) < 1e-4
    # make_matvec picks it by name.
    mv = make_matvec("finite_difference", "gauss_newton", tiny["obj"], tiny["theta"], tiny["theta"], lam, 1e-6)
    assert isinstance(mv, GaussNewtonFiniteDifference)


def test_exact_hessian_matches_autograd_hessian(tiny):
    obj, theta, lam, p = tiny["obj"], tiny["theta"], tiny["lam"], tiny["p"]

    def data_term(t):
        r = obj.residual(t[None])[0]
        return 0.5 * (r * r).sum()

    hess = torch.autograd.functional.hessian(data_term, theta[0])
    mv = ExactHessian(obj, theta, theta, lam)
    got = mv(p, torch.arange(1))
    expected = (hess @ p[0] + lam[0] * p[0])[None]
    assert rel(got, expected) < 1e-8, rel(got, expected)
    # The exact Hessian differs from Gauss-Newton by the residual-curvature term sum_k r_k H_k,
    # which is not negligible here (residuals are non-zero).
    gn = GaussNewtonAutodiff(obj, theta, theta, lam)(p, torch.arange(1))
    assert rel(gn, expected) > 1e-4
    assert isinstance(make_matvec("autodiff", "exact", obj, theta, theta, lam, 1e-3), ExactHessian)


def test_jtj_diag_estimate_is_unbiased_and_non_negative(tiny):
    jac = tiny["jac"]
    true = (jac * jac).sum(0)
    gen = torch.Generator().manual_seed(7)
    for cls in (GaussNewtonAutodiff, GaussNewtonFiniteDifference):
        mv = cls(tiny["obj"], tiny["theta"], tiny["theta"], tiny["lam"])
        est = mv.jtj_diag(400, gen)[0]
        assert bool((est >= 0).all())
        err = rel(est, true)
        assert err < 0.15, (cls.__name__, err)
        # Few probes: noisy but still never negative.
        few = mv.jtj_diag(2, gen)[0]
        assert bool((few >= 0).all())
