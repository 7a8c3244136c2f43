"""The inner objective and its residuals.

    E(theta) = 1/2 sum_k w_k r_k(theta)^2 + 1/2 (theta - theta0)^T diag(Lambda) (theta - theta0)

with ``r = render(theta) - image`` over all context views, pixels and channels (a sum, not a
mean, so that ``J^T J`` of one Gaussian does not shrink with the image size), ``w_k`` optional
pixel weights times, with ``robust="huber"``, Huber IRLS weights ``min(1, delta / |r_k|)``
computed once at ``theta0`` (:meth:`Objective.freeze_weights`) and then held fixed, so that the
forward solve and the implicit backward see the same weighted least-squares problem.

Visibility. By default (``visibility="per_step"``) every render builds its pair list (which
Gaussians cover which pixel, front to back) at the parameters it renders, as the upstream
rasterizers do, so ``E`` jumps where two overlapping Gaussians swap depth order or a pair
crosses ``alpha = 1/255``. With ``visibility="frozen"`` (:meth:`Objective.freeze_visibility`,
torch backend) every pair list is the one of ``theta0``: ``E`` is then smooth in ``theta`` (the
pairs' alphas, colours and transmittances still move; only membership and order are held), so
the inner solve can reach a stationary point and the implicit gradient is the derivative of
that smooth problem. The price is a stale visibility where the solve moves Gaussians through
each other; :attr:`Diff3RInfo.stale_order_pixels` reports how many pixels that is at ``theta*``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import Diff3RConfig
from ..gaussians.layout import GaussianLayout, GaussianParams
from ..render.api import pose_adjusted_extrinsics, render
from ..render.common import _broadcast_background, project
from ..render.torch_backend import PairPlan, build_plan, composite
from .views import ContextViews


@dataclass
class Objective:
    views: ContextViews
    layout: GaussianLayout
    backend: str = "torch"
    robust: str = "none"
    huber_delta: float = 0.1
    frozen_sqrt_w: Tensor | None = None
    visibility_theta: Tensor | None = None  # frozen visibility: every pair list is built here

    def __post_init__(self) -> None:
        # Frozen visibility: the whole batch's pair list of theta0, built once per dtype/device.
        self._frozen_plans: dict = {}

    @classmethod
    def for_layer(cls, views: ContextViews, layout: GaussianLayout, config, theta0: Tensor,
                  backend: str | None = None) -> "Objective":
        """The objective the layer solves for ``config`` (a :class:`Diff3RConfig`): detached
        views in ``theta0``'s dtype, residual weights frozen at ``theta0``."""
        obj = cls(views.detached().to(theta0.dtype), layout, backend or config.backend, config.robust,
                  config.huber_delta)
        obj.freeze_weights(theta0.detach())
        if config.visibility == "frozen":
            obj.freeze_visibility(theta0)
        return obj

    def freeze_visibility(self, theta0: Tensor) -> None:
        """Build every pair list at ``theta0`` from now on (a smooth energy, see the module doc)."""
        # The configuration rule (one place) says which backends can hold the pair list.
        Diff3RConfig(visibility="frozen", backend="torch")._resolve(self.backend)
        self.visibility_theta = theta0.detach().clone()

    def _plan_source(self, theta: Tensor, views: ContextViews, idx: Tensor | None) -> Tensor:
        """The parameters a pair list is built at: ``theta``, or ``theta0``'s rows when frozen."""
        src = self.visibility_theta
        if src is None:
            return theta
        if idx is not None:
            src = src.index_select(0, idx)
        elif views.batch != src.shape[0]:
            raise ValueError(f"frozen visibility: a subset of {views.batch} of {src.shape[0]} scenes "
                             "needs their indices (idx) to find their pair lists")
        return src.to(theta.dtype)

    def freeze_weights(self, theta0: Tensor) -> None:
        """Fix the residual weights (Huber IRLS at ``theta0``) for the forward and the backward."""
        self.frozen_sqrt_w = None
        self.frozen_sqrt_w = self.pixel_weights(theta0.detach())

    def _gaussians(self, theta: Tensor, views: ContextViews):
        params = GaussianParams.unflatten(theta, self.layout)
        extr = pose_adjusted_extrinsics(params, views.extrinsics)
        return params, extr

    def make_plan(self, theta: Tensor, views: ContextViews | None = None,
                  idx: Tensor | None = None) -> PairPlan:
        """Pair list at ``theta`` (torch backend), reused for exact derivatives at ``theta``; with
        frozen visibility the pair list of ``theta0`` (rows ``idx`` when ``views`` is a subset)."""
        whole = self.visibility_theta is not None and idx is None and (views is None or views is self.views)
        key = (theta.dtype, theta.device)
        if whole and key in self._frozen_plans:
            return self._frozen_plans[key]
        views = self.views if views is None else views
        theta = self._plan_source(theta, views, idx)
        with torch.no_grad():
            params, extr = self._gaussians(theta.detach(), views)
            proj = project(params.means, params.covariances(), params.harmonics, params.opacities(),
                           extr, views.intrinsics, views.near, views.image_shape, views.sh_basis)
            plan = build_plan(proj, views.image_shape)
        if whole:
            self._frozen_plans[key] = plan
        return plan

    def render(self, theta: Tensor, views: ContextViews | None = None, plan: PairPlan | None = None,
               idx: Tensor | None = None) -> Tensor:
        """Context renders ``[b, v, 3, h, w]``; with ``plan`` the pair list is held fixed."""
        views = self.views if views is None else views
        if plan is None and self.visibility_theta is not None:
            plan = self.make_plan(theta, views, idx)
        params, extr = self._gaussians(theta, views)
        if plan is None or self.backend != "torch":
            return render(params.means, params.covariances(), params.harmonics, params.opacities(),
                          extr, views.intrinsics, views.near, views.far, views.image_shape,
                          views.background, sh_basis=views.sh_basis, backend=self.backend,
                          validate=False).color
        proj = project(params.means, params.covariances(), params.harmonics, params.opacities(),
                       extr, views.intrinsics, views.near, views.image_shape, views.sh_basis)
        bg = _broadcast_background(views.background, views.batch, views.num_views, theta)
        return composite(proj, plan, views.image_shape, bg).color

    def pixel_weights(self, theta: Tensor, views: ContextViews | None = None) -> Tensor | None:
        """Square roots of the (frozen) residual weights at ``theta``, or None for plain L2."""
        if self.frozen_sqrt_w is not None and views is None:
            return self.frozen_sqrt_w
        views = self.views if views is None else views
        w = views.weights
        if self.robust == "huber":
            with torch.no_grad():
                r = (self.render(theta.detach(), views) - views.images).abs()
                irls = torch.clamp(self.huber_delta / r.clamp_min(1e-12), max=1.0)
            w = irls if w is None else w * irls
        return None if w is None else w.sqrt()

    def residual(self, theta: Tensor, views: ContextViews | None = None, plan: PairPlan | None = None,
                 sqrt_w: Tensor | None = None, idx: Tensor | None = None) -> Tensor:
        """Flat residuals ``[b, m]`` (``idx``: the scenes of a subset ``views``)."""
        views = self.views if views is None else views
        r = self.render(theta, views, plan, idx) - views.images
        if sqrt_w is not None:
            r = r * sqrt_w
        return r.reshape(r.shape[0], -1)

    def energy(self, theta: Tensor, theta0: Tensor, lam: Tensor, views: ContextViews | None = None,
               sqrt_w: Tensor | None = None) -> Tensor:
        """Per-scene energy ``[b]``."""
        r = self.residual(theta, views, sqrt_w=sqrt_w)
        d = theta - theta0
        return 0.5 * (r * r).sum(1) + 0.5 * (lam * d * d).sum(1)
