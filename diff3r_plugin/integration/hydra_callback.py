"""The Hydra callback that makes ``+optimizer=diff3r`` alone train an upstream repo through Diff3R.

The option file ``configs/optimizer/diff3r.yaml`` declares, through its defaults list, the
``_global_`` entry ``configs/diff3r_hydra/callbacks.yaml``, which registers
:class:`Diff3RCallback` under ``hydra.callbacks.diff3r`` (next to any callbacks the user has).
Nothing in upstream code changes.

Why the class is hooked: ``python -m src.main`` runs ``src/main.py`` as ``__main__``, and
``get_encoder`` is a name bound in it at import time, so patching ``src.main.get_encoder`` (a
different module object) or ``src.model.encoder.get_encoder`` after the fact has no effect. The
``ModelWrapper`` *class*, in contrast, is one object shared by every importer. In
``on_job_start`` (Hydra >= 1.3; the ``task_function`` argument is not used) the callback wraps
``ModelWrapper.__init__``, ``configure_optimizers``, ``on_train_batch_end`` and
``on_save_checkpoint`` and adds a ``load_state_dict`` pre-hook to every instance, so that for each
LightningModule upstream builds:

* ``module.encoder`` (the instance) is wrapped in place by the adapter (``diff3r.adapter`` or
  auto-detected): its ``state_dict`` keys are unchanged;
* the uncertainty head becomes the registered submodule ``module.diff3r_head``: it is in
  ``module.parameters()`` (so DDP synchronizes its gradients like any other parameter) and in
  every Lightning checkpoint (keys ``diff3r_head.*``);
* ``configure_optimizers`` still builds upstream's optimizer and scheduler; the head's
  parameters are then moved into the parameter group with the largest base learning rate
  (NoPoSplat: the group of its new heads, not the backbone group at ``lr x
  backbone_lr_multiplier``; MVSplat / pixelSplat / DepthSplat: their single group);
* a checkpoint without head keys (every released upstream checkpoint) loads through upstream's
  strict paths (``load_from_checkpoint(..., strict=True)``, ``ckpt_path``,
  ``load_state_dict``): the missing keys are filled from the freshly initialized head and a log
  line says so;
* validation and test steps call the same wrapped encoder, so upstream's own metrics are
  computed on theta* (the layer leaves Lightning's inference mode for its inner solve);
* with ``diff3r.enabled=false`` nothing is wrapped and no head is added: upstream runs as
  before (the losses are still recorded in the report).

The record ``diff3r_report.json`` (see :class:`Diff3RRun.report`) is written into the Hydra
output directory at every checkpoint and at the end of the job (DDP ranks other than 0 write
``diff3r_report.rank<r>.json``).
"""

import hashlib
import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..config import Diff3RConfig, load_from_hydra
from ..errors import ConfigError, Diff3RError, IntegrationError

try:  # Hydra >= 1.1; older versions have no callbacks at all (checked in on_job_start)
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]

__all__ = ["Diff3RCallback", "Diff3RRun", "JobStartError", "MIN_HYDRA", "REPORT_NAME", "hook_model_wrapper",
           "resolve_adapter", "wrap_from_hydra"]

log = logging.getLogger(__name__)

#: Oldest Hydra whose callbacks fire ``on_job_start`` as relied on here.
MIN_HYDRA = (1, 3)
#: File name of the record written into the Hydra output directory.
REPORT_NAME = "diff3r_report.json"
#: Where upstream keeps its LightningModule (all four repos).
DEFAULT_MODEL_WRAPPER = "src.model.model_wrapper.ModelWrapper"
#: Name of the head as a submodule of the LightningModule (its checkpoint key prefix).
HEAD_ATTR = "diff3r_head"
#: The LightningModule methods wrapped while a job runs.
_HOOKED = ("__init__", "configure_optimizers", "on_train_batch_end", "on_save_checkpoint")


# --------------------------------------------------------------------------------------------
# Wrapping an encoder from the composed config


def resolve_adapter(encoder: nn.Module, name: str = "auto", **adapter_kwargs: Any) -> Any:
    """An adapter instance: by registered ``name``, or detected from the encoder class name.

    Raises:
        UnknownAdapterError: If ``name`` is not registered, or (``"auto"``) no adapter
            recognizes the encoder class; the message lists the known adapters.
    """
    from diff3r_plugin.adapters import detect_adapter, get_adapter

    key = detect_adapter(encoder) if name in (None, "auto") else name
    factory = get_adapter(key)
    return factory(**adapter_kwargs)


