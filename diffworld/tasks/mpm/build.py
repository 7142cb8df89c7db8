"""Building an ``mpm`` scene: the model, its bodies and colliders, and the collider motion."""

from __future__ import annotations


import torch

from diffworld.sims.common.quaternion import quat_to_rotvec
from diffworld.tasks.mpm.config import ColliderConfig, MPMTask

__all__ = ["MPMScene"]


def build_collider(cfg: ColliderConfig, dtype: torch.dtype):
    """The simulator's :class:`~diffworld.sims.common.colliders.Collider` of a scene's collider (a mesh
    file becomes a winding-number SDF grid of ``cfg.sdf_resolution``^3 cells)."""
    from diffworld.sims.common.colliders import Collider

    if cfg.shape != "mesh":
        return Collider(cfg.shape, cfg.size, cfg.friction, cfg.softness, cfg.sticky, name=cfg.name,
                        contact_weight=cfg.contact_weight)
    from diffworld.geometry.io import load_mesh
    from diffworld.geometry.grid import Grid
    from diffworld.geometry.mesh_sdf import mesh_to_sdf

    m = load_mesh(cfg.path)
    v = m.vertices.float()
    lo, hi = v.min(0).values, v.max(0).values
    pad = 0.1 * float((hi - lo).max())
    lo, hi = lo - pad, hi + pad
    n = cfg.sdf_resolution
    h = float((hi - lo).max()) / n
    grid = Grid.make((n, n, n), (tuple(lo.tolist()), tuple((lo + h * n).tolist())))
    values = mesh_to_sdf(v, m.faces, grid, sign="winding", dtype=torch.float64)
    return Collider("grid", cfg.size, cfg.friction, cfg.softness, cfg.sticky, sdf=values,
                    sdf_lower=tuple(lo.tolist()), sdf_spacing=h, name=cfg.name, contact_weight=cfg.contact_weight)


def bind_learned_laws(model, bodies, dtype: torch.dtype, device):
    """The model with each body whose material is ``type: neural`` governed by its learned law
    (:func:`diffworld.sims.mpm.use_law`); ``bodies``: the scene's body sections."""
    from diffworld.sims import mpm

    for b in bodies:
        law = b.material.law(dtype, device)
        if law is not None:
            model = mpm.use_law(model, law, b.name)
    return model


