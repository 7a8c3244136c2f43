"""Behaviour of the Diff3R layer: bad inputs, failure policies, autograd modes, batching,
``steps=0`` and the Huber option."""

import dataclasses
import warnings

import pytest
import torch

from diff3r_plugin.data.synthetic import make_scene
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import (InvalidLambdaError, LayoutMismatchError, PCGNotConvergedError,
                                  ShapeError, SolverDivergedError)
from diff3r_plugin.gaussians.layout import GROUPS, GaussianLayout, GaussianParams
from diff3r_plugin.layer import ContextViews, Diff3RInfo, Diff3RLayer, Objective, diff3r_layer
from diff3r_plugin.render.api import render_params

F64 = torch.float64
G, SIZE = 8, 8

FAST = dict(steps=5, inner_solver="adam")


def make_problem(seed=0, dtype=F64, noise=0.05, sh_degree=0):
    s = make_scene(G, SIZE, 2, dtype=dtype, seed=seed, sh_degree=sh_degree)
    layout = s.params.layout
    theta0 = s.params.flatten()
    gen = torch.Generator().manual_seed(seed + 100)
    p_true = GaussianParams.unflatten(theta0 + noise * torch.randn(theta0.shape, generator=gen, dtype=dtype),
                                      layout)
    images = render_params(p_true, s.extrinsics, s.intrinsics, s.near, s.far, s.image_shape).color
    views = ContextViews(images.clamp(0, 1), s.extrinsics, s.intrinsics, s.near, s.far)
    lam = layout.per_group({g: 0.5 for g in GROUPS}, dtype=dtype)
    t = make_scene(G, SIZE, 3, dtype=dtype, seed=seed + 50)
    target = (t.extrinsics[:, 1:2], t.intrinsics[:, 1:2], t.near[:, 1:2], t.far[:, 1:2])

    def outer(theta):
        b = theta.shape[0]
        extr, intr, near, far = (x.expand(b, *x.shape[1:]) for x in target)
        color = render_params(GaussianParams.unflatten(theta, layout), extr, intr, near, far, (SIZE, SIZE)).color
        return (color ** 2).sum()

    return dict(layout=layout, theta0=theta0, lam=lam, views=views, outer=outer, params=s.params)


@pytest.fixture(scope="module")
def prob():
    return make_problem()


def replace_views(views, **kw):
    return dataclasses.replace(views, **kw)


def cat_views(a: ContextViews, b: ContextViews) -> ContextViews:
    return ContextViews(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in
                          ("images", "extrinsics", "intrinsics", "near", "far")))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group,value,kind", [
    ("opacity_logits", 0.0, "non-positive"),
    ("quats", -1.0, "non-positive"),
    ("sh_dc", float("nan"), "NaN"),
    ("log_scales", float("inf"), "NaN/Inf"),
])
def test_invalid_lambda_names_the_group(prob, group, value, kind):
    lam = prob["lam"].clone()
    s = prob["layout"].slices[group]
    lam[0, s.start + 1] = value
    with pytest.raises(InvalidLambdaError, match=group) as exc:
        diff3r_layer(prob["theta0"], lam, prob["views"], prob["layout"], Diff3RConfig(**FAST))
    assert kind in str(exc.value)


def test_layout_mismatches(prob):
    theta0, lam, views, layout = prob["theta0"], prob["lam"], prob["views"], prob["layout"]
    cfg = Diff3RConfig(**FAST)
    with pytest.raises(LayoutMismatchError, match="theta0"):
        diff3r_layer(theta0[:, :-1], lam[:, :-1], views, layout, cfg)  # wrong n
    with pytest.raises(LayoutMismatchError, match="lam"):
        diff3r_layer(theta0, lam[:, :-3], views, layout, cfg)  # theta0 vs lam
    with pytest.raises(LayoutMismatchError):
        diff3r_layer(theta0, lam.expand(2, -1), views, layout, cfg)  # batch of lam
    with pytest.raises(LayoutMismatchError, match="batch"):
        diff3r_layer(theta0.expand(2, -1), lam.expand(2, -1), views, layout, cfg)  # views batch 1
    other = GaussianLayout(G, sh_degree=1)
    with pytest.raises(LayoutMismatchError):
        diff3r_layer(theta0, lam, views, other, cfg)  # layout of another SH degree
    with pytest.raises(LayoutMismatchError):
        diff3r_layer(theta0[0], lam[0], views, layout, cfg)  # unbatched
    with pytest.raises(LayoutMismatchError):
        Diff3RLayer(cfg)(theta0, lam, views)  # flat vectors without a layout


