"""Building a ``tactile`` scene: the sensor's FEM model in the world, the rigid object, the contact,
the sensor's motion, the simulation and its tactile readings per control step."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffworld.sims import fem
from diffworld.sims.common import colliders
from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_multiply, quat_to_matrix, quat_to_rotvec
from diffworld.sims.tactile import Markers, SensorGeometry, dome, flat_pad
from diffworld.tasks.tactile.config import DOFS, DomeConfig, ObjectConfig, PadConfig, TactileTask

__all__ = ["Readings", "TactileScene", "build_scene", "contact_areas", "sensor_geometry"]

# Safety factor on the contact stiffness limit sqrt(m_i / k_i) of the explicit integrator.
_CONTACT_CFL = 0.5


def sensor_geometry(cfg: DomeConfig | PadConfig, refine: int = 1) -> SensorGeometry:
    """The sensor's gel in its own frame; ``refine`` > 1 gives a finer mesh of the same gel
    (``refine^2`` times the dome's points and one more layer per factor, or ``refine`` times the
    pad's cells along each axis)."""
    if cfg.type == "dome":
        return dome(cfg.inner_radius, cfg.thickness, cfg.layers + (refine - 1), cfg.n_points * refine * refine)
    return flat_pad(tuple(cfg.size), cfg.thickness, tuple(r * refine for r in cfg.resolution))


def contact_areas(vertices: torch.Tensor, faces: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Lumped surface area [m^2] of each of ``nodes`` (C,): a third of each incident face's area."""
    p = vertices[faces]
    area = 0.5 * torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]).norm(dim=1)
    lumped = torch.zeros(vertices.shape[0], dtype=vertices.dtype).index_add_(0, faces.reshape(-1),
                                                                          (area / 3).repeat_interleave(3))
    return lumped[nodes]


def _object_sdf(cfg: ObjectConfig):
    from diffworld.geometry import sdf

    if cfg.shape == "sphere":
        return sdf.Sphere(cfg.radius)
    if cfg.shape == "box":
        return sdf.Box(cfg.half_extents)
    if cfg.shape == "plane":
        return sdf.HalfSpace((0.0, 0.0, 1.0), 0.0)
    if cfg.shape == "waves":
        return sdf.Waves(cfg.amplitude, cfg.wavelength)
    from diffworld.geometry.io import load_mesh
    from diffworld.geometry.mesh_sdf import MeshSDF

    m = load_mesh(cfg.path)
    return MeshSDF(m.vertices.double(), m.faces, sign="winding")


