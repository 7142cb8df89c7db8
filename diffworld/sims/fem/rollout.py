"""Differentiable FEM rollouts: the engine's checkpointed rollout (:mod:`diffworld.engine.rollout`)
over the explicit step, with the stability check and NaN/Inf checks.

Gradients reach the initial state (x, v), the control (pose sequence and external forces, through
the torch functions that pack it), the per-tet ``E``, ``nu`` and ``density`` (through the lumped
masses, computed by torch), ``damping`` and ``gravity``. A window's forward keeps only its input
state; its backward recomputes the window (3 (N, 3) arrays per step) and runs the hand-written
step adjoints in reverse. The numbers do not depend on the window: the state (x, v) is all a step
reads.

A :class:`Contact` (a rigid object, static or posed per step, pressing the gel) adds the penalty
forces of :func:`~diffworld.sims.fem.contact.contact_forces` to the elastic forces of every
explicit step (the implicit step takes them at the end of the step, with damping and friction
semi-implicit: :mod:`diffworld.sims.fem.implicit`); its pose and velocity per step travel as extra columns of the control rows and its
parameters after the step parameters, so their gradients come back through the same windows.
Against the analytic objects (sphere, box, half-space, waves) the explicit step's contact forces
and their adjoint are one Warp kernel each (:class:`ContactStep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from diffworld.engine.bridge import launch, to_warp
from diffworld.engine.rollout import checkpointed_rollout
from diffworld.engine.runtime import init_warp
from diffworld.geometry.sdf import Box, HalfSpace, Sphere, Waves
from diffworld.sims.common.quaternion import quat_to_matrix
from diffworld.sims.fem.contact import ContactParams, RigidObject, contact_forces
from diffworld.sims.fem.implicit import ImplicitStepper
from diffworld.sims.fem.kernels_contact import KERNELS as CONTACT_KERNELS
from diffworld.sims.fem.kernels_contact import SDF_BOX, SDF_HALFSPACE, SDF_SPHERE, SDF_WAVES
from diffworld.sims.fem.materials import check_parameters
from diffworld.sims.fem.model import Control, Model, State
from diffworld.sims.fem.solver import Stepper, check_dt

__all__ = ["Contact", "ContactStep", "PARAMS", "check_contact_dt", "Rollout", "SimulationError", "check_state", "rollout", "step"]

# Parameters a rollout takes by name (``params=``); the step's ``mass`` comes from ``density``.
PARAMS = ("E", "nu", "density", "damping", "gravity")


class SimulationError(RuntimeError):
    """A rollout produced an unusable state (NaN/Inf), or an implicit step's Newton solve failed."""


class Rollout(NamedTuple):
    """Result of :func:`rollout`.

    Attributes:
        states: Recorded states: index 0 is the initial state, then one every ``record_every``
            steps (and the final state).
        steps: Step index of each recorded state.
    """

    states: list[State]
    steps: list[int]

    @property
    def final(self) -> State:
        return self.states[-1]

    def positions(self) -> torch.Tensor:
        """Recorded positions [m], shape (R, N, 3)."""
        return torch.stack([s.x for s in self.states])


# Contact parameters that travel as differentiable rollout parameters (after solver.STEP_PARAMS).
CONTACT_PARAMS = ("k_n", "k_d", "k_t", "mu", "eps_v")
# Object columns appended to each control row: position (3), rotation matrix row-major (9),
# linear velocity (3), angular velocity (3).
_OBJ_WIDTH = 18
# SDF types with a Warp contact kernel (diffworld.sims.fem.kernels_contact).
_WARP_SDFS = {Sphere: SDF_SPHERE, Box: SDF_BOX, HalfSpace: SDF_HALFSPACE, Waves: SDF_WAVES}


