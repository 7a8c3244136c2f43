"""Gradients of the Diff3R layer: implicit (IFT + PCG) against central finite differences of
the converged inner solve, against the unrolled reference, and for tiny cotangents.

All on a tiny float64 scene (12 Gaussians, two 10x10 context views) whose context images are
rendered from perturbed parameters, so the context residuals at the optimum are small but not
zero. The outer loss is the squared colour of renders from a camera that is not a context view.
"""

import pytest
import torch
import torch.nn.functional as F

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.gaussians.layout import GROUPS, GaussianParams
from diff3r_plugin.layer import ContextViews, Objective, diff3r_layer
from diff3r_plugin.render.api import render_params

F64 = torch.float64
G, SIZE = 12, 10
NOISE = 0.03  # perturbation of the true parameters w.r.t. theta0
LAM = 0.5
EPS = 1e-3  # central finite-difference step (float64; the solve is converged to ~1e-10)
K = 2  # random directions for theta0 and for Lambda each

# Converged inner solve: LM to stationarity 1e-10 (rel. gradient norm), tight backward PCG.
# The energy has small jumps (pairs crossing alpha = 1/255, depth-order swaps), so central
# differences of the solution map are valid only while every perturbed solve stays on one smooth
# branch; with this seed that holds for LM with products through the renderer ("autodiff").
CONVERGED = dict(steps=15, inner_solver="lm", stationarity_tol=1e-10, pcg_tol=1e-10, pcg_maxiter=2000,
                 matvec="autodiff")


def _expand(t, b):
    return t.expand(b, *t.shape[1:])


def build_problem(dtype=F64, seed=2):
    s = make_scene(G, SIZE, 2, dtype=dtype, seed=seed, sh_degree=0)
    layout = s.params.layout
    theta0 = s.params.flatten()
    gen = torch.Generator().manual_seed(5)
    p_true = GaussianParams.unflatten(
        theta0 + NOISE * torch.randn(theta0.shape, generator=gen, dtype=dtype), layout)
    images = render_params(p_true, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images.clamp(0, 1), s.extrinsics, s.intrinsics, s.near, s.far)
    lam = layout.per_group({g: LAM for g in GROUPS}, dtype=dtype)
    t = make_scene(G, SIZE, 3, dtype=dtype, seed=7)
    target = (t.extrinsics[:, 1:2], t.intrinsics[:, 1:2], t.near[:, 1:2], t.far[:, 1:2])

    def outer(theta):
        """Per-scene outer loss [b]: squared colour of the render from a novel camera."""
        b = theta.shape[0]
        extr, intr, near, far = (_expand(x, b) for x in target)
        color = render_params(GaussianParams.unflatten(theta, layout), extr, intr, near, far,
                              (SIZE, SIZE)).color
        return (color ** 2).sum((1, 2, 3, 4))

    def views_b(b):
        return ContextViews(_expand(views.images, b), _expand(views.extrinsics, b),
                            _expand(views.intrinsics, b), _expand(views.near, b), _expand(views.far, b))

    return dict(layout=layout, theta0=theta0, lam=lam, views=views, views_b=views_b, outer=outer)


@pytest.fixture(scope="module")
def prob():
    return build_problem()


