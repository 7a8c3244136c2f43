"""``diff3r experiment``: the evidence protocol for the claim "an encoder trained through the
layer gives Gaussians that are better *after* TTO than a conventionally trained encoder given
the same TTO".

Protocol (defaults; ``--quick`` shrinks every count for CI):

1. **Data.** Generated embedded training scenes (seeds ``[0, scenes)``), a *validation* split of
   held-out embedded scenes (held-out seeds from ``10000 + 1000``) on which every setting is
   chosen, a *test* split of held-out embedded scenes (seeds from ``10000``), and the real
   scenes of ``--data`` (pixelSplat chunks), evaluated on **every context window**: context
   ``(i, i+3)``, targets ``i+1, i+2`` (:func:`~diff3r_plugin.evaluation.eval_cli.load_real_windows`).
   The real scenes are never used for a choice.
2. **Outer steps** ``N``: the zero-shot baseline of the first seed is trained with its
   zero-shot PSNR on the validation scenes measured every ``val_every`` steps; training stops
   after ``patience`` evaluations without improvement (or at ``max_steps``) and ``N`` is the
   best step. The curve is written as ``training_curve.png``; the first seed's predicted Λ
   on the first window of each split as ``lambda_map_<split>.png``, beside ``grid_<split>.png``.
3. **Models per seed** (same data, same ``N`` outer steps, same optimizer): the baseline trains
   ``N`` steps without the layer. Training through the layer is ~5-10x slower per step on CPU,
   so Diff3R is the baseline's snapshot after ``N - n_ft`` steps fine-tuned for the last
   ``n_ft = finetune_fraction * N`` steps through the layer (encoder + uncertainty head, the
   head starting at ``head_init``: a fixed value, not the baseline's chosen Lambda, because
   the chosen Lambda can approach zero, where ``J^T J + diag(Lambda)`` is near-singular and
   the capped implicit backward drives the encoder to huge Gaussians); ``diff3r_unroll`` is
   the same with ``backward="unroll"`` at the same K. Both train on
   ``L(theta*) + init_weight L(theta0)`` (default 1, chosen on the validation scenes against
   0, the plain loss: ``docs/benchmarks.md``), which keeps the starting point renderable.
4. **Baseline's TTO Lambda**: the constant Lambda of ``lambda_grid`` with the best validation
   PSNR after the test-time TTO (first seed); a best value on the grid's edge extends the grid
   by factors of 10 on that side until it is interior. ``zero_shot_tto_naive`` uses a
   near-zero Lambda (``NAIVE_LAMBDA``, no proximal term).
5. **Test-time TTO**: Adam, ``eval_tto_steps`` steps (default 100) for the reported metrics,
   PSNR also after each count of ``steps_list``; per-group 3DGS rates x ``lr_scale``.
6. **Statistics**: per-seed values, means over seeds, and a paired bootstrap 95 % interval of
   ``diff3r_tto - zero_shot_tto`` over target views (:func:`~.stats.paired_bootstrap`).
7. **Diagnostics**: per training step the inner stationarity and PCG residual; every
   ``grad_cosine_every`` steps the cosine between the implicit and the unrolled gradient of the
   same K-step map (:func:`~diff3r_plugin.training.gradient_cosine`); seconds per step and
   peak memory of the three trainings; the ratio of Lambda outside/inside the context overlap
   (:func:`~.lambda_overlap.lambda_overlap_ratio`).
8. **Pose-free**: the NoPoSplat-style built-in model through steps 2-6 with the same ``N``
   (``pose_free_seeds`` seeds).

Peak memory on CPU is the growth of the process's resident set during one training step,
sampled every millisecond from ``/proc/self/statm`` (on CUDA: ``max_memory_allocated``); the
allocator reuses freed memory, so ``saved_for_backward_mb`` (the storages autograd keeps for
the backward) is reported beside it as an allocator-independent figure.
"""

import argparse
import copy
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .eval_cli import (ALL_METHODS, METHODS, NAIVE_LAMBDA, evaluate, load_embedded_examples,
                       load_real_windows, save_checkpoint, save_grid, save_steps_plot)
from .metrics import lpips_available
from .plots import save_predicted_lambda_map
from .stats import paired_bootstrap

__all__ = ["add_arguments", "run", "run_experiment", "default_data_dir", "peak_step_memory_mb",
           "PROTOCOL_METHODS", "saved_tensors_mb"]

PROTOCOL_METHODS = ("zero_shot", "zero_shot_tto", "zero_shot_tto_naive", "diff3r_tto",
                    "diff3r_no_lambda", "diff3r_unroll")
POSE_FREE_METHODS = ("zero_shot", "zero_shot_tto", "zero_shot_tto_naive", "diff3r_tto",
                     "diff3r_no_lambda")
