"""The examples' built-in main job: a tiny encoder trained with and without Diff3R, compared.

``python examples/wrap_noposplat.py`` (pose-free encoder) and ``python examples/wrap_mvsplat.py``
(pose-given encoder) without ``--upstream`` run :func:`run_demo`, offline, on generated
(embedded) scenes:

1. **Training, same budget for both models** (the protocol of ``diff3r experiment``): the
   baseline is trained for ``steps`` outer steps on the zero-shot loss (targets rendered from
   the encoder's Gaussians theta0). The Diff3R model starts from the baseline's snapshot after
   the first two thirds and is fine-tuned for the last third *through the layer*: TTO on the
   context views with the uncertainty head's predicted Lambda, targets rendered from theta*,
   gradients by the implicit function theorem into encoder and head. Both see the same batches.
2. **Evaluation on held-out scenes** (:func:`~diff3r_plugin.evaluation.eval_cli.evaluate`):
   ``zero_shot`` (baseline, theta0), ``zero_shot_tto`` (baseline + TTO with a constant Lambda)
   and ``diff3r_tto`` (Diff3R model + TTO with its predicted Lambda); PSNR and SSIM on the target
   views, LPIPS when its VGG weights are on disk (never downloaded), and PSNR after each number
   of TTO steps in ``steps_list``.
3. **Pictures** in ``out``: ``grid.png`` (context | each method | ground truth),
   ``psnr_vs_steps.png`` and ``lambda_map.png`` (the predicted Lambda of every pixel-aligned
   Gaussian of the first held-out scene, per attribute group; see
   :mod:`~diff3r_plugin.evaluation.plots`), and ``demo.json``. Only these four files are
   written; a second run into the same directory replaces them and touches nothing else.

This is the method's real shape at toy scale (32x32 images, a few dozen outer steps, 5 inner
Adam steps, PCG capped at 8 iterations, so the training gradients are approximate and the
summary says so): a bigger run changes the numbers, not the steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from .errors import ConfigError

__all__ = ["DEFAULT_STEPS", "DEMO_METHODS", "OUTPUT_FILES", "run_demo", "format_table", "build_parser", "main",
           "example_main", "uses_upstream"]

Kind = Literal["pose_free", "pose_given"]
DEMO_METHODS = ("zero_shot", "zero_shot_tto", "diff3r_tto")
OUTPUT_FILES = {"grid": "grid.png", "psnr_vs_steps": "psnr_vs_steps.png",
                "lambda_map": "lambda_map.png", "json": "demo.json"}
# Outer steps per model: the pose-free encoder's step costs ~7x the pose-given one's on a CPU
# (its PnP), so it gets fewer for the same few minutes.
DEFAULT_STEPS = {"pose_free": 60, "pose_given": 150}
_ENCODER_NAME = {"pose_free": "TinyPoseFreeEncoder (pose-free, NoPoSplat-style)",
                 "pose_given": "TinyPoseGivenEncoder (pose-given, MVSplat-style)"}


class UsageError(ConfigError):
    """A bad setting of the main job (on the command line: one line, exit code 2)."""


def prepare_out_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written into it.

    Raises:
        UsageError: naming the directory and the reason.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A real write (and its removal) is the only reliable check (read-only mounts, ACLs).
        with tempfile.NamedTemporaryFile(dir=out, prefix=".diff3r-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {str(out)!r}: "
                         f"{exc.strerror or exc.__class__.__name__}") from None
    return out


def _make_encoder(kind: Kind, seed: int):
    from .models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
    torch.manual_seed(seed)
    return TinyPoseFreeEncoder() if kind == "pose_free" else TinyPoseGivenEncoder()


def run_demo(kind: Kind = "pose_free", *, out: str | Path = "outputs/demo", steps: int | None = None,
             image_size: int = 32, train_scenes: int = 12, eval_scenes: int = 4, tto_steps: int = 5,
             steps_list: Sequence[int] | None = None, pcg_maxiter: int = 8, seed: int = 0,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train baseline and Diff3R models on embedded scenes, evaluate, write the pictures.

    ``steps`` defaults to ``DEFAULT_STEPS[kind]``. Returns the JSON-serializable summary (also
    written to ``out/demo.json``).
    """
    from .data.embedded import EmbeddedDataset
    from .evaluation.eval_cli import evaluate, load_embedded_examples, save_grid, save_steps_plot
    from .evaluation.metrics import lpips_available
    from .evaluation.plots import save_predicted_lambda_map
    from .training import train, tto_config
    from .uncertainty import UncertaintyHead

    steps = DEFAULT_STEPS[kind] if steps is None else steps
    _check_counts(steps=steps, train_scenes=train_scenes, eval_scenes=eval_scenes,
                  tto_steps=tto_steps, image_size=image_size)
    out = prepare_out_dir(out)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = tto_config(tto_steps, pcg_maxiter=pcg_maxiter, precond_probes=1)
    steps_list = sorted({0, *(steps_list or (1, 2, tto_steps, 2 * tto_steps))})
    size = (image_size, image_size)
    train_ds = EmbeddedDataset(train_scenes, image_shape=size, cache=True)
    batches = [train_ds[i] for i in range(len(train_ds))]
    n_ft = max(1, round(steps / 3))
    n_pre = steps - n_ft
    log(f"[diff3r] {_ENCODER_NAME[kind]}, {image_size}x{image_size}, {train_scenes} embedded "
        f"training scenes; {steps} outer steps per model, the last {n_ft} through the layer for "
        f"the Diff3R model (TTO: {tto_steps} Adam steps, implicit backward, PCG <= {pcg_maxiter})")

    baseline = _make_encoder(kind, seed)
    pre = train(baseline, None, batches, n_pre, method="baseline", config=cfg, lr=2e-3,
                lpips_weight=0, progress=progress)
    snapshot = copy.deepcopy(baseline.state_dict())
    k = n_pre % len(batches)
    rotated = batches[k:] + batches[:k]  # both models see the same batches from here on
    tail = train(baseline, None, rotated, n_ft, method="baseline", config=cfg, lr=2e-3,
                 lpips_weight=0, progress=progress)
    diff = _make_encoder(kind, seed)
    diff.load_state_dict(snapshot)
    head = UncertaintyHead(diff.num_features, diff.sh_degree, 1 if kind == "pose_free" else 0,
                           init=cfg.constant_lambda)
    fine = train(diff, head, rotated, n_ft, method="diff3r", config=cfg, lr=2e-3, head_lr=1e-3,
                 lpips_weight=0, progress=progress)
    log(f"[diff3r] trained in {pre.seconds + tail.seconds + fine.seconds:.0f} s; {fine.pcg.line()}")
    head.eval()
    models = {"baseline": (baseline, None), "diff3r": (diff, head)}

    examples = load_embedded_examples(eval_scenes, image_size)
    with warnings.catch_warnings():
        # The table says "unavailable offline" with the reason; the metric's warning repeats it.
        warnings.filterwarnings("ignore", message="LPIPS unavailable", category=RuntimeWarning)
        res = evaluate(models, examples, cfg, methods=DEMO_METHODS, steps_list=steps_list,
                       progress=progress)
    files = {name: out / fname for name, fname in OUTPUT_FILES.items()}
    save_grid(res, files["grid"])
    save_steps_plot(res["psnr_vs_steps"], files["psnr_vs_steps"],
                    f"{eval_scenes} held-out embedded scenes, {image_size}x{image_size}")

    # Lambda map of the first held-out scene (the Diff3R model's head, before any TTO).
    lam_groups = save_predicted_lambda_map(
        diff, head, examples[0], cfg, files["lambda_map"],
        "predicted Λ per Gaussian (one per context pixel), held-out scene 0")

    ok, reason = lpips_available()
    table = {m: {"psnr": res["metrics"][m]["psnr"], "ssim": res["metrics"][m]["ssim"],
                 "lpips": res["metrics"][m]["lpips"],
                 "tto_steps": cfg.steps if m != "zero_shot" else 0}
             for m in DEMO_METHODS}
    result = {
        "model": kind,
        "image_size": image_size,
        "train_scenes": train_scenes,
        "eval_scenes": eval_scenes,
        "outer_steps": {"baseline": n_pre + len(tail.losses), "diff3r": n_pre + len(fine.losses),
                        "shared_pretrain": n_pre},
        "final_loss": {"baseline": _mean(tail.losses[-5:]), "diff3r": _mean(fine.losses[-5:])},
        "tto": {"steps": cfg.steps, "inner_solver": cfg.inner_solver, "backward": cfg.backward,
                "pcg_maxiter": cfg.pcg_maxiter},
        "training_pcg": {"steps": fine.pcg.steps, "capped": fine.pcg.capped,
                         "worst_rel_residual": fine.pcg.worst_rel_residual},
        "eval": table,
        "psnr_vs_steps": res["psnr_vs_steps"],
        "per_scene_psnr": {m: res["metrics"][m]["per_scene_psnr"] for m in DEMO_METHODS},
        "lambda_predicted": lam_groups,
        "lpips_note": None if ok else reason,
        "seconds": {"train": pre.seconds + tail.seconds + fine.seconds,
                    "total": time.perf_counter() - t_start},
        "files": {name: str(path) for name, path in files.items()},
    }
    files["json"].write_text(json.dumps(result, indent=2))
    return result


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else None


