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
    # Protocol methods (``diff3r experiment``): naive TTO of the baseline (near-zero constant
    # Lambda, set through ``method_overrides``) and the model trained with the unrolled backward.
    "zero_shot_tto_naive": ("baseline", True, "constant"),
    "diff3r_unroll": ("diff3r_unroll", True, "predicted"),
}
# Every method ``evaluate`` knows; ``METHODS`` stays the default set.
ALL_METHODS = tuple(_SPEC)
NAIVE_LAMBDA = 1e-4  # "no proximal term": the smallest Lambda the head can predict (its floor)

__all__ = ["METHODS", "ALL_METHODS", "NAIVE_LAMBDA", "load_real_windows", "batch_examples", "add_arguments", "run", "evaluate", "save_checkpoint", "load_checkpoint",
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


def load_real_windows(root, index_path=None, image_size: int = 64, max_scenes: int | None = None,
                      gap: int = 3, stride: int = 1) -> list:
    """Every context window of each scene listed in the evaluation index.

    Window ``i`` has context views ``(i, i + gap)`` and targets ``i + 1 .. i + gap - 1`` (with
    ``gap = 3``: context ``i, i+3``, targets ``i+1, i+2``, the shape of
    ``evaluation_index_2ctx.json``), for every ``i`` with ``i + gap`` inside the scene. Each
    example carries ``"scene"`` (key) and ``"window"`` (``i``). ``stride > 1`` keeps every
    ``stride``-th window only (a reduced protocol; the default is every window).
    """
    from ..data.chunks import ChunkDataset, EvalEntry, load_evaluation_index
    root = Path(root)
    if index_path is None:
        index_path = root / "evaluation_index_2ctx.json"
    ds = ChunkDataset(root, "test")
    index = load_evaluation_index(index_path)
    out, scenes = [], 0
    for key, entry in index.items():
        if entry is None or key not in ds:
            continue
        n = ds[key].num_views
        for i in range(0, n - gap, max(1, stride)):
            window = EvalEntry(context=(i, i + gap), target=tuple(range(i + 1, i + gap)))
            ex = ds.make_example(key, window, image_shape=(image_size, image_size))
            ex["scene"], ex["window"] = key, i
            out.append(ex)
        scenes += 1
        if max_scenes is not None and scenes >= max_scenes:
            break
    return out


def batch_examples(examples: list, batch_size: int) -> list:
    """Concatenate examples (batch 1, same image size and view counts) into batches."""
    out = []
    for start in range(0, len(examples), max(1, batch_size)):
        group = examples[start:start + batch_size]
        batch = {}
        for part in ("context", "target"):
            batch[part] = {k: torch.cat([g[part][k] for g in group]) for k in group[0][part]
                           if torch.is_tensor(group[0][part][k])}
        batch["examples"] = len(group)
        out.append(batch)
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


def _method_config(config, method, steps, method_overrides):
    over = dict((method_overrides or {}).get(method, {}))
    if method == "zero_shot_tto_naive":
        over.setdefault("constant_lambda", NAIVE_LAMBDA)
    over["steps"] = int(steps)
    return config.merge(over)


def _render(models, method, batch, config, steps, method_overrides=None, record=()):
    """Target renders ``[b, v, 3, h, w]``, ground truth, mean Lambda and the prediction.

    ``record``: TTO step counts below ``steps`` whose target renders are also wanted; they are
    read off the same solve (:func:`~diff3r_plugin.layer.inner.record_iterates`) and returned,
    as ``{s: render}``, in the fifth element (Adam only; with another inner solver the dict is
    empty and the caller solves those counts itself).
    """
    from ..gaussians.layout import GaussianParams
    from ..layer.inner import record_iterates
    from ..training import Prediction, forward_model, prepare_batch, render_targets
    which, tto, lam_mode = _SPEC[method]
    enc, head = models[which]
    cfg = _method_config(config, method, steps, method_overrides) if tto else config
    b = prepare_batch(enc, batch)
    early = {}
    with torch.no_grad(), record_iterates(record) as iterates:
        pred = forward_model(enc, head, b, tto=tto and steps > 0, lambda_mode=lam_mode, config=cfg)
        color = render_targets(pred, b).clamp(0, 1)
        if tto and steps > 0:
            for s, flat in iterates.items():
                theta_s = GaussianParams.unflatten(flat, pred.theta0.layout)
                early[s] = render_targets(Prediction(pred.theta0, theta_s, pred.lam, pred.views),
                                          b).clamp(0, 1)
    lam = float(pred.lam.mean()) if lam_mode == "predicted" else float(cfg.constant_lambda)
    return color, b["target"]["image"], lam, pred, early


def _overlap(pred) -> list:
    """``lambda_overlap_ratio`` of each scene of a batch (predicted Lambda, context cameras)."""
    from ..gaussians.layout import GaussianParams
    from .lambda_overlap import lambda_overlap_ratio
    lam = GaussianParams.unflatten(pred.lam, pred.theta0.layout)
    out = []
    for i in range(pred.lam.shape[0]):
        out.append(lambda_overlap_ratio(lam.means[i], pred.theta0.means[i],
                                        pred.views.extrinsics[i], pred.views.intrinsics[i],
                                        pred.views.near[i]))
    return out


def evaluate(models: dict, examples: list, config, *, methods=METHODS, steps_list=None,
             progress: bool = False, method_overrides: dict | None = None, batch_size: int = 1,
             lambda_overlap: bool = False) -> dict:
    """``models = {"baseline": (encoder, None), "diff3r": (encoder, head)}`` (optionally also
    ``"diff3r_unroll": (encoder, head)``).

    Every TTO method is run with ``config.steps`` steps for its metrics and with each count of
    ``steps_list`` for its PSNR-vs-steps curve. ``method_overrides = {method: {config field:
    value}}`` changes the TTO settings of one method (e.g. the baseline's constant Lambda);
    ``zero_shot_tto_naive`` defaults to ``constant_lambda = NAIVE_LAMBDA``. ``batch_size``
    examples are solved in one layer call (each scene keeps its own solve: Adam and the
    proximal term act per scene). With ``lambda_overlap``, the ratio of
    :func:`~diff3r_plugin.evaluation.lambda_overlap.lambda_overlap_ratio` is computed on every
    example for each model with a head.

    Returns ``{"metrics": {method: {psnr, ssim, lpips, per_scene_psnr, per_view_psnr,
    per_view_ssim}}, "psnr_vs_steps": {method: {steps: psnr}}, "renders": {method: [first
    target render per example]}, "gt": [...], "context": [...], "lambda_mean": {...},
    "lambda_overlap": {model: {"ratio", "per_example"}}}`` (PSNR/SSIM: mean over examples of
    the mean over their target views).
    """
    from tqdm import tqdm
    steps_list = sorted(set(steps_list or [0, config.steps]) | {0, config.steps})
    methods = [m for m in methods if _SPEC[m][0] in models]
    per = {m: {"psnr": [], "ssim": [], "lpips": [], "view_psnr": [], "view_ssim": []}
           for m in methods}
    curve = {m: {s: [] for s in steps_list} for m in methods if _SPEC[m][1]}
    renders = {m: [] for m in methods}
    lam_mean = {m: [] for m in methods}
    overlap = {name: [] for name, (_, head) in models.items() if head is not None}
    gts, ctxs = [], []
    batches = batch_examples(examples, batch_size) if batch_size > 1 else examples
    for batch in tqdm(batches, disable=not progress, desc="eval", leave=False):
        n_ex = batch["target"]["image"].shape[0]
        for i in range(n_ex):
            gts.append(batch["target"]["image"][i, 0])
            ctxs.append(batch["context"]["image"][i])
        for m in methods:
            # One solve gives the whole PSNR-vs-steps curve (Adam's iterates are prefixes).
            record = [s for s in steps_list if 0 < s < config.steps] if m in curve else []
            color, gt, lam, pred, early = _render(models, m, batch, config, config.steps,
                                                  method_overrides, record)
            which, _, lam_mode = _SPEC[m]
            if lambda_overlap and lam_mode == "predicted" and which in overlap \
                    and len(overlap[which]) < len(gts):
                overlap[which] += _overlap(pred)
            for i in range(n_ex):
                pred_i, ref = color[i], gt[i]
                psnr = compute_psnr(ref, pred_i)
                ssim = compute_ssim(ref, pred_i)
                per[m]["psnr"].append(float(psnr.mean()))
                per[m]["ssim"].append(float(ssim.mean()))
                per[m]["view_psnr"] += [float(x) for x in psnr]
                per[m]["view_ssim"] += [float(x) for x in ssim]
                lp = compute_lpips(ref, pred_i)
                per[m]["lpips"].append(None if lp is None else float(lp.mean()))
                renders[m].append(pred_i[0])
                lam_mean[m].append(lam)
            if m in curve:
                for s in steps_list:
                    if s == config.steps:
                        curve[m][s] += per[m]["psnr"][-n_ex:]
                        continue
                    if s in early:
                        c, g = early[s], gt
                    else:
                        c, g, _, _, _ = _render(models, m, batch, config, s, method_overrides)
                    curve[m][s] += [float(compute_psnr(g[i], c[i]).mean()) for i in range(n_ex)]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    metrics = {m: {k: mean(d[k]) for k in ("psnr", "ssim", "lpips")} for m, d in per.items()}
    for m in metrics:
        metrics[m]["per_scene_psnr"] = per[m]["psnr"]
        metrics[m]["per_view_psnr"] = per[m]["view_psnr"]
        metrics[m]["per_view_ssim"] = per[m]["view_ssim"]
    overlap_out = {}
    for name, rows in overlap.items():
        if rows:
            ratios = [r["ratio"] for r in rows]
            overlap_out[name] = {"ratio": mean(ratios), "per_example": ratios}
    return {
        "metrics": metrics,
        "psnr_vs_steps": {m: {str(s): mean(v) for s, v in c.items()} for m, c in curve.items()},
        "renders": renders, "gt": gts, "context": ctxs,
        "lambda_mean": {m: mean(v) for m, v in lam_mean.items()},
        "lambda_overlap": overlap_out,
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
    p.add_argument("--baseline", required=True, nargs="+",
                   help="checkpoint(s) of the baseline model, one per training seed")
    p.add_argument("--diff3r", default=None, nargs="+",
                   help="checkpoint(s) of the Diff3R model (+ head), in the same seed order")
    p.add_argument("--diff3r-unroll", default=None, nargs="+",
                   help="checkpoint(s) of the model trained with backward='unroll' (optional)")
    p.add_argument("--data", default=None,
                   help="pixelSplat-format chunk root (with test/); 'embedded' for held-out "
                        "embedded scenes (default)")
    p.add_argument("--index", default=None, help="evaluation index JSON (default "
                   "<data>/evaluation_index_2ctx.json)")
    p.add_argument("--windows", choices=("all", "index"), default="all",
                   help="'all': every context window (i, i+3) of each indexed scene, targets "
                        "i+1, i+2; 'index': only the window the index lists")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--scenes", type=int, default=None, help="at most this many scenes")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--steps", type=int, default=None, help="TTO steps (default: checkpoint's)")
    p.add_argument("--steps-list", type=str, default=None, help="e.g. 0,10,30,100")
    p.add_argument("--lambda", dest="constant_lambda", type=float, default=None,
                   help="the baseline's constant TTO Lambda (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=4, help="examples per layer call")
    p.add_argument("--out", default="diff3r_eval", help="output directory")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    from ..config import Diff3RConfig
    from ..training import tto_config
    from .stats import paired_bootstrap

    def paths(x):
        return [x] if isinstance(x, str) else list(x or [])

    base_paths, d_paths, u_paths = paths(args.baseline), paths(args.diff3r), paths(args.diff3r_unroll)
    for name, ps in (("--diff3r", d_paths), ("--diff3r-unroll", u_paths)):
        if ps and len(ps) != len(base_paths):
            raise ValueError(f"{name} needs one checkpoint per --baseline checkpoint "
                             f"({len(base_paths)}), got {len(ps)}")
    seeds_models, st = [], None
    for i, bp in enumerate(base_paths):
        enc_b, _, st_b = load_checkpoint(bp)
        models = {"baseline": (enc_b, None)}
        st = st if st is not None else st_b
        if d_paths:
            enc_d, head_d, st_d = load_checkpoint(d_paths[i])
            models["diff3r"] = (enc_d, head_d)
            if i == 0:
                st = st_d
        if u_paths:
            enc_u, head_u, _ = load_checkpoint(u_paths[i])
            models["diff3r_unroll"] = (enc_u, head_u)
        seeds_models.append(models)
    config = Diff3RConfig.from_dict(st["tto"]) if st.get("tto") else tto_config()
    if args.steps is not None:
        config = config.merge({"steps": args.steps})
    if args.constant_lambda is not None:
        config = config.merge({"constant_lambda": args.constant_lambda})
    size = args.image_size or st.get("image_size", 32)
    if args.data in (None, "embedded"):
        examples = load_embedded_examples(args.scenes or 4, size)
        source = "embedded held-out"
    elif args.windows == "all":
        examples = load_real_windows(args.data, args.index, size, args.scenes)
        source = f"{args.data} (every context window)"
    else:
        examples = load_real_examples(args.data, args.index, size, args.scenes)
        source = str(args.data)
    if args.max_windows is not None:
        examples = examples[:args.max_windows]
    if args.steps_list:
        steps_list = [int(s) for s in args.steps_list.split(",")]
    else:
        steps_list = sorted({0, 10, 30, config.steps} & set(range(config.steps + 1)))
    methods = [m for m in ALL_METHODS if _SPEC[m][0] in seeds_models[0]]
    runs = [evaluate(models, examples, config, methods=methods, steps_list=steps_list,
                     batch_size=args.batch, lambda_overlap=True) for models in seeds_models]
    res = runs[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(res, out / "grid.png")

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    curves = {m: {k: mean([r["psnr_vs_steps"][m][k] for r in runs]) for k in c}
              for m, c in res["psnr_vs_steps"].items()}
    save_steps_plot(curves, out / "psnr_vs_steps.png", source)
    ok, reason = lpips_available()
    table = {}
    for m in res["metrics"]:
        rows = [r["metrics"][m] for r in runs]
        table[m] = {**{k: v for k, v in rows[0].items()},
                    **{k: mean([r[k] for r in rows]) for k in ("psnr", "ssim", "lpips")},
                    "psnr_per_seed": [r["psnr"] for r in rows],
                    "ssim_per_seed": [r["ssim"] for r in rows]}
    paired = {}
    if "diff3r_tto" in table:
        for key, metric in (("diff3r_tto_minus_zero_shot_tto", "per_view_psnr"),
                            ("ssim_diff3r_tto_minus_zero_shot_tto", "per_view_ssim")):
            a = [r["metrics"]["diff3r_tto"][metric] for r in runs]
            b = [r["metrics"]["zero_shot_tto"][metric] for r in runs]
            paired[key] = paired_bootstrap(a, b)
    overlap = [r["lambda_overlap"].get("diff3r", {}).get("ratio") for r in runs]
    result = {**table, "paired": paired,
              "psnr_vs_steps": curves,
              "peak_step": {m: int(max(c, key=lambda k: -math.inf if c[k] is None else c[k]))
                            for m, c in curves.items()},
              "lambda_mean": res["lambda_mean"],
              "lambda_overlap_ratio": mean(overlap),
              "num_scenes": len(examples), "num_seeds": len(runs), "source": source,
              "image_size": size, "tto_steps": config.steps,
              "baseline_tto_lambda": config.constant_lambda,
              "lpips_note": None if ok else reason,
              "files": [str(out / "grid.png"), str(out / "psnr_vs_steps.png")]}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
