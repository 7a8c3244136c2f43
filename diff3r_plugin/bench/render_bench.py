"""``diff3r bench render``: speed of the renderer and its agreement with the dense reference."""

import argparse

import torch

from ..render import render
from ..data.synthetic import make_scene
from .timing import median_ms

DENSE_MAX_PAIRS = 2 ** 27  # Gaussian-pixel products beyond which the dense reference is skipped


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gaussians", type=int, default=8192)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--backend", choices=["torch", "gsplat"], default="torch")
    p.add_argument("--sh-degree", type=int, default=0)
    p.add_argument("--sh-basis", choices=["e3nn", "3dgs"], default="e3nn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference comparison")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    scene = make_scene(args.gaussians, args.size, args.views, seed=args.seed, sh_degree=args.sh_degree)
    p = scene.params.map(lambda t: t.to(device))
    cams = [t.to(device) for t in (scene.extrinsics, scene.intrinsics, scene.near, scene.far)]
    inputs = [p.means, p.covariances().detach(), p.harmonics, p.opacities().detach()]
    gen = torch.Generator().manual_seed(args.seed + 1)
    h = w = args.size
    weights = torch.rand(1, args.views, 3, h, w, generator=gen).to(device)

    def fwd(backend: str, xs):
        return render(*xs, *cams, scene.image_shape, sh_basis=args.sh_basis, backend=backend)

    def forward_only():
        with torch.no_grad():
            fwd(args.backend, inputs)

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    state = {}

    def forward_graph():
        state["out"] = fwd(args.backend, leaves)

    def backward():
        forward_graph()
        (state["out"].color * weights).sum().backward()

    forward_ms = median_ms(forward_only, repeats=args.repeats, device=device)
    fwd_bwd_ms = median_ms(backward, repeats=args.repeats, device=device)
    fwd_graph_ms = median_ms(forward_graph, repeats=args.repeats, device=device)
    backward_ms = max(fwd_bwd_ms - fwd_graph_ms, 0.0)

    tangents = [torch.randn(t.shape, generator=gen).to(device) * 1e-2 for t in inputs]
    tangents[1] = 0.5 * (tangents[1] + tangents[1].transpose(-1, -2)) * inputs[1].abs().mean()
    jvp_ms = None
    if args.backend == "torch":
        def jvp():
            torch.func.jvp(lambda *xs: fwd("torch", list(xs)).color, tuple(inputs), tuple(tangents))
        jvp_ms = median_ms(jvp, repeats=args.repeats, device=device)

    try:
        from ..render.native import native_status
        kernels = native_status() if device.type == "cpu" and args.backend == "torch" else None
    except ImportError:  # an older tree without the compiled kernels
        kernels = None
    result = {
        "backend": args.backend, "compiled_kernels": None if kernels is None else kernels["available"], "device": str(device), "gaussians": args.gaussians,
        "height": h, "width": w, "views": args.views, "forward_ms": round(forward_ms, 3),
        "forward_backward_ms": round(fwd_bwd_ms, 3), "backward_ms": round(backward_ms, 3), "jvp_ms": None if jvp_ms is None else round(jvp_ms, 3),
        "dense_forward_ms": None, "max_abs_diff_vs_dense": None, "grad_rel_diff_vs_dense": None,
    }
    if not args.no_dense and args.gaussians * h * w * args.views <= DENSE_MAX_PAIRS:
        with torch.no_grad():
            ref = fwd("dense", inputs)
            ours = fwd(args.backend, inputs)

        def dense_only():
            with torch.no_grad():
                fwd("dense", inputs)

        # The dense reference takes seconds per call: no warm-up, fewer repeats.
        result["dense_forward_ms"] = round(
            median_ms(dense_only, repeats=min(args.repeats, 3), warmup=0, device=device), 3)
        result["max_abs_diff_vs_dense"] = float(max((ref.color - ours.color).abs().max(),
                                                    (ref.alpha - ours.alpha).abs().max()))
        grads = {}
        for backend in ("dense", args.backend):
            xs = [t.detach().clone().requires_grad_() for t in inputs]
            (fwd(backend, xs).color * weights).sum().backward()
            grads[backend] = torch.cat([x.grad.flatten() for x in xs])
        diff = (grads["dense"] - grads[args.backend]).norm() / grads["dense"].norm().clamp_min(1e-30)
        result["grad_rel_diff_vs_dense"] = float(diff)
    return result
