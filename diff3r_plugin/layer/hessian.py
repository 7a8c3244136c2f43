"""The Hessian operator of the inner objective at one linearization point.

    H = A + diag(Lambda) + mu diag(D),   D = diag(A) + Lambda

with ``A = J^T W J`` (Gauss-Newton) or the full data Hessian ``nabla^2 1/2 ||r||^2``
(``hessian="exact"``), ``mu`` the damping of a Levenberg-Marquardt step (absent in the
implicit backward). One :class:`HessianOperator` owns everything about ``H``: the
linearization point ``theta``, the products with ``A``, ``Lambda``, the damping and the
preconditioner; both the LM steps of the forward (:mod:`.inner`) and the implicit backward
(:mod:`.implicit`) solve with it. Its constructor decides once, through
:meth:`Diff3RConfig.resolved`, which product and preconditioner the backend supports, and
records the choice in ``product`` / ``precond`` / ``notes``.

The products with ``A`` (all on the whole batch; PCG's subsets of scenes are padded):

* ``sparse``: the explicit factored Jacobian of :mod:`.sparse_jacobian`, built once per
  linearization point; gathers and scatter-adds over pixel-Gaussian pairs (about ten times
  cheaper than a pass through the renderer), with the exact ``diag(A)`` and exact
  per-Gaussian blocks of ``A`` for the block-Jacobi preconditioner. Torch backend.
* ``autodiff``: ``J p`` by forward-mode AD (``torch.func.jvp``) and ``J^T u`` from one
  retained reverse-mode graph (``torch.func.vjp``) through the torch renderer with the pair
  list frozen at ``theta``.
* ``finite_difference``: for renderers with only a first-order backward (gsplat, upstream CUDA
  rasterizers): ``J p ~ (r(theta + e p) - r(theta - e p)) / (2 e)`` with ``e`` chosen so that
  ``||e p||_inf = fd_eps``, and ``J^T u`` by the renderer's backward.
* ``exact``: ``nabla^2 E p`` by double backward, including the residual-curvature term that
  Gauss-Newton drops (exact implicit gradients when the context residuals do not vanish at the
  optimum). Not guaranteed positive definite away from a minimum.

Without the explicit Jacobian, ``diag(J^T W J)`` is estimated with Rademacher probes ``z`` over
the residuals: ``E[(J^T z)^2] = diag(J^T J)`` exactly, one VJP per probe, never negative.
"""

import copy

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ConfigError
from ..profiling import part
from .objective import Objective
from .preconditioners import Preconditioner, build_preconditioner
from .sparse_jacobian import SparseJacobian

PRODUCTS = ("sparse", "autodiff", "finite_difference", "exact")


