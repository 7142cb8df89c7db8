"""FEM gels and an XPBD rope in one differentiable step: penalty contact between the gels'
contact-surface triangles and the rope's particle spheres, equal and opposite (issue 15, item 2).

One coupled step of ``dt`` from the state (gel x, gel v for every gel; rope x, rope v) at time n:

1. for every gel, the closest contact-surface triangle of each rope particle (a Warp BVH,
   ``wp.Mesh`` refit to the gel's positions, queried in float32 for the triangle id only: a
   discrete choice without gradient), then in torch, in the model's dtype, the closest point
   ``c = sum_k b_k x_k`` on that triangle, the signed distance ``phi`` of the particle's centre
   (the plane distance when ``c`` is inside the triangle, else ``+-|p - c|`` signed by the side of
   the triangle's plane) and the normal ``n = d phi / d p`` (out of the gel);
2. the penalty force on the particle (law below), and minus it on the triangle's three nodes
   with the weights ``b_k``;
3. one explicit FEM step of each gel with its nodal forces
   (:meth:`~diffworld.sims.fem.solver.Stepper.step` ``external=``) and one XPBD step of the rope
   with the sum of its forces (:meth:`~diffworld.sims.cable.solver.RopeStepper.step`
   ``external=``; the rope's own table contact is added there).

Law (particle of radius ``r``, ``v_rel = v_p - sum_k b_k v_k``, ``v_n = v_rel . n``), the
conventions of :mod:`diffworld.sims.fem.contact` and the same :class:`ContactParams`:

* penetration ``d = ramp(r - phi)``, normal force ``f_n = k_n d + k_d d ramp(-v_n)`` along ``n``;
* friction ``f_t = -min(k_t s, mu f_n) v_t / s``, ``s = sqrt(|v_t|^2 + eps_v^2)``: regularized
  Coulomb, viscous below the cone and capped at ``mu f_n``;
* ``ramp`` is ``max(., 0)`` or a softplus of width ``penetration_width`` [m] /
  ``damping_width`` [m/s]; ``friction_exponent`` smooths the min.

Units: ``k_n`` [N/m] per particle, ``k_d`` [N s/m^2], ``k_t`` [N s/m], ``mu`` [-], ``eps_v`` [m/s].

Both sides see the same forces over the same step, so the impulses are exactly equal and
opposite. Everything is explicit in the contact: ``dt`` must satisfy each gel's explicit limit
(:func:`~diffworld.sims.fem.solver.check_dt`) and resolve the penalty,
``k_n dt^2 / m < 4`` for the lightest rope particle and gel contact node
(:func:`contact_stable_dt`); both are checked.

Gradients: the coupled step's adjoint runs the FEM's hand-written adjoint and the rope's tape,
each handing back the adjoint of its ``external`` forces, then differentiates the contact forces
by torch autograd on a recomputation (the triangle ids saved from the forward) w.r.t. both
states and ``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v``. Gradients reach the gels' controls
(poses of their kinematic bases), their parameters, the rope's parameters and pinned trajectory,
the contact parameters and both initial states, through checkpoint windows.

Differences from DiffTactile (shared/reference/tactile.md): a BVH instead of a brute-force
nearest-centroid search, the true closest point (not 1/3 per triangle node), a smooth friction
regularization instead of a switch at ``|v_t| = 1e-4``, and gradients through the whole horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from diffworld.engine.rollout import checkpointed_rollout
from diffworld.sims.cable.model import Control as RopeControl
from diffworld.sims.cable.model import Model as RopeModel
from diffworld.sims.cable.model import State as RopeState
from diffworld.sims.cable.rollout import check_ground_dt, rope_params
from diffworld.sims.cable.solver import RopeStepper
from diffworld.sims.coupling.gel_bvh import GelBvh
from diffworld.geometry.triangles import SurfaceTopology, closest_point_on_triangle
from diffworld.sims.fem.contact import ContactParams, smooth_min, softplus_ramp
from diffworld.sims.fem.model import Control as FemControl
from diffworld.sims.fem.model import Model as FemModel
from diffworld.sims.fem.model import State as FemState
from diffworld.sims.fem.rollout import PARAMS as FEM_PARAMS
from diffworld.sims.fem.rollout import SimulationError
from diffworld.sims.fem.solver import Stepper, check_dt

__all__ = ["CONTACT_PARAMS", "CableCoupling", "CableGel", "CoupledState", "FemCableRollout", "FemCableSimulator",
           "GelRopeForces", "closest_faces", "closest_point_on_triangle", "contact_stable_dt", "fem_cable_rollout",
           "gel_rope_forces"]

CONTACT_PARAMS = ("k_n", "k_d", "k_t", "mu", "eps_v")


def closest_faces(x_gel: torch.Tensor, faces: torch.Tensor, points: torch.Tensor, max_dist: float) -> torch.Tensor:
    """The closest of ``faces`` (F, 3) on a gel at ``x_gel`` (N_g, 3) [m] to each of ``points``
    (K, 3) [m], by a Warp BVH: (K,) int64 rows of ``faces``, -1 where none is within ``max_dist``
    [m]. Not differentiable (a discrete choice)."""
    return GelBvh(faces, x_gel.shape[0], x_gel.device).query(x_gel, points, max_dist)


class GelRopeForces(NamedTuple):
    """Contact between one gel and the rope (:func:`gel_rope_forces`).

    Attributes:
        gel: Forces on the gel's nodes [N], (N_g, 3).
        rope: Forces on the rope's particles [N], (N_r, 3); ``gel.sum(0) == -rope.sum(0)``.
        penetration: ``d`` per rope particle [m], (N_r,) (0 where no triangle is near).
        normal_force: ``f_n`` per rope particle [N], (N_r,).
    """

    gel: torch.Tensor
    rope: torch.Tensor
    penetration: torch.Tensor
    normal_force: torch.Tensor


def gel_rope_forces(x_gel: torch.Tensor, v_gel: torch.Tensor, faces: torch.Tensor, face_ids: torch.Tensor,
                    x_rope: torch.Tensor, v_rope: torch.Tensor, radius: float, cp: Sequence[torch.Tensor],
                    law: ContactParams, topology: SurfaceTopology | None = None) -> GelRopeForces:
    """The contact law of the module docstring (torch, differentiable).

    Args:
        x_gel, v_gel: Gel node positions [m] and velocities [m/s], (N_g, 3).
        faces: (F, 3) int64 contact triangles of the gel (outward).
        face_ids: (N_r,) int64 the triangle (row of ``faces``) of each rope particle, -1: none.
        x_rope, v_rope: Rope particles [m], [m/s], (N_r, 3).
        radius: Rope radius [m].
        cp: ``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v`` (0-d tensors).
        law: The smoothing settings (its ``penetration_width``, ``damping_width``,
            ``friction_exponent``).
        topology: The edge adjacency of ``faces``: distances to edges and vertices are signed by
            their pseudo-normals (a particle beyond the rim of an open contact surface is outside);
            default (None) the side of the triangle's plane.
    """
    k_n, k_d, k_t, mu, eps_v = cp
    rows = (face_ids >= 0).nonzero()[:, 0]
    tri = faces[face_ids[rows]]
    p = x_rope[rows]
    fn = None if topology is None else topology.feature_normals(x_gel, face_ids[rows])
    phi, n, bary = closest_point_on_triangle(p, x_gel[tri[:, 0]], x_gel[tri[:, 1]], x_gel[tri[:, 2]], fn)
    d = softplus_ramp(radius - phi, law.penetration_width)
    v_rel = v_rope[rows] - (bary[:, :, None] * v_gel[tri]).sum(1)
    v_n = (v_rel * n).sum(-1)
    fn = k_n * d + k_d * d * softplus_ramp(-v_n, law.damping_width)
    v_t = v_rel - v_n[:, None] * n
    s = torch.sqrt((v_t * v_t).sum(-1) + eps_v * eps_v)
    ft = smooth_min(k_t * s, mu * fn, law.friction_exponent)
    f = fn[:, None] * n - (ft / s)[:, None] * v_t
    rope = torch.zeros_like(x_rope).index_add(0, rows, f)
    gel = torch.zeros_like(x_gel).index_add(0, tri.reshape(-1), (-bary[:, :, None] * f[:, None, :]).reshape(-1, 3))
    pen = torch.zeros(x_rope.shape[0], dtype=x_rope.dtype, device=x_rope.device).index_add(0, rows, d)
    fnr = torch.zeros_like(pen).index_add(0, rows, fn)
    return GelRopeForces(gel, rope, pen, fnr)


@dataclass
class CableGel:
    """One FEM gel body of the coupling.

    Attributes:
        model: Its FEM model (explicit integrator; the kinematic base follows ``control``).
        faces: (F, 3) int64 outward triangles that touch the rope, e.g. ``SensorGeometry.contact_faces``.
        control: Per-step pose of the kinematic nodes (None: held at their anchors); its tensors
            may require gradients.
        params: Overrides of the FEM parameters by name (``E``, ``nu``, ``density``, ``damping``,
            ``gravity``), tensors may require gradients.
        name: A label for messages.
    """

    model: FemModel
    faces: torch.Tensor
    control: FemControl | None = None
    params: dict | None = None
    name: str = "gel"


@dataclass
class CableCoupling:
    """The gel-rope contact: parameters (``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v`` numbers or
    0-d tensors that may require gradients, and the smoothing settings) and the BVH query range.

    Attributes:
        params: The contact law's parameters (module docstring).
        query_distance: Rope particles farther than this from a gel's triangles [m] are not
            tested (default: twice the rope radius plus 20 penetration widths).
    """

    params: ContactParams = field(default_factory=ContactParams)
    query_distance: float | None = None


class CoupledState(NamedTuple):
    """State of the coupled system.

    Attributes:
        gels: One :class:`~diffworld.sims.fem.model.State` per gel.
        rope: The rope's :class:`~diffworld.sims.cable.model.State`.
    """

    gels: tuple
    rope: RopeState


class FemCableRollout(NamedTuple):
    """Result of :func:`fem_cable_rollout`.

    Attributes:
        states: Recorded states (index 0 the initial one).
        steps: Step index of each.
        penetration: (S, G) deepest rope-particle penetration into each gel during each step
            [m] (``radius - phi``, 0 without contact; diagnostic, not differentiable).
        gel_force: (S, G, 3) total contact force on each gel during each step [N] (minus the
            force on the rope; diagnostic).
    """

    states: list[CoupledState]
    steps: list[int]
    penetration: torch.Tensor
    gel_force: torch.Tensor

    @property
    def final(self) -> CoupledState:
        return self.states[-1]


class FemCableSimulator:
    """The coupled step as an :class:`~diffworld.engine.rollout.Simulator`.

    State tuple: ``(x_1, v_1, ..., x_G, v_G, x_rope, v_rope)``. Parameters: the 5 FEM step
    parameters of each gel, then the rope's step parameters (5, plus 5 with a table), then the 5
    contact parameters. Control row: each gel's packed FEM row, then the rope's (3 P).
    """

    def __init__(self, gel_steppers: Sequence[Stepper], faces: Sequence[torch.Tensor], rope: RopeStepper,
                 coupling: CableCoupling, gel_widths: Sequence[int], n_rope_params: int) -> None:
        self.gels = list(gel_steppers)
        self.faces = [f.to(device=rope.device, dtype=torch.int64) for f in faces]
        self.rope = rope
        self.law = coupling.params
        r = rope.model.radius
        self.query = (coupling.query_distance if coupling.query_distance is not None else
                      2 * r + 20 * coupling.params.penetration_width)
        self.bvh = [GelBvh(f, s.model.n_nodes, rope.device) for f, s in zip(self.faces, self.gels)]
        self.topology = [SurfaceTopology(f) for f in self.faces]
        self.row_off = [0]
        for w in gel_widths:
            self.row_off.append(self.row_off[-1] + w)
        self.n_rope_params = n_rope_params
        self.penetration: dict[int, torch.Tensor] = {}
        self.gel_force: dict[int, torch.Tensor] = {}

    def _split(self, params):
        g = len(self.gels)
        gp = [params[5 * i:5 * i + 5] for i in range(g)]
        rp = params[5 * g:5 * g + self.n_rope_params]
        cp = params[5 * g + self.n_rope_params:]
        return gp, rp, cp

    def forces(self, state, cp, face_ids) -> list[GelRopeForces]:
        g = len(self.gels)
        xr, vr = state[2 * g], state[2 * g + 1]
        return [gel_rope_forces(state[2 * i], state[2 * i + 1], self.faces[i], face_ids[i], xr, vr,
                                self.rope.model.radius, cp, self.law, self.topology[i]) for i in range(g)]

    def step(self, state, params, control, index: int, keep: bool):
        g = len(self.gels)
        gp, rp, cp = self._split(params)
        xr = state[2 * g]
        face_ids = [self.bvh[i].query(state[2 * i], xr, self.query) for i in range(g)]
        with torch.no_grad():
            contact = self.forces(state, cp, face_ids)
        self.penetration[index] = torch.stack([c.penetration.max() if c.penetration.numel() else
                                               c.penetration.new_zeros(()) for c in contact]).cpu()
        self.gel_force[index] = torch.stack([c.gel.sum(0) for c in contact]).cpu()
        out, saved_gels = [], []
        for i in range(g):
            row = control[self.row_off[i]:self.row_off[i + 1]]
            x1, v1, s = self.gels[i].step(state[2 * i], state[2 * i + 1], gp[i], row, keep,
                                          external=contact[i].gel)
            out += [x1, v1]
            saved_gels.append(s)
        f_rope = contact[0].rope
        for c in contact[1:]:
            f_rope = f_rope + c.rope
        rrow = control[self.row_off[-1]:]
        xr1, vr1, saved_rope = self.rope.step(xr, state[2 * g + 1], rp, rrow if rrow.numel() else None, keep,
                                              external=f_rope)
        out += [xr1, vr1]
        saved = (tuple(state), face_ids, saved_gels, saved_rope) if keep else None
        return tuple(out), saved

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        g = len(self.gels)
        state, face_ids, saved_gels, saved_rope = saved
        gp, rp, cp = self._split(params)
        agp, arp, acp = self._split(adj_params)
        adj_in, adj_ext = [], []
        for i in range(g):
            ext = torch.zeros_like(state[2 * i])
            row = adj_control[self.row_off[i]:self.row_off[i + 1]]
            ax, av = self.gels[i].step_adjoint(saved_gels[i], gp[i], adj_out[2 * i], adj_out[2 * i + 1], agp[i],
                                               row, adj_external=ext)
            adj_in += [ax, av]
            adj_ext.append(ext)
        ext_r = torch.zeros_like(state[2 * g])
        rrow = adj_control[self.row_off[-1]:]
        ax, av = self.rope.step_adjoint(saved_rope, rp, adj_out[2 * g], adj_out[2 * g + 1], arp,
                                        rrow if rrow.numel() else None, adj_external=ext_r)
        adj_in += [ax, av]
        with torch.enable_grad():
            sg = [t.detach().requires_grad_(True) for t in state]
            cg = [t.detach().requires_grad_(True) for t in cp]
            contact = self.forces(sg, cg, face_ids)
            outs, gouts = [], []
            for i, c in enumerate(contact):
                outs += [c.gel, c.rope]
                gouts += [adj_ext[i], ext_r]
            grads = torch.autograd.grad(outs, sg + cg, gouts, allow_unused=True)
        for a, gi in zip(adj_in, grads[:len(sg)]):
            if gi is not None:
                a += gi
        for a, gi in zip(acp, grads[len(sg):]):
            if gi is not None:
                a += gi.reshape(a.shape)
        return tuple(adj_in)


def contact_stable_dt(gels: Sequence[CableGel], rope: RopeModel, k_n: float,
                      rope_masses: torch.Tensor | None = None) -> float:
    """The largest step that resolves the penalty ``k_n`` [N/m]: ``2 sqrt(m / k_n)`` for the
    lightest free rope particle and gel contact node (inf for ``k_n = 0``)."""
    if k_n <= 0:
        return math.inf
    m = rope.masses() if rope_masses is None else rope_masses
    free = torch.ones(rope.n_particles, dtype=torch.bool, device=rope.device)
    free[rope.pinned] = False
    masses = [float(m.detach()[free].min())] if bool(free.any()) else []
    for gel in gels:
        mg = gel.model.masses().detach()
        nodes = torch.unique(gel.faces.reshape(-1))
        kin = torch.isin(nodes, gel.model.kinematic)
        if bool((~kin).any()):
            masses.append(float(mg[nodes[~kin]].min()))
    if not masses:
        return math.inf
    return 2.0 * math.sqrt(min(masses) / k_n)


def _fem_params(model: FemModel, params: dict | None, name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The 5 FEM step parameters of a gel (fem.solver.STEP_PARAMS order) with its overrides, and
    the per-tet density."""
    merged = {k: getattr(model, k) for k in FEM_PARAMS}
    for k, t in (params or {}).items():
        if k not in FEM_PARAMS:
            raise ValueError(f"fem_cable_rollout: unknown parameter {k!r} of gel {name!r}; expected one of "
                             f"{list(FEM_PARAMS)}")
        merged[k] = t
    f = dict(dtype=model.dtype, device=model.device)
    E, nu, rho = (torch.as_tensor(merged[k], device=model.device).to(model.dtype).expand(model.n_tets)
                  for k in ("E", "nu", "density"))
    damping = torch.as_tensor(merged["damping"], **f).reshape(1)
    gravity = torch.as_tensor(merged["gravity"], **f).reshape(3)
    return [t.contiguous() for t in (E, nu, model.masses(rho), damping, gravity)], rho


