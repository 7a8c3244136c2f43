"""The adapter interface: what a feed-forward 3DGS backbone implements to get Diff3R.

A new backbone is one file: subclass :class:`Adapter`, set ``name``/``sh_basis``/``pose_free``,
override what differs from the pixelSplat skeleton (most adapters override nothing but the
class attributes) and decorate it with ``@register_adapter("<name>")``.

Wrapping (:meth:`Adapter.wrap_encoder`) patches the encoder **instance**: its ``forward``
attribute is replaced by a function that calls the original bound ``forward`` with the same
``*args, **kwargs``, then runs test-time optimization on the output, using the context batch
given as the first positional argument (or ``context=``). Nothing is nested, so
``encoder.state_dict()`` keys stay exactly the same and upstream checkpoints (Lightning
``ckpt_path``, ``load_state_dict(strict=True)``) keep loading; ``get_data_shim`` and every
other attribute are untouched.

**How the uncertainty head is attached.** The head is *not* a registered child of the encoder:
it is stored with ``object.__setattr__`` (bypassing ``nn.Module.__setattr__``) and is reachable
as ``encoder.diff3r_head`` and ``encoder.diff3r_parameters()``. Consequences:

* ``encoder.state_dict()`` and ``encoder.parameters()`` are unchanged; a checkpoint without head
  keys loads with ``strict=True``.
* The training optimizer must be given the head parameters explicitly, e.g.
  ``Adam([*model.parameters(), *encoder.diff3r_parameters()])``.
* The head is saved separately with ``encoder.diff3r_state_dict()`` and restored with
  ``encoder.load_diff3r_state_dict(sd)``.
* ``encoder.to(device)``/``.train()``/``.eval()`` do not reach the head directly; the patched
  forward moves the head to the device/dtype of the encoder output and mirrors ``training``.

Caveats of instance patching: ``copy.deepcopy(encoder)`` copies the patched function, which
still calls the *original* instance (wrap the copy separately, or wrap after copying), and
pickling the whole module (``torch.save(encoder)``) fails on the closure; ``state_dict``-based
saving (what Lightning does) is unaffected. :func:`unwrap_encoder` restores the class forward.

This choice is reported at wrap time (``logging`` at INFO level and ``encoder.diff3r.report``).
"""

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import ConfigError, ShapeError
from diff3r_plugin.gaussians.layout import GaussianParams, UpstreamExtras, from_upstream, to_upstream
from diff3r_plugin.geometry.sh import MAX_RENDER_DEGREE, degree_from_coeffs
from diff3r_plugin.layer.views import ContextViews

__all__ = ["Adapter", "Diff3RState", "RebuildFn", "WrapReport", "GAUSSIAN_FIELDS"]

log = logging.getLogger(__name__)

#: Fields of the upstream ``src.model.types.Gaussians`` container.
GAUSSIAN_FIELDS = ("means", "covariances", "harmonics", "opacities")

RebuildFn = Callable[[Any], Any]


@dataclass
class WrapReport:
    """What :meth:`Adapter.wrap_encoder` did, for logs and for the user."""

    adapter: str
    encoder_class: str
    head_attached: str
    head_parameters: int
    state_dict_keys: int
    lambda_mode: str

    def __str__(self) -> str:
        return (
            f"diff3r: wrapped {self.encoder_class} with adapter {self.adapter!r} (lambda_mode="
            f"{self.lambda_mode}); state_dict keys unchanged ({self.state_dict_keys}). "
            f"{self.head_attached}"
        )


@dataclass
class Diff3RState:
    """Per-encoder state stored on the wrapped instance as ``encoder.diff3r``."""

    adapter: "Adapter"
    config: Diff3RConfig
    original_forward: Callable[..., Any]
    head: Optional[nn.Module] = None
    report: Optional[WrapReport] = None
    last_info: Any = None
    last_poses: Optional[Tensor] = None
    last_initial_poses: Optional[Tensor] = None
    calls: int = 0
    training: bool = True