@dataclass
class Contact:
    """A rigid object pressing the gel during a rollout (penalty contact, :mod:`diffworld.sims.fem.contact`).

    Attributes:
        obj: The object. Its ``position`` (3,) or (S, 3) [m], ``rotation`` (4,), (3, 3), (S, 4) or
            (S, 3, 3), ``linear_velocity`` and ``angular_velocity`` (3,) or (S, 3) (None: zero) are
            static or given per step (step s uses row s: the pose at the start of the step). All
            may require gradients (per step, through the rollout's backward). The SDF's own
            parameters are held fixed inside the rollout (no gradient).
        nodes: (C,) int64 gel nodes that can touch the object (e.g. the contact-face nodes).
        params: Contact parameters; ``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v`` may require
            gradients.
    """

    obj: RigidObject
    nodes: torch.Tensor
    params: ContactParams


class ContactStep:
    """The contact term of one rollout's steps: node forces from the object columns of a control
    row (after ``offset``) and the contact parameters, and their adjoint.

    For a ``Sphere``, ``Box``, ``HalfSpace`` or ``Waves`` object both are one Warp launch
    (:mod:`diffworld.sims.fem.kernels_contact`: the same law, equal to the torch op to round-off;
    its adjoint is Warp's automatic one); for any other SDF the torch op
    :func:`~diffworld.sims.fem.contact.contact_forces` and torch autograd."""

    def __init__(self, contact: Contact, offset: int) -> None:
        self.sdf = contact.obj.sdf
        self.nodes = contact.nodes
        self.params = contact.params
        self.offset = offset
        # Analytic SDFs run on one Warp kernel (forward and its automatic adjoint); any other SDF
        # (MeshSDF, CSG, a user callable) on the torch op. Exact types only: a subclass may
        # override the formula.
        self._kind = _WARP_SDFS.get(type(self.sdf))
        self._warp: dict = {}

    def _object(self, row: torch.Tensor) -> RigidObject:
        o = row[self.offset:]
        return RigidObject(self.sdf, o[0:3], o[3:12].reshape(3, 3), o[12:15], o[15:18])

    def _params(self, cp) -> ContactParams:
        k_n, k_d, k_t, mu, eps_v = cp
        p = self.params
        return ContactParams(k_n, k_d, k_t, mu, eps_v, p.penetration_width, p.damping_width, p.friction_exponent)

    def _sdf_params(self, dtype, device) -> torch.Tensor:
        """The SDF's parameters as the kernel reads them (6,), detached (held fixed in the rollout)."""
        key = (dtype, str(device))
        hit = self._warp.get(key)
        if hit is not None:
            return hit
        sdf = self.sdf
        parts = {SDF_SPHERE: ("radius", "center"), SDF_BOX: ("half_extents", "center"),
                 SDF_HALFSPACE: ("normal", "offset"), SDF_WAVES: ("amplitude", "wavelength", "offset")}[self._kind]
        flat = torch.cat([getattr(sdf, name).detach().reshape(-1).to(dtype=dtype, device=device) for name in parts])
        out = torch.zeros(6, dtype=dtype, device=device)
        out[:flat.numel()] = flat
        self._warp[key] = out
        return out

    def _launch_inputs(self, x, v, row, cp):
        """Contiguous kernel inputs; the parameters expanded to (C,)."""
        c = self.nodes.shape[0]
        nodes = self._warp.get(("nodes", str(x.device)))
        if nodes is None:
            nodes = self._warp[("nodes", str(x.device))] = self.nodes.to(device=x.device, dtype=torch.int32)
        obj = row[self.offset:self.offset + _OBJ_WIDTH].detach().contiguous()
        params = [t.detach().to(x.dtype).expand(c).contiguous() for t in cp]
        p = self.params
        scal = (p.penetration_width, p.damping_width, -1.0 if p.friction_exponent is None else p.friction_exponent)
        return nodes, obj, params, scal

    def _kernel_args(self, x, v, nodes, obj, params, scal, f):
        wp = init_warp()
        f64 = x.dtype == torch.float64
        vec, s = (wp.vec3d, wp.float64) if f64 else (wp.vec3f, wp.float32)
        # every tensor here must be contiguous and outlive the launch (the views do not own it)
        return [to_warp(x, dtype=vec), to_warp(v, dtype=vec), to_warp(nodes), to_warp(obj),
                *(to_warp(t) for t in params), int(self._kind), to_warp(self._sdf_params(x.dtype, x.device)),
                *(s(w) for w in scal), to_warp(f, dtype=vec)]

    def node_forces(self, x, v, row, cp) -> torch.Tensor:
        if self._kind is None or self.nodes.numel() == 0:
            return contact_forces(x, v, self.nodes, self._object(row), self._params(cp)).node_forces
        x, v = x.contiguous(), v.contiguous()  # the Warp views below do not own their memory
        nodes, obj, params, scal = self._launch_inputs(x, v, row, cp)
        f = torch.zeros_like(x)
        launch(CONTACT_KERNELS[_precision(x)], self.nodes.shape[0], self._kernel_args(x, v, nodes, obj, params, scal, f),
               x.device)
        return f

    def adjoint(self, x, v, row, cp, adj_f, adj_row, adj_cp):
        """Add the contact forces' vector-Jacobian product with ``adj_f`` into ``adj_row`` (object
        columns) and ``adj_cp``; return its parts for x and v."""
        if self._kind is not None and self.nodes.numel():
            return self._adjoint_warp(x, v, row, cp, adj_f, adj_row, adj_cp)
        with torch.enable_grad():
            xg, vg = x.detach().requires_grad_(True), v.detach().requires_grad_(True)
            og = row[self.offset:].detach().requires_grad_(True)
            cg = [t.detach().requires_grad_(True) for t in cp]
            full = torch.cat([row[:self.offset].detach(), og])
            f = contact_forces(xg, vg, self.nodes, self._object(full), self._params(cg)).node_forces
            grads = torch.autograd.grad(f, [xg, vg, og, *cg], adj_f, allow_unused=True)
        gx, gv, go, *gc = grads
        if go is not None:
            adj_row[self.offset:] += go
        for a, g in zip(adj_cp, gc):
            if g is not None:
                a += g
        return (torch.zeros_like(x) if gx is None else gx), (torch.zeros_like(v) if gv is None else gv)

    def _adjoint_warp(self, x, v, row, cp, adj_f, adj_row, adj_cp):
        """The Warp kernel's automatic adjoint (it replays the kernel; nothing is saved)."""
        nodes, obj, params, scal = self._launch_inputs(x, v, row, cp)
        x, v = x.contiguous(), v.contiguous()
        f = torch.zeros_like(x)
        gx, gv, gobj = torch.zeros_like(x), torch.zeros_like(v), torch.zeros_like(obj)
        gparams = [torch.zeros_like(t) for t in params]
        inputs = self._kernel_args(x, v, nodes, obj, params, scal, f)
        adj_f = adj_f.contiguous()
        adj = self._kernel_args(gx, gv, nodes, gobj, gparams, scal, adj_f)
        # the SDF parameters are held fixed: their adjoint goes to a scratch array
        scratch = torch.zeros(6, dtype=x.dtype, device=x.device)
        adj[10] = to_warp(scratch)
        launch(CONTACT_KERNELS[_precision(x)], self.nodes.shape[0], inputs[:-1], x.device, outputs=inputs[-1:],
               adjoint=True, adj_inputs=adj[:-1], adj_outputs=adj[-1:])
        adj_row[self.offset:self.offset + _OBJ_WIDTH] += gobj
        for a, g in zip(adj_cp, gparams):
            a += g if a.dim() else g.sum()
        return gx, gv


