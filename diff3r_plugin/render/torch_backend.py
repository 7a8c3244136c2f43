"""Pure-PyTorch rasterizer with per-Gaussian culling (pixel-Gaussian pair lists).

Two stages:

1. :func:`build_plan` (not differentiable): for each projected Gaussian, the pixels inside the
   exact bounding box of the ellipse where ``alpha >= 1/255`` (``d^T Sigma^-1 d <= 2 ln(255 o)``),
   minus those that fail the alpha test, sorted by pixel and then front to back. This is the
   only place with data-dependent shapes.
2. :func:`composite` (differentiable by reverse mode and forward mode): gathers the pair
   attributes, evaluates alpha, computes transmittance with a segmented cumulative sum of
   ``log(1 - alpha)`` (in float64, so that the subtraction of segment offsets loses nothing),
   applies the early stop and scatters the weighted colours to pixels.

On CPU both stages run as compiled kernels where available (:mod:`.native`: the same pairs
and the same arithmetic in one pass instead of one per elementwise op); the PyTorch code here is
the fallback and the path of forward mode and of derivatives of derivatives.

A plan depends on the Gaussians only through discrete decisions, so a plan computed at
``theta`` gives exact derivatives at ``theta``; the optimization layer reuses one plan for all
Jacobian-vector products of a linear solve.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native
from .common import ALPHA_MAX, ALPHA_MIN, T_MIN, Projection, RenderOutput


# Pixel indices and box offsets use int32 below this bound (all images in practice), int64 above.
_INT32_LIMIT = 2**31


class _RowIndexFunction(torch.autograd.Function):
    """Shared context of :class:`_Gather` and :class:`_Scatter`: only the index is saved."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        src, index, size = inputs
        ctx.save_for_backward(index)
        ctx.save_for_forward(index)
        ctx.size = size


class _Gather(_RowIndexFunction):
    """``src.index_select(0, index)`` whose derivatives keep only ``index``.

    Autograd's own ``index_select`` backward is an ``index_add`` that saves its per-pair source
    for the next derivative order, so every Hessian-vector graph through the renderer (the
    unrolled reference builds one per inner step) would hold the per-pair gradient of every
    gathered attribute. Here gather and scatter are each other's derivative, to any order, and
    the graph holds only the index.
    """

    @staticmethod
    def forward(src: Tensor, index: Tensor, size: int) -> Tensor:  # type: ignore[override]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return _Scatter.apply(grad, index, ctx.size), None, None

    @staticmethod
    def jvp(ctx, src_t: Tensor, index_t, size_t) -> Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return _Gather.forward(src_t, index, ctx.size)


class _Scatter(_RowIndexFunction):
    """``zeros(size, ...).index_add(0, index, src)``; the adjoint of :class:`_Gather`."""

    @staticmethod
    def forward(src: Tensor, index: Tensor, size: int) -> Tensor:  # type: ignore[override]
        return src.new_zeros((size,) + tuple(src.shape[1:])).index_add(0, index, src)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return _Gather.apply(grad, index, grad.shape[0]), None, None

    @staticmethod
    def jvp(ctx, src_t: Tensor, index_t, size_t) -> Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return _Scatter.forward(src_t, index, ctx.size)


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """Rows ``src[index]`` (differentiable to any order, saving only ``index``)."""
    return _Gather.apply(src, index, src.shape[0])


