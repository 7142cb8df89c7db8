"""FEM gels and MPM bodies in one differentiable step: penalty contact between the gels' surface
triangles and the MPM particles, equal and opposite, two-way (issue 15, items 2 and 3).

One coupled step, of the shared step ``dt`` (the MPM model's ``dt``):

1. MPM P2G from the particles at time n (grid momentum ``mv_i`` and mass ``m_i`` per node);
2. for every particle near a gel: the closest gel surface triangle (a Warp BVH, ``wp.Mesh``
   refit to the gel's positions at time n, queried in float32 for the triangle id only), then in
   torch, in the model's dtype, the closest point on that triangle, the signed distance ``phi``
   (signed at edges and vertices by their pseudo-normals,
   :class:`~diffworld.geometry.triangles.SurfaceTopology`) and the contact normal ``n`` (out of
   the gel), and the penalty force ``f_p`` on the particle (law below);
3. the impulse ``f_p dt`` is spread onto the grid with the particle's quadratic B-spline weights
   (as P2G spreads its momentum) before the grid update (gravity, colliders, walls) and G2P: the
   MPM :class:`~diffworld.sims.mpm.solver.GridForce` hook; ``-f_p`` goes to the triangle's three
   nodes with the barycentric weights of the closest point, and the gels take one explicit FEM
   step with those nodal forces (``external=``) from their state at time n.

Law (particle p of volume ``V_p``, gel triangle with closest point ``c = sum_k b_k x_k``;
``v_rel = v_p - sum_k b_k v_k``, ``v_n = v_rel . n``):

* ``phi = (x_p - x_a) . n_tri`` when the closest point is inside the triangle (the plane
  distance), else ``+-|x_p - c|``; ``n = d phi / d x`` (the face normal, or the direction from the
  closest edge/vertex point): continuous, and C1 across the face/edge region boundaries;
* the particle is a ball of radius ``r_p = V_p^(1/3) / 2`` (half its spacing: the body's surface
  lies there, not at the particle centres): penetration ``d = ramp(r_p - phi)``, normal force
  ``f_n = k_n d + k_d d ramp(-v_n)`` along ``n`` (DiffTactile's ``-(k_n + k_d max(-v_n, 0)) sdf``),
  friction ``f_t = -min(k_t s, mu f_n) v_t / s`` with ``s = sqrt(|v_t|^2 + eps_v^2)``; ``ramp`` is
  ``max(., 0)`` or a softplus of width ``penetration_width`` [m] / ``damping_width`` [m/s], and
  ``friction_exponent`` makes the min smooth, exactly as
  :class:`~diffworld.sims.fem.contact.ContactParams` documents for the rigid contact (the same
  dataclass is used here);
* the force on particle p is ``a_p (f_n n + f_t)`` with ``a_p = V_p^(2/3) / dx^2``, its share of
  a ``dx x dx`` patch of surface: ``k_n`` [N/m], ``k_d`` [N s/m^2] and ``k_t`` [N s/m] are the
  coefficients of such a patch (the contact is a pressure law, the same whatever ``ppc``).

Why particles and not grid nodes (DiffTactile's choice, and this module's until 2026-12): a grid
node is fixed in space, so its penetration grows as a gel advances whether or not the body
retreats, and the node's mass comes from particles up to 1.5 cells away. The force was then no
function of the relative position: a pad moving at 5 cm/s launched a free block at 25 cm/s
(measured), the force on a block at a fixed gap to the pad pulsed as the pad crossed grid
planes, and bodies felt the gel 1.5 cells before touching it. The particle law is a potential of
the relative positions (plus friction and damping), so an elastic collision cannot gain energy
(tests/sims/test_fem_mpm.py).

Differences from DiffTactile (shared/reference/tactile.md, "Contact (penalty)"): particles
instead of occupied grid nodes (above); a BVH query instead of a brute-force nearest-centroid
search; the true closest point with a distance that is continuous off the triangle (not a plane
distance with an inside test); forces split with the closest point's barycentric weights (so the
force acts where the contact is) instead of 1/3 each; smooth ramps and regularized friction
without a switch at ``|v_t| = 1e-4``; and gradients through the whole horizon (no
per-control-step truncation).

Time stepping. One shared ``dt`` (the MPM model's): both solvers are explicit, the coupling
forces are computed from the state at time n and applied over the same step, so the impulses on
the two sides are exactly equal and opposite and total momentum changes only by external and
kinematic forces (tests/sims/test_fem_mpm.py). ``dt`` must satisfy the gel's explicit limit
(:func:`~diffworld.sims.fem.solver.check_dt`, refused with the number of substeps needed), the
MPM's (:func:`~diffworld.sims.mpm.rollout.stable_dt`, checked) and the penalty's
(:func:`contact_stable_dt`, checked). Controls given per control step are spread over substeps by
the caller (:meth:`diffworld.sims.fem.Control.upsample`, collider keyframes).

Gradients. The whole coupled step is differentiated: MPM's hand-written adjoints, the FEM's
hand-written adjoints, and the coupling forces by torch autograd on a recomputation (the triangle
ids are saved from the forward; they are a discrete choice with no gradient), including the
particles' B-spline weights, so gradients reach the particles' positions and velocities. Within a face
region the closest point and the distance are smooth; switching between coplanar triangles is
continuous in value and gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from diffworld.engine.rollout import checkpointed_rollout
from diffworld.sims.common.colliders import COLLIDER_STATE
from diffworld.sims.coupling.gel_bvh import GelBvh
from diffworld.sims.fem import model as fem_model
from diffworld.geometry.triangles import SurfaceTopology, closest_point_on_triangle
from diffworld.sims.fem.contact import ContactParams, smooth_min, softplus_ramp
from diffworld.sims.fem.rollout import SimulationError as FemSimulationError
from diffworld.sims.fem.solver import Stepper as FemStepper
from diffworld.sims.fem.solver import check_dt
from diffworld.sims.mpm.rollout import check_state as mpm_check_state
from diffworld.sims.mpm.rollout import stable_dt as mpm_stable_dt
from diffworld.sims.mpm.solver import PARTICLE_PARAMS, GridBox, Model as MpmModel, State as MpmState
from diffworld.sims.mpm.solver import Stepper as MpmStepper

__all__ = ["CONTACT_PARAMS", "CoupledRollout", "Gel", "coupled_rollout", "contact_stable_dt", "gel_surface_distance",
           "particle_stiffness_ratio"]

# Contact parameters that travel as differentiable rollout parameters (one 0-d tensor each, per gel).
CONTACT_PARAMS = ("k_n", "k_d", "k_t", "mu", "eps_v")
# FEM step parameters per gel (diffworld.sims.fem.solver.STEP_PARAMS order).
_GEL_PARAMS = ("E", "nu", "density", "damping", "gravity")
# The explicit penalty limit 2 / omega is scaled by this, as the FEM's CFL.
CONTACT_CFL = 0.9


@dataclass
class Gel:
    """An FEM gel body taking part in the coupling.

    Attributes:
        model: Its FEM model (explicit integrator; its kinematic nodes follow its control).
        contact: Penalty contact parameters with the MPM bodies; ``k_n``, ``k_d``, ``k_t``,
            ``mu``, ``eps_v`` are scalars (numbers or 0-d tensors, which may require gradients):
            ``k_n`` [N/m] per ``dx x dx`` patch of surface (module docstring), ``k_d`` [N s/m^2],
            ``k_t`` [N s/m], ``mu`` [-], ``eps_v`` [m/s].
        faces: (F, 3) int64 outward triangles that can touch MPM bodies; default the mesh's whole
            boundary (``mesh.surface_faces()``), a closed surface, so every side of the gel
            pushes back.
        name: A label for messages.
    """

    model: fem_model.Model
    contact: ContactParams = field(default_factory=ContactParams)
    faces: torch.Tensor | None = None
    name: str = "gel"


class CoupledRollout(NamedTuple):
    """Result of :func:`coupled_rollout`. Index r runs over the recorded states (0 = initial).

    Attributes:
        gel_states: ``gel_states[r][g]`` the :class:`~diffworld.sims.fem.model.State` of gel g.
        mpm_states: ``mpm_states[r]`` the :class:`~diffworld.sims.mpm.solver.State`.
        gel_forces: ``gel_forces[r][g]`` the contact forces on gel g's nodes [N], (N_g, 3), during
            the step that ended at record r (zeros for r = 0). Differentiable (tactile losses).
        steps: Step index of each record.
        penetration: (R, G) deepest penetration of an MPM particle into each gel [m] at each
            record (0 when none; a diagnostic, not differentiable).
    """

    gel_states: list[list[fem_model.State]]
    mpm_states: list[MpmState]
    gel_forces: list[list[torch.Tensor]]
    steps: list[int]
    penetration: torch.Tensor

    @property
    def final_gels(self) -> list[fem_model.State]:
        return self.gel_states[-1]

    @property
    def final_mpm(self) -> MpmState:
        return self.mpm_states[-1]


# ------------------------------------------------------------------------------------------------
# Geometry and the force law (torch; differentiated by autograd)
# ------------------------------------------------------------------------------------------------

class _PairForces(NamedTuple):
    node: torch.Tensor  # (K, 3) forces on the particles [N]
    gel: torch.Tensor  # (N, 3) forces on the gel nodes [N]
    depth: torch.Tensor  # (K,) penetration d [m]


def _pair_forces(p, v_node, weight, x_gel, v_gel, tri, cp: Sequence[torch.Tensor], law: ContactParams,
                 feature_normals: torch.Tensor | None = None, radius: torch.Tensor | float = 0.0) -> _PairForces:
    """The law of the module docstring for particles at ``p`` (K, 3) with velocities ``v_node``,
    area weights ``weight`` (K,) and radii ``radius`` (K,), against triangles ``tri`` (K, 3) of a
    gel at (x_gel, v_gel) (``feature_normals`` (K, 6, 3): the pseudo-normals that sign edge and
    vertex distances)."""
    k_n, k_d, k_t, mu, eps_v = cp
    phi, n, bary = closest_point_on_triangle(p, x_gel[tri[:, 0]], x_gel[tri[:, 1]], x_gel[tri[:, 2]],
                                             feature_normals)
    d = softplus_ramp(radius - phi, law.penetration_width)
    v_c = (bary.unsqueeze(-1) * v_gel[tri]).sum(1)
    v_rel = v_node - v_c
    v_n = (v_rel * n).sum(-1)
    fn = k_n * d + k_d * d * softplus_ramp(-v_n, law.damping_width)
    v_t = v_rel - v_n.unsqueeze(-1) * n
    s = torch.sqrt((v_t * v_t).sum(-1) + eps_v * eps_v)
    ft = smooth_min(k_t * s, mu * fn, law.friction_exponent)
    f = weight.unsqueeze(-1) * (fn.unsqueeze(-1) * n - (ft / s).unsqueeze(-1) * v_t)
    gel = torch.zeros_like(x_gel).index_add(0, tri.reshape(-1), (-bary.unsqueeze(-1) * f.unsqueeze(1)).reshape(-1, 3))
    return _PairForces(f, gel, d)


# ------------------------------------------------------------------------------------------------
# The grid-force hook of one step and the coupled simulator
# ------------------------------------------------------------------------------------------------

class _Coupling:
    """The MPM :class:`~diffworld.sims.mpm.solver.GridForce` of one coupled step: contact forces
    between the particles at (xp, vp) and every gel at (x_g, v_g), spread onto the grid with the
    particles' B-spline weights. The forward leaves the gels' nodal forces in ``gel_forces``;
    before the MPM adjoint runs, ``adj_gel_forces`` must hold their adjoints, and the adjoint
    leaves the adjoints of the gels' states and contact parameters in ``adj_x``, ``adj_v``,
    ``adj_cp`` and of the particles' positions and velocities in ``adj_px``, ``adj_pv``."""

    def __init__(self, sim: "_CoupledSim", x: list, v: list, cps: list, xp: torch.Tensor, vp: torch.Tensor) -> None:
        self.sim, self.x, self.v, self.cps, self.xp, self.vp = sim, x, v, cps, xp, vp
        self.gel_forces: list[torch.Tensor] = []
        self.adj_gel_forces: list[torch.Tensor] | None = None
        self.adj_x = self.adj_v = self.adj_cp = self.adj_px = self.adj_pv = None

    def _forces(self, box: GridBox, sel, xp, vp, x, v, cps, faces):
        """The impulse on the box's grid (flat (nodes, 3)) and the gels' nodal forces, from the
        particles ``sel`` at (xp, vp) (their rows only)."""
        sim = self.sim
        fp = torch.zeros_like(xp)
        gel = []
        for g, (rows, tri) in enumerate(faces):
            r = _pair_forces(xp[rows], vp[rows], sim.area[sel][rows], x[g], v[g], sim.faces[g][tri], cps[g],
                             sim.laws[g], sim.topology[g].feature_normals(x[g], tri), sim.radius[sel][rows])
            fp = fp.index_add(0, rows, r.node)
            gel.append(r.gel)
        # quadratic B-spline weights of each particle's 27 stencil nodes (the P2G of the solver)
        lower = torch.tensor(box.lower, dtype=xp.dtype, device=xp.device)
        u = (xp - lower) / sim.dx
        base = torch.floor(u.detach() - 0.5)
        fx = u - base
        w = torch.stack([0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2], 1)  # (K, 3 nodes, 3 axes)
        base = base.to(torch.int64)
        o = torch.arange(3, device=xp.device)
        ii = (base[:, 0, None] + o)[:, :, None, None]
        jj = (base[:, 1, None] + o)[:, None, :, None]
        kk = (base[:, 2, None] + o)[:, None, None, :]
        ny, nz = box.shape[1], box.shape[2]
        flat = ((ii * ny + jj) * nz + kk).reshape(-1)
        ww = (w[:, :, 0, None, None] * w[:, None, :, 1, None] * w[:, None, None, :, 2]).reshape(xp.shape[0], 27)
        n_nodes = box.shape[0] * ny * nz
        impulse = torch.zeros((n_nodes, 3), dtype=xp.dtype, device=xp.device).index_add(
            0, flat, (ww[..., None] * fp[:, None, :] * sim.dt).reshape(-1, 3))
        return impulse, gel

    def forward(self, box: GridBox, grid_mv: torch.Tensor, grid_m: torch.Tensor, keep: bool):
        sim = self.sim
        xp = self.xp.detach()
        faces, near = [], []
        for g, bvh in enumerate(sim.bvh):
            f = bvh.faces_of(self.x[g], xp, sim.query_distance)
            near.append(f >= 0)
            faces.append(f)
        sel = torch.stack(near).any(0).nonzero()[:, 0]
        faces = [((f[sel] >= 0).nonzero()[:, 0], f[sel][f[sel] >= 0]) for f in faces]
        with torch.no_grad():
            if sel.numel():
                impulse, self.gel_forces = self._forces(box, sel, xp[sel], self.vp.detach()[sel], self.x, self.v,
                                                        self.cps, faces)
            else:
                impulse = torch.zeros((grid_m.numel(), 3), dtype=grid_mv.dtype, device=grid_mv.device)
                self.gel_forces = [torch.zeros_like(t) for t in self.x]
        saved = (box, sel, faces) if keep else None
        return impulse.reshape(grid_mv.shape), saved

    def adjoint(self, saved, adj_impulse: torch.Tensor):
        box, sel, faces = saved
        self.adj_px, self.adj_pv = torch.zeros_like(self.xp), torch.zeros_like(self.vp)
        with torch.enable_grad():
            xp_ = self.xp.detach()[sel].requires_grad_()
            vp_ = self.vp.detach()[sel].requires_grad_()
            x_ = [t.detach().requires_grad_() for t in self.x]
            v_ = [t.detach().requires_grad_() for t in self.v]
            cp_ = [[t.detach().requires_grad_() for t in c] for c in self.cps]
            flat_cp = [t for c in cp_ for t in c]
            if sel.numel():
                impulse, gel = self._forces(box, sel, xp_, vp_, x_, v_, cp_, faces)
                grads = torch.autograd.grad([impulse, *gel], [xp_, vp_, *x_, *v_, *flat_cp],
                                            [adj_impulse.reshape(-1, 3), *self.adj_gel_forces], allow_unused=True)
            else:
                grads = [None] * (2 + len(x_) + len(v_) + len(flat_cp))
        n_g = len(x_)
        z = lambda g, t: torch.zeros_like(t) if g is None else g  # noqa: E731
        self.adj_px[sel] = z(grads[0], xp_)
        self.adj_pv[sel] = z(grads[1], vp_)
        self.adj_x = [z(g, t) for g, t in zip(grads[2:2 + n_g], x_)]
        self.adj_v = [z(g, t) for g, t in zip(grads[2 + n_g:2 + 2 * n_g], v_)]
        gcp = [z(g, t) for g, t in zip(grads[2 + 2 * n_g:], flat_cp)]
        self.adj_cp = [gcp[5 * g:5 * g + 5] for g in range(n_g)]
        return None, None


