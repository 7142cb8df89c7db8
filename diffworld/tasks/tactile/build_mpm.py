"""A ``tactile`` scene with deformable MPM objects: one sensor or a two-pad gripper coupled two-way
with MPM bodies in one differentiable step (:mod:`diffworld.sims.coupling.fem_mpm`).

The same interface as :class:`~diffworld.tasks.tactile.build.TactileScene` (motion, simulate,
readings, frame data), so the objectives and outputs serve both.
"""

from __future__ import annotations

import math

import torch

from diffworld.sims import fem
from diffworld.sims.common import colliders
from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_multiply, quat_to_matrix, quat_to_rotvec
from diffworld.sims.tactile import ParallelGripper, sensor_model
from diffworld.tasks.tactile.build import (_CONTACT_CFL, Readings, contact_areas, frame_motion, sensor_geometry,
                                           start_pose)
from diffworld.tasks.tactile.config import DOFS, TactileTask

__all__ = ["CoupledTactileScene", "body_angle"]


def body_angle(x: torch.Tensor, X: torch.Tensor, mass: torch.Tensor, axis) -> torch.Tensor:
    """The best-fit rotation angle [rad] about ``axis`` taking points ``X`` (P, 3) to ``x`` (P, 3)
    (weights ``mass`` (P,)): with ``A = sum m (x - c)(X - C)^T`` restricted to an orthonormal
    basis (u, w) of the plane normal to the axis (u x w = axis), ``atan2(A_wu - A_uw, A_uu +
    A_ww)``, the 2D Procrustes solution. Smooth wherever ``A``'s planar part is not zero; no SVD,
    so bodies with equal principal moments (a cube) are fine. Range (-pi, pi]."""
    a = torch.as_tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    # u: the world axis least aligned with a, made orthogonal to it; w = a x u
    e = torch.zeros(3, dtype=torch.float64)
    e[int(a.abs().argmin())] = 1.0
    u = e - a * (a @ e)
    u = u / u.norm()
    w = torch.linalg.cross(a, u)
    basis = torch.stack([u, w], 1).to(x)  # (3, 2)
    m = mass.to(x)[:, None]
    c, C = (x * m).sum(0) / m.sum(), (X * m).sum(0) / m.sum()
    p, P = (x - c) @ basis, (X.to(x) - C) @ basis
    A = (m * p).T @ P  # (2, 2): sum m p P^T
    return torch.atan2(A[1, 0] - A[0, 1], A[0, 0] + A[1, 1])