def scatter_rows(src: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum of the rows of ``src`` into ``size`` rows at ``index`` (the adjoint of :func:`gather_rows`)."""
    return _Scatter.apply(src, index, size)


@dataclass
class PairPlan:
    """Sorted (pixel, Gaussian) pairs; ``pixel`` indexes the flattened [b, v, h, w] image."""

    gaussian: Tensor  # [P] int64 index into the flattened (b, v, g) projection
    pixel: Tensor  # [P] int64 index into b * v * h * w
    seg_start: Tensor  # [P] int64 index of the first pair of the same pixel
    px: Tensor  # [P] pixel x coordinate (float, same dtype as the projection)
    py: Tensor  # [P] pixel y coordinate
    num_pixels: int

    @property
    def num_pairs(self) -> int:
        return int(self.gaussian.numel())


def _pair_power(mx: Tensor, my: Tensor, ca: Tensor, cb: Tensor, cc: Tensor, px: Tensor,
                py: Tensor) -> Tensor:
    """Exponent of the 2D Gaussian (mean ``mx, my``, conic ``ca, cb, cc``) at pixels ``px, py``."""
    dx = mx - px
    dy = my - py
    return -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy


def pair_transmittance(alpha: Tensor, seg_start: Tensor) -> tuple[Tensor, Tensor]:
    """Transmittance in front of every pair of a sorted plan, and the early-stop mask.

    ``T_i = prod_{j < i in the same pixel} (1 - alpha_j)`` by a segmented cumulative sum of
    ``log(1 - alpha)`` in float64. Upstream stops before the Gaussian that would take ``T``
    below 1e-4; ``T (1 - alpha)`` only decreases along a pixel's list, so the (non-differentiable)
    mask ``keep`` is a prefix of each list.
    """
    log_t = torch.log1p(-alpha).double()

    def segment_exclusive(lt: Tensor) -> Tensor:
        cs = torch.cumsum(lt, 0)
        excl = cs - lt
        # The offsets are subtracted in float64; the exponent itself is small and fits alpha's
        # dtype, so exp runs there (and autograd keeps its output in that dtype, not float64).
        return torch.exp((excl - gather_rows(excl, seg_start)).to(alpha.dtype))

    with torch.no_grad():
        keep = (segment_exclusive(log_t) * (1 - alpha) >= T_MIN).to(alpha.dtype)
    # Pairs past the early stop influence no composited pair. They are cut from the graph so
    # that rounding in the global cumulative sum (whose cross-pixel terms cancel only up to
    # ~1e-16) gives no spurious gradient to them, and none to Gaussians that only they contain:
    # Adam's normalized step would turn such noise into a full-size move.
    log_t = torch.where(keep > 0, log_t, log_t.detach())
    return segment_exclusive(log_t), keep


def build_plan(proj: Projection, image_shape: tuple[int, int], *, chunk_pairs: int = 1 << 24) -> PairPlan:
    """Enumerate the (pixel, Gaussian) pairs that contribute, sorted for compositing."""
    h, w = image_shape
    device = proj.mean2d.device
    with torch.no_grad():
        mean2d = proj.mean2d.detach()
        cov2d = proj.cov2d.detach()
        opacity = proj.opacity.detach()
        packed = torch.cat([mean2d, proj.conic.detach(), opacity[:, None]], 1)
        depth = proj.depth.detach()
        valid = proj.valid
        # Squared Mahalanobis radius where o * exp(-r2 / 2) = 1/255, with a little slack; the
        # exact alpha test below decides, the box only has to contain every such pixel.
        r2 = 2 * torch.log((opacity.clamp_min(ALPHA_MIN) * 255.0))
        r2 = r2 * (1 + 1e-5) + 1e-6
        half_x = torch.sqrt(r2 * cov2d[:, 0].clamp_min(0))
        half_y = torch.sqrt(r2 * cov2d[:, 2].clamp_min(0))
        x0 = torch.ceil(mean2d[:, 0] - half_x).clamp(0, w)
        x1 = torch.floor(mean2d[:, 0] + half_x).clamp(-1, w - 1)
        y0 = torch.ceil(mean2d[:, 1] - half_y).clamp(0, h)
        y1 = torch.floor(mean2d[:, 1] + half_y).clamp(-1, h - 1)
        nx = (x1 - x0 + 1).clamp_min(0)
        ny = (y1 - y0 + 1).clamp_min(0)
        count = torch.where(valid, nx * ny, torch.zeros_like(nx)).long()
        num_pixels = proj.batch * proj.views * h * w
        n = count.numel()
        view_of = torch.arange(n, device=device) // max(proj.gaussians, 1)

        mod = native.usable(packed)
        if mod is not None:
            # Compiled: the same pairs, depth order and stable pixel sort in one call.
            box = torch.stack([torch.where(count > 0, nx.long(), 0), ny.long(), x0.long(), y0.long(),
                               view_of], 1)
            gid, pix, seg_start, pxf, pyf = native.plan_pairs(mod, box, packed, depth, proj.gaussians,
                                                              image_shape, num_pixels)
            return PairPlan(gid, pix, seg_start, pxf, pyf, num_pixels)

        # Front to back: order the Gaussians of each view by depth; a stable sort by pixel
        # later keeps this order inside every pixel.
        order = torch.argsort(depth, stable=True)
        order = order[torch.argsort(view_of[order], stable=True)]
        order = order[count[order] > 0]
        counts = count[order]
        total = int(counts.sum())
        if total == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            fz = mean2d.new_zeros(0)
            return PairPlan(empty, empty, empty, fz, fz, num_pixels)

        # Box enumeration, pixel indices and the sort key in int32 where they fit: CPU gathers
        # and sorts of int32 are several times faster than of int64 (Gaussian indices stay int64).
        it = torch.int32 if max(num_pixels, chunk_pairs) < _INT32_LIMIT else torch.int64
        keep_gid, keep_pix = [], []
        # One gather per pair for all integer box data: [columns, x0, y0, flat view index].
        ints = torch.stack([nx.to(it), x0.to(it), y0.to(it), view_of.to(it)], 1)
        cum = torch.cumsum(counts, 0)
        num = order.numel()
        lo = 0
        # Chunk over Gaussians so the pre-filter never holds more than ~chunk_pairs pairs.
        while lo < num:
            base = int(cum[lo - 1]) if lo > 0 else 0
            hi = int(torch.searchsorted(cum, torch.tensor(base + chunk_pairs, device=device), right=True))
            hi = min(max(hi, lo + 1), num)
            c = counts[lo:hi]
            gid = torch.repeat_interleave(order[lo:hi], c)
            local = torch.arange(gid.numel(), device=device, dtype=it) - torch.repeat_interleave(
                (torch.cumsum(c, 0) - c).to(it), c)
            gi = ints.index_select(0, gid)
            px = gi[:, 1] + local % gi[:, 0]
            py = gi[:, 2] + torch.div(local, gi[:, 0], rounding_mode="floor")
            pg = packed.index_select(0, gid).unbind(1)
            power = _pair_power(*pg[:5], px.to(mean2d.dtype), py.to(mean2d.dtype))
            alpha = torch.clamp_max(pg[5] * torch.exp(power), ALPHA_MAX)
            ok = torch.nonzero((power <= 0) & (alpha >= ALPHA_MIN)).squeeze(1)
            keep_gid.append(gid.index_select(0, ok))
            keep_pix.append(((gi[:, 3] * h + py) * w + px).index_select(0, ok))
            lo = hi
        pix, perm = torch.sort(torch.cat(keep_pix), stable=True)
        gid = torch.cat(keep_gid).index_select(0, perm)
        pxf = (pix % w).to(mean2d.dtype)
        pyf = (torch.div(pix, w, rounding_mode="floor") % h).to(mean2d.dtype)
        # Index of the first pair of each pixel's run (pix is sorted).
        _, run_len = torch.unique_consecutive(pix, return_counts=True)
        run_start = torch.cumsum(run_len, 0) - run_len
        seg_start = torch.repeat_interleave(run_start, run_len)
        pix = pix.long()
    return PairPlan(gid, pix, seg_start, pxf, pyf, num_pixels)


def composite(
    proj: Projection, plan: PairPlan, image_shape: tuple[int, int], background: Tensor
) -> RenderOutput:
    """Front-to-back alpha compositing of the planned pairs (differentiable)."""
    h, w = image_shape
    b, v = proj.batch, proj.views
    dtype = proj.mean2d.dtype
    num_pix = plan.num_pixels
    if plan.num_pairs == 0:
        zeros = proj.mean2d.new_zeros(b, v, h, w) + 0 * proj.opacity.sum()
        color = background[..., None, None].expand(b, v, 3, h, w) + zeros[:, :, None]
        return RenderOutput(color=color, depth=zeros, alpha=zeros)
    # Everything a pair needs, one row per Gaussian: [mean(2), conic(3), opacity, color(3), depth].
    attrs = torch.cat([proj.mean2d, proj.conic, proj.opacity[:, None], proj.color,
                       proj.depth[:, None]], 1)

    def composite_torch(attrs: Tensor) -> Tensor:
        return _composite_rows(attrs, plan)

    if native.usable(attrs) is not None:
        acc = native.composite_pairs(attrs, plan.gaussian, plan.pixel, plan.px, plan.py, num_pix,
                                     h * w, composite_torch)
    else:
        acc = composite_torch(attrs)
    acc = acc.reshape(b, v, h, w, 5)
    alpha_img = acc[..., 4]
    color = acc[..., :3].permute(0, 1, 4, 2, 3) + (1 - alpha_img)[:, :, None] * background[..., None, None]
    return RenderOutput(color=color, depth=acc[..., 3], alpha=alpha_img)


def _composite_rows(attrs: Tensor, plan: PairPlan) -> Tensor:
    """``[num_pixels, 5]`` sums ``[w r, w g, w b, w z, w]`` of the planned pairs, in PyTorch
    (any derivative order, forward mode)."""
    # Split into columns with unbind: its backward stacks the column gradients once, where
    # column indexing would give every column a full-size zero-filled gradient.
    pg = gather_rows(attrs, plan.gaussian).unbind(1)
    power = _pair_power(*pg[:5], plan.px, plan.py)
    alpha = torch.clamp_max(pg[5] * torch.exp(power), ALPHA_MAX)
    trans, keep = pair_transmittance(alpha, plan.seg_start)
    weight = alpha * trans * keep

    # [w r, w g, w b, w z, w]; the products keep only weight and the gathered rows for the
    # backward, no per-pair copy.
    vals = torch.stack([weight * pg[6], weight * pg[7], weight * pg[8], weight * pg[9], weight], 1)
    return scatter_rows(vals, plan.pixel, plan.num_pixels)
