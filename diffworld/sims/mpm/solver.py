"""MLS-MPM solver: Model / State / Control, one substep, and its hand-ordered adjoint.

* :class:`Model` holds what a rollout does not change: the grid, dt, gravity, walls, colliders,
  and per-particle material parameters as tensors (each may require a gradient).
* :class:`State` holds x, v, C, F of every particle at one instant. A step never writes its input.
* Control is a tensor of collider kinematic states per substep, shape (T, n_colliders, 13):
  position [m], quaternion (x, y, z, w), linear velocity [m/s], angular velocity [rad/s]
  (see :mod:`diffworld.sims.mpm.colliders` for building it from actions or keyframes).

:class:`Stepper` runs substeps on Warp arrays wrapped around torch memory. ``forward`` keeps
nothing (ping-pong buffers are fine without a tape); ``record`` keeps every intermediate of a span
of substeps and ``backward`` runs their adjoints in reverse (contract 3: nothing a reverse kernel
reads is ever overwritten). :mod:`diffworld.sims.mpm.rollout` wraps spans into torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from diffworld.engine.bridge import launch, to_warp
from diffworld.engine.runtime import init_warp
from diffworld.sims.mpm import kernels as K

__all__ = ["Collider", "GridSpec", "Model", "State", "Stepper", "PARTICLE_PARAMS"]

# Per-particle float parameters, in the order the window op takes them.
PARTICLE_PARAMS = ("E", "nu", "viscosity", "density", "volume", "yield_stress", "friction_angle", "theta_c",
                   "theta_s")
WALL_MODES = tuple(K.WALL)


class State(NamedTuple):
    """Particle state at one instant (N particles).

    Attributes:
        x: positions [m], shape (N, 3).
        v: velocities [m/s], shape (N, 3).
        C: APIC affine velocity field (velocity gradient) [1/s], shape (N, 3, 3).
        F: deformation gradient (after plastic projection), shape (N, 3, 3).
    """

    x: torch.Tensor
    v: torch.Tensor
    C: torch.Tensor
    F: torch.Tensor

    def detach(self) -> "State":
        return State(*(t.detach() for t in self))

    def clone(self) -> "State":
        return State(*(t.clone() for t in self))


@dataclass(frozen=True)
class GridSpec:
    """The background grid.

    Attributes:
        lower: Domain lower corner [m].
        dx: Cell size [m].
        shape: Nodes per axis (gx, gy, gz); node (i, j, k) sits at lower + (i, j, k) dx.
        bound: Wall thickness in nodes (velocities through the domain faces are removed there).
    """

    lower: tuple[float, float, float]
    dx: float
    shape: tuple[int, int, int]
    bound: int = 3

    @staticmethod
    def make(lower: Sequence[float], upper: Sequence[float], resolution: int, bound: int = 3) -> "GridSpec":
        """Grid over the box [lower, upper] with ``resolution`` cells along its longest side."""
        extent = [float(b) - float(a) for a, b in zip(lower, upper)]
        if len(extent) != 3 or min(extent) <= 0:
            raise ValueError(f"domain: expected lower < upper on 3 axes, got lower={lower}, upper={upper}")
        if resolution < 2 * bound + 2:
            raise ValueError(f"resolution: expected at least {2 * bound + 2} cells, got {resolution}")
        dx = max(extent) / resolution
        shape = tuple(int(math.ceil(e / dx - 1e-9)) + 1 for e in extent)
        return GridSpec(tuple(float(a) for a in lower), dx, shape, bound)

    @property
    def upper(self) -> tuple[float, float, float]:
        return tuple(lo + (n - 1) * self.dx for lo, n in zip(self.lower, self.shape))

    def inner_box(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Region where particles may be: the stencil stays inside the grid and off the walls."""
        m = self.bound * self.dx
        return tuple(lo + m for lo in self.lower), tuple(hi - m for hi in self.upper)


