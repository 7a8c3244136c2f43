"""Run an upstream repository (MVSplat, pixelSplat, DepthSplat, NoPoSplat) on a machine without CUDA.

``diff3r cpu-run -m MODULE [ARGS...]`` (:func:`cpu_run`) runs ``python -m MODULE ARGS`` in this
process after making what the upstream code needs for CUDA available on the CPU
(UPSTREAM.md section 7):

* **import stubs** (:func:`install_import_stubs`): ``diff_gaussian_rasterization`` (the CUDA
  extension every ``src.model.decoder`` imports), ``moviepy.editor`` (videos only) and
  ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9) are installed *before* the module is
  imported;
* **CPU accelerator**: ``Trainer(accelerator="gpu")``, hard-coded in every upstream
  ``src/main.py``, becomes ``accelerator="cpu"`` (Lightning's ``Trainer.__init__`` is wrapped
  for the duration of the run);
* **torch decoder**: each entry of the upstream ``DECODERS`` registry is replaced by a class
  built by :func:`torch_decoder_class`, a genuine subclass of upstream's ``Decoder`` (upstream's
  beartype import hook checks ``ModelWrapper.__init__(decoder: Decoder)``) that renders with
  the plugin's pure-PyTorch rasterizer (:class:`TorchDecoder`);
* **offline torch hub** (:func:`~diff3r_plugin.integration.offline_hub.offline_torch_hub`):
  DINO/DINOv2 backbones are built from local checkouts with random weights.

Nothing here is needed on a CUDA machine: there the upstream command runs unchanged.
"""

import importlib
import importlib.util
import inspect
import logging
import os
import runpy
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import IntegrationError

__all__ = ["CPUCallback", "DecoderOutput", "TorchDecoder", "cpu_run", "install_import_stubs",
           "install_rasterizer_stub", "main", "patch_decoders", "torch_decoder_class"]

log = logging.getLogger(__name__)

#: This module's import name (also when it runs as ``__main__`` in a relaunched DDP rank).
MODULE = "diff3r_plugin.integration.cpu_run"


# --------------------------------------------------------------------------------------------
# CPU decoder


@dataclass
class DecoderOutput:
    """Same fields as upstream ``src.model.decoder.decoder.DecoderOutput``."""

    color: Tensor
    depth: Optional[Tensor]


class TorchDecoder(nn.Module):
    """Drop-in CPU/GPU replacement of the upstream ``DecoderSplattingCUDA``.

    Args:
        background_color: ``[3]`` background (upstream: ``dataset.background_color``).
        sh_basis: ``"e3nn"`` (MVSplat/pixelSplat/DepthSplat) or ``"3dgs"`` (NoPoSplat).
        output_cls: Class to return (pass the upstream ``DecoderOutput`` when code downstream
            is type-checked against it); default :class:`DecoderOutput`.
        backend: Renderer backend (``"torch"``; ``"gsplat"`` on CUDA).
        cfg: Stored as ``self.cfg`` (upstream code reads e.g. ``decoder.cfg.make_scale_invariant``).
        always_depth: Return a depth map even when ``depth_mode`` is None (NoPoSplat's decoder
            always does, and its pose alignment reads it).
    """

    def __init__(self, background_color: Sequence[float] = (0.0, 0.0, 0.0), sh_basis: str = "e3nn",
                 output_cls: Any = None, backend: str = "torch", cfg: Any = None,
                 always_depth: bool = False) -> None:
        super().__init__()
        self.register_buffer("background_color", torch.tensor(list(background_color), dtype=torch.float32),
                             persistent=False)
        self.sh_basis = sh_basis
        self.output_cls = output_cls or DecoderOutput
        self.backend = backend
        self.cfg = cfg
        self.always_depth = always_depth

    def forward(self, gaussians: Any, extrinsics: Tensor, intrinsics: Tensor, near: Tensor, far: Tensor,
                image_shape: tuple, depth_mode: Optional[str] = None,
                cam_rot_delta: Optional[Tensor] = None, cam_trans_delta: Optional[Tensor] = None) -> Any:
        from diff3r_plugin.geometry.cameras import apply_pose_delta
        from diff3r_plugin.render.api import render

        if cam_rot_delta is not None or cam_trans_delta is not None:
            rot = cam_rot_delta if cam_rot_delta is not None else torch.zeros_like(cam_trans_delta)
            trans = cam_trans_delta if cam_trans_delta is not None else torch.zeros_like(cam_rot_delta)
            extrinsics = apply_pose_delta(extrinsics, torch.cat([trans, rot], -1))
        out = render(gaussians.means, gaussians.covariances, gaussians.harmonics, gaussians.opacities,
                     extrinsics, intrinsics, near, far, tuple(image_shape),
                     self.background_color.to(gaussians.means), sh_basis=self.sh_basis,  # type: ignore[arg-type]
                     backend=self.backend)  # type: ignore[arg-type]
        depth = None
        if depth_mode is not None or cam_rot_delta is not None or self.always_depth:
            depth = _depth(out.depth, near, far, depth_mode or "depth")
        return self.output_cls(out.color, depth)


