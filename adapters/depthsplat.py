"""DepthSplat (cvg/depthsplat): ``EncoderDepthSplat``, pose-given, SH degree 2, e3nn basis.

The encoder returns ``{"gaussians": Gaussians, "depths": [b, v, h, w]}`` (``return_depth: true``,
the default) or a bare ``Gaussians``. Only ``"gaussians"`` is replaced; every other entry of the
dict is passed through.

**Multi-scale training batch.** In training mode with ``num_scales > 1`` DepthSplat concatenates
the Gaussians of every depth prediction along the batch dimension: ``b * K`` rows, prediction
``k`` in rows ``k*b .. (k+1)*b`` (intermediate first, final last). ``predictions="final"`` (the
default) runs TTO on the last ``b`` rows only and passes the intermediate predictions through
unchanged (their upstream losses still train the encoder); ``predictions="each"`` runs TTO on
every prediction against the same context views (K times the cost). In eval mode only the final
prediction exists and both settings are the same.

The SH degree is read from ``encoder.cfg.gaussian_adapter.sh_degree`` (2 in
``config/model/encoder/depthsplat.yaml``), like every other adapter.
"""

from typing import Any, List, Optional, Sequence, Tuple

from diff3r_plugin.errors import ConfigError, ShapeError
from diff3r_plugin.layer.views import ContextViews

from .base import Adapter, RebuildFn
from .registry import register_adapter

__all__ = ["DepthSplatAdapter"]


@register_adapter("depthsplat")
class DepthSplatAdapter(Adapter):
    name = "depthsplat"
    sh_basis = "e3nn"
    pose_free = False
    default_sh_degree = 2
    encoder_class_patterns = (r"^EncoderDepthSplat$", r"DepthSplat")

    def __init__(self, background: Optional[Sequence[float]] = None, predictions: str = "final") -> None:
        super().__init__(background)
        if predictions not in ("final", "each"):
            raise ConfigError(f"depthsplat: predictions must be 'final' or 'each', got {predictions!r}")
        self.predictions = predictions

    def unwrap_output(self, output: Any) -> Tuple[Any, RebuildFn]:
        if isinstance(output, dict):
            if "gaussians" not in output:
                raise ShapeError(f"depthsplat: the encoder returned a dict without 'gaussians' "
                                 f"(keys: {sorted(output)})")

            def rebuild(gaussians: Any) -> Any:
                new = dict(output)
                new["gaussians"] = gaussians
                return type(output)(new) if type(output) is not dict else new

            return output["gaussians"], rebuild
        return output, lambda g: g

    def split_batch(self, gaussians: Any, views: ContextViews) -> List[Tuple[slice, ContextViews]]:
        gb, b = int(gaussians.means.shape[0]), views.batch
        if gb == b:
            return [(slice(0, b), views)]
        if b == 0 or gb % b:
            raise ShapeError(
                f"depthsplat: the encoder returned {gb} Gaussian scenes for {b} context scene(s); "
                "expected b or b * num_depth_preds (multi-scale training batch)")
        k = gb // b
        if self.predictions == "final":
            return [(slice((k - 1) * b, k * b), views)]
        return [(slice(i * b, (i + 1) * b), views) for i in range(k)]