class _CoupledSim:
    """The coupled system as an :class:`~diffworld.engine.rollout.Simulator`.

    State: per gel (x, v, f) (f: the contact forces on its nodes during the step that produced
    the state; None initially), then the MPM's (x, v, C, F, tau). Parameters: per gel its 5 FEM
    step parameters (solver.STEP_PARAMS) and its 5 contact parameters (:data:`CONTACT_PARAMS`),
    then the MPM's particle parameters and torch-law parameters. Control row: per gel its packed
    FEM row, then the MPM colliders' rows (n_col x 13) flattened.
    """

    def __init__(self, gels: Sequence[Gel], mpm_stepper: MpmStepper, fem_steppers: list[FemStepper],
                 faces: list[torch.Tensor], query_distance: float) -> None:
        self.gels = list(gels)
        self.mpm = mpm_stepper
        self.fem = fem_steppers
        self.faces = faces
        self.bvh = [GelBvh(f, g.model.n_nodes, g.model.device) for f, g in zip(faces, gels)]
        self.topology = [SurfaceTopology(f.to(g.model.device)) for f, g in zip(faces, gels)]
        self.laws = [g.contact for g in gels]
        model = mpm_stepper.model
        self.dt = float(model.dt)
        self.dx = float(model.grid.dx)
        volume = model.params["volume"].detach()
        self.area = volume ** (2.0 / 3.0) / self.dx ** 2  # each particle's share of a dx^2 patch
        self.radius = 0.5 * volume ** (1.0 / 3.0)  # [m] half the particle spacing
        self.query_distance = float(query_distance)
        self.min_mass = float(mpm_stepper.min_mass)
        self.widths = [g.model.control_width for g in gels]
        self.n_col = len(model.colliders)

    @property
    def n_gels(self) -> int:
        return len(self.gels)

    def _split(self, params, control):
        ng = self.n_gels
        gp = [params[10 * g:10 * g + 5] for g in range(ng)]
        cps = [list(params[10 * g + 5:10 * g + 10]) for g in range(ng)]
        mp = params[10 * ng:]
        rows, o = [], 0
        for w in self.widths:
            rows.append(control[o:o + w])
            o += w
        mctrl = control[o:].reshape(self.n_col, COLLIDER_STATE) if self.n_col else None
        return gp, cps, mp, rows, mctrl

    def step(self, state, params, control, index: int, keep: bool):
        ng = self.n_gels
        gp, cps, mp, rows, mctrl = self._split(params, control)
        xs = [state[3 * g] for g in range(ng)]
        vs = [state[3 * g + 1] for g in range(ng)]
        x, v, C, Fm, tau = state[3 * ng:]
        hook = _Coupling(self, xs, vs, cps, x, v)
        out, tau1, msaved = self.mpm.substep(MpmState(x, v, C, Fm), mp, mctrl, keep=keep, step=index, tau=tau,
                                             grid_force=hook)
        new, fsaved = [], []
        for g in range(ng):
            f = hook.gel_forces[g]
            x1, v1, s = self.fem[g].step(xs[g], vs[g], gp[g], rows[g], keep, external=f)
            new += [x1, v1, f]
            fsaved.append(s)
        saved = (msaved, tau is None, fsaved, hook) if keep else None
        return (*new, *out, tau1), saved

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        msaved, stress_computed, fsaved, hook = saved
        ng = self.n_gels
        gp, cps, mp, _, _ = self._split(params, adj_control)
        adj_rows = []
        o = 0
        for w in self.widths:
            adj_rows.append(adj_control[o:o + w])  # views: the adjoints accumulate into adj_control
            o += w
        adj_mctrl = adj_control[o:].view(self.n_col, COLLIDER_STATE) if self.n_col else None
        adj_ext, adj_gx, adj_gv = [], [], []
        for g in range(ng):
            a_ext = torch.zeros_like(fsaved[g].x)
            if adj_out[3 * g + 2] is not None:  # the recorded contact forces
                a_ext += adj_out[3 * g + 2]
            ax, av = self.fem[g].step_adjoint(fsaved[g], gp[g], adj_out[3 * g], adj_out[3 * g + 1],
                                              adj_params[10 * g:10 * g + 5], adj_rows[g], adj_external=a_ext)
            adj_ext.append(a_ext)
            adj_gx.append(ax)
            adj_gv.append(av)
        hook.adj_gel_forces = adj_ext
        madj = MpmState(*(torch.zeros_like(t) if a is None else a
                          for t, a in zip((msaved.x, msaved.v, msaved.C, msaved.F), adj_out[3 * ng:3 * ng + 4])))
        adj_mp = adj_params[10 * ng:]
        madj, adj_tau = self.mpm.substep_adjoint(msaved, mp, madj, adj_mp, adj_mctrl, adj_out[3 * ng + 4])
        if hook.adj_px is not None:  # the contact forces' dependence on the particles at time n
            madj = madj._replace(x=madj.x + hook.adj_px, v=madj.v + hook.adj_pv)
        if stress_computed:
            self.mpm.stress_adjoint(msaved.F, mp, adj_tau, madj.F, adj_mp)
            adj_tau = None
        out = []
        for g in range(ng):
            if hook.adj_x is not None:  # None when the hook's adjoint did not run
                adj_gx[g] += hook.adj_x[g]
                adj_gv[g] += hook.adj_v[g]
                for a, b in zip(adj_params[10 * g + 5:10 * g + 10], hook.adj_cp[g]):
                    a += b
            out += [adj_gx[g], adj_gv[g], None]
        return (*out, *madj, adj_tau)