VALIDATION_OFFSET = 1000  # validation scenes: held-out seeds 10000 + 1000 onward (test: 10000+)


def default_data_dir() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    path = repo.parent / "shared" / "data" / "re10k_demo"
    return path if (path / "test").is_dir() else None


def _make_encoder(model: str, seed: int):
    from ..models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
    torch.manual_seed(seed)
    return TinyPoseFreeEncoder() if model == "pose_free" else TinyPoseGivenEncoder()


def _make_head(enc, init: float):
    from ..uncertainty import UncertaintyHead
    return UncertaintyHead(enc.num_features, enc.sh_degree,
                           1 if getattr(enc, "pose_free", False) else 0, init=init)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_step_memory_mb(fn) -> float | None:
    """Peak memory (MB) that ``fn()`` adds: CUDA peak allocation, else resident-set growth
    sampled every millisecond (``None`` where ``/proc/self/statm`` does not exist)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not Path("/proc/self/statm").exists():
        fn()
        return None
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - base) / 2**20


def saved_tensors_mb(fn) -> float:
    """MB of the distinct tensor storages autograd saves for the backward while ``fn()`` runs:
    the graph memory that an unrolled backward grows with K (allocator-independent)."""
    seen: dict = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _one_step_memory(enc, head, batch, method, config) -> dict:
    from ..training import training_step
    enc, head = copy.deepcopy(enc), copy.deepcopy(head)

    def step():
        loss, _ = training_step(enc, head, batch, method=method, config=config)
        loss.backward()

    def forward():
        training_step(enc, head, batch, method=method, config=config)

    return {"peak_rss_growth": peak_step_memory_mb(step), "saved_for_backward": saved_tensors_mb(forward)}


def _mean(xs):
    xs = [x for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else None


def _tail(xs, n=10):
    xs = xs[-n:]
    return float(sum(xs) / len(xs)) if xs else None


def _zero_shot_psnr(enc, examples, config) -> float:
    res = evaluate({"baseline": (enc, None)}, examples, config, methods=("zero_shot",),
                   steps_list=[0])
    return res["metrics"]["zero_shot"]["psnr"]


def _train_curve(model, seed, batches, val, cfg, *, lr, max_steps, val_every, patience, progress):
    """Baseline with validation every ``val_every`` steps; returns the curve and snapshots."""
    from ..training import train
    enc = _make_encoder(model, seed)
    curve = {"step": [0], "val_psnr": [_zero_shot_psnr(enc, val, cfg)]}
    snaps = {0: copy.deepcopy(enc.state_dict())}
    best = {"psnr": curve["val_psnr"][0], "step": 0, "bad": 0}

    def callback(step, encoder):
        if step % val_every:
            return False
        encoder.eval()
        psnr = _zero_shot_psnr(encoder, val, cfg)
        encoder.train()
        curve["step"].append(step)
        curve["val_psnr"].append(psnr)
        snaps[step] = copy.deepcopy(encoder.state_dict())
        if psnr > best["psnr"]:
            best.update(psnr=psnr, step=step, bad=0)
        else:
            best["bad"] += 1
        return best["bad"] >= patience

    hist = train(enc, None, batches, max_steps, method="baseline", config=cfg, lr=lr,
                 progress=progress, step_callback=callback)
    curve["train_loss"] = hist.losses
    curve["best_step"] = best["step"]
    curve["best_val_psnr"] = best["psnr"]
    curve["stopped_at"] = len(hist.losses)
    return curve, snaps, hist


def _save_curve_png(curve: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    losses = curve["train_loss"]
    ax.plot(range(1, len(losses) + 1), losses, color="tab:gray", lw=0.8, label="train loss")
    ax.set_xlabel("outer step")
    ax.set_ylabel("train loss (MSE)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(curve["step"], curve["val_psnr"], "o-", color="tab:blue", label="val PSNR")
    ax2.axvline(curve["best_step"], color="tab:red", ls="--", lw=0.8)
    ax2.set_ylabel("zero-shot validation PSNR (dB)")
    ax.set_title(title, fontsize=9)
    fig.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _choose_lambda(enc, val, cfg, grid, steps_list, progress, batch_size=1, *, extend: int = 3):
    """Constant Lambda of the baseline's TTO with the best validation PSNR after the TTO.

    A best value on the grid's edge says the optimum may lie beyond it, so the grid is extended
    by factors of 10 on that side (at most ``extend`` times, never below ``10 * NAIVE_LAMBDA``,
    which ``zero_shot_tto_naive`` covers, nor above 1e4) until the best value is interior.
    Every value tried is in the returned rows.
    """
    rows = []

    def score(lam):
        res = evaluate({"baseline": (enc, None)}, val, cfg, methods=("zero_shot_tto",),
                       steps_list=steps_list,
                       method_overrides={"zero_shot_tto": {"constant_lambda": float(lam)}},
                       progress=progress, batch_size=batch_size)
        rows.append({"lambda": float(lam), "val_psnr": res["metrics"]["zero_shot_tto"]["psnr"],
                     "val_psnr_vs_steps": res["psnr_vs_steps"]["zero_shot_tto"]})

    for lam in grid:
        score(lam)
    for _ in range(extend):
        lams = sorted(r["lambda"] for r in rows)
        best = max(rows, key=lambda r: r["val_psnr"])["lambda"]
        if len(lams) > 1 and best == lams[0] and best / 10 >= 10 * NAIVE_LAMBDA * (1 - 1e-9):
            score(best / 10)
        elif len(lams) > 1 and best == lams[-1] and best * 10 <= 1e4:
            score(best * 10)
        else:
            break
    best = max(rows, key=lambda r: r["val_psnr"])
    return best["lambda"], rows


def _train_seed(model, seed, batches, cfg, *, n_outer, n_pre, lr, head_lr, head_init, snaps,
                unroll, grad_cosine_every, progress, init_weight=0.0):
    """Baseline (N steps), Diff3R and (optionally) Diff3R-unroll fine-tuned from step n_pre."""
    from ..training import train
    hist = {}
    if snaps is not None and n_pre in snaps and n_outer in snaps:
        base = _make_encoder(model, seed)
        base.load_state_dict(snaps[n_outer])
        pre_state = snaps[n_pre]
        hist["baseline"] = None
    else:
        base = _make_encoder(model, seed)
        train(base, None, batches, n_pre, method="baseline", config=cfg, lr=lr, progress=progress)
        pre_state = copy.deepcopy(base.state_dict())
        k = n_pre % len(batches)
        rotated = batches[k:] + batches[:k]
        hist["baseline"] = train(base, None, rotated, n_outer - n_pre, method="baseline",
                                 config=cfg, lr=lr, progress=progress)
    k = n_pre % len(batches)
    rotated = batches[k:] + batches[:k]
    models = {"baseline": (base.eval(), None)}
    variants = [("diff3r", "implicit")] + ([("diff3r_unroll", "unroll")] if unroll else [])
    for name, backward in variants:
        enc = _make_encoder(model, seed)
        enc.load_state_dict(pre_state)
        head = _make_head(enc, head_init)
        hist[name] = train(enc, head, rotated, n_outer - n_pre, method="diff3r",
                           config=cfg.merge({"backward": backward}), lr=lr, head_lr=head_lr,
                           progress=progress, init_weight=init_weight,
                           grad_cosine_every=grad_cosine_every if name == "diff3r" else None)
        head.eval()
        models[name] = (enc.eval(), head)
    return models, hist, pre_state


def _stack_seeds(per_seed: list, method: str, key: str) -> np.ndarray:
    return np.array([r["metrics"][method][key] for r in per_seed], dtype=np.float64)


def _aggregate(per_seed: list, methods) -> dict:
    """Means over seeds, per-seed values and the paired interval (``real`` shape)."""
    out = {}
    present = [m for m in methods if m in per_seed[0]["metrics"]]
    for m in present:
        rows = [r["metrics"][m] for r in per_seed]
        out[m] = {"psnr": _mean([r["psnr"] for r in rows]), "ssim": _mean([r["ssim"] for r in rows]),
                  "lpips": _mean([r["lpips"] for r in rows]),
                  "psnr_per_seed": [r["psnr"] for r in rows],
                  "ssim_per_seed": [r["ssim"] for r in rows]}
    paired = {}
    if "diff3r_tto" in present and "zero_shot_tto" in present:
        a, b = (_stack_seeds(per_seed, m, "per_view_psnr") for m in ("diff3r_tto", "zero_shot_tto"))
        paired["diff3r_tto_minus_zero_shot_tto"] = paired_bootstrap(a, b)
        a, b = (_stack_seeds(per_seed, m, "per_view_ssim") for m in ("diff3r_tto", "zero_shot_tto"))
        paired["ssim_diff3r_tto_minus_zero_shot_tto"] = paired_bootstrap(a, b)
    if "diff3r_tto" in present and "zero_shot" in present:
        a, b = (_stack_seeds(per_seed, m, "per_view_psnr") for m in ("diff3r_tto", "zero_shot"))
        paired["diff3r_tto_minus_zero_shot"] = paired_bootstrap(a, b)
    out["paired"] = paired
    return out


def _curves(per_seed: list) -> tuple[dict, dict]:
    """PSNR vs TTO steps, mean over seeds, with the step count at which each method peaks."""
    out = {}
    for m in per_seed[0]["psnr_vs_steps"]:
        steps = list(per_seed[0]["psnr_vs_steps"][m])
        out[m] = {s: _mean([r["psnr_vs_steps"][m][s] for r in per_seed]) for s in steps}
    peaks = {m: max(c, key=lambda s: -math.inf if c[s] is None else c[s]) for m, c in out.items()}
    return out, {m: int(s) for m, s in peaks.items()}


def _overlap_ratio(per_seed: list):
    vals = [r["lambda_overlap"].get("diff3r", {}).get("ratio") for r in per_seed]
    return {"ratio": _mean(vals), "per_seed": vals}


def run_experiment(*, quick: bool = False, image_size: int = 64, seeds: int = 3, seed: int = 0,
                   scenes: int = 24, val_scenes: int = 3, eval_embedded: int = 4,
                   data: str | None = "default", real_scenes: int | None = None,
                   max_windows: int | None = None, out: str | None = None,
                   model: str = "pose_given", pose_free: bool = True, pose_free_seeds: int = 1,
                   max_steps: int = 300, val_every: int = 25, patience: int = 2,
                   finetune_fraction: float = 1 / 3, tto_steps: int = 10,
                   eval_tto_steps: int = 100, steps_list: list[int] | None = None,
                   lambda_grid: tuple = (0.1, 1.0, 10.0), lr: float = 2e-3,
                   head_lr: float = 1e-3, head_init: float = 0.1, lr_scale: float = 4.0,
                   pcg_maxiter: int = 8,
                   precond_probes: int = 1, grad_cosine_every: int = 10, eval_batch: int = 4,
                   progress: bool = True, train_steps: int | None = None,
                   window_stride: int = 1, train_inner_solver: str = "adam",
                   constant_lambda: float | None = None, evaluate_on: str = "test",
                   init_weight: float = 1.0, **_ignored) -> dict:
    """Run the protocol of the module docstring; returns the JSON-ready result.

    ``train_steps`` fixes ``N`` (skipping the validation-curve choice); ``constant_lambda``
    fixes the baseline's TTO Lambda (skipping its validation choice). ``train_inner_solver``:
    the layer's inner solver in training (``"lm"``: ``tto_steps`` damped LM steps with the
    option file's damping and PCG caps); the test-time TTO is Adam either way.
    ``evaluate_on="validation"``: the trained models are evaluated on the validation scenes
    only (``result["validation"]``, same shape as ``real``), never on the real or test
    scenes, so that a training setting can be chosen without looking at the reported data.
    ``init_weight``: the Diff3R models' outer loss is ``L(theta*) + init_weight L(theta0)``
    (:func:`~diff3r_plugin.training.training_step`).
    """
    if train_inner_solver not in ("adam", "lm"):
        raise ValueError(f"train_inner_solver must be 'adam' or 'lm', got {train_inner_solver!r}")
    if evaluate_on not in ("test", "validation"):
        raise ValueError(f"evaluate_on must be 'test' or 'validation', got {evaluate_on!r}")
    from ..data.embedded import EmbeddedDataset
    from ..training import tto_config

    if quick:
        image_size, seeds, scenes, val_scenes = min(image_size, 16), min(seeds, 2), 1, 1
        eval_embedded, real_scenes, max_windows = 1, 1, 2
        max_steps, val_every, patience = 2, 1, 5
        tto_steps, eval_tto_steps, pcg_maxiter = 2, 2, 3
        steps_list, lambda_grid, grad_cosine_every = [0, 1, 2], (0.1, 1.0), 1
        pose_free_seeds = 1
        train_steps = None if train_steps is None else min(train_steps, 2)
    steps_list = sorted(set(steps_list or [0, 10, 30, eval_tto_steps]) | {0, eval_tto_steps})
    t_start = time.perf_counter()
    cfg = tto_config(tto_steps, lr_scale=lr_scale, pcg_maxiter=pcg_maxiter,
                     constant_lambda=1.0, precond_probes=precond_probes)
    eval_cfg = cfg.merge({"steps": eval_tto_steps})
    if train_inner_solver == "lm":
        # Only the training layer changes: the evaluation keeps the protocol's Adam TTO.
        cfg = cfg.merge({"inner_solver": "lm"})
    shape = (image_size, image_size)
    train_ds = EmbeddedDataset(scenes, image_shape=shape, cache=True)
    batches = [train_ds[i] for i in range(len(train_ds))]
    val_ds = EmbeddedDataset.held_out(val_scenes, offset=VALIDATION_OFFSET, image_shape=shape)
    val = [val_ds[i] for i in range(len(val_ds))]
    emb_examples = load_embedded_examples(eval_embedded, image_size)
    data_dir = default_data_dir() if data == "default" else (Path(data) if data else None)
    real_examples = None
    if data_dir is not None and (Path(data_dir) / "test").is_dir():
        real_examples = load_real_windows(data_dir, None, image_size, real_scenes,
                                          stride=window_stride)
        if max_windows is not None:
            real_examples = real_examples[:max_windows]
    splits = (("real", real_examples), ("embedded", emb_examples))
    if evaluate_on == "validation":  # the reported data stay unseen while settings are chosen
        real_examples, emb_examples, pose_free = None, None, False
        splits = (("validation", val),)
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    files, timings = [], {}

    def note(message):
        # One line per phase on stderr, so that a long run can be followed.
        print(f"[experiment {(time.perf_counter() - t_start) / 60:6.1f} min] {message}",
              file=sys.stderr, flush=True)

    # 1. Outer steps from the zero-shot baseline's validation curve (first seed).
    t = time.perf_counter()
    if train_steps is None:
        curve, snaps, hist_curve = _train_curve(model, seed, batches, val, cfg, lr=lr,
                                                max_steps=max_steps, val_every=val_every,
                                                patience=patience, progress=progress)
        n_outer = max(curve["best_step"], val_every)
    else:
        curve, snaps, hist_curve, n_outer = None, None, None, int(train_steps)
    n_ft = max(1, int(round(finetune_fraction * n_outer)))
    n_pre = max(0, n_outer - n_ft)
    if snaps is not None:  # snapshot steps are multiples of val_every
        n_pre = max(s for s in snaps if s <= n_pre)
        n_ft = n_outer - n_pre
    timings["curve"] = time.perf_counter() - t
    note(f"outer steps N = {n_outer} (pretrain {n_pre}, fine-tune {n_ft}); "
         f"curve {timings['curve']:.0f} s")
    if out_dir and curve is not None:
        _save_curve_png(curve, out_dir / "training_curve.png", "zero-shot baseline, first seed")
        files.append(str(out_dir / "training_curve.png"))

    # 2. The baseline's TTO Lambda, on validation scenes (first seed's baseline).
    t = time.perf_counter()
    variants = []
    if constant_lambda is None:
        enc0 = _make_encoder(model, seed)
        if snaps is not None and n_outer in snaps:
            enc0.load_state_dict(snaps[n_outer])
        else:
            from ..training import train
            train(enc0, None, batches, n_outer, method="baseline", config=cfg, lr=lr,
                  progress=progress)
            snaps = {n_outer: copy.deepcopy(enc0.state_dict())}
        enc0.eval()
        best_lambda, variants = _choose_lambda(enc0, val, eval_cfg, lambda_grid, [0, eval_tto_steps],
                                               progress, eval_batch)
    else:
        best_lambda = float(constant_lambda)
    cfg = cfg.merge({"constant_lambda": best_lambda})
    eval_cfg = eval_cfg.merge({"constant_lambda": best_lambda})
    timings["lambda_choice"] = time.perf_counter() - t
    note(f"baseline TTO Lambda = {best_lambda} ({timings['lambda_choice']:.0f} s): {variants}")

    # 3. Per seed: train, save, evaluate.
    per_seed = {name: [] for name, _ in splits}
    hists, grad_cos, mem = [], [], {}
    first_eval = {}
    for k in range(seeds):
        s = seed + k
        t = time.perf_counter()
        models, hist, pre_state = _train_seed(
            model, s, batches, cfg, n_outer=n_outer, n_pre=n_pre, lr=lr, head_lr=head_lr,
            head_init=head_init, snaps=snaps if k == 0 else None, unroll=True,
            grad_cosine_every=grad_cosine_every, progress=progress, init_weight=init_weight)
        timings[f"train_seed{s}"] = time.perf_counter() - t
        hists.append(hist)
        if k == 0:
            probe = _make_encoder(model, s)
            probe.load_state_dict(pre_state)
            head = _make_head(probe, head_init)
            b0 = batches[0]
            mem = {"baseline": _one_step_memory(probe, None, b0, "baseline", cfg),
                   "diff3r": _one_step_memory(probe, head, b0, "diff3r", cfg),
                   "diff3r_unroll": _one_step_memory(probe, head, b0, "diff3r",
                                                     cfg.merge({"backward": "unroll"}))}
        grad_cos += [l["grad_cosine"] for l in hist["diff3r"].logs if "grad_cosine" in l]
        if out_dir:
            sd = out_dir / f"seed{s}"
            sd.mkdir(parents=True, exist_ok=True)
            meta = {"image_size": image_size, "model": model, "seed": s, "outer_steps": n_outer}
            save_checkpoint(sd / "baseline.pt", models["baseline"][0], None, eval_cfg.to_dict(), **meta)
            save_checkpoint(sd / "diff3r.pt", *models["diff3r"], eval_cfg.to_dict(), **meta)
            save_checkpoint(sd / "diff3r_unroll.pt", *models["diff3r_unroll"], eval_cfg.to_dict(),
                            **meta)
        t = time.perf_counter()
        for split, examples in splits:
            if not examples:
                continue
            res = evaluate(models, examples, eval_cfg, methods=PROTOCOL_METHODS,
                           steps_list=steps_list, progress=progress, batch_size=eval_batch,
                           lambda_overlap=True)
            per_seed[split].append(res)
            if k == 0:
                first_eval[split] = res
                if out_dir:  # the first seed's Diff3R head on the split's first window
                    path = out_dir / f"lambda_map_{split}.png"
                    save_predicted_lambda_map(*models["diff3r"], examples[0], eval_cfg, path,
                                              f"predicted Λ, seed {s}, {split} window 0")
                    files.append(str(path))
        timings[f"eval_seed{s}"] = time.perf_counter() - t
        note(f"seed {s}: trained in {timings[f'train_seed{s}']:.0f} s, evaluated in "
             f"{timings[f'eval_seed{s}']:.0f} s")
        if out_dir:  # what the seeds so far give, in case a long run is cut short
            partial = {split: _aggregate(rows, PROTOCOL_METHODS) for split, rows in per_seed.items()
                       if rows}
            (out_dir / "partial.json").write_text(json.dumps(
                {"seeds_done": k + 1, "outer_steps": n_outer, "baseline_tto_lambda": best_lambda,
                 **partial, "timings_s": timings}, indent=2))

    # 4. The pose-free built-in model through the same protocol (same N, same Lambda grid).
    pose_free_result = {}
    if pose_free and model == "pose_given" and real_examples:
        t = time.perf_counter()
        pf_real = []
        pf_lambda, pf_variants = best_lambda, []
        for k in range(pose_free_seeds):
            s = seed + k
            models_pf, hist_pf, _ = _train_seed(
                "pose_free", s, batches, cfg, n_outer=n_outer, n_pre=n_pre, lr=lr,
                head_lr=head_lr, head_init=head_init, snaps=None, unroll=False,
                grad_cosine_every=None, progress=progress, init_weight=init_weight)
            if k == 0 and constant_lambda is None:
                pf_lambda, pf_variants = _choose_lambda(models_pf["baseline"][0], val, eval_cfg,
                                                        lambda_grid, [0, eval_tto_steps], progress,
                                                        eval_batch)
            pf_cfg = eval_cfg.merge({"constant_lambda": pf_lambda})
            pf_real.append(evaluate(models_pf, real_examples, pf_cfg, methods=POSE_FREE_METHODS,
                                    steps_list=steps_list, progress=progress,
                                    batch_size=eval_batch, lambda_overlap=True))
        pose_free_result = _aggregate(pf_real, POSE_FREE_METHODS)
        pf_curves, pf_peaks = _curves(pf_real)
        pose_free_result["psnr_vs_steps"] = pf_curves
        pose_free_result["peak_step"] = pf_peaks
        pose_free_result["seeds"] = pose_free_seeds
        pose_free_result["baseline_tto_lambda"] = pf_lambda
        pose_free_result["lambda_variants"] = pf_variants
        pose_free_result["note"] = (f"diff3r_tto's head starts at head_init = {head_init}; "
                                    "zero_shot_tto uses the pose-free baseline's chosen Lambda")
        timings["pose_free"] = time.perf_counter() - t
        note(f"pose-free done in {timings['pose_free']:.0f} s")

    # 5. Aggregate.
    result: dict = {"evaluated_on": evaluate_on}
    for split in ("real", "embedded"):
        per_seed.setdefault(split, [])
    for split in per_seed:
        result[split] = _aggregate(per_seed[split], PROTOCOL_METHODS) if per_seed[split] else {}
    result["pose_free"] = pose_free_result
    result["psnr_vs_steps"], result["peak_step"] = {}, {}
    for split in per_seed:
        if per_seed[split]:
            result["psnr_vs_steps"][split], result["peak_step"][split] = _curves(per_seed[split])
        else:
            result["psnr_vs_steps"][split], result["peak_step"][split] = {}, {}
    if pose_free_result:
        result["psnr_vs_steps"]["pose_free"] = pose_free_result["psnr_vs_steps"]
        result["peak_step"]["pose_free"] = pose_free_result["peak_step"]
    result["lambda_overlap_ratio"] = {
        split: (_overlap_ratio(per_seed[split])["ratio"] if per_seed[split] else None)
        for split in per_seed}
    result["lambda_overlap_ratio_per_seed"] = {
        split: (_overlap_ratio(per_seed[split])["per_seed"] if per_seed[split] else [])
        for split in per_seed}
    ok, reason = lpips_available()
    result["lpips_note"] = None if ok else reason + " (LPIPS reported as null)"
    n_views = len(per_seed["real"][0]["metrics"]["zero_shot"]["per_view_psnr"]) if per_seed["real"] else 0
    result["real_note"] = (
        f"{len(real_examples)} context windows (context i, i+3; targets i+1, i+2; {n_views} "
        f"target views) of the scenes in {data_dir}, {image_size}x{image_size}"
        if real_examples else "no real scenes found (pass --data)")
    result["per_scene_psnr"] = {
        split: {m: per_seed[split][0]["metrics"][m]["per_scene_psnr"]
                for m in per_seed[split][0]["metrics"]} if per_seed[split] else {}
        for split in per_seed}
    result["lambda_mean"] = {split: per_seed[split][0]["lambda_mean"] if per_seed[split] else {}
                             for split in per_seed}

    def seconds_per_step(name):
        vals = [l["step_seconds"] for h in hists if h.get(name) is not None
                for l in h[name].logs if "step_seconds" in l]
        if name == "baseline" and hist_curve is not None:
            vals += [l["step_seconds"] for l in hist_curve.logs if "step_seconds" in l]
        return float(np.median(vals)) if vals else None

    d_logs = [l for h in hists for l in h["diff3r"].logs]
    train_minutes = sum(v for key, v in timings.items() if key.startswith(("curve", "train"))) / 60
    result["train_minutes"] = train_minutes
    result["training"] = {
        "model": model, "image_size": image_size, "train_scenes": scenes,
        "validation_scenes": val_scenes, "seeds": list(range(seed, seed + seeds)),
        "outer_steps": {"baseline": n_outer, "diff3r": n_outer, "diff3r_unroll": n_outer,
                        "shared_pretrain": n_pre, "chosen_by": "validation curve"
                        if curve is not None else "fixed (--train-steps)"},
        "validation_curve": None if curve is None else {
            "step": curve["step"], "val_psnr": curve["val_psnr"], "best_step": curve["best_step"],
            "stopped_at": curve["stopped_at"]},
        "final_loss": {name: _mean([_tail(h[name].losses) for h in hists if h.get(name)])
                       for name in ("baseline", "diff3r", "diff3r_unroll")},
        "seconds_per_step": {name: seconds_per_step(name)
                             for name in ("baseline", "diff3r", "diff3r_unroll")},
        "peak_memory_mb": {k: v["peak_rss_growth"] for k, v in mem.items()},
        "saved_for_backward_mb": {k: v["saved_for_backward"] for k, v in mem.items()},
        "grad_cosine": {"theta0": _mean([g["theta0"] for g in grad_cos]),
                        "lambda": _mean([g["lambda"] for g in grad_cos]),
                        "samples": len(grad_cos), "every": grad_cosine_every},
        "mean_inner_stationarity": _mean([l.get("stationarity") for l in d_logs]),
        "mean_pcg_rel_residual": _mean([l.get("pcg_rel_residual") for l in d_logs]),
        "per_step_first_seed": {  # the layer's diagnostics at every Diff3R training step
            key: [l.get(key) for l in hists[0]["diff3r"].logs]
            for key in ("stationarity", "pcg_rel_residual", "pcg_iters", "mse")} if hists else {},
        "grad_cosine_samples": grad_cos,
        "baseline_tto_lambda": best_lambda,
        "head_init": head_init,
        "init_weight": init_weight,
        "lambda_variants": variants,
        "tto": {"train_steps": cfg.steps, "eval_steps": eval_cfg.steps,
                "steps_list": steps_list, "inner_solver": cfg.inner_solver,
                "eval_inner_solver": eval_cfg.inner_solver,
                "lr_scale": lr_scale, "backward": cfg.backward, "pcg_maxiter": cfg.pcg_maxiter,
                "constant_lambda": best_lambda, "naive_lambda": NAIVE_LAMBDA,
                "mean_inner_stationarity": _mean([l.get("stationarity") for l in d_logs]),
                "note": f"implicit gradient is approximate: K {cfg.inner_solver} steps need "
                        "not reach a stationary point and PCG is capped; grad_cosine says how far"},
        "timings_s": timings,
    }
    result["seed"] = seed
    if out_dir:
        for split, title in (("real", "real (every window)"), ("embedded", "held-out embedded"),
                             ("validation", "validation scenes")):
            if split in first_eval:
                save_grid(first_eval[split], out_dir / f"grid_{split}.png")
                save_steps_plot(result["psnr_vs_steps"][split], out_dir / f"psnr_vs_steps_{split}.png",
                                f"{title}, mean over seeds")
                files += [str(out_dir / f"grid_{split}.png"), str(out_dir / f"psnr_vs_steps_{split}.png")]
        if pose_free_result:
            save_steps_plot(pose_free_result["psnr_vs_steps"], out_dir / "psnr_vs_steps_pose_free.png",
                            "pose-free, real")
            files.append(str(out_dir / "psnr_vs_steps_pose_free.png"))
        result["files"] = files
    result["total_minutes"] = (time.perf_counter() - t_start) / 60
    if out_dir:
        (out_dir / "experiment.json").write_text(json.dumps(result, indent=2))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny CI run (well under a minute)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3, help="training seeds")
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument("--scenes", type=int, default=24, help="generated embedded training scenes")
    p.add_argument("--val-scenes", type=int, default=3, help="validation embedded scenes")
    p.add_argument("--eval-embedded", type=int, default=4, help="held-out embedded test scenes")
    p.add_argument("--data", default="default",
                   help="real scenes (chunk root); default ../shared/data/re10k_demo if present; "
                        "'' to skip")
    p.add_argument("--real-scenes", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--window-stride", type=int, default=1,
                   help="keep every k-th context window (reduced protocol; default: all)")
    p.add_argument("--model", choices=("pose_given", "pose_free"), default="pose_given")
    p.add_argument("--no-pose-free", action="store_true", help="skip the pose-free model")
    p.add_argument("--pose-free-seeds", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=300, help="cap of the validation curve")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=None,
                   help="fix the outer steps instead of choosing them on validation")
    p.add_argument("--finetune-fraction", type=float, default=1 / 3)
    p.add_argument("--tto-steps", type=int, default=10, help="K of the training-time layer")
    p.add_argument("--eval-tto-steps", type=int, default=100, help="test-time TTO steps")
    p.add_argument("--steps-list", type=str, default=None, help="e.g. 0,10,30,100")
    p.add_argument("--lambda-grid", type=str, default="0.1,1,10")
    p.add_argument("--train-inner-solver", choices=("adam", "lm"), default="adam",
                   help="inner solver of the training layer (the test-time TTO stays Adam)")
    p.add_argument("--evaluate-on", choices=("test", "validation"), default="test",
                   help="'validation': evaluate on the validation scenes only, to choose settings")
    p.add_argument("--init-weight", type=float, default=1.0,
                   help="Diff3R's outer loss L(theta*) + w L(theta0), chosen on validation "
                        "(docs/benchmarks.md); 0: the plain Diff3R loss")
    p.add_argument("--head-init", type=float, default=0.1,
                   help="initial Lambda of the Diff3R uncertainty head")
    p.add_argument("--constant-lambda", type=float, default=None,
                   help="fix the baseline's TTO Lambda instead of choosing it on validation")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--lr-scale", type=float, default=4.0, help="x 3DGS inner Adam rates")
    p.add_argument("--pcg-maxiter", type=int, default=8)
    p.add_argument("--grad-cosine-every", type=int, default=10)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--out", default=None, help="directory for checkpoints, PNGs and JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    data = args.data if args.data != "" else None
    steps_list = [int(s) for s in args.steps_list.split(",")] if args.steps_list else None
    return run_experiment(
        quick=args.quick, image_size=args.image_size, seeds=args.seeds, seed=args.seed,
        scenes=args.scenes, val_scenes=args.val_scenes, eval_embedded=args.eval_embedded,
        data=data, real_scenes=args.real_scenes, max_windows=args.max_windows, out=args.out,
        model=args.model, pose_free=not args.no_pose_free, pose_free_seeds=args.pose_free_seeds,
        max_steps=args.max_steps, val_every=args.val_every, patience=args.patience,
        train_steps=args.train_steps, finetune_fraction=args.finetune_fraction,
        tto_steps=args.tto_steps, eval_tto_steps=args.eval_tto_steps, steps_list=steps_list,
        lambda_grid=tuple(float(x) for x in args.lambda_grid.split(",")),
        constant_lambda=args.constant_lambda, lr=args.lr, head_lr=args.head_lr,
        head_init=args.head_init, lr_scale=args.lr_scale, pcg_maxiter=args.pcg_maxiter,
        grad_cosine_every=args.grad_cosine_every, eval_batch=args.eval_batch,
        window_stride=args.window_stride, train_inner_solver=args.train_inner_solver,
        evaluate_on=args.evaluate_on, init_weight=args.init_weight,
        progress=not args.no_progress)