def _background_from_cfg(cfg: Any) -> Optional[Sequence[float]]:
    """``model.decoder.background_color`` (NoPoSplat) or ``dataset.background_color`` (the others)."""
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
# One job's hooks and record


def _checkpoint_requested(cfg: Any) -> List[str]:
    """Config keys that load trained weights into the model (each repo names its own)."""
    found = []
    for path in (("checkpointing", "load"), ("checkpointing", "pretrained_model"),
                 ("model", "encoder", "pretrained_weights")):
        node = cfg
        for key in path:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                break
        if node:
            found.append(".".join(path))
    return found


def _mean(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        values = [v for v in (_mean(x) for x in value) if v is not None]
        return sum(values) / len(values) if values else None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    return float(value)


def _loss_value(outputs: Any) -> Optional[float]:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    if isinstance(outputs, (int, float)):
        return float(outputs)
    return None


def _optimizers(result: Any) -> List[torch.optim.Optimizer]:
    """The optimizers in any of the forms ``configure_optimizers`` may return."""
    if isinstance(result, torch.optim.Optimizer):
        return [result]
    if isinstance(result, Mapping):
        return _optimizers(result.get("optimizer"))
    if isinstance(result, (list, tuple)):
        return [o for item in result for o in _optimizers(item)]
    return []


def _base_lr(group: Mapping[str, Any]) -> float:
    """A group's learning rate before any schedule (schedulers rewrite ``lr`` when created)."""
    for key in ("max_lr", "initial_lr", "lr"):  # OneCycleLR, other schedulers, none
        if key in group:
            return float(group[key])
    return 0.0


def _digest(module: Optional[nn.Module]) -> Optional[str]:
    """A hash of the parameter values (equal on DDP ranks exactly when the values are)."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Diff3RRun:
    """What the callback installs for one job, and the record it keeps.

    Args:
        cfg: The composed root config of the job.
        config: Its validated ``diff3r`` node.
        output_dir: Where ``diff3r_report.json`` goes (the Hydra output directory).
    """

    def __init__(self, cfg: Any, config: Diff3RConfig, output_dir: Optional[Path]) -> None:
        self.cfg = cfg
        self.config = config
        self.output_dir = output_dir
        self.cls: Optional[type] = None
        self.saved: Dict[str, Any] = {}
        self.modules: List[nn.Module] = []
        self.rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        self.record: Dict[str, Any] = {
            "wrapped": False, "enabled": config.enabled, "adapter": None, "encoder_class": None,
            "lambda_mode": config.lambda_mode, "head_parameters": 0, "head_in_optimizer": False,
            "head_lr": None, "train_steps": 0, "losses": [], "stationarity": [], "pcg_rel_residual": [],
            "loaded_checkpoint_had_head": None, "state_dict_keys_unchanged": None,
            "point_depth_init": config.point_depth_init or None, "head_digest_initial": None,
            "head_digest": None, "rank": self.rank, "checkpoints": 0, "tto_calls": 0,
        }

    # ------------------------------------------------------------------ class hooks
    def install(self, cls: type) -> None:
        """Wrap the methods of ``cls`` listed in ``_HOOKED``; :meth:`uninstall` restores them."""
        if getattr(cls, "_diff3r_hooked", False):
            raise IntegrationError(f"{cls.__module__}.{cls.__qualname__} is already hooked by diff3r; "
                                   "two Diff3R callbacks in one job?")
        self.cls = cls
        run = self
        originals = {name: getattr(cls, name) for name in _HOOKED}
        self.saved = {name: cls.__dict__[name] for name in _HOOKED if name in cls.__dict__}

        def __init__(module: Any, *args: Any, **kwargs: Any) -> None:
            originals["__init__"](module, *args, **kwargs)
            run.attach(module)

        def configure_optimizers(module: Any) -> Any:
            result = originals["configure_optimizers"](module)
            run.place_head(module, result)
            return result

        def on_train_batch_end(module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> Any:
            out = originals["on_train_batch_end"](module, outputs, batch, batch_idx, *args)
            run.record_step(module, outputs)
            return out

        def on_save_checkpoint(module: Any, checkpoint: Dict[str, Any]) -> Any:
            out = originals["on_save_checkpoint"](module, checkpoint)
            run.record["checkpoints"] += 1
            checkpoint["diff3r"] = run.report(module)
            run.write_report(module)
            return out

        for fn, name in ((__init__, "__init__"), (configure_optimizers, "configure_optimizers"),
                         (on_train_batch_end, "on_train_batch_end"), (on_save_checkpoint, "on_save_checkpoint")):
            fn.__wrapped__ = originals[name]  # type: ignore[attr-defined]
            fn.__doc__ = getattr(originals[name], "__doc__", None)
            setattr(cls, name, fn)
        cls._diff3r_hooked = True  # type: ignore[attr-defined]
        log.info("diff3r: hooked %s.%s (encoder wrapping, head in the optimizer and checkpoints)",
                 cls.__module__, cls.__qualname__)

    def uninstall(self) -> None:
        cls = self.cls
        if cls is None:
            return
        for name in _HOOKED:
            if name in self.saved:
                setattr(cls, name, self.saved[name])
            elif name in cls.__dict__:
                delattr(cls, name)
        if "_diff3r_hooked" in cls.__dict__:
            delattr(cls, "_diff3r_hooked")
        self.cls = None

    # ------------------------------------------------------------------ per instance
    def attach(self, module: nn.Module) -> None:
        """Wrap ``module.encoder`` and register the head on ``module`` (diff3r.enabled only)."""
        encoder = getattr(module, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise IntegrationError(
                f"diff3r: {type(module).__qualname__} has no 'encoder' module attribute (found "
                f"{type(encoder).__name__}); expected upstream's ModelWrapper, which stores the encoder "
                "instance as self.encoder")
        module._register_load_state_dict_pre_hook(self._fill_head_keys, with_module=True)
        self.modules.append(module)
        self.record["encoder_class"] = f"{type(encoder).__module__}.{type(encoder).__qualname__}"
        if not self.config.enabled:
            log.info("diff3r: diff3r.enabled=false; %s is left unwrapped", type(encoder).__name__)
            return
        if not hasattr(encoder, "diff3r"):  # one encoder may serve several wrappers
            if self.config.point_depth_init:
                from diff3r_plugin.adapters.noposplat import init_point_depth

                changed = init_point_depth(encoder, self.config.point_depth_init)
                log.info("diff3r: point_depth_init=%g set %s (random-weight plumbing run)",
                         self.config.point_depth_init, ", ".join(changed))
            keys = list(encoder.state_dict())
            wrap_from_hydra(self.cfg, encoder)  # the adapter logs what it did
            self.record["state_dict_keys_unchanged"] = list(encoder.state_dict()) == keys
        head = getattr(encoder, "diff3r_head", None)
        if head is not None:
            setattr(module, HEAD_ATTR, head)  # a registered child: parameters(), DDP, checkpoints
            self.record["head_digest_initial"] = _digest(head)
            log.info("diff3r: the uncertainty head is registered as %s.%s (trained, synchronized and "
                     "checkpointed with it)", type(module).__qualname__, HEAD_ATTR)
        self.record.update(wrapped=True, adapter=encoder.diff3r.adapter.name,
                           head_parameters=0 if head is None else sum(p.numel() for p in head.parameters()))

    def _fill_head_keys(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: a checkpoint without head keys keeps the fresh head.

        ``state_dict`` is ``load_state_dict``'s own copy of the caller's mapping, so adding or
        removing keys here does not touch the checkpoint the caller holds.
        """
        head_prefix = f"{prefix}{HEAD_ATTR}."
        had = any(k.startswith(head_prefix) for k in state_dict)
        head = getattr(module, HEAD_ATTR, None)
        self.record["loaded_checkpoint_had_head"] = had
        if head is None:
            if had:  # diff3r.enabled=false (or a constant Lambda) reading a Diff3R checkpoint
                for k in [k for k in state_dict if k.startswith(head_prefix)]:
                    del state_dict[k]
                log.info("diff3r: the checkpoint holds an uncertainty head; this run has none, it is ignored")
            return
        if had:
            log.info("diff3r: the checkpoint holds the uncertainty head; it is restored")
            return
        for k, v in head.state_dict().items():
            state_dict[head_prefix + k] = v
        log.info("diff3r: the checkpoint has no uncertainty-head keys (%s*): starting from a freshly "
                 "initialized head", head_prefix)

    def place_head(self, module: nn.Module, result: Any) -> None:
        """Move the head's parameters into the optimizer group with the largest base lr."""
        head = getattr(module, HEAD_ATTR, None)
        optimizers = _optimizers(result)
        if head is None:
            return
        params = [p for p in head.parameters() if p.requires_grad]
        if not optimizers:
            raise IntegrationError(
                f"diff3r: {type(module).__qualname__}.configure_optimizers returned {type(result).__name__}, "
                "in which no torch optimizer was found; the uncertainty head cannot be trained")
        ids = {id(p) for p in params}
        opt = optimizers[0]
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        target = max(opt.param_groups, key=_base_lr)
        target["params"].extend(params)
        in_opt = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        self.record["head_in_optimizer"] = bool(params) and all(id(p) in in_opt for p in params)
        self.record["head_lr"] = _base_lr(target)
        log.info("diff3r: %d head parameter tensors trained in the optimizer group with base lr %g "
                 "(of %d group(s))", len(params), self.record["head_lr"], len(opt.param_groups))

    def record_step(self, module: nn.Module, outputs: Any) -> None:
        """After each training batch: the outer loss and the layer's diagnostics."""
        self._update_rank(module)
        self.record["train_steps"] += 1
        self.record["losses"].append(_loss_value(outputs))
        state = getattr(getattr(module, "encoder", None), "diff3r", None)
        self.record["tto_calls"] = getattr(state, "calls", 0)
        info = getattr(state, "last_info", None) if self.config.enabled else None
        infos = info if isinstance(info, list) else [info]
        self.record["stationarity"].append(_mean([getattr(i, "stationarity", None) for i in infos]))
        self.record["pcg_rel_residual"].append(_mean([getattr(i, "pcg_rel_residual", None) for i in infos]))

    def _update_rank(self, module: nn.Module) -> None:
        try:
            self.rank = int(module.global_rank)
        except Exception:  # not attached to a trainer
            pass
        self.record["rank"] = self.rank

    # ------------------------------------------------------------------ report
    def report(self, module: Optional[nn.Module] = None) -> Dict[str, Any]:
        """The record: ``wrapped``, ``adapter``, ``head_parameters``, ``head_in_optimizer``,
        ``train_steps``, ``losses`` (outer loss per training step), ``stationarity`` and
        ``pcg_rel_residual`` (per step, mean over the batch), ``loaded_checkpoint_had_head``, and
        extras (``head_digest``: a hash of the head's values, equal across DDP ranks)."""
        module = module if module is not None else (self.modules[-1] if self.modules else None)
        head = getattr(module, HEAD_ATTR, None) if module is not None else None
        out = dict(self.record)
        out["head_digest"] = _digest(head)
        state = getattr(getattr(module, "encoder", None), "diff3r", None)
        out["tto_calls"] = getattr(state, "calls", 0)
        out["losses_finite"] = bool(out["losses"]) and all(
            x is not None and math.isfinite(x) for x in out["losses"])
        return json.loads(json.dumps(out, default=str))

    def report_path(self) -> Optional[Path]:
        if self.output_dir is None:
            return None
        name = REPORT_NAME if self.rank == 0 else REPORT_NAME.replace(".json", f".rank{self.rank}.json")
        return self.output_dir / name

    def write_report(self, module: Optional[nn.Module] = None) -> Optional[Path]:
        if module is not None:
            self._update_rank(module)
        path = self.report_path()
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(module), indent=2) + "\n")
        return path