def _depth(depth: Tensor, near: Tensor, far: Tensor, mode: str) -> Tensor:
    if mode == "depth":
        return depth
    near_, far_ = near[..., None, None], far[..., None, None]
    d = torch.where(depth > 0, depth, far_.expand_as(depth))
    if mode == "log":
        return d.clamp_min(1e-6).log()
    disp = 1.0 / d.clamp_min(1e-6)
    if mode == "disparity":
        return disp
    if mode == "relative_disparity":
        lo, hi = 1.0 / far_, 1.0 / near_
        return (disp - lo) / (hi - lo)
    raise ValueError(f"unknown depth_mode {mode!r}")


# --------------------------------------------------------------------------------------------
# Importing / composing upstream code on CPU


def install_rasterizer_stub(name: str = "diff_gaussian_rasterization") -> types.ModuleType:
    """Stub the CUDA rasterizer module so the upstream packages can be imported on CPU.

    Constructing the stub's ``GaussianRasterizer`` raises; use :class:`TorchDecoder` instead of
    the upstream decoder. A real installed module is left alone.
    """
    if name in sys.modules:
        return sys.modules[name]
    try:
        __import__(name)
        return sys.modules[name]
    except Exception:
        pass
    mod = types.ModuleType(name)

    class GaussianRasterizationSettings:  # noqa: D401 - stub
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.kwargs = kwargs

    class GaussianRasterizer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{name} is a CPU stub installed by diff3r_plugin; use "
                               "diff3r_plugin.integration.cpu_run.TorchDecoder (diff3r cpu-run) instead")

    mod.GaussianRasterizationSettings = GaussianRasterizationSettings  # type: ignore[attr-defined]
    mod.GaussianRasterizer = GaussianRasterizer  # type: ignore[attr-defined]
    mod.__diff3r_stub__ = True  # type: ignore[attr-defined]
    sys.modules[name] = mod
    return mod


def _install_matplotlib_get_cmap() -> bool:
    """Re-add ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9).

    DepthSplat imports it at import time (``src/visualization/vis_depth.py``, reached from
    ``src.config`` via ``model_wrapper``); MVSplat/pixelSplat call ``cm.get_cmap`` at run time.
    Delegates to ``matplotlib.colormaps``. Returns whether it was added.
    """
    try:
        import matplotlib
        import matplotlib.cm as cm
    except Exception:
        return False
    if hasattr(cm, "get_cmap"):
        return False

    def get_cmap(name: Any = None, lut: Optional[int] = None) -> Any:
        cmap = matplotlib.colormaps.get_cmap(name)
        return cmap if lut is None else cmap.resampled(lut)

    get_cmap.__diff3r_stub__ = True  # type: ignore[attr-defined]
    cm.get_cmap = get_cmap  # type: ignore[attr-defined]
    return True


def install_import_stubs(names: Sequence[str] = ("diff_gaussian_rasterization", "moviepy",
                                                 "moviepy.editor", "matplotlib.cm.get_cmap")) -> list:
    """Stub modules the upstream packages import at import time but the CPU path never uses.

    ``diff_gaussian_rasterization`` (CUDA extension) gets :func:`install_rasterizer_stub`;
    ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9, imported by DepthSplat) is re-added
    as a thin alias of ``matplotlib.colormaps.get_cmap``; other names (e.g. ``moviepy.editor``,
    used only to write videos; removed in moviepy 2) become modules whose attributes raise on
    use. Returns the names that were stubbed.
    """
    stubbed = []
    for name in names:
        if name == "matplotlib.cm.get_cmap":
            if _install_matplotlib_get_cmap():
                stubbed.append(name)
            continue
        if name == "diff_gaussian_rasterization":
            if getattr(install_rasterizer_stub(name), "__diff3r_stub__", False):
                stubbed.append(name)
            continue
        if name in sys.modules:
            continue
        try:
            __import__(name)
            continue
        except Exception:
            pass
        mod = types.ModuleType(name)

        def _missing(attr: str, _name: str = name) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            raise RuntimeError(f"{_name}.{attr} is unavailable: {_name} is a stub installed by diff3r_plugin")

        mod.__getattr__ = _missing  # type: ignore[attr-defined]
        mod.__path__ = []  # type: ignore[attr-defined]  # lets "import a.b" find stubbed children
        mod.__diff3r_stub__ = True  # type: ignore[attr-defined]
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
        stubbed.append(name)
    return stubbed


