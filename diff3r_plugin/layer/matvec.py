"""Matrix-vector products with the Hessian of the inner objective.

``GaussNewtonAutodiff``: ``(J^T W J + diag(Lambda)) p`` with exact ``J p`` from forward-mode AD
(``torch.func.jvp``) and ``J^T u`` from one retained reverse-mode graph (``torch.func.vjp``),
both through the torch renderer with the pair list frozen at ``theta*``.

``GaussNewtonFiniteDifference``: for renderers with only a first-order backward (gsplat, the
upstream CUDA rasterizers): ``J p ~ (r(theta + e p) - r(theta - e p)) / (2 e)`` with ``e``
chosen so that ``||e p||_inf = fd_eps``, and ``J^T u`` by the renderer's backward.

``GaussNewtonSparse``: the same ``(J^T W J + diag(Lambda)) p`` from the explicit factored
Jacobian of :mod:`.sparse_jacobian` (gathers and scatter-adds over pixel-Gaussian pairs, about
ten times cheaper than a pass through the renderer), with the exact diagonal of ``J^T W J`` and
its exact per-Gaussian blocks for the (block-)Jacobi preconditioner.

``ExactHessian``: full ``nabla^2 E p`` by double backward (includes the residual-curvature
term that Gauss-Newton drops; exact implicit gradients even when context residuals do not
vanish at the optimum). Not guaranteed positive definite away from a minimum.

The others estimate ``diag(J^T W J)`` for the Jacobi preconditioner with Rademacher
probes ``z`` over the residuals: ``E[(J^T z)^2] = diag(J^T J)`` exactly, so every probe costs
one VJP and the estimate is never negative.
"""

import torch
from torch import Tensor

from .objective import Objective
from .sparse_jacobian import SparseJacobian, block_preconditioner
from .views import ContextViews