class MPMScene:
    """The built simulation of an ``mpm`` task."""

    def __init__(self, task: MPMTask, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        from diffworld.sims import mpm

        self.task = task
        self.grid = mpm.GridSpec.make(task.domain.lower, task.domain.upper, task.domain.resolution)
        bodies = [mpm.Body(b.shape.build(), b.material.build(), b.velocity, b.name, b.sampling, b.ppc)
                  for b in task.bodies]
        colliders = [build_collider(c, dtype) for c in task.colliders]
        emitters = [e.build() for e in task.emitters]

        def build(dt: float):
            model, state = mpm.build_model(self.grid, bodies, dt=dt, gravity=task.gravity, colliders=colliders,
                                           wall=task.domain.wall, wall_friction=task.domain.wall_friction,
                                           dtype=dtype, device=device, seed=seed, emitters=emitters)
            return bind_learned_laws(model, task.bodies, dtype, device), state

        # dt first from a provisional model (stable_dt needs the particles' materials).
        model, state = build(task.dt or 1.0)
        limit = mpm.stable_dt(model, cfl=1.0)
        if task.dt is None:
            model.dt = 0.5 * limit
            if emitters:  # activation substeps depend on dt
                model, state = build(0.5 * limit)
        elif task.dt > limit:
            raise ValueError(f"task.dt: {task.dt:g} s is above the stability limit {limit:.3g} s of this scene "
                             f"(elastic wave speed and viscosity at dx = {self.grid.dx:.3g} m); use at most "
                             f"{0.5 * limit:.3g} s or a coarser grid")
        end = task.steps * task.substeps * model.dt
        for i, e in enumerate(task.emitters):
            if e.stop > end * (1 + 1e-9):
                raise ValueError(f"task.emitters[{i}].stop: {e.stop:g} s is after the end of the run ({end:.4g} s = "
                                 f"steps x substeps x dt); particles released later would stay parked")
        self.model, self.state = model, state
        self.stepper = mpm.Stepper(model)
        self.n_substeps = task.steps * task.substeps
        # bodies, then emitters (their particles' ids in model.body)
        self.body_index = {name: i for i, name in enumerate(model.body_names)}

    def initial_motion(self, cfg: ColliderConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Start pose and per-control-step velocities of a collider, float64.

        Returns (position (3,) [m], rotation vector (3,) [rad], velocities (steps, 6)). For
        ``keyframes`` motion they reproduce the keyframed poses at every control step (constant
        linear and angular velocity within a step): the initial guess of a controlled collider
        that moves through keyframes.
        """
        from diffworld.sims.common import colliders

        m, steps = cfg.motion, self.task.steps
        f64 = torch.float64
        if m.type != "keyframes":
            return (torch.tensor(m.position, dtype=f64), torch.tensor(m.rotation, dtype=f64),
                    torch.tensor(m.velocity, dtype=f64).repeat(steps, 1))
        k = self.task.substeps
        states = colliders.from_keyframes([key.t for key in m.keyframes],
                                  torch.tensor([key.position for key in m.keyframes], dtype=f64),
                                  torch.tensor([key.rotation for key in m.keyframes], dtype=f64),
                                  steps * k + 1, self.model.dt)[::k]  # poses at the control steps, (steps + 1, 13)
        p, q = states[:, :3], states[:, 3:7]
        step_time = k * self.model.dt
        conj = torch.cat([-q[:-1, :3], q[:-1, 3:]], 1)
        turn = quat_to_rotvec(colliders.quat_multiply(q[1:], conj))  # world-frame rotation over each step
        return p[0], quat_to_rotvec(q[0]), torch.cat([(p[1:] - p[:-1]) / step_time, turn / step_time], 1)

    def control(self, velocities: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Collider states (T, n_col, 13) with the given optimized velocities (S, 6) by name."""
        from diffworld.sims.common import colliders

        if not self.task.colliders:
            return None
        rows = []
        dtype = self.model.dtype
        for cfg in self.task.colliders:
            m = cfg.motion
            if cfg.name in velocities or m.type == "velocities":
                pos, rot, vel0 = self.initial_motion(cfg)
                vel = velocities.get(cfg.name)
                if vel is None:
                    vel = vel0.to(dtype)
                rows.append(colliders.from_velocities(pos.to(dtype), rot.to(dtype), vel, self.task.substeps, self.model.dt))
            elif m.type == "keyframes":
                rows.append(colliders.from_keyframes([k.t for k in m.keyframes],
                                             torch.tensor([k.position for k in m.keyframes], dtype=dtype),
                                             torch.tensor([k.rotation for k in m.keyframes], dtype=dtype),
                                             self.n_substeps, self.model.dt))
            else:
                rows.append(colliders.static(m.position, m.rotation, self.n_substeps, dtype))
        return torch.stack(rows, 1).to(self.model.device)

    def simulate(self, control, params=None, steps: int | None = None):
        """Roll out the first ``steps`` control steps (default: all), one recorded state per step."""
        from diffworld.sims import mpm

        n = self.n_substeps if steps is None else steps * self.task.substeps
        if control is not None:
            control = control[:n]
        return mpm.rollout(self.model, self.state, n, control, window=self.task.window,
                           record_every=self.task.substeps, params=params, stepper=self.stepper)

    def masses(self) -> torch.Tensor:
        """Particle masses [kg], shape (N,)."""
        p = self.model.params
        return (p["density"] * p["volume"]).detach()

    def mask(self, body: str) -> torch.Tensor:
        return self.model.body == self.body_index[body]