#: The run of the current job (one per process).
_ACTIVE: Optional[Diff3RRun] = None


def _import_object(path: str) -> Any:
    """``package.module.Name`` -> the object (the module taken from ``sys.modules`` when loaded)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise IntegrationError(f"diff3r: {path!r} is not a dotted path 'package.module.Class'")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise IntegrationError(
                f"diff3r: cannot import {module_name!r} to hook its {attr!r} ({type(exc).__name__}: {exc}). "
                f"Expected the upstream LightningModule at {path!r} (run from the upstream repository "
                "root, or set hydra.callbacks.diff3r.model_wrapper=<module.Class>)") from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, type):
        raise IntegrationError(
            f"diff3r: {module_name!r} has no class {attr!r} (found {type(obj).__name__}); expected the "
            "upstream LightningModule (set hydra.callbacks.diff3r.model_wrapper=<module.Class>)")
    return obj


def hook_model_wrapper(cfg: Any, model_wrapper: str = DEFAULT_MODEL_WRAPPER,
                       output_dir: Optional[Path] = None) -> Optional[Diff3RRun]:
    """Validate the ``diff3r`` node and hook the LightningModule class ``model_wrapper``.

    Returns the :class:`Diff3RRun` (also kept as the process's active run), or None when the
    config has no ``diff3r`` node.

    Raises:
        ConfigError: On an invalid ``diff3r`` node, or ``diff3r.point_depth_init`` together
            with a checkpoint.
        UnknownAdapterError: If ``diff3r.adapter`` names no registered adapter.
        IntegrationError: If the class cannot be found.
    """
    global _ACTIVE
    config = load_from_hydra(cfg)
    if config is None:
        return None
    if config.enabled and config.adapter != "auto":
        from diff3r_plugin.adapters import get_adapter

        get_adapter(config.adapter)  # UnknownAdapterError at job start, with the known names
    if config.point_depth_init:
        loads = _checkpoint_requested(cfg)
        if loads:
            raise ConfigError(
                f"diff3r.point_depth_init={config.point_depth_init:g} moves NoPoSplat's untrained points "
                f"for random-weight plumbing runs; it is refused together with a checkpoint ({', '.join(loads)} "
                "is set). Drop one of the two.")
    cls = _import_object(model_wrapper)
    if _ACTIVE is not None:
        _ACTIVE.uninstall()
    run = Diff3RRun(cfg, config, output_dir)
    run.install(cls)
    _ACTIVE = run
    return run


def _hydra_version() -> tuple:
    import hydra

    parts = []
    for piece in str(getattr(hydra, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class JobStartError(SystemExit):
    """Ends the job when the callback cannot do its work at job start.

    Hydra turns any ``Exception`` raised by a callback into a warning and runs the job anyway,
    which here would be a silently unwrapped run. ``SystemExit`` is not an ``Exception``, so it
    ends the process (exit status 2) after the typed error has been printed.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(2)
        self.error = error


class Diff3RCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (``hydra.callbacks.diff3r``) that wires Diff3R into upstream training.

    Errors at job start (an invalid ``diff3r`` node, an unregistered ``diff3r.adapter``, a
    ``ModelWrapper`` that cannot be found, a Hydra that is too old) end the job with the typed
    error's message (:class:`JobStartError`) instead of letting upstream train unwrapped.

    Args:
        model_wrapper: Dotted path of the upstream LightningModule class to hook.
        report: Write ``diff3r_report.json`` into the Hydra output directory.
    """

    def __init__(self, model_wrapper: str = DEFAULT_MODEL_WRAPPER, report: bool = True) -> None:
        self.model_wrapper = model_wrapper
        self.write = report
        self.run: Optional[Diff3RRun] = None

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        try:
            self.start(config)
        except Diff3RError as error:
            print(f"diff3r: the job cannot start: {type(error).__name__}: {error}", file=sys.stderr)
            raise JobStartError(error) from error

    def start(self, config: Any) -> None:
        """What :meth:`on_job_start` does; raises the typed errors (for callers other than Hydra)."""
        version = _hydra_version()
        if version < MIN_HYDRA:
            raise IntegrationError(
                f"diff3r: hydra-core {'.'.join(map(str, version))} is too old; the Diff3R callback needs "
                f"hydra-core >= {'.'.join(map(str, MIN_HYDRA))} (pip install 'hydra-core>=1.3')")
        output_dir = None
        if self.write:
            from hydra.core.hydra_config import HydraConfig

            output_dir = Path(HydraConfig.get().runtime.output_dir)
        self.run = hook_model_wrapper(config, self.model_wrapper, output_dir)

    def on_job_end(self, config: Any = None, job_return: Any = None, **kwargs: Any) -> None:
        global _ACTIVE
        run = self.run
        if run is None:
            return
        try:
            path = run.write_report()
            if path is not None:
                log.info("diff3r: report written to %s", path)
        finally:
            run.uninstall()
            if _ACTIVE is run:
                _ACTIVE = None
            self.run = None
