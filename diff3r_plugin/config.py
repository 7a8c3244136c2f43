"""Typed, validated configuration of the Diff3R layer.

:class:`Diff3RConfig` is the single source of truth for the plugin's settings. In an upstream
Hydra repo it is read from the top-level ``diff3r`` node, which the option file
``configs/optimizer/diff3r.yaml`` (header ``# @package diff3r``) creates when the user adds
``- optimizer: diff3r`` to the defaults list or passes ``+optimizer=diff3r``. The upstream
``optimizer`` node (the *training* optimizer of the network) is never read or touched.

Validation happens in :meth:`Diff3RConfig.from_dict` (which knows the dotted key path of
every value, so errors name e.g. ``diff3r.head.floor``) and again in ``__post_init__`` so that
direct construction and :func:`dataclasses.replace` cannot produce an invalid object either.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Type, TypeVar, get_args, get_origin

from .errors import ConfigError

__all__ = [
    "Diff3RConfig",
    "HeadConfig",
    "LearningRates",
    "load_from_hydra",
    "require_head",
]

# Field metadata keys understood by the validator. Bounds live next to the field so the
# dataclass stays the only place where defaults *and* admissible ranges are written down.
_GE = "ge"
_GT = "gt"
_LT = "lt"


def _bound(**bounds: float) -> Dict[str, Any]:
    """Builds the ``metadata`` of a numeric field with its admissible range.

    Args:
        **bounds: Any of ``ge`` (>=), ``gt`` (>) and ``lt`` (<).

    Returns:
        A metadata mapping for :func:`dataclasses.field`.
    """
    return dict(bounds)


def _describe_type(tp: Any) -> str:
    """Human-readable name of an annotated field type, used in error messages."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def _describe_bounds(meta: Mapping[str, Any]) -> str:
    """Renders the range constraints of a field, e.g. ``"> 0 and < 1"``."""
    parts = []
    if _GE in meta:
        parts.append(f">= {meta[_GE]}")
    if _GT in meta:
        parts.append(f"> {meta[_GT]}")
    if _LT in meta:
        parts.append(f"< {meta[_LT]}")
    return " and ".join(parts)


def _allowed(tp: Any, meta: Mapping[str, Any]) -> str:
    """Describes what a field accepts: its type plus its range, if any."""
    bounds = _describe_bounds(meta)
    return _describe_type(tp) + (f" {bounds}" if bounds else "")


def _did_you_mean(word: str, candidates: List[str]) -> str:
    """Returns a ``" Did you mean ...?"`` suffix for the closest candidates, or ``""``."""
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _check_value(value: Any, tp: Any, meta: Mapping[str, Any], key: str) -> Any:
    """Validates (and lightly coerces) one scalar value against its field type and bounds.

    Args:
        value: The value given by the user.
        tp: The annotated type of the field (``bool``, ``int``, ``float``, ``str`` or a ``Literal``).
        meta: The field metadata holding the bounds.
        key: The full dotted key, for error messages.

    Returns:
        The value, with ints converted to float for float fields.

    Raises:
        ConfigError: On a wrong type or an out-of-range value.
    """
    allowed = _allowed(tp, meta)
    if isinstance(value, str) and value == "???":
        # OmegaConf renders mandatory-but-unset values as "???" after to_container().
        raise ConfigError(f"{key} is missing (got '???'); it must be {allowed}.")

    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        if not isinstance(value, str) or value not in choices:
            hint = _did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(f"{key} must be {allowed}; got {value!r}.{hint}")
        return value

    if tp is bool:
        # No truthiness coercion: "false" (a string) would otherwise silently mean True.
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be {allowed}; got {value!r} ({type(value).__name__}).")
        return value

    if tp is int:
        # bool is a subclass of int in Python, but `steps: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be {allowed}; got {value!r} ({type(value).__name__}).")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be {allowed}; got {value!r} ({type(value).__name__}).")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite float; got {value!r}.")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be {allowed}; got {value!r} ({type(value).__name__}).")
        return value
    else:  # pragma: no cover - guards against adding a field of an unsupported type
        raise TypeError(f"Unsupported config field type {tp!r} for {key}")

    ok = (
        (_GE not in meta or value >= meta[_GE])
        and (_GT not in meta or value > meta[_GT])
        and (_LT not in meta or value < meta[_LT])
    )
    if not ok:
        raise ConfigError(f"{key} must be {allowed}; got {value!r}.")
    return value


