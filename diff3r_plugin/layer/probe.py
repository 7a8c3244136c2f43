"""Is the inner energy smooth where the solve ended? A line probe along the steepest descent.

For a smooth ``E``, a step ``t`` along ``d = -grad E / ||grad E||`` lowers the energy by
``t ||grad E||`` to first order, so the ratio ``(E(theta) - E(theta + t d)) / (t ||grad E||)``
tends to 1 as ``t`` shrinks. A 3DGS rasterizer makes ``E`` piecewise smooth: a pair crosses
``alpha = 1/255`` (the pair list changes) or two overlapping Gaussians swap their depth order
(the front-to-back order of a pixel changes), and the energy jumps. A ratio far from 1 at a small
``t``, together with a changed plan, shows such a jump next to ``theta``; no gradient-based
solver reaches ``grad E = 0`` against it, and the implicit gradient there is a local one.

The energies are evaluated in float64 (a float32 sum over all context pixels cannot resolve
the first-order change of the smallest steps).
"""

from dataclasses import replace

import torch
from torch import Tensor

from .objective import Objective


def plan_changes(plan_a, plan_b, batch: int, pixels_per_scene: int) -> tuple[Tensor, Tensor]:
    """Per scene: the number of (pixel, Gaussian) pairs in only one of two plans, and the number
    of pixels whose front-to-back order of their common pairs differs."""
    device = plan_a.gaussian.device
    ng = int(max(plan_a.gaussian.max() if plan_a.num_pairs else 0,
                 plan_b.gaussian.max() if plan_b.num_pairs else 0)) + 1
    ka = plan_a.pixel * ng + plan_a.gaussian
    kb = plan_b.pixel * ng + plan_b.gaussian
    in_b = torch.isin(ka, kb)
    in_a = torch.isin(kb, ka)
    scene_a = plan_a.pixel // pixels_per_scene
    scene_b = plan_b.pixel // pixels_per_scene
    changed = torch.zeros(batch, dtype=torch.long, device=device)
    changed = changed.index_add(0, scene_a[~in_b], torch.ones_like(scene_a[~in_b]))
    changed = changed.index_add(0, scene_b[~in_a], torch.ones_like(scene_b[~in_a]))
    # Common pairs, grouped by pixel, each pixel in its plan's front-to-back order.
    pa, ga = plan_a.pixel[in_b], plan_a.gaussian[in_b]
    pb, gb = plan_b.pixel[in_a], plan_b.gaussian[in_a]
    oa = torch.argsort(pa, stable=True)
    ob = torch.argsort(pb, stable=True)
    pa, ga, gb = pa[oa], ga[oa], gb[ob]
    swapped_pixels = torch.unique(pa[ga != gb])
    order = torch.zeros(batch, dtype=torch.long, device=device)
    order = order.index_add(0, swapped_pixels // pixels_per_scene, torch.ones_like(swapped_pixels))
    return changed, order


def energy_line_probe(obj: Objective, theta: Tensor, theta0: Tensor, lam: Tensor,
                      steps=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)) -> list[dict]:
    """Probe ``E`` along ``-grad E`` from ``theta`` (per scene) with absolute step lengths
    ``steps`` in the flat parameter space.

    Returns one dict per step with per-scene ``[b]`` tensors: ``decrease`` (actual, float64),
    ``linear`` (``t ||grad E||``), ``ratio`` (their quotient; 1 for a smooth energy and small
    ``t``), and, for the torch backend, ``pairs_changed`` and ``order_changed_pixels`` between
    the plans at ``theta`` and at the probe point.
    """
    dt = torch.float64
    views = obj.views.detached().to(dt)
    sqrt_w = None if obj.frozen_sqrt_w is None else obj.frozen_sqrt_w.to(dt)
    o64 = replace(obj, views=views, frozen_sqrt_w=sqrt_w)
    theta = theta.detach().to(dt)
    theta0 = theta0.detach().to(dt)
    lam = lam.detach().to(dt)
    with torch.inference_mode(False), torch.enable_grad():
        t = theta.clone().requires_grad_(True)
        e = o64.energy(t, theta0, lam, sqrt_w=sqrt_w)
        g = torch.autograd.grad(e.sum(), t)[0]
    e = e.detach()
    gnorm = g.norm(dim=1)
    direction = -g / gnorm.clamp_min(torch.finfo(dt).tiny)[:, None]
    b = theta.shape[0]
    h, w = views.image_shape
    pixels_per_scene = views.num_views * h * w
    plan0 = o64.make_plan(theta) if obj.backend == "torch" else None
    out = []
    with torch.no_grad():
        for step in steps:
            x = theta + step * direction
            e_new = o64.energy(x, theta0, lam, sqrt_w=sqrt_w)
            linear = step * gnorm
            dec = e - e_new
            row = {"step": float(step), "decrease": dec, "linear": linear,
                   "ratio": torch.where(linear > 0, dec / linear.clamp_min(torch.finfo(dt).tiny),
                                        torch.zeros_like(dec))}
            if plan0 is not None:
                row["pairs_changed"], row["order_changed_pixels"] = plan_changes(
                    plan0, o64.make_plan(x), b, pixels_per_scene)
            out.append(row)
    return out


def probe_summary(rows: list[dict], scene: int = 0) -> list[dict]:
    """Plain-Python numbers of one scene of :func:`energy_line_probe` (for JSON)."""
    out = []
    for r in rows:
        item = {"step": r["step"], "decrease": float(r["decrease"][scene]),
                "linear": float(r["linear"][scene]), "ratio": float(r["ratio"][scene])}
        for k in ("pairs_changed", "order_changed_pixels"):
            if k in r:
                item[k] = int(r[k][scene])
        out.append(item)
    return out