# --------------------------------------------------------------------------------------------
# The upstream decoder registry


def torch_decoder_class(upstream_cls: type, base: type) -> type:
    """A subclass of the upstream ``Decoder`` ``base`` that renders like ``upstream_cls`` on the CPU.

    The rasterizer conventions follow the upstream class: its ``forward`` takes NoPoSplat's
    ``cam_rot_delta`` / ``cam_trans_delta`` exactly when it uses the w-pose rasterizer (stock
    3DGS SH basis, depth always returned); otherwise the e3nn-remapped basis of
    pixelSplat / MVSplat / DepthSplat. The background is ``cfg.background_color`` (NoPoSplat)
    or ``dataset_cfg.background_color`` (the others). The returned class takes the upstream
    constructor arguments (``cfg[, dataset_cfg]``) and returns upstream's ``DecoderOutput``.
    It holds no persistent state, so checkpoints are the same as with the CUDA decoder.
    """
    pose_rasterizer = "cam_rot_delta" in inspect.signature(upstream_cls.forward).parameters
    output_cls = getattr(sys.modules.get(base.__module__), "DecoderOutput", None)

    def __init__(self: Any, cfg: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, cfg, *args, **kwargs)
        background = getattr(cfg, "background_color", None)
        if background is None:
            dataset_cfg = args[0] if args else kwargs.get("dataset_cfg")
            background = getattr(dataset_cfg, "background_color", None)
        self.make_scale_invariant = getattr(cfg, "make_scale_invariant", False)
        # A child module without persistent buffers: state_dict keys stay those of upstream.
        self.torch_decoder = TorchDecoder(background if background is not None else (0.0, 0.0, 0.0),
                                          "3dgs" if pose_rasterizer else "e3nn", output_cls=output_cls,
                                          cfg=cfg, always_depth=pose_rasterizer)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.torch_decoder(*args, **kwargs)

    name = f"Torch{upstream_cls.__name__}"
    return type(name, (base,), {"__init__": __init__, "forward": forward, "__module__": MODULE,
                                "__doc__": f"{upstream_cls.__name__} rendered by diff3r's torch rasterizer.",
                                "diff3r_replaces": upstream_cls})


def patch_decoders(package: str = "src") -> List[str]:
    """Replace every class in ``<package>.model.decoder.DECODERS`` by its :func:`torch_decoder_class`.

    Idempotent; does nothing when the module is not imported (yet). Returns the replaced names.
    """
    module = sys.modules.get(f"{package}.model.decoder")
    registry = getattr(module, "DECODERS", None)
    base = getattr(module, "Decoder", None)
    if not isinstance(registry, dict) or not isinstance(base, type):
        return []
    replaced = []
    for name, cls in list(registry.items()):
        if isinstance(cls, type) and not hasattr(cls, "diff3r_replaces"):
            registry[name] = torch_decoder_class(cls, base)
            replaced.append(name)
    if replaced:
        log.info("diff3r cpu-run: decoders %s render with the plugin's torch rasterizer", replaced)
    return replaced


class CPUCallback:
    """Hydra callback added by :func:`cpu_run`: at job start the upstream modules are imported."""

    def __init__(self, package: str = "src") -> None:
        self.package = package

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        patch_decoders(self.package)

    def __getattr__(self, name: str) -> Callable[..., None]:
        # The other Hydra callback hooks are no-ops (Hydra calls them by name).
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


# --------------------------------------------------------------------------------------------
# Lightning's accelerator


def _trainer_classes() -> List[type]:
    classes = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            classes.append(importlib.import_module(name).Trainer)
        except Exception:  # either distribution may be absent
            continue
    return classes


