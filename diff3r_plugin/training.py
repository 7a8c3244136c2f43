"""Training and prediction with the Diff3R layer, for any encoder + uncertainty head.

One step (``method="diff3r"``)::

    encoder(context) -> upstream Gaussians + per-Gaussian features
    from_upstream -> theta0 (layout);  head(features) -> Lambda   (or a constant Lambda)
    theta* = Diff3RLayer(config)(theta0, Lambda, context views) (TTO on the context views)
    render targets from theta*  ->  MSE (+ LPIPS when its VGG weights are available)
    backward: IFT + PCG through the layer into the encoder and the head

``method="baseline"`` skips the layer (targets rendered from theta0: the usual zero-shot
training loss) with the same number of outer steps.

``init_weight`` ``beta`` (``method="diff3r"``): the outer loss becomes
``L(theta*) + beta L(theta0)``, the targets' MSE after the TTO plus ``beta`` times that of the
initialization itself, so that the predicted starting point stays a usable zero-shot render
(``beta = 0``: the plain Diff3R loss). The ``beta`` term's gradient reaches theta0 directly,
beside the layer's implicit gradient.

Inner solver for training: Adam with K ~ 10 steps and the implicit backward with a capped PCG
(``pcg_maxiter`` ~ 20, ``on_failure="fallback"``). Neither the inner solve (K Adam steps are
not a stationary point) nor PCG is converged then, so **the implicit gradient is approximate**;
``info`` (``stationarity``, ``pcg_rel_residual``) says how approximate, and the history
returned by :func:`train` records both per step. A capped PCG is then the expected state, not
an alarm: with ``on_failure="fallback"`` the layer does not warn per call, and :func:`train`
summarizes the run once (``TrainResult.pcg``: steps whose PCG stopped at its cap, the worst
true relative residual; one log line). With ``on_failure="warn"`` (the user asked for
convergence) the layer's per-call warning stays.

Inner learning rates (:func:`tto_config`): the 3DGS defaults (``config.lr``) are tuned for
30k steps on a fixed scene; for K = 10-20 steps on a 32-64 px scene they barely move the
Gaussians, so the default here multiplies them by ``lr_scale`` (default 4; colours and
opacities are what a short TTO can fix on two views, means stay scaled by the scene extent).
"""

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .config import Diff3RConfig, require_head
from .evaluation.metrics import lpips_available
from .gaussians.layout import GaussianParams, from_upstream
from .layer import ContextViews, Diff3RLayer, diff3r_layer
from .render.api import render_params

__all__ = ["tto_config", "prepare_batch", "forward_model", "render_targets", "training_step", "train",
           "TrainResult", "PCGSummary", "Prediction", "gradient_cosine", "layer_gradients"]

Method = Literal["baseline", "diff3r"]

log = logging.getLogger(__name__)


def tto_config(steps: int = 10, *, lr_scale: float = 4.0, pcg_maxiter: int = 20,
               constant_lambda: float = 1.0, **overrides) -> Diff3RConfig:
    """The layer settings used for training and evaluation of the tiny models (see module doc)."""
    base = Diff3RConfig()
    lr = {k: v * lr_scale for k, v in base.lr.to_dict().items()}
    cfg = {"steps": steps, "inner_solver": "adam", "backward": "implicit",
           "pcg_maxiter": pcg_maxiter, "on_failure": "fallback", "lr": lr,
           "constant_lambda": constant_lambda, "stationarity_tol": 0.0}
    cfg.update(overrides)
    return base.merge(cfg)


def prepare_batch(encoder: nn.Module, batch: dict) -> dict:
    """Pose-free encoders work in the context-0 frame with unit baseline (NoPoSplat)."""
    if getattr(encoder, "pose_free", False):
        from .models.tiny import to_relative_frame
        return to_relative_frame(batch)
    return batch


@dataclass
class Prediction:
    theta0: GaussianParams
    theta: GaussianParams            # theta* (== theta0 without TTO)
    lam: Tensor
    views: ContextViews
    info: object = None


