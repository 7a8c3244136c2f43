"""``diff3r bench layer``: implicit (IFT + PCG) against unrolled backward of the TTO layer.

A seeded scene of ``--gaussians`` Gaussians (``theta0``) is optimized on ``--views`` context
views rendered from a perturbed copy of it (the "true" scene); the outer loss is the squared
error of a fixed novel view (between the context cameras) against the true scene's render.
Each (K, backward mode) runs in its own process so that peak memory is measured cleanly:
``*_peak_mb`` is the extra memory allocated during forward + backward above what the process
held before the call (the unrolled graph is built during the forward, so both passes count).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from ..config import Diff3RConfig
from ..gaussians.layout import GROUPS, GaussianParams
from ..layer import ContextViews, diff3r_layer
from ..layer.diagnostics import gaussian_entry_mask, top_gaussians
from ..layer.objective import Objective
from ..layer.probe import energy_line_probe, probe_summary
from ..render import render_params
from ..data.synthetic import make_cameras, make_scene
from .timing import PeakMemory, low_mmap_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gaussians", type=int, default=4096)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--steps", default="10,50,200", help="comma-separated K values")
    p.add_argument("--inner-solver", choices=["adam", "lm"], default="adam")
    p.add_argument("--precond", choices=["block_jacobi", "jacobi", "none"], default="block_jacobi",
                   help="preconditioner of the PCG solves (implicit backward and LM steps)")
    p.add_argument("--matvec", choices=["sparse", "autodiff", "finite_difference"], default="sparse")
    p.add_argument("--hessian", choices=["gauss_newton", "exact"], default="gauss_newton")
    p.add_argument("--visibility", choices=["per_step", "frozen"], default="per_step",
                   help="pair lists of the inner solve: rebuilt at every iterate (upstream's "
                        "rasterizers) or those of theta0 (a smooth energy); with frozen, each run "
                        "also reports the stationarity of the per-step energy at theta_K")
    p.add_argument("--lam", type=float, default=1.0,
                   help="constant Lambda for every parameter (default: the uncertainty head's initial value)")
    p.add_argument("--stationarity-tol", type=float, default=None,
                   help="inner stopping tolerance (default: 1e-4 for lm, none for adam)")
    p.add_argument("--lm-pcg-iters", type=int, default=None,
                   help="PCG iterations per LM step (default: the option file's lm_pcg_iters)")
    p.add_argument("--lm-damping", type=float, default=None,
                   help="initial LM damping mu (default: the option file's lm_damping)")
    p.add_argument("--lm-pcg-tol", type=float, default=None,
                   help="PCG tolerance of an LM step (default: the option file's lm_pcg_tol)")
    p.add_argument("--pcg-tol", type=float, default=1e-3)
    p.add_argument("--pcg-maxiter", type=int, default=1000)
    p.add_argument("--precond-probes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturbation", type=float, default=0.05,
                   help="standard deviation of the noise added to every parameter of theta0 to make "
                        "the true scene that renders the context views and the target")
    p.add_argument("--no-unroll", action="store_true", help="skip the unrolled reference")
    p.add_argument("--probe", action="store_true",
                   help="after the implicit run, probe the inner energy along -grad E at theta* "
                        "(float64; reports jumps from pair-list and depth-order changes)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a figure: cosines, peak memory, stationarity per group and the "
                        "line probe, per K")
    p.add_argument("--worker-timeout-s", type=float, default=0,
                   help="wall-clock cap per worker process in seconds (0: none)")
    p.add_argument("--memory-limit-gb", type=float, default=20.0,
                   help="address-space cap per worker process (0: none)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def build_problem(args, dtype=torch.float32):
    scene = make_scene(args.gaussians, args.size, args.views, seed=args.seed, dtype=dtype)
    gen = torch.Generator().manual_seed(args.seed + 101)
    # The true scene differs from the initialization by a perturbation of every attribute.
    true = scene.params.map(lambda t: t + args.perturbation * torch.randn(t.shape, generator=gen, dtype=dtype))
    with torch.no_grad():
        context = render_params(true, scene.extrinsics, scene.intrinsics, scene.near, scene.far,
                                scene.image_shape).color
        e3, k3, n3, f3 = make_cameras(3, dtype=dtype)
        target_cam = (e3[:, 1:2], k3[:, 1:2], n3[:, 1:2], f3[:, 1:2])
        target = render_params(true, *target_cam, scene.image_shape).color
    views = ContextViews(context, scene.extrinsics, scene.intrinsics, scene.near, scene.far)
    layout = scene.params.layout
    theta0 = scene.params.flatten()
    lam = layout.per_group({g: args.lam for g in GROUPS}, dtype=dtype)
    return views, layout, theta0, lam, target_cam, target


def _config(args, backward: str, steps: int) -> Diff3RConfig:
    tol = args.stationarity_tol
    if tol is None:
        tol = 1e-4 if args.inner_solver == "lm" else 0.0
    return Diff3RConfig(steps=steps, inner_solver=args.inner_solver, backward=backward,
                        hessian=args.hessian, precond=args.precond, matvec=args.matvec,
                        visibility=args.visibility,
                        stationarity_tol=tol,
                        pcg_tol=args.pcg_tol, pcg_maxiter=args.pcg_maxiter,
                        precond_probes=args.precond_probes, on_failure="fallback",
                        **{k: getattr(args, k) for k in ("lm_pcg_iters", "lm_pcg_tol", "lm_damping")
                           if getattr(args, k, None) is not None})


def worker(args) -> dict:
    backward, steps, out_path = args.worker.split(":", 2)
    steps = int(steps)
    views, layout, theta0, lam, target_cam, target = build_problem(args)
    config = _config(args, backward, steps)
    theta0 = theta0.clone().requires_grad_(True)
    lam = lam.clone().requires_grad_(True)
    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        theta_star, info = diff3r_layer(theta0, lam, views, layout, config)
        t1 = time.perf_counter()
        pred = render_params(GaussianParams.unflatten(theta_star, layout), *target_cam, views.image_shape).color
        loss = ((pred - target) ** 2).sum()
        loss.backward()
        t2 = time.perf_counter()
    saved = {"theta0": theta0.grad, "lam": lam.grad}
    if backward == "implicit" and info.final_grad is not None:
        saved["stuck"] = gaussian_entry_mask(top_gaussians(info.final_grad, layout), layout)
    torch.save(saved, out_path)
    s = info.summary()
    replanned = None
    if backward == "implicit" and args.visibility == "frozen":
        replanned = _replanned_stationarity(views, layout, config, theta0.detach(), lam.detach(),
                                            theta_star.detach())
    probe = None
    if args.probe and backward == "implicit":
        obj = Objective.for_layer(views, layout, config, theta0)
        probe = probe_summary(energy_line_probe(obj, theta_star.detach(), theta0.detach(), lam.detach()))
    return {
        "stationarity_groups": s["stationarity_groups"], "grad_share_top1pct": s["grad_share_top1pct"],
        "line_probe": probe,
        "peak_mb": mem.peak_mb, "forward_ms": (t1 - t0) * 1e3, "backward_ms": (t2 - t1) * 1e3,
        "steps": int(info.inner_steps.max()), "stationarity": s["stationarity"],
        "pcg_iters": s["pcg_iters"], "pcg_rel_residual": s["pcg_rel_residual"],
        "outer_loss": float(loss),
        "stationarity_replanned": replanned,
        "stale_pairs": s["stale_pairs"], "stale_order_pixels": s["stale_order_pixels"],
    }


def _replanned_stationarity(views, layout, config, theta0, lam, theta_star) -> float:
    """``||grad E(theta_K)|| / ||grad E(theta0)||`` of the energy with per-step pair lists (what
    upstream's rasterizers see), for a solve that held the pair lists of ``theta0``."""
    obj = Objective.for_layer(views, layout, dataclasses.replace(config, visibility="per_step"), theta0)
    norms = []
    for t in (theta0, theta_star):
        t = t.clone().requires_grad_(True)
        e = obj.energy(t, theta0, lam, sqrt_w=obj.frozen_sqrt_w)
        norms.append(float(torch.autograd.grad(e.sum(), t)[0].norm()))
    return norms[1] / norms[0] if norms[0] > 0 else 0.0


def _limit_memory(gb: float):
    """Cap a worker's address space so that a run that does not fit fails alone (reported as
    null) instead of waking the system's OOM killer."""
    def apply() -> None:
        if gb > 0:
            import resource
            limit = int(gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _spawn(args, backward: str, steps: int, out_path: str) -> dict | None:
    cmd = [sys.executable, "-m", "diff3r_plugin.bench.layer_bench", "--worker", f"{backward}:{steps}:{out_path}"]
    for key in ("gaussians", "size", "views", "inner_solver", "precond", "matvec", "hessian", "visibility", "lam",
                "pcg_tol", "pcg_maxiter", "precond_probes", "seed", "perturbation"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.probe:
        cmd += ["--probe"]
    for key in ("stationarity_tol", "lm_pcg_iters", "lm_pcg_tol", "lm_damping"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=low_mmap_env(),
                              preexec_fn=_limit_memory(args.memory_limit_gb),
                              timeout=args.worker_timeout_s or None)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"[bench layer] {backward} K={steps} exceeded {args.worker_timeout_s} s\n")
        return None
    if proc.returncode != 0:
        sys.stderr.write(f"[bench layer] {backward} K={steps} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    ks = [int(k) for k in str(args.steps).split(",") if k.strip()]
    runs, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            ift = _spawn(args, "implicit", k, os.path.join(tmp, f"ift{k}.pt"))
            unr = None if args.no_unroll else _spawn(args, "unroll", k, os.path.join(tmp, f"unr{k}.pt"))
            if unr is None and not args.no_unroll:
                notes.append(f"unroll K={k} did not finish (see stderr: over the "
                             f"{args.memory_limit_gb:g} GB memory cap or the time cap)")
            cos_t = cos_l = cos_t_rest = cos_l_rest = None
            if ift is not None and unr is not None:
                gi = torch.load(os.path.join(tmp, f"ift{k}.pt"))
                gu = torch.load(os.path.join(tmp, f"unr{k}.pt"))
                cos = torch.nn.functional.cosine_similarity
                cos_t = float(cos(gi["theta0"].flatten(), gu["theta0"].flatten(), dim=0))
                cos_l = float(cos(gi["lam"].flatten(), gu["lam"].flatten(), dim=0))
                if "stuck" in gi:
                    # The same cosines without the 1 % of Gaussians that hold most of the
                    # remaining inner gradient (where the implicit gradient's assumption fails).
                    rest = ~gi["stuck"]
                    cos_t_rest = float(cos(gi["theta0"][rest], gu["theta0"][rest], dim=0))
                    cos_l_rest = float(cos(gi["lam"][rest], gu["lam"][rest], dim=0))
            runs.append({
                "steps": None if ift is None else ift["steps"],
                "steps_requested": k,
                "inner_solver": args.inner_solver,
                "ift_peak_mb": None if ift is None else round(ift["peak_mb"], 1),
                "unroll_peak_mb": None if unr is None else round(unr["peak_mb"], 1),
                "ift_backward_ms": None if ift is None else round(ift["backward_ms"], 1),
                "unroll_backward_ms": None if unr is None else round(unr["backward_ms"], 1),
                "grad_cosine_theta0": cos_t,
                "grad_cosine_lambda": cos_l,
                "pcg_iters": None if ift is None else ift["pcg_iters"],
                "pcg_rel_residual": None if ift is None else ift["pcg_rel_residual"],
                "stationarity": None if ift is None else ift["stationarity"],
                "ift_forward_ms": None if ift is None else round(ift["forward_ms"], 1),
                "unroll_forward_ms": None if unr is None else round(unr["forward_ms"], 1),
                "grad_cosine_theta0_outside_top1pct": cos_t_rest,
                "grad_cosine_lambda_outside_top1pct": cos_l_rest,
                "stationarity_groups": None if ift is None else ift["stationarity_groups"],
                "grad_share_top1pct": None if ift is None else ift["grad_share_top1pct"],
            })
            if args.visibility == "frozen":
                runs[-1]["stationarity_replanned"] = None if ift is None else ift["stationarity_replanned"]
                runs[-1]["stale_order_pixels"] = None if ift is None else ift["stale_order_pixels"]
                runs[-1]["stale_pairs"] = None if ift is None else ift["stale_pairs"]
            if args.probe:
                runs[-1]["line_probe"] = None if ift is None else ift["line_probe"]
    cfg = _config(args, "implicit", ks[0] if ks else 0)
    result = {"gaussians": args.gaussians, "size": args.size, "views": args.views,
              "lm_damping": cfg.lm_damping, "lm_pcg_iters": cfg.lm_pcg_iters, "lm_pcg_tol": cfg.lm_pcg_tol,
              "pcg_tol": cfg.pcg_tol, "pcg_maxiter": cfg.pcg_maxiter,
              "precond": args.precond, "matvec": args.matvec, "hessian": args.hessian,
              "visibility": args.visibility, "lam": args.lam,
              "perturbation": args.perturbation,
              "runs": runs, "notes": notes}
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    return result


def plot(result: dict, path: str) -> None:
    """One PNG: implicit-vs-unrolled cosines, peak memory, stationarity per group and the line
    probe of each K (missing values are left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    ks = [r["steps_requested"] for r in runs]
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    for off, key, label in ((-0.2, "grad_cosine_theta0", "cos θ0"), (0.2, "grad_cosine_lambda", "cos Λ")):
        vals = [r[key] for r in runs]
        ax.bar([i + off for i, v in zip(x, vals) if v is not None], [v for v in vals if v is not None],
               width=0.4, label=label)
    ax.axhline(0.99, color="k", ls="--", lw=0.8, label="0.99")
    ax.set_xticks(x, [f"K={k}" for k in ks])
    ax.set_ylim(min([0.0] + [r[k] for r in runs for k in ("grad_cosine_theta0", "grad_cosine_lambda")
                             if r[k] is not None]), 1.05)
    ax.set_title("implicit vs unrolled gradient")
    ax.legend(fontsize=8)

    ax = axes[1]
    for key, label in (("ift_peak_mb", "implicit"), ("unroll_peak_mb", "unrolled")):
        pts = [(k, r[key]) for k, r in zip(ks, runs) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (inner steps)")
    ax.set_ylabel("extra peak memory (MB)")
    ax.set_title("backward memory")
    ax.legend(fontsize=8)

    ax = axes[2]
    groups = [g for g in GROUPS if any(r.get("stationarity_groups") and r["stationarity_groups"].get(g)
                                       for r in runs)]
    width = 0.8 / max(len(runs), 1)
    for j, r in enumerate(runs):
        sg = r.get("stationarity_groups") or {}
        vals = [max(sg.get(g) or 0.0, 1e-12) for g in groups]
        ax.bar([i + (j - (len(runs) - 1) / 2) * width for i in range(len(groups))], vals, width=width,
               label=f"K={r['steps_requested']} (top 1 %: {r.get('grad_share_top1pct') or 0:.2f})")
    ax.set_xticks(range(len(groups)), groups, rotation=30, fontsize=8)
    ax.set_yscale("log")
    ax.set_title("stationarity per group  ‖∇_g E(θ_K)‖ / ‖∇E(θ0)‖")
    ax.legend(fontsize=7)

    ax = axes[3]
    probed = [r for r in runs if r.get("line_probe")]
    for r in probed:
        steps = [p["step"] for p in r["line_probe"]]
        dev = [max(abs(p["ratio"] - 1.0), 1e-9) for p in r["line_probe"]]
        line, = ax.plot(steps, dev, "o-", label=f"K={r['steps_requested']}")
        for p, d in zip(r["line_probe"], dev):
            if p.get("order_changed_pixels"):
                ax.annotate(f"{p['order_changed_pixels']} px", (p["step"], d), fontsize=6,
                            color=line.get_color(), textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step along -∇E at θ_K")
    ax.set_ylabel("|decrease / first-order decrease - 1|")
    ax.set_title("line probe (small = smooth; px: pixels reordered)" if probed
                 else "line probe (run with --probe)", fontsize=9)
    if probed:
        ax.legend(fontsize=8)
    fig.suptitle(f"diff3r bench layer: {result['gaussians']} Gaussians, {result['size']}², "
                 f"{result['views']} views, {runs[0]['inner_solver'] if runs else ''}, precond {result['precond']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from .timing import bench_main

    bench_main(add_arguments, run, worker)
