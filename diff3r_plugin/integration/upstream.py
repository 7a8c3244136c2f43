"""Helpers to run Diff3R inside an upstream repo (MVSplat, pixelSplat, DepthSplat, NoPoSplat).

* :func:`wrap_from_hydra` reads the ``diff3r`` node of the composed upstream config (created by
  ``- optimizer: diff3r`` in the defaults list or ``+optimizer=diff3r``), picks the adapter
  (``diff3r.adapter`` or auto-detection from the encoder class name) and wraps the encoder
  instance in place.
* :class:`TorchDecoder` replaces the CUDA-only ``DecoderSplattingCUDA`` with the plugin's
  pure-PyTorch renderer (same ``forward`` signature; NoPoSplat's ``cam_rot_delta`` /
  ``cam_trans_delta`` are honoured), so the upstream pipeline runs on CPU.
* :func:`install_rasterizer_stub` puts a stub ``diff_gaussian_rasterization`` module in
  ``sys.modules`` so the upstream packages import without the CUDA extension (UPSTREAM.md §7).
* :func:`offline_torch_hub` makes ``torch.hub.load("<owner>/<repo>", ...)`` (DepthSplat's
  DINOv2, pixelSplat's DINO backbone) build from a local checkout with random weights, so nothing
  is downloaded.
* :func:`compose_upstream_config` composes an upstream Hydra config with the plugin's config
  group on the search path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import Diff3RConfig, load_from_hydra

__all__ = ["DecoderOutput", "OfflineHubError", "TorchDecoder", "UPSTREAM_SPECS", "compose_upstream_config",
           "install_import_stubs", "install_rasterizer_stub", "local_hub_checkout", "offline_torch_hub",
           "resolve_adapter", "wrap_from_hydra"]

log = logging.getLogger(__name__)


def resolve_adapter(encoder: nn.Module, name: str = "auto", **adapter_kwargs: Any):
    """An adapter instance: by registered ``name``, or detected from the encoder class name."""
    from diff3r_plugin.adapters import detect_adapter, get_adapter

    key = detect_adapter(encoder) if name in (None, "auto") else name
    factory = get_adapter(key)  # UnknownAdapterError lists the known names
    return factory(**adapter_kwargs)


def _background_from_cfg(cfg: Any) -> Optional[Sequence[float]]:
    """``dataset.background_color`` (MVSplat/pixelSplat/DepthSplat) or the decoder's (NoPoSplat)."""
    def get(node: Any, *path: str) -> Any:
        for key in path:
            if node is None:
                return None
            node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
        return node

    for path in (("model", "decoder", "background_color"), ("dataset", "background_color")):
        value = get(cfg, *path)
        if value is not None and not isinstance(value, (str, bytes)):
            try:
                return [float(x) for x in value]
            except TypeError:
                continue
    return None


