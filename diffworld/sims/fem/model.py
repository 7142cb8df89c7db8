"""Model / State / Control of the FEM solid (docs/architecture.md, contract 4).

* :class:`Model` holds what a rollout does not change: the rest mesh (``Dm_inv``, rest volumes),
  the per-tet law codes, and the parameters as tensors that may require gradients: per-tet Young's
  modulus ``E`` [Pa], Poisson's ratio ``nu`` and ``density`` [kg/m^3], the mass-proportional
  ``damping`` [1/s] and ``gravity`` [m/s^2]; plus the kinematic (Dirichlet) node set and the nodes
  that take external loads. Lumped masses are derived from the density inside the differentiable
  rollout (:meth:`Model.masses`), so density gradients flow.
* :class:`State`: positions ``x`` and velocities ``v`` of every node.
* :class:`Control`: per step, the rigid pose of the kinematic node set (translation and rotation,
  applied about the model's pivot to the nodes' anchors, by default their rest positions) and the
  external forces on the load nodes.

Example::

    mesh = TetMesh.box((0, 0, 0), (0.1, 0.02, 0.02), (20, 4, 4))
    model = build_model(mesh, E=1e5, nu=0.3, density=1000.0, law="linear",
                        kinematic=mesh.nodes_in_box((0, 0, 0), (0, 0.02, 0.02)))
    state = model.rest_state()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from diffworld.sims.constitutive.laws import lame
from diffworld.sims.fem.kernels import POSE_WIDTH
from diffworld.sims.fem.materials import FEM_MATERIALS, check_parameters, material_code
from diffworld.sims.fem.mesh import TetMesh

__all__ = ["Control", "Energy", "Model", "State", "build_model", "rotation_matrix"]


class State(NamedTuple):
    """Nodal state at one instant (N nodes).

    Attributes:
        x: positions [m], shape (N, 3).
        v: velocities [m/s], shape (N, 3).
    """

    x: torch.Tensor
    v: torch.Tensor

    def detach(self) -> "State":
        return State(self.x.detach(), self.v.detach())

    def clone(self) -> "State":
        return State(self.x.clone(), self.v.clone())


class Energy(NamedTuple):
    """Energies of a state [J] (0-d tensors, differentiable).

    Attributes:
        kinetic: ``1/2 sum m |v|^2`` with the lumped masses.
        elastic: ``sum V psi(F)`` over the tets (the torch reference laws, rest volumes V).
        gravity: ``-sum m g . x`` (zero for zero gravity).
    """

    kinetic: torch.Tensor
    elastic: torch.Tensor
    gravity: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.kinetic + self.elastic + self.gravity


@dataclass
class Model:
    """Everything a rollout keeps fixed. Build with :func:`build_model`.

    Attributes:
        mesh: The rest mesh, in the model's dtype and device.
        law: Law code per tet (:data:`~diffworld.sims.fem.materials.FEM_MATERIALS`), int32 (T,).
        E: Young's modulus per tet [Pa], (T,).
        nu: Poisson's ratio per tet, (T,).
        density: Density per tet [kg/m^3], (T,).
        damping: Mass-proportional damping coefficient [1/s], 0-d (the damping force is
            ``-damping m v``; every mode decays at rate ``damping / 2`` while underdamped).
        gravity: [m/s^2], (3,).
        kinematic: Ids of the kinematic nodes, int64 (K,) (sorted, unique).
        anchors: Their positions at the identity pose [m], (K, 3).
        pivot: The point the control's rotation turns about [m], (3,).
        load_nodes: Ids of the nodes that take external forces, int64 (M,); the control's
            ``forces`` have one row per load node, in this order.

    Any parameter may be replaced by a tensor that requires gradients (same shape), or passed
    to :func:`~diffworld.sims.fem.rollout.rollout` through ``params``.
    """

    mesh: TetMesh
    law: torch.Tensor
    E: torch.Tensor
    nu: torch.Tensor
    density: torch.Tensor
    damping: torch.Tensor
    gravity: torch.Tensor
    kinematic: torch.Tensor
    anchors: torch.Tensor
    pivot: torch.Tensor
    load_nodes: torch.Tensor

    @property
    def n_nodes(self) -> int:
        return self.mesh.n_vertices

    @property
    def n_tets(self) -> int:
        return self.mesh.n_tets

    @property
    def dtype(self) -> torch.dtype:
        return self.mesh.vertices.dtype

    @property
    def device(self) -> torch.device:
        return self.mesh.vertices.device

    @property
    def control_width(self) -> int:
        """Floats per step of the packed control (:meth:`Control.rows`): pose 12 + 3 per load node."""
        return POSE_WIDTH + 3 * int(self.load_nodes.numel())

    def rest_state(self) -> State:
        """Nodes at their rest positions, at rest."""
        x = self.mesh.vertices.clone()
        return State(x, torch.zeros_like(x))

    def masses(self, density: torch.Tensor | None = None) -> torch.Tensor:
        """Lumped nodal masses [kg], (N,), differentiable in ``density`` (default the model's)."""
        return self.mesh.lumped_masses(self.density if density is None else density)

    def deformation_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """F = Ds Dm_inv of every tet at positions ``x`` (N, 3) [m]: (T, 3, 3), differentiable."""
        p = x[self.mesh.tets]  # (T, 4, 3)
        Ds = (p[:, 1:] - p[:, :1]).transpose(1, 2)
        return Ds @ self.mesh.Dm_inv

    def _by_law(self, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor, what: str) -> torch.Tensor:
        """A torch reference quantity per tet, tet by tet's law."""
        mu, lam = lame(E, nu)
        out = None
        for m in FEM_MATERIALS.values():
            mask = self.law == m.code
            if not bool(mask.any()):
                continue
            fn = m.energy_lame if what == "energy" else m.first_piola_lame
            val = fn(F[mask], mu[mask], lam[mask])
            if out is None:
                out = torch.zeros((F.shape[0], *val.shape[1:]), dtype=val.dtype, device=val.device)
            out = out.index_put((mask.nonzero()[:, 0],), val)
        return out

    def stress(self, x: torch.Tensor, E: torch.Tensor | None = None, nu: torch.Tensor | None = None) -> torch.Tensor:
        """First Piola stress of every tet at positions ``x`` [Pa], (T, 3, 3) (torch reference;
        ``E``, ``nu``: overrides, per tet or scalars)."""
        F = self.deformation_gradient(x)
        E, nu = (torch.as_tensor(v, dtype=self.dtype, device=self.device).expand(self.n_tets)
                 for v in (self.E if E is None else E, self.nu if nu is None else nu))
        return self._by_law(F, E, nu, "piola")

    def energy(self, state: State, params: dict[str, torch.Tensor] | None = None) -> Energy:
        """Kinetic, elastic and gravitational energy of ``state`` [J] (torch reference laws).

        Args:
            state: The state.
            params: Overrides of the model's parameters by name (as for the rollout).
        """
        p = {name: getattr(self, name) for name in ("E", "nu", "density", "gravity")}
        p.update({k: v for k, v in (params or {}).items() if k in p})
        for k in ("E", "nu"):  # scalars for every tet
            p[k] = torch.as_tensor(p[k], dtype=self.dtype, device=self.device).expand(self.n_tets)
        m = self.masses(p["density"])
        kinetic = 0.5 * (m * (state.v * state.v).sum(1)).sum()
        F = self.deformation_gradient(state.x)
        elastic = (self.mesh.rest_volume * self._by_law(F, p["E"], p["nu"], "energy")).sum()
        gravity = -(m[:, None] * state.x * p["gravity"]).sum()
        return Energy(kinetic, elastic, gravity)


# ------------------------------------------------------------------------------------------------
# Building a model
# ------------------------------------------------------------------------------------------------

def _per_tet(name: str, value, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A number, 0-d or (T,) tensor as a (T,) tensor of the model's dtype; a tensor keeps its graph."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"build_model: expected '{name}' a number or a tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if tuple(t.shape) != (n,):
        raise ValueError(f"build_model: expected '{name}' a number or of shape ({n},) (one per tet), "
                         f"got {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _node_ids(name: str, ids, n_nodes: int, device: torch.device) -> torch.Tensor:
    """Sorted unique int64 node ids, checked in range."""
    if ids is None:
        return torch.zeros(0, dtype=torch.int64, device=device)
    t = torch.as_tensor(ids, device=device)
    if t.dtype == torch.bool:  # a mask
        if tuple(t.shape) != (n_nodes,):
            raise ValueError(f"build_model: a mask '{name}' must have shape ({n_nodes},), got {tuple(t.shape)}")
        return t.nonzero()[:, 0]
    if t.dtype.is_floating_point or t.dim() != 1:
        raise ValueError(f"build_model: expected '{name}' 1-d integer node ids (or a bool mask), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_nodes:
            raise ValueError(f"build_model: '{name}' ids must lie in [0, {n_nodes}), got ids in [{lo}, {hi}]")
    u = torch.unique(t)
    if u.numel() != t.numel():
        raise ValueError(f"build_model: '{name}' lists {t.numel() - u.numel()} node(s) twice")
    return u


def _law_codes(law, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(law, str):
        return torch.full((n,), material_code(law), dtype=torch.int32, device=device)
    if isinstance(law, torch.Tensor):
        if law.dtype.is_floating_point or tuple(law.shape) != (n,):
            raise ValueError(f"build_model: expected 'law' a name, {n} names or an integer code tensor of shape "
                             f"({n},), got {law.dtype} {tuple(law.shape)}")
        known = torch.tensor([m.code for m in FEM_MATERIALS.values()], device=law.device)
        bad = (~torch.isin(law, known)).nonzero()[:, 0]
        if bad.numel():
            raise ValueError(f"build_model: law code {int(law[bad[0]])} of tet {int(bad[0])} is unknown; codes "
                             f"{ {m.name: m.code for m in FEM_MATERIALS.values()} }")
        return law.to(device=device, dtype=torch.int32)
    names = list(law)
    if len(names) != n:
        raise ValueError(f"build_model: expected 'law' a name or {n} names (one per tet), got {len(names)}")
    return torch.tensor([material_code(s) for s in names], dtype=torch.int32, device=device)


def build_model(mesh: TetMesh, *, E: float | torch.Tensor, nu: float | torch.Tensor, density: float | torch.Tensor,
                law: str | Sequence[str] | torch.Tensor = "stable_neo_hookean",
                gravity: Sequence[float] | torch.Tensor = (0.0, 0.0, -9.81), damping: float | torch.Tensor = 0.0,
                kinematic: torch.Tensor | Sequence[int] | None = None, anchors: torch.Tensor | None = None,
                pivot: Sequence[float] | torch.Tensor | None = None,
                load_nodes: torch.Tensor | Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Model:
    """Assemble an FEM model from a rest mesh and its materials.

    Args:
        mesh: The rest mesh.
        E: Young's modulus [Pa], a number or per tet (T,); a tensor keeps its autograd graph.
        nu: Poisson's ratio in (-1, 0.5), a number or (T,).
        density: [kg/m^3] > 0, a number or (T,).
        law: ``stable_neo_hookean``, ``fixed_corotated`` or ``linear``; one name, one per tet, or
            integer codes (T,).
        gravity: [m/s^2], 3 numbers or a (3,) tensor.
        damping: Mass-proportional damping [1/s] >= 0.
        kinematic: Ids (or an (N,) bool mask) of the nodes driven by the control's pose (clamped at
            their anchors without a control).
        anchors: Positions of the kinematic nodes at the identity pose [m], (K, 3); default their
            rest positions. Any positions may be given (e.g. a prescribed affine boundary field).
        pivot: The rotation centre of the control's pose [m]; default the anchors' centroid.
        load_nodes: Ids (or a mask) of the nodes that take the control's external forces; they
            must not be kinematic.
        dtype: float32 or float64.
        device: Torch device (default the mesh's).

    Returns:
        The model.

    Raises:
        TypeError: Wrong argument types or dtype.
        ValueError: Out-of-range parameters or node ids, wrong shapes (messages name the argument).
    """
    if not isinstance(mesh, TetMesh):
        raise TypeError(f"build_model: expected 'mesh' a diffworld.sims.fem.TetMesh, got {type(mesh).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"build_model: expected dtype float32 or float64, got {dtype}")
    device = torch.device(device) if device is not None else mesh.vertices.device
    mesh = mesh.to(dtype=dtype, device=device)
    n, nt = mesh.n_vertices, mesh.n_tets
    E_t, nu_t = _per_tet("E", E, nt, dtype, device), _per_tet("nu", nu, nt, dtype, device)
    try:
        check_parameters(E_t, nu_t)
    except ValueError as err:
        raise ValueError(f"build_model: {err}") from None
    rho = _per_tet("density", density, nt, dtype, device)
    bad = (~(torch.isfinite(rho.detach()) & (rho.detach() > 0))).nonzero()[:, 0]
    if bad.numel():
        raise ValueError(f"build_model: 'density' must be finite and > 0 [kg/m^3]; tet {int(bad[0])} has "
                         f"{float(rho[bad[0]]):g}")
    damp = torch.as_tensor(damping, device=device).to(dtype)
    if damp.dim() != 0 or not math.isfinite(float(damp.detach())) or float(damp.detach()) < 0:
        raise ValueError(f"build_model: expected 'damping' a finite number >= 0 [1/s], got {damping!r}")
    g = torch.as_tensor(gravity, device=device).to(dtype)
    if tuple(g.shape) != (3,) or not bool(torch.isfinite(g.detach()).all()):
        raise ValueError(f"build_model: expected 'gravity' 3 finite numbers [m/s^2], got {gravity!r}")
    kin = _node_ids("kinematic", kinematic, n, device)
    loads = _node_ids("load_nodes", load_nodes, n, device)
    both = loads[torch.isin(loads, kin)]
    if both.numel():
        raise ValueError(f"build_model: load node {int(both[0])} is also kinematic; a kinematic node follows its "
                         f"pose and would ignore the force ({both.numel()} such node(s))")
    if anchors is None:
        anch = mesh.vertices[kin].clone()
    else:
        anch = torch.as_tensor(anchors, device=device).to(dtype).detach()
        if tuple(anch.shape) != (kin.numel(), 3):
            raise ValueError(f"build_model: expected 'anchors' of shape ({kin.numel()}, 3) (one per kinematic node, "
                             f"in sorted id order), got {tuple(anch.shape)}")
        ids = torch.as_tensor(kinematic) if kinematic is not None else torch.zeros(0, dtype=torch.int64)
        if ids.dtype != torch.bool and not torch.equal(ids.to(torch.int64).cpu(), kin.cpu()):
            raise ValueError("build_model: with 'anchors', give 'kinematic' as sorted ids or a mask (anchor k "
                             "belongs to the k-th kinematic node in id order)")
    if pivot is None:
        piv = anch.mean(0) if kin.numel() else torch.zeros(3, dtype=dtype, device=device)
    else:
        piv = torch.as_tensor(pivot, device=device).to(dtype).detach()
        if tuple(piv.shape) != (3,):
            raise ValueError(f"build_model: expected 'pivot' 3 numbers [m], got {pivot!r}")
    return Model(mesh=mesh, law=_law_codes(law, nt, device), E=E_t, nu=nu_t, density=rho, damping=damp, gravity=g,
                 kinematic=kin, anchors=anch.contiguous(), pivot=piv, load_nodes=loads)


# ------------------------------------------------------------------------------------------------
# Control
# ------------------------------------------------------------------------------------------------

def rotation_matrix(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (S, 3, 3) from rotation vectors (S, 3) [rad] (axis times angle) or
    quaternions (S, 4) (x, y, z, w; normalized here). Differentiable, also at the zero rotation.

    Raises:
        ValueError: A last dimension other than 3 or 4, or a zero quaternion.
    """
    if rotation.dim() != 2 or rotation.shape[1] not in (3, 4):
        raise ValueError(f"Control: expected 'rotation' of shape (S, 3) (axis-angle) or (S, 4) (quaternion x, y, z, "
                         f"w), got {tuple(rotation.shape)}")
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device).expand(rotation.shape[0], 3, 3)
    if rotation.shape[1] == 4:
        norm = rotation.norm(dim=1, keepdim=True)
        if bool((norm.detach() == 0).any()):
            raise ValueError("Control: a quaternion 'rotation' row is zero")
        x, y, z, w = (rotation / norm).unbind(1)
        return torch.stack([
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)
    # Rodrigues: R = I + a K + b K^2, a = sin t / t, b = (1 - cos t) / t^2; Taylor series near 0
    # keep the values and gradients exact where the closed forms divide by zero
    t2 = (rotation * rotation).sum(1)
    small = t2 < (1e-8 if rotation.dtype == torch.float64 else 1e-4)
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t)) / (t * t))
    rx, ry, rz = rotation.unbind(1)
    zero = torch.zeros_like(rx)
    K = torch.stack([zero, -rz, ry, rz, zero, -rx, -ry, rx, zero], 1).reshape(-1, 3, 3)
    return eye + a[:, None, None] * K + b[:, None, None] * (K @ K)


class Control(NamedTuple):
    """Per-step commands: the pose of the kinematic node set and external nodal forces.

    Step ``s`` moves the kinematic nodes to ``pivot + R_s (anchor - pivot) + t_s`` (the pose at the
    end of the step) with velocity (that position - their position before) / dt. All fields are
    differentiable; None means identity / zero. At least one field gives the number of steps S.

    Attributes:
        translation: t [m], (S, 3).
        rotation: (S, 3) rotation vectors [rad] (axis x angle) or (S, 4) quaternions (x, y, z, w).
        forces: External forces on the model's load nodes [N], (S, M, 3), held over the step.
    """

    translation: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    forces: torch.Tensor | None = None

    @property
    def n_steps(self) -> int | None:
        """S, from the first field that is given (None if none is)."""
        for t in self:
            if t is not None:
                return int(t.shape[0])
        return None

    def rows(self, model: Model, n_steps: int) -> torch.Tensor:
        """The packed control the kernels read, (S, 12 + 3 M): R row-major, t, forces.

        Raises:
            ValueError: Inconsistent step counts or shapes (the message names the field).
        """
        dtype, device = model.dtype, model.device
        m = int(model.load_nodes.numel())
        if self.forces is not None and m == 0:
            raise ValueError("Control: 'forces' given but the model has no load nodes (build_model(load_nodes=...))")
        for name, t, shape, axes in (("translation", self.translation, (n_steps, 3), "steps, xyz"),
                                     ("forces", self.forces, (n_steps, m, 3), "steps, load nodes, xyz")):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"Control: expected '{name}' of shape {shape} ({axes}), got {tuple(t.shape)}")
        if self.rotation is not None and (self.rotation.dim() != 2 or self.rotation.shape[0] != n_steps):
            raise ValueError(f"Control: expected 'rotation' of shape ({n_steps}, 3) or ({n_steps}, 4), got "
                             f"{tuple(self.rotation.shape)}")
        for name, t in zip(self._fields, self):
            if t is not None and not bool(torch.isfinite(t.detach()).all()):
                bad = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1).nonzero()[0, 0]
                raise ValueError(f"Control: '{name}' has a non-finite value (NaN or Inf) at step {int(bad)}")
        R = (rotation_matrix(self.rotation.to(device=device, dtype=dtype)) if self.rotation is not None else
             torch.eye(3, dtype=dtype, device=device).expand(n_steps, 3, 3))
        t = (self.translation.to(device=device, dtype=dtype) if self.translation is not None else
             torch.zeros((n_steps, 3), dtype=dtype, device=device))
        f = (self.forces.to(device=device, dtype=dtype).reshape(n_steps, 3 * m) if self.forces is not None else
             torch.zeros((n_steps, 3 * m), dtype=dtype, device=device))
        return torch.cat([R.reshape(n_steps, 9), t, f], 1).contiguous()

    def upsample(self, substeps: int, start: "Control | None" = None) -> "Control":
        """The control of ``substeps`` steps per row: for a control rate slower than the stable dt.

        Translations and rotation vectors are interpolated linearly from the previous row's pose
        (for the first row: ``start``'s last row, default the identity pose) to each row's, so the
        kinematic nodes move smoothly and reach every commanded pose at the end of its control
        step; quaternions are interpolated by normalized lerp. Forces are held over the substeps.
        Differentiable.

        Args:
            substeps: Steps per row (>= 1).
            start: The pose before the first row.
        """
        if substeps < 1:
            raise ValueError(f"Control.upsample: expected substeps >= 1, got {substeps}")

        def interp(cur: torch.Tensor | None, first: torch.Tensor | None, identity: torch.Tensor):
            if cur is None:
                return None
            head = (first[-1:] if first is not None else identity.to(cur).expand(1, -1))
            prev = torch.cat([head, cur[:-1]], 0)
            if cur.shape[1] == 4:  # quaternions: take the shorter arc
                prev = torch.where(((prev * cur).sum(1, keepdim=True) < 0), -prev, prev)
            w = torch.arange(1, substeps + 1, dtype=cur.dtype, device=cur.device) / substeps
            out = prev[:, None] + (cur - prev)[:, None] * w[None, :, None]
            return out.reshape(-1, cur.shape[1])

        s = start if start is not None else Control()
        rot_id = torch.tensor([0.0, 0.0, 0.0, 1.0] if self.rotation is not None and self.rotation.shape[1] == 4
                              else [0.0, 0.0, 0.0])
        forces = None if self.forces is None else self.forces.repeat_interleave(substeps, 0)
        return Control(interp(self.translation, s.translation, torch.zeros(3)),
                       interp(self.rotation, s.rotation, rot_id), forces)
