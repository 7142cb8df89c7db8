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

Contact (a rigid object, :class:`~diffworld.sims.fem.rollout.Contact`; the law of
:func:`~diffworld.sims.fem.contact.contact_forces`). The contact force ``f_c`` joins ``f`` in
``G``; row s of the object is the object during step s. Its three parts are treated as follows:

* normal penalty ``k_n d(y) n(y)``: fully implicit, at the end-of-step positions against this
  step's object. It is conservative: its potential ``sum k_n P(-phi(y))`` with
  ``P(z) = int_{-inf}^z ramp`` (``max(z, 0)^2 / 2``; for the softplus ramp ``w^2 (-Li2(-e^(z/w)))``)
  joins ``Phi`` (the line search's merit), and its Jacobian the CG operator;
* Hunt-Crossley damping and regularized Coulomb friction: semi-implicit, as IPC does with its
  lagged friction: the normal ``n0``, penetration ``d0`` and normal force magnitude ``fn0`` are
  read at the start of the step (positions x, velocities v) against the previous step's object
  (row s - 1; the first step uses its own row), and so is the object's velocity at the node
  (``u`` at x); the velocity they act on is the end-of-step ``w``. Then damping
  ``k_d d0 ramp(-n0 . (w - u)) n0`` and friction ``-min(k_t s, mu fn0) v_t / s``
  (``v_t = (I - n0 n0^T)(w - u)``) are gradients of convex dissipation potentials in ``w``
  (``k_d d0 P(-v_n)`` and ``D(|v_t|) = int_0^|v_t| min(k_t s, mu fn0) r / s dr``), added to
  ``Phi`` times ``dt``: the Jacobian stays symmetric and positive semi-definite, so the same CG
  and line search apply, and stiff viscous friction (``k_t dt / m >> 1``) is stable.
  Consequence: the friction cap and the damping lag one step: the first step in contact has no
  friction; a normal force that changes within a step caps friction at its previous value
  (steady sliding: exact); the tangent plane turns one step late.

Each contact force depends on its own node only, so its Jacobian is a (3, 3) block per contact
node, taken by three reverse passes of torch autograd per Newton iteration (double backward
through the analytic SDFs) and applied as a batched product in every CG iteration; the blocks'
positive diagonal joins the Jacobi preconditioner. The adjoint solves with the transposed
blocks, then one autograd VJP of the contact forces at the solution (``w`` fixed) gives
``dt lam^T df_c/dz`` for x (through y and the lagged terms), v (through ``fn0``), both object
rows and ``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v``: exact for what the forward computes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy.special import spence

from diffworld.sims.constitutive.laws import lame
from diffworld.sims.fem.contact import RigidObject, _signed_distance, smooth_min, softplus_ramp
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
        p = p.contiguous()  # kept alive through the launch (the Warp view does not hold it)
        self._run(self.k["element_forces_adjoint"], self.model.n_tets,
                  [self.tets, vec(y), self.Dm_inv, self.volume, self.law, w(E), w(nu), vec(p), vec(out),
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

    def _operator(self, y, E, nu, mass, c, free, contact=None, B=None):
        """``A p`` on the free rows; with a contact term, ``- dt B p`` joins (B its blocks)."""
        dt, dt2 = self.dt_value, self.dt_value ** 2

        def A(p):
            p = p * free
            out = c * mass[:, None] * p - dt2 * self._hess_force(y, p, E, nu)
            if contact is not None:
                out = out - dt * contact.apply(B, p)
            return out * free
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

    def step(self, x, v, params: Sequence[torch.Tensor], control, keep: bool = False, index: int = 0, contact=None):
        """One backward Euler step from (x, v) under the control row ``control`` (12 + 3 M,).

        ``contact``: a :class:`~diffworld.sims.fem.rollout.ContactStep` (None: no contact); the
        row then carries the step's object columns and the previous step's after them, and
        ``params`` the contact parameters after the five step parameters (module docstring).

        Returns:
            x', v' and, when ``keep``, the saved (x, v, v', x', control).

        Raises:
            SimulationError: Newton not converged in ``newton_max`` iterations (names the step
                ``index`` and the residual).
        """
        from diffworld.sims.fem.rollout import SimulationError

        E, nu, mass, damping, gravity = (t.contiguous() for t in params[:5])
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

        with torch.no_grad():
            cterm = None if contact is None else _ContactTerm(contact, x, v, control, params[5:], dt)

        def residual(w, with_forces=False):
            y = positions(w)
            f = self.forces(y, E, nu)
            if cterm is not None:
                f = f + cterm.forces(w)
            G = (c * mass[:, None] * w - mv - dt * (f + fconst)) * free
            return (G, y, f) if with_forces else (G, y)

        def potential(w, y):
            F = self.model.deformation_gradient(y)
            psi = (vol * self.model._by_law(F, E, nu, "energy")).sum()
            if cterm is not None:
                psi = psi + cterm.potential(w * free)
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
            diag = self._jacobi(E, nu, mass, c)
            Pinv = free / diag.clamp_min(1e-300)
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
                B = None
                if cterm is not None:  # the contact's blocks at this iterate, also in the preconditioner
                    B = cterm.blocks(w)
                    Pinv = free / (diag + dt * cterm.diagonal(B)).clamp_min(1e-300)
                d, k = self._cg(self._operator(y, E, nu, mass, c, free, cterm, B), -G, Pinv, self.cg_tol, free)
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

    def step_adjoint(self, s: _Saved, params, adj_x1, adj_v1, adj_params, adj_control, contact=None):
        """Adjoint of :meth:`step` (module docstring): one CG solve at the solution."""
        E, nu, mass, damping, gravity = (t.contiguous() for t in params[:5])
        aE, anu, amass, adamp, agrav = adj_params[:5]
        dt = self.dt_value
        c = 1.0 + float(damping[0]) * dt
        free = self._free(mass)
        kin = self.kin_mask
        gx = torch.zeros_like(s.x) if adj_x1 is None else adj_x1
        gv = torch.zeros_like(s.v) if adj_v1 is None else adj_v1
        gw = (gv + dt * gx) * free
        diag = self._jacobi(E, nu, mass, c)
        cterm = Bt = None
        if contact is not None:
            # A^T: the contact blocks transposed (symmetric for the SDFs here, but exact regardless)
            with torch.no_grad():
                cterm = _ContactTerm(contact, s.x, s.v, s.control, params[5:], dt)
                Bt = cterm.blocks(s.w).transpose(1, 2)
            diag = diag + dt * cterm.diagonal(Bt)
        Pinv = free / diag.clamp_min(1e-300)
        lam_, _ = self._cg(self._operator(s.y, E, nu, mass, c, free, cterm, Bt), gw, Pinv, self.adjoint_tol, free)
        lam_ = lam_ * free
        # -lam^T dG/dy = dt (df/dy)^T lam, and dt lam^T df/dE, df/dnu: one element adjoint launch
        q = torch.zeros_like(s.x)
        w_, vec = self._scalars, self._vecs
        # a named tensor: the Warp view does not keep its memory alive through the launch
        dt_lam = (dt * lam_).contiguous()
        self._run(self.k["element_forces_adjoint"], self.model.n_tets,
                  [self.tets, vec(s.y), self.Dm_inv, self.volume, self.law, w_(E), w_(nu),
                   vec(dt_lam), vec(q), w_(aE), w_(anu)])
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
        if contact is not None:
            # -lam^T dG/dz = dt lam^T df_c/dz for z = x (through y and the lagged terms), v (lagged
            # normal force), the row's object columns (this step's and the previous one's) and the
            # contact parameters; w held at the solution
            nodes = contact.nodes
            with torch.enable_grad():
                xg, vg = s.x.detach().requires_grad_(True), s.v.detach().requires_grad_(True)
                rg = s.control.detach().requires_grad_(True)
                cg = [t.detach().requires_grad_(True) for t in params[5:]]
                cps = [t.to(xg.dtype) for t in cg]
                lag = _lagged(contact, xg, vg, rg, cps)
                wc = s.w[nodes]
                f = _contact_force(contact, xg[nodes] + dt * wc, wc, lag, rg, cps)
                gx_, gv_, gr, *gc = torch.autograd.grad(f, [xg, vg, rg, *cg], dt * lam_[nodes], allow_unused=True)
            for a, g in ((adj_x, gx_), (adj_v, gv_), (adj_control, gr), *zip(adj_params[5:], gc)):
                if g is not None:
                    a += g
        return adj_x, adj_v


# -- contact (module docstring, "Contact") -------------------------------------------------------

_OBJ = 18  # object columns per pose in a control row: position, rotation (row-major), velocities

# Gauss-Legendre rule on [0, 1] for the friction potential of the smooth min (no closed form)
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(32))
_GL_X, _GL_W = 0.5 * (_GL_X + 1.0), 0.5 * _GL_W


class _Lag(NamedTuple):
    """The contact quantities a step lags (read at its start: node positions x and velocities v
    against the previous step's object)."""

    d0: torch.Tensor  # (C,) penetration [m]
    n0: torch.Tensor  # (C, 3) unit object normal
    fn0: torch.Tensor  # (C,) normal force magnitude [N] (elastic + damping)
    u: torch.Tensor  # (C, 3) this step's object velocity at the nodes' start positions [m/s]


def _pose_cols(row: torch.Tensor, off: int):
    o = row[off:off + _OBJ]
    return o[0:3], o[3:12].reshape(3, 3), o[12:15], o[15:18]


def _sdf_normal(contact, pts: torch.Tensor, pos: torch.Tensor, rot: torch.Tensor):
    return _signed_distance(RigidObject(contact.sdf, pos, rot), pts, pos, rot)


def _lagged(contact, x: torch.Tensor, v: torch.Tensor, row: torch.Tensor, cp) -> _Lag:
    """The lagged quantities (differentiable in x, v, the row's object columns and the parameters)."""
    k_n, k_d = cp[0], cp[1]
    par = contact.params
    nodes = contact.nodes
    xc, vc = x[nodes], v[nodes]
    p0, R0, vl0, om0 = _pose_cols(row, contact.offset + _OBJ)
    p, _, vl, om = _pose_cols(row, contact.offset)
    phi0, n0 = _sdf_normal(contact, xc, p0, R0)
    d0 = softplus_ramp(-phi0, par.penetration_width)
    vn0 = ((vc - vl0 - torch.linalg.cross(om0.expand_as(xc), xc - p0, dim=-1)) * n0).sum(-1)
    fn0 = k_n * d0 + k_d * d0 * softplus_ramp(-vn0, par.damping_width)
    u = vl + torch.linalg.cross(om.expand_as(xc), xc - p, dim=-1)
    return _Lag(d0, n0, fn0.expand_as(d0), u)


def _contact_force(contact, yc: torch.Tensor, wc: torch.Tensor, lag: _Lag, row: torch.Tensor, cp) -> torch.Tensor:
    """Contact forces (C, 3) [N] on the contact nodes at end-of-step positions ``yc`` and
    velocities ``wc``: the normal penalty at ``yc`` against this step's object, damping and
    friction with the lagged normal, penetration and normal force."""
    k_n, k_d, k_t, mu, eps_v = cp
    par = contact.params
    p, R, _, _ = _pose_cols(row, contact.offset)
    phi, n = _sdf_normal(contact, yc, p, R)
    f = (k_n * softplus_ramp(-phi, par.penetration_width))[:, None] * n
    vr = wc - lag.u
    vn = (vr * lag.n0).sum(-1)
    f = f + (k_d * lag.d0 * softplus_ramp(-vn, par.damping_width))[:, None] * lag.n0
    vt = vr - vn[:, None] * lag.n0
    s = torch.sqrt((vt * vt).sum(-1) + eps_v * eps_v)
    ft = smooth_min(k_t * s, mu * lag.fn0, par.friction_exponent)
    return f - (ft / s)[:, None] * vt


def _ramp_potential(z: torch.Tensor, width: float) -> torch.Tensor:
    """``P(z) = int_{-inf}^z ramp(t) dt`` (float64, no gradient): ``max(z, 0)^2 / 2``, or for the
    softplus ramp ``width^2 Fs(z / width)``, ``Fs(u) = -Li2(-e^u)`` (dilogarithm, scipy's spence)."""
    z = z.detach().double()
    if width <= 0:
        return 0.5 * torch.clamp_min(z, 0.0) ** 2
    u = (z / width).cpu().numpy()
    neg = -spence(1.0 + np.exp(np.minimum(u, 0.0)))  # Fs(u) for u <= 0 (Li2(z) = spence(1 - z))
    pos = -spence(1.0 + np.exp(-np.abs(u)))  # Fs(-|u|)
    # Fs(u) = pi^2 / 6 + u^2 / 2 - Fs(-u) for u > 0 (inversion formula of Li2)
    out = np.where(u <= 0, neg, math.pi ** 2 / 6 + 0.5 * u * u - pos)
    return width * width * torch.from_numpy(out).to(z.device)


def _friction_potential(r: torch.Tensor, k_t, a, eps, p) -> torch.Tensor:
    """``D(r) = int_0^r min(k_t s, a) rho / s drho``, ``s = sqrt(rho^2 + eps^2)`` (float64, no
    gradient): the dissipation potential whose negative gradient in the slip velocity is the
    friction force (closed form for the hard min, Gauss-Legendre for the smooth one)."""
    r, k_t, a, eps = (torch.as_tensor(t).detach().double().to(r.device).expand_as(r) for t in (r, k_t, a, eps))
    if p is None:
        s = torch.sqrt(r * r + eps * eps)
        s_star = torch.where(k_t > 0, a / torch.where(k_t > 0, k_t, 1.0), torch.full_like(a, math.inf))
        r_star = torch.sqrt(torch.clamp_min(s_star * s_star - eps * eps, 0.0))
        viscous = 0.5 * k_t * torch.minimum(r, r_star) ** 2
        capped = torch.where(r > r_star, a * (s - torch.maximum(s_star, eps)), torch.zeros_like(r))
        return torch.where(s_star <= eps, a * (s - eps), viscous + capped)
    rho = r[:, None] * _GL_X.to(r)[None, :]
    s = torch.sqrt(rho * rho + (eps * eps)[:, None])
    g = smooth_min(k_t[:, None] * s, a[:, None].expand_as(s), p) * rho / s
    return r * (g * _GL_W.to(r)[None, :]).sum(1)


class _ContactTerm:
    """The contact term of one implicit step at fixed (x, v, row, parameters): forces, their
    Jacobian blocks in w, and the potential's value."""

    def __init__(self, contact, x, v, row, cp, dt: float) -> None:
        self.contact, self.nodes, self.row, self.dt = contact, contact.nodes, row, dt
        self.cp = [t.detach().to(x.dtype) for t in cp]  # the adjoint differentiates them separately
        self.xc = x[self.nodes]
        self.lag = _lagged(contact, x, v, row, self.cp)
        self.n = x.shape[0]

    def node_forces(self, w: torch.Tensor) -> torch.Tensor:
        """(C, 3) contact forces at end-of-step velocities ``w`` (N, 3)."""
        wc = w[self.nodes]
        return _contact_force(self.contact, self.xc + self.dt * wc, wc, self.lag, self.row, self.cp)

    def forces(self, w: torch.Tensor) -> torch.Tensor:
        """(N, 3) contact forces scattered to the nodes."""
        return torch.zeros((self.n, 3), dtype=w.dtype, device=w.device).index_add_(0, self.nodes, self.node_forces(w))

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """(C, 3, 3) d f_i / d w_i (through y = x + dt w and w): each contact force depends on its
        own node only, so three reverse passes give every block."""
        with torch.enable_grad():
            wc = w[self.nodes].detach().requires_grad_(True)
            f = _contact_force(self.contact, self.xc + self.dt * wc, wc, self.lag, self.row, self.cp)
            rows = [torch.autograd.grad(f[:, k].sum(), wc, retain_graph=k < 2)[0] for k in range(3)]
        return torch.stack(rows, 1).detach()

    def apply(self, B: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(N, 3) the scattered block product ``B p``."""
        return torch.zeros_like(p).index_add_(0, self.nodes, torch.einsum("cij,cj->ci", B, p[self.nodes]))

    def diagonal(self, B: torch.Tensor) -> torch.Tensor:
        """(N, 3) the diagonal of -B (the contact's stiffness in the preconditioner), clamped >= 0."""
        d = torch.clamp_min(-torch.diagonal(B, dim1=1, dim2=2), 0.0)
        return torch.zeros((self.n, 3), dtype=B.dtype, device=B.device).index_add_(0, self.nodes, d)

    def potential(self, w: torch.Tensor) -> float:
        """The contact part of the incremental potential: the normal penalty's energy at y plus dt
        times the damping and friction dissipation potentials (their w-gradient is -dt f)."""
        k_n, k_d, k_t, mu, eps_v = self.cp
        par = self.contact.params
        lag = self.lag
        wc = w[self.nodes]
        p, R, _, _ = _pose_cols(self.row, self.contact.offset)
        phi = self.contact.sdf((self.xc + self.dt * wc - p) @ R).detach()
        e = (k_n * _ramp_potential(-phi, par.penetration_width)).sum()
        vr = wc - lag.u
        vn = (vr * lag.n0).sum(-1)
        e_d = (k_d * lag.d0 * _ramp_potential(-vn, par.damping_width)).sum()
        vt = vr - vn[:, None] * lag.n0
        e_t = _friction_potential(torch.linalg.vector_norm(vt, dim=-1), k_t, mu * lag.fn0, eps_v,
                                  par.friction_exponent).sum()
        return float(e + self.dt * (e_d + e_t))
