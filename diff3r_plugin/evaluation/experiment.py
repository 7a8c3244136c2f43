"""``diff3r experiment``: train a baseline and a Diff3R model with the same budget on embedded
scenes, then evaluate both on real RealEstate10K scenes and on held-out embedded scenes.

Protocol (documented choice, see README/report):

* Same data, same outer-step count, same optimizer for both models. Training from scratch
  through the layer is ~10x slower per step on CPU, so the Diff3R model is the baseline's
  snapshot after ``(1 - f) * N`` steps, fine-tuned for the last ``f * N`` steps through the
  layer (encoder + uncertainty head), while the baseline continues its zero-shot training for
  the same ``f * N`` steps on the same batches (the paper also plugs the layer into a trained
  backbone). Default ``f = 1/3``.
* TTO at train and test time: Adam, K steps, per-group 3DGS rates x ``lr_scale``; implicit
  backward with a capped PCG (``on_failure="fallback"``): the gradient is approximate (neither
  the inner solve nor PCG converge; their residuals are in the JSON).
* Real scenes: ``--data`` (default ``<repo>/../shared/data/re10k_demo``) with
  ``evaluation_index_2ctx.json``, rescaled+centre-cropped to the training resolution, near 1,
  far 100 (MVSplat's RE10K setting). Held-out embedded scenes: seeds >= 10000.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from .eval_cli import (METHODS, evaluate, load_embedded_examples, load_real_examples,
                       save_checkpoint, save_grid, save_steps_plot)
from .metrics import lpips_available

__all__ = ["add_arguments", "run", "run_experiment", "default_data_dir"]


def default_data_dir() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    path = repo.parent / "shared" / "data" / "re10k_demo"
    return path if (path / "test").is_dir() else None


def _make_models(model: str, image_size: int, seed: int):
    from ..models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
    torch.manual_seed(seed)
    enc = TinyPoseFreeEncoder() if model == "pose_free" else TinyPoseGivenEncoder()
    return enc


def run_experiment(*, train_steps: int = 150, image_size: int = 32, scenes: int = 24,
                   quick: bool = False, data: str | None = "default", out: str | None = None,
                   tto_steps: int = 5, finetune_fraction: float = 1 / 3, eval_embedded: int = 4,
                   real_scenes: int | None = None, model: str = "pose_given", seed: int = 0,
                   lr: float = 2e-3, head_lr: float = 1e-3, constant_lambda: float = 1.0,
                   lr_scale: float = 4.0, pcg_maxiter: int = 8, precond_probes: int = 1,
                   steps_list: list[int] | None = None, time_budget_min: float = 22.0,
                   progress: bool = True) -> dict:
    from ..training import tto_config, train
    from ..uncertainty import UncertaintyHead
    from ..data.embedded import EmbeddedDataset

    if quick:
        train_steps, scenes, tto_steps = min(train_steps, 3), min(scenes, 1), min(tto_steps, 2)
        eval_embedded = min(eval_embedded, 1)
        real_scenes = 1 if real_scenes is None else min(real_scenes, 1)
        pcg_maxiter = min(pcg_maxiter, 3)
        steps_list = [0, tto_steps]
    steps_list = steps_list or sorted({0, 1, 2, tto_steps, 2 * tto_steps})
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = tto_config(tto_steps, lr_scale=lr_scale, pcg_maxiter=pcg_maxiter,
                     constant_lambda=constant_lambda, precond_probes=precond_probes)
    train_ds = EmbeddedDataset(scenes, image_shape=(image_size, image_size), cache=True)
    batches = [train_ds[i] for i in range(len(train_ds))]

    n_ft = max(1, int(round(finetune_fraction * train_steps)))
    n_pre = max(0, train_steps - n_ft)
    enc = _make_models(model, image_size, seed)
    budget_s = time_budget_min * 60
    hist_pre = train(enc, None, batches, n_pre, method="baseline", config=cfg, lr=lr,
                     progress=progress)
    snapshot = copy.deepcopy(enc.state_dict())
    k = n_pre % len(batches)
    rotated = batches[k:] + batches[:k]
    hist_base = train(enc, None, rotated, n_ft, method="baseline", config=cfg, lr=lr,
                      progress=progress)
    baseline = enc

    diff_enc = _make_models(model, image_size, seed)
    diff_enc.load_state_dict(snapshot)
    head = UncertaintyHead(diff_enc.num_features, diff_enc.sh_degree,
                           1 if getattr(diff_enc, "pose_free", False) else 0,
                           init=constant_lambda)
    remaining = budget_s - (time.perf_counter() - t_start)
    hist_d = train(diff_enc, head, rotated, n_ft, method="diff3r", config=cfg, lr=lr,
                   head_lr=head_lr, progress=progress, time_budget_s=max(remaining, 1.0))
    train_minutes = (time.perf_counter() - t_start) / 60
    baseline.eval()
    diff_enc.eval()
    head.eval()
    models = {"baseline": (baseline, None), "diff3r": (diff_enc, head)}

    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"image_size": image_size, "model": model}
        save_checkpoint(out_dir / "baseline.pt", baseline, None, cfg.to_dict(), **meta)
        save_checkpoint(out_dir / "diff3r.pt", diff_enc, head, cfg.to_dict(), **meta)

    result: dict = {}
    files = []
    data_dir = default_data_dir() if data == "default" else (Path(data) if data else None)
    real = None
    if data_dir is not None and (Path(data_dir) / "test").is_dir():
        examples = load_real_examples(data_dir, None, image_size, real_scenes)
        real = evaluate(models, examples, cfg, steps_list=steps_list, progress=progress)
    emb_examples = load_embedded_examples(eval_embedded, image_size)
    emb = evaluate(models, emb_examples, cfg, steps_list=steps_list, progress=progress)

    def table(res):
        return {m: {k: res["metrics"][m][k] for k in ("psnr", "ssim", "lpips")}
                for m in METHODS if m in res["metrics"]}

    result["real"] = table(real) if real else {}
    result["embedded"] = table(emb)
    result["psnr_vs_steps"] = {"real": real["psnr_vs_steps"] if real else {},
                               "embedded": emb["psnr_vs_steps"]}
    result["train_minutes"] = train_minutes
    ok, reason = lpips_available()
    result["lpips_note"] = None if ok else reason + " (LPIPS reported as null)"
    result["real_note"] = (f"{len(real['gt'])} scene(s) from {data_dir}, {image_size}x{image_size}"
                           if real else "no real scenes found (pass --data)")
    result["per_scene_psnr"] = {
        "real": {m: real["metrics"][m]["per_scene_psnr"] for m in real["metrics"]} if real else {},
        "embedded": {m: emb["metrics"][m]["per_scene_psnr"] for m in emb["metrics"]}}
    result["lambda_mean"] = {"real": real["lambda_mean"] if real else {}, "embedded": emb["lambda_mean"]}
    d_logs = [l for l in hist_d.logs if "stationarity" in l]
    result["training"] = {
        "model": model, "image_size": image_size, "train_scenes": scenes,
        "outer_steps": {"baseline": n_pre + len(hist_base.losses),
                        "diff3r": n_pre + len(hist_d.losses), "shared_pretrain": n_pre},
        "final_loss": {"baseline": _tail(hist_base.losses), "diff3r": _tail(hist_d.losses)},
        "minutes": {"pretrain": hist_pre.seconds / 60, "baseline_tail": hist_base.seconds / 60,
                    "diff3r_finetune": hist_d.seconds / 60},
        "tto": {"steps": cfg.steps, "inner_solver": cfg.inner_solver, "lr_scale": lr_scale,
                "backward": cfg.backward, "pcg_maxiter": cfg.pcg_maxiter,
                "constant_lambda": constant_lambda,
                "mean_inner_stationarity": _mean([l["stationarity"] for l in d_logs]),
                "note": "implicit gradient is approximate: K Adam steps do not reach a "
                        "stationary point and PCG is capped"},
    }
    result["seed"] = seed
    if out_dir:
        if real:
            save_grid(real, out_dir / "grid_real.png")
            save_steps_plot(real["psnr_vs_steps"], out_dir / "psnr_vs_steps_real.png", "real RE10K")
            files += [str(out_dir / "grid_real.png"), str(out_dir / "psnr_vs_steps_real.png")]
        save_grid(emb, out_dir / "grid_embedded.png")
        save_steps_plot(emb["psnr_vs_steps"], out_dir / "psnr_vs_steps_embedded.png",
                        "held-out embedded")
        files += [str(out_dir / "grid_embedded.png"), str(out_dir / "psnr_vs_steps_embedded.png")]
        result["files"] = files
    result["total_minutes"] = (time.perf_counter() - t_start) / 60
    if out_dir:
        (out_dir / "experiment.json").write_text(json.dumps(result, indent=2))
    return result


def _tail(xs, n=10):
    xs = xs[-n:]
    return float(sum(xs) / len(xs)) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-steps", type=int, default=150, help="outer steps per model")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scenes", type=int, default=24, help="embedded training scenes")
    p.add_argument("--quick", action="store_true", help="tiny CI run (< 2 min)")
    p.add_argument("--data", default="default",
                   help="real scenes (chunk root); default ../shared/data/re10k_demo if present; "
                        "'' to skip")
    p.add_argument("--real-scenes", type=int, default=None)
    p.add_argument("--eval-embedded", type=int, default=4, help="held-out embedded scenes")
    p.add_argument("--tto-steps", type=int, default=5)
    p.add_argument("--finetune-fraction", type=float, default=1 / 3)
    p.add_argument("--model", choices=("pose_given", "pose_free"), default="pose_given")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--head-lr", type=float, default=1e-3,
                   help="uncertainty-head learning rate (1e-2 let Lambda drift; see report)")
    p.add_argument("--lr-scale", type=float, default=4.0, help="x 3DGS inner Adam rates")
    p.add_argument("--constant-lambda", type=float, default=1.0)
    p.add_argument("--pcg-maxiter", type=int, default=8)
    p.add_argument("--time-budget-min", type=float, default=22.0,
                   help="stop Diff3R fine-tuning when the run reaches this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for checkpoints, PNGs and JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    data = args.data if args.data != "" else None
    return run_experiment(
        train_steps=args.train_steps, image_size=args.image_size, scenes=args.scenes,
        quick=args.quick, data=data, out=args.out, tto_steps=args.tto_steps,
        finetune_fraction=args.finetune_fraction, eval_embedded=args.eval_embedded,
        real_scenes=args.real_scenes, model=args.model, seed=args.seed, lr=args.lr,
        head_lr=args.head_lr, constant_lambda=args.constant_lambda, lr_scale=args.lr_scale,
        pcg_maxiter=args.pcg_maxiter, time_budget_min=args.time_budget_min,
        progress=not args.no_progress)