def forward_model(encoder: nn.Module, head: nn.Module | None, batch: dict, *,
                  tto: bool, lambda_mode: Literal["predicted", "constant"] = "predicted",
                  config: Diff3RConfig | None = None) -> Prediction:
    """Encoder -> (theta0, Lambda) -> optional TTO. ``batch`` must already be prepared."""
    config = config or tto_config()
    ctx = batch["context"]
    out = encoder(ctx)
    params, _ = from_upstream(*out.gaussians(), num_pose_views=out.num_pose_views,
                              on_invalid="project")
    theta0 = params.flatten()
    if lambda_mode == "predicted" and head is not None:
        lam = head(out.features)
    elif lambda_mode == "predicted" and tto:
        require_head(lambda_mode, head, "training")
    else:
        lam = torch.full_like(theta0, config.constant_lambda)
    views = ContextViews(ctx["image"], out.context_extrinsics, ctx["intrinsics"], ctx["near"],
                         ctx["far"], sh_basis=out.sh_basis)
    if not tto or config.steps == 0:
        return Prediction(params, params, lam, views, None)
    theta, info = Diff3RLayer(config)(params, lam, views)
    return Prediction(params, theta, lam, views, info)


def render_targets(pred: Prediction, batch: dict, *, initial: bool = False) -> Tensor:
    """Target renders of theta* (``initial=True``: of theta0)."""
    tgt = batch["target"]
    h, w = tgt["image"].shape[-2:]
    return render_params(pred.theta0 if initial else pred.theta, tgt["extrinsics"], tgt["intrinsics"], tgt["near"],
                         tgt["far"], (h, w), apply_pose=False, sh_basis=pred.views.sh_basis,
                         validate=False).color


def training_step(encoder: nn.Module, head: nn.Module | None, batch: dict, *, method: Method,
                  lambda_mode: Literal["predicted", "constant"] = "predicted",
                  config: Diff3RConfig | None = None, lpips_weight: float = 0.05,
                  infos: list | None = None, init_weight: float = 0.0) -> tuple[Tensor, dict]:
    """Outer loss of one batch (not yet backpropagated) and a small log dict.

    ``init_weight`` ``beta``: add ``beta`` times the initialization's target MSE (module
    docstring).

    ``infos``, if given, receives the layer's ``Diff3RInfo`` (its backward fields are filled in
    when the loss is backpropagated).
    """
    batch = prepare_batch(encoder, batch)
    pred = forward_model(encoder, head, batch, tto=(method == "diff3r"), lambda_mode=lambda_mode,
                         config=config)
    if infos is not None and pred.info is not None:
        infos.append(pred.info)
    color = render_targets(pred, batch)
    gt = batch["target"]["image"]
    loss = F.mse_loss(color, gt)
    log = {"mse": float(loss.detach())}
    if lpips_weight > 0 and lpips_available()[0]:
        lp = _lpips_loss(gt, color)
        loss = loss + lpips_weight * lp
        log["lpips"] = float(lp.detach())
    if init_weight > 0 and method == "diff3r":
        init_mse = F.mse_loss(render_targets(pred, batch, initial=True), gt)
        loss = loss + init_weight * init_mse
        log["init_mse"] = float(init_mse.detach())
    if pred.info is not None:
        s = pred.info.summary()
        log["stationarity"] = s["stationarity"]
    return loss, log


def _lpips_loss(gt: Tensor, color: Tensor) -> Tensor:
    from .evaluation import metrics
    metrics.compute_lpips(gt[:1, 0].detach(), gt[:1, 0].detach())  # builds/caches the network
    net = metrics._lpips_models[str(color.device)]
    return net.forward(gt.flatten(0, 1), color.flatten(0, 1), normalize=True).mean()