@dataclass
class Collider:
    """A kinematic rigid body with an SDF shape, acting on grid velocities.

    Attributes:
        shape: One of ``sphere, box, capsule, cylinder, cup, plane, grid``.
        size: Shape dimensions [m] in the local frame (z is the axis): sphere (r, -, -), box half
            extents, capsule (r, half segment length, -), cylinder (r, half height, -), cup (inner
            r, half height, wall thickness); unused for plane (normal +z) and grid.
        friction: Coulomb coefficient mu (large: no sliding).
        softness: 0 for hard contact (only nodes inside); > 0 [1/m] blends the contact response
            with weight min(exp(-softness * sdf), 1) so gradients arrive before contact.
        sticky: Nodes in contact take the collider's velocity.
        sdf: For ``grid``: node values of the SDF in the local frame, shape (a, b, c).
        sdf_lower: For ``grid``: local position of node (0, 0, 0) [m].
        sdf_spacing: For ``grid``: node spacing [m].
        name: Label for outputs.
    """

    shape: str
    size: tuple[float, float, float] = (0.1, 0.1, 0.1)
    friction: float = 0.5
    softness: float = 0.0
    sticky: bool = False
    sdf: torch.Tensor | None = None
    sdf_lower: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sdf_spacing: float = 1.0
    name: str = "collider"

    def __post_init__(self) -> None:
        if self.shape not in K.SHAPE:
            raise ValueError(f"collider '{self.name}': shape expected one of {list(K.SHAPE)}, got {self.shape!r}")
        if self.shape == "grid" and (self.sdf is None or self.sdf.dim() != 3 or min(self.sdf.shape) < 2):
            got = None if self.sdf is None else tuple(self.sdf.shape)
            raise ValueError(f"collider '{self.name}': shape 'grid' expects sdf of shape (a, b, c) with a, b, c >= 2, "
                             f"got {got}")
        if self.friction < 0 or self.softness < 0:
            raise ValueError(f"collider '{self.name}': friction and softness expected >= 0, got "
                             f"{self.friction}, {self.softness}")