# ------------------------------------------------------------------------------------------------
# Checks and the rollout
# ------------------------------------------------------------------------------------------------

def _scalar_param(where: str, value: Any, dtype, device, positive: bool = False) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{where}: expected a number or a 0-d tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, device=device)
    if t.numel() != 1:
        raise ValueError(f"{where}: expected a scalar (the grid nodes have no per-node parameters), got shape "
                         f"{tuple(t.shape)}")
    t = t.reshape(()).to(dtype)
    val = float(t.detach())
    if not math.isfinite(val) or val < 0 or (positive and val == 0):
        raise ValueError(f"{where}: expected a finite number {'> 0' if positive else '>= 0'}, got {val!r}")
    return t


def _check_law(where: str, law: Any) -> None:
    if not isinstance(law, ContactParams):
        raise TypeError(f"{where}: expected a diffworld.sims.fem.contact.ContactParams, got {type(law).__name__}")
    for name in ("penetration_width", "damping_width"):
        w = getattr(law, name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}.{name}: expected a finite number >= 0, got {w!r}")
    p = law.friction_exponent
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1):
        raise ValueError(f"{where}.friction_exponent: expected None or a number >= 1, got {p!r}")


def _faces(where: str, gel: Gel) -> torch.Tensor:
    model = gel.model
    faces = model.mesh.surface_faces() if gel.faces is None else gel.faces
    if not isinstance(faces, torch.Tensor) or faces.dtype != torch.int64 or faces.dim() != 2 or faces.shape[1] != 3:
        raise TypeError(f"{where}.faces: expected an (F, 3) int64 tensor of triangles, got "
                        f"{getattr(faces, 'dtype', type(faces).__name__)} {tuple(getattr(faces, 'shape', ()))}")
    if faces.shape[0] == 0:
        raise ValueError(f"{where}.faces: expected at least one triangle, got none")
    if int(faces.min()) < 0 or int(faces.max()) >= model.n_nodes:
        raise ValueError(f"{where}.faces: node ids must lie in [0, {model.n_nodes}), got "
                         f"[{int(faces.min())}, {int(faces.max())}]")
    return faces.to(model.device).contiguous()