def _precision(x: torch.Tensor) -> str:
    return "float64" if x.dtype == torch.float64 else "float32"


def _check_start_outside(contact: Contact, obj: RigidObject, x: torch.Tensor) -> None:
    """Refuse an object that starts inside the gel: its penalty would fire at once with a force of
    k_n times the depth (a launch, not a touch). A touch (depth 0) is fine."""
    from diffworld.sims.fem.contact import _signed_distance

    if contact.nodes.numel() == 0:
        return
    with torch.no_grad():
        xc = x.detach()[contact.nodes]
        pos, rot = obj.position.to(xc), obj.rotation_matrix().to(xc)
        phi, _ = _signed_distance(obj, xc, pos, rot)
        k = int(torch.argmin(phi))
        depth = -float(phi[k])
        extent = float((xc.max(0).values - xc.min(0).values).max())
    if depth > 1e-6 * max(extent, 1e-3):
        raise ValueError(f"rollout: the contact object starts {depth * 1e3:.3g} mm inside the gel (contact node "
                         f"{int(contact.nodes[k])}, signed distance {-depth:.3g} m); place it so that it at most "
                         f"touches the gel at step 0")


def _contact_inputs(contact: Contact, model: Model, n_steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The object's per-step columns (S, 18) and the contact parameter tensors, checked."""
    if not isinstance(contact, Contact):
        raise TypeError(f"rollout: expected 'contact' a fem.Contact, got {type(contact).__name__}")
    obj = contact.obj
    if not isinstance(obj, RigidObject):
        raise TypeError(f"rollout: expected contact.obj a RigidObject, got {type(obj).__name__}")
    if not isinstance(contact.params, ContactParams):
        raise TypeError(f"rollout: expected contact.params a ContactParams, got {type(contact.params).__name__}")
    nodes = contact.nodes
    if not isinstance(nodes, torch.Tensor) or nodes.dtype != torch.int64 or nodes.dim() != 1:
        raise TypeError("rollout: expected contact.nodes a 1-D int64 tensor of node indices")
    if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= model.n_nodes):
        raise ValueError(f"rollout: contact.nodes must be in [0, {model.n_nodes})")
    f = dict(dtype=model.dtype, device=model.device)

    def per_step(name, t, shape):
        if t is None:
            t = torch.zeros(shape, **f)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rollout: expected contact.obj.{name} a tensor, got {type(t).__name__}")
        t = t.to(**f)
        if tuple(t.shape) == shape:
            return t.expand(n_steps, *shape)
        if tuple(t.shape) == (n_steps, *shape):
            return t
        raise ValueError(f"rollout: expected contact.obj.{name} of shape {shape} or {(n_steps, *shape)}, "
                         f"got {tuple(t.shape)}")

    rot = obj.rotation
    if not isinstance(rot, torch.Tensor):
        raise TypeError("rollout: expected contact.obj.rotation a tensor")
    rot = rot.to(**f)
    if rot.shape[-1:] == (4,):
        rot = quat_to_matrix(per_step("rotation", rot, (4,)))
    else:
        rot = per_step("rotation", rot, (3, 3))
    cols = torch.cat([per_step("position", obj.position, (3,)), rot.reshape(n_steps, 9),
                      per_step("linear_velocity", obj.linear_velocity, (3,)),
                      per_step("angular_velocity", obj.angular_velocity, (3,))], 1)
    if not bool(torch.isfinite(cols.detach()).all()):
        raise ValueError("rollout: contact.obj has non-finite pose or velocity values")
    cps = []
    for name in CONTACT_PARAMS:
        t = getattr(contact.params, name)
        t = torch.as_tensor(t).to(**f) if not isinstance(t, torch.Tensor) else t.to(**f)
        if t.dim() == 1 and t.shape[0] == 1:
            t = t.reshape(())
        cps.append(t.contiguous())
    # the op checks shapes and signs (messages name the parameter); run it once on the rest state
    with torch.no_grad():
        x0 = model.rest_state().x.to(**f)
        step = ContactStep(contact, 0)
        contact_forces(x0, torch.zeros_like(x0), nodes, step._object(cols[0]), step._params(cps))
    return cols, cps