def _contact_params(cp: ContactParams, dtype, device) -> list[torch.Tensor]:
    out = []
    for name in CONTACT_PARAMS:
        t = getattr(cp, name)
        t = torch.as_tensor(t, device=device).to(dtype) if not isinstance(t, torch.Tensor) else t.to(dtype=dtype,
                                                                                                        device=device)
        if t.numel() != 1:
            raise ValueError(f"fem_cable_rollout: expected coupling.params.{name} a scalar, got shape "
                             f"{tuple(t.shape)}")
        v = float(t.detach())
        if not math.isfinite(v) or v < 0 or (name == "eps_v" and v <= 0):
            raise ValueError(f"fem_cable_rollout: coupling.params.{name} must be finite and "
                             f"{'> 0' if name == 'eps_v' else '>= 0'}, got {v:g}")
        out.append(t.reshape(()))
    return out


def _check_start_outside(gel: CableGel, x_gel: torch.Tensor, x_rope: torch.Tensor, radius: float) -> None:
    """Refuse a rope that starts inside a gel (its particles are spheres of ``radius``): the
    penalty would fire at once with k_n times the depth. A touch is fine."""
    with torch.no_grad():
        xg, xr = x_gel.detach().to(x_rope), x_rope.detach()
        ids = closest_faces(xg, gel.faces, xr, 2 * radius)
        rows = (ids >= 0).nonzero()[:, 0]
        if rows.numel() == 0:
            return
        tri = gel.faces[ids[rows]]
        fn = SurfaceTopology(gel.faces).feature_normals(xg, ids[rows])
        phi, _, _ = closest_point_on_triangle(xr[rows], xg[tri[:, 0]], xg[tri[:, 1]], xg[tri[:, 2]], fn)
        depth = radius - phi
        k = int(torch.argmax(depth))
    if float(depth[k]) > 1e-9:
        raise ValueError(f"fem_cable_rollout: rope particle {int(rows[k])} starts {float(depth[k]) * 1e3:.3g} mm inside "
                         f"gel {gel.name!r} (its sphere of radius {radius * 1e3:.3g} mm, centre "
                         f"{float(phi[k]) * 1e3:.3g} mm from the gel surface); place the rope so that it at most "
                         f"touches the gel at the start")


