"""Compiled CPU kernels of the torch backend, with the pure-PyTorch path as the fallback.

The pair-list renderer (:mod:`.torch_backend`) spends its CPU time in about forty elementwise
passes, gathers and scatters over the (pixel, Gaussian) pairs, plus the sort of the pair list.
``csrc/raster.cpp`` does the same arithmetic in one pass per stage:

* :func:`plan_pairs`: box enumeration, the alpha test and a stable counting sort by pixel (the
  plan is not differentiable, so nothing else changes);
* :class:`_Composite`: front-to-back compositing of a plan into ``[w r, w g, w b, w z, w]``
  per pixel, and its reverse-mode derivative (the usual back-to-front pass:
  ``dL/dalpha_i = T_i g_i - (sum_{k>i} w_k g_k) / (1 - alpha_i)`` with ``g_k`` the output
  gradient dotted with pair ``k``'s features).

``csrc/pair_jacobian.cpp`` holds the kernels of the layer's explicit Jacobian
(:mod:`diff3r_plugin.layer.sparse_jacobian`): the per-pair factors at a linearization point, the
products ``J p``, ``J^T u`` and ``J^T W J p`` (one fused pass) and the per-Gaussian moments of the
block preconditioner; ``csrc/projection_jacobian.cpp`` the closed-form geometry columns of the
projection's Jacobian (:mod:`diff3r_plugin.layer.projection_jacobian`) and its SH colour rows, one
pass per (view, Gaussian) instead of about two hundred elementwise PyTorch passes.

The compiled derivative is first order. Everything else falls back to the pure-PyTorch
composite, which supports any order and forward mode: a backward that builds a graph
(``create_graph=True``: Hessian-vector products, the unrolled reference) recomputes the
composite in PyTorch and differentiates that; forward-mode AD (``torch.func.jvp``, dual
tensors) and tensors off the CPU never enter the kernels.

The extension is built on first use with the C++ compiler PyTorch finds (``torch.utils.
cpp_extension.load``, cached under ``TORCH_EXTENSIONS_DIR``); ``diff3r build-native`` builds it
ahead of time. Without a compiler, or with ``DIFF3R_NATIVE=0``, the pure-PyTorch path runs and
:func:`native_status` says why.
"""

import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("raster.cpp", "pair_jacobian.cpp",
                                                                 "projection_jacobian.cpp")]
_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _build(load):
    """Build with OpenMP (the kernels' ``at::parallel_for`` runs on torch's intra-op threads:
    ``torch.set_num_threads``, ``OMP_NUM_THREADS``); where the compiler has no OpenMP, build the
    same kernels single-threaded. Their results do not depend on the thread count
    (``csrc/parallel.h``)."""
    common = ["-O3", "-ffp-contract=off"]
    try:
        return load(name="diff3r_raster", sources=[str(s) for s in _SOURCES],
                    extra_cflags=common + ["-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception:
        return load(name="diff3r_raster_serial", sources=[str(s) for s in _SOURCES],
                    extra_cflags=common, verbose=False)


def _load():
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("DIFF3R_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _error = "disabled by DIFF3R_NATIVE=0"
        else:
            try:
                from torch.utils.cpp_extension import load

                _module = _build(load)
            except Exception as exc:  # no compiler, no headers, a failed build: fall back
                _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(f"diff3r: the compiled CPU renderer kernels are unavailable ({_error}); "
                              "using the pure-PyTorch renderer (slower, same results)",
                              RuntimeWarning, stacklevel=3)
        _tried = True
    return _module


def native_status() -> dict:
    """``{"available": bool, "reason": str | None}`` (builds the extension if not yet tried)."""
    mod = _load()
    return {"available": mod is not None, "reason": _error}


def _forward_ad_active(tensors) -> bool:
    """True inside torch.func transforms, torch.compile tracing, or with dual tensors."""
    transforms = getattr(torch._C, "_are_functorch_transforms_active", None)
    if transforms is not None and transforms():
        return True
    if transforms is None and any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    import torch.autograd.forward_ad as fwad

    if getattr(fwad, "_current_level", -1) < 0:
        return False
    return any(fwad.unpack_dual(t).tangent is not None for t in tensors)


def usable(*tensors: Tensor):
    """The compiled module if these tensors may go through it, else None."""
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors):
        return None
    if _forward_ad_active(tensors):
        return None
    return _load()


def usable_values(*tensors: Tensor):
    """The compiled module for kernels that compute values only, else None.

    Where a result must stay on an autograd graph (the unrolled LM's differentiable
    linearization), in forward mode, off the CPU, or for tensors of mixed dtypes, the caller's
    PyTorch path runs.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if len({t.dtype for t in tensors}) > 1:
        return None
    return usable(*tensors)


def plan_pairs(mod, box: Tensor, packed: Tensor, depth: Tensor, per_view: int,
               image_shape: tuple[int, int], num_pixels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``gaussian, pixel, seg_start, px, py`` of a plan (see :func:`.torch_backend.build_plan`).

    ``box[g] = (nx, ny, x0, y0, view)`` is Gaussian ``g``'s pixel box (``nx ny = 0``: not
    planned), ``packed[g] = (mx, my, a, b, c, o)`` its screen-space mean, conic and opacity,
    ``depth[g]`` its camera-space z; the Gaussians of a view are the ``per_view`` consecutive
    rows. Pairs are sorted by pixel, front to back inside a pixel (ties by index).
    """
    h, w = image_shape
    return tuple(mod.plan(box.contiguous(), packed.contiguous(), depth.contiguous(), per_view, h, w,
                          num_pixels))


class _Composite(torch.autograd.Function):
    """Compiled composite of per-Gaussian attribute rows ``[N, 10]`` into ``[num_pixels, 5]``."""

    @staticmethod
    def forward(ctx, attrs: Tensor, gid: Tensor, pixel: Tensor, px: Tensor, py: Tensor,  # type: ignore[override]
                num_pixels: int, pixels_per_view: int, fallback) -> Tensor:
        mod = _load()
        ctx.save_for_backward(attrs, gid, pixel, px, py)
        ctx.fallback = fallback
        ctx.pixels_per_view = pixels_per_view
        return mod.composite_forward(attrs.detach().contiguous(), gid, pixel, px, py, num_pixels)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        attrs, gid, pixel, px, py = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A graph of the derivative is wanted (create_graph=True): differentiate the
            # pure-PyTorch composite, which supports any order.
            with torch.enable_grad():
                acc = ctx.fallback(attrs)
                (g,) = torch.autograd.grad(acc, attrs, grad, create_graph=True)
            return g, None, None, None, None, None, None, None
        g = _load().composite_backward(attrs.detach().contiguous(), gid, pixel, px, py,
                                       grad.contiguous(), ctx.pixels_per_view)
        return g, None, None, None, None, None, None, None


def composite_pairs(attrs: Tensor, gid: Tensor, pixel: Tensor, px: Tensor, py: Tensor,
                    num_pixels: int, pixels_per_view: int, fallback) -> Tensor:
    """``[num_pixels, 5]`` accumulated ``[w r, w g, w b, w z, w]``; ``fallback(attrs)`` is the
    same map in PyTorch (used for derivatives of derivatives). ``pixels_per_view`` (``h w``)
    lets the derivative run view by view in parallel (a row's pairs lie in its own view)."""
    return _Composite.apply(attrs, gid, pixel, px, py, num_pixels, pixels_per_view, fallback)
