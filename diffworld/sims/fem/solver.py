"""The explicit FEM step: symplectic Euler on Warp kernels, its hand-ordered adjoint, and the
stability limit of the explicit scheme.

:class:`Stepper` runs steps of one :class:`~diffworld.sims.fem.model.Model` on Warp arrays wrapped
around torch memory; every step allocates its outputs (a step never writes its input, contract 4)
and, when asked, returns what its adjoint needs: the input state, the elastic forces and the
control row (3 (N, 3) arrays per step). :mod:`diffworld.sims.fem.rollout` wraps steps into the
engine's checkpoint windows.

Parameters of a step, in :data:`STEP_PARAMS` order: ``E`` (T,) [Pa], ``nu`` (T,), ``mass`` (N,)
[kg] (lumped, derived from the density by torch so that density gradients flow), ``damping`` (1,)
[1/s], ``gravity`` (3,) [m/s^2].

Stability. Symplectic Euler on ``M a = -K u`` is stable for ``dt < 2 / omega_max``. The largest
eigenfrequency is bounded by Gershgorin's theorem on ``M^-1 K`` (rest stiffness, lumped masses):
``omega_max^2 <= max_i R_i / m_i`` over the free nodes' rows, ``R_i`` the sum of the absolute
entries of a row of the assembled stiffness (bounded element by element). The limit is
``dt_max = CFL * 2 / sqrt(max_i R_i / m_i)`` (:func:`stable_dt`): unlike ``h / c`` rules it
accounts for the mass each node actually carries, for per-element materials, and for slivers
(a flat tet with long edges is not the limit when its nodes' other tets carry mass). Measured
(power iteration, confirmed by blow-up of free vibration within 2 %): the true critical step is
1.28 to 1.67 times the bound on structured and jittered box meshes for nu in [0, 0.49];
:data:`CFL` keeps a further margin for the stiffening of the nonlinear laws at large strain. In
the familiar terms, the limit comes out at 0.37 to 0.45 x (smallest edge) / (p-wave speed) on
structured box meshes (nu 0.49 to 0) and 0.57 to 0.6 x on jittered ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from diffworld.engine.bridge import launch
from diffworld.engine.runtime import init_warp, warp_device
from diffworld.sims.constitutive.laws import lame
from diffworld.sims.fem import kernels as K
from diffworld.sims.fem.model import Model

__all__ = ["CFL", "STEP_PARAMS", "StabilityLimit", "Stepper", "check_dt", "stable_dt"]

STEP_PARAMS = ("E", "nu", "mass", "damping", "gravity")

# dt_max = CFL x the Gershgorin bound 2 / omega_G (module docstring). The bound alone is stable
# for linear elasticity at rest (measured critical steps 1.28-1.67 x it); 0.9 leaves room for the
# stiffening of the nonlinear laws under large strain (tests/sims/test_fem_physics.py).
CFL = 0.9


class StabilityLimit(NamedTuple):
    """The explicit step's stability limit and where it is set.

    Attributes:
        dt: Largest stable step [s].
        node: The limiting node (largest stiffness bound per mass).
        edge: The shortest rest edge at that node [m].
        wave_speed: The largest p-wave speed sqrt((lam + 2 mu) / rho) of its tets [m/s].
    """

    dt: float
    node: int
    edge: float
    wave_speed: float


# Tets per chunk of the stiffness bound: (chunk, 4, 4, 3, 3) float64 temporaries stay ~20 MB.
_CHUNK = 16384


def _stiffness_row_bound(Dm_inv: torch.Tensor, volume: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor
                         ) -> torch.Tensor:
    """Per tet and corner row, the sum of absolute entries of the rest element stiffness, (T, 4, 3).

    The linear-elastic element stiffness block of corners (a, b) is
    ``V (lam g_a g_b^T + mu g_b g_a^T + mu (g_a . g_b) I)`` with ``g`` the gradients of the
    barycentric coordinates (every law here has this tangent at rest).
    """
    out = []
    for s in range(0, Dm_inv.shape[0], _CHUNK):
        B, V, m, la = (t[s:s + _CHUNK] for t in (Dm_inv, volume, mu, lam))
        g = torch.cat([-B.sum(1, keepdim=True), B], 1)  # (c, 4, 3)
        gg = torch.einsum("tad,tbd->tab", g, g)
        eye = torch.eye(3, dtype=g.dtype, device=g.device)
        Kb = (la[:, None, None, None, None] * torch.einsum("tai,tbj->tabij", g, g)
              + m[:, None, None, None, None] * (torch.einsum("tbi,taj->tabij", g, g) + gg[..., None, None] * eye))
        out.append(V[:, None, None] * Kb.abs().sum((2, 4)))
    return torch.cat(out)


def stable_dt(model: Model, params: dict[str, torch.Tensor] | None = None, cfl: float = CFL) -> StabilityLimit:
    """The stability limit of the explicit step, ``cfl * 2 / sqrt(max_i R_i / m_i)`` over the free
    nodes (module docstring).

    Args:
        model: The model.
        params: Overrides of ``E``, ``nu``, ``density`` (as for the rollout).
        cfl: The constant (default :data:`CFL`).

    Returns:
        The limit; ``dt`` is inf when no node is free.
    """
    p = {"E": model.E, "nu": model.nu, "density": model.density}
    p.update({k: v for k, v in (params or {}).items() if k in p})
    mesh = model.mesh
    with torch.no_grad():
        E, nu, rho = (torch.as_tensor(p[k], device=model.device).detach().to(torch.float64).expand(model.n_tets)
                      for k in ("E", "nu", "density"))
        mu, lam = lame(E, nu)
        V = mesh.rest_volume.detach().to(torch.float64)
        R = _stiffness_row_bound(mesh.Dm_inv.detach().to(torch.float64), V, mu, lam)
        tets = mesh.tets.reshape(-1)
        rows = torch.zeros((model.n_nodes, 3), dtype=torch.float64, device=model.device).index_add_(
            0, tets, R.reshape(-1, 3))
        mass = torch.zeros(model.n_nodes, dtype=torch.float64, device=model.device).index_add_(
            0, tets, (rho * V / 4).repeat_interleave(4))
        w2 = rows.max(1).values / mass.clamp_min(1e-300)
        w2[model.kinematic] = 0.0  # prescribed rows: not part of the free system
        w2[mass <= 0] = 0.0  # unused vertices
        i = int(torch.argmax(w2))
        if float(w2[i]) <= 0:
            return StabilityLimit(math.inf, -1, math.nan, math.nan)
        around = (mesh.tets == i).any(1)
        c = torch.sqrt((lam + 2 * mu) / rho)[around].max()
        edge = mesh.edge_lengths.detach()[around].min()
        return StabilityLimit(cfl * 2.0 / math.sqrt(float(w2[i])), i, float(edge), float(c))


def _length(x: float) -> str:
    return f"{x * 1e3:.3g} mm" if x < 0.1 else f"{x:.3g} m"


def check_dt(model: Model, dt: float, params: dict[str, torch.Tensor] | None = None) -> StabilityLimit:
    """Refuse a step above the stability limit, saying the limit and how many substeps fit.

    Returns:
        The limit.

    Raises:
        ValueError: ``dt`` not a positive finite number, or above the limit.
    """
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt: expected a finite number > 0 [s], got {dt!r}")
    lim = stable_dt(model, params)
    if dt > lim.dt:
        n = math.ceil(dt / lim.dt * (1 - 1e-12))
        raise ValueError(
            f"dt {dt:.3g} s is above the stability limit {lim.dt:.3g} s of this mesh and material (smallest edge "
            f"{_length(lim.edge)}, p-wave speed {lim.wave_speed:.3g} m/s, at node {lim.node}); use substeps >= {n} "
            f"(dt {dt / n:.3g} s; Control.upsample({n}) spreads each control step over them)")
    return lim


class _Saved(NamedTuple):
    """What the adjoint of one step reads."""

    x: torch.Tensor
    v: torch.Tensor
    f: torch.Tensor  # elastic nodal forces at x [N]
    control: torch.Tensor


class Stepper:
    """Runs explicit steps of one model with step ``dt`` [s] (not checked here: see :func:`check_dt`).

    Args:
        model: The model.
        dt: Step [s].
    """

    def __init__(self, model: Model, dt: float) -> None:
        wp = init_warp()
        self._wp = wp
        self.model = model
        self.dt_value = float(dt)
        self.device = model.device
        self.dtype = model.dtype
        self._wdev = warp_device(self.device)
        self.k = K.KERNELS["float64" if model.dtype == torch.float64 else "float32"]
        self._cache: dict = {}
        f64 = model.dtype == torch.float64
        self._scalar = wp.float64 if f64 else wp.float32
        self._vec3 = wp.vec3d if f64 else wp.vec3f
        self._mat33 = wp.mat33d if f64 else wp.mat33f
        self.dt = self._scalar(dt)
        mesh = model.mesh
        n = model.n_nodes
        self.tets_t = mesh.tets.to(torch.int32).contiguous()
        self.law_t = model.law.to(torch.int32).contiguous()
        self.Dm_inv_t = mesh.Dm_inv.detach().contiguous()
        self.volume_t = mesh.rest_volume.detach().contiguous()
        kin = torch.full((n,), -1, dtype=torch.int32, device=self.device)
        kin[model.kinematic] = torch.arange(model.kinematic.numel(), dtype=torch.int32, device=self.device)
        load = torch.full((n,), -1, dtype=torch.int32, device=self.device)
        load[model.load_nodes] = torch.arange(model.load_nodes.numel(), dtype=torch.int32, device=self.device)
        self.kin_slot_t, self.load_slot_t = kin.contiguous(), load.contiguous()
        # anchors relative to the pivot (one extra row so that the array is never empty)
        rel = (model.anchors - model.pivot).detach()
        self.anchor_t = torch.cat([rel, rel.new_zeros(1, 3)]).contiguous()
        self.pivot = self._vec3(*model.pivot.detach().tolist())
        self.tets = wp.array(ptr=self.tets_t.data_ptr(), dtype=wp.int32, shape=tuple(self.tets_t.shape),
                             device=self._wdev)
        self.law = self._ints(self.law_t)
        self.Dm_inv = self._mats(self.Dm_inv_t)
        self.volume = self._scalars(self.volume_t)
        self.kin_slot, self.load_slot = self._ints(self.kin_slot_t), self._ints(self.load_slot_t)
        self.anchor = self._vecs(self.anchor_t)

    # -- Warp views of torch memory (contiguous tensors; the caller keeps them alive) ---------------

    def _view(self, t: torch.Tensor, dtype, shape):
        """Warp view of a contiguous tensor, cached by address, shape and type: wrapping costs more
        than a small kernel, and the allocator hands the same addresses out step after step."""
        if not t.is_contiguous():
            raise ValueError("internal: expected a contiguous tensor")
        key = (t.data_ptr(), shape, dtype)
        a = self._cache.get(key)
        if a is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            a = self._cache[key] = self._wp.array(ptr=t.data_ptr(), dtype=dtype, shape=shape, device=self._wdev)
        return a

    def _scalars(self, t: torch.Tensor):
        return self._view(t, self._scalar, (t.numel(),))

    def _vecs(self, t: torch.Tensor):
        return self._view(t, self._vec3, (t.numel() // 3,))

    def _mats(self, t: torch.Tensor):
        return self._view(t, self._mat33, (t.numel() // 9,))

    def _ints(self, t: torch.Tensor):
        return self._view(t, self._wp.int32, (t.numel(),))

    def _run(self, kernel, dim, inputs) -> None:
        launch(kernel, dim, inputs, self.device)

    # -- forward -------------------------------------------------------------------------------------

    def forces(self, x: torch.Tensor, E: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """Elastic nodal forces at positions ``x`` (N, 3) [m]: (N, 3) [N] (not differentiable)."""
        x, E, nu = x.contiguous(), E.contiguous(), nu.contiguous()
        f = torch.zeros_like(x)
        self._run(self.k["element_forces"], self.model.n_tets,
                  [self.tets, self._vecs(x), self.Dm_inv, self.volume, self.law, self._scalars(E), self._scalars(nu),
                   self._vecs(f)])
        return f

    def step(self, x: torch.Tensor, v: torch.Tensor, params: Sequence[torch.Tensor], control: torch.Tensor,
             keep: bool = False, contact=None, external: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, _Saved | None]:
        """One step from (x, v) under the packed control row ``control`` (12 + 3 M,).

        ``contact``: a :class:`~diffworld.sims.fem.rollout.ContactStep` (None: no contact); its
        object's pose is at the tail of the control row, its parameters after
        :data:`STEP_PARAMS` in ``params``, and its node forces join the elastic ones.

        ``external``: extra nodal forces (N, 3) [N] for this step (None: none), e.g. coupling
        forces a coupled simulator computed from this and another body's state; the adjoint hands
        back d loss / d external through ``adj_external`` of :meth:`step_adjoint`.

        Returns:
            x', v' and, when ``keep``, the step's saved intermediates.
        """
        E, nu, mass, damping, gravity = (t.contiguous() for t in params[:5])
        x, v, control = x.contiguous(), v.contiguous(), control.contiguous()
        f = self.forces(x, E, nu)
        if contact is not None:
            with torch.no_grad():
                f = (f + contact.node_forces(x, v, control, params[5:])).contiguous()
        if external is not None:
            if tuple(external.shape) != tuple(x.shape):
                raise ValueError(f"Stepper.step: expected 'external' of shape {tuple(x.shape)}, "
                                 f"got {tuple(external.shape)}")
            f = (f + external.detach().to(f.dtype)).contiguous()
        x1, v1 = torch.empty_like(x), torch.empty_like(v)
        self._run(self.k["integrate"], self.model.n_nodes,
                  [self._vecs(x), self._vecs(v), self._vecs(f), self._scalars(mass), self.kin_slot, self.load_slot,
                   self.anchor, self.pivot, self._scalars(control), self._vecs(gravity), self._scalars(damping),
                   self.dt, self._vecs(x1), self._vecs(v1)])
        return x1, v1, (_Saved(x, v, f, control) if keep else None)

    # -- adjoint -------------------------------------------------------------------------------------

    def step_adjoint(self, s: _Saved, params: Sequence[torch.Tensor], adj_x1: torch.Tensor | None,
                     adj_v1: torch.Tensor | None, adj_params: Sequence[torch.Tensor],
                     adj_control: torch.Tensor, contact=None, adj_external: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of :meth:`step`: d loss / d (x, v) from d loss / d (x', v') (None: zero);
        accumulates into ``adj_params`` (:data:`STEP_PARAMS` order, then the contact parameters;
        contiguous) and ``adj_control`` (the step's row, contiguous). The contact forces (when
        ``contact``) are recomputed by torch and differentiated by autograd. ``adj_external``
        (N, 3), when given, receives d loss / d (the step's ``external`` forces) (added in)."""
        E, nu, mass, damping, gravity = (t.contiguous() for t in params[:5])
        aE, anu, amass, adamp, agrav = adj_params[:5]
        gx = torch.zeros_like(s.x) if adj_x1 is None else adj_x1.contiguous()
        gv = torch.zeros_like(s.v) if adj_v1 is None else adj_v1.contiguous()
        adj_x, adj_v, adj_f = torch.empty_like(s.x), torch.empty_like(s.v), torch.empty_like(s.f)
        w, vec = self._scalars, self._vecs
        self._run(self.k["integrate_adjoint"], self.model.n_nodes,
                  [vec(s.x), vec(s.v), vec(s.f), w(mass), self.kin_slot, self.load_slot, self.anchor,
                   w(s.control), vec(gravity), w(damping), self.dt, vec(gx), vec(gv), vec(adj_x), vec(adj_v),
                   vec(adj_f), w(amass), w(adj_control), vec(agrav), w(adamp)])
        self._run(self.k["element_forces_adjoint"], self.model.n_tets,
                  [self.tets, vec(s.x), self.Dm_inv, self.volume, self.law, w(E), w(nu), vec(adj_f), vec(adj_x),
                   w(aE), w(anu)])
        if adj_external is not None:
            adj_external += adj_f
        if contact is not None:
            ax, av = contact.adjoint(s.x, s.v, s.control, params[5:], adj_f, adj_control, adj_params[5:])
            adj_x += ax
            adj_v += av
        return adj_x, adj_v