def _gel_params(where: str, model: fem_model.Model, over: dict | None) -> dict[str, torch.Tensor]:
    p = {name: getattr(model, name) for name in _GEL_PARAMS}
    for name, t in (over or {}).items():
        if name not in p:
            raise ValueError(f"{where}: unknown parameter {name!r}; expected one of {list(_GEL_PARAMS)}")
        want = {"gravity": (3,), "damping": ()}.get(name, (model.n_tets,))
        t = torch.as_tensor(t, device=model.device).to(model.dtype)
        if name in ("E", "nu", "density") and t.dim() == 0:
            t = t.expand(model.n_tets)
        if tuple(t.shape) != want:
            raise ValueError(f"{where}[{name!r}]: expected shape {want}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{where}[{name!r}]: has non-finite values")
        p[name] = t
    return p


def particle_stiffness_ratio(mpm_model: MpmModel) -> float:
    """The largest ``a_p / m_p`` [1/kg] over the MPM particles (``a_p = V_p^(2/3) / dx^2``, the
    share of a ``dx x dx`` patch of the contact law): ``k a_p / m_p`` is a particle's ``omega^2``
    under a penalty ``k`` [N/m] per patch."""
    p = mpm_model.params
    vol = p["volume"].detach().to(torch.float64)
    mass = vol * p["density"].detach().to(torch.float64)
    return float((vol ** (2.0 / 3.0) / mpm_model.grid.dx ** 2 / mass).max())