def fem_cable_rollout(gels: Sequence[CableGel], rope: RopeModel, state: CoupledState, dt: float,
                      n_steps: int, coupling: CableCoupling | None = None, rope_control: RopeControl | None = None,
                      *, rope_params_override: dict | None = None, window: int = 32,
                      record_every: int | None = None, check: bool = True,
                      keep_last_window: bool = True, check_start: bool = False) -> FemCableRollout:
    """Simulate gels and a rope in contact, differentiably, in checkpoint windows.

    Args:
        gels: The FEM bodies (one or more, e.g. both pads of a gripper).
        rope: The rope model (its table and pinned particles included).
        state: Initial state (tensors may require gradients).
        dt: Step [s] (checked against each gel's explicit limit and the contact penalty).
        n_steps: Number of steps.
        coupling: Contact parameters (default :class:`CableCoupling` ()).
        rope_control: Pinned-particle targets per step (None: held at rest).
        rope_params_override: Overrides of the rope's parameters
            (:data:`diffworld.sims.cable.PARAMS`).
        window: Steps per checkpoint window (the numbers do not depend on it).
        record_every: Record every this many steps (default: only the final state).
        check: Stop with ``SimulationError`` on NaN/Inf in a recorded state.
        check_start: Refuse (ValueError, by how much) a rope that starts inside a gel. Off by
            default: a rollout continued from a state in contact starts inside on purpose.
        keep_last_window: Keep the last window's intermediates from the forward.

    Returns:
        :class:`FemCableRollout`.

    Raises:
        TypeError, ValueError: Bad inputs (the message names them), dt above a stability limit.
        SimulationError: NaN/Inf.
    """
    if not isinstance(rope, RopeModel):
        raise TypeError(f"fem_cable_rollout: expected 'rope' a cable.Model, got {type(rope).__name__}")
    gels = list(gels)
    if not gels or not all(isinstance(g, CableGel) for g in gels):
        raise TypeError("fem_cable_rollout: expected 'gels' a non-empty sequence of CableGel")
    coupling = coupling or CableCoupling()
    if not isinstance(coupling, CableCoupling):
        raise TypeError(f"fem_cable_rollout: expected 'coupling' a CableCoupling, got {type(coupling).__name__}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"fem_cable_rollout: expected n_steps an integer >= 0, got {n_steps!r}")
    if not isinstance(state, CoupledState) or len(state.gels) != len(gels):
        raise TypeError(f"fem_cable_rollout: expected 'state' a CoupledState with {len(gels)} gel state(s)")
    dtype, device = rope.dtype, rope.device
    tensors, rows, plist, widths, steppers = [], [], [], [], []
    for gel in gels:
        m = gel.model
        if m.dtype != dtype:
            raise TypeError(f"fem_cable_rollout: gel {gel.name!r} is {m.dtype}, the rope {dtype}")
        f = gel.faces
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[1] != 3 or f.dtype.is_floating_point:
            raise ValueError(f"fem_cable_rollout: expected gel {gel.name!r} faces an (F, 3) integer tensor")
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= m.n_nodes):
            raise ValueError(f"fem_cable_rollout: gel {gel.name!r} faces must index nodes in [0, {m.n_nodes})")
        gs = state.gels[len(tensors) // 2]
        for nm, t in zip(("x", "v"), gs):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (m.n_nodes, 3):
                raise ValueError(f"fem_cable_rollout: expected gel {gel.name!r} state.{nm} of shape ({m.n_nodes}, 3)")
        tensors += [gs[0].to(dtype), gs[1].to(dtype)]
        p, rho = _fem_params(m, gel.params, gel.name)
        check_dt(m, dt, {"E": p[0], "nu": p[1], "density": rho})
        plist += p
        r = (gel.control or FemControl()).rows(m, n_steps)
        rows.append(r)
        widths.append(r.shape[1])
        steppers.append(Stepper(m, dt))
    rs = state.rope
    for nm, t in zip(("x", "v"), rs):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (rope.n_particles, 3):
            raise ValueError(f"fem_cable_rollout: expected rope state.{nm} of shape ({rope.n_particles}, 3)")
    tensors += [rs[0].to(dtype), rs[1].to(dtype)]
    rp = rope_params(rope, rope_params_override)
    rope_stepper = RopeStepper(rope, dt)
    check_ground_dt(rope, rp, dt)
    plist += rp
    cps = _contact_params(coupling.params, dtype, device)
    plist += cps
    limit = contact_stable_dt(gels, rope, float(cps[0].detach()), rp[0])
    if dt >= limit:
        raise ValueError(f"fem_cable_rollout: dt {dt:.3g} s cannot resolve the contact stiffness k_n "
                         f"{float(cps[0]):g} N/m (need dt < {limit:.3g} s, or a smaller k_n)")
    rows.append((rope_control or RopeControl()).rows(rope, n_steps))
    control = torch.cat(rows, 1).contiguous()
    if check_start and n_steps > 0:
        for g, gel in enumerate(gels):
            _check_start_outside(gel, state.gels[g][0], rs[0], float(rope.radius))
    sim = FemCableSimulator(steppers, [g.faces for g in gels], rope_stepper, coupling, widths, len(rp))

    def check_recorded(st, k: int) -> None:
        for t in st:
            if not bool(torch.isfinite(t).all()):
                raise SimulationError(f"fem_cable_rollout: non-finite state after step {k} (t = {k * dt:.4g} s); "
                                      f"check dt, k_n and the materials")

    traj = checkpointed_rollout(sim, tuple(tensors), n_steps, control, plist, window=window,
                                record_every=record_every, keep_last_window=keep_last_window,
                                check=check_recorded if check else None)
    g = len(gels)

    def unpack(st) -> CoupledState:
        return CoupledState(tuple(FemState(st[2 * i], st[2 * i + 1]) for i in range(g)),
                            RopeState(st[2 * g], st[2 * g + 1]))

    states = [state] + [unpack(st) for st in traj.states[1:]]
    pen = (torch.stack([sim.penetration[i] for i in range(n_steps)]) if n_steps else torch.zeros(0, g))
    force = (torch.stack([sim.gel_force[i] for i in range(n_steps)]) if n_steps else torch.zeros(0, g, 3))
    return FemCableRollout(states, traj.steps, pen, force)