def format_table(result: dict) -> str:
    """The short human-readable table of :func:`run_demo`'s result."""
    lp_missing = any(r["lpips"] is None for r in result["eval"].values())
    lines = [f"held-out embedded scenes: {result['eval_scenes']}, "
             f"{result['image_size']}x{result['image_size']}, model {result['model']}",
             f"{'method':<15} {'PSNR':>6} {'SSIM':>6}  {'LPIPS':<20} {'TTO steps':>9}"]
    for m, r in result["eval"].items():
        lp = "unavailable offline" if r["lpips"] is None else f"{r['lpips']:.3f}"
        lines.append(f"{m:<15} {r['psnr']:6.2f} {r['ssim']:6.3f}  {lp:<20} {r['tto_steps']:>9d}")
    curve = result["psnr_vs_steps"]
    for m in curve:
        pts = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(curve[m].items(), key=lambda kv: int(kv[0])))
        lines.append(f"PSNR vs TTO steps, {m}: {pts}")
    if lp_missing and result.get("lpips_note"):
        lines.append(f"LPIPS: {result['lpips_note']}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``prog: error: ...``), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(kind: Kind, doc: str, prog: str | None = None, default_out: str = "outputs/demo"
                 ) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=doc.split("\n")[0],
                epilog="With --upstream PATH the example runs an upstream checkout instead "
                       "(see --upstream PATH --help).")
    p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS[kind],
                   help="outer training steps per model; the last third through the layer "
                        f"(default {DEFAULT_STEPS[kind]})")
    p.add_argument("--image-size", type=int, default=32, help="square image size (default 32)")
    p.add_argument("--train-scenes", type=int, default=12, help="embedded training scenes (default 12)")
    p.add_argument("--eval-scenes", type=int, default=4, help="held-out embedded scenes (default 4)")
    p.add_argument("--tto-steps", type=int, default=5, help="inner TTO steps (default 5)")
    p.add_argument("--steps-list", default=None,
                   help="TTO step counts of the PSNR curve, e.g. 0,1,2,5,10 (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tensors are tiny, and on a busy "
                        "CPU more threads mostly wait on each other)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON line (the log goes to stderr)")
    return p