def check_contact_dt(mass: torch.Tensor, nodes: torch.Tensor, k_n: torch.Tensor, k_t: torch.Tensor, dt: float) -> None:
    """Refuse an explicit ``dt`` that cannot resolve the penalty contact on its lightest node.

    A contact node of mass ``m`` on a penalty spring ``k_n`` oscillates at ``sqrt(k_n / m)``:
    symplectic Euler needs ``dt < 2 sqrt(m / k_n)``. The friction is not checked here: its
    viscous slope ``k_t`` applies only below the Coulomb cap, where a too-large step overshoots
    into the capped regime and stays bounded (the tests' sliding gradients match finite
    differences at ``k_t dt / m`` far above 2); when sticking matters, keep ``k_t dt / m < 2``
    (the ``tactile`` task enforces it). ``k_d`` (proportional to the penetration) is not checked.

    Raises:
        ValueError: ``dt`` above either limit, naming it and the node.
    """
    with torch.no_grad():
        m = mass.detach()[nodes].to(torch.float64)
        for name, k, limit in (("k_n", k_n, lambda m, k: 2 * torch.sqrt(m / k)),):
            k = k.detach().to(torch.float64).expand_as(m)
            pos = k > 0
            if not bool(pos.any()):
                continue
            lim = torch.where(pos, limit(m, k.clamp_min(1e-300)), torch.full_like(m, math.inf))
            i = int(torch.argmin(lim))
            if float(dt) >= float(lim[i]):
                what = "penalty stiffness" if name == "k_n" else "friction coefficient"
                raise ValueError(f"rollout: dt {float(dt):.3g} s is above the contact {what} limit {float(lim[i]):.3g} s "
                                 f"({name} {float(k[i]):.3g} on contact node {int(nodes[i])} of mass "
                                 f"{float(m[i]):.3g} kg); use a smaller dt or {name}, or integrator='implicit'")


