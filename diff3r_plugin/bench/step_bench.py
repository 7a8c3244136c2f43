"""``diff3r bench step``: what Diff3R costs per outer training step, and where the time goes.

One outer step is ``encoder -> (Diff3R layer) -> target render -> MSE -> backward``. It runs
twice per repeat on the same batch in the same process, once without the layer (``plain``: the
targets are rendered from the encoder's Gaussians, the usual zero-shot training loss) and once
with it (``diff3r``), alternating so that both see the same load. Reported figures are medians
over the repeats.

Parts (:mod:`diff3r_plugin.profiling`, exclusive wall-clock time):

* ``encoder``: the encoder's forward and backward (with the uncertainty head and the
  conversion to the layer's parameter vector);
* ``tto_forward``, ``linearize``, ``implicit_backward``: marked by the layer (inner solve;
  sparse Jacobian and preconditioner; PCG);
* ``target_render``: the render of the target views, forward and backward;
* ``rest``: the total minus the named parts (loss, graph bookkeeping, the recorder itself).

The backward runs in two stages so that each part gets its own backward: first the gradient of
the loss with respect to the rendered Gaussians (``target_render``), then from there into the
layer and the encoder (``encoder``, with the layer's parts nested). The gradients are those of
one ``loss.backward()``.

``peak_mb`` is the extra peak memory of the Diff3R step over the plain step, both measured in
a fresh worker process after one warm-up step each: on CUDA from the caching allocator's peak,
on CPU from the process's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``,
glibc serving allocations above 64 KiB by ``mmap`` so that the resident set follows the live
tensors; see :class:`diff3r_plugin.bench.timing.PeakMemory`).

Models: ``builtin-pose-given`` / ``builtin-pose-free`` (the tiny built-in encoders with an
uncertainty head), or ``--upstream PATH --repo NAME``: a real upstream encoder with random
weights, composed with ``+optimizer=diff3r`` and wrapped as the examples do. Layer settings are
the option file's defaults (``Diff3RConfig()``) plus any ``diff3r.key=value`` overrides.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..profiling import record_parts
from .timing import PeakMemory, low_mmap_env, sync

LAYER_PARTS = ("tto_forward", "linearize", "implicit_backward")
PARTS = ("encoder",) + LAYER_PARTS + ("target_render",)
MODELS = ("builtin-pose-given", "builtin-pose-free")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="builtin-pose-given")
    p.add_argument("--upstream", default=None, help="upstream checkout (runs its encoder, random weights)")
    p.add_argument("--repo", default=None, choices=["mvsplat", "pixelsplat", "depthsplat", "noposplat"],
                   help="which repository --upstream is")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=3,
                   help="timed outer steps per method (alternating; after one warm-up step each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="diff3r.KEY=VALUE",
                   help="layer setting, e.g. --set diff3r.pcg_maxiter=20 (repeatable)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory worker process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("trailing", nargs="*", metavar="diff3r.KEY=VALUE",
                   help="more layer settings, as --set")


def parse_overrides(items: list[str]) -> dict:
    """``["diff3r.pcg_maxiter=20", "diff3r.lr.means=1e-3"]`` -> nested dict (YAML values)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("diff3r.") or len(key) <= len("diff3r."):
            raise ValueError(f"layer settings are diff3r.KEY=VALUE, got {item!r}")
        path = key[len("diff3r."):].split(".")
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            # YAML 1.1 reads "1e-3" as a string; Hydra's override grammar reads it as a float.
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[path[-1]] = parsed
    return out


@dataclass
class StepModel:
    """One batch and the two halves of an outer step.

    ``encode(use_layer)`` returns the tensors the target render reads (with the layer's
    ``info`` or None); ``render(tensors)`` returns the target colours; ``parameters`` are
    the trained tensors (their gradients are cleared before every step).
    """

    encode: Callable[[bool], tuple[list[Tensor], object]]
    render: Callable[[list[Tensor]], Tensor]
    target: Tensor
    parameters: list
    description: str