def main(kind: Kind, doc: str, argv: Sequence[str] | None = None, *, prog: str | None = None,
         default_out: str = "outputs/demo") -> int:
    """Command line of the built-in main job (``examples/wrap_*.py`` without ``--upstream``)."""
    parser = build_parser(kind, doc, prog, default_out)
    args = parser.parse_args(argv)
    try:
        steps_list = ([int(s) for s in args.steps_list.split(",") if s.strip()]
                      if args.steps_list else None)
    except ValueError:
        parser.error(f"--steps-list must be comma-separated integers, got {args.steps_list!r}")
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    try:
        _check_counts(steps=args.steps, train_scenes=args.train_scenes, eval_scenes=args.eval_scenes,
                      tto_steps=args.tto_steps, image_size=args.image_size, threads=args.threads)
        prepare_out_dir(args.out)  # fail before training, not after
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            result = run_demo(kind, out=args.out, steps=args.steps, image_size=args.image_size,
                              train_scenes=args.train_scenes, eval_scenes=args.eval_scenes,
                              tto_steps=args.tto_steps, steps_list=steps_list, seed=args.seed,
                              progress=not args.quiet, log=log)
        finally:
            torch.set_num_threads(threads)
    except UsageError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(result))
    print("written:")
    for path in result["files"].values():
        print(f"  {path}")
    return 0


def uses_upstream(argv: Sequence[str]) -> bool:
    """Whether an example's command line asks for an upstream checkout (``--upstream``/``--repo``)."""
    return any(a in ("--upstream", "--repo") or a.startswith(("--upstream=", "--repo=")) for a in argv)


def example_main(repo: str, kind: Kind, doc: str, argv: Sequence[str], *, default_out: str) -> int:
    """``examples/wrap_<repo>.py``: the upstream's own ``src.main`` with ``--upstream PATH``, else
    the built-in main job."""
    if uses_upstream(argv):
        from .integration.examples import run_upstream_example

        return run_upstream_example(repo, argv)
    return main(kind, doc, argv, default_out=default_out)