class _Steps:
    """The FEM :class:`Stepper` as an :class:`~diffworld.engine.rollout.Simulator`: state (x, v)."""

    def __init__(self, stepper: Stepper, contact: ContactStep | None = None) -> None:
        self.stepper = stepper
        self.contact = contact

    def step(self, state, params, control, index: int, keep: bool):
        if isinstance(self.stepper, ImplicitStepper):  # its errors name the step
            x1, v1, saved = self.stepper.step(state[0], state[1], params, control, keep, index=index,
                                              contact=self.contact)
        elif self.contact is not None:
            x1, v1, saved = self.stepper.step(state[0], state[1], params, control, keep, contact=self.contact)
        else:
            x1, v1, saved = self.stepper.step(state[0], state[1], params, control, keep)
        return (x1, v1), saved

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        if self.contact is not None:
            return self.stepper.step_adjoint(saved, params, adj_out[0], adj_out[1], adj_params, adj_control,
                                             contact=self.contact)
        return self.stepper.step_adjoint(saved, params, adj_out[0], adj_out[1], adj_params, adj_control)


def check_state(state: State, step: int, dt: float) -> None:
    """Raise :class:`SimulationError` if ``state`` (after ``step`` steps of ``dt`` [s]) holds NaN/Inf."""
    with torch.no_grad():
        for name, t in zip(State._fields, state):
            lo, hi = torch.aminmax(t)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                node = int((~torch.isfinite(t)).any(1).nonzero()[0])
                raise SimulationError(f"non-finite {name} of node {node} after step {step} (t = {step * dt:.4g} s); "
                                      f"check the material parameters, loads and dt")