class CoupledTactileScene:
    """The built simulation of a ``tactile`` task with ``mpm`` objects.

    Sensors: one (dome or pad), or the gripper's two pads (left, right). Every FEM step is one
    MPM substep of the same ``dt``: the lowest of the gels' elastic limits, the MPM's, and the
    coupling's penalty and friction limits (x 0.9), unless ``task.dt`` is given (then checked).

    Args:
        task: The scene's task section.
        dtype: float32 or float64.
        device: Torch device.
    """

    def __init__(self, task: TactileTask, dtype: torch.dtype, device: torch.device) -> None:
        from diffworld.sims import mpm
        from diffworld.sims.coupling.fem_mpm import Gel, contact_stable_dt, particle_stiffness_ratio

        self._init_sensors(task, dtype, device)
        # MPM bodies; the coupling's coefficients are per dx x dx patch: the per-area ones times dx^2
        sec = task.mpm
        self.grid = mpm.GridSpec.make(sec.domain.lower, sec.domain.upper, sec.domain.resolution)
        bodies = [mpm.Body(b.shape.build(), b.material.build(), b.velocity, b.name, b.sampling, b.ppc)
                  for b in sec.bodies]

        from diffworld.tasks.mpm.build import bind_learned_laws, build_collider

        colliders = [build_collider(c, dtype) for c in sec.colliders]

        def build(dt: float):
            model, state = mpm.build_model(self.grid, bodies, dt=dt, gravity=task.gravity, colliders=colliders,
                                           wall=sec.domain.wall, wall_friction=sec.domain.wall_friction, dtype=dtype,
                                           device=device)
            return bind_learned_laws(model, sec.bodies, dtype, device), state

        probe, _ = build(1.0)
        dx2 = self.grid.dx ** 2
        c = sec.contact
        self.contact = fem.ContactParams(k_n=c.k_n * dx2, k_d=c.k_d * dx2, k_t=c.k_t * dx2, mu=c.mu, eps_v=c.eps_v,
                                         penetration_width=c.penetration_width)
        self.gels = [Gel(model, self.contact, name=n)
                     for model, g, n in zip(self.models, self.geometries, self.names)]
        self.particle_radius = 0.5 * probe.params["volume"].detach() ** (1.0 / 3.0)  # [m] (the coupling's r_p)
        limits = {"the MPM's limit": 0.5 * mpm.stable_dt(probe, cfl=1.0)}
        for model, gel, g, n in zip(self.models, self.gels, self.geometries, self.names):
            limits[f"the gel's elastic limit ({n})"] = fem.stable_dt(model).dt
            limits[f"the contact stiffness limit (mpm.contact.k_n = {c.k_n:g} N/m^3)"] = min(
                limits.get(f"the contact stiffness limit (mpm.contact.k_n = {c.k_n:g} N/m^3)", math.inf),
                contact_stable_dt(gel, probe))
            if c.k_t > 0:
                # every free node of the gel's closed surface may touch (the coupling uses it all)
                faces = model.mesh.surface_faces()
                free = torch.ones(model.n_nodes, dtype=torch.bool)
                free[model.kinematic.cpu()] = False
                nodes = torch.unique(faces.cpu())
                nodes = nodes[free[nodes]]
                mass = model.masses(model.density).detach().to(torch.float64).cpu()[nodes]
                area = contact_areas(g.mesh.vertices.to(torch.float64), faces.cpu(), nodes)
                gel_side = float((mass / (c.k_t * area).clamp_min(1e-300)).min())
                grid_side = 1.0 / (c.k_t * dx2 * particle_stiffness_ratio(probe))  # the lightest particle
                key = f"the friction limit (mpm.contact.k_t = {c.k_t:g} N s/m^3)"
                limits[key] = min(limits.get(key, math.inf), _CONTACT_CFL * 2.0 * min(gel_side, grid_side))
        which, limit = min(limits.items(), key=lambda kv: kv[1])
        if task.dt is None:
            dt = 0.9 * limit
        elif task.dt > limit * (1 + 1e-9):
            raise ValueError(f"task.dt: {task.dt:g} s is above {which}, {limit:.3g} s; use at most {limit:.3g} s or "
                             f"lower the contact coefficient")
        else:
            dt = float(task.dt)
        self._set_steps(dt)
        self.mpm_model, self.mpm_state = build(self.dt)
        self.body_index = {name: i for i, name in enumerate(self.mpm_model.body_names)}
        self.mpm_stepper = None
        self._check_start()

    # -- setup ----------------------------------------------------------------------------------------

    def _init_sensors(self, task: TactileTask, dtype: torch.dtype, device: torch.device) -> None:
        """The sensor(s): geometry, start poses and FEM models (one sensor, or a gripper's pads)."""
        self.task, self.dtype, self.device = task, dtype, device
        f64 = torch.float64
        cfg = task.sensor
        m = task.motion
        self.start_position, self.start_rotation = start_pose(m)
        if cfg.type == "gripper":
            geo = sensor_geometry(cfg.pad)
            self.gripper = ParallelGripper(geo, cfg.max_opening, cfg.finger_offset)
            self.geometries = [geo, geo]
            self.names = [f"{cfg.name}.left", f"{cfg.name}.right"]
            self.dofs = DOFS + ("grip",)
        else:
            self.gripper = None
            self.geometries = [sensor_geometry(cfg)]
            self.names = [cfg.name]
            self.dofs = DOFS
        self.geometry = self.geometries[0]
        mat = cfg.material
        starts = self._sensor_poses(self.start_position[None], axis_angle_to_quat(self.start_rotation)[None],
                                    self._start_opening()[None])
        self.models = [sensor_model(g, p[0], q[0], name=n, E=mat.E, nu=mat.nu, density=mat.density, law=mat.law,
                                    gravity=task.gravity, damping=mat.damping, dtype=dtype, device=device)
                       for g, (p, q), n in zip(self.geometries, starts, self.names)]
        self.model = self.models[0]

    def _set_steps(self, dt: float) -> None:
        """dt, FEM steps per control step (``control_dt`` or ``substeps``) and the totals."""
        task = self.task
        if task.control_dt is not None:
            self.substeps = max(1, math.ceil(task.control_dt / dt * (1 - 1e-12)))
            dt = task.control_dt / self.substeps
        else:
            self.substeps = task.substeps or 10  # the default (a model_copy skips the validator)
        self.dt = dt
        self.n_steps = task.steps * self.substeps
        self.step_time = self.substeps * dt

    def _start_opening(self) -> torch.Tensor:
        cfg = self.task.sensor
        return torch.tensor(cfg.opening if cfg.type == "gripper" else 0.0, dtype=torch.float64)

    def _sensor_poses(self, pos: torch.Tensor, quat: torch.Tensor, opening: torch.Tensor):
        """Per sensor (position (T, 3), quaternion (T, 4)) from the motion frame's poses."""
        if self.gripper is None:
            return [(pos, quat)]
        p = self.gripper.pad_poses(pos, quat, opening)
        return [(p.left_position, p.left_quaternion), (p.right_position, p.right_quaternion)]

    def _check_start(self) -> None:
        """MPM bodies must not start inside a gel: say by how much they do (a particle is a ball of
        half its spacing, the body's surface, as the coupling sees it)."""
        from diffworld.sims.coupling.fem_mpm import gel_surface_distance

        x = self.mpm_state.x.detach()
        r = self.particle_radius.to(x)
        for gel, model, n in zip(self.gels, self.models, self.names):
            with torch.no_grad():
                d = gel_surface_distance(gel, model.rest_state().x, x, 2 * self.grid.dx)
            depth = float((r - d).max()) if d.numel() else 0.0
            if depth > 1e-9:
                raise ValueError(f"task.mpm: MPM particles start {depth * 1e3:.3g} mm inside the gel of {n!r}; move the "
                                 f"sensor (task.motion) or the bodies so that they at most touch at the start")

    # -- motion ---------------------------------------------------------------------------------------

    def _keyframes(self, n: int, dt: float, dtype):
        """Motion-frame poses and openings at times 0, dt, ..., (n - 1) dt (keyframes or joints)."""
        return frame_motion(self.task.motion, n, dt, dtype, float(self._start_opening()))

    def initial_velocities(self) -> torch.Tensor:
        """Per-control-step velocities (S, 6 or 7) float64 of the scene's motion (7th: opening rate)."""
        m, S, f64 = self.task.motion, self.task.steps, torch.float64
        grip = [] if self.gripper is None else [self.task.sensor.grip_velocity]
        if m.type not in ("keyframes", "joints"):
            v = torch.tensor((list(m.velocity) if m.type == "velocities" else [0.0] * 6) +
                             (grip if m.type == "velocities" else [0.0] * len(grip)), dtype=f64)
            return v.repeat(S, 1)
        p, q, o = self._keyframes(S + 1, self.step_time, f64)
        conj = torch.cat([-q[:-1, :3], q[:-1, 3:]], 1)
        turn = quat_to_rotvec(quat_multiply(q[1:], conj))
        cols = [(p[1:] - p[:-1]) / self.step_time, turn / self.step_time]
        if self.gripper is not None:
            cols.append(((o[1:] - o[:-1]) / self.step_time)[:, None])
        return torch.cat(cols, 1)

    def poses(self, velocities: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sensor: world positions (T, 3) and quaternions (T, 4) at the end of every FEM step."""
        task, dt = self.task, self.dt
        if velocities is None and task.motion.type in ("keyframes", "joints"):
            p, q, o = self._keyframes(self.n_steps + 1, dt, self.dtype)
            p, q, o = p[1:], q[1:], o[1:]
        else:
            v = (self.initial_velocities() if velocities is None else velocities).to(self.dtype)
            states = colliders.from_velocities(self.start_position.to(self.dtype), self.start_rotation.to(self.dtype),
                                               torch.cat([v[:, :6], v[-1:, :6]]), self.substeps, dt)
            p, q = states[1:self.n_steps + 1, :3], states[1:self.n_steps + 1, 3:7]
            if self.gripper is not None:
                rate = v[:, 6].repeat_interleave(self.substeps)
                o = self._start_opening().to(self.dtype) + dt * torch.cumsum(rate, 0)
            else:
                o = torch.zeros(self.n_steps, dtype=self.dtype)
        if self.gripper is not None:
            self.gripper.check_opening(o)
        return [(a.to(self.device), b.to(self.device)) for a, b in self._sensor_poses(p, q, o)]

    def start_poses(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        q = axis_angle_to_quat(self.start_rotation)
        return [(a[0].to(self.dtype), b[0].to(self.dtype)) for a, b in
                self._sensor_poses(self.start_position[None], q[None], self._start_opening()[None])]

    # -- simulation -----------------------------------------------------------------------------------

    def simulate(self, velocities: torch.Tensor | None = None, material: dict | None = None,
                 contact: dict | None = None, steps: int | None = None):
        """The coupled rollout of the first ``steps`` control steps, one record per control step."""
        from diffworld.sims import mpm
        from diffworld.sims.coupling.fem_mpm import coupled_rollout

        if contact:
            raise ValueError("contact overrides are not supported with 'mpm' objects")
        n = self.n_steps if steps is None else steps * self.substeps
        controls = [fem.Control(translation=p[:n], rotation=q[:n]) for p, q in self.poses(velocities)]
        params = None
        if material:
            params = [{k: torch.as_tensor(v, dtype=self.dtype, device=self.device).reshape(()).expand(m.n_tets)
                       for k, v in material.items()} for m in self.models]
        if self.mpm_stepper is None:
            self.mpm_stepper = mpm.Stepper(self.mpm_model)
        mctrl = None
        if self.task.mpm.colliders:  # static: one pose per collider, repeated over the steps
            from diffworld.sims.common.colliders import static

            mctrl = torch.stack([static(c.motion.position, c.motion.rotation, n, self.dtype)
                                 for c in self.task.mpm.colliders], 1).to(self.device)
        return coupled_rollout(self.gels, self.mpm_model, [m.rest_state() for m in self.models], self.mpm_state, n,
                               gel_controls=controls, mpm_control=mctrl, gel_params=params, window=self.task.window,
                               record_every=self.substeps, mpm_stepper=self.mpm_stepper)

    def sensor_readings(self, force: torch.Tensor, penetration: torch.Tensor, steps: list[int],
                        velocities: torch.Tensor | None = None) -> Readings:
        """Readings from the world-frame contact force on each gel (R, G, 3) [N] at the records
        ending at ``steps``: rotated into each sensor's frame at that record."""
        poses, starts = self.poses(velocities), self.start_poses()
        idx = [s - 1 for s in steps[1:]]
        local = []
        for g, ((pos, quat), (p0, q0)) in enumerate(zip(poses, starts)):
            R = quat_to_matrix(torch.cat([q0.to(self.device)[None], quat[idx]]))
            local.append(torch.einsum("ri,rij->rj", force[:, g], R))
        f = torch.stack(local, 1)
        return Readings(f, -f[..., 2], f[..., :2].norm(dim=-1), penetration, None)

    def sensor_local(self, x: torch.Tensor, step: int, velocities: torch.Tensor | None = None) -> torch.Tensor:
        """The first sensor's node positions ``x`` (N, 3) in its own frame at FEM step ``step``."""
        if step == 0:
            p, q = self.start_poses()[0]
        else:
            pos, quat = self.poses(velocities)[0]
            p, q = pos[step - 1], quat[step - 1]
        return (x - p.to(x)) @ quat_to_matrix(q.to(x))

    def readings(self, out, velocities: torch.Tensor | None = None, contact=None, markers=None) -> Readings:
        """Tactile readings per record and sensor (forces on each gel in its own frame)."""
        force = torch.stack([torch.stack([f.sum(0) for f in out.gel_forces[r]]) for r in range(len(out.steps))])
        pen = out.penetration.detach().amax(1) if out.penetration.dim() == 2 else out.penetration.detach()
        return self.sensor_readings(force, pen, out.steps, velocities)

    def com(self, out, body: str) -> torch.Tensor:
        """Centre of mass (R, 3) [m] of an MPM body at every record."""
        mask = self.mpm_model.body == self.body_index[body]
        mass = (self.mpm_model.params["density"] * self.mpm_model.params["volume"]).detach()[mask]
        return torch.stack([(s.x[mask] * mass[:, None]).sum(0) / mass.sum() for s in out.mpm_states])

    def body_angle(self, out, body: str, axis) -> torch.Tensor:
        """An MPM body's turn about ``axis`` (world, right-handed) since the start, per record (R,)
        [rad]: the best-fit planar rotation of its particles (see
        :class:`~diffworld.tasks.tactile.config.RotationLossConfig`)."""
        mask = self.mpm_model.body == self.body_index[body]
        mass = (self.mpm_model.params["density"] * self.mpm_model.params["volume"]).detach()[mask]
        return torch.stack([body_angle(s.x[mask], out.mpm_states[0].x[mask].detach(), mass, axis)
                            for s in out.mpm_states])

    def body_positions(self, out, body: str, r: int) -> torch.Tensor:
        """Particle positions (P, 3) [m] of an MPM body at record ``r``."""
        return out.mpm_states[r].x[self.mpm_model.body == self.body_index[body]]

    def frame_data(self, out, r: int, velocities=None):
        """(gel node positions per sensor, contact nodes per sensor, MPM particles, the first
        sensor's nodes in its frame, the step) at record ``r``, for pictures."""
        step = out.steps[r]
        xs = [s.x.detach() for s in out.gel_states[r]]
        return (xs, [g.contact_nodes for g in self.geometries], out.mpm_states[r].x.detach(),
                self.sensor_local(xs[0], step, velocities), step)
