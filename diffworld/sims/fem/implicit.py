"""The implicit FEM step: backward Euler solved by Newton's method with matrix-free, Jacobi-
preconditioned conjugate gradients, and its adjoint: one linear solve per step.

Step. Unknown: the end-of-step velocity ``w`` of the free nodes (kinematic nodes follow the pose of
the control row, ``y_k = p + R a_k + t``; massless vertices stay). With ``y = x + dt w`` the
end-of-step positions, lumped masses ``M``, mass-proportional damping ``alpha`` [1/s] (taken
implicitly, as in the explicit step), gravity ``g`` and nodal loads ``f_ext``, the residual of the
free rows is::

    G(w) = M ((1 + alpha dt) w - v) - dt (f(y) + f_ext + M g) = 0

and ``x' = y``, ``v' = w``. ``G`` is the gradient of the incremental potential::

    Phi(w) = 1/2 (1 + alpha dt) w^T M w - w^T M v + Psi(y) - dt w^T (f_ext + M g)

(``Psi`` the elastic energy), and its Jacobian ``A = (1 + alpha dt) M + dt^2 K(y)``, ``K = -df/dy``
the tangent stiffness (the Hessian of ``Psi``), is symmetric. ``K p`` is applied matrix-free by the
explicit step's element adjoint kernel (:func:`~diffworld.sims.fem.kernels.element_forces_adjoint`
with the adjoint ``p``): that kernel computes ``(df/dy)^T p``, which is ``df/dy p`` because the
Hessian is symmetric, through the materials' exact differential ``dP``; no new kernel is compiled.

Indefinite tangent (strong compression, inversion: the exact ``dP`` is then indefinite). Not
projected: CG stops at the first direction of non-positive curvature and returns its iterate so
far (on the first iteration, the preconditioned steepest-descent direction), which is a descent
direction of ``Phi``; a backtracking (Armijo) line search on ``Phi`` then makes every Newton step
decrease the incremental potential. Near convergence the change of ``Phi`` falls below its
round-off, so a step that reduces the residual norm is accepted too. At a converged step the
tangent is positive definite wherever backward Euler's solution is a local minimum of ``Phi``
(always for ``M / dt^2`` large against the negative part).

Preconditioner: the diagonal of ``A`` with ``K`` replaced by the linear-elastic stiffness at rest
(exact for the linear law at rest, cheap, and positive).

Adjoint (implicit function theorem). Given adjoints ``gx``, ``gv`` of ``x'``, ``v'``: the adjoint of
``w`` (free rows) is ``gw = gv + dt gx``; solve ``A lam = gw`` (same symmetric matrix at the
solution, same CG); then every other input ``z`` gets ``-lam^T dG/dz``: ``x`` (through ``y``),
``v`` (``M lam``), the kinematic positions (then the control pose), the loads (``dt lam``), ``E``,
``nu`` (through the element adjoint kernel with ``dt lam``), the masses, ``alpha`` and ``g``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from diffworld.sims.constitutive.laws import lame
from diffworld.sims.fem.model import Model
from diffworld.sims.fem.solver import Stepper

__all__ = ["ImplicitStepper", "NewtonStats"]


class NewtonStats(NamedTuple):
    """Counts of the last step (for reports and tests).

    Attributes:
        newton: Newton iterations.
        cg: CG iterations, all Newton iterations together.
        residual: Final residual norm ||G|| [N s] (free rows).
    """

    newton: int
    cg: int
    residual: float


class _Saved(NamedTuple):
    x: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor  # v' (N, 3)
    y: torch.Tensor  # x' (N, 3)
    control: torch.Tensor


class ImplicitStepper(Stepper):
    """Backward Euler steps of one model with step ``dt`` [s] (module docstring).

    Args:
        model: The model.
        dt: Step [s]; any size (no stability limit).
        newton_tol: Newton stops when ||G|| <= newton_tol * max(||G(v)||, ||M v||, dt ||f_ext + M g||,
            dt ||f(x + dt v)||) (relative to the scale of the step's momentum balance).
            Also converged when a Newton update moves no node by more than 8 round-off units
            of the positions (nothing more can be resolved; float32 ends there).
        newton_max: Newton iteration cap; not converged after it: ``SimulationError``.
        cg_tol: Each CG solve stops at a preconditioned residual ||r|| <= cg_tol ||b||.
        cg_max: CG iteration cap per solve (the iterate so far is used: inexact Newton).
        adjoint_tol: CG tolerance of the adjoint solve.
    """

    def __init__(self, model: Model, dt: float, *, newton_tol: float | None = None, newton_max: int = 30,
                 cg_tol: float | None = None, cg_max: int = 2000, adjoint_tol: float | None = None) -> None:
        super().__init__(model, dt)
        f64 = model.dtype == torch.float64
        self.newton_tol = newton_tol if newton_tol is not None else (1e-10 if f64 else 1e-5)
        self.cg_tol = cg_tol if cg_tol is not None else (1e-6 if f64 else 1e-4)
        self.adjoint_tol = adjoint_tol if adjoint_tol is not None else (1e-12 if f64 else 1e-6)
        self.newton_max, self.cg_max = int(newton_max), int(cg_max)
        n = model.n_nodes
        self.kin_mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.kin_mask[model.kinematic] = True
        self.anchor_rel = self.anchor_t[:-1]
        self.last = NewtonStats(0, 0, 0.0)
        self.total_newton = 0
        self.total_cg = 0
        self.total_steps = 0

    # -- pieces ----------------------------------------------------------------------------------

    def _free(self, mass: torch.Tensor) -> torch.Tensor:
        """(N, 1) float mask of the unknown rows: not kinematic, with mass."""
        return ((~self.kin_mask) & (mass > 0)).to(self.dtype)[:, None]

    def _pose(self, control: torch.Tensor) -> torch.Tensor:
        R = control[:9].reshape(3, 3)
        return self.model.pivot + self.anchor_rel @ R.T + control[9:12]

    def _loads(self, control: torch.Tensor) -> torch.Tensor:
        """External nodal forces (N, 3) [N] of a control row."""
        f = torch.zeros((self.model.n_nodes, 3), dtype=self.dtype, device=self.device)
        m = self.model.load_nodes.numel()
        if m:
            f[self.model.load_nodes] = control[12:12 + 3 * m].reshape(m, 3)
        return f

    def _hess_force(self, y: torch.Tensor, p: torch.Tensor, E, nu) -> torch.Tensor:
        """df/dy p (N, 3) [N] at positions y: the element adjoint kernel with adjoint ``p`` (df/dy is
        symmetric). Its E, nu outputs go to scratch."""
        out = torch.zeros_like(y)
        sE, snu = torch.zeros_like(E), torch.zeros_like(nu)
        w, vec = self._scalars, self._vecs
        self._run(self.k["element_forces_adjoint"], self.model.n_tets,
                  [self.tets, vec(y), self.Dm_inv, self.volume, self.law, w(E), w(nu), vec(p.contiguous()), vec(out),
                   w(sE), w(snu)])
        return out

    def _jacobi(self, E, nu, mass, c: float) -> torch.Tensor:
        """Diagonal (N, 3) of c M + dt^2 K_rest (the preconditioner)."""
        mu, lam = lame(E, nu)
        B = self.Dm_inv_t
        g = torch.cat([-B.sum(1, keepdim=True), B], 1)  # (T, 4, 3): gradients of the barycentric coords
        d = self.volume_t[:, None, None] * ((lam + mu)[:, None, None] * g * g
                                            + mu[:, None, None] * (g * g).sum(2, keepdim=True))
        diag = torch.zeros((self.model.n_nodes, 3), dtype=self.dtype, device=self.device).index_add_(
            0, self.tets_t.reshape(-1).long(), d.reshape(-1, 3))
        return c * mass[:, None] + self.dt_value ** 2 * diag

    def _operator(self, y, E, nu, mass, c, free):
        dt2 = self.dt_value ** 2

        def A(p):
            p = p * free
            return (c * mass[:, None] * p - dt2 * self._hess_force(y, p, E, nu)) * free
        return A

    def _cg(self, A, b, Pinv, tol, free):
        """Preconditioned CG for A z = b on the free rows; stops on non-positive curvature.

        Returns:
            (z, iterations).
        """
        z = torch.zeros_like(b)
        r = b.clone()
        s = Pinv * r
        p = s.clone()
        rs = float((r * s).sum())
        bnorm = math.sqrt(float((b * b).sum()))
        if bnorm == 0.0:
            return z, 0
        for it in range(1, self.cg_max + 1):
            Ap = A(p)
            pAp = float((p * Ap).sum())
            if not pAp > 0.0:  # indefinite (or NaN): keep what we have (module docstring)
                return (s * free if it == 1 else z), it
            a = rs / pAp
            z = z + a * p
            r = r - a * Ap
            if math.sqrt(float((r * r).sum())) <= tol * bnorm:
                return z, it
            s = Pinv * r
            rs_new = float((r * s).sum())
            p = s + (rs_new / rs) * p
            rs = rs_new
        return z, self.cg_max

    # -- forward ---------------------------------------------------------------------------------

    def step(self, x, v, params: Sequence[torch.Tensor], control, keep: bool = False, index: int = 0):
        """One backward Euler step from (x, v) under the control row ``control`` (12 + 3 M,).

        Returns:
            x', v' and, when ``keep``, the saved (x, v, v', x', control).

        Raises:
            SimulationError: Newton not converged in ``newton_max`` iterations (names the step
                ``index`` and the residual).
        """
        from diffworld.sims.fem.rollout import SimulationError

        E, nu, mass, damping, gravity = (t.contiguous() for t in params)
        x, v, control = x.contiguous(), v.contiguous(), control.contiguous()
        dt = self.dt_value
        c = 1.0 + float(damping[0]) * dt
        free = self._free(mass)
        kin = self.kin_mask
        fconst = self._loads(control) + mass[:, None] * gravity  # f_ext + M g
        mv = mass[:, None] * v
        y_kin = self._pose(control)
        vol = self.volume_t

        def positions(w):
            y = x + dt * w * free  # massless vertices stay
            if kin.any():
                y = y.clone()
                y[kin] = y_kin
            return y

        def residual(w, with_forces=False):
            y = positions(w)
            f = self.forces(y, E, nu)
            G = (c * mass[:, None] * w - mv - dt * (f + fconst)) * free
            return (G, y, f) if with_forces else (G, y)

        def potential(w, y):
            F = self.model.deformation_gradient(y)
            psi = (vol * self.model._by_law(F, E, nu, "energy")).sum()
            return float(0.5 * c * (mass[:, None] * w * w * free).sum() - (mv * w * free).sum() + psi
                         - dt * (fconst * w * free).sum())

        with torch.no_grad():
            w = v * free
            G, y, f0 = residual(w, True)
            gnorm = float(G.norm())
            # the scale of the step's momentum balance: its initial residual, momentum, loads, and
            # the elastic forces (all nodes: the kinematic ones' reactions measure the stress of a
            # body already in equilibrium, where the round-off floor of G lies)
            scale = max(gnorm, float((mv * free).norm()), dt * float((fconst * free).norm()), dt * float(f0.norm()),
                        1e-300)
            Pinv = free / self._jacobi(E, nu, mass, c).clamp_min(1e-300)
            phi = None
            n_cg = 0
            it = 0
            # positions cannot move by less than their round-off: a Newton update below it ends the
            # solve (float32 reaches this floor before a tight residual tolerance)
            x_floor = 8.0 * torch.finfo(self.dtype).eps * max(float(x.abs().max()), 1e-300)
            stalled = False
            while gnorm > self.newton_tol * scale and not stalled:
                if it >= self.newton_max or not math.isfinite(gnorm):
                    raise SimulationError(
                        f"implicit step {index}: Newton did not converge in {it} iterations (residual "
                        f"{gnorm:.3e}, tolerance {self.newton_tol * scale:.3e}); reduce dt, loosen newton_tol or "
                        f"raise newton_max")
                it += 1
                d, k = self._cg(self._operator(y, E, nu, mass, c, free), -G, Pinv, self.cg_tol, free)
                n_cg += k
                if phi is None:
                    phi = potential(w, y)
                slope = float((G * d).sum())  # < 0 for a descent direction
                a = 1.0
                for _ in range(30):
                    w_try = w + a * d
                    G_try, y_try = residual(w_try)
                    g_try = float(G_try.norm())
                    phi_try = potential(w_try, y_try)
                    if math.isfinite(g_try) and (phi_try <= phi + 1e-4 * a * slope or g_try < gnorm):
                        break
                    a *= 0.5
                w, G, y, gnorm, phi = w_try, G_try, y_try, g_try, phi_try
                stalled = dt * a * float(d.abs().max()) <= x_floor
            v1 = w.clone()
            if kin.any():
                v1[kin] = (y_kin - x[kin]) / dt
            self.last = NewtonStats(it, n_cg, gnorm)
            self.total_newton += it
            self.total_cg += n_cg
            self.total_steps += 1
        return y, v1, (_Saved(x, v, w, y, control) if keep else None)

    # -- adjoint ---------------------------------------------------------------------------------

    def step_adjoint(self, s: _Saved, params, adj_x1, adj_v1, adj_params, adj_control):
        """Adjoint of :meth:`step` (module docstring): one CG solve at the solution."""
        E, nu, mass, damping, gravity = (t.contiguous() for t in params)
        aE, anu, amass, adamp, agrav = adj_params
        dt = self.dt_value
        c = 1.0 + float(damping[0]) * dt
        free = self._free(mass)
        kin = self.kin_mask
        gx = torch.zeros_like(s.x) if adj_x1 is None else adj_x1
        gv = torch.zeros_like(s.v) if adj_v1 is None else adj_v1
        gw = (gv + dt * gx) * free
        Pinv = free / self._jacobi(E, nu, mass, c).clamp_min(1e-300)
        lam_, _ = self._cg(self._operator(s.y, E, nu, mass, c, free), gw, Pinv, self.adjoint_tol, free)
        lam_ = lam_ * free
        # -lam^T dG/dy = dt (df/dy)^T lam, and dt lam^T df/dE, df/dnu: one element adjoint launch
        q = torch.zeros_like(s.x)
        w_, vec = self._scalars, self._vecs
        self._run(self.k["element_forces_adjoint"], self.model.n_tets,
                  [self.tets, vec(s.y), self.Dm_inv, self.volume, self.law, w_(E), w_(nu),
                   vec((dt * lam_).contiguous()), vec(q), w_(aE), w_(anu)])
        movable = (mass > 0).to(self.dtype)[:, None]
        adj_x = gx * (1 - free) * (1 - movable) + (gx + q) * free  # massless: y = x
        adj_v = mass[:, None] * lam_
        # masses: -lam . ((1 + alpha dt) w - v - dt g);  damping: -dt sum m lam . w;  gravity: dt sum m lam
        amass += -(lam_ * (c * s.w - s.v - dt * gravity)).sum(1)
        adamp += -dt * (mass[:, None] * lam_ * s.w).sum().reshape(1)
        agrav += dt * (mass[:, None] * lam_).sum(0)
        m = self.model.load_nodes.numel()
        if m:
            adj_control[12:12 + 3 * m] += dt * lam_[self.model.load_nodes].reshape(-1)
        if bool(kin.any()):
            # y_k = p + R a_k + t; v'_k = (y_k - x_k) / dt; y_k also enters the free rows' forces (q)
            gy = gx[kin] + gv[kin] / dt + q[kin]
            adj_control[:9] += (gy.T @ self.anchor_rel).reshape(9)
            adj_control[9:12] += gy.sum(0)
            adj_x[kin] = -gv[kin] / dt
        return adj_x, adj_v