@dataclass
class PCGSummary:
    """The implicit backward's PCG over a training run (steps through the layer only)."""

    steps: int = 0               # outer steps whose backward ran the implicit PCG
    capped: int = 0              # ... of which stopped above its tolerance (at pcg_maxiter)
    worst_rel_residual: float | None = None  # max true ||g - H v|| / ||g|| over steps and scenes
    tol: float | None = None
    maxiter: int | None = None

    def add(self, info) -> None:
        if getattr(info, "pcg_rel_residual", None) is None:
            return  # unrolled backward, or no backward ran
        self.steps += 1
        self.capped += int(not bool(info.pcg_converged.all()))
        worst = float(info.pcg_rel_residual.max())
        self.worst_rel_residual = worst if self.worst_rel_residual is None else max(self.worst_rel_residual, worst)

    def line(self) -> str:
        if self.steps == 0:
            return "implicit backward: not used"
        return (f"implicit backward: PCG stopped at its cap ({self.maxiter} iterations) in "
                f"{self.capped} of {self.steps} steps, worst relative residual "
                f"{self.worst_rel_residual:.2e} (tol {self.tol:.0e}); the training gradients "
                "are approximate, as intended for short CPU runs")


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    seconds: float = 0.0
    lambda_mean: list = field(default_factory=list)
    pcg: PCGSummary = field(default_factory=PCGSummary)