def _rademacher(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(like)
    return 2 * z - 1


class _Products:
    """Products with the data term's curvature ``A`` at ``theta``, on the whole batch."""

    name = "base"
    residual_shape: tuple

    def jvp(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def vjp(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def curvature(self, p: Tensor) -> Tensor:
        """``A p``."""
        with torch.enable_grad():
            return self.vjp(self.jvp(p))

    def jtj_diag(self, probes: int, generator: torch.Generator | None) -> Tensor:
        """Unbiased, non-negative estimate of ``diag(J^T W J)``."""
        acc = None
        for _ in range(probes):
            z = _rademacher(self.residual_shape, generator, self.theta)
            sq = self.vjp(z) ** 2
            acc = sq if acc is None else acc + sq
        return acc / probes


class _Sparse(_Products):
    name = "sparse"

    def __init__(self, objective: Objective, theta: Tensor, sqrt_w, jacobian: SparseJacobian | None,
                 create_graph: bool):
        self.theta = theta
        if jacobian is None:
            src = theta if create_graph else theta.detach()
            # The pair list at src itself comes from the Jacobian's own projection; a frozen
            # one (theta0's) from the objective.
            plan = objective.make_plan(src) if objective.visibility_theta is not None else None
            with torch.set_grad_enabled(create_graph):
                jacobian = SparseJacobian.build(src, objective.layout, objective.views, plan, sqrt_w)
        self.jacobian = jacobian
        self.residual_shape = tuple(jacobian.residual.shape)
        self._blocks: list[tuple[Tensor, Tensor]] | None = None

    def jvp(self, p):
        return self.jacobian.jvp(p)

    def vjp(self, u):
        return self.jacobian.vjp(u)

    def curvature(self, p):
        return self.jacobian.gauss_newton(p)

    def blocks(self) -> list[tuple[Tensor, Tensor]]:
        """Exact per-Gaussian blocks of ``J^T W J`` over the Jacobian's block partition, as
        ``(blocks [b, G, k, k], slots [G, k])`` pairs (built once)."""
        if self._blocks is None:
            with torch.no_grad():
                jac = self.jacobian
                self._blocks = [(jac.block_diagonal(cols, rows), cols) for cols, rows in jac.block_partition()]
        return [(blk, self.jacobian.slots.index_select(1, cols)) for blk, cols in self._blocks]

    def jtj_diag(self, probes=0, generator=None):
        """The exact ``diag(J^T W J)`` (no probes), read off the blocks when they exist."""
        with torch.no_grad():
            return self.jacobian.diagonal(parts=self._blocks)


class _Autodiff(_Products):
    name = "autodiff"

    def __init__(self, objective: Objective, theta: Tensor, sqrt_w):
        self.theta = theta.detach()
        plan = objective.make_plan(self.theta)

        def residual(t):
            return objective.residual(t, None, plan, sqrt_w)

        self._residual = residual
        with torch.enable_grad():
            r0, self._vjp = torch.func.vjp(residual, self.theta)
        self.residual_shape = tuple(r0.shape)

    def jvp(self, p):
        return torch.func.jvp(self._residual, (self.theta,), (p,))[1]

    def vjp(self, u):
        return self._vjp(u)[0]


class _FiniteDifference(_Products):
    name = "finite_difference"

    def __init__(self, objective: Objective, theta: Tensor, sqrt_w, fd_eps: float):
        self.objective, self.sqrt_w, self.fd_eps = objective, sqrt_w, fd_eps
        self.theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            self.r = objective.residual(self.theta, None, None, sqrt_w)
        self.residual_shape = tuple(self.r.shape)

    def jvp(self, p):
        size = p.abs().amax(1, keepdim=True)
        eps = self.fd_eps / torch.where(size > 0, size, torch.ones_like(size))
        t = self.theta.detach()
        with torch.no_grad():
            plus = self.objective.residual(t + eps * p, None, None, self.sqrt_w)
            minus = self.objective.residual(t - eps * p, None, None, self.sqrt_w)
        return (plus - minus) / (2 * eps)

    def vjp(self, u):
        with torch.enable_grad():
            return torch.autograd.grad(self.r, self.theta, u, retain_graph=True)[0]


class _Exact(_Autodiff):
    name = "exact"

    def __init__(self, objective: Objective, theta: Tensor, sqrt_w):
        super().__init__(objective, theta, sqrt_w)
        self._point = self.theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            r = self._residual(self._point)
            self._grad = torch.autograd.grad(0.5 * (r * r).sum(), self._point, create_graph=True)[0]

    def curvature(self, p):
        with torch.enable_grad():
            return torch.autograd.grad(self._grad, self._point, p, retain_graph=True)[0]


class _GraphGaussNewton:
    """``J^T W J p`` that stays differentiable w.r.t. the linearization point (for unrolling
    LM with products through the renderer)."""

    def __init__(self, objective: Objective, theta: Tensor, sqrt_w):
        self.theta = theta
        self.r = objective.residual(theta, sqrt_w=sqrt_w)
        self.u = torch.zeros_like(self.r, requires_grad=True)
        self.jtu = torch.autograd.grad(self.r, theta, self.u, create_graph=True)[0]

    def __call__(self, p: Tensor) -> Tensor:
        jp = torch.autograd.grad(self.jtu, self.u, p, create_graph=True)[0]
        return torch.autograd.grad(self.r, self.theta, jp, create_graph=True)[0]


class HessianOperator:
    """``H p = A p + (Lambda + mu D) p`` at ``theta`` (see the module doc), for PCG.

    Args:
        objective: The inner objective (its backend decides the admissible products).
        theta: Linearization point ``[b, n]``; on an autograd graph only with ``create_graph``.
        theta0: The proximal centre (kept for the record: ``H`` does not depend on it).
        lam: ``Lambda`` ``[b, n]`` (detached here: ``H`` is a constant of the solves).
        config: The layer's :class:`Diff3RConfig`; ``resolved(objective.backend)`` gives the
            product (``matvec``; ``exact`` with ``hessian="exact"``) and the preconditioner.
        hessian: ``"gauss_newton"`` or ``"exact"``; default ``config.hessian``. The LM steps
            always use Gauss-Newton.
        generator: Random probes of an estimated diagonal (Jacobi without ``sparse``).
        jacobian: A :class:`SparseJacobian` already built at ``theta`` (the LM step's energy
            comes from it), reused instead of a second build.
        create_graph: Keep the products differentiable w.r.t. ``theta`` (unrolled LM).
    """

    def __init__(self, objective: Objective, theta: Float[Tensor, "batch param"],
                 theta0: Float[Tensor, "batch param"], lam: Float[Tensor, "batch param"], config, *,
                 hessian: str | None = None, generator: torch.Generator | None = None,
                 jacobian: SparseJacobian | None = None, create_graph: bool = False):
        resolved = config.resolved(objective.backend)
        self.notes: list[str] = config.resolution_notes(objective.backend)
        hessian = resolved.hessian if hessian is None else hessian
        self.product = "exact" if hessian == "exact" else resolved.matvec
        self.precond = resolved.precond
        if self.product == "exact" and self.precond == "block_jacobi":
            self.precond = "jacobi"  # the blocks are Gauss-Newton's
        if self.product != "finite_difference" and objective.backend != "torch":
            raise ConfigError(f"products {self.product!r} need the torch backend; use matvec='finite_difference'")
        self.objective = objective
        self.theta = theta
        self.theta0 = theta0.detach()
        self.lam = lam.detach()
        self.precond_probes = resolved.precond_probes
        self.generator = generator
        self.create_graph = create_graph
        self.sqrt_w = objective.pixel_weights(theta.detach())
        self.num_matvecs = 0
        self.damping: Tensor | None = None
        self._shift = self.lam
        self._data_diag: Tensor | None = None
        self._precond: Preconditioner = None
        self._precond_built = False
        self._graph: _GraphGaussNewton | None = None
        with part("linearize"):
            if self.product == "sparse":
                self.products: _Products = _Sparse(objective, theta, self.sqrt_w, jacobian, create_graph)
            elif self.product == "autodiff":
                self.products = _Autodiff(objective, theta, self.sqrt_w)
            elif self.product == "exact":
                self.products = _Exact(objective, theta, self.sqrt_w)
            else:
                self.products = _FiniteDifference(objective, theta, self.sqrt_w, resolved.fd_eps)

    @property
    def jacobian(self) -> SparseJacobian | None:
        """The explicit Jacobian (``product == "sparse"``), else None."""
        return getattr(self.products, "jacobian", None)

    # -- the parts of H -----------------------------------------------------------------

    def data_diagonal(self) -> Float[Tensor, "batch param"]:
        """``diag(A)`` (exact with ``sparse``, else estimated from probes), computed once."""
        if self._data_diag is None:
            with part("linearize"):
                if self.precond == "block_jacobi":
                    self.products.blocks()  # first: the Gaussians' diagonal entries are read off them
                self._data_diag = self.products.jtj_diag(self.precond_probes, self.generator).detach()
        return self._data_diag

    def diagonal(self) -> Float[Tensor, "batch param"]:
        """``diag(H)``."""
        return self.data_diagonal() + self._shift

    def damped(self, mu: Float[Tensor, " batch"]) -> "HessianOperator":
        """``A + diag(Lambda) + mu diag(D)`` at the same point, sharing the products, ``diag(A)``
        and the blocks (a rejected LM step retries with a larger ``mu`` without relinearizing)."""
        diag = self.data_diagonal()  # before the copy, so that both share it
        out = copy.copy(self)
        out.damping = mu.detach()
        out._shift = self.lam + out.damping[:, None] * (diag + self.lam)
        out._precond, out._precond_built = None, False
        out.num_matvecs = 0
        return out

    def preconditioner(self) -> Preconditioner:
        """The preconditioner ``self.precond`` of ``H``, built once."""
        if not self._precond_built:
            with part("linearize"), torch.no_grad():
                blocks = None
                if self.precond == "block_jacobi":
                    def blocks():  # the shift is added to the diagonals as they are factored
                        return [(blk, slots, self._shift[:, slots]) for blk, slots in self.products.blocks()]
                self._precond = build_preconditioner(self.precond, self.diagonal, blocks)
            self._precond_built = True
        return self._precond

    # -- products -----------------------------------------------------------------------

    def _pad(self, p: Tensor, idx: Tensor) -> Tensor:
        if idx.numel() == self.lam.shape[0]:
            return p  # PCG passes arange(b) while every scene is active
        return p.new_zeros(self.lam.shape).index_copy(0, idx, p)

    def _rows(self, out: Tensor, idx: Tensor) -> Tensor:
        return out if idx.numel() == self.lam.shape[0] else out.index_select(0, idx)

    def __call__(self, p: Float[Tensor, "active param"], idx: Int[Tensor, " active"]) -> Float[Tensor, "active param"]:
        """``H p`` for the scenes ``idx`` (the PCG matvec)."""
        self.num_matvecs += 1
        out = self._rows(self.products.curvature(self._pad(p, idx)), idx)
        return out + self._rows(self._shift, idx) * p

    def jvp(self, p: Float[Tensor, "active param"], idx: Int[Tensor, " active"]) -> Float[Tensor, "active residual"]:
        """``W^1/2 J p`` for the scenes ``idx``."""
        return self._rows(self.products.jvp(self._pad(p, idx)), idx)

    def vjp(self, u: Float[Tensor, "active residual"], idx: Int[Tensor, " active"]) -> Float[Tensor, "active param"]:
        """``J^T W^1/2 u`` for the scenes ``idx``."""
        if idx.numel() != self.lam.shape[0]:
            u = u.new_zeros(self.products.residual_shape).index_copy(0, idx, u)
        return self._rows(self.products.vjp(u), idx)

    def graph_apply(self, p: Float[Tensor, "batch param"], lam: Float[Tensor, "batch param"]) -> Float[Tensor, "batch param"]:
        """``H p`` on the autograd graph of ``theta`` and ``lam`` (``mu`` and ``D`` constant):
        the residual of a step whose derivative an adjoint solve gives (unrolled LM)."""
        if self.product == "sparse":
            curv = self.products.curvature(p)
        else:
            if self._graph is None:
                self._graph = _GraphGaussNewton(self.objective, self.theta, self.sqrt_w)
            curv = self._graph(p)
        shift = lam if self.damping is None else lam + (self._shift - self.lam)
        return curv + shift * p