class _CPUTrainerPatch:
    """Wraps ``Trainer.__init__`` so that ``accelerator`` becomes ``"cpu"``; undone on exit."""

    def __init__(self, package: str, relaunch: Optional[List[str]],
                 trainer_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.package = package
        self.relaunch = relaunch
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.saved: Dict[type, Any] = {}

    def __enter__(self) -> "_CPUTrainerPatch":
        for cls in _trainer_classes():
            if cls in self.saved:
                continue
            original = cls.__dict__["__init__"]
            patch = self

            def __init__(trainer: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
                requested = kwargs.get("accelerator", "auto")
                if requested not in ("cpu",):
                    log.info("diff3r cpu-run: Trainer(accelerator=%r) -> 'cpu'", requested)
                kwargs["accelerator"] = "cpu"
                for key, value in patch.trainer_kwargs.items():
                    log.info("diff3r cpu-run: Trainer(%s=%r) (was %r)", key, value, kwargs.get(key, "unset"))
                    kwargs[key] = value
                patch_decoders(patch.package)
                patch._prepare_relaunch()
                _original(trainer, *args, **kwargs)

            cls.__init__ = __init__
            self.saved[cls] = original
        return self

    def _prepare_relaunch(self) -> None:
        """Make Lightning's DDP launcher start the other ranks through ``cpu-run`` as well.

        Its subprocess command is ``python -m <__main__.__spec__.name> <sys.argv[1:]>``; pointing
        both at this module keeps the stubs and the CPU accelerator in every rank.
        """
        if self.relaunch is None:
            return
        main = sys.modules.get("__main__")
        spec = importlib.util.find_spec(MODULE)
        if main is not None and spec is not None:
            main.__spec__ = spec
            sys.argv[1:] = self.relaunch

    def __exit__(self, *exc: Any) -> None:
        for cls, original in self.saved.items():
            cls.__init__ = original
        self.saved.clear()


# --------------------------------------------------------------------------------------------
# The launcher


def _find_module(module: str) -> Any:
    """The import spec of ``module`` (searched from the current directory first, like ``python -m``)."""
    if not module or module.startswith(".") or any(not part.isidentifier() for part in module.split(".")):
        raise IntegrationError(f"diff3r cpu-run: {module!r} is not a module name (expected e.g. src.main)")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        spec, reason = None, f"{type(exc).__name__}: {exc}"
    else:
        reason = "not found"
    if spec is None or spec.loader is None:
        raise IntegrationError(
            f"diff3r cpu-run: no module named {module!r} ({reason}; searched {sys.path[0]!r} and the "
            "installed packages). Run it from the upstream repository root, e.g. "
            "`cd mvsplat && diff3r cpu-run -m src.main +experiment=re10k ...`")
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        main_spec = importlib.util.find_spec(module + ".__main__")
        if main_spec is None:
            raise IntegrationError(f"diff3r cpu-run: {module!r} is a package without __main__")
    return spec


def cpu_run(module: str, args: Sequence[str] = (), trainer_kwargs: Optional[Dict[str, Any]] = None) -> int:
    """Run ``python -m module *args`` in this process with the CPU shims above; the exit status.

    Args:
        module: The module to run (``src.main``).
        args: Its command line (Hydra overrides).
        trainer_kwargs: ``Trainer`` arguments to set that the upstream config does not expose
            (e.g. ``num_sanity_val_steps=0`` for NoPoSplat, whose sanity validation computes
            LPIPS, whose VGG weights cannot be downloaded offline).

    Raises:
        IntegrationError: If ``module`` cannot be found.
    """
    from .offline_hub import offline_torch_hub

    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)  # what `python -m` does
    spec = _find_module(module)
    install_import_stubs()
    package = module.split(".")[0]
    args = list(args)
    callback = f"+hydra.callbacks.diff3r_cpu_run._target_={MODULE}.CPUCallback"
    if not any(a.startswith("+hydra.callbacks.diff3r_cpu_run") for a in args):
        # First: Hydra's overrides are one run of positionals, which flags such as --cfg end.
        args.insert(0, callback)
    argv = list(sys.argv)
    sys.argv = [spec.origin or module, *args]
    try:
        relaunch = [a for k, v in (trainer_kwargs or {}).items() for a in ("--trainer", f"{k}={v}")]
        with _CPUTrainerPatch(package, [*relaunch, "-m", module, *args], trainer_kwargs), offline_torch_hub():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = argv
    return 0


USAGE = "usage: diff3r cpu-run [--trainer KEY=VALUE ...] -m MODULE [ARGS...]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m diff3r_plugin.integration.cpu_run [--trainer K=V ...] -m MODULE [ARGS...]``.

    The same as ``diff3r cpu-run``. ``--trainer KEY=VALUE`` (before ``-m``; the value is read
    as YAML) sets a Lightning ``Trainer`` argument the upstream config does not expose.
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_kwargs: Dict[str, Any] = {}
    while len(argv) >= 2 and argv[0] == "--trainer":
        key, sep, value = argv[1].partition("=")
        if not sep or not key.isidentifier():
            print(f"diff3r cpu-run: --trainer needs KEY=VALUE, got {argv[1]!r}\n{USAGE}", file=sys.stderr)
            return 2
        trainer_kwargs[key] = yaml.safe_load(value)
        argv = argv[2:]
    if len(argv) < 2 or argv[0] != "-m":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return cpu_run(argv[1], argv[2:], trainer_kwargs)
    except IntegrationError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
