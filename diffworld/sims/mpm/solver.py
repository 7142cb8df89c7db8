"""MLS-MPM solver: one substep and its hand-ordered adjoint, on the model and state of
:mod:`diffworld.sims.mpm.model` (re-exported here).

* :class:`Model` holds what a rollout does not change: the grid, dt, gravity, walls, colliders,
  and per-particle material parameters as tensors (each may require a gradient).
* :class:`State` holds x, v, C, F of every particle at one instant. A step never writes its input.
* Control is a tensor of collider kinematic states per substep, shape (T, n_colliders, 13):
  position [m], quaternion (x, y, z, w), linear velocity [m/s], angular velocity [rad/s]
  (see :mod:`diffworld.sims.common.colliders` for building it from actions or keyframes).

:class:`Stepper` runs substeps on Warp arrays wrapped around torch memory. ``forward`` keeps
nothing (ping-pong buffers are fine without a tape); ``record`` keeps every intermediate of a span
of substeps and ``backward`` runs their adjoints in reverse (contract 3: nothing a reverse kernel
reads is ever overwritten). :mod:`diffworld.sims.mpm.rollout` wraps spans into torch ops.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch

from diffworld.engine.bridge import arg_view, launch
from diffworld.engine.runtime import init_warp, warp_device
from diffworld.sims.common.colliders import COLLIDER_STATE, Collider
from diffworld.sims.constitutive.laws import EXTERNAL
from diffworld.sims.mpm import kernels
from diffworld.sims.mpm.emitters import place_emitted
from diffworld.sims.mpm.model import (PARTICLE_PARAMS, WALL_MODES, GridSpec, LawBinding, Model, ParticleParams,
                                      State)
from diffworld.sims.mpm.rigid import RigidGroups, rigid_projection
from diffworld.sims.mpm.torch_laws import TorchLawStages

__all__ = ["Collider", "GridBox", "GridForce", "GridSpec", "LawBinding", "Model", "ParticleParams", "State", "Stepper",
           "PARTICLE_PARAMS", "WALL_MODES", "cpu_workers"]


def _particle_params(params: Sequence[torch.Tensor]) -> ParticleParams:
    """The particle parameters at the head of a substep's parameter sequence."""
    return ParticleParams(*params[:len(PARTICLE_PARAMS)])


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def cpu_workers() -> int:
    """Threads that share a CPU substep: ``DIFFWORLD_CPU_THREADS``, else the usable cores (max 8).

    Warp runs a CPU launch on one thread, and its call into the compiled kernel releases the GIL,
    so the solver splits every particle launch into this many contiguous chunks run concurrently.
    Scatters (P2G, the G2P adjoint) go to one grid per chunk, summed in a fixed order, so results
    are deterministic for a given thread count (a different count changes float rounding only).
    """
    env = os.environ.get("DIFFWORLD_CPU_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"DIFFWORLD_CPU_THREADS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"DIFFWORLD_CPU_THREADS: expected a positive integer, got {n}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
# Below this many particles per chunk, thread hand-off costs more than it saves.
MIN_CHUNK = 2048
# The same for a torch law's own substep stage (:meth:`Stepper._staged_forward`), which costs
# ~1.5 us per particle against the kernels' ~0.1: measured on 2 cores, 2 x 1000 rows run 10 %
# faster than 2000 on one thread, 2 x 500 rows 15 % slower than 1000 (GIL hand-offs).
MIN_LAW_CHUNK = 1024


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _split(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ranges [a, b) covering 0..n, as even as rounding allows."""
    bounds = [round(n * w / workers) for w in range(workers + 1)]
    return [(bounds[w], bounds[w + 1]) for w in range(workers)]


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffworld-mpm")
        _POOL_SIZE = workers
    return _POOL


class GridBox(NamedTuple):
    """The active part of the grid in one substep: the nodes any particle's stencil touches.

    Grid arrays of a substep cover only this box; node (0, 0, 0) of the box is node ``origin``
    of the full grid, at ``lower`` [m].
    """

    origin: tuple[int, int, int]
    shape: tuple[int, int, int]
    lower: tuple[float, float, float]


class _Substep(NamedTuple):
    """Intermediates of one substep kept for its adjoint."""

    x: torch.Tensor
    F: torch.Tensor
    C: torch.Tensor
    v: torch.Tensor
    A: torch.Tensor
    p: torch.Tensor
    m: torch.Tensor
    box: GridBox
    grid_mv: torch.Tensor
    grid_m: torch.Tensor
    grid_v: list  # velocity after division, then after each collider, then after the walls (without
    # colliders only the last: grid_velocity_walls does both in one launch)
    C_out: torch.Tensor
    F_trial: torch.Tensor
    control: torch.Tensor | None
    rigid_v: torch.Tensor | None  # G2P velocities of rigid particles, before the rigid projection
    active: torch.Tensor  # int32 (N,): particles taking part in this substep
    emitted_now: torch.Tensor | None  # positions in model.emitted of the particles activated now
    tau: torch.Tensor  # elastic Kirchhoff stress at F (input of particle_affine)
    # (hook, what its forward saved) of a grid_force hook, else None; grid_mv then holds P2G's
    # momentum plus the hook's impulse (what grid_velocity read)
    grid_force: tuple | None = None
    # per torch-law binding, the (F rows, material inputs, outputs) of its forward with autograd
    # on, so that the adjoint need not evaluate the law again; consumed by the adjoint
    law_graphs: list | None = None


class GridForce(Protocol):
    """A hook that adds impulses to the grid momentum in a substep (external or coupling forces).

    :meth:`Stepper.substep` calls :meth:`forward` after P2G and before the grid update (gravity,
    colliders, walls): the grid velocity becomes ``(grid_mv + impulse) / grid_m + g dt``. The
    substep's adjoint calls :meth:`adjoint` with d loss / d impulse and adds what it returns to
    the adjoints of P2G's momentum and mass. Grid arrays cover the substep's box (see
    :class:`GridBox`): node ``(i, j, k)`` of the box sits at ``box.lower + (i, j, k) dx``.
    """

    def forward(self, box: "GridBox", grid_mv: torch.Tensor, grid_m: torch.Tensor, keep: bool
                ) -> tuple[torch.Tensor, Any]:
        """Return the impulse [N s] on every box node, shape ``grid_mv.shape`` (*box.shape, 3),
        and, when ``keep``, what :meth:`adjoint` needs. Must not write ``grid_mv`` or ``grid_m``
        (P2G's momentum [kg m/s] (*box.shape, 3) and mass [kg] (*box.shape))."""
        ...

    def adjoint(self, saved: Any, adj_impulse: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Given d loss / d impulse, return d loss / d grid_mv and d loss / d grid_m through the
        hook (None: zero); the hook handles the adjoints of its own other inputs."""
        ...


class Stepper(TorchLawStages):
    """Runs substeps of one :class:`Model` on its device.

    Grid work covers only the box of nodes that particle stencils touch (found from the particle
    bounds each substep), so a small body in a large domain costs little; on CPU the particle
    launches run on :func:`cpu_workers` threads.

    Args:
        model: The model.
        workers: CPU threads per launch (default :func:`cpu_workers`; always 1 on CUDA).
    """

    def __init__(self, model: Model, workers: int | None = None) -> None:
        wp = init_warp()
        self.model = model
        name = "float64" if model.dtype == torch.float64 else "float32"
        self.k = kernels.build(name)
        self.device = model.device
        self.dtype = model.dtype
        self._wdev = warp_device(self.device)
        self._wp = wp
        g = model.grid
        self.dx = self.k["scalar"](g.dx)
        self.inv_dx = self.k["scalar"](1.0 / g.dx)
        self.dt = self.k["scalar"](model.dt)
        self.gravity = self.k["vec3"](*model.gravity)
        self.zero = self.k["scalar"](0.0)
        self.wall_mode = kernels.WALL[model.wall]
        self.wall_mu = self.k["scalar"](model.wall_friction)
        self.full = wp.vec3i(*g.shape)
        self.law_t = model.law.to(torch.int32).contiguous()
        self.active_t = torch.ones(model.n_particles, dtype=torch.int32, device=self.device)
        # Grid velocities divide by max(mass, min_mass) (see kernels.grid_velocity): in float32 the
        # adjoint's m^2 must not underflow; float64 has the range for a far smaller floor.
        m = (model.params["density"] * model.params["volume"]).detach()
        floor = 1.0e-9 if model.dtype == torch.float32 else 1.0e-30
        self.min_mass = self.k["scalar"](floor * float(m.min()) if m.numel() else 0.0)
        n = model.n_particles
        if workers is None:
            workers = cpu_workers()
        if self.device.type != "cpu":
            workers = 1
        self._law_workers = max(1, int(workers))
        workers = max(1, min(int(workers), n // MIN_CHUNK if n >= MIN_CHUNK else 1))
        self.chunks = _split(n, workers)
        self._prepare_colliders()
        self.rigid = None
        self.torch_laws = list(model.torch_laws)
        # bindings whose index is every particle in order (their rows need no gather or scatter)
        everyone = torch.arange(n, device=self.device)
        self._law_all = [b.index.numel() == n and bool(torch.equal(b.index.to(everyone.dtype), everyone))
                         for b in self.torch_laws]
        # every particle on one torch law: the Warp return map and its adjoint do nothing for them
        # (law code EXTERNAL: F' = F_trial, tau = 0, zero adjoints) and the law writes every row
        self._law_only = (n > 0 and self._law_all == [True]
                          and bool((model.law == EXTERNAL).all()))
        is_rigid = model.law == kernels.LAW["rigid"]
        if bool(is_rigid.any()):
            index = is_rigid.nonzero()[:, 0]
            ids, body = torch.unique(model.body[index], return_inverse=True)
            self.rigid = RigidGroups(index, body, int(ids.numel()))
        self.emitted = model.emitted
        self._activations: dict[int, torch.Tensor] = {}
        if self.emitted is not None:
            # Positions in model.emitted grouped by activation substep.
            order = torch.argsort(self.emitted.step, stable=True)
            steps, counts = torch.unique_consecutive(self.emitted.step[order], return_counts=True)
            for st, part in zip(steps.tolist(), order.split(counts.tolist())):
                self._activations[int(st)] = part

    # -- helpers -----------------------------------------------------------------------------------

    def _view(self, t: torch.Tensor, dtype, shape: tuple[int, ...]):
        """Kernel-argument view of a contiguous tensor (:func:`~diffworld.engine.bridge.arg_view`:
        a Warp array descriptor, cached by address, shape and dtype: wrapping costs more than a
        small kernel)."""
        return arg_view(t, dtype, tuple(shape))

    def _scalars(self, t: torch.Tensor):
        """Warp view of a float tensor, element by element."""
        return self._view(t, self.k["scalar"], t.shape)

    def _vec3s(self, t: torch.Tensor):
        """Warp view of a (..., 3) float tensor as vec3s."""
        return self._view(t, self.k["vec3"], t.shape[:-1])

    def _mat33s(self, t: torch.Tensor):
        """Warp view of a (..., 3, 3) float tensor as 3x3 matrices."""
        return self._view(t, self.k["mat33"], t.shape[:-2])

    def _ints(self, t: torch.Tensor):
        """Warp view of an int32 tensor."""
        return self._view(t, self._wp.int32, t.shape)

    @staticmethod
    def _cut(a: int, b: int, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Rows [a, b) of the chunk's tensors of ``n`` rows: the tensors themselves when that is
        all of them (the one-chunk case, where a slice per argument cost ~2 us, ~50 a substep)."""
        if a == 0 and b == n:
            return _whole
        return lambda t: t[a:b]

    def _run(self, kernel, dim, inputs, outputs=(), **adjoint) -> None:
        # replay: the substep's launches are many and small (its kernels are concrete, built per
        # precision, and never run on a wp.Tape)
        launch(kernel, dim, inputs, self.device, outputs, replay=True, **adjoint)

    def _parallel(self, fn, chunks: list | None = None) -> list:
        """``[fn(w, a, b) for w, (a, b) in enumerate(chunks)]``, the chunks (default: the particle
        chunks) run concurrently on CPU threads."""
        chunks = self.chunks if chunks is None else chunks
        if len(chunks) == 1:
            return [fn(0, *chunks[0])]
        pool = _pool(len(chunks) - 1)
        futures = [pool.submit(fn, w, a, b) for w, (a, b) in enumerate(chunks) if w > 0]
        first = fn(0, *chunks[0])
        return [first] + [fut.result() for fut in futures]

    def _box(self, x: torch.Tensor) -> GridBox:
        """Nodes the particles at ``x`` touch: their B-spline stencils plus one node of margin."""
        g = self.model.grid
        if x.shape[0] == 0:
            return GridBox((0, 0, 0), (1, 1, 1), g.lower)
        ext = torch.stack(torch.aminmax(x, dim=0)).tolist()  # one pass, one device -> host copy
        origin, shape = [], []
        for a in range(3):
            lo, hi = ext[0][a], ext[1][a]
            if not (math.isfinite(lo) and math.isfinite(hi)):  # let check_state report it
                o, e = 0, g.shape[a]
            else:
                o = math.floor((lo - g.lower[a]) / g.dx - 0.5) - 1
                e = math.floor((hi - g.lower[a]) / g.dx - 0.5) + 4
                o, e = max(o, 0), min(e, g.shape[a])
                if e <= o:  # every particle is off the grid on this axis
                    o, e = 0, 1
            origin.append(o)
            shape.append(e - o)
        lower = tuple(g.lower[a] + origin[a] * g.dx for a in range(3))
        return GridBox(tuple(origin), tuple(shape), lower)

    def _scatter_grids(self, box: GridBox, width: int):
        """Zeroed per-chunk grids for a scatter: ``width`` floats per node, shape (W, *box, width)."""
        shape = (len(self.chunks), *box.shape) + ((width,) if width > 1 else ())
        return _zeros(shape, self.dtype, self.device)

    # -- colliders ----------------------------------------------------------------------------

    def _prepare_colliders(self) -> None:
        chunks, self.col_args = [], []
        offset = 0
        wp = self._wp
        for c in self.model.colliders:
            dims, glo, h = (2, 2, 2), (0.0, 0.0, 0.0), 1.0
            if c.shape == "grid":
                vals = c.sdf.detach().to(self.device, self.dtype).contiguous()
                chunks.append(vals.reshape(-1))
                dims, glo, h = tuple(int(s) for s in vals.shape), c.sdf_lower, c.sdf_spacing
                this = offset
                offset += vals.numel()
            else:
                this = 0
            self.col_args.append(dict(kind=kernels.SHAPE[c.shape], size=self.k["vec3"](*c.size),
                                      friction=self.k["scalar"](c.friction), softness=self.k["scalar"](c.softness),
                                      weight=kernels.CONTACT_WEIGHT[c.contact_weight], sticky=int(c.sticky),
                                      offset=this, dims=wp.vec3i(*dims), glo=self.k["vec3"](*glo),
                                      h=self.k["scalar"](h)))
        data = torch.cat(chunks) if chunks else _zeros(1, self.dtype, self.device)
        self._sdf_data_t = data.contiguous()
        self.sdf_data = self._scalars(self._sdf_data_t)

    def _collider_inputs(self, gv_in: torch.Tensor, gm, lo, a: dict, control_row: torch.Tensor) -> list:
        return [self._vec3s(gv_in), gm, lo, self.dx, a["kind"], a["size"], a["friction"], a["softness"],
                a["weight"], a["sticky"], self.sdf_data, a["offset"], a["dims"], a["glo"], a["h"],
                self._scalars(control_row)]

    # -- one substep ----------------------------------------------------------------------------

    def _activate(self, state: State, control: torch.Tensor | None, step: int):
        """Active flags of substep ``step`` and the state with the particles emitted now placed at
        their nozzles (a new state: the input is never written)."""
        if self.emitted is None:
            return state, self.active_t, None
        e = self.emitted
        act = self.model.active_mask(step).to(torch.int32)
        now = self._activations.get(int(step))
        if now is None:
            return state, act, None
        x, v, C, F = (t.clone() for t in state)
        idx = e.index[now]
        xs, vs = self._placements(now, control)
        x[idx], v[idx] = xs.to(x.dtype), vs.to(v.dtype)
        C[idx] = 0.0
        F[idx] = torch.eye(3, dtype=F.dtype, device=F.device)
        return State(x, v, C, F), act, now

    def _placements(self, now: torch.Tensor, control: torch.Tensor | None):
        e = self.emitted
        col = e.collider[now]
        xs, vs = e.local_x[now].clone(), e.local_v[now].clone()
        moving = col >= 0
        if bool(moving.any()):
            if control is None:
                raise ValueError("emitters attached to colliders need the control tensor")
            xm, vm = place_emitted(e.local_x[now][moving], e.local_v[now][moving], control[col[moving]])
            xs[moving], vs[moving] = xm, vm
        return xs, vs

    def stress(self, F: torch.Tensor, params: Sequence[torch.Tensor], step: int | None = None) -> torch.Tensor:
        """Elastic Kirchhoff stress of every particle at ``F`` [Pa], shape (N, 3, 3).

        ``params``: as for :meth:`substep`."""
        k, w, m33, i32 = self.k, self._scalars, self._mat33s, self._ints
        F = F.contiguous()
        pp = _particle_params(params)
        E, nu = pp.E.contiguous(), pp.nu.contiguous()
        tau = torch.empty_like(F)

        def run(c, a, b):
            cut = self._cut(a, b, F.shape[0])  # (the whole rows: no slice, ~2 us a tensor)
            self._run(k["stress_eval"], b - a, [m33(cut(F)), i32(cut(self.law_t)), w(cut(E)), w(cut(nu))],
                      [m33(cut(tau))])

        self._parallel(run)
        self._torch_laws_forward(F, pp, tau, step=step)
        return tau

    def stress_adjoint(self, F: torch.Tensor, params: Sequence[torch.Tensor], adj_tau: torch.Tensor,
                       adj_F: torch.Tensor, adj_params: Sequence[torch.Tensor]) -> None:
        """Adjoint of :meth:`stress`: accumulates into ``adj_F`` and ``adj_params`` (same order as ``params``)."""
        k, w, m33, i32 = self.k, self._scalars, self._mat33s, self._ints
        F, adj_tau = F.contiguous(), adj_tau.contiguous()
        pp = _particle_params(params)
        E, nu = pp.E.contiguous(), pp.nu.contiguous()
        adj = _particle_params(adj_params)
        aE, anu = adj.E, adj.nu

        def run(c, a, b):
            cut = self._cut(a, b, F.shape[0])  # (the whole rows: no slice, ~2 us a tensor)
            self._run(k["stress_adjoint"], b - a, [m33(cut(F)), i32(cut(self.law_t)), w(cut(E)), w(cut(nu)),
                                                    m33(cut(adj_tau)), m33(cut(adj_F)), w(cut(aE)), w(cut(anu))])

        self._parallel(run)
        self._torch_laws_adjoint(F, pp, None, adj_tau, adj_F, adj_params)

    def _row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """Contiguous row chunks [a, b) for a torch law's stage over ``rows`` rows: one per CPU
        worker, at least :data:`MIN_LAW_CHUNK` rows each (one chunk on CUDA or for few rows)."""
        return _split(rows, max(1, min(self._law_workers, rows // MIN_LAW_CHUNK)))

    def substep(self, state: State, params: Sequence[torch.Tensor], control: torch.Tensor | None,
                keep: bool = False, step: int = 0, tau: torch.Tensor | None = None,
                grid_force: GridForce | None = None) -> tuple[State, torch.Tensor, _Substep | None]:
        """Advance one substep. ``params`` in :data:`PARTICLE_PARAMS` order (contiguous tensors
        (N,)); ``control`` (n_col, 13); ``step``: the index of this substep in the rollout (emitters
        activate particles by it); ``tau``: the elastic stress at ``state.F`` when known (what the
        previous substep returned), else it is computed; ``grid_force``: a :class:`GridForce` hook
        whose impulses join the grid momentum after P2G (None: none; the substep is then exactly
        the one without the hook). :meth:`substep_adjoint` runs its adjoint.

        Returns the new state, the elastic stress at its F (a by-product of the plastic
        projection's SVD: pass it to the next substep), and the intermediates when ``keep`` is set.
        """
        k, dev, dt_ = self.k, self.device, self.dtype
        n = state.x.shape[0]
        if control is not None:
            control = control.contiguous()
        state, act, emitted_now = self._activate(state, control, step)
        x, v, C, F = (t.contiguous() for t in state)
        pp = _particle_params(params)
        E, nu, eta, rho, vol, ys, fa, tc, ts = (t.contiguous() for t in (
            pp.E, pp.nu, pp.viscosity, pp.density, pp.volume, pp.yield_stress, pp.friction_angle, pp.theta_c,
            pp.theta_s))
        law = self.law_t
        if tau is None:
            tau = self.stress(F, params, step)
        elif emitted_now is not None:
            tau = tau.clone()
            tau[self.emitted.index[emitted_now]] = 0.0  # their F was reset to I: tau(I) = 0
        tau = tau.contiguous()
        A = torch.empty((n, 3, 3), dtype=dt_, device=dev)
        p = torch.empty((n, 3), dtype=dt_, device=dev)
        m = torch.empty((n,), dtype=dt_, device=dev)
        box = self._box(x if self.emitted is None else x[act.bool()])
        blo = k["vec3"](*box.lower)
        w, v3, m33, i32 = self._scalars, self._vec3s, self._mat33s, self._ints
        many = len(self.chunks) > 1
        mv_parts = self._scatter_grids(box, 3)
        m_parts = self._scatter_grids(box, 1)

        def to_grid(c, a, b):
            cut = self._cut(a, b, n)  # (the whole rows: no slice, ~2 us a tensor)
            self._run(k["particle_affine"], b - a,
                      [m33(cut(F)), m33(cut(C)), v3(cut(v)), m33(cut(tau)), i32(cut(act)), w(cut(eta)), w(cut(rho)),
                       w(cut(vol)), self.dt, self.inv_dx],
                      [m33(cut(A)), v3(cut(p)), w(cut(m))])
            self._run(k["p2g"], b - a, [v3(cut(x)), v3(cut(p)), m33(cut(A)), w(cut(m)), i32(cut(act)), blo,
                                         self.dx], [v3(mv_parts[c]), w(m_parts[c])])

        self._parallel(to_grid)
        grid_mv = mv_parts.sum(0) if many else mv_parts[0]
        grid_m = m_parts.sum(0) if many else m_parts[0]
        hook = None
        if grid_force is not None:
            impulse, hook_saved = grid_force.forward(box, grid_mv, grid_m, keep)
            if tuple(impulse.shape) != tuple(grid_mv.shape):
                raise ValueError(f"grid_force: expected an impulse of shape {tuple(grid_mv.shape)}, "
                                 f"got {tuple(impulse.shape)}")
            # a new tensor: P2G's momentum stays as it was (contract 3)
            grid_mv = (grid_mv + impulse.to(grid_mv.dtype)).contiguous()
            hook = (grid_force, hook_saved)
        gv = torch.empty_like(grid_mv)
        wgm = w(grid_m)
        if not self.col_args:  # velocity and walls in one launch (flat over the box); grids = [the result]
            self._run(k["grid_velocity_walls"], grid_m.numel(),
                      [v3(grid_mv.view(-1, 3)), w(grid_m.view(-1)), self.gravity, self.dt, self.min_mass,
                       self._wp.vec3i(*box.shape), self._wp.vec3i(*box.origin), self.full, self.model.grid.bound,
                       self.wall_mode, self.wall_mu], [v3(gv.view(-1, 3))])
            grids = [gv]
            gw = gv
        else:
            self._run(k["grid_velocity"], box.shape, [v3(grid_mv), wgm, self.gravity, self.dt, self.min_mass],
                      [v3(gv)])
            grids = [gv]
            for ci, args in enumerate(self.col_args):
                out = torch.empty_like(gv)
                self._run(k["grid_collider"], box.shape,
                          self._collider_inputs(grids[-1], wgm, blo, args, control[ci]), [v3(out)])
                grids.append(out)
            gw = torch.empty_like(gv)
            self._run(k["grid_walls"], box.shape, [v3(grids[-1]), self._wp.vec3i(*box.origin), self.full,
                                                   self.model.grid.bound, self.wall_mode, self.wall_mu], [v3(gw)])
            grids.append(gw)
        x1, v1 = torch.empty_like(x), torch.empty_like(v)
        C1, Ft, F1 = torch.empty_like(C), torch.empty_like(F), torch.empty_like(F)
        tau1 = torch.empty_like(F)
        wgw = v3(gw)

        def to_particles(c, a, b):
            cut = self._cut(a, b, n)  # (the whole rows: no slice, ~2 us a tensor)
            self._run(k["g2p"], b - a, [v3(cut(x)), m33(cut(F)), i32(cut(act)), wgw, blo, self.dx, self.dt],
                      [v3(cut(x1)), v3(cut(v1)), m33(cut(C1)), m33(cut(Ft))])
            if not self._law_only:
                self._run(k["plasticity_stress"], b - a,
                          [m33(cut(Ft)), i32(cut(law)), w(cut(E)), w(cut(nu)), w(cut(ys)), w(cut(fa)), w(cut(tc)),
                           w(cut(ts))], [m33(cut(F1)), m33(cut(tau1))])

        self._parallel(to_particles)
        law_graphs = self._torch_laws_forward(Ft, pp, tau1, F1, step, keep=keep and bool(self.torch_laws))
        rigid_v = None
        if self.rigid is not None:
            ri = self.rigid.index
            rigid_v = v1[ri]
            xr, vr, Cr = rigid_projection(x[ri], rigid_v, m[ri], self.rigid.body, self.rigid.count,
                                          self.model.dt)
            x1[ri], v1[ri], C1[ri] = xr, vr, Cr
            F1[ri] = torch.eye(3, dtype=dt_, device=dev)
        saved = None
        if keep:
            saved = _Substep(x, F, C, v, A, p, m, box, grid_mv, grid_m, grids, C1, Ft, control, rigid_v, act,
                             emitted_now, tau, hook, law_graphs)
        return State(x1, v1, C1, F1), tau1, saved

    # -- adjoint of one substep -------------------------------------------------------------------

    def substep_adjoint(self, s: _Substep, params: Sequence[torch.Tensor], adj_out: State,
                        adj_params: Sequence[torch.Tensor], adj_control: torch.Tensor | None,
                        adj_tau_out: torch.Tensor | None = None) -> tuple[State, torch.Tensor]:
        """Adjoint of :meth:`substep`: returns d loss / d (input state) and d loss / d (input stress
        ``tau``); ``adj_tau_out`` is d loss / d (the stress it returned) (None: zero). Accumulates into
        ``adj_params`` (same order as ``params``, contiguous) and ``adj_control`` (n_col, 13)."""
        k, dev, dt_ = self.k, self.device, self.dtype
        w, v3, m33, i32 = self._scalars, self._vec3s, self._mat33s, self._ints
        n = s.x.shape[0]
        pp = _particle_params(params)
        E, nu, eta, rho, vol, ys, fa, tc, ts = (t.contiguous() for t in (
            pp.E, pp.nu, pp.viscosity, pp.density, pp.volume, pp.yield_stress, pp.friction_angle, pp.theta_c,
            pp.theta_s))
        adj = _particle_params(adj_params)
        aE, anu, aeta, arho, avol, ays, afa, atc, ats = (
            adj.E, adj.nu, adj.viscosity, adj.density, adj.volume, adj.yield_stress, adj.friction_angle, adj.theta_c,
            adj.theta_s)
        law, act = self.law_t, s.active
        gx, gv, gC, gF = (t.contiguous() for t in adj_out)
        rigid_adj = None
        if self.rigid is not None:
            gx, gv, gC, gF, rigid_adj = self._rigid_adjoint(s, gx, gv, gC, gF)
        box = s.box
        blo = k["vec3"](*box.lower)
        many = len(self.chunks) > 1
        adj_Ft = _zeros((n, 3, 3), dt_, dev)
        adj_x = _zeros((n, 3), dt_, dev)
        adj_F = _zeros((n, 3, 3), dt_, dev)
        gv_parts = self._scatter_grids(box, 3)
        wgw = v3(s.grid_v[-1])
        # (rows of rigid particles are read but do not matter: law 6 has no stress)
        g_tau1 = _zeros((n, 3, 3), dt_, dev) if adj_tau_out is None else adj_tau_out.contiguous()
        # torch laws first: the Warp adjoint adds nothing to their rows (law code EXTERNAL)
        self._torch_laws_adjoint(s.F_trial, pp, gF, g_tau1, adj_Ft, adj_params, s.law_graphs)

        def from_particles(c, a, b):
            cut = self._cut(a, b, n)  # (the whole rows: no slice, ~2 us a tensor)
            # plastic projection and the stress at F' (hand-written, one SVD)
            if not self._law_only:
                self._run(k["plasticity_stress_adjoint"], b - a,
                          [m33(cut(s.F_trial)), i32(cut(law)), w(cut(E)), w(cut(nu)), w(cut(ys)), w(cut(fa)),
                           w(cut(tc)), w(cut(ts)), m33(cut(gF)), m33(cut(g_tau1)), m33(cut(adj_Ft)), w(cut(aE)),
                           w(cut(anu)), w(cut(ays)), w(cut(afa)), w(cut(atc)), w(cut(ats))])
            # g2p (hand-written: a scatter into this chunk's grid)
            self._run(k["g2p_adjoint"], b - a,
                      [v3(cut(s.x)), m33(cut(s.F)), i32(cut(act)), wgw, m33(cut(s.C_out)), blo, self.dx,
                       self.dt, v3(cut(gx)), v3(cut(gv)), m33(cut(gC)), m33(cut(adj_Ft)), v3(cut(adj_x)),
                       m33(cut(adj_F)), v3(gv_parts[c])])

        self._parallel(from_particles)
        adj_gv = gv_parts.sum(0) if many else gv_parts[0]
        z = self.zero
        wgm = w(s.grid_m)
        if not self.col_args:  # grid_velocity_walls: one launch, hand adjoint (writes every node)
            adj_grid_m, adj_grid_mv = torch.empty_like(s.grid_m), torch.empty_like(s.grid_mv)
            wagm = w(adj_grid_m)
            self._run(k["grid_velocity_walls_adjoint"], s.grid_m.numel(),
                      [v3(s.grid_mv.view(-1, 3)), w(s.grid_m.view(-1)), self.gravity, self.dt, self.min_mass,
                       self._wp.vec3i(*box.shape), self._wp.vec3i(*box.origin), self.full, self.model.grid.bound,
                       self.wall_mode, self.wall_mu, v3(adj_gv.view(-1, 3)), v3(adj_grid_mv.view(-1, 3)),
                       w(adj_grid_m.view(-1))])
        else:
            adj_grid_m, adj_grid_mv = torch.zeros_like(s.grid_m), torch.zeros_like(s.grid_mv)
            wagm = w(adj_grid_m)
            # walls
            adj_prev = torch.zeros_like(adj_gv)
            self._run(k["grid_walls"], box.shape, [v3(s.grid_v[-2]), self._wp.vec3i(*box.origin), self.full,
                                                   self.model.grid.bound, self.wall_mode, self.wall_mu],
                      [v3(s.grid_v[-1])], adjoint=True,
                      adj_inputs=[v3(adj_prev), self._wp.vec3i(), self._wp.vec3i(), 0, 0, self.zero],
                      adj_outputs=[v3(adj_gv)])
            adj_gv = adj_prev
            # colliders in reverse
            for ci in range(len(self.col_args) - 1, -1, -1):
                a = self.col_args[ci]
                adj_prev = torch.zeros_like(adj_gv)
                # the kernel's adjoint accumulates into the collider's row of adj_control
                adj_row = adj_control[ci] if adj_control is not None else _zeros((COLLIDER_STATE,), dt_, dev)
                ins = self._collider_inputs(s.grid_v[ci], wgm, blo, a, s.control[ci])
                adj_ins = [v3(adj_prev), wagm, k["vec3"](), z, 0, a["size"], z, z, 0, 0, None, 0, a["dims"],
                           a["glo"], z, w(adj_row)]
                self._run(k["grid_collider"], box.shape, ins, [v3(s.grid_v[ci + 1])], adjoint=True,
                          adj_inputs=adj_ins, adj_outputs=[v3(adj_gv)])
                adj_gv = adj_prev
            # grid velocity: momentum / mass + g dt
            self._run(k["grid_velocity"], box.shape, [v3(s.grid_mv), wgm, self.gravity, self.dt, self.min_mass],
                      [v3(s.grid_v[0])], adjoint=True,
                      adj_inputs=[v3(adj_grid_mv), wagm, k["vec3"](), z, z], adj_outputs=[v3(adj_gv)])
        if s.grid_force is not None:  # grid_mv = P2G momentum + impulse(P2G momentum, mass, ...)
            hook, hook_saved = s.grid_force
            a_mv, a_m = hook.adjoint(hook_saved, adj_grid_mv.clone())
            if a_mv is not None:
                adj_grid_mv = (adj_grid_mv + a_mv).contiguous()
            if a_m is not None:
                adj_grid_m += a_m
        adj_p = _zeros((n, 3), dt_, dev)
        adj_A = _zeros((n, 3, 3), dt_, dev)
        adj_m = _zeros((n,), dt_, dev)
        adj_C = _zeros((n, 3, 3), dt_, dev)
        adj_v = _zeros((n, 3), dt_, dev)
        adj_tau = _zeros((n, 3, 3), dt_, dev)
        tau = s.tau
        wamv = v3(adj_grid_mv)

        def from_grid(c, a, b):
            cut = self._cut(a, b, n)  # (the whole rows: no slice, ~2 us a tensor)
            # p2g (hand-written: a gather)
            self._run(k["p2g_adjoint"], b - a,
                      [v3(cut(s.x)), v3(cut(s.p)), m33(cut(s.A)), w(cut(s.m)), i32(cut(act)), blo, self.dx, wamv,
                       wagm, v3(cut(adj_x)), v3(cut(adj_p)), m33(cut(adj_A)), w(cut(adj_m))])
            # particle affine momentum and stress (hand-written)
            self._run(k["particle_affine_adjoint"], b - a,
                      [m33(cut(s.F)), m33(cut(s.C)), v3(cut(s.v)), m33(cut(tau)), i32(cut(act)), w(cut(eta)),
                       w(cut(rho)), w(cut(vol)), self.dt, self.inv_dx, m33(cut(adj_A)), v3(cut(adj_p)),
                       w(cut(adj_m)), m33(cut(adj_F)), m33(cut(adj_C)), v3(cut(adj_v)), m33(cut(adj_tau)),
                       w(cut(aeta)), w(cut(arho)), w(cut(avol))])

        self._parallel(from_grid)
        if rigid_adj is not None:
            ri = self.rigid.index
            g_x, g_m = rigid_adj
            adj_x.index_add_(0, ri, g_x)
            arho.index_add_(0, ri, g_m * vol[ri])  # m = density * volume
            avol.index_add_(0, ri, g_m * rho[ri])
        if s.emitted_now is not None:
            self._emission_adjoint(s, adj_x, adj_v, adj_C, adj_F, adj_control)
            adj_tau[self.emitted.index[s.emitted_now]] = 0.0  # their F was reset to I: tau(I) = 0
        return State(adj_x, adj_v, adj_C, adj_F), adj_tau

    def _emission_adjoint(self, s: _Substep, adj_x, adj_v, adj_C, adj_F, adj_control) -> None:
        """The particles placed at their nozzles this substep: their input rows were overwritten
        (zero adjoint); nozzles on colliders pass the placement's adjoint to the control."""
        e = self.emitted
        idx = e.index[s.emitted_now]
        gx, gv = adj_x[idx].clone(), adj_v[idx].clone()
        for t in (adj_x, adj_v, adj_C, adj_F):
            t[idx] = 0.0
        col = e.collider[s.emitted_now]
        moving = col >= 0
        if adj_control is None or not bool(moving.any()):
            return
        with torch.enable_grad():
            rows = s.control[col[moving]].detach().requires_grad_()
            xm, vm = place_emitted(e.local_x[s.emitted_now][moving], e.local_v[s.emitted_now][moving], rows)
            (g_rows,) = torch.autograd.grad((xm, vm), (rows,), (gx[moving], gv[moving]))
        adj_control.index_add_(0, col[moving], g_rows)

    def _rigid_adjoint(self, s: _Substep, gx, gv, gC, gF):
        """Back through the rigid projection: the adjoints of the G2P outputs it replaced, and the
        adjoints of the rigid particles' start positions and masses."""
        ri = self.rigid.index
        with torch.enable_grad():
            xr = s.x[ri].requires_grad_()
            vr = s.rigid_v.clone().requires_grad_()
            mr = s.m[ri].requires_grad_()
            out = rigid_projection(xr, vr, mr, self.rigid.body, self.rigid.count, self.model.dt)
            g_x, g_v, g_m = torch.autograd.grad(out, (xr, vr, mr), (gx[ri], gv[ri], gC[ri]))
        gx, gv, gC, gF = gx.clone(), gv.clone(), gC.clone(), gF.clone()
        gx[ri] = 0.0  # x', C' and F' of rigid particles do not come from G2P and plasticity
        gC[ri] = 0.0
        gF[ri] = 0.0
        gv[ri] = g_v
        return gx, gv, gC, gF, (g_x, g_m)