def train(encoder: nn.Module, head: nn.Module | None, batches: Iterable[dict], steps: int, *,
          method: Method = "diff3r", lambda_mode: Literal["predicted", "constant"] = "predicted",
          config: Diff3RConfig | None = None, lr: float = 1e-3, head_lr: float | None = None,
          lpips_weight: float = 0.05, progress: bool = True, grad_clip: float = 1.0,
          time_budget_s: float | None = None, grad_cosine_every: int | None = None,
          step_callback=None, init_weight: float = 0.0) -> TrainResult:
    """Train ``encoder`` (and ``head`` for ``method="diff3r"``) for ``steps`` outer steps.

    ``batches`` is cycled. Returns the loss history (and Lambda's mean per step) and, for
    ``method="diff3r"``, a once-per-run summary of the implicit backward's PCG (also logged).
    ``time_budget_s`` stops early (the step count reached is ``len(result.losses)``).
    Each step's log holds the inner stationarity and, after the backward, the implicit solve's
    PCG residual (``pcg_rel_residual``, ``pcg_iters``); every ``grad_cosine_every`` steps
    (``method="diff3r"``) it also holds :func:`gradient_cosine` on that step's batch.
    ``step_callback(step, encoder)`` runs after each optimizer step (e.g. validation); a true
    return value stops training. ``init_weight``: see :func:`training_step`.
    """
    if not (math.isfinite(init_weight) and init_weight >= 0):
        raise ValueError(f"init_weight must be a finite number >= 0, got {init_weight!r}")
    config = config or tto_config()
    groups = [{"params": list(encoder.parameters()), "lr": lr}]
    if head is not None and method == "diff3r" and lambda_mode == "predicted":
        groups.append({"params": list(head.parameters()), "lr": head_lr or lr})
    opt = torch.optim.Adam(groups)
    batches = list(batches)
    result = TrainResult()
    result.pcg.tol, result.pcg.maxiter = config.pcg_tol, config.pcg_maxiter
    t0 = time.perf_counter()
    encoder.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"train {method}", leave=False)
    for step in bar:
        t_step = time.perf_counter()
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        infos: list = []
        loss, step_log = training_step(encoder, head, batch, method=method, lambda_mode=lambda_mode,
                                       config=config, lpips_weight=lpips_weight, infos=infos,
                                       init_weight=init_weight)
        if not math.isfinite(float(loss.detach())):
            step_log["skipped"] = True
            result.logs.append(step_log)
            continue
        loss.backward()
        for info in infos:
            result.pcg.add(info)
            if info.pcg_rel_residual is not None:
                step_log["pcg_rel_residual"] = float(info.pcg_rel_residual.max())
                step_log["pcg_iters"] = int(info.pcg_iters.max())
        step_log["step_seconds"] = time.perf_counter() - t_step  # forward + backward, before extras
        if grad_cosine_every and method == "diff3r" and step % grad_cosine_every == 0:
            step_log["grad_cosine"] = gradient_cosine(encoder, head, batch, config=config,
                                                      lambda_mode=lambda_mode)
        params = [p for g in groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        result.losses.append(float(loss.detach()))
        result.logs.append(step_log)
        if head is not None and method == "diff3r" and lambda_mode == "predicted":
            with torch.no_grad():
                result.lambda_mean.append(float(head.out.bias.detach().mean()))
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        if step_callback is not None and step_callback(step + 1, encoder):
            break
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
    encoder.eval()
    result.seconds = time.perf_counter() - t0
    if result.pcg.steps:
        log.info("train %s: %s", method, result.pcg.line())
    return result


def _cosine(a: Tensor, b: Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return None
    return float((a * b).sum() / (na * nb))


def layer_gradients(theta0: Tensor, lam: Tensor, views: ContextViews, batch: dict,
                    layout, config: Diff3RConfig, backward: str) -> tuple[Tensor, Tensor, object]:
    """``(dL/dtheta0, dL/dLambda, info)`` of ``L = MSE(render_targets(layer(theta0, Lambda)))``
    with the layer's ``backward`` (``"implicit"`` or ``"unroll"``); inputs are not modified."""
    cfg = config.merge({"backward": backward})
    t0 = theta0.detach().clone().requires_grad_(True)
    lm = lam.detach().clone().requires_grad_(True)
    theta, info = diff3r_layer(t0, lm, views, layout, cfg)
    params = GaussianParams.unflatten(theta, layout)
    pred = Prediction(params, params, lm, views, info)
    loss = F.mse_loss(render_targets(pred, batch), batch["target"]["image"].to(theta.dtype))
    g_t, g_l = torch.autograd.grad(loss, (t0, lm), allow_unused=True)
    return (torch.zeros_like(t0) if g_t is None else g_t,
            torch.zeros_like(lm) if g_l is None else g_l, info)


def gradient_cosine(encoder: nn.Module, head: nn.Module | None, batch: dict, *,
                    config: Diff3RConfig | None = None,
                    lambda_mode: Literal["predicted", "constant"] = "predicted") -> dict:
    """Cosine between the implicit and the unrolled gradient of the same K-step map.

    With ``theta0`` and ``Lambda`` predicted for ``batch`` (then detached: the comparison is
    about the layer's derivative, not the encoder's), the outer loss
    ``L(theta_K(theta0, Lambda))`` (MSE of the target renders) is differentiated twice
    (:func:`layer_gradients`):

    * ``g_ift``: ``backward = "implicit"``, ``-(dF/dtheta0, dF/dLambda)^T H^{-1} dL/dtheta``
      at the K-step iterate (exact only at a stationary point and with a converged PCG);
    * ``g_unroll``: ``backward = "unroll"``, autograd through the same K inner steps: the exact
      derivative of the map the forward pass computes.

    Returns ``{"theta0": cos(g_ift, g_unroll) over dL/dtheta0, "lambda": ... over dL/dLambda,
    "pcg_rel_residual", "stationarity"}``; a cosine is ``None`` when a gradient vanishes.
    """
    config = config or tto_config()
    batch = prepare_batch(encoder, batch)
    with torch.no_grad():
        base = forward_model(encoder, head, batch, tto=False, lambda_mode=lambda_mode,
                             config=config)
    theta0 = base.theta0.flatten()
    layout = base.theta0.layout
    g_i, l_i, info = layer_gradients(theta0, base.lam, base.views, batch, layout, config, "implicit")
    g_u, l_u, _ = layer_gradients(theta0, base.lam, base.views, batch, layout, config, "unroll")
    s = info.summary()
    return {"theta0": _cosine(g_i, g_u), "lambda": _cosine(l_i, l_u),
            "pcg_rel_residual": s["pcg_rel_residual"], "stationarity": s["stationarity"]}