@pytest.fixture(scope="module")
def fd(prob):
    """One batched, converged solve of the base point and of every perturbed point.

    Row 0 is the base point (leaf tensors with requires_grad): the implicit exact-Hessian
    gradient comes from it. Rows 1.. are theta0 +- EPS u_k and Lambda * (1 +- EPS w_k); their
    outer losses give the central differences (each row is re-solved to convergence). Their
    cotangent is zero, so the backward PCG leaves them at once.
    """
    theta0, lam, layout = prob["theta0"], prob["lam"], prob["layout"]
    gen = torch.Generator().manual_seed(123)
    u = torch.randn(K, layout.numel, generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    w = torch.randn(K, layout.numel, generator=gen, dtype=F64)
    w = w / w.norm(dim=1, keepdim=True)
    dlam = lam * w  # relative perturbation of Lambda (keeps it positive)
    t_leaf = theta0.clone().requires_grad_(True)
    l_leaf = lam.clone().requires_grad_(True)
    t_rows = torch.cat([theta0 + EPS * u, theta0 - EPS * u, _expand(theta0, 2 * K)])
    l_rows = torch.cat([_expand(lam, 2 * K), lam + EPS * dlam, lam - EPS * dlam])
    b = 1 + 4 * K
    cfg = Diff3RConfig(**CONVERGED, hessian="exact")
    theta_star, info = diff3r_layer(torch.cat([t_leaf, t_rows]), torch.cat([l_leaf, l_rows]),
                                    prob["views_b"](b), layout, cfg)
    losses = prob["outer"](theta_star)
    losses[0].backward()
    with torch.no_grad():
        fd_theta = (losses[1:1 + K] - losses[1 + K:1 + 2 * K]) / (2 * EPS)
        fd_lam = (losses[1 + 2 * K:1 + 3 * K] - losses[1 + 3 * K:]) / (2 * EPS)
    # Context residual at the optimum relative to the images (GN is exact only if it is 0).
    obj = Objective(prob["views"], layout)
    r = obj.residual(theta_star[:1].detach())
    return dict(u=u, dlam=dlam, fd_theta=fd_theta, fd_lam=fd_lam, info=info,
                theta_star=theta_star[:1].detach(), grad_theta0=t_leaf.grad.clone(),
                grad_lam=l_leaf.grad.clone(),
                rel_residual=float(r.norm() / prob["views"].images.norm()))


def directional_gaps(fd, grad_theta0, grad_lam):
    """Per-direction relative errors and the aggregate relative error over the K directions."""
    an_theta = fd["u"] @ grad_theta0[0]
    an_lam = fd["dlam"] @ grad_lam[0]
    per_theta = ((an_theta - fd["fd_theta"]).abs() / fd["fd_theta"].abs()).tolist()
    per_lam = ((an_lam - fd["fd_lam"]).abs() / fd["fd_lam"].abs()).tolist()
    agg_theta = float((an_theta - fd["fd_theta"]).norm() / fd["fd_theta"].norm())
    agg_lam = float((an_lam - fd["fd_lam"]).norm() / fd["fd_lam"].norm())
    return per_theta, per_lam, agg_theta, agg_lam


def test_inner_solve_converged(fd):
    info = fd["info"]
    # The IFT gradient is only exact at a stationary point: every row must be (near) there.
    assert float(info.stationarity.max()) < 1e-8, info.stationarity.tolist()
    assert int(info.nan_rollbacks.sum()) == 0
    assert bool(info.pcg_converged[0]) and float(info.pcg_rel_residual[0]) < 1e-9
    # Rows with a zero cotangent cost no PCG iterations.
    assert int(info.pcg_iters[1:].max()) == 0 and int(info.pcg_iters[0]) > 0
    assert bool((fd["fd_theta"].abs() > 1e-3).all()) and bool((fd["fd_lam"].abs() > 1e-5).all())


def test_implicit_exact_hessian_matches_finite_differences(fd):
    per_theta, per_lam, agg_theta, agg_lam = directional_gaps(fd, fd["grad_theta0"], fd["grad_lam"])
    print(f"\nexact-Hessian implicit vs FD: theta0 {per_theta}, Lambda {per_lam}")
    assert max(per_theta) <= 1e-3, per_theta
    assert max(per_lam) <= 1e-3, per_lam
    assert bool(torch.isfinite(fd["grad_theta0"]).all()) and bool(torch.isfinite(fd["grad_lam"]).all())


def test_gauss_newton_gap_is_small_and_larger_than_exact(prob, fd):
    """Gauss-Newton drops the residual-curvature term sum_k r_k nabla^2 r_k of the Hessian, so
    its implicit gradient is exact only when the context residuals vanish at the optimum. Here
    they are small (a few percent of the image norm), so the gap is small but clearly above
    the exact-Hessian gap."""
    t = prob["theta0"].clone().requires_grad_(True)
    lam = prob["lam"].clone().requires_grad_(True)
    cfg = Diff3RConfig(**CONVERGED, hessian="gauss_newton")
    theta_star, info = diff3r_layer(t, lam, prob["views"], prob["layout"], cfg)
    torch.testing.assert_close(theta_star.detach(), fd["theta_star"], rtol=0, atol=1e-7)
    prob["outer"](theta_star).sum().backward()
    assert bool(info.pcg_converged.all())
    gn = directional_gaps(fd, t.grad, lam.grad)
    ex = directional_gaps(fd, fd["grad_theta0"], fd["grad_lam"])
    print(f"\ncontext residual at optimum: {fd['rel_residual']:.3e} of the image norm")
    print(f"Gauss-Newton implicit vs FD: theta0 {gn[2]:.3e} (per direction {gn[0]}), "
          f"Lambda {gn[3]:.3e} (per direction {gn[1]})")
    print(f"exact-Hessian implicit vs FD: theta0 {ex[2]:.3e}, Lambda {ex[3]:.3e}")
    # Full gradient vectors: GN against the exact-Hessian gradient (which matches FD to <1e-3
    # above), so this is the GN gap to the true derivative in every direction at once.
    full_t = float((t.grad - fd["grad_theta0"]).norm() / fd["grad_theta0"].norm())
    full_l = float((lam.grad - fd["grad_lam"]).norm() / fd["grad_lam"].norm())
    print(f"Gauss-Newton vs exact gradient (full vectors): theta0 {full_t:.3e}, Lambda {full_l:.3e}")
    assert fd["rel_residual"] < 0.1
    assert full_t < 5e-2 and full_l < 5e-2
    assert full_t > 1e-3 and full_l > 1e-3  # ... but not zero: the dropped term matters
    # Along the FD directions: GN is clearly worse than the exact Hessian, yet still close.
    assert gn[2] > 3 * ex[2] and gn[3] > 3 * ex[3]
    assert gn[2] < 0.1 and gn[3] < 0.1


def test_implicit_matches_unrolled_lm(prob, fd):
    t = prob["theta0"].clone().requires_grad_(True)
    lam = prob["lam"].clone().requires_grad_(True)
    # 6 LM steps reach stationarity ~1e-8 (unrolling costs ~2x a plain forward per step).
    cfg = Diff3RConfig(**{**CONVERGED, "steps": 6}, hessian="exact", backward="unroll")
    theta_star, info = diff3r_layer(t, lam, prob["views"], prob["layout"], cfg)
    assert theta_star.requires_grad and theta_star.grad_fn is not None
    assert float(info.stationarity[0]) < 1e-6
    prob["outer"](theta_star).sum().backward()
    cos_t = float(F.cosine_similarity(t.grad, fd["grad_theta0"]))
    cos_l = float(F.cosine_similarity(lam.grad, fd["grad_lam"]))
    rel_t = float((t.grad - fd["grad_theta0"]).norm() / t.grad.norm())
    rel_l = float((lam.grad - fd["grad_lam"]).norm() / lam.grad.norm())
    print(f"\nimplicit (exact H) vs unrolled LM: cos theta0 {cos_t:.8f} (rel {rel_t:.2e}), "
          f"cos Lambda {cos_l:.8f} (rel {rel_l:.2e})")
    assert cos_t > 0.999 and cos_l > 0.999
    assert rel_t < 1e-3 and rel_l < 1e-3


def test_adam_unroll_vs_implicit(prob):
    """Adam does not reach stationarity as fast as LM; after enough steps the implicit
    gradient (which assumes stationarity) and the unrolled one agree in direction."""
    grads = {}
    infos = {}
    for backward in ("implicit", "unroll"):
        t = prob["theta0"].clone().requires_grad_(True)
        lam = prob["lam"].clone().requires_grad_(True)
        cfg = Diff3RConfig(steps=300, inner_solver="adam", stationarity_tol=0.0, backward=backward,
                           hessian="exact", pcg_tol=1e-8, pcg_maxiter=2000)
        theta_star, infos[backward] = diff3r_layer(t, lam, prob["views"], prob["layout"], cfg)
        prob["outer"](theta_star).sum().backward()
        grads[backward] = (t.grad, lam.grad)
    torch.testing.assert_close(infos["implicit"].final_energy, infos["unroll"].final_energy)
    cos_t = float(F.cosine_similarity(grads["implicit"][0], grads["unroll"][0]))
    cos_l = float(F.cosine_similarity(grads["implicit"][1], grads["unroll"][1]))
    stat = float(infos["implicit"].stationarity[0])
    print(f"\nAdam 300 steps (stationarity {stat:.2e}): cos theta0 {cos_t:.4f}, cos Lambda {cos_l:.4f}")
    assert stat < 0.05
    assert cos_t > 0.9 and cos_l > 0.9


def test_finite_difference_matvec_gives_same_implicit_gradient(prob):
    """The black-box matvec (FD JVP + renderer VJP) reproduces the autodiff GN gradient."""
    grads = []
    for matvec in ("autodiff", "finite_difference"):
        t = prob["theta0"].clone().requires_grad_(True)
        lam = prob["lam"].clone().requires_grad_(True)
        cfg = Diff3RConfig(steps=20, inner_solver="adam", matvec=matvec, fd_eps=1e-6, pcg_tol=1e-10,
                           pcg_maxiter=2000)
        theta_star, info = diff3r_layer(t, lam, prob["views"], prob["layout"], cfg)
        prob["outer"](theta_star).sum().backward()
        assert bool(info.pcg_converged.all()), info.pcg_rel_residual
        grads.append((t.grad, lam.grad))
    for a, b in zip(*grads):
        rel = float((a - b).norm() / a.norm())
        assert rel < 1e-4, rel


def test_huber_implicit_matches_unroll(prob):
    images = prob["views"].images.clone()
    images[0, 0, :, 2:6, 2:6] = 1.0  # an outlier patch, so the Huber weights are not all 1
    v = prob["views"]
    views = ContextViews(images, v.extrinsics, v.intrinsics, v.near, v.far)
    grads = {}
    for backward in ("implicit", "unroll"):
        t = prob["theta0"].clone().requires_grad_(True)
        lam = prob["lam"].clone().requires_grad_(True)
        cfg = Diff3RConfig(**{**CONVERGED, "steps": 6}, hessian="exact", backward=backward,
                           robust="huber", huber_delta=0.05)
        theta_star, info = diff3r_layer(t, lam, views, prob["layout"], cfg)
        if not float(info.stationarity[0]) < 1e-3:  # not the failure this test is about
            raise RuntimeError(f"inner solve not converged: {float(info.stationarity[0]):.2e}")
        prob["outer"](theta_star).sum().backward()
        grads[backward] = t.grad
    # Without Huber the two agree to ~1e-6 at this stationarity (test above); here they differ by
    # ~5e-3 both after 6 and after 12 steps (stationarity 1e-4 and 5e-7): a bias, not noise.
    rel = float((grads["implicit"] - grads["unroll"]).norm() / grads["unroll"].norm())
    assert rel < 1e-3, rel


def test_tiny_cotangent_float32():
    """An outer loss scaled by 1e-12 in float32: finite gradients, exactly 1e-12 x the unscaled
    ones (the PCG right-hand side is normalized, so nothing underflows)."""
    p = build_problem(dtype=torch.float32, seed=3)
    t = p["theta0"].clone().requires_grad_(True)
    lam = p["lam"].clone().requires_grad_(True)
    cfg = Diff3RConfig(steps=10, inner_solver="adam", pcg_tol=1e-4, pcg_maxiter=500)
    theta_star, info = diff3r_layer(t, lam, p["views"], p["layout"], cfg)
    loss = p["outer"](theta_star).sum()
    g1 = torch.autograd.grad(loss, (t, lam), retain_graph=True)
    info1 = (info.pcg_iters.clone(), info.pcg_converged.clone())
    g2 = torch.autograd.grad(1e-12 * loss, (t, lam))
    assert bool(info.pcg_converged.all()) and bool(info1[1].all())
    for a, b in zip(g1, g2):
        assert a.dtype == torch.float32
        assert bool(torch.isfinite(b).all()) and float(b.abs().max()) > 0
        rel = float((b - 1e-12 * a).norm() / (1e-12 * a).norm())
        assert rel < 1e-3, rel
    assert float(info.rhs_norm[0]) < 1e-9  # the tiny cotangent reached the solve


def test_unrolled_sparse_lm_matches_finite_differences_of_its_steps(prob):
    """The unrolled LM on the factored Jacobian differentiates each step's linear solve by an
    adjoint solve (not through PCG's iterations). With exact step solves its gradient is the
    derivative of the K-step map itself: central differences of that map (same K, no
    convergence needed) must agree. The damping term mu * diag is held constant in the
    derivative; with mu <= 1e-3 that leaves a gap far below the tolerance."""
    steps = 4
    cfg = dict(steps=steps, inner_solver="lm", stationarity_tol=0.0, matvec="sparse",
               lm_pcg_tol=1e-13, lm_pcg_iters=500, precond="block_jacobi")
    theta0, lam, layout = prob["theta0"], prob["lam"], prob["layout"]
    t_leaf = theta0.clone().requires_grad_(True)
    l_leaf = lam.clone().requires_grad_(True)
    theta_k, info = diff3r_layer(t_leaf, l_leaf, prob["views"], layout,
                                 Diff3RConfig(**cfg, backward="unroll"))
    assert int(info.inner_steps.max()) == steps
    prob["outer"](theta_k).sum().backward()

    gen = torch.Generator().manual_seed(321)
    u = torch.randn(2, layout.numel, generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    dlam = lam * torch.randn(2, layout.numel, generator=gen, dtype=F64)
    eps = 1e-5
    t_rows = torch.cat([theta0 + eps * u, theta0 - eps * u, _expand(theta0, 4)])
    l_rows = torch.cat([_expand(lam, 4), lam + eps * dlam, lam - eps * dlam])
    with torch.no_grad():
        rows, _ = diff3r_layer(t_rows, l_rows, prob["views_b"](8), layout,
                               Diff3RConfig(**cfg, backward="implicit"))
        # The same map without a graph reaches the same iterate.
        base, _ = diff3r_layer(theta0.clone(), lam.clone(), prob["views"], layout,
                               Diff3RConfig(**cfg, backward="implicit"))
    assert float((base - theta_k.detach()).abs().max()) < 1e-12
    losses = prob["outer"](rows).detach()
    fd_t = (losses[0:2] - losses[2:4]) / (2 * eps)
    fd_l = (losses[4:6] - losses[6:8]) / (2 * eps)
    an_t = u @ t_leaf.grad[0]
    an_l = dlam @ l_leaf.grad[0]
    rel_t = float((an_t - fd_t).norm() / fd_t.norm())
    rel_l = float((an_l - fd_l).norm() / fd_l.norm())
    print(f"\nunrolled sparse LM vs FD of its {steps} steps: theta0 {rel_t:.2e}, Lambda {rel_l:.2e}")
    assert rel_t < 1e-4 and rel_l < 1e-4