def _embedded_batch(size: int, device: torch.device, seed: int) -> dict:
    from ..data.embedded import EmbeddedDataset

    example = EmbeddedDataset(1, seed_offset=seed, image_shape=(size, size), num_context=2,
                              num_target=1)[0]

    def move(x):
        if isinstance(x, Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(example)


def build_builtin(kind: str, size: int, config, device: torch.device, seed: int) -> StepModel:
    from ..gaussians.layout import GaussianParams, from_upstream
    from ..layer import ContextViews, diff3r_layer
    from ..models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
    from ..render.api import render_params
    from ..training import prepare_batch
    from ..uncertainty import UncertaintyHead

    torch.manual_seed(seed)
    pose_free = kind == "builtin-pose-free"
    encoder = (TinyPoseFreeEncoder() if pose_free else TinyPoseGivenEncoder()).to(device)
    head = UncertaintyHead(encoder.num_features, encoder.sh_degree, 1 if pose_free else 0,
                           granularity=config.head.granularity, floor=config.head.floor,
                           init=config.head.init, hidden=config.head.hidden).to(device)
    encoder.train()
    batch = prepare_batch(encoder, _embedded_batch(size, device, seed))
    ctx, tgt = batch["context"], batch["target"]
    state: dict = {}

    def encode(use_layer: bool):
        out = encoder(ctx)
        params, _ = from_upstream(*out.gaussians(), num_pose_views=out.num_pose_views, on_invalid="project")
        layout = params.layout
        theta0 = params.flatten()
        if config.lambda_mode == "predicted":
            lam = head(out.features)
        else:
            lam = torch.full_like(theta0, config.constant_lambda)
        state["layout"], state["sh_basis"] = layout, out.sh_basis
        if not use_layer or config.steps == 0:
            return [theta0], None
        views = ContextViews(ctx["image"], out.context_extrinsics, ctx["intrinsics"], ctx["near"],
                             ctx["far"], sh_basis=out.sh_basis)
        theta, info = diff3r_layer(theta0, lam, views, layout, config)
        return [theta], info

    def render(tensors: list[Tensor]) -> Tensor:
        params = GaussianParams.unflatten(tensors[0], state["layout"])
        h, w = tgt["image"].shape[-2:]
        return render_params(params, tgt["extrinsics"], tgt["intrinsics"], tgt["near"], tgt["far"],
                             (h, w), apply_pose=False, sh_basis=state["sh_basis"], validate=False).color

    params = [*encoder.parameters(), *head.parameters()]
    return StepModel(encode, render, tgt["image"], params, f"{kind} ({size}x{size})")


#: Where each upstream keeps its dataset node and image shape, and what a random-weight
#: encoder needs offline (no UniMatch weights; pixelSplat's ResNet backbone instead of DINO).
_UPSTREAM_SPECS = {
    "mvsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                "extra": ["model.encoder.unimatch_weights_path=null"]},
    "pixelsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                   "extra": ["model/encoder/backbone=resnet"]},
    "depthsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                   "extra": ["model.encoder.unimatch_weights_path=null"]},
    "noposplat": {"dataset": "dataset.re10k", "image_shape_key": "input_image_shape", "extra": []},
}


def build_upstream(path: str, repo: str, size: int, overrides: list[str], device: torch.device,
                   seed: int) -> StepModel:
    """A real upstream encoder (random weights), wrapped from its composed Hydra config."""
    from pathlib import Path

    # Everything taken from the integration helpers, in one place.
    from ..integration.compose import compose_upstream_config
    from ..integration.cpu_run import TorchDecoder, install_import_stubs
    from ..integration.hydra_callback import _background_from_cfg, wrap_from_hydra
    from ..integration.offline_hub import offline_torch_hub

    if repo not in _UPSTREAM_SPECS:
        raise ValueError(f"--repo must be one of {sorted(_UPSTREAM_SPECS)}, got {repo!r}")
    spec = _UPSTREAM_SPECS[repo]
    upstream = Path(path).resolve()
    install_import_stubs()
    if str(upstream) not in sys.path:
        sys.path.insert(0, str(upstream))
    ds = spec["dataset"]
    cfg = compose_upstream_config(upstream, [
        "+experiment=re10k", "+optimizer=diff3r", "mode=test", "wandb.mode=disabled",
        f"{ds}.{spec['image_shape_key']}=[{size},{size}]", *spec["extra"], *overrides])
    from src.config import load_typed_root_config  # type: ignore[import-not-found]
    from src.dataset.data_module import get_data_shim  # type: ignore[import-not-found]
    from src.global_cfg import set_cfg  # type: ignore[import-not-found]
    from src.model.encoder import get_encoder  # type: ignore[import-not-found]

    set_cfg(cfg)
    typed = load_typed_root_config(cfg)
    torch.manual_seed(seed)
    with offline_torch_hub():
        encoder, _ = get_encoder(typed.model.encoder)
    encoder = wrap_from_hydra(cfg, encoder.to(device))
    if not hasattr(encoder, "diff3r"):
        raise RuntimeError("the composed config has no 'diff3r' node (is diff3r_plugin.configs importable?)")
    wrapper = encoder.diff3r
    config = wrapper.config
    decoder = TorchDecoder(_background_from_cfg(cfg) or (0.0, 0.0, 0.0), wrapper.adapter.sh_basis).to(device)
    batch = get_data_shim(encoder)(_embedded_batch(size, device, seed))
    encoder.train()
    fields = ("means", "covariances", "harmonics", "opacities")
    state: dict = {}

    def encode(use_layer: bool):
        wrapper.config = replace(config, enabled=use_layer)
        wrapper.last_info = None
        if repo in ("mvsplat", "depthsplat"):
            out = encoder(batch["context"], 0, False, scene_names=batch["scene"])
        elif repo == "pixelsplat":
            out = encoder(batch["context"], 0, False)
        else:
            out = encoder(batch["context"], 0)
        g = out["gaussians"] if isinstance(out, dict) else out
        state["gaussians"] = g
        return [getattr(g, f) for f in fields], getattr(wrapper, "last_info", None) if use_layer else None

    def render(tensors: list[Tensor]) -> Tensor:
        g = replace(state["gaussians"], **dict(zip(fields, tensors)))
        t = batch["target"]
        return decoder(g, t["extrinsics"], t["intrinsics"], t["near"], t["far"],
                       tuple(t["image"].shape[-2:])).color

    params = [p for p in encoder.parameters() if p.requires_grad]
    return StepModel(encode, render, batch["target"]["image"], params,
                     f"{repo} ({type(encoder).__name__}, random weights, {size}x{size})")


def one_step(model: StepModel, use_layer: bool, device: torch.device) -> tuple[float, dict, object]:
    """Total ms, exclusive ms per part (with ``rest``) and the layer's info of one outer step."""
    from ..profiling import part

    for p in model.parameters:
        p.grad = None
    sync_fn = torch.cuda.synchronize if device.type == "cuda" else None
    sync(device)
    with record_parts(sync=sync_fn) as times:
        t0 = time.perf_counter()
        with part("encoder"):
            tensors, info = model.encode(use_layer)
        with part("target_render"):
            color = model.render(tensors)
        loss = F.mse_loss(color, model.target)
        with part("target_render"):
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None and t.requires_grad]
        with part("encoder"):
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        sync(device)
        total = (time.perf_counter() - t0) * 1e3
    ms = {name: times.ms.get(name, 0.0) for name in PARTS}
    ms["rest"] = total - sum(ms.values())
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(f"the {'diff3r' if use_layer else 'plain'} step's loss is not finite")
    return total, ms, info