def contact_stable_dt(gel: Gel, mpm_model: MpmModel, k_n: float | None = None) -> float:
    """The explicit limit of the penalty springs, ``CONTACT_CFL * 2 / omega`` [s].

    ``omega^2`` is the larger of ``max_p k_n a_p / m_p`` over the MPM particles
    (:func:`particle_stiffness_ratio`) and ``max_i k_n (A_i / dx^2) / m_i`` over the gel's contact
    nodes (a gel node of lumped area A_i and mass m_i faces about ``A_i / dx^2`` patches).

    Args:
        gel: The gel.
        mpm_model: The MPM model (particles, grid spacing).
        k_n: Normal stiffness [N/m] per ``dx x dx`` patch (default the gel's).
    """
    dx = float(mpm_model.grid.dx)
    model = gel.model
    k = float(torch.as_tensor(gel.contact.k_n if k_n is None else k_n).detach())
    if k <= 0:
        return math.inf
    faces = model.mesh.surface_faces() if gel.faces is None else gel.faces
    with torch.no_grad():
        x = model.mesh.vertices.detach().to(torch.float64)
        area = 0.5 * torch.linalg.vector_norm(torch.linalg.cross(x[faces[:, 1]] - x[faces[:, 0]],
                                                                 x[faces[:, 2]] - x[faces[:, 0]], dim=-1), dim=-1)
        a_node = torch.zeros(model.n_nodes, dtype=torch.float64, device=x.device).index_add_(
            0, faces.reshape(-1), (area / 3).repeat_interleave(3))
        m = model.masses().detach().to(torch.float64)
        free = torch.ones(model.n_nodes, dtype=torch.bool, device=x.device)
        free[model.kinematic] = False
        ratio = torch.where(free & (m > 0), a_node / m.clamp_min(1e-300), torch.zeros_like(m))
        w2 = max(k * particle_stiffness_ratio(mpm_model), k * float(ratio.max()) / dx ** 2)
    return CONTACT_CFL * 2.0 / math.sqrt(w2)