def frame_motion(motion, n: int, dt: float, dtype: torch.dtype, opening0: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The motion frame's poses at times ``0, dt, ..., (n - 1) dt`` of a ``keyframes`` or ``joints``
    motion: positions (n, 3) [m], quaternions (n, 4) and gripper openings (n,) [m] (keyframes
    without an opening hold the previous one; ``opening0`` before the first)."""
    import numpy as np

    if motion.type == "joints":
        from diffworld.sims.common.kinematics import KinematicChain, mount_pose

        chain = KinematicChain.from_urdf(motion.urdf)
        keys = motion.joint_keyframes
        q = chain.keyframes([k.t for k in keys], torch.tensor([k.q for k in keys], dtype=torch.float64), n, dt)
        base_q = axis_angle_to_quat(torch.tensor(motion.rotation, dtype=torch.float64))
        link = chain.link_pose(q, motion.link, torch.tensor(motion.position, dtype=torch.float64), base_q)
        pose = mount_pose(link, torch.tensor(motion.mount_position, dtype=torch.float64),
                          axis_angle_to_quat(torch.tensor(motion.mount_rotation, dtype=torch.float64)))
        p, quat = pose.position.to(dtype), pose.quaternion.to(dtype)
    else:
        keys = motion.keyframes
        states = colliders.from_keyframes([k.t for k in keys], torch.tensor([k.position for k in keys], dtype=dtype),
                                          torch.tensor([k.rotation for k in keys], dtype=dtype), n, dt)
        p, quat = states[:, :3], states[:, 3:7]
    values, last = [], opening0
    for k in keys:
        last = k.opening if k.opening is not None else last
        values.append(last)
    t = np.arange(n) * dt
    opening = torch.from_numpy(np.interp(t, [k.t for k in keys], values)).to(dtype)
    return p, quat, opening


def start_pose(motion) -> tuple[torch.Tensor, torch.Tensor]:
    """The motion frame's start (position (3,), rotation vector (3,)) float64."""
    f64 = torch.float64
    if motion.type != "joints":
        return torch.tensor(motion.position, dtype=f64), torch.tensor(motion.rotation, dtype=f64)
    p, q, _ = frame_motion(motion, 1, 1.0, f64)
    return p[0], quat_to_rotvec(q[0])


def build_scene(task: TactileTask, dtype: torch.dtype, device: torch.device, refine: int = 1,
                check_only: bool = False):
    """The scene of a task: :class:`TactileScene` (a rigid object) or
    :class:`~diffworld.tasks.tactile.build_mpm.CoupledTactileScene` (MPM objects).
    ``check_only``: build only what validation needs."""
    if task.cable is not None:
        from diffworld.tasks.tactile.build_cable import CableTactileScene

        return CableTactileScene(task, dtype, device)
    if task.mpm is None:
        return TactileScene(task, dtype, device, refine)
    from diffworld.tasks.tactile.build_mpm import CoupledTactileScene

    return CoupledTactileScene(task, dtype, device)


class Readings(NamedTuple):
    """Tactile readings at the end of every control step (index 0: the start), per sensor (G: 1,
    or 2 for a gripper's pads).

    Attributes:
        force: Total contact force on each gel in its sensor frame [N], (S + 1, G, 3).
        normal: Pressing force ``-force_z`` [N] (>= 0 when pressed), (S + 1, G).
        shear: Tangential force magnitude [N], (S + 1, G).
        penetration: Largest penetration of a gel node into the object [m], (S + 1,) (detached).
        markers: Marker positions in the sensor frame [m], (S + 1, M, 3) (None without markers).
    """

    force: torch.Tensor
    normal: torch.Tensor
    shear: torch.Tensor
    penetration: torch.Tensor
    markers: torch.Tensor | None


class TactileScene:
    """The built simulation of a ``tactile`` task.

    The gel mesh is placed at the sensor's initial pose; its base nodes follow the sensor body
    (anchors in the sensor frame, pivot at the sensor origin), so a control row is simply the
    sensor's world pose at the end of each FEM step.

    Args:
        task: The scene's task section.
        dtype: float32 or float64.
        device: Torch device.
        refine: Mesh refinement of the gel (the system identification's truth).
    """

    def __init__(self, task: TactileTask, dtype: torch.dtype, device: torch.device, refine: int = 1) -> None:
        self.task, self.dtype, self.device = task, dtype, device
        f64 = torch.float64
        self.geometry = geo = sensor_geometry(task.sensor, refine)
        m = task.motion
        self.start_position, self.start_rotation = start_pose(m)
        R0 = quat_to_matrix(axis_angle_to_quat(self.start_rotation))
        local = geo.mesh.vertices.to(f64)
        world = local @ R0.T + self.start_position
        mesh = fem.TetMesh(world, geo.mesh.tets, f"{task.sensor.type} sensor")
        mat = task.sensor.material
        self.model = fem.build_model(mesh, E=mat.E, nu=mat.nu, density=mat.density, law=mat.law,
                                     gravity=task.gravity, damping=mat.damping, kinematic=geo.base_nodes,
                                     anchors=local[geo.base_nodes], pivot=(0.0, 0.0, 0.0), dtype=dtype,
                                     device=device)
        self.nodes = geo.contact_nodes.to(device)
        self.areas = contact_areas(local, geo.contact_faces, geo.contact_nodes).to(device=device, dtype=dtype)
        self.sdf = _object_sdf(task.object)
        o = task.object
        self.object_position = torch.tensor(o.position, dtype=dtype, device=device)
        self.object_rotation = axis_angle_to_quat(torch.tensor(o.rotation, dtype=f64)).to(device=device, dtype=dtype)
        dt = self._time_step()
        if task.control_dt is not None:  # the control step's duration is fixed: FEM steps follow
            self.substeps = max(1, math.ceil(task.control_dt / dt * (1 - 1e-12)))
            self.dt = task.control_dt / self.substeps
        else:
            self.substeps, self.dt = task.substeps or 10, dt  # 10: the default (a model_copy skips the validator)
        self.n_steps = task.steps * self.substeps
        self.step_time = self.substeps * self.dt
        self._check_start()
        self.stepper = None
        self.dofs = DOFS

    # -- setup ----------------------------------------------------------------------------------------

    def _time_step(self) -> float:
        """The FEM step: the scene's, or 0.9 x the lowest of the elastic limit and the contact
        limits (explicit); checked against all of them.

        The contact limits are those of the penalty spring ``k_n A_i`` (``dt < 2 sqrt(m_i / k)``)
        and of the friction, whose slope w.r.t. the slip velocity never exceeds ``k_t A_i`` (the
        regularized Coulomb force is ``min(k_t s, mu f_n)`` along ``v_t / s``), so an explicit
        step stays stable, and its adjoint bounded, when ``dt < 2 m_i / (k_t A_i)`` (both with a
        safety factor of 0.5).
        """
        task = self.task
        if task.integrator == "implicit":
            return float(task.dt)
        c = task.contact
        limits = {"the gel's elastic limit": fem.stable_dt(self.model).dt}
        mass = self.model.masses(self.model.density).detach()[self.nodes].to(torch.float64)
        area = self.areas.to(torch.float64)
        if c.k_n > 0:
            limits[f"the contact stiffness limit (k_n = {c.k_n:g} N/m^3)"] = float(
                _CONTACT_CFL * 2.0 * torch.sqrt(mass / (c.k_n * area)).min())
        if c.k_t > 0:
            limits[f"the friction limit (k_t = {c.k_t:g} N s/m^3)"] = float(
                _CONTACT_CFL * 2.0 * (mass / (c.k_t * area)).min())
        which, limit = min(limits.items(), key=lambda kv: kv[1])
        if task.dt is None:
            return 0.9 * limit
        if task.dt > limit * (1 + 1e-9):
            raise ValueError(f"task.dt: {task.dt:g} s is above {which}, {limit:.3g} s; use at most {limit:.3g} s, "
                             f"lower the contact coefficient, or use integrator 'implicit'")
        return float(task.dt)

    def _check_start(self) -> None:
        """Objects must not start inside the gel: say by how much they do."""
        with torch.no_grad():
            x = self.model.rest_state().x[self.nodes].to(torch.float64)
            R = quat_to_matrix(self.object_rotation.to(torch.float64))
            local = (x - self.object_position.to(torch.float64)) @ R
            phi = self.sdf(local)
            depth = float((-phi).max())
        if depth > 1e-6 * max(self.task.sensor.thickness, 1e-3):
            raise ValueError(f"task.object: {self.task.object.name!r} starts {depth * 1e3:.3g} mm inside the gel of "
                             f"{self.task.sensor.name!r}; move the sensor (task.motion.position) or the object so that "
                             f"they at most touch at the start")

    # -- motion ---------------------------------------------------------------------------------------

    def initial_velocities(self) -> torch.Tensor:
        """Per-control-step velocities (S, 6) float64 of the scene's motion: constant for
        ``static``/``velocities``; for ``keyframes``, the velocities that reproduce the keyframed
        poses at every control step (constant within a step)."""
        m, S, f64 = self.task.motion, self.task.steps, torch.float64
        if m.type not in ("keyframes", "joints"):
            v = torch.tensor(m.velocity if m.type == "velocities" else (0.0,) * 6, dtype=f64)
            return v.repeat(S, 1)
        p, q = self._keyframe_poses(S + 1, self.step_time, f64)
        conj = torch.cat([-q[:-1, :3], q[:-1, 3:]], 1)
        turn = quat_to_rotvec(quat_multiply(q[1:], conj))
        return torch.cat([(p[1:] - p[:-1]) / self.step_time, turn / self.step_time], 1)

    def _keyframe_poses(self, n: int, dt: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        p, q, _ = frame_motion(self.task.motion, n, dt, dtype)
        return p, q

    def poses(self, velocities: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sensor's world pose after every FEM step: positions (T, 3) [m] and quaternions
        (T, 4) (x, y, z, w), from per-control-step ``velocities`` (S, 6) (differentiable), or the
        scene's motion when None."""
        task, dt = self.task, self.dt
        if velocities is None and task.motion.type in ("keyframes", "joints"):
            p, q = self._keyframe_poses(self.n_steps + 1, dt, self.dtype)
            return p[1:].to(self.device), q[1:].to(self.device)
        v = self.initial_velocities() if velocities is None else velocities
        v = v.to(self.dtype)
        # from_velocities gives the poses at the *start* of each substep; one more control step
        # gives the start of substep T, i.e. the end pose of each of the T substeps.
        states = colliders.from_velocities(self.start_position.to(self.dtype), self.start_rotation.to(self.dtype),
                                           torch.cat([v, v[-1:]]), self.substeps, dt)
        return states[1:self.n_steps + 1, :3].to(self.device), states[1:self.n_steps + 1, 3:7].to(self.device)

    def start_pose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(position (3,), quaternion (4,)) of the sensor at the start."""
        return (self.start_position.to(self.dtype), axis_angle_to_quat(self.start_rotation).to(self.dtype))

    # -- simulation -----------------------------------------------------------------------------------

    def contact_params(self, values: dict[str, torch.Tensor] | None = None) -> fem.ContactParams:
        """Per-node contact parameters (area-weighted) from the scene's values or overrides."""
        c = self.task.contact
        v = {k: getattr(c, k) for k in ("k_n", "k_d", "k_t", "mu")}
        v.update(values or {})
        a = self.areas

        def t(x):
            return torch.as_tensor(x, dtype=self.dtype, device=self.device)

        return fem.ContactParams(k_n=t(v["k_n"]) * a, k_d=t(v["k_d"]) * a, k_t=t(v["k_t"]) * a, mu=t(v["mu"]),
                                 eps_v=c.eps_v, penetration_width=c.penetration_width)

    def rigid_object(self) -> fem.RigidObject:
        return fem.RigidObject(self.sdf, self.object_position, self.object_rotation)

    def simulate(self, velocities: torch.Tensor | None = None, material: dict[str, torch.Tensor] | None = None,
                 contact: dict[str, torch.Tensor] | None = None, steps: int | None = None) -> fem.Rollout:
        """Roll out the first ``steps`` control steps (default all), one recorded state per control
        step. ``material``: overrides of ``E``/``nu`` (scalars, differentiable); ``contact``:
        overrides of ``k_n``/``k_d``/``k_t``/``mu`` (per area, differentiable)."""
        task = self.task
        n = self.n_steps if steps is None else steps * self.substeps
        pos, quat = self.poses(velocities)
        control = fem.Control(translation=pos[:n], rotation=quat[:n])
        params = {k: torch.as_tensor(v, dtype=self.dtype, device=self.device).reshape(()).expand(self.model.n_tets)
                  for k, v in (material or {}).items()}
        if self.stepper is None:
            self.stepper = (fem.ImplicitStepper(self.model, self.dt) if task.integrator == "implicit"
                            else fem.Stepper(self.model, self.dt))
        return fem.rollout(self.model, self.model.rest_state(), self.dt, n, control, window=task.window,
                           record_every=self.substeps, params=params or None, contact=self._contact(contact),
                           stepper=self.stepper, integrator=task.integrator, stability_check=False)

    def _contact(self, values) -> fem.Contact:
        return fem.Contact(self.rigid_object(), self.nodes, self.contact_params(values))

    def readings(self, out: fem.Rollout, velocities: torch.Tensor | None = None,
                 contact: dict[str, torch.Tensor] | None = None, markers: Markers | None = None) -> Readings:
        """Tactile readings of the recorded states of ``out`` (one per control step)."""
        pos, quat = self.poses(velocities)
        p0, q0 = self.start_pose()
        idx = [s - 1 for s in out.steps[1:]]  # FEM step s ends at pose s - 1
        P = torch.cat([p0.to(self.device)[None], pos[idx]])
        R = quat_to_matrix(torch.cat([q0.to(self.device)[None], quat[idx]]))
        obj, cp = self.rigid_object(), self.contact_params(contact)
        forces, pen, marks = [], [], []
        for st, p, r in zip(out.states, P, R):
            res = fem.contact_forces(st.x, st.v, self.nodes, obj, cp)
            forces.append(-res.object_force @ r)  # on the gel, in the sensor frame
            pen.append(res.penetration.detach().max() if res.penetration.numel() else st.x.new_zeros(()))
            if markers is not None:
                marks.append(markers.positions((st.x - p) @ r))
        force = torch.stack(forces)[:, None]  # one sensor
        return Readings(force, -force[..., 2], force[..., :2].norm(dim=-1), torch.stack(pen),
                        torch.stack(marks) if markers is not None else None)

    def frame_data(self, out: fem.Rollout, r: int, velocities=None):
        """(gel node positions per sensor, contact nodes per sensor, MPM particles (None), the
        sensor's nodes in its frame, the step) at record ``r``, for pictures."""
        x = out.states[r].x.detach()
        step = out.steps[r]
        return [x], [self.geometry.contact_nodes], None, self.sensor_frame_nodes(x, step, velocities), step

    def sensor_frame_nodes(self, x: torch.Tensor, step: int, velocities: torch.Tensor | None = None) -> torch.Tensor:
        """Node positions (N, 3) in the sensor frame at FEM step ``step`` (0: the start)."""
        if step == 0:
            p, q = self.start_pose()
        else:
            pos, quat = self.poses(velocities)
            p, q = pos[step - 1], quat[step - 1]
        return (x - p.to(x)) @ quat_to_matrix(q.to(x))