def _qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class Adapter:
    """Base adapter for pixelSplat-skeleton backbones (see the module docstring).

    Class attributes:
        name: Registered name.
        sh_basis: ``"e3nn"`` (pixelSplat/MVSplat/DepthSplat rasterizer) or ``"3dgs"``.
        pose_free: The backbone does not take context poses (NoPoSplat); the other context
            poses are estimated and refined in TTO.
        default_sh_degree: Upstream SH degree when the encoder config does not say.
        encoder_class_patterns: Regexes on the encoder class name used by auto-detection.
    """

    name: ClassVar[str] = "base"
    sh_basis: ClassVar[str] = "e3nn"
    pose_free: ClassVar[bool] = False
    default_sh_degree: ClassVar[int] = 4
    encoder_class_patterns: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, background: Optional[Sequence[float]] = None) -> None:
        self.background = None if background is None else torch.as_tensor(background, dtype=torch.float32)

    # ------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, encoder: Any) -> bool:
        """Whether ``encoder`` (instance or class) looks like this adapter's backbone."""
        names = [c.__name__ for c in (encoder if isinstance(encoder, type) else type(encoder)).__mro__]
        return any(re.search(p, n) for p in cls.encoder_class_patterns for n in names)

    # ------------------------------------------------------------------ Gaussians
    def sh_degree(self, gaussians: Any) -> int:
        """SH degree held by the upstream harmonics (``d_sh = (deg+1)^2``)."""
        return degree_from_coeffs(int(gaussians.harmonics.shape[-1]))

    def layout_sh_degree(self, gaussians: Any) -> int:
        """Degree optimized by the layer: the rasterizers evaluate at most degree 3."""
        return min(self.sh_degree(gaussians), MAX_RENDER_DEGREE)

    def check_gaussians(self, gaussians: Any) -> None:
        missing = [f for f in GAUSSIAN_FIELDS if not isinstance(getattr(gaussians, f, None), Tensor)]
        if missing:
            raise ShapeError(
                f"{self.name}: the encoder output {type(gaussians).__name__} lacks tensor field(s) "
                f"{missing}; expected an upstream Gaussians with {list(GAUSSIAN_FIELDS)}")

    def gaussians_to_layout(self, gaussians: Any, num_pose_views: int = 0
                            ) -> Tuple[GaussianParams, UpstreamExtras]:
        """Upstream ``Gaussians`` -> optimizable layout (differentiable)."""
        self.check_gaussians(gaussians)
        return from_upstream(gaussians.means, gaussians.covariances, gaussians.harmonics,
                             gaussians.opacities, sh_degree=self.layout_sh_degree(gaussians),
                             num_pose_views=num_pose_views, on_invalid="project")

    def layout_to_gaussians(self, params: GaussianParams, extras: UpstreamExtras, template: Any) -> Any:
        """Layout -> an instance of the *upstream* class of ``template`` (never a look-alike).

        Dataclasses go through :func:`dataclasses.replace` (so extra fields, e.g. AnySplat's,
        are carried over); other classes are rebuilt with ``type(template)(...)``.
        """
        means, cov, harmonics, opacities = to_upstream(params, extras)
        ref = template.means
        values = {k: v.to(dtype=ref.dtype) for k, v in
                  zip(GAUSSIAN_FIELDS, (means, cov, harmonics, opacities))}
        if dataclasses.is_dataclass(template) and not isinstance(template, type):
            return dataclasses.replace(template, **values)
        return type(template)(**values)

    def unwrap_output(self, output: Any) -> Tuple[Any, RebuildFn]:
        """Split the encoder output into the Gaussians and a function that rebuilds it."""
        return output, lambda g: g

    # ------------------------------------------------------------------ context
    def normalize_images(
        self, images: Float[Tensor, "batch view 3 height width"]
    ) -> Float[Tensor, "batch view 3 height width"]:
        """Undo an encoder data shim's normalization (identity for pose-given backbones)."""
        return images

    def context_views(self, context: Any) -> ContextViews:
        """The context images in [0, 1] and cameras from an upstream ``BatchedViews`` dict."""
        if not isinstance(context, Mapping):
            raise ShapeError(
                f"{self.name}: the first argument of the encoder must be the context batch (a dict "
                f"with 'image', 'extrinsics', 'intrinsics', 'near', 'far'); got {type(context).__name__}")
        if context.get("image") is None:
            raise ShapeError(
                f"{self.name}: the context batch has no images (key 'image'; keys present: "
                f"{sorted(map(str, context))}). Diff3R optimizes against the context views and "
                "needs them; pass batch['context'] (after the data shim) to the encoder")
        missing = [k for k in ("extrinsics", "intrinsics", "near", "far") if context.get(k) is None]
        if missing:
            raise ShapeError(f"{self.name}: the context batch lacks {missing} (keys present: "
                             f"{sorted(map(str, context))})")
        images = context["image"]
        if not isinstance(images, Tensor) or images.ndim != 5:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ShapeError(f"{self.name}: context['image'] must be [batch, view, 3, h, w], got {shape}")
        b, v = images.shape[:2]
        for k in ("extrinsics", "intrinsics", "near", "far"):
            t = context[k]
            if not isinstance(t, Tensor) or tuple(t.shape[:2]) != (b, v):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(
                    f"{self.name}: context has {v} image view(s) per scene (batch {b}) but "
                    f"context[{k!r}] has shape {shape}: the view counts must match")
        bg = None if self.background is None else self.background.to(images.device)
        views = ContextViews(self.normalize_images(images).float(), context["extrinsics"].float(),
                             context["intrinsics"].float(), context["near"].float(),
                             context["far"].float(), bg, self.sh_basis)  # type: ignore[arg-type]
        return views

    def num_pose_views(self, views: ContextViews, config: Diff3RConfig) -> int:
        """Pose deltas in the layout: the non-reference context views of pose-free models."""
        return views.num_views - 1 if (self.pose_free and config.optimize_pose) else 0

    def prepare_views(self, views: ContextViews, gaussians: Any, params: GaussianParams,
                      state: Optional[Diff3RState] = None) -> ContextViews:
        """Hook run after conversion (pose-free adapters estimate context poses here)."""
        return views

    def split_batch(self, gaussians: Any, views: ContextViews) -> List[Tuple[slice, ContextViews]]:
        """Which rows of the Gaussians batch to optimize, against which views.

        The default requires one Gaussian scene per context scene.
        """
        gb = int(gaussians.means.shape[0])
        if gb != views.batch:
            raise ShapeError(
                f"{self.name}: the encoder returned {gb} Gaussian scene(s) for {views.batch} "
                "context scene(s); they must match")
        return [(slice(0, gb), views)]

    # ------------------------------------------------------------------ encoder config
    def encoder_sh_degree(self, encoder: Any) -> int:
        """The upstream SH degree from ``encoder.cfg.gaussian_adapter.sh_degree`` if present."""
        cfg = getattr(encoder, "cfg", None)
        ga = getattr(cfg, "gaussian_adapter", None)
        deg = getattr(ga, "sh_degree", None)
        if deg is None and isinstance(ga, Mapping):
            deg = ga.get("sh_degree")
        return int(deg) if deg is not None else self.default_sh_degree

    def encoder_num_context_views(self, encoder: Any) -> int:
        return 2

    def configure_from_encoder(self, encoder: Any) -> None:
        """Read adapter settings from the encoder (e.g. its normalization constants)."""

    # ------------------------------------------------------------------ Lambda
    def build_head(self, encoder: Any, config: Diff3RConfig) -> nn.Module:
        """The default uncertainty head for this encoder (``diff3r_plugin.uncertainty``)."""
        from diff3r_plugin.uncertainty import UncertaintyHead  # lazy: optional module

        sh = min(self.encoder_sh_degree(encoder), MAX_RENDER_DEGREE)
        pose = self.encoder_num_context_views(encoder) - 1 if (self.pose_free and config.optimize_pose) else 0
        h = config.head
        return UncertaintyHead(_feature_dim(), sh, pose, granularity=h.granularity, floor=h.floor,
                               init=h.init, hidden=h.hidden)

    def compute_lambda(self, params: GaussianParams, views: ContextViews, config: Diff3RConfig,
                       head: Optional[nn.Module]) -> Float[Tensor, "batch n"]:
        """Lambda ``[b, n]``: a constant, or the head applied to per-Gaussian features."""
        theta0 = params.flatten()
        if config.lambda_mode == "constant" or head is None:
            if config.lambda_mode == "predicted":
                raise ConfigError(
                    f"{self.name}: diff3r.lambda_mode='predicted' needs an uncertainty head, but none "
                    "is attached; pass head= to wrap_encoder or set diff3r.lambda_mode=constant")
            return torch.full_like(theta0.detach(), config.constant_lambda)
        from diff3r_plugin.uncertainty import features_from_gaussians  # lazy: optional module

        # The descriptor is computed from detached Gaussians (as the built-in tiny encoders do):
        # the head learns from the outer loss through Lambda, the encoder through theta0.
        detached = params.map(lambda t: t.detach())
        features = features_from_gaussians(detached, views.images, views.extrinsics)
        lam = head(features)
        if tuple(lam.shape) != tuple(theta0.shape):
            raise ShapeError(
                f"{self.name}: the uncertainty head returned Lambda of shape {tuple(lam.shape)}, but "
                f"the layout needs {tuple(theta0.shape)} (sh degree {params.layout.sh_degree}, "
                f"{params.layout.num_pose_views} pose view(s)); build the head with these sizes")
        return lam

    # ------------------------------------------------------------------ TTO
    def apply_tto(self, output: Any, context: Any, state: Diff3RState) -> Any:
        """Run Diff3R on one encoder output and return it in the upstream form."""
        from diff3r_plugin.layer import Diff3RLayer

        config = state.config
        gaussians, rebuild = self.unwrap_output(output)
        self.check_gaussians(gaussians)
        views = self.context_views(context)
        head = state.head
        if head is not None:
            ref = gaussians.means
            head.to(device=ref.device)
            head.train(state.training)  # type: ignore[attr-defined]
        parts = self.split_batch(gaussians, views)
        out_fields: Dict[str, List[Tuple[slice, Tensor]]] = {f: [] for f in GAUSSIAN_FIELDS}
        infos, poses, init_poses = [], [], []
        for rows, sub_views in parts:
            sub = _slice_gaussians(gaussians, rows)
            n_pose = self.num_pose_views(sub_views, config)
            params, extras = self.gaussians_to_layout(sub, n_pose)
            sub_views = self.prepare_views(sub_views, sub, params, state)
            init_poses.append(sub_views.extrinsics.detach())
            lam = self.compute_lambda(params, sub_views, config, head)
            star, info = Diff3RLayer(config)(params, lam, sub_views)
            if n_pose:
                from diff3r_plugin.render.api import pose_adjusted_extrinsics

                poses.append(pose_adjusted_extrinsics(star, sub_views.extrinsics).detach())
            new = self.layout_to_gaussians(star, extras, sub)
            for f in GAUSSIAN_FIELDS:
                out_fields[f].append((rows, getattr(new, f)))
            infos.append(info)
        state.last_info = infos[0] if len(infos) == 1 else infos
        state.last_poses = poses[0] if len(poses) == 1 else (poses or None)
        state.last_initial_poses = init_poses[0] if len(init_poses) == 1 else init_poses
        state.calls += 1
        if len(parts) == 1 and parts[0][0] == slice(0, int(gaussians.means.shape[0])):
            return rebuild(new)
        merged = {}
        for f in GAUSSIAN_FIELDS:
            full = getattr(gaussians, f)
            pieces, last = [], 0
            for rows, t in sorted(out_fields[f], key=lambda x: x[0].start):
                if rows.start > last:
                    pieces.append(full[last:rows.start])
                pieces.append(t.to(full.dtype))
                last = rows.stop
            if last < full.shape[0]:
                pieces.append(full[last:])
            merged[f] = torch.cat(pieces, 0)
        if dataclasses.is_dataclass(gaussians):
            return rebuild(dataclasses.replace(gaussians, **merged))
        return rebuild(type(gaussians)(**merged))

    # ------------------------------------------------------------------ wrapping
    def wrap_encoder(self, encoder: nn.Module, config: Optional[Diff3RConfig] = None,
                     head: Optional[nn.Module] = None) -> nn.Module:
        """Patch ``encoder.forward`` in place (see the module docstring); returns ``encoder``.

        Args:
            encoder: The upstream encoder instance.
            config: Layer settings (default :class:`Diff3RConfig`).
            head: Uncertainty head; built with :meth:`build_head` when ``None`` and
                ``config.lambda_mode == "predicted"``.

        Raises:
            ConfigError: If the encoder is already wrapped.
        """
        config = config or Diff3RConfig()
        if not isinstance(encoder, nn.Module):
            raise ConfigError(f"wrap_encoder needs an nn.Module encoder instance, got {type(encoder).__name__}")
        if isinstance(getattr(encoder, "diff3r", None), Diff3RState):
            raise ConfigError(f"{type(encoder).__name__} is already wrapped by diff3r "
                              f"(adapter {encoder.diff3r.adapter.name!r}); wrap it only once")
        self.configure_from_encoder(encoder)
        if head is None and config.lambda_mode == "predicted":
            head = self.build_head(encoder, config)
        keys_before = list(encoder.state_dict().keys())
        original = encoder.forward  # bound method of the upstream class
        state = Diff3RState(adapter=self, config=config, original_forward=original, head=head)
        adapter = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not state.config.enabled:
                return out
            context = args[0] if args else kwargs.get("context")
            state.training = encoder.training  # type: ignore[attr-defined]
            return adapter.apply_tto(out, context, state)

        forward.__wrapped__ = original  # type: ignore[attr-defined]
        forward.__doc__ = getattr(original, "__doc__", None)
        # object.__setattr__: nn.Module.__setattr__ would register a Module value as a child
        # (changing state_dict keys); plain instance attributes do not.
        object.__setattr__(encoder, "forward", forward)
        object.__setattr__(encoder, "diff3r", state)
        object.__setattr__(encoder, "diff3r_head", head)
        object.__setattr__(encoder, "diff3r_parameters",
                           lambda: iter(()) if head is None else head.parameters())
        object.__setattr__(encoder, "diff3r_state_dict",
                           lambda: {} if head is None else head.state_dict())
        object.__setattr__(encoder, "load_diff3r_state_dict",
                           lambda sd, strict=True: None if head is None else head.load_state_dict(sd, strict=strict))
        keys_after = list(encoder.state_dict().keys())
        if keys_after != keys_before:  # pragma: no cover - guarded by the design above
            raise RuntimeError("diff3r: wrapping changed the encoder's state_dict keys")
        n_head = 0 if head is None else sum(p.numel() for p in head.parameters())
        attached = ("No uncertainty head (constant Lambda)." if head is None else
                    f"Uncertainty head ({type(head).__name__}, {n_head} parameters) is kept OUT of the "
                    "encoder's state_dict/parameters(): add encoder.diff3r_parameters() to the "
                    "training optimizer and save it with encoder.diff3r_state_dict(); upstream "
                    "checkpoints without head keys load with strict=True.")
        state.report = WrapReport(self.name, _qualname(encoder), attached, n_head, len(keys_after),
                                  config.lambda_mode)
        log.info("%s", state.report)
        return encoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, sh_basis={self.sh_basis!r}, pose_free={self.pose_free})"