def wrap_from_hydra(cfg: Any, encoder: nn.Module, adapter: str = "auto",
                    head: Optional[nn.Module] = None, **adapter_kwargs: Any) -> nn.Module:
    """Wrap ``encoder`` according to the ``diff3r`` node of a composed upstream config.

    Args:
        cfg: The composed root config (``DictConfig`` or dict).
        encoder: The upstream encoder instance (``get_encoder(cfg.model.encoder)[0]``).
        adapter: Adapter name, or ``"auto"``: then ``diff3r.adapter`` decides, and if that is
            ``"auto"`` too the adapter is detected from the encoder class name.
        head: Optional uncertainty head (default: the adapter builds one when
            ``diff3r.lambda_mode == "predicted"``).
        **adapter_kwargs: Passed to the adapter constructor (e.g. ``pose_source="batch"``).

    Returns:
        The same encoder instance, wrapped; unchanged if the config has no ``diff3r`` node
        (the plugin was not selected) or ``diff3r.enabled`` is false.
    """
    config = load_from_hydra(cfg)
    if config is None:
        log.info("diff3r: no 'diff3r' node in the config (add '- optimizer: diff3r' to the defaults "
                 "list or pass +optimizer=diff3r); the encoder is left unwrapped")
        return encoder
    if not config.enabled:
        log.info("diff3r: diff3r.enabled=false; the encoder is left unwrapped")
        return encoder
    name = adapter if adapter not in (None, "auto") else config.adapter
    if "background" not in adapter_kwargs:
        bg = _background_from_cfg(cfg)
        if bg is not None:
            adapter_kwargs["background"] = bg
    instance = resolve_adapter(encoder, name, **adapter_kwargs)
    return instance.wrap_encoder(encoder, config, head=head)


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
    """

    def __init__(self, background_color: Sequence[float] = (0.0, 0.0, 0.0), sh_basis: str = "e3nn",
                 output_cls: Any = None, backend: str = "torch", cfg: Any = None) -> None:
        super().__init__()
        self.register_buffer("background_color", torch.tensor(list(background_color), dtype=torch.float32),
                             persistent=False)
        self.sh_basis = sh_basis
        self.output_cls = output_cls or DecoderOutput
        self.backend = backend
        self.cfg = cfg

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
        if depth_mode is not None or cam_rot_delta is not None:
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
                               "diff3r_plugin.integration.upstream.TorchDecoder instead")

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


class OfflineHubError(RuntimeError):
    """``torch.hub.load`` from GitHub was called under :func:`offline_torch_hub` without a local checkout."""


def _hub_env_var(owner: str, name: str) -> str:
    return "DIFF3R_TORCH_HUB_" + re.sub(r"[^0-9A-Za-z]", "_", f"{owner}_{name}").upper()


def local_hub_checkout(repo: str) -> Optional[Path]:
    """A local checkout (a directory with ``hubconf.py``) of the torch hub repo ``owner/name[:ref]``.

    Looked up, in order, in ``$DIFF3R_TORCH_HUB_<OWNER>_<NAME>`` (e.g.
    ``DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2``) and in the torch hub cache
    (``torch.hub.get_dir()/<owner>_<name>_<ref>``, ref ``main``/``master`` when not given),
    which is where an earlier online ``torch.hub.load`` left it. ``None`` when not found.
    """
    owner_name, _, ref = repo.partition(":")
    owner, _, name = owner_name.partition("/")
    candidates = []
    env = os.environ.get(_hub_env_var(owner, name))
    if env:
        candidates.append(Path(env).expanduser())
    hub_dir = Path(torch.hub.get_dir())
    for r in ([ref] if ref else []) + ["main", "master"]:
        candidates.append(hub_dir / f"{owner}_{name}_{r.replace('/', '_')}")
    for path in candidates:
        if (path / "hubconf.py").is_file():
            return path.resolve()
    return None


@contextlib.contextmanager
def offline_torch_hub():
    """Build ``torch.hub`` models from local checkouts with random weights; never download.

    Inside the context, ``torch.hub.load("<owner>/<name>[:ref]", model, ...)`` (the GitHub
    source, as DepthSplat's ``MultiViewUniMatch`` calls ``facebookresearch/dinov2`` and
    pixelSplat's DINO backbone ``facebookresearch/dino:main``) becomes
    ``torch.hub.load(<local checkout>, model, source="local", pretrained=False)``, the checkout
    found by :func:`local_hub_checkout`. The module is the one upstream builds (same class,
    same ``state_dict`` keys), so an upstream checkpoint that contains it (e.g. DepthSplat's
    ``encoder.depth_predictor.pretrained.*``) still loads. ``torch.hub.load_state_dict_from_url``
    raises. Without a checkout :class:`OfflineHubError` is raised (naming the environment
    variable to set). ``source="local"`` calls pass through unchanged.
    """
    original_load = torch.hub.load
    original_from_url = torch.hub.load_state_dict_from_url

    def load(repo_or_dir: str, model: str, *args: Any, source: str = "github", trust_repo: Any = None,
             force_reload: bool = False, verbose: bool = True, skip_validation: bool = False,
             **kwargs: Any) -> Any:
        if source != "github":
            return original_load(repo_or_dir, model, *args, source=source, trust_repo=trust_repo,
                                 force_reload=force_reload, verbose=verbose,
                                 skip_validation=skip_validation, **kwargs)
        local = local_hub_checkout(repo_or_dir)
        if local is None:
            owner, _, name = repo_or_dir.partition(":")[0].partition("/")
            raise OfflineHubError(
                f"torch.hub.load({repo_or_dir!r}, {model!r}) would download code and weights; "
                f"diff3r builds it offline with random weights from a local checkout of "
                f"github.com/{owner}/{name}: set {_hub_env_var(owner, name)}=<checkout> or put it at "
                f"{Path(torch.hub.get_dir()) / (owner + '_' + name + '_main')}")
        kwargs["pretrained"] = False
        log.info("diff3r: torch.hub.load(%r, %r) -> %s (source=local, pretrained=False: random weights)",
                 repo_or_dir, model, local)
        return original_load(str(local), model, *args, source="local", verbose=verbose, **kwargs)

    def load_state_dict_from_url(url: str, *args: Any, **kwargs: Any) -> Any:
        raise OfflineHubError(f"diff3r.offline_torch_hub: refusing to download {url}")

    torch.hub.load = load  # type: ignore[assignment]
    torch.hub.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.hub.load = original_load  # type: ignore[assignment]
        torch.hub.load_state_dict_from_url = original_from_url  # type: ignore[assignment]


def compose_upstream_config(upstream: str | Path, overrides: Sequence[str] = (),
                            config_name: str = "main") -> Any:
    """Compose ``<upstream>/config/<config_name>.yaml`` with Hydra's compose API.

    The plugin's config group (``optimizer/diff3r``, ``# @package diff3r``) is put on the
    search path explicitly, so ``+optimizer=diff3r`` works even where the SearchPathPlugin is
    not discovered.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = (Path(upstream) / "config").resolve()
    if not config_dir.is_dir():
        raise FileNotFoundError(f"{config_dir} does not exist: --upstream must be a repo checkout")
    GlobalHydra.instance().clear()
    overrides = list(overrides)
    if not any(o.startswith("hydra.searchpath") for o in overrides):
        overrides.append("hydra.searchpath=[pkg://diff3r_plugin.configs]")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


# --------------------------------------------------------------------------------------------
# End-to-end runner used by examples/wrap_{mvsplat,noposplat}.py

#: How each upstream repo is composed for a CPU run on a pixelSplat-format RE10K chunk.
#: ``extra`` overrides make the encoder build offline with random weights (no download):
#:
#: * pixelSplat: ``+experiment=re10k`` selects the ``dino`` backbone, which calls
#:   ``torch.hub.load("facebookresearch/dino:main", "dino_vitb8"/"dino_resnet50")``;
#:   ``model/encoder/backbone=resnet`` (the encoder's own default) builds a torchvision ResNet-50
#:   without weights instead. Released pixelSplat checkpoints use the DINO backbone, so with a
#:   checkpoint :func:`run_upstream` uses ``checkpoint_extra`` (``backbone=dino``, built by
#:   :func:`offline_torch_hub` from a local facebookresearch/dino checkout, then overwritten by
#:   the checkpoint).
#: * DepthSplat: ``MultiViewUniMatch`` always calls ``torch.hub.load("facebookresearch/dinov2",
#:   "dinov2_vit{s,b,l}14")`` (no config switch); it is built under :func:`offline_torch_hub`
#:   (local facebookresearch/dinov2 checkout, ``pretrained=False``). ``unimatch_weights_path`` is
#:   not read by the encoder (only its config has it), nulled for clarity.
UPSTREAM_SPECS = {
    "mvsplat": {
        "dataset": "dataset",
        "image_shape_key": "image_shape",
        "view_sampler": "dataset/view_sampler=evaluation",
        "extra": ["model.encoder.unimatch_weights_path=null"],
    },
    "pixelsplat": {
        "dataset": "dataset",
        "image_shape_key": "image_shape",
        "view_sampler": "dataset/view_sampler=evaluation",
        "extra": ["model/encoder/backbone=resnet"],
        # With a checkpoint: the released models' backbone (needs a local facebookresearch/dino
        # checkout for offline_torch_hub; random DINO weights, then overwritten by the checkpoint).
        "checkpoint_extra": ["model/encoder/backbone=dino"],
    },
    "depthsplat": {
        "dataset": "dataset",
        "image_shape_key": "image_shape",
        "view_sampler": "dataset/view_sampler=evaluation",
        "extra": ["model.encoder.unimatch_weights_path=null"],
    },
    "noposplat": {
        "dataset": "dataset.re10k",
        "image_shape_key": "input_image_shape",
        "view_sampler": "dataset/view_sampler@dataset.re10k.view_sampler=evaluation",
        "extra": [],
    },
}


def _strip_encoder_prefix(state: dict) -> dict:
    state = state.get("state_dict", state)
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return dict(state)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_upstream(upstream: str | Path, repo: str, data: str | Path, *, image_shape=(64, 64),
                 steps: int = 3, eval_scenes: int = 1, checkpoint: Optional[str] = None,
                 device: str = "cpu", diff3r_overrides: Sequence[str] = (), lr: float = 1e-4,
                 index: Optional[str] = None, seed: int = 0, point_depth_init: Optional[float] = None,
                 log_fn=print) -> dict:
    """Compose an upstream config with ``+optimizer=diff3r``, wrap its encoder, train, evaluate.

    Args:
        upstream: Path of an upstream checkout (MVSplat, pixelSplat, DepthSplat or NoPoSplat).
        repo: A key of :data:`UPSTREAM_SPECS` (``"mvsplat"``, ``"pixelsplat"``, ``"depthsplat"``,
            ``"noposplat"``).
        data: A pixelSplat-format RE10K root (``test/*.torch`` + ``test/index.json``).
        image_shape: ``dataset.image_shape`` override (multiples of 16).
        steps: Diff3R training steps (Adam on encoder + head, MSE on the targets).
        eval_scenes: Scenes evaluated (zero-shot vs. Diff3R TTO).
        checkpoint: Upstream checkpoint (Lightning ``state_dict`` with ``encoder.*`` keys);
            random weights when None.
        device: ``"cpu"`` (renders with :class:`TorchDecoder`) or ``"cuda"``.
        diff3r_overrides: Extra Hydra overrides such as ``"diff3r.steps=5"``.
        index: Evaluation index JSON (default ``<data>/evaluation_index_2ctx.json``).
        point_depth_init: NoPoSplat with random weights only: see :func:`init_point_depth`.

    Returns:
        The JSON-able summary described in the examples' ``--json`` help.
    """
    import time

    from torch.utils.data import default_collate

    from diff3r_plugin.evaluation.metrics import compute_lpips, compute_psnr, compute_ssim

    spec = UPSTREAM_SPECS[repo]
    upstream = Path(upstream).resolve()
    data = Path(data).resolve()
    index = index or str(data / "evaluation_index_2ctx.json")
    install_import_stubs()
    if str(upstream) not in sys.path:
        sys.path.insert(0, str(upstream))
    ds = spec["dataset"]
    h, w = int(image_shape[0]), int(image_shape[1])
    overrides = ["+experiment=re10k", "+optimizer=diff3r", "mode=test", "wandb.mode=disabled",
                 f"{ds}.roots=[{data}]", f"{ds}.{spec['image_shape_key']}=[{h},{w}]", spec["view_sampler"],
                 f"{ds}.view_sampler.index_path={index}",
                 *(spec.get("checkpoint_extra", spec["extra"]) if checkpoint else spec["extra"]),
                 *diff3r_overrides]
    cfg = compose_upstream_config(upstream, overrides)
    from src.config import load_typed_root_config  # type: ignore[import-not-found]
    from src.dataset import get_dataset  # type: ignore[import-not-found]
    from src.dataset.data_module import get_data_shim  # type: ignore[import-not-found]
    from src.global_cfg import set_cfg  # type: ignore[import-not-found]
    from src.model.encoder import get_encoder  # type: ignore[import-not-found]

    set_cfg(cfg)
    typed = load_typed_root_config(cfg)
    torch.manual_seed(seed)
    dev = torch.device(device)
    t0 = time.perf_counter()
    with offline_torch_hub():
        encoder, _ = get_encoder(typed.model.encoder)
    log_fn(f"[diff3r] built {type(encoder).__module__}.{type(encoder).__name__} "
           f"({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f} s")
    if checkpoint:
        encoder.load_state_dict(_strip_encoder_prefix(torch.load(checkpoint, map_location="cpu")), strict=True)
    if point_depth_init is not None:
        if checkpoint:
            raise ValueError("point_depth_init only applies to random weights, not with a checkpoint")
        changed = init_point_depth(encoder, point_depth_init)
        log_fn(f"[diff3r] point heads' output bias set for an initial depth of {point_depth_init:g}: {', '.join(changed)}")
    encoder.to(dev)
    keys_before = list(encoder.state_dict().keys())
    reference = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    encoder = wrap_from_hydra(cfg, encoder)
    if not hasattr(encoder, "diff3r"):
        raise RuntimeError("the composed config has no 'diff3r' node (is diff3r_plugin.configs importable?)")
    keys_unchanged = list(encoder.state_dict().keys()) == keys_before
    encoder.load_state_dict(reference, strict=True)  # an upstream checkpoint still loads
    del reference
    log_fn(f"[diff3r] {encoder.diff3r.report}")
    adapter = encoder.diff3r.adapter
    decoder = TorchDecoder(_background_from_cfg(cfg) or (0.0, 0.0, 0.0), adapter.sh_basis).to(dev)
    shim = get_data_shim(encoder)

    dataset = get_dataset(typed.dataset, "test", None)
    datasets = dataset if isinstance(dataset, list) else [dataset]
    examples = [ex for d in datasets for ex in d]
    if not examples:
        raise RuntimeError(f"no examples loaded from {data} with index {index}")

    def to_batch(example: dict) -> dict:
        batch = default_collate([example])

        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(dev)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return shim(move(batch))

    def encode(batch: dict, step: int) -> Any:
        if repo in ("mvsplat", "depthsplat"):
            return encoder(batch["context"], step, False, scene_names=batch["scene"])
        if repo == "pixelsplat":
            return encoder(batch["context"], step, False)
        return encoder(batch["context"], step)

    def render_targets(gaussians: Any, batch: dict) -> Tensor:
        if isinstance(gaussians, dict):
            gaussians = gaussians["gaussians"]
        t = batch["target"]
        return decoder(gaussians, t["extrinsics"], t["intrinsics"], t["near"], t["far"],
                       tuple(t["image"].shape[-2:])).color

    params = [p for p in encoder.parameters() if p.requires_grad]
    head_params = list(encoder.diff3r_parameters())
    opt = torch.optim.Adam([{"params": params}, {"params": head_params}], lr=lr)
    losses, step_times, gaussians_class = [], [], None
    n_grad = n_head_grad = 0
    encoder.train()
    for step in range(steps):
        batch = to_batch(examples[step % len(examples)])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = encode(batch, step)
        g = out["gaussians"] if isinstance(out, dict) else out
        gaussians_class = f"{type(g).__module__}.{type(g).__name__}"
        loss = ((render_targets(out, batch) - batch["target"]["image"]) ** 2).mean()
        loss.backward()
        n_grad = sum(1 for p in params if p.grad is not None and bool(torch.isfinite(p.grad).all())
                     and bool((p.grad != 0).any()))
        n_head_grad = sum(1 for p in head_params if p.grad is not None and bool((p.grad != 0).any()))
        opt.step()
        step_times.append(time.perf_counter() - t1)
        losses.append(float(loss.detach()))
        log_fn(f"[diff3r] step {step}: loss {losses[-1]:.5f}  ({step_times[-1]:.2f} s, "
               f"{n_grad}/{len(params)} encoder tensors and {n_head_grad}/{len(head_params)} "
               f"head tensors got gradients)")

    encoder.eval()
    results: dict = {}
    config = encoder.diff3r.config
    for method, enabled in (("zero_shot", False), ("diff3r_tto", True)):
        encoder.diff3r.config = dataclasses_replace(config, enabled=enabled)
        scores: dict = {"psnr": [], "ssim": [], "lpips": []}
        for example in examples[:eval_scenes]:
            batch = to_batch(example)
            with torch.no_grad():
                pred = render_targets(encode(batch, steps), batch)[0]
            gt = batch["target"]["image"][0]
            scores["psnr"].append(float(compute_psnr(gt, pred).mean()))
            scores["ssim"].append(float(compute_ssim(gt, pred).mean()))
            lp = compute_lpips(gt, pred)
            scores["lpips"].append(None if lp is None else float(lp.mean()))
        results[method] = {k: (None if any(x is None for x in v) or not v else sum(v) / len(v))
                           for k, v in scores.items()}
    encoder.diff3r.config = config
    return {
        "upstream": repo,
        "steps": steps,
        "losses": losses,
        "encoder_params_with_grad": n_grad,
        "encoder_param_tensors": len(params),
        "head_params_with_grad": n_head_grad,
        "state_dict_keys_unchanged": keys_unchanged,
        "gaussians_class": gaussians_class,
        "seconds_per_step": (sum(step_times) / len(step_times)) if step_times else None,
        "peak_memory_mb": _peak_memory_mb(dev),
        "loss_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
        "image_shape": [h, w],
        "device": str(dev),
        "point_depth_init": point_depth_init,
        "eval": results,
    }


def init_point_depth(encoder: nn.Module, depth: float) -> list:
    """Set NoPoSplat's point-head output bias so that untrained points lie ``depth`` ahead.

    NoPoSplat regresses each pixel's point ``xyz`` in the reference camera frame as
    ``u * expm1(|o|)`` with ``o`` the last 1x1 convolution's first three channels and
    ``u = o / |o|`` (DUSt3R's ``depth_mode=('exp', -inf, inf)``). With random weights ``o`` is
    small, so every point lies within a few hundredths of the camera centre, in front of the
    near-plane cull (upstream's rasterizer culls ``z <= 0.2`` after its scale-invariant
    rescaling, the plugin's renderer likewise): nothing is drawn and the photometric loss has no
    gradient. Setting the bias of those channels to ``(0, 0, log1p(depth))`` moves the untrained
    points to about ``depth`` in front of the reference camera (clustered near the optical axis:
    the network has not learnt rays), so renders are non-empty and gradients flow. This is an
    initialization for plumbing checks with random weights, not a trained model; it changes
    values, never ``state_dict`` keys. Returns the names of the changed parameters.
    """
    import math

    if depth <= 0:
        raise ValueError(f"point_depth_init must be > 0, got {depth}")
    changed = []
    for name in ("downstream_head1", "downstream_head2"):
        head = getattr(encoder, name, None)
        seq = getattr(getattr(head, "dpt", None), "head", None)
        last = None
        if isinstance(seq, nn.Sequential) and isinstance(seq[-1], nn.Conv2d) and seq[-1].bias is not None:
            last = seq[-1]
        if last is None or last.bias.numel() < 3:
            raise ValueError(f"init_point_depth: {type(encoder).__name__} has no NoPoSplat point head '{name}'"
                             " (dpt.head[-1] with a bias of >= 3 channels)")
        with torch.no_grad():
            last.bias[:3] = torch.tensor([0.0, 0.0, math.log1p(depth)], dtype=last.bias.dtype)
        changed.append(f"{name}.dpt.head.{len(seq) - 1}.bias[:3]")
    return changed


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


# --------------------------------------------------------------------------------------------
# Example command lines (examples/wrap_mvsplat.py, examples/wrap_noposplat.py)


def add_example_args(parser: Any) -> None:
    """The command-line options shared by the two wrap examples."""
    parser.add_argument("--upstream", default=None, help="upstream checkout (else: built-in tiny encoder)")
    parser.add_argument("--repo", default=None, choices=sorted(UPSTREAM_SPECS),
                        help="which upstream repository --upstream holds (default: the one the example "
                             "is named after; the pose-given example also runs pixelsplat and depthsplat)")
    parser.add_argument("--checkpoint", default=None, help="upstream checkpoint (default: random weights)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                              / "re10k_demo_padded360x640"),
                        help="pixelSplat-format RE10K root (with --upstream; default: ../shared/data/"
                             "re10k_demo_padded360x640 beside the repository)")
    parser.add_argument("--device", default="cpu", help="cpu (TorchDecoder) or cuda")
    parser.add_argument("--image-size", type=int, default=64, help="square image size (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3, help="Diff3R training steps")
    parser.add_argument("--eval-scenes", type=int, default=1, help="scenes to evaluate")
    parser.add_argument("--tto-steps", type=int, default=2, help="inner TTO steps (diff3r.steps)")
    parser.add_argument("--inner-solver", default="adam", choices=["adam", "lm"])
    parser.add_argument("--pcg-maxiter", type=int, default=20)
    parser.add_argument("--diff3r", action="append", default=[], metavar="KEY=VALUE",
                        help="extra diff3r.* override, e.g. --diff3r lambda_mode=constant")
    parser.add_argument("--point-depth-init", type=float, default=None, metavar="DEPTH",
                        help="NoPoSplat with random weights: put the untrained points DEPTH ahead of the "
                             "reference camera (otherwise they all lie in front of the near-plane cull "
                             "and nothing renders); see init_point_depth")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")


def run_builtin(kind: str, args: Any, log_fn=None) -> Optional[dict]:
    """The offline default of the examples: a built-in tiny encoder on embedded scenes.

    ``kind`` is ``"pose_given"`` (``TinyPoseGivenEncoder``) or ``"pose_free"``
    (``TinyPoseFreeEncoder``; batches are put in NoPoSplat's canonical frame). Returns None
    (after printing why) when the built-in models are not available.
    """
    import time

    log_fn = log_fn or ((lambda *a: print(*a, file=sys.stderr)) if getattr(args, "json", False) else print)
    try:
        from diff3r_plugin.models import TinyPoseFreeEncoder, TinyPoseGivenEncoder
        from diff3r_plugin.uncertainty import UncertaintyHead
    except ImportError as exc:
        print(f"[diff3r] the built-in tiny encoders are not available ({exc}); pass --upstream PATH "
              "to run an upstream checkout instead", file=sys.stderr)
        return None
    from diff3r_plugin.config import Diff3RConfig
    from diff3r_plugin.data.embedded import EmbeddedDataset
    from diff3r_plugin.evaluation.metrics import compute_lpips, compute_psnr, compute_ssim
    from diff3r_plugin.training import forward_model, prepare_batch, render_targets

    overrides: dict = {"steps": args.tto_steps, "inner_solver": args.inner_solver,
                       "pcg_maxiter": args.pcg_maxiter}
    for kv in args.diff3r:
        key, _, value = kv.partition("=")
        import yaml

        node = overrides
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    config = Diff3RConfig.from_dict(overrides, path="diff3r")
    torch.manual_seed(0)
    pose_free = kind == "pose_free"
    encoder = TinyPoseFreeEncoder() if pose_free else TinyPoseGivenEncoder()
    num_pose = 1 if pose_free else 0  # the pose-free encoder's output carries one pose delta
    head = UncertaintyHead(encoder.num_features, encoder.sh_degree, num_pose,
                           granularity=config.head.granularity, floor=config.head.floor,
                           init=config.head.init, hidden=config.head.hidden)
    size = (args.image_size, args.image_size)
    train = EmbeddedDataset(max(args.steps, 1), image_shape=size)
    held_out = EmbeddedDataset.held_out(max(args.eval_scenes, 1), image_shape=size) \
        if hasattr(EmbeddedDataset, "held_out") else EmbeddedDataset(max(args.eval_scenes, 1), seed_offset=10000, image_shape=size)

    def prepare(batch: dict) -> dict:
        return prepare_batch(encoder, batch)

    def forward(batch: dict, use_tto: bool):
        pred = forward_model(encoder, head, batch, tto=use_tto and config.enabled,
                             lambda_mode=config.lambda_mode, config=config)
        return render_targets(pred, batch)

    keys_before = list(encoder.state_dict().keys())
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    losses, times = [], []
    for step in range(args.steps):
        batch = prepare(train[step])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ((forward(batch, True) - batch["target"]["image"]) ** 2).mean()
        loss.backward()
        n_grad = sum(1 for p in encoder.parameters() if p.grad is not None and bool((p.grad != 0).any()))
        n_head = sum(1 for p in head.parameters() if p.grad is not None and bool((p.grad != 0).any()))
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        log_fn(f"[diff3r] step {step}: loss {losses[-1]:.5f} ({times[-1]:.2f} s)")
    results: dict = {}
    for method, use in (("zero_shot", False), ("diff3r_tto", True)):
        scores: dict = {"psnr": [], "ssim": [], "lpips": []}
        for i in range(args.eval_scenes):
            batch = prepare(held_out[i])
            with torch.no_grad():
                pred = forward(batch, use)[0]
            gt = batch["target"]["image"][0]
            scores["psnr"].append(float(compute_psnr(gt, pred).mean()))
            scores["ssim"].append(float(compute_ssim(gt, pred).mean()))
            lp = compute_lpips(gt, pred)
            scores["lpips"].append(None if lp is None else float(lp.mean()))
        results[method] = {k: (None if not v or any(x is None for x in v) else sum(v) / len(v))
                           for k, v in scores.items()}
    return {
        "upstream": None,
        "steps": args.steps,
        "losses": losses,
        "encoder_params_with_grad": n_grad if args.steps else 0,
        "head_params_with_grad": n_head if args.steps else 0,
        # The built-in path calls the layer directly (no instance patching); checked anyway.
        "state_dict_keys_unchanged": list(encoder.state_dict().keys()) == keys_before,
        "gaussians_class": None,
        "seconds_per_step": sum(times) / len(times) if times else None,
        "eval": results,
    }


def example_main(repo: str, builtin_kind: str, doc: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point shared by ``examples/wrap_<repo>.py``: upstream checkout or built-in model."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_example_args(parser)
    args = parser.parse_args(argv)
    if args.repo and not args.upstream:
        parser.error("--repo names the repository of an --upstream checkout; pass --upstream PATH too")
    if args.upstream:
        overrides = [f"diff3r.{kv}" for kv in args.diff3r] + [
            f"diff3r.steps={args.tto_steps}", f"diff3r.inner_solver={args.inner_solver}",
            f"diff3r.pcg_maxiter={args.pcg_maxiter}"]
        log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        result = run_upstream(args.upstream, args.repo or repo, args.data, image_shape=(args.image_size, args.image_size),
                              steps=args.steps, eval_scenes=args.eval_scenes, checkpoint=args.checkpoint,
                              device=args.device, diff3r_overrides=overrides,
                              point_depth_init=args.point_depth_init, log_fn=log)
    else:
        result = run_builtin(builtin_kind, args)
    if result is None:
        return 1
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