_S = TypeVar("_S", bound="_Section")


class _Section:
    """Mixin giving a config dataclass validated ``from_dict``/``to_dict``/``merge``.

    Subclasses set ``_PATH``: the dotted key they live under when built directly (i.e. not
    through :meth:`from_dict`, which passes the actual path down).
    """

    _PATH: ClassVar[str] = "diff3r"

    @classmethod
    def _fields(cls) -> Dict[str, dataclasses.Field]:
        """The dataclass fields of ``cls`` by name, with resolved types."""
        return {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def _unknown_key(cls, name: Any, path: str) -> ConfigError:
        """The error for an unknown key, with the closest valid keys as full dotted paths (so
        the user can paste the fix into an override)."""
        fields = cls._fields()
        close = difflib.get_close_matches(str(name), list(fields), n=3, cutoff=0.6)
        hint = (" Did you mean " + " or ".join(repr(f"{path}.{c}") for c in close) + "?") if close else ""
        return ConfigError(
            f"Unknown config key {f'{path}.{name}'!r}.{hint} Valid keys under {path!r}: "
            f"{', '.join(sorted(fields))}."
        )

    def __new__(cls, *args: Any, **kwargs: Any):
        # The generated __init__ would raise a bare TypeError for an unknown keyword; name the
        # key and suggest the closest one instead, as from_dict does.
        if kwargs:
            fields = cls._fields()
            for name in kwargs:
                if name not in fields:
                    raise cls._unknown_key(name, cls._PATH)
        return super().__new__(cls)

    @classmethod
    def _coerce_all(cls, values: Mapping[str, Any], path: str) -> Dict[str, Any]:
        """Validates a mapping of (possibly partial) field values and returns kwargs for ``cls``.

        Args:
            values: Field name -> value; nested sections may be mappings or instances.
            path: Dotted key of this section, e.g. ``"diff3r.head"``.

        Returns:
            Keyword arguments with validated, coerced values.

        Raises:
            ConfigError: On an unknown key, a wrong type or an out-of-range value.
        """
        fields = cls._fields()
        out: Dict[str, Any] = {}
        for name, value in values.items():
            if not isinstance(name, str) or name not in fields:
                raise cls._unknown_key(name, path)
            f = fields[name]
            key = f"{path}.{name}"
            if dataclasses.is_dataclass(f.type):
                section: Any = f.type
                if isinstance(value, section):
                    out[name] = value
                elif isinstance(value, Mapping):
                    out[name] = section.from_dict(value, path=key)
                else:
                    raise ConfigError(
                        f"{key} must be a mapping with keys {', '.join(sorted(section._fields()))}; "
                        f"got {value!r} ({type(value).__name__})."
                    )
            else:
                out[name] = _check_value(value, f.type, f.metadata, key)
        return out

    @classmethod
    def from_dict(cls: Type[_S], mapping: Any = None, *, path: Optional[str] = None) -> _S:
        """Builds a validated config from a plain dict or an OmegaConf ``DictConfig``.

        Missing keys take their defaults, so a partial mapping (e.g. ``{"steps": 5}``) is fine.

        Args:
            mapping: A ``dict``/``Mapping``, a ``DictConfig`` (interpolations are resolved), or
                ``None`` for all defaults (an empty Hydra node reads as ``None``).
            path: Dotted key of this section, used in error messages. Defaults to the
                section's own location (``"diff3r"`` for :class:`Diff3RConfig`).

        Returns:
            An instance of ``cls``.

        Raises:
            ConfigError: On an unknown key (with close-match suggestions), a wrong type, an
                out-of-range value, or an interpolation that cannot be resolved.
        """
        path = cls._PATH if path is None else path
        mapping = _to_plain(mapping, path)
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{path} must be a mapping; got {mapping!r} ({type(mapping).__name__}).")
        kwargs = cls._coerce_all(mapping, path)
        obj = cls(**kwargs)  # type: ignore[call-arg]
        obj._validate(path)
        return obj

    def _validate(self, path: str) -> None:
        """Re-validates every field in place (ints become floats where a float is expected).

        Args:
            path: Dotted key of this section, for error messages.

        Raises:
            ConfigError: If any field is invalid.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name, value in self._coerce_all(values, path).items():
            # object.__setattr__ because the dataclasses are frozen.
            object.__setattr__(self, name, value)
            if isinstance(value, _Section):
                value._validate(f"{path}.{name}")
        self._check_cross_field(path)

    def _check_cross_field(self, path: str) -> None:
        """Hook for constraints that involve several fields. No-op by default."""

    def __post_init__(self) -> None:
        self._validate(self._PATH)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the config as a plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def merge(self: _S, overrides: Any) -> _S:
        """Returns a new validated config with ``overrides`` (a possibly nested mapping) applied.

        Args:
            overrides: e.g. ``{"steps": 5, "head": {"floor": 1e-3}}``; a dict or DictConfig.

        Returns:
            A new instance of the same class; ``self`` is unchanged.

        Raises:
            ConfigError: As :meth:`from_dict`.
        """
        overrides = _to_plain(overrides, self._PATH) or {}
        return type(self).from_dict(_deep_update(self.to_dict(), overrides), path=self._PATH)


def _deep_update(base: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively overlays ``overrides`` onto ``base`` (a fresh dict is returned)."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def _to_plain(obj: Any, path: str) -> Any:
    """Converts an OmegaConf container to plain Python; passes anything else through.

    Args:
        obj: A ``DictConfig``/``ListConfig`` or any other object.
        path: Dotted key, for error messages.

    Raises:
        ConfigError: If an interpolation cannot be resolved.
    """
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return obj
    if isinstance(obj, Container):
        try:
            return OmegaConf.to_container(obj, resolve=True)
        except Exception as exc:  # omegaconf raises several unrelated types here
            raise ConfigError(f"Could not resolve the config at {path!r}: {exc}") from exc
    return obj


@dataclass(frozen=True)
class LearningRates(_Section):
    """Per-attribute Adam learning rates of the inner TTO (defaults follow 3DGS).

    Attributes:
        means: Rate for Gaussian centres (multiplied by the scene extent when
            ``means_lr_scale == "scene_extent"``).
        log_scales: Rate for log-scales.
        quats: Rate for rotation quaternions.
        opacity_logits: Rate for opacity logits.
        sh_dc: Rate for the DC spherical-harmonics coefficient.
        sh_rest: Rate for higher-order SH coefficients.
        pose: Rate for context camera pose deltas (pose-free models).
    """

    _PATH: ClassVar[str] = "diff3r.lr"

    means: float = field(default=1.6e-4, metadata=_bound(gt=0))
    log_scales: float = field(default=5e-3, metadata=_bound(gt=0))
    quats: float = field(default=1e-3, metadata=_bound(gt=0))
    opacity_logits: float = field(default=5e-2, metadata=_bound(gt=0))
    sh_dc: float = field(default=2.5e-3, metadata=_bound(gt=0))
    sh_rest: float = field(default=1.25e-4, metadata=_bound(gt=0))
    pose: float = field(default=1e-3, metadata=_bound(gt=0))


@dataclass(frozen=True)
class HeadConfig(_Section):
    """Uncertainty head that predicts the per-parameter weights Lambda.

    Attributes:
        granularity: ``"group"`` (one Lambda per attribute group per Gaussian) or
            ``"parameter"`` (one per scalar parameter).
        floor: Lower bound added after the softplus so Lambda stays strictly positive.
        init: Value every Lambda takes at initialisation; must exceed ``floor``.
        hidden: Hidden width of the head's MLP.
    """

    _PATH: ClassVar[str] = "diff3r.head"

    granularity: Literal["group", "parameter"] = "group"
    floor: float = field(default=1e-4, metadata=_bound(gt=0))
    init: float = field(default=1.0, metadata=_bound(gt=0))
    hidden: int = field(default=32, metadata=_bound(ge=1))

    def _check_cross_field(self, path: str) -> None:
        # softplus(x) + floor can only reach values above the floor, so init <= floor has no
        # preimage and the head could not be initialised to it.
        if not self.init > self.floor:
            raise ConfigError(
                f"{path}.init must be > {path}.floor ({self.floor!r}); got {self.init!r}."
            )


@dataclass(frozen=True)
class Diff3RConfig(_Section):
    """All settings of the Diff3R layer (the Hydra node ``diff3r``).

    Instances are frozen; use :meth:`merge` or :func:`dataclasses.replace` to derive a
    modified copy (both re-validate).

    Attributes:
        enabled: Master switch; when False the adapter passes upstream Gaussians through.
        adapter: Registered adapter name, or ``"auto"`` to detect it from the encoder.
        steps: Number of inner TTO steps K (0 disables the inner optimization).
        inner_solver: ``"lm"`` (Levenberg-Marquardt / Gauss-Newton with PCG) or ``"adam"``.
        stationarity_tol: Gradient-norm tolerance at which the inner solve counts as stationary.
        lr: Per-attribute Adam learning rates.
        means_lr_scale: Scale the means' rate by the scene extent (``"scene_extent"``) or not.
        lm_damping: Initial Levenberg-Marquardt damping ``mu`` of ``mu D`` on the Gauss-Newton
            diagonal (divided by 3 after an accepted step, multiplied by 4 after a rejected one).
        lm_pcg_iters: Maximum PCG iterations per LM step.
        lm_pcg_tol: Relative residual at which the PCG of an LM step stops.
        backward: ``"implicit"`` (IFT + PCG) or ``"unroll"`` (backprop through K steps).
        hessian: Matrix of the implicit solve: ``"gauss_newton"`` (J^T J + diag(Lambda), the
            paper's choice; exact when the context residuals vanish at the optimum) or
            ``"exact"`` (full Hessian-vector products by double backward; torch backend only).
        matvec: Hessian-vector products by ``"sparse"`` (the torch renderer's explicit
            factored Jacobian; the default), ``"autodiff"`` (jvp + vjp through the torch
            renderer) or ``"finite_difference"`` (for black-box first-order rasterizers).
        fd_eps: Step of the finite-difference JVP.
        precond: PCG preconditioner: ``"block_jacobi"`` (exact per-Gaussian blocks of
            ``J^T J`` plus ``Lambda``; needs ``matvec="sparse"`` and otherwise falls back to
            ``"jacobi"``, which ``info.precond`` then reports), ``"jacobi"`` (``diag(J^T J) +
            Lambda``: exact with ``matvec="sparse"``, else estimated with Rademacher probes)
            or ``"none"``.
        precond_probes: Number of random probes for the estimated Jacobi diagonal.
        pcg_tol: Relative residual tolerance of the backward PCG.
        pcg_maxiter: Maximum PCG iterations in the backward pass.
        pcg_check_every: Check the residual for NaN/divergence every this many iterations.
        robust: Photometric loss: ``"none"`` (L2) or ``"huber"``.
        huber_delta: Huber threshold.
        on_failure: Policy when a solve fails: ``"raise"``, ``"warn"`` or ``"fallback"``.
        backend: Rasterizer: ``"torch"`` (pure PyTorch, CPU/GPU) or ``"gsplat"`` (CUDA).
        visibility: Pair lists of the inner solve: ``"per_step"`` (rebuilt at every iterate,
            as upstream rasterizers do; the energy jumps where Gaussians swap depth order) or
            ``"frozen"`` (those of ``theta0`` for the whole solve and its backward: a smooth
            energy with a reachable stationary point; torch backend only).
        sh_basis: SH basis: ``"auto"`` (from the adapter), ``"e3nn"`` or ``"3dgs"``.
        lambda_mode: ``"predicted"`` (uncertainty head) or ``"constant"``.
        constant_lambda: The Lambda value used when ``lambda_mode == "constant"``.
        head: Uncertainty-head settings.
        progress: Show a progress bar for the inner steps.
        optimize_pose: Refine context camera poses jointly (pose-free adapters only).
        point_depth_init: Upstream runs with *random* NoPoSplat weights only (plumbing checks):
            when > 0 the point heads' output bias is set so the untrained points lie this far
            in front of the reference camera (see ``adapters.noposplat.init_point_depth``);
            0 = off. Refused together with a checkpoint.
    """

    _PATH: ClassVar[str] = "diff3r"

    enabled: bool = True
    adapter: str = "auto"
    steps: int = field(default=2, metadata=_bound(ge=0))
    inner_solver: Literal["adam", "lm"] = "lm"
    stationarity_tol: float = field(default=1e-4, metadata=_bound(ge=0))
    lr: LearningRates = field(default_factory=LearningRates)
    means_lr_scale: Literal["scene_extent", "none"] = "scene_extent"
    lm_damping: float = field(default=3.0, metadata=_bound(gt=0))
    lm_pcg_iters: int = field(default=5, metadata=_bound(ge=1))
    lm_pcg_tol: float = field(default=1e-2, metadata=_bound(gt=0, lt=1))
    backward: Literal["implicit", "unroll"] = "implicit"
    hessian: Literal["gauss_newton", "exact"] = "gauss_newton"
    matvec: Literal["sparse", "autodiff", "finite_difference"] = "sparse"
    fd_eps: float = field(default=1e-3, metadata=_bound(gt=0))
    precond: Literal["block_jacobi", "jacobi", "none"] = "block_jacobi"
    precond_probes: int = field(default=8, metadata=_bound(ge=1))
    pcg_tol: float = field(default=1e-3, metadata=_bound(gt=0, lt=1))
    pcg_maxiter: int = field(default=10, metadata=_bound(ge=1))
    pcg_check_every: int = field(default=5, metadata=_bound(ge=1))
    robust: Literal["none", "huber"] = "none"
    huber_delta: float = field(default=0.1, metadata=_bound(gt=0))
    on_failure: Literal["raise", "warn", "fallback"] = "warn"
    backend: Literal["torch", "gsplat"] = "torch"
    visibility: Literal["per_step", "frozen"] = "per_step"
    sh_basis: Literal["auto", "e3nn", "3dgs"] = "auto"
    lambda_mode: Literal["predicted", "constant"] = "predicted"
    constant_lambda: float = field(default=1.0, metadata=_bound(gt=0))
    head: HeadConfig = field(default_factory=HeadConfig)
    progress: bool = False
    optimize_pose: bool = True
    point_depth_init: float = field(default=0.0, metadata=_bound(ge=0))

    def _check_cross_field(self, path: str) -> None:
        # The combinations no backend can run are errors here, at construction, instead of in
        # the forward or, worse, in the backward after a whole inner solve.
        self._resolve(self.backend, path)

    def _resolve(self, backend: str, path: str = "diff3r") -> tuple[Dict[str, str], List[str]]:
        """The single place of the backend rules: the settings to change and why (notes), or a
        ConfigError for a combination that cannot run on ``backend``."""
        if backend not in ("torch", "gsplat"):
            raise ConfigError(f"{path}.backend must be one of 'torch', 'gsplat'; got {backend!r}."
                              + _did_you_mean(str(backend), ["torch", "gsplat"]))
        changes: Dict[str, str] = {}
        notes: List[str] = []
        if backend != "torch":
            if self.hessian == "exact":
                raise ConfigError(
                    f"{path}.hessian='exact' needs the torch backend (double backward through the "
                    f"renderer); backend {backend!r} has a first-order backward only. Use "
                    f"{path}.hessian=gauss_newton with it.")
            if self.visibility == "frozen":
                raise ConfigError(
                    f"visibility='frozen' needs the torch backend (it holds the torch renderer's pair "
                    f"list fixed); backend {backend!r} sorts inside its own kernel. Use "
                    f"{path}.visibility=per_step with it.")
            if self.matvec != "finite_difference":
                changes["matvec"] = "finite_difference"
                notes.append(f"{path}.matvec={self.matvec!r} needs the torch renderer's forward-mode "
                             f"derivatives; backend {backend!r} uses 'finite_difference' products")
        matvec = changes.get("matvec", self.matvec)
        if self.precond == "block_jacobi" and (self.hessian != "gauss_newton" or matvec != "sparse"):
            changes["precond"] = "jacobi"
            why = "hessian='exact'" if self.hessian != "gauss_newton" else f"matvec={matvec!r}"
            notes.append(f"{path}.precond='block_jacobi' needs the explicit Gauss-Newton blocks "
                         f"(matvec='sparse', hessian='gauss_newton'); with {why} the diagonal "
                         "'jacobi' preconditioner is used")
        if backend != self.backend:
            changes["backend"] = backend
        return changes, notes

    def resolved(self, backend: Optional[str] = None) -> "Diff3RConfig":
        """The settings actually used on ``backend`` (default: ``self.backend``).

        Renderers other than the torch one have a first-order backward only, so their
        products are finite differences; block-Jacobi needs the explicit Gauss-Newton blocks
        (``matvec="sparse"``, ``hessian="gauss_newton"``) and is otherwise replaced by the
        diagonal Jacobi preconditioner. :meth:`resolution_notes` says what changed (the layer
        reports it in ``info.messages``); a combination that cannot run raises ConfigError.
        """
        changes, _ = self._resolve(self.backend if backend is None else backend)
        return dataclasses.replace(self, **changes) if changes else self

    def resolution_notes(self, backend: Optional[str] = None) -> List[str]:
        """Why :meth:`resolved` changed a setting on ``backend`` (empty when nothing changed)."""
        return self._resolve(self.backend if backend is None else backend)[1]


def require_head(lambda_mode: str, head: Any, who: str = "diff3r") -> None:
    """The rule "predicted Lambda needs an uncertainty head", as a ConfigError.

    Args:
        lambda_mode: ``"predicted"`` or ``"constant"`` (``Diff3RConfig.lambda_mode``).
        head: The uncertainty head, or None.
        who: Who asks (named in the message).
    """
    if lambda_mode == "predicted" and head is None:
        raise ConfigError(
            f"{who}: diff3r.lambda_mode='predicted' needs an uncertainty head, but none is attached; "
            "pass a head (e.g. head= to wrap_encoder) or set diff3r.lambda_mode=constant")


def load_from_hydra(cfg: Any) -> Optional[Diff3RConfig]:
    """Reads the ``diff3r`` node of a composed Hydra root config.

    Args:
        cfg: The root config as composed by ``@hydra.main``/``compose`` (a ``DictConfig``) or a
            plain dict.

    Returns:
        The validated :class:`Diff3RConfig`, or ``None`` if the root has no ``diff3r`` node
        (the plugin was not selected).

    Raises:
        ConfigError: If the node is invalid, or if ``optimizer`` was set to the string
            ``"diff3r"`` (a common mistake that replaces the upstream *training* optimizer).
    """
    node = cfg.get("diff3r") if cfg is not None else None
    if node is None:
        # `optimizer=diff3r` without a group selection overwrites the training optimizer with
        # a string; upstream's dacite would fail later with an obscure WrongTypeError.
        if cfg is not None and isinstance(cfg.get("optimizer"), str) and cfg.get("optimizer") == "diff3r":
            raise ConfigError(
                "optimizer='diff3r' replaced the upstream training optimizer with a string. Add "
                "'- optimizer: diff3r' to the defaults list of config/main.yaml (or pass "
                "'+optimizer=diff3r' on the command line) instead; the plugin's settings then "
                "appear under the top-level 'diff3r' key."
            )
        return None
    return Diff3RConfig.from_dict(node, path="diff3r")

