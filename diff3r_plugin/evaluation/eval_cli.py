"""``diff3r eval``: zero-shot vs zero-shot + TTO vs Diff3R (+ TTO, with and without Lambda).

Methods (all rendered at the target views, metrics as upstream: PSNR, SSIM (scikit-image),
LPIPS (VGG; ``null`` when its weights are not available offline, never random weights)):

* ``zero_shot``: baseline model, targets rendered from theta0.
* ``zero_shot_tto``: baseline model + the same TTO with a constant Lambda.
* ``diff3r_tto``: Diff3R model + TTO with the head's predicted Lambda.
* ``diff3r_no_lambda``: Diff3R model + TTO with a constant Lambda (ablation).

Per scene the metrics are averaged over its target views, then over scenes (as MVSplat's
``test_step``). For every TTO method PSNR is also reported after each of ``--steps-list`` TTO
steps. A PNG grid (context | each method | GT) and a PSNR-vs-steps plot are written beside
the JSON.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..evaluation.metrics import compute_lpips, compute_psnr, compute_ssim, lpips_available

METHODS = ("zero_shot", "zero_shot_tto", "diff3r_tto", "diff3r_no_lambda")
# (model, tto, lambda_mode) per method
_SPEC = {
    "zero_shot": ("baseline", False, "constant"),
    "zero_shot_tto": ("baseline", True, "constant"),
    "diff3r_tto": ("diff3r", True, "predicted"),
    "diff3r_no_lambda": ("diff3r", True, "constant"),
}

__all__ = ["METHODS", "add_arguments", "run", "evaluate", "save_checkpoint", "load_checkpoint",
           "load_real_examples", "load_embedded_examples", "save_grid", "save_steps_plot"]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(path, encoder, head=None, tto: dict | None = None, **meta) -> None:
    from ..models import tiny
    state = {
        "encoder_class": type(encoder).__name__,
        "encoder_kwargs": getattr(encoder, "init_kwargs", {}),
        "encoder_state": encoder.state_dict(),
        "head_kwargs": None if head is None else getattr(head, "init_kwargs", None),
        "head_state": None if head is None else head.state_dict(),
        "tto": tto,
        **meta,
    }
    assert hasattr(tiny, state["encoder_class"]), state["encoder_class"]
    torch.save(state, path)


def load_checkpoint(path):
    from ..models import tiny
    from ..uncertainty import UncertaintyHead
    state = torch.load(path, map_location="cpu", weights_only=False)
    enc = getattr(tiny, state["encoder_class"])(**state["encoder_kwargs"])
    enc.load_state_dict(state["encoder_state"])
    enc.eval()
    head = None
    if state.get("head_state") is not None:
        head = UncertaintyHead(**state["head_kwargs"])
        head.load_state_dict(state["head_state"])
    return enc, head, state


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_real_examples(root, index_path=None, image_size: int = 32, max_scenes: int | None = None):
    """Examples from a pixelSplat-format chunk directory and its evaluation index."""
    from ..data.chunks import ChunkDataset, load_evaluation_index
    root = Path(root)
    if index_path is None:
        index_path = root / "evaluation_index_2ctx.json"
    ds = ChunkDataset(root, "test")
    index = load_evaluation_index(index_path)
    out = []
    for key, entry in index.items():
        if entry is None or key not in ds:
            continue
        out.append(ds.make_example(key, entry, image_shape=(image_size, image_size)))
        if max_scenes is not None and len(out) >= max_scenes:
            break
    return out


def load_embedded_examples(num_scenes: int, image_size: int = 32, held_out: bool = True):
    from ..data.embedded import EmbeddedDataset
    if held_out:
        ds = EmbeddedDataset.held_out(num_scenes, image_shape=(image_size, image_size))
    else:
        ds = EmbeddedDataset(num_scenes, image_shape=(image_size, image_size))
    return [ds[i] for i in range(len(ds))]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _render(models, method, batch, config, steps):
    from ..training import forward_model, prepare_batch, render_targets
    which, tto, lam_mode = _SPEC[method]
    enc, head = models[which]
    cfg = config.merge({"steps": int(steps)}) if tto else config
    b = prepare_batch(enc, batch)
    with torch.no_grad():
        pred = forward_model(enc, head, b, tto=tto and steps > 0, lambda_mode=lam_mode, config=cfg)
        color = render_targets(pred, b).clamp(0, 1)
    lam = float(pred.lam.mean()) if lam_mode == "predicted" else float(cfg.constant_lambda)
    return color, b["target"]["image"], lam


def evaluate(models: dict, examples: list, config, *, methods=METHODS, steps_list=None,
             progress: bool = False) -> dict:
    """``models = {"baseline": (encoder, None), "diff3r": (encoder, head)}``.

    Returns ``{"metrics": {method: {psnr, ssim, lpips}}, "psnr_vs_steps": {method: {steps:
    psnr}}, "renders": {method: [first target render per scene]}, "gt": [...], "context":
    [...], "lambda_mean": {...}}``.
    """
    from tqdm import tqdm
    steps_list = sorted(set(steps_list or [0, config.steps]) | {0, config.steps})
    methods = [m for m in methods if _SPEC[m][0] in models]
    per = {m: {"psnr": [], "ssim": [], "lpips": []} for m in methods}
    curve = {m: {s: [] for s in steps_list} for m in methods if _SPEC[m][1]}
    renders = {m: [] for m in methods}
    lam_mean = {m: [] for m in methods}
    gts, ctxs = [], []
    for batch in tqdm(examples, disable=not progress, desc="eval", leave=False):
        gts.append(batch["target"]["image"][0, 0])
        ctxs.append(batch["context"]["image"][0])
        for m in methods:
            color, gt, lam = _render(models, m, batch, config, config.steps)
            pred, ref = color[0], gt[0]
            per[m]["psnr"].append(float(compute_psnr(ref, pred).mean()))
            per[m]["ssim"].append(float(compute_ssim(ref, pred).mean()))
            lp = compute_lpips(ref, pred)
            per[m]["lpips"].append(None if lp is None else float(lp.mean()))
            renders[m].append(pred[0])
            lam_mean[m].append(lam)
            if m in curve:
                for s in steps_list:
                    if s == config.steps:
                        curve[m][s].append(per[m]["psnr"][-1])
                    else:
                        c, g, _ = _render(models, m, batch, config, s)
                        curve[m][s].append(float(compute_psnr(g[0], c[0]).mean()))

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    metrics = {m: {k: mean(v) for k, v in d.items()} for m, d in per.items()}
    for m in metrics:
        metrics[m]["per_scene_psnr"] = per[m]["psnr"]
    return {
        "metrics": metrics,
        "psnr_vs_steps": {m: {str(s): mean(v) for s, v in c.items()} for m, c in curve.items()},
        "renders": renders, "gt": gts, "context": ctxs,
        "lambda_mean": {m: mean(v) for m, v in lam_mean.items()},
    }


def save_grid(result: dict, path, max_rows: int = 4) -> None:
    """Rows: scenes; columns: context views | each method (first target) | GT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(result["renders"])
    rows = min(max_rows, len(result["gt"]))
    if rows == 0:
        return
    nctx = result["context"][0].shape[0]
    cols = nctx + len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.3), squeeze=False)
    for r in range(rows):
        tiles = [(f"context {i}", result["context"][r][i]) for i in range(nctx)]
        tiles += [(m, result["renders"][m][r]) for m in methods]
        tiles.append(("GT", result["gt"][r]))
        for c, (name, img) in enumerate(tiles):
            ax = axes[r][c]
            ax.imshow(img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_steps_plot(curves: dict, path, title: str = "") -> None:
    """``curves = {label: {steps(str): psnr}}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for label, c in curves.items():
        xs = sorted(int(s) for s in c)
        ys = [c[str(s)] for s in xs]
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("TTO steps")
    ax.set_ylabel("target PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def strip(result: dict) -> dict:
    """The JSON-serializable part of :func:`evaluate`'s result."""
    return {"metrics": result["metrics"], "psnr_vs_steps": result["psnr_vs_steps"],
            "lambda_mean": result["lambda_mean"]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", required=True, help="checkpoint of the baseline model")
    p.add_argument("--diff3r", default=None, help="checkpoint of the Diff3R model (+ head)")
    p.add_argument("--data", default=None,
                   help="pixelSplat-format chunk root (with test/); 'embedded' for held-out "
                        "embedded scenes (default)")
    p.add_argument("--index", default=None, help="evaluation index JSON (default "
                   "<data>/evaluation_index_2ctx.json)")
    p.add_argument("--scenes", type=int, default=None, help="at most this many scenes")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--steps", type=int, default=None, help="TTO steps (default: checkpoint's)")
    p.add_argument("--steps-list", type=str, default=None, help="e.g. 0,2,5,10")
    p.add_argument("--out", default="diff3r_eval", help="output directory")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    from ..config import Diff3RConfig
    from ..training import tto_config
    enc_b, _, st_b = load_checkpoint(args.baseline)
    models = {"baseline": (enc_b, None)}
    st = st_b
    if args.diff3r:
        enc_d, head_d, st = load_checkpoint(args.diff3r)
        models["diff3r"] = (enc_d, head_d)
    config = Diff3RConfig.from_dict(st["tto"]) if st.get("tto") else tto_config()
    if args.steps is not None:
        config = config.merge({"steps": args.steps})
    size = args.image_size or st.get("image_size", 32)
    if args.data in (None, "embedded"):
        examples = load_embedded_examples(args.scenes or 4, size)
        source = "embedded held-out"
    else:
        examples = load_real_examples(args.data, args.index, size, args.scenes)
        source = str(args.data)
    steps_list = [int(s) for s in args.steps_list.split(",")] if args.steps_list else None
    res = evaluate(models, examples, config, steps_list=steps_list)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(res, out / "grid.png")
    save_steps_plot(res["psnr_vs_steps"], out / "psnr_vs_steps.png", source)
    ok, reason = lpips_available()
    result = {**{m: {k: v for k, v in d.items()} for m, d in res["metrics"].items()},
              "psnr_vs_steps": res["psnr_vs_steps"], "lambda_mean": res["lambda_mean"],
              "num_scenes": len(examples), "source": source, "image_size": size,
              "tto_steps": config.steps, "lpips_note": None if ok else reason,
              "files": [str(out / "grid.png"), str(out / "psnr_vs_steps.png")]}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