@pytest.mark.user_errors
def test_views_without_images(prob):
    views = replace_views(prob["views"], images=None)
    with pytest.raises(ShapeError, match="images"):
        diff3r_layer(prob["theta0"], prob["lam"], views, prob["layout"], Diff3RConfig(**FAST))
    with pytest.raises(LayoutMismatchError, match="views"):
        diff3r_layer(prob["theta0"], prob["lam"], None, prob["layout"], Diff3RConfig(**FAST))


def test_images_normalized_to_minus_one_one(prob):
    views = prob["views"]
    bad = replace_views(views, images=views.images * 2 - 1)
    with pytest.raises(ShapeError, match=r"\[0, 1\]") as exc:
        diff3r_layer(prob["theta0"], prob["lam"], bad, prob["layout"], Diff3RConfig(**FAST))
    msg = str(exc.value)
    assert "[-1, 1]" in msg and "0.5" in msg and "normaliz" in msg


@pytest.mark.user_errors
def test_mismatched_view_counts(prob):
    views = prob["views"]
    three = torch.cat([views.extrinsics, views.extrinsics[:, :1]], 1)
    with pytest.raises(ShapeError, match="view"):
        diff3r_layer(prob["theta0"], prob["lam"], replace_views(views, extrinsics=three), prob["layout"],
                     Diff3RConfig(**FAST))
    with pytest.raises(ShapeError):
        diff3r_layer(prob["theta0"], prob["lam"], replace_views(views, near=views.near[:, :1]), prob["layout"],
                     Diff3RConfig(**FAST))
    with pytest.raises(ShapeError):
        diff3r_layer(prob["theta0"], prob["lam"], replace_views(views, images=views.images[:, :1]),
                     prob["layout"], Diff3RConfig(**FAST))


# --------------------------------------------------------------------------------------------
# Failure policies
# --------------------------------------------------------------------------------------------

def nan_after(monkeypatch, n_ok: int):
    """Make ``Objective.render`` return NaN from its ``n_ok + 1``-th call on."""
    original = Objective.render
    calls = {"n": 0}

    def render(self, theta, *args, **kwargs):
        out = original(self, theta, *args, **kwargs)
        calls["n"] += 1
        return out if calls["n"] <= n_ok else torch.full_like(out, float("nan"))

    monkeypatch.setattr(Objective, "render", render)
    return calls


