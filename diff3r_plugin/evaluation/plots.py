"""Pictures of the predicted uncertainty: Lambda per attribute group on the context pixels.

The built-in encoders predict one Gaussian per context pixel (view-major), so the head's
``Lambda`` for Gaussian ``i`` belongs to exactly one pixel of one context view: the map is that
assignment, with no rendering in between. Per Gaussian and group the value shown is the
geometric mean of the group's entries,

    Lambda_g(i) = exp( mean_{k in group g} log Lambda_{i,k} ),

(with the head's ``granularity="group"`` all entries of a group are equal, so it is their value),
drawn as ``log10 Lambda`` on one colour scale per group (spanning the 2nd to 98th percentile
of that group's values; the few beyond it are drawn at the ends of the scale). A large Lambda holds that attribute of
that Gaussian near the encoder's prediction during TTO; a small one lets TTO move it.
"""

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InvalidLambdaError, ShapeError
from ..gaussians.layout import GaussianLayout

__all__ = ["lambda_per_pixel", "save_lambda_map", "save_predicted_lambda_map"]

# Groups drawn (pose is one Lambda per pose view, not per pixel; it goes in the title).
MAP_GROUPS = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")


def lambda_per_pixel(lam: Float[Tensor, " n"], layout: GaussianLayout, num_views: int, height: int,
                     width: int) -> dict[str, Float[Tensor, "view height width"]]:
    """Lambda of each pixel-aligned Gaussian, per group, as ``[view, height, width]`` images.

    Raises:
        ShapeError: when the layout does not hold one Gaussian per context pixel (then there is
            no pixel to put a Gaussian's Lambda on).
        InvalidLambdaError: when an entry of Lambda is not finite or not positive.
    """
    if lam.ndim != 1 or lam.shape[0] != layout.numel:
        raise ShapeError(f"lambda_per_pixel: Lambda must be one scene's flat vector of "
                         f"{layout.numel} entries, got shape {tuple(lam.shape)}")
    if layout.num_gaussians != num_views * height * width:
        raise ShapeError(f"lambda_per_pixel: {layout.num_gaussians} Gaussians are not one per pixel "
                         f"of {num_views} context views of {height}x{width}")
    if not bool((torch.isfinite(lam) & (lam > 0)).all()):
        raise InvalidLambdaError("lambda_per_pixel: Lambda must be finite and > 0")
    groups = layout.split(lam.detach()[None])
    out = {}
    for g in MAP_GROUPS:
        if g not in groups or groups[g].numel() == 0:
            continue
        per_gaussian = groups[g][0].reshape(layout.num_gaussians, -1).log().mean(1).exp()
        out[g] = per_gaussian.reshape(num_views, height, width)
    return out


def save_lambda_map(context: Float[Tensor, "view 3 height width"],
                    maps: dict[str, Float[Tensor, "view height width"]], path: str | Path,
                    title: str = "") -> Path:
    """Rows: context views; columns: the context image, then ``log10 Lambda`` per group (colour
    scale: the group's 2nd to 98th percentile)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = context.shape[0]
    names = list(maps)
    cols = 1 + len(names)
    fig, axes = plt.subplots(views, cols, figsize=(1.7 * cols, 1.7 * views + 0.6), squeeze=False)
    for c, name in enumerate(names, start=1):
        logs = maps[name].detach().double().log10().cpu()
        # 2-98 % of the values: a few extreme pixels (image corners) would flatten the rest.
        lo, hi = (float(q) for q in torch.quantile(logs.flatten(), torch.tensor([0.02, 0.98],
                                                                              dtype=logs.dtype)))
        if hi - lo < 1e-6:  # a constant map: give the colour scale some width
            lo, hi = lo - 0.5, hi + 0.5
        for r in range(views):
            im = axes[r][c].imshow(logs[r].numpy(), vmin=lo, vmax=hi, cmap="viridis",
                                   interpolation="nearest")
            if r == 0:
                axes[r][c].set_title(f"log10 Λ {name}", fontsize=7)
        cb = fig.colorbar(im, ax=[axes[r][c] for r in range(views)], fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
        # Plain tick values: an offset label ("-1.001") would be drawn over the next panel.
        cb.ax.yaxis.get_major_formatter().set_useOffset(False)
    for r in range(views):
        axes[r][0].imshow(context[r].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                          interpolation="nearest")
        axes[r][0].set_ylabel(f"context {r}", fontsize=7)
        if r == 0:
            axes[r][0].set_title("context", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_predicted_lambda_map(encoder, head, example: dict, config, path: str | Path,
                              title: str) -> dict[str, float]:
    """Predict ``theta0`` and Lambda for ``example`` (no TTO) and write its Lambda map beside
    the context images (:func:`save_lambda_map`).

    Returns the geometric mean of Lambda per group (``pose`` included for pose-free models,
    whose pose deltas have no pixel and are given in the title instead).
    """
    from ..training import forward_model, prepare_batch

    batch = prepare_batch(encoder, example)
    with torch.no_grad():
        pred = forward_model(encoder, head, batch, tto=False, lambda_mode="predicted", config=config)
    ctx = batch["context"]["image"][0]
    maps = lambda_per_pixel(pred.lam[0], pred.theta0.layout, ctx.shape[0], *ctx.shape[-2:])
    groups = {g: float(m.log().mean().exp()) for g, m in maps.items()}
    if pred.theta0.layout.num_pose_views:
        pose = pred.theta0.layout.split(pred.lam.detach())["pose"]
        groups["pose"] = float(pose.log().mean().exp())
        title += f"; Λ pose {groups['pose']:.3g}"
    save_lambda_map(ctx, maps, path, title)
    return groups
