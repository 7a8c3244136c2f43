"""The examples' built-in driver (tiny encoders on embedded scenes) and their shared options.

The ``--upstream`` path runs the upstream repository's own training through the Hydra callback
(:func:`diff3r_plugin.integration.examples.run_upstream_example`).
"""

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["add_example_args", "example_main", "run_builtin"]

UPSTREAM_REPOS = ("depthsplat", "mvsplat", "noposplat", "pixelsplat")


# --------------------------------------------------------------------------------------------
# Example command lines (examples/wrap_mvsplat.py, examples/wrap_noposplat.py)


def add_example_args(parser: Any) -> None:
    """The command-line options shared by the two wrap examples."""
    parser.add_argument("--upstream", default=None, help="upstream checkout (else: built-in tiny encoder)")
    parser.add_argument("--repo", default=None, choices=sorted(UPSTREAM_REPOS),
                        help="which upstream repository --upstream holds (default: the one the example "
                             "is named after; the pose-given example also runs pixelsplat and depthsplat)")
    parser.add_argument("--checkpoint", default=None, help="upstream checkpoint (default: random weights)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                              / "re10k_demo_padded360x640"),
                        help="pixelSplat-format RE10K root (with --upstream; default: ../shared/data/"
                             "re10k_demo_padded360x640 beside the repository)")
    parser.add_argument("--device", default="cpu", help="cpu (TorchDecoder) or cuda")
    parser.add_argument("--image-size", type=int, default=64, help="square image size (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3, help="Diff3R training steps")
    parser.add_argument("--eval-scenes", type=int, default=1, help="scenes to evaluate")
    parser.add_argument("--tto-steps", type=int, default=2, help="inner TTO steps (diff3r.steps)")
    parser.add_argument("--inner-solver", default="adam", choices=["adam", "lm"])
    parser.add_argument("--pcg-maxiter", type=int, default=20)
    parser.add_argument("--diff3r", action="append", default=[], metavar="KEY=VALUE",
                        help="extra diff3r.* override, e.g. --diff3r lambda_mode=constant")
    parser.add_argument("--point-depth-init", type=float, default=None, metavar="DEPTH",
                        help="NoPoSplat with random weights: put the untrained points DEPTH ahead of the "
                             "reference camera (otherwise they all lie in front of the near-plane cull "
                             "and nothing renders); diff3r.point_depth_init")
    parser.add_argument("--output", default=None, help="Hydra output directory of the upstream run")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")


def run_builtin(kind: str, args: Any, log_fn=None) -> Optional[dict]:
    """The offline default of the examples: a built-in tiny encoder on embedded scenes.

    ``kind`` is ``"pose_given"`` (``TinyPoseGivenEncoder``) or ``"pose_free"``
    (``TinyPoseFreeEncoder``; batches are put in NoPoSplat's canonical frame). Returns None
    (after printing why) when the built-in models are not available.
    """
    import time

    log_fn = log_fn or ((lambda *a: print(*a, file=sys.stderr)) if getattr(args, "json", False) else print)
    try:
        from diff3r_plugin.models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
        from diff3r_plugin.uncertainty import UncertaintyHead
    except ImportError as exc:
        print(f"[diff3r] the built-in tiny encoders are not available ({exc}); pass --upstream PATH "
              "to run an upstream checkout instead", file=sys.stderr)
        return None
    from diff3r_plugin.config import Diff3RConfig
    from diff3r_plugin.data.embedded import EmbeddedDataset
    from diff3r_plugin.evaluation.metrics import compute_lpips, compute_psnr, compute_ssim
    from diff3r_plugin.training import forward_model, prepare_batch, render_targets

    overrides: dict = {"steps": args.tto_steps, "inner_solver": args.inner_solver,
                       "pcg_maxiter": args.pcg_maxiter}
    for kv in args.diff3r:
        key, _, value = kv.partition("=")
        import yaml

        node = overrides
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    config = Diff3RConfig.from_dict(overrides, path="diff3r")
    torch.manual_seed(0)
    pose_free = kind == "pose_free"
    encoder = TinyPoseFreeEncoder() if pose_free else TinyPoseGivenEncoder()
    num_pose = 1 if pose_free else 0  # the pose-free encoder's output carries one pose delta
    head = UncertaintyHead(encoder.num_features, encoder.sh_degree, num_pose,
                           granularity=config.head.granularity, floor=config.head.floor,
                           init=config.head.init, hidden=config.head.hidden)
    size = (args.image_size, args.image_size)
    train = EmbeddedDataset(max(args.steps, 1), image_shape=size)
    held_out = EmbeddedDataset.held_out(max(args.eval_scenes, 1), image_shape=size) \
        if hasattr(EmbeddedDataset, "held_out") else EmbeddedDataset(max(args.eval_scenes, 1), seed_offset=10000, image_shape=size)

    def prepare(batch: dict) -> dict:
        return prepare_batch(encoder, batch)

    def forward(batch: dict, use_tto: bool):
        pred = forward_model(encoder, head, batch, tto=use_tto and config.enabled,
                             lambda_mode=config.lambda_mode, config=config)
        return render_targets(pred, batch)

    keys_before = list(encoder.state_dict().keys())
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    losses, times = [], []
    for step in range(args.steps):
        batch = prepare(train[step])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ((forward(batch, True) - batch["target"]["image"]) ** 2).mean()
        loss.backward()
        n_grad = sum(1 for p in encoder.parameters() if p.grad is not None and bool((p.grad != 0).any()))
        n_head = sum(1 for p in head.parameters() if p.grad is not None and bool((p.grad != 0).any()))
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        log_fn(f"[diff3r] step {step}: loss {losses[-1]:.5f} ({times[-1]:.2f} s)")
    results: dict = {}
    for method, use in (("zero_shot", False), ("diff3r_tto", True)):
        scores: dict = {"psnr": [], "ssim": [], "lpips": []}
        for i in range(args.eval_scenes):
            batch = prepare(held_out[i])
            with torch.no_grad():
                pred = forward(batch, use)[0]
            gt = batch["target"]["image"][0]
            scores["psnr"].append(float(compute_psnr(gt, pred).mean()))
            scores["ssim"].append(float(compute_ssim(gt, pred).mean()))
            lp = compute_lpips(gt, pred)
            scores["lpips"].append(None if lp is None else float(lp.mean()))
        results[method] = {k: (None if not v or any(x is None for x in v) else sum(v) / len(v))
                           for k, v in scores.items()}
    return {
        "upstream": None,
        "steps": args.steps,
        "losses": losses,
        "encoder_params_with_grad": n_grad if args.steps else 0,
        "head_params_with_grad": n_head if args.steps else 0,
        # The built-in path calls the layer directly (no instance patching); checked anyway.
        "state_dict_keys_unchanged": list(encoder.state_dict().keys()) == keys_before,
        "gaussians_class": None,
        "seconds_per_step": sum(times) / len(times) if times else None,
        "eval": results,
    }


def example_main(repo: str, builtin_kind: str, doc: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point shared by ``examples/wrap_<repo>.py``: upstream checkout or built-in model."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_example_args(parser)
    args = parser.parse_args(argv)
    if args.repo and not args.upstream:
        parser.error("--repo names the repository of an --upstream checkout; pass --upstream PATH too")
    if args.upstream:
        from .examples import run_upstream_example

        return run_upstream_example(args.repo or repo, argv)
    else:
        result = run_builtin(builtin_kind, args)
    if result is None:
        return 1
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