def unwrap_encoder(encoder: nn.Module) -> nn.Module:
    """Undo :meth:`Adapter.wrap_encoder` (restores the class ``forward``)."""
    for attr in ("forward", "diff3r", "diff3r_head", "diff3r_parameters", "diff3r_state_dict",
                 "load_diff3r_state_dict"):
        encoder.__dict__.pop(attr, None)
    return encoder


def _slice_gaussians(gaussians: Any, rows: slice) -> Any:
    if rows == slice(0, int(gaussians.means.shape[0])):
        return gaussians
    values = {f: getattr(gaussians, f)[rows] for f in GAUSSIAN_FIELDS}
    if dataclasses.is_dataclass(gaussians):
        return dataclasses.replace(gaussians, **values)
    return type(gaussians)(**values)


def _feature_dim() -> int:
    """Width of :func:`diff3r_plugin.uncertainty.features_from_gaussians` features."""
    import diff3r_plugin.uncertainty as unc

    for name in ("NUM_GAUSSIAN_FEATURES", "FEATURE_DIM", "NUM_FEATURES", "feature_dim", "num_features"):
        value = getattr(unc, name, None)
        if isinstance(value, int):
            return value
        if callable(value):
            try:
                return int(value())
            except TypeError:
                pass
    # Probe with a tiny scene: 1 view of 2x2 pixels, one Gaussian per pixel.
    from diff3r_plugin.gaussians.layout import random_params

    params = random_params(1, 4, sh_degree=0, generator=torch.Generator().manual_seed(0))
    feats = unc.features_from_gaussians(params, torch.rand(1, 1, 3, 2, 2))
    return int(feats.shape[-1])