def _check_initial(model: Model, state: State) -> State:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"rollout: expected 'state' a State (x, v), got {type(state).__name__}")
    n = model.n_nodes
    for name, t in zip(("x", "v"), state):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, 3):
            raise ValueError(f"rollout: expected state.{name} of shape ({n}, 3), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"rollout: state.{name} has non-finite values (NaN or Inf)")
    return State(*(t.to(model.dtype) for t in state))


def _merged_params(model: Model, params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model's parameters with the overrides, checked (messages name ``params[...]``)."""
    merged = {name: getattr(model, name) for name in PARAMS}
    for name, t in (params or {}).items():
        if name not in PARAMS:
            raise ValueError(f"rollout: unknown parameter {name!r}; expected one of {list(PARAMS)}")
        want = {"gravity": (3,), "damping": ()}.get(name, (model.n_tets,))
        t = torch.as_tensor(t, device=model.device).to(model.dtype)
        if name in ("E", "nu", "density") and t.dim() == 0:
            t = t.expand(model.n_tets)
        if tuple(t.shape) != want:
            raise ValueError(f"rollout: expected params[{name!r}] of shape {want}, got {tuple(t.shape)}")
        merged[name] = t
    try:
        check_parameters(merged["E"], merged["nu"])
    except ValueError as err:
        raise ValueError(f"rollout: params: {err}") from None
    for name, ok, want in (("density", lambda v: v > 0, "finite and > 0 [kg/m^3]"),
                           ("damping", lambda v: v >= 0, "finite and >= 0 [1/s]"),
                           ("gravity", torch.isfinite, "finite [m/s^2]")):
        v = merged[name].detach().reshape(-1)
        bad = (~(torch.isfinite(v) & ok(v))).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"rollout: params[{name!r}] must be {want}, got {v[i].item()!r} (entry {i})")
    return merged


def rollout(model: Model, state: State, dt: float, n_steps: int | None = None, control: Control | None = None, *,
            window: int = 32, record_every: int | None = None, params: dict[str, torch.Tensor] | None = None,
            check: bool = True, stability_check: bool = True, stepper: Stepper | None = None,
            keep_last_window: bool = True, integrator: str = "explicit",
            implicit_options: dict | None = None, contact: Contact | None = None,
            check_start: bool = False) -> Rollout:
    """Simulate FEM steps (explicit symplectic Euler or implicit backward Euler), differentiably.

    Args:
        model: The model.
        state: Initial state (its tensors may require gradients).
        dt: Step [s], at most the stability limit (:func:`~diffworld.sims.fem.solver.stable_dt`).
        n_steps: Number of steps; default the control's length (both given: they must agree).
        control: Per-step pose of the kinematic nodes and external forces (None: kinematic
            nodes held at their anchors, no external forces). Differentiable.
        window: Steps per checkpoint window: the forward keeps one state per window, the
            backward one window's intermediates (3 (N, 3) arrays per step). The numbers do not
            depend on it.
        record_every: Record the state every this many steps (default: only the final state).
            Recorded states are differentiable outputs; recording does not end a window.
        params: Overrides of the model's parameters by name (:data:`PARAMS`), e.g. tensors that
            require gradients: ``E``, ``nu``, ``density`` (T,) or scalars, ``damping`` (),
            ``gravity`` (3,).
        check: Stop with :class:`SimulationError` on NaN/Inf in a recorded state.
        check_start: Refuse (ValueError, by how much) a contact object that starts inside the
            gel. Off by default: a rollout continued from a state in contact starts inside on
            purpose.
        stability_check: Refuse ``dt`` above the stability limit (turn off only to study
            instability).
        stepper: A :class:`~diffworld.sims.fem.solver.Stepper` of this model and ``dt`` to reuse.
        keep_last_window: Keep the last window's intermediates from the forward instead of
            recomputing them in backward (same numbers).
        integrator: ``"explicit"`` (symplectic Euler, dt limited) or ``"implicit"`` (backward
            Euler by Newton/CG, :mod:`diffworld.sims.fem.implicit`: no stability limit, adjoint one
            linear solve per step; ``stability_check`` does not apply).
        implicit_options: Keyword arguments of
            :class:`~diffworld.sims.fem.implicit.ImplicitStepper` (tolerances, iteration caps).
        contact: A rigid object pressing the gel (:class:`Contact`): its penalty forces join the
            elastic forces at every step, and gradients reach its per-step pose and velocity and
            the contact parameters. Explicit: row s of the object is its pose at the start of
            step s, and ``dt`` must also resolve the penalty stiffness on the lightest contact node
            (:func:`check_contact_dt`, with ``stability_check``). Implicit: row s is the object during step s (the normal penalty at
            the end of the step against it; damping and friction lag the normal, penetration and
            normal force at the step's start against row s - 1, see
            :mod:`diffworld.sims.fem.implicit`).

    Returns:
        A :class:`Rollout`.

    Raises:
        ValueError: ``dt`` above the stability limit (the message gives the limit and the
            substeps needed), inconsistent step counts, shapes or parameters.
        SimulationError: NaN/Inf.
    """
    state = _check_initial(model, state)
    n_ctrl = control.n_steps if control is not None else None
    if n_steps is None:
        if n_ctrl is None:
            raise ValueError("rollout: give 'n_steps' or a control with at least one field")
        n_steps = n_ctrl
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"rollout: expected n_steps an integer >= 0, got {n_steps!r}")
    if n_ctrl is not None and n_ctrl != n_steps:
        raise ValueError(f"rollout: n_steps {n_steps} but the control has {n_ctrl} steps")
    if window < 1:
        raise ValueError(f"rollout: expected window >= 1, got {window}")
    if integrator not in ("explicit", "implicit"):
        raise ValueError(f"rollout: expected integrator 'explicit' or 'implicit', got {integrator!r}")
    implicit = integrator == "implicit"
    p = _merged_params(model, params)
    if stability_check and not implicit:
        check_dt(model, dt, p)
    elif implicit and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0 or dt == float("inf")):
        raise ValueError(f"dt: expected a finite number > 0 [s], got {dt!r}")
    rows = (control or Control()).rows(model, n_steps)
    if stepper is None:
        stepper = ImplicitStepper(model, dt, **(implicit_options or {})) if implicit else Stepper(model, dt)
    elif stepper.model is not model or stepper.dt_value != float(dt):
        raise ValueError("rollout: 'stepper' was built for another model or dt")
    elif isinstance(stepper, ImplicitStepper) != implicit:
        raise ValueError(f"rollout: 'stepper' is not a {integrator} stepper")
    mass = model.masses(p["density"])
    # in solver.STEP_PARAMS order
    plist = [t.contiguous() for t in (p["E"], p["nu"], mass, p["damping"].reshape(1), p["gravity"])]
    contact_step = None
    if contact is not None:
        cols, cps = _contact_inputs(contact, model, n_steps)
        if stability_check and not implicit:
            check_contact_dt(mass, contact.nodes, cps[0], cps[2], dt)
        contact_step = ContactStep(contact, rows.shape[1])
        if check_start and n_steps > 0:
            _check_start_outside(contact, contact_step._object(torch.cat([rows[0], cols[0]])), state.x)
        if implicit:  # its damping and friction lag the previous step's object (row 0 for the first)
            cols = torch.cat([cols, torch.cat([cols[:1], cols[:-1]], 0)], 1)
        rows = torch.cat([rows, cols], 1).contiguous()
        plist += cps

    def check_recorded(st, k: int) -> None:
        check_state(State(*st), k, dt)

    traj = checkpointed_rollout(_Steps(stepper, contact_step), tuple(state), n_steps, rows, plist, window=window,
                                record_every=record_every, keep_last_window=keep_last_window,
                                check=check_recorded if check else None)
    return Rollout([state] + [State(*st) for st in traj.states[1:]], traj.steps)


def step(model: Model, state: State, dt: float, control: Control | None = None, *,
         params: dict[str, torch.Tensor] | None = None) -> State:
    """One explicit step (a rollout of one step; differentiable). ``control`` of one row or None."""
    return rollout(model, state, dt, 1, control, window=1, params=params).final