def gel_surface_distance(gel: Gel, x_gel: torch.Tensor, points: torch.Tensor, max_dist: float) -> torch.Tensor:
    """Signed distance [m] of ``points`` (P, 3) to the gel surface at node positions ``x_gel``
    (negative inside the gel; ``+max_dist`` where no triangle is within ``max_dist``). Differentiable
    in the positions (same closest-point computation as the coupling)."""
    faces = _faces("gel", gel)
    f = GelBvh(faces, gel.model.n_nodes, x_gel.device).faces_of(x_gel, points, max_dist)
    out = torch.full((points.shape[0],), float(max_dist), dtype=points.dtype, device=points.device)
    rows = (f >= 0).nonzero()[:, 0]
    if rows.numel():
        tri = faces[f[rows]]
        fn = SurfaceTopology(faces.to(x_gel.device)).feature_normals(x_gel, f[rows])
        phi, _, _ = closest_point_on_triangle(points[rows], x_gel[tri[:, 0]], x_gel[tri[:, 1]], x_gel[tri[:, 2]], fn)
        out = out.index_put((rows,), phi)
    return out


def _check_start_outside(where: str, gel: Gel, x_gel: torch.Tensor, mpm_model: MpmModel, mpm_state: MpmState) -> None:
    """Refuse MPM particles that start inside a gel (each a ball of radius r_p, as the coupling
    sees it): the penalty would fire at once with k_n times the depth. A touch is fine."""
    with torch.no_grad():
        x = mpm_state.x.detach()
        r = 0.5 * mpm_model.params["volume"].detach().to(x) ** (1.0 / 3.0)
        d = gel_surface_distance(gel, x_gel.detach().to(x), x, 2 * float(mpm_model.grid.dx))
        depth = r - d
        k = int(torch.argmax(depth)) if depth.numel() else 0
        worst = float(depth[k]) if depth.numel() else 0.0
    if worst > 1e-9:
        raise ValueError(f"{where} ('{gel.name}'): MPM particle {k} starts {worst * 1e3:.3g} mm inside the gel (its "
                         f"ball of radius {float(r[k]) * 1e3:.3g} mm, centre {float(d[k]) * 1e3:.3g} mm from the gel "
                         f"surface); place the bodies so that they at most touch the gel at the start")