@dataclass
class Model:
    """Everything a rollout keeps fixed. Build with :func:`diffworld.sims.mpm.build_model`.

    Attributes:
        grid: The background grid.
        dt: Substep [s].
        gravity: [m/s^2], 3 floats.
        law: Constitutive law id per particle, int32 tensor (N,).
        params: Per-particle parameters (:data:`PARTICLE_PARAMS`), float tensors (N,); replace
            one by a tensor with ``requires_grad`` to optimize it.
        body: Body index per particle, int64 tensor (N,) (for losses and rendering).
        colliders: Kinematic colliders, in the order of the control tensor's second axis.
        wall: Domain wall behaviour: ``slip``, ``sticky`` or ``friction``.
        wall_friction: Coulomb coefficient of ``friction`` walls.
    """

    grid: GridSpec
    dt: float
    gravity: tuple[float, float, float]
    law: torch.Tensor
    params: dict[str, torch.Tensor]
    body: torch.Tensor
    colliders: list[Collider] = field(default_factory=list)
    wall: str = "slip"
    wall_friction: float = 0.0
    body_names: list[str] = field(default_factory=list)

    @property
    def n_particles(self) -> int:
        return int(self.law.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.params["E"].dtype

    @property
    def device(self) -> torch.device:
        return self.law.device


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


class _Substep(NamedTuple):
    """Intermediates of one substep kept for its adjoint."""

    x: torch.Tensor
    F: torch.Tensor
    C: torch.Tensor
    v: torch.Tensor
    A: torch.Tensor
    p: torch.Tensor
    m: torch.Tensor
    grid_mv: torch.Tensor
    grid_m: torch.Tensor
    grid_v: list  # velocity after division, then after each collider, then after the walls
    C_out: torch.Tensor
    F_trial: torch.Tensor
    control: torch.Tensor | None


class Stepper:
    """Runs substeps of one :class:`Model` on its device.

    Args:
        model: The model.
    """

    def __init__(self, model: Model) -> None:
        init_warp()
        self.model = model
        name = "float64" if model.dtype == torch.float64 else "float32"
        self.k = K.build(name)
        self.device = model.device
        self.dtype = model.dtype
        g = model.grid
        self.lo = self.k["vec3"](*g.lower)
        self.dx = self.k["scalar"](g.dx)
        self.dt = self.k["scalar"](model.dt)
        self.gravity = self.k["vec3"](*model.gravity)
        self.law = to_warp(model.law.to(torch.int32))
        self.active = to_warp(torch.ones(model.n_particles, dtype=torch.int32, device=self.device))
        self.wall_mode = K.WALL[model.wall]
        # Grid nodes lighter than this are empty (see kernels.grid_velocity).
        m = (model.params["density"] * model.params["volume"]).detach()
        self.min_mass = self.k["scalar"](1.0e-9 * float(m.min()) if m.numel() else 0.0)
        self._prepare_colliders()

    # -- colliders ----------------------------------------------------------------------------

    def _prepare_colliders(self) -> None:
        chunks, self.col_args = [], []
        offset = 0
        wp = init_warp()
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
            self.col_args.append(dict(kind=K.SHAPE[c.shape], size=self.k["vec3"](*c.size),
                                      friction=self.k["scalar"](c.friction), softness=self.k["scalar"](c.softness),
                                      sticky=int(c.sticky), offset=this, dims=wp.vec3i(*dims),
                                      glo=self.k["vec3"](*glo), h=self.k["scalar"](h)))
        data = torch.cat(chunks) if chunks else _zeros(1, self.dtype, self.device)
        self._sdf_data_t = data
        self.sdf_data = to_warp(data)

    # -- one substep ----------------------------------------------------------------------------

    def _params(self, params: Sequence[torch.Tensor]):
        return [to_warp(p) for p in params]

    def substep(self, state: State, params: Sequence[torch.Tensor], control: torch.Tensor | None,
                keep: bool = False) -> tuple[State, _Substep | None]:
        """Advance one substep. ``params`` in :data:`PARTICLE_PARAMS` order; ``control`` (n_col, 13).

        Returns the new state, and the intermediates when ``keep`` is set.
        """
        k, dev, dt_ = self.k, self.device, self.dtype
        n = state.x.shape[0]
        E, nu, eta, rho, vol, ys, fa, tc, ts = self._params(params)
        vec3, mat33 = k["vec3"], k["mat33"]
        x, v, C, F = state
        A = torch.empty((n, 3, 3), dtype=dt_, device=dev)
        p = torch.empty((n, 3), dtype=dt_, device=dev)
        m = torch.empty((n,), dtype=dt_, device=dev)
        wx, wv, wC, wF = to_warp(x, vec3), to_warp(v, vec3), to_warp(C, mat33), to_warp(F, mat33)
        inv_dx = k["scalar"](1.0 / self.model.grid.dx)
        launch(k["particle_affine"], n, [wF, wC, wv, self.law, self.active, E, nu, eta, rho, vol, self.dt, inv_dx],
               dev, outputs=[to_warp(A, mat33), to_warp(p, vec3), to_warp(m)])
        gs = self.model.grid.shape
        grid_mv = _zeros((*gs, 3), dt_, dev)
        grid_m = _zeros(gs, dt_, dev)
        launch(k["p2g"], n, [wx, to_warp(p, vec3), to_warp(A, mat33), to_warp(m), self.active, self.lo, self.dx],
               dev, outputs=[to_warp(grid_mv, vec3), to_warp(grid_m)])
        gv = torch.empty((*gs, 3), dtype=dt_, device=dev)
        wgm = to_warp(grid_m)
        launch(k["grid_velocity"], gs, [to_warp(grid_mv, vec3), wgm, self.gravity, self.dt, self.min_mass], dev,
               outputs=[to_warp(gv, vec3)])
        grids = [gv]
        for ci, args in enumerate(self.col_args):
            out = torch.empty_like(gv)
            launch(k["grid_collider"], gs, self._collider_inputs(grids[-1], wgm, args, control[ci]), dev,
                   outputs=[to_warp(out, vec3)])
            grids.append(out)
        gw = torch.empty_like(gv)
        launch(k["grid_walls"], gs, [to_warp(grids[-1], vec3), self.model.grid.bound, self.wall_mode,
                                     k["scalar"](self.model.wall_friction)], dev, outputs=[to_warp(gw, vec3)])
        grids.append(gw)
        x1, v1 = torch.empty_like(x), torch.empty_like(v)
        C1, Ft, F1 = torch.empty_like(C), torch.empty_like(F), torch.empty_like(F)
        launch(k["g2p"], n, [wx, wF, self.active, to_warp(gw, vec3), self.lo, self.dx, self.dt], dev,
               outputs=[to_warp(x1, vec3), to_warp(v1, vec3), to_warp(C1, mat33), to_warp(Ft, mat33)])
        launch(k["plasticity"], n, [to_warp(Ft, mat33), self.law, E, nu, ys, fa, tc, ts], dev,
               outputs=[to_warp(F1, mat33)])
        saved = None
        if keep:
            saved = _Substep(x, F, C, v, A, p, m, grid_mv, grid_m, grids, C1, Ft, control)
        return State(x1, v1, C1, F1), saved

    def _collider_inputs(self, gv_in: torch.Tensor, wgm, a: dict, control_row: torch.Tensor) -> list:
        vec3 = self.k["vec3"]
        return [to_warp(gv_in, vec3), wgm, self.lo, self.dx, a["kind"], a["size"], a["friction"], a["softness"],
                a["sticky"], self.sdf_data, a["offset"], a["dims"], a["glo"], a["h"], to_warp(control_row)]

    # -- adjoint of one substep -------------------------------------------------------------------

    def substep_adjoint(self, s: _Substep, params: Sequence[torch.Tensor], adj_out: State,
                        adj_params: Sequence[torch.Tensor], adj_control: torch.Tensor | None) -> State:
        """Adjoint of :meth:`substep`: returns d loss / d (input state); accumulates into
        ``adj_params`` (same order as ``params``) and ``adj_control`` (n_col, 13)."""
        k, dev, dt_ = self.k, self.device, self.dtype
        vec3, mat33 = k["vec3"], k["mat33"]
        n = s.x.shape[0]
        E, nu, eta, rho, vol, ys, fa, tc, ts = self._params(params)
        aE, anu, aeta, arho, avol, ays, afa, atc, ats = self._params(adj_params)
        gx, gv, gC, gF = adj_out
        # plasticity: F_trial -> F_out
        adj_Ft = _zeros((n, 3, 3), dt_, dev)
        F_out_dummy = torch.empty_like(s.F_trial)
        launch(k["plasticity"], n, [to_warp(s.F_trial, mat33), self.law, E, nu, ys, fa, tc, ts], dev,
               outputs=[to_warp(F_out_dummy, mat33)], adjoint=True,
               adj_inputs=[to_warp(adj_Ft, mat33), None, aE, anu, ays, afa, atc, ats],
               adj_outputs=[to_warp(gF.contiguous(), mat33)])
        # g2p
        gs = self.model.grid.shape
        adj_x = _zeros((n, 3), dt_, dev)
        adj_F = _zeros((n, 3, 3), dt_, dev)
        adj_gv = _zeros((*gs, 3), dt_, dev)
        gw = s.grid_v[-1]
        launch(k["g2p_adjoint"], n, [to_warp(s.x, vec3), to_warp(s.F, mat33), self.active, to_warp(gw, vec3),
                                      to_warp(s.C_out, mat33), self.lo, self.dx, self.dt,
                                      to_warp(gx.contiguous(), vec3), to_warp(gv.contiguous(), vec3),
                                      to_warp(gC.contiguous(), mat33), to_warp(adj_Ft, mat33),
                                      to_warp(adj_x, vec3), to_warp(adj_F, mat33), to_warp(adj_gv, vec3)], dev)
        # walls
        adj_prev = _zeros((*gs, 3), dt_, dev)
        launch(k["grid_walls"], gs, [to_warp(s.grid_v[-2], vec3), self.model.grid.bound, self.wall_mode,
                                     k["scalar"](self.model.wall_friction)], dev,
               outputs=[to_warp(gw, vec3)], adjoint=True,
               adj_inputs=[to_warp(adj_prev, vec3), 0, 0, k["scalar"](0.0)], adj_outputs=[to_warp(adj_gv, vec3)])
        adj_gv = adj_prev
        wgm = to_warp(s.grid_m)
        adj_grid_m = _zeros(gs, dt_, dev)
        wagm = to_warp(adj_grid_m)
        # colliders in reverse
        for ci in range(len(self.col_args) - 1, -1, -1):
            a = self.col_args[ci]
            adj_prev = _zeros((*gs, 3), dt_, dev)
            adj_row = _zeros((13,), dt_, dev)
            ins = self._collider_inputs(s.grid_v[ci], wgm, a, s.control[ci])
            z = k["scalar"](0.0)
            adj_ins = [to_warp(adj_prev, vec3), wagm, self.lo, z, 0, a["size"], z, z, 0, None, 0, a["dims"], a["glo"],
                       z, to_warp(adj_row)]
            launch(k["grid_collider"], gs, ins, dev, outputs=[to_warp(s.grid_v[ci + 1], vec3)], adjoint=True,
                   adj_inputs=adj_ins, adj_outputs=[to_warp(adj_gv, vec3)])
            if adj_control is not None:
                adj_control[ci] += adj_row
            adj_gv = adj_prev
        # grid velocity: momentum / mass + g dt
        adj_grid_mv = _zeros((*gs, 3), dt_, dev)
        launch(k["grid_velocity"], gs, [to_warp(s.grid_mv, vec3), wgm, self.gravity, self.dt, self.min_mass], dev,
               outputs=[to_warp(s.grid_v[0], vec3)], adjoint=True,
               adj_inputs=[to_warp(adj_grid_mv, vec3), wagm, self.k["vec3"](), self.k["scalar"](0.0),
                           self.k["scalar"](0.0)],
               adj_outputs=[to_warp(adj_gv, vec3)])
        # p2g (a gather)
        adj_p = _zeros((n, 3), dt_, dev)
        adj_A = _zeros((n, 3, 3), dt_, dev)
        adj_m = _zeros((n,), dt_, dev)
        launch(k["p2g_adjoint"], n, [to_warp(s.x, vec3), to_warp(s.p, vec3), to_warp(s.A, mat33), to_warp(s.m),
                                      self.active, self.lo, self.dx, to_warp(adj_grid_mv, vec3), wagm,
                                      to_warp(adj_x, vec3), to_warp(adj_p, vec3), to_warp(adj_A, mat33),
                                      to_warp(adj_m)], dev)
        # particle affine momentum and stress
        adj_C = _zeros((n, 3, 3), dt_, dev)
        adj_v = _zeros((n, 3), dt_, dev)
        inv_dx = k["scalar"](1.0 / self.model.grid.dx)
        z = k["scalar"](0.0)
        launch(k["particle_affine"], n, [to_warp(s.F, mat33), to_warp(s.C, mat33), to_warp(s.v, vec3), self.law,
                                         self.active, E, nu, eta, rho, vol, self.dt, inv_dx], dev,
               outputs=[to_warp(s.A, mat33), to_warp(s.p, vec3), to_warp(s.m)], adjoint=True,
               adj_inputs=[to_warp(adj_F, mat33), to_warp(adj_C, mat33), to_warp(adj_v, vec3), None, None, aE, anu,
                           aeta, arho, avol, z, z],
               adj_outputs=[to_warp(adj_A, mat33), to_warp(adj_p, vec3), to_warp(adj_m)])
        return State(adj_x, adj_v, adj_C, adj_F)