def test_nan_mid_optimization_fallback(prob, monkeypatch):
    # Adam renders once for the initial energy, then once per step: with 4 good renders the
    # iterates of steps 1-3 are finite and step 4 produces NaN.
    cfg = Diff3RConfig(steps=10, inner_solver="adam", on_failure="fallback")
    reference, _ = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"],
                                dataclasses.replace(cfg, steps=3))
    nan_after(monkeypatch, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fallback is silent ...
        theta_star, info = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    assert bool(torch.isfinite(theta_star).all())
    torch.testing.assert_close(theta_star, reference, rtol=0, atol=0)  # the last finite iterate
    assert not torch.equal(theta_star, prob["theta0"])
    assert info.nan_rollbacks.tolist() == [1]
    assert info.inner_steps.tolist() == [3]
    assert any("NaN" in m for m in info.messages)  # ... but recorded


def nan_after_linearization(monkeypatch, n_ok: int):
    """Make the LM's linearization (``SparseJacobian.build``) give NaN residuals from its
    ``n_ok + 1``-th call on."""
    from diff3r_plugin.layer.sparse_jacobian import SparseJacobian
    original = SparseJacobian.build.__func__
    calls = {"n": 0}

    def build(cls, *args, **kwargs):
        sj = original(cls, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > n_ok:
            sj.residual = torch.full_like(sj.residual, float("nan"))
        return sj

    monkeypatch.setattr(SparseJacobian, "build", classmethod(build))
    return calls


def test_nan_mid_optimization_lm_fallback(prob, monkeypatch):
    calls = nan_after_linearization(monkeypatch, 4)
    cfg = Diff3RConfig(steps=10, inner_solver="lm", on_failure="fallback")
    theta_star, info = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    assert bool(torch.isfinite(theta_star).all())
    assert int(info.nan_rollbacks[0]) >= 1
    assert calls["n"] > 4
    assert int(info.inner_steps[0]) >= 3  # the steps before the NaN were kept


def test_nan_mid_optimization_lm_autodiff_fallback(prob, monkeypatch):
    nan_after(monkeypatch, 40)
    cfg = Diff3RConfig(steps=10, inner_solver="lm", on_failure="fallback", matvec="autodiff")
    theta_star, info = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    assert bool(torch.isfinite(theta_star).all())
    assert int(info.nan_rollbacks[0]) >= 1


def test_nan_mid_optimization_raise(prob, monkeypatch):
    nan_after(monkeypatch, 3)
    cfg = Diff3RConfig(steps=10, inner_solver="adam", on_failure="raise")
    with pytest.raises(SolverDivergedError, match="NaN"):
        diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)


def test_nan_mid_optimization_warn(prob, monkeypatch):
    nan_after(monkeypatch, 3)
    cfg = Diff3RConfig(steps=10, inner_solver="adam", on_failure="warn")
    with pytest.warns(RuntimeWarning, match="rolled back"):
        theta_star, info = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    assert bool(torch.isfinite(theta_star).all())
    assert info.nan_rollbacks.tolist() == [1]


def _backward(prob, cfg):
    t = prob["theta0"].clone().requires_grad_(True)
    lam = prob["lam"].clone().requires_grad_(True)
    theta_star, info = diff3r_layer(t, lam, prob["views"], prob["layout"], cfg)
    prob["outer"](theta_star).backward()
    return t.grad, lam.grad, info


def test_pcg_not_converged_raise(prob):
    cfg = Diff3RConfig(**FAST, pcg_maxiter=1, on_failure="raise")
    t = prob["theta0"].clone().requires_grad_(True)
    theta_star, info = diff3r_layer(t, prob["lam"], prob["views"], prob["layout"], cfg)  # forward is fine
    with pytest.raises(PCGNotConvergedError, match="PCG did not converge"):
        prob["outer"](theta_star).backward()


def test_pcg_not_converged_warn(prob):
    cfg = Diff3RConfig(**FAST, pcg_maxiter=1, on_failure="warn")
    with pytest.warns(RuntimeWarning, match="PCG did not converge"):
        g_t, g_l, info = _backward(prob, cfg)
    assert info.pcg_converged.tolist() == [False]
    assert info.pcg_iters.tolist() == [1]
    assert float(info.pcg_rel_residual[0]) > cfg.pcg_tol
    assert bool(torch.isfinite(g_t).all()) and bool(torch.isfinite(g_l).all())
    assert float(g_t.abs().max()) > 0
    # A converged solve on the same problem reports convergence.
    g_t2, _, info2 = _backward(prob, dataclasses.replace(cfg, pcg_maxiter=500, pcg_tol=1e-6))
    assert info2.pcg_converged.tolist() == [True]
    assert float(info2.pcg_rel_residual[0]) <= 1e-6 * 1.5
    assert float(torch.nn.functional.cosine_similarity(g_t, g_t2)) < 0.9999


def test_pcg_not_converged_fallback_is_silent_but_recorded(prob):
    cfg = Diff3RConfig(**FAST, pcg_maxiter=1, on_failure="fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        g_t, g_l, info = _backward(prob, cfg)
    assert info.pcg_converged.tolist() == [False]
    assert any("PCG did not converge" in m for m in info.messages)
    assert bool(torch.isfinite(g_t).all()) and bool(torch.isfinite(g_l).all())


@pytest.mark.parametrize("backward", ["implicit", "unroll"])
@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_inputs_not_modified(prob, backward, solver):
    views = prob["views"]
    t = prob["theta0"].clone().requires_grad_(True)
    lam = prob["lam"].clone().requires_grad_(True)
    before = {"theta0": t.detach().clone(), "lam": lam.detach().clone()}
    for f in ("images", "extrinsics", "intrinsics", "near", "far"):
        before[f] = getattr(views, f).clone()
    cfg = Diff3RConfig(steps=3, inner_solver=solver, backward=backward)
    theta_star, _ = diff3r_layer(t, lam, views, prob["layout"], cfg)
    prob["outer"](theta_star).backward()
    assert torch.equal(t.detach(), before["theta0"]) and torch.equal(lam.detach(), before["lam"])
    for f in ("images", "extrinsics", "intrinsics", "near", "far"):
        assert torch.equal(getattr(views, f), before[f]), f
    assert not torch.equal(theta_star.detach(), before["theta0"])
    assert t.grad is not None and lam.grad is not None


# --------------------------------------------------------------------------------------------
# Autograd modes
# --------------------------------------------------------------------------------------------

def test_inference_mode(prob):
    cfg = Diff3RConfig(steps=4, inner_solver="lm")
    expected, _ = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    t = prob["theta0"].clone().requires_grad_(True)
    with torch.inference_mode():
        theta_star, info = diff3r_layer(t, prob["lam"], prob["views"], prob["layout"], cfg)
        # Inputs created inside inference mode (e.g. a Lightning test step) work too.
        v = prob["views"]
        views_i = ContextViews(v.images.clone(), v.extrinsics.clone(), v.intrinsics.clone(),
                               v.near.clone(), v.far.clone())
        theta_i, _ = diff3r_layer(prob["theta0"].clone(), prob["lam"].clone(), views_i, prob["layout"], cfg)
    for th in (theta_star, theta_i):
        assert bool(torch.isfinite(th).all()) and not th.requires_grad
        torch.testing.assert_close(th, expected, rtol=1e-9, atol=1e-12)
    assert float(info.stationarity[0]) < 1


def test_no_grad(prob):
    cfg = Diff3RConfig(steps=4, inner_solver="lm")
    expected, _ = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    t = prob["theta0"].clone().requires_grad_(True)
    with torch.no_grad():
        theta_star, info = diff3r_layer(t, prob["lam"], prob["views"], prob["layout"], cfg)
    assert bool(torch.isfinite(theta_star).all()) and not theta_star.requires_grad
    torch.testing.assert_close(theta_star, expected, rtol=1e-9, atol=1e-12)
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------------------------
# Batching, steps=0, module wrapper
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_batch_equals_separate_scenes(solver):
    a, b = make_problem(seed=1), make_problem(seed=2)
    if solver == "lm":
        # Converged (LM's Jacobi probes depend on the batch, so only the optimum is shared).
        cfg = Diff3RConfig(steps=10, inner_solver="lm", stationarity_tol=1e-7, pcg_tol=1e-10,
                           pcg_maxiter=1000)
    else:
        cfg = Diff3RConfig(steps=30, inner_solver="adam", stationarity_tol=0.0, pcg_tol=1e-10,
                           pcg_maxiter=1000)
    layout = a["layout"]
    t = torch.cat([a["theta0"], b["theta0"]]).requires_grad_(True)
    lam = torch.cat([a["lam"], 2 * b["lam"]]).requires_grad_(True)
    theta_star, info = diff3r_layer(t, lam, cat_views(a["views"], b["views"]), layout, cfg)
    (a["outer"](theta_star[:1]) + b["outer"](theta_star[1:])).backward()
    # Per-scene diagnostics.
    for name in ("inner_steps", "stationarity", "initial_energy", "final_energy", "nan_rollbacks",
                 "pcg_iters", "pcg_rel_residual", "pcg_converged", "rhs_norm"):
        assert tuple(getattr(info, name).shape) == (2,), name
    assert isinstance(info, Diff3RInfo) and isinstance(info.summary(), dict)
    for i, (p, scale) in enumerate(((a, 1.0), (b, 2.0))):
        ti = p["theta0"].clone().requires_grad_(True)
        li = (scale * p["lam"]).requires_grad_(True)
        th_i, info_i = diff3r_layer(ti, li, p["views"], layout, cfg)
        p["outer"](th_i).backward()
        torch.testing.assert_close(theta_star[i:i + 1].detach(), th_i.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(info.final_energy[i:i + 1], info_i.final_energy, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(t.grad[i:i + 1], ti.grad, rtol=0, atol=1e-6 * float(ti.grad.abs().max()))
        torch.testing.assert_close(lam.grad[i:i + 1], li.grad, rtol=0, atol=1e-6 * float(li.grad.abs().max()))
    assert not torch.allclose(theta_star[0], theta_star[1])


def test_steps_zero_returns_theta0(prob):
    cfg = Diff3RConfig(steps=0)
    theta_star, info = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    assert torch.equal(theta_star, prob["theta0"])
    assert theta_star.data_ptr() != prob["theta0"].data_ptr()  # a copy, not an alias of the input
    assert info.inner_steps.tolist() == [0] and info.nan_rollbacks.tolist() == [0]
    # Unrolled: identity, gradient passes straight through.
    t = prob["theta0"].clone().requires_grad_(True)
    th, _ = diff3r_layer(t, prob["lam"], prob["views"], prob["layout"],
                         dataclasses.replace(cfg, backward="unroll"))
    prob["outer"](th).backward()
    ref = prob["theta0"].clone().requires_grad_(True)
    prob["outer"](ref).backward()
    torch.testing.assert_close(t.grad, ref.grad)


def test_steps_zero_implicit_gradient_is_identity(prob):
    t = prob["theta0"].clone().requires_grad_(True)
    lam = prob["lam"].clone().requires_grad_(True)
    th, _ = diff3r_layer(t, lam, prob["views"], prob["layout"], Diff3RConfig(steps=0))
    prob["outer"](th).backward()
    ref = prob["theta0"].clone().requires_grad_(True)
    prob["outer"](ref).backward()
    assert lam.grad is None or float(lam.grad.abs().max()) == 0
    torch.testing.assert_close(t.grad, ref.grad)


def test_module_with_gaussian_params(prob):
    cfg = Diff3RConfig(steps=3, inner_solver="adam")
    params = prob["params"]
    lam_params = GaussianParams.unflatten(prob["lam"], prob["layout"])
    out, info = Diff3RLayer(cfg)(params, lam_params, prob["views"])
    assert isinstance(out, GaussianParams)
    flat, _ = diff3r_layer(prob["theta0"], prob["lam"], prob["views"], prob["layout"], cfg)
    torch.testing.assert_close(out.flatten(), flat)
    out2, _ = Diff3RLayer(cfg, steps=3)(prob["theta0"], prob["lam"], prob["views"], prob["layout"])
    torch.testing.assert_close(out2, flat)


# --------------------------------------------------------------------------------------------
# Robust loss
# --------------------------------------------------------------------------------------------

def test_huber_downweights_outlier_patch():
    p = make_problem(seed=4, noise=0.03)
    views = p["views"]
    corrupted = views.images.clone()
    corrupted[0, 0, :, 1:5, 2:6] = 1.0 - corrupted[0, 0, :, 1:5, 2:6]  # a wrong patch in view 0
    bad = replace_views(views, images=corrupted)
    assert float((corrupted - views.images).abs().max()) > 0.5
    # Small Lambda: the data term dominates, so an outlier can pull theta* a long way.
    lam = p["layout"].per_group({g: 0.05 for g in GROUPS}, dtype=F64)
    base = dict(steps=5, inner_solver="lm", stationarity_tol=1e-6)
    clean, _ = diff3r_layer(p["theta0"], lam, views, p["layout"], Diff3RConfig(**base))
    l2, _ = diff3r_layer(p["theta0"], lam, bad, p["layout"], Diff3RConfig(**base))
    hub, info = diff3r_layer(p["theta0"], lam, bad, p["layout"],
                             Diff3RConfig(**base, robust="huber", huber_delta=0.05))
    assert bool(torch.isfinite(hub).all()) and info.nan_rollbacks.tolist() == [0]
    d_l2 = float((l2 - clean).norm())
    d_hub = float((hub - clean).norm())
    print(f"\ndistance to the clean solution: L2 {d_l2:.4f}, Huber {d_hub:.4f}")
    assert d_hub < 0.5 * d_l2
    # The weights are below one exactly on the corrupted pixels (and nowhere else much).
    obj = Objective(bad, p["layout"], robust="huber", huber_delta=0.05)
    w = obj.pixel_weights(p["theta0"]) ** 2
    assert float(w[0, 0, :, 1:5, 2:6].mean()) < 0.3
    assert float(w[0, 1].mean()) > 0.8
