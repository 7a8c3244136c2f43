"""Preconditioners of the layer's PCG solves: ``block_jacobi``, ``jacobi`` and ``none``.

Every system the layer solves has the form ``A + diag(c)`` with ``A = J^T W J`` (or the full
data Hessian) and a positive diagonal ``c`` (``Lambda``, plus ``mu D`` in a damped LM step).

* ``jacobi``: ``M = diag(A) + c``, applied as ``z = r / M``.
* ``block_jacobi``: ``M`` holds exact per-Gaussian blocks ``A_ii + diag(c_i)`` from the explicit
  Jacobian, factored once by Cholesky: one over the geometry, opacity and DC colour, one per
  colour channel of the higher SH coefficients (``SparseJacobian.block_partition``); the
  entries outside the blocks (the pose group) use ``diag(A) + c``.
* ``none``: plain CG.

A preconditioner is what :func:`.pcg.pcg` accepts: a ``[b, n]`` diagonal, a callable
``(r, idx) -> M^-1 r`` for the scenes ``idx``, or None.
"""

from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

Preconditioner = Float[Tensor, "batch param"] | Callable[[Tensor, Tensor], Tensor] | None


def _spd_inverse(blocks: Tensor, shift: Tensor | None = None) -> Tensor:
    """Inverses of SPD blocks ``[..., k, k]`` (``+ diag(shift)``, ``shift [..., k]``, when given)
    through their Cholesky factors; a block that is not numerically positive definite gets the
    inverse of its diagonal (clamped positive).

    On the CPU a compiled kernel factors and inverts each block in one pass, the shift added to
    the diagonal as it is read (LAPACK's batched calls cost about 2 us per 15 x 15 block in call
    overhead alone); elsewhere, or without it, ``torch.linalg``.
    """
    from ..render import native

    mod = native.usable(blocks, *(() if shift is None else (shift,)))
    if mod is not None and blocks.numel() > 0:
        k = blocks.shape[-1]
        inv, _ = mod.pj_spd_inverse(blocks.reshape(-1, k, k).contiguous(),
                                    None if shift is None else shift.reshape(-1, k).contiguous())
        return inv.reshape(blocks.shape)
    if shift is not None:
        blocks = blocks + torch.diag_embed(shift)
    chol, info = torch.linalg.cholesky_ex(blocks)
    bad = info != 0
    # One host read per build (not per PCG iteration) to skip the fallback when all blocks factor.
    if bool(bad.any()):
        fallback = torch.diag_embed(torch.diagonal(blocks, dim1=-2, dim2=-1).clamp_min(
            torch.finfo(blocks.dtype).tiny).sqrt())
        chol = torch.where(bad[..., None, None], fallback, chol)
    return torch.cholesky_inverse(chol)


def block_preconditioner(parts: list[tuple[Tensor, ...]],
                         diag: Float[Tensor, "batch param"]) -> Callable[[Tensor, Tensor], Tensor]:
    """``M^-1`` of a block-Jacobi preconditioner as a callable ``(r, idx) -> z`` for PCG.

    Args:
        parts: ``(blocks, slots)`` or ``(blocks, slots, shift)`` (the block size may differ
            between parts): per-Gaussian blocks ``[b, G, k, k]`` of the system matrix (SPD, or
            SPD once ``diag(shift)``, ``shift [b, G, k]``, is added), and the flat indices
            ``[G, k]`` of each block's entries; the parts' slots do not overlap.
        diag: the system's full diagonal; entries outside every block (the pose group) use it
            as a plain Jacobi preconditioner.

    The inverse blocks are kept in the blocks' dtype: a block is at most a few dozen entries
    and its inverse is only a preconditioner, so float32 rounding changes the PCG iteration
    count, never the solution it converges to. A block whose factorization fails (not
    numerically positive definite) falls back to its diagonal.
    """
    diag = diag.detach()
    factors = []
    for blocks, slots, *shift in parts:
        # The inverse blocks, formed once: applying them is a broadcast product, several times
        # cheaper on a CPU than a triangular solve per block at every PCG iteration.
        shift = shift[0].detach() if shift else None
        factors.append((_spd_inverse(blocks.detach(), shift).contiguous(), slots.long().contiguous(),
                        slots.reshape(-1)))
    whole = diag.shape[0]
    from ..render import native

    def apply(r: Tensor, idx: Tensor) -> Tensor:
        z = r / (diag if idx.numel() == whole else diag.index_select(0, idx))
        mod = native.usable_values(r, *(inv for inv, _, _ in factors)) if idx.numel() == whole else None
        if mod is not None:
            # Compiled: each block's small matrix-vector product in place of a broadcast
            # product and a sum over a [b, G, k, k] temporary.
            r = r.contiguous()
            for inv, slots, _ in factors:
                z = mod.pj_block_apply(inv.reshape(-1, *inv.shape[-2:]).contiguous(), r, slots, z.contiguous())
            return z
        for inv, slots, flat in factors:
            rb = r[:, slots].to(inv.dtype)
            m = inv if idx.numel() == whole else inv.index_select(0, idx)
            zb = (m * rb[..., None, :]).sum(-1).to(r.dtype)
            z = z.index_copy(1, flat, zb.reshape(r.shape[0], -1))
        return z

    return apply


def build_preconditioner(kind: str, diagonal: Callable[[], Tensor],
                         blocks: Callable[[], list[tuple[Tensor, Tensor]]] | None = None) -> Preconditioner:
    """The preconditioner ``kind`` of a system, from its parts (computed only when needed).

    Args:
        kind: ``"block_jacobi"``, ``"jacobi"`` or ``"none"``.
        diagonal: returns the system's full diagonal ``[b, n]``.
        blocks: returns the system's per-Gaussian blocks and their slots, one pair per part of
            the block partition (``block_jacobi``).
    """
    if kind == "none":
        return None
    if kind == "jacobi":
        return diagonal()
    if kind == "block_jacobi":
        if blocks is None:
            raise ValueError("block_jacobi needs the per-Gaussian blocks (the sparse products)")
        return block_preconditioner(blocks(), diagonal())
    raise ValueError(f"unknown preconditioner {kind!r}")