def coupled_rollout(gels: Sequence[Gel], mpm_model: MpmModel, gel_states: Sequence[fem_model.State],
                    mpm_state: MpmState, n_steps: int, *, gel_controls: Sequence[fem_model.Control | None] | None = None,
                    mpm_control: torch.Tensor | None = None, gel_params: Sequence[dict | None] | None = None,
                    mpm_params: dict[str, torch.Tensor] | None = None, window: int = 16,
                    record_every: int | None = None, check: bool = True,
                    query_distance: float | None = None, mpm_stepper: MpmStepper | None = None,
                    check_start: bool = False) -> CoupledRollout:
    """Simulate FEM gels and MPM bodies in contact, differentiably, in checkpoint windows.

    Every step is one MPM substep and one explicit FEM step of ``dt = mpm_model.dt`` with the
    coupling of the module docstring. Gradients reach the initial states, the controls, the gels'
    ``E``, ``nu``, ``density``, ``damping``, ``gravity``, the contact parameters (tensors in each
    ``gel.contact``) and the MPM particle parameters.

    Args:
        gels: The gels (one or more, e.g. two gripper pads).
        mpm_model: The MPM model (its ``dt`` is the shared step).
        gel_states: Initial :class:`~diffworld.sims.fem.model.State` of each gel.
        mpm_state: Initial MPM state.
        n_steps: Number of coupled steps (>= 0).
        gel_controls: Per gel a :class:`~diffworld.sims.fem.model.Control` of ``n_steps`` rows
            (kinematic pose, loads) or None (held at the anchors). Differentiable.
        mpm_control: Collider states, (n_steps, n_colliders, 13); required with colliders.
        gel_params: Per gel overrides of ``E``, ``nu``, ``density``, ``damping``, ``gravity``.
        mpm_params: Overrides of the MPM particle parameters by name.
        window: Steps per checkpoint window; the numbers do not depend on it.
        record_every: Record every this many steps (default: only the final state).
        check: Stop with a SimulationError on NaN/Inf (naming the step and the quantity),
            particles leaving the domain, or an MPM CFL breach, at every record.
        query_distance: Grid nodes farther than this from a gel's surface [m] feel no force from
            it (default ``2 dx + 40 max(penetration_width)``: beyond it a softplus ramp's force
            is below ``exp(-40)`` of its scale); it must also exceed any penetration.
        mpm_stepper: A :class:`~diffworld.sims.mpm.solver.Stepper` of ``mpm_model`` to reuse.
        check_start: Refuse (ValueError, by how much) MPM particles that start inside a gel. Off
            by default: a rollout continued from a state in contact starts inside on purpose; a
            simulation from rest (the tactile task) turns it on.

    Returns:
        :class:`CoupledRollout`.

    Raises:
        TypeError, ValueError: Bad inputs (the message names the argument), a ``dt`` above the
            gel's, the MPM's or the penalty's stability limit (with the limit).
        SimulationError: NaN/Inf or an unusable MPM state (MPM's or FEM's error class).
    """
    if isinstance(gels, Gel) or not isinstance(gels, (list, tuple)) or not gels:
        raise TypeError(f"coupled_rollout: expected 'gels' a non-empty list of Gel, got {type(gels).__name__}")
    ng = len(gels)
    for g, gel in enumerate(gels):
        if not isinstance(gel, Gel):
            raise TypeError(f"coupled_rollout: expected gels[{g}] a Gel, got {type(gel).__name__}")
        if not isinstance(gel.model, fem_model.Model):
            raise TypeError(f"coupled_rollout: expected gels[{g}].model a diffworld.sims.fem Model, got "
                            f"{type(gel.model).__name__}")
        _check_law(f"coupled_rollout: gels[{g}].contact", gel.contact)
    if not isinstance(mpm_model, MpmModel):
        raise TypeError(f"coupled_rollout: expected 'mpm_model' a diffworld.sims.mpm Model, got "
                        f"{type(mpm_model).__name__}")
    dtype, device = mpm_model.dtype, mpm_model.device
    for g, gel in enumerate(gels):
        if gel.model.dtype != dtype or gel.model.device != device:
            raise ValueError(f"coupled_rollout: gels[{g}].model is {gel.model.dtype} on {gel.model.device}, the MPM "
                             f"model {dtype} on {device}; build both with the same dtype and device")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"coupled_rollout: expected n_steps an integer >= 0, got {n_steps!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"coupled_rollout: expected window an integer >= 1, got {window!r}")
    for name, seq in (("gel_states", gel_states), ("gel_controls", gel_controls), ("gel_params", gel_params)):
        if seq is not None and (not isinstance(seq, (list, tuple)) or len(seq) != ng):
            raise ValueError(f"coupled_rollout: expected '{name}' a list of {ng} entries (one per gel), got "
                             f"{len(seq) if isinstance(seq, (list, tuple)) else type(seq).__name__}")
    if gel_states is None:
        raise ValueError("coupled_rollout: 'gel_states' is required (one fem.State per gel)")
    dt = float(mpm_model.dt)
    dx = float(mpm_model.grid.dx)
    if query_distance is None:
        query_distance = 2 * dx + 40 * max(float(g.contact.penetration_width) for g in gels)
    if isinstance(query_distance, bool) or not isinstance(query_distance, (int, float)) or not query_distance > 0 \
            or not math.isfinite(query_distance):
        raise ValueError(f"coupled_rollout: expected query_distance a finite number > 0 [m], got {query_distance!r}")

    # MPM stability (the MPM rollout leaves it to the user; a coupled step shares its dt)
    mpm_lim = mpm_stable_dt(mpm_model)
    if dt > mpm_lim:
        raise ValueError(f"coupled_rollout: the MPM model's dt {dt:.3g} s is above its stable step {mpm_lim:.3g} s "
                         f"(elastic wave / viscosity limit); lower mpm_model.dt")

    states: list = []
    plist: list[torch.Tensor] = []
    rows_all: list[torch.Tensor] = []
    steppers, faces = [], []
    for g, gel in enumerate(gels):
        where = f"coupled_rollout: gels[{g}]"
        st = gel_states[g]
        model = gel.model
        if not isinstance(st, tuple) or len(st) != 2:
            raise TypeError(f"coupled_rollout: expected gel_states[{g}] a fem State (x, v), got {type(st).__name__}")
        for name, t in zip(("x", "v"), st):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (model.n_nodes, 3):
                raise ValueError(f"coupled_rollout: expected gel_states[{g}].{name} of shape ({model.n_nodes}, 3), "
                                 f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"coupled_rollout: gel_states[{g}].{name} has non-finite values")
        p = _gel_params(f"coupled_rollout: gel_params[{g}]", model, gel_params[g] if gel_params else None)
        try:
            check_dt(model, dt, p)
        except ValueError as err:
            raise ValueError(f"{where} ('{gel.name}'): {err} (the shared dt is mpm_model.dt)") from None
        cps = [_scalar_param(f"{where}.contact.{name}", getattr(gel.contact, name), dtype, device,
                             positive=name == "eps_v") for name in CONTACT_PARAMS]
        lim = contact_stable_dt(gel, mpm_model, k_n=float(cps[0].detach()))
        if dt > lim:
            raise ValueError(f"{where} ('{gel.name}'): dt {dt:.3g} s is above the penalty contact's stable step "
                             f"{lim:.3g} s (k_n {float(cps[0].detach()):.3g} N/m); "
                             f"lower k_n or dt")
        ctrl = gel_controls[g] if gel_controls else None
        if ctrl is not None and not isinstance(ctrl, fem_model.Control):
            raise TypeError(f"coupled_rollout: expected gel_controls[{g}] a fem.Control or None, got "
                            f"{type(ctrl).__name__}")
        try:
            rows_all.append((ctrl or fem_model.Control()).rows(model, n_steps))
        except ValueError as err:
            raise ValueError(f"coupled_rollout: gel_controls[{g}]: {err}") from None
        mass = model.masses(p["density"])
        plist += [t.contiguous() for t in (p["E"], p["nu"], mass, p["damping"].reshape(1), p["gravity"])]
        plist += cps
        states += [st[0].to(dtype), st[1].to(dtype), None]
        steppers.append(FemStepper(model, dt))
        faces.append(_faces(where, gel))
        if check_start and n_steps > 0:
            _check_start_outside(where, gel, st[0], mpm_model, mpm_state)

    n_col = len(mpm_model.colliders)
    if n_col:
        if mpm_control is None or tuple(mpm_control.shape) != (n_steps, n_col, COLLIDER_STATE):
            got = None if mpm_control is None else tuple(mpm_control.shape)
            raise ValueError(f"coupled_rollout: expected mpm_control of shape ({n_steps}, {n_col}, {COLLIDER_STATE}) "
                             f"(steps, colliders, state), got {got}")
        rows_all.append(mpm_control.to(dtype).reshape(n_steps, n_col * COLLIDER_STATE))
    elif mpm_control is not None and mpm_control.numel():
        raise ValueError("coupled_rollout: mpm_control given but the MPM model has no colliders")
    if not isinstance(mpm_state, tuple) or len(mpm_state) != 4:
        raise TypeError(f"coupled_rollout: expected mpm_state an mpm State (x, v, C, F), got "
                        f"{type(mpm_state).__name__}")
    npart = mpm_model.n_particles
    for name, t, shape in zip(MpmState._fields, mpm_state, ((npart, 3), (npart, 3), (npart, 3, 3), (npart, 3, 3))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"coupled_rollout: expected mpm_state.{name} of shape {shape}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"coupled_rollout: mpm_state.{name} has non-finite values")
    merged = dict(mpm_model.params)
    for name, t in (mpm_params or {}).items():
        if name not in PARTICLE_PARAMS:
            raise ValueError(f"coupled_rollout: mpm_params: unknown parameter {name!r}; expected one of "
                             f"{list(PARTICLE_PARAMS)}")
        merged[name] = t.expand(npart) if t.dim() == 0 else t
    stepper = mpm_stepper or MpmStepper(mpm_model)
    if stepper.model is not mpm_model:
        raise ValueError("coupled_rollout: 'mpm_stepper' was built for another model")
    plist += [merged[name].to(dtype).contiguous() for name in PARTICLE_PARAMS] + stepper.law_parameters()
    states += [t.to(dtype) for t in mpm_state] + [None]
    control = (torch.cat(rows_all, 1) if rows_all else torch.zeros((n_steps, 0), dtype=dtype, device=device))
    sim = _CoupledSim(gels, stepper, steppers, faces, query_distance)
    pen_rows: list[list[float]] = []

    def check_recorded(st, k: int) -> None:
        if check:
            for g in range(ng):
                for name, t in zip(("x", "v", "contact force"), st[3 * g:3 * g + 3]):
                    if t is not None and not bool(torch.isfinite(t.detach()).all()):
                        node = int((~torch.isfinite(t.detach())).any(1).nonzero()[0])
                        raise FemSimulationError(f"non-finite {name} of node {node} of gels[{g}] ('{gels[g].name}') "
                                                 f"after step {k} (t = {k * dt:.4g} s); lower dt or k_n")
            mpm_check_state(mpm_model, MpmState(*st[3 * ng:3 * ng + 4]), k)
        pen_rows.append(_penetration(sim, st))

    traj = checkpointed_rollout(sim, tuple(states), n_steps, control, plist, window=window,
                                record_every=record_every, check=check_recorded)
    first = traj.states[0]
    pen0 = _penetration(sim, first)
    gel_states_out, mpm_out, forces = [], [], []
    for r, st in enumerate(traj.states):
        gel_states_out.append([fem_model.State(st[3 * g], st[3 * g + 1]) for g in range(ng)])
        forces.append([torch.zeros_like(st[3 * g]) if st[3 * g + 2] is None else st[3 * g + 2] for g in range(ng)])
        mpm_out.append(mpm_state if r == 0 else MpmState(*st[3 * ng:3 * ng + 4]))
    pen = torch.tensor([pen0] + pen_rows, dtype=torch.float64).reshape(len(traj.states), ng)
    return CoupledRollout(gel_states_out, mpm_out, forces, traj.steps, pen)


def _penetration(sim: _CoupledSim, st) -> list[float]:
    """Deepest penetration [m] of an MPM particle's ball (radius ``r_p``) into each gel (0 if none)."""
    ng = sim.n_gels
    out = []
    with torch.no_grad():
        xp = st[3 * ng].detach()
        for g in range(ng):
            xg = st[3 * g].detach()
            f = sim.bvh[g].faces_of(xg, xp, sim.query_distance)
            rows = (f >= 0).nonzero()[:, 0]
            if rows.numel() == 0:
                out.append(0.0)
                continue
            tri = sim.faces[g][f[rows]]
            phi, _, _ = closest_point_on_triangle(xp[rows], xg[tri[:, 0]], xg[tri[:, 1]], xg[tri[:, 2]],
                                                  sim.topology[g].feature_normals(xg, f[rows]))
            out.append(float(torch.clamp_min(sim.radius[rows] - phi, 0.0).max()))
    return out