def _config_from(args):
    from ..config import Diff3RConfig

    return Diff3RConfig().merge(parse_overrides(list(args.overrides) + list(args.trailing)))


def _build(args) -> StepModel:
    device = torch.device(args.device)
    if args.upstream:
        if not args.repo:
            raise ValueError("--upstream needs --repo NAME (mvsplat, pixelsplat, depthsplat, noposplat)")
        parse_overrides(list(args.overrides) + list(args.trailing))  # fail early on a bad setting
        return build_upstream(args.upstream, args.repo, args.size,
                              list(args.overrides) + list(args.trailing), device, args.seed)
    return build_builtin(args.model, args.size, _config_from(args), device, args.seed)


def worker(args) -> dict:
    """Peak memory of one plain and one Diff3R step (after a warm-up step of each)."""
    device = torch.device(args.device)
    model = _build(args)
    one_step(model, False, device)
    one_step(model, True, device)
    peaks = {}
    for name, use in (("plain", False), ("diff3r", True)):
        with PeakMemory(device) as mem:
            one_step(model, use, device)
        peaks[name] = mem.peak_mb
    return peaks


def _memory(args) -> dict | None:
    cmd = [sys.executable, "-m", "diff3r_plugin.bench.step_bench", "--worker", "memory"]
    for key in ("model", "size", "device", "seed"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.upstream:
        cmd += ["--upstream", args.upstream, "--repo", args.repo]
    cmd += [f"--set={o}" for o in list(args.overrides) + list(args.trailing)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=low_mmap_env())
    if proc.returncode != 0:
        sys.stderr.write(f"[bench step] memory worker failed:\n{proc.stderr[-2000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_parts(runs: list[dict]) -> dict:
    return {name: round(statistics.median(r[name] for r in runs), 3) for name in runs[0]}


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = torch.device(args.device)
    model = _build(args)
    # Warm-up: lazy initialisation, allocator growth, first-call dispatch.
    one_step(model, False, device)
    one_step(model, True, device)
    plain, diff3r, plain_parts, diff3r_parts, infos = [], [], [], [], []
    for _ in range(args.steps):
        total, ms, _ = one_step(model, False, device)
        plain.append(total)
        plain_parts.append(ms)
        total, ms, info = one_step(model, True, device)
        diff3r.append(total)
        diff3r_parts.append(ms)
        infos.append(info)
    plain_ms, diff3r_ms = statistics.median(plain), statistics.median(diff3r)
    parts = _median_parts(diff3r_parts)
    info = infos[-1]
    info = info[0] if isinstance(info, (list, tuple)) else info  # per-scene infos of a wrapper
    inner = int(info.inner_steps.max()) if info is not None else 0
    pcg = int(info.pcg_iters.max()) if info is not None and info.pcg_iters is not None else 0
    result = {
        "model": model.description, "device": str(device), "steps": args.steps,
        "plain_ms": round(plain_ms, 3), "diff3r_ms": round(diff3r_ms, 3),
        "ratio": round(diff3r_ms / plain_ms, 3), "parts": parts,
        "plain_parts": _median_parts(plain_parts),
        "inner_steps": inner, "pcg_iters": pcg,
        "tto_forward_ms_per_inner_step": round(parts["tto_forward"] / inner, 3) if inner else None,
        "implicit_backward_ms_per_pcg_iter": round(parts["implicit_backward"] / pcg, 3) if pcg else None,
        "plain_ms_all": [round(t, 3) for t in plain], "diff3r_ms_all": [round(t, 3) for t in diff3r],
        "overrides": list(args.overrides) + list(args.trailing),
        "peak_mb": None, "plain_peak_mb": None, "diff3r_peak_mb": None,
        "peak_mb_method": None,
    }
    if not args.no_memory:
        peaks = _memory(args)
        if peaks is not None:
            result.update(plain_peak_mb=round(peaks["plain"], 1), diff3r_peak_mb=round(peaks["diff3r"], 1),
                          peak_mb=round(peaks["diff3r"] - peaks["plain"], 1),
                          peak_mb_method=("cuda max_memory_allocated" if device.type == "cuda" else
                                          "peak RSS (VmHWM) of a fresh worker process, mmap-backed "
                                          "allocations; Diff3R step minus plain step"))
    return result


if __name__ == "__main__":
    from .timing import bench_main

    bench_main(add_arguments, run, worker)