class _Base:
    name = "base"

    def __init__(self, objective: Objective, theta: Tensor, theta0: Tensor, lam: Tensor):
        self.objective = objective
        self.theta = theta.detach()
        self.theta0 = theta0.detach()
        self.lam = lam.detach()
        self.sqrt_w = objective.pixel_weights(self.theta)
        self._cache: dict = {}
        self._last_idx: Tensor | None = None
        self._last_key: tuple = ()
        self.num_matvecs = 0

    def _subset(self, idx: Tensor):
        # PCG passes the same index tensor until its active set changes: recognise it by
        # identity so that an iteration does not read the indices back to the host.
        if idx is self._last_idx:
            return self._cache[self._last_key]
        key = tuple(idx.tolist())
        self._last_idx, self._last_key = idx, key
        if key not in self._cache:
            self._cache.clear()  # the active set only shrinks; keep one entry
            views = self.objective.views.select(idx)
            sqrt_w = None if self.sqrt_w is None else self.sqrt_w.index_select(0, idx)
            self._cache[key] = self._prepare(idx, views, sqrt_w)
        return self._cache[key]

    def _prepare(self, idx, views, sqrt_w):
        raise NotImplementedError

    def __call__(self, p: Tensor, idx: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.gn(p, idx) + self.lam.index_select(0, idx) * p

    def jtj_diag(self, probes: int, generator: torch.Generator | None = None) -> Tensor:
        """Unbiased, non-negative estimate of ``diag(J^T W J)`` (``[b, n]``)."""
        idx = torch.arange(self.theta.shape[0], device=self.theta.device)
        acc = torch.zeros_like(self.theta)
        for _ in range(probes):
            z = self._rademacher(idx, generator)
            acc += self.jt(z, idx) ** 2
        return acc / probes


class GaussNewtonAutodiff(_Base):
    name = "autodiff"

    def _prepare(self, idx, views: ContextViews, sqrt_w):
        theta = self.theta.index_select(0, idx)
        plan = self.objective.make_plan(theta, views, idx)

        def res(t):
            return self.objective.residual(t, views, plan, sqrt_w)

        r0, vjp_fn = torch.func.vjp(res, theta)
        return res, theta, vjp_fn, r0.shape

    def jvp(self, p: Tensor, idx: Tensor) -> Tensor:
        res, theta = self._subset(idx)[:2]
        return torch.func.jvp(res, (theta,), (p,))[1]

    def jt(self, u: Tensor, idx: Tensor) -> Tensor:
        vjp_fn = self._subset(idx)[2]
        return vjp_fn(u)[0]

    def gn(self, p: Tensor, idx: Tensor) -> Tensor:
        with torch.enable_grad():
            return self.jt(self.jvp(p, idx), idx)

    def _rademacher(self, idx, generator):
        shape = self._subset(idx)[3]
        z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(self.theta)
        return 2 * z - 1


class GaussNewtonSparse(_Base):
    name = "sparse"

    def __init__(self, objective: Objective, theta: Tensor, theta0: Tensor, lam: Tensor,
                 jacobian: SparseJacobian | None = None):
        super().__init__(objective, theta, theta0, lam)
        self._all = torch.arange(self.theta.shape[0], device=self.theta.device)
        if jacobian is not None:
            self._cache[tuple(range(self.theta.shape[0]))] = jacobian

    def full(self) -> SparseJacobian:
        """The Jacobian of the whole batch."""
        return self._subset(self._all)

    def _prepare(self, idx, views: ContextViews, sqrt_w):
        theta = self.theta.index_select(0, idx)
        plan = self.objective.make_plan(theta, views, idx)
        with torch.no_grad():
            return SparseJacobian.build(theta, self.objective.layout, views, plan, sqrt_w)

    def jvp(self, p: Tensor, idx: Tensor) -> Tensor:
        return self._subset(idx).jvp(p)

    def jt(self, u: Tensor, idx: Tensor) -> Tensor:
        return self._subset(idx).vjp(u)

    def gn(self, p: Tensor, idx: Tensor) -> Tensor:
        return self._subset(idx).gauss_newton(p)

    def jtj_diag(self, probes: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """The exact ``diag(J^T W J)`` (no probes needed)."""
        return self.full().diagonal()

    def block_preconditioner(self, extra: Tensor, diag: Tensor | None = None):
        """Block-Jacobi ``M^-1`` for ``J^T W J + diag(extra)``: exact per-Gaussian blocks."""
        sj = self.full()
        blocks = sj.block_diagonal()
        slots = sj.slots
        if diag is None:
            diag = sj.diagonal(blocks=blocks) + extra
        blocks = blocks + torch.diag_embed(extra[:, slots])
        return block_preconditioner(blocks, diag, slots)


class GaussNewtonFiniteDifference(_Base):
    name = "finite_difference"

    def __init__(self, objective, theta, theta0, lam, fd_eps: float = 1e-3):
        super().__init__(objective, theta, theta0, lam)
        self.fd_eps = fd_eps

    def _prepare(self, idx, views, sqrt_w):
        theta = self.theta.index_select(0, idx).requires_grad_(True)
        with torch.enable_grad():
            r = self.objective.residual(theta, views, None, sqrt_w, idx)
        return views, sqrt_w, theta, r

    def jvp(self, p: Tensor, idx: Tensor) -> Tensor:
        views, sqrt_w, theta, _ = self._subset(idx)
        size = p.abs().amax(1, keepdim=True)
        eps = self.fd_eps / torch.where(size > 0, size, torch.ones_like(size))
        with torch.no_grad():
            plus = self.objective.residual(theta.detach() + eps * p, views, None, sqrt_w, idx)
            minus = self.objective.residual(theta.detach() - eps * p, views, None, sqrt_w, idx)
        return (plus - minus) / (2 * eps)

    def jt(self, u: Tensor, idx: Tensor) -> Tensor:
        _, _, theta, r = self._subset(idx)
        with torch.enable_grad():
            return torch.autograd.grad(r, theta, u, retain_graph=True)[0]

    def gn(self, p: Tensor, idx: Tensor) -> Tensor:
        return self.jt(self.jvp(p, idx), idx)

    def _rademacher(self, idx, generator):
        _, _, _, r = self._subset(idx)
        z = torch.randint(0, 2, r.shape, generator=generator, dtype=torch.int8).to(self.theta)
        return 2 * z - 1


class ExactHessian(GaussNewtonAutodiff):
    name = "exact"

    def _prepare(self, idx, views, sqrt_w):
        out = super()._prepare(idx, views, sqrt_w)
        res = out[0]
        theta = self.theta.index_select(0, idx).detach().requires_grad_(True)
        with torch.enable_grad():
            r = res(theta)
            grad = torch.autograd.grad(0.5 * (r * r).sum(), theta, create_graph=True)[0]
        return out + (theta, grad)

    def gn(self, p: Tensor, idx: Tensor) -> Tensor:
        *_, theta, grad = self._subset(idx)
        with torch.enable_grad():
            return torch.autograd.grad(grad, theta, p, retain_graph=True)[0]


def make_matvec(kind: str, hessian: str, objective: Objective, theta: Tensor, theta0: Tensor,
                lam: Tensor, fd_eps: float):
    if hessian == "exact":
        if objective.backend != "torch":
            raise ValueError("hessian='exact' needs the torch backend (double backward)")
        return ExactHessian(objective, theta, theta0, lam)
    if kind == "sparse":
        if objective.backend != "torch":
            raise ValueError("matvec='sparse' needs the torch backend; use matvec='finite_difference'")
        return GaussNewtonSparse(objective, theta, theta0, lam)
    if kind == "autodiff":
        if objective.backend != "torch":
            raise ValueError("matvec='autodiff' needs the torch backend; use matvec='finite_difference'")
        return GaussNewtonAutodiff(objective, theta, theta0, lam)
    if kind == "finite_difference":
        return GaussNewtonFiniteDifference(objective, theta, theta0, lam, fd_eps)
    raise ValueError(f"unknown matvec {kind!r}")
