"""A ``tactile`` scene with a cable: one sensor (or a gripper's pads) coupled two-way with an XPBD
rope lying on a table (:mod:`diffworld.sims.coupling.fem_cable`), for cable manipulation such as
DiffTactile's cable straightening."""

from __future__ import annotations

import math

import torch

from diffworld.sims import cable, fem
from diffworld.tasks.tactile.build import Readings
from diffworld.tasks.tactile.build_mpm import CoupledTactileScene
from diffworld.tasks.tactile.config import TactileTask

__all__ = ["CableTactileScene"]


def _params(c) -> fem.ContactParams:
    return fem.ContactParams(k_n=c.k_n, k_d=c.k_d, k_t=c.k_t, mu=c.mu, eps_v=c.eps_v,
                             penetration_width=c.penetration_width)


class CableTactileScene(CoupledTactileScene):
    """The built simulation of a ``tactile`` task with a ``cable``.

    The rope is straight at rest (the bending constraint's rest angle) and starts bent into a
    circular arc of ``arc_angle`` in the table's plane, with its segments at the rest length. The
    step is 0.9 x the lowest of the gels' elastic limits and the table's and the gel contact's
    explicit limits (the coupled rollout checks them), unless ``task.dt`` is given. The readings'
    forces come from the rollout's diagnostics: reported, not differentiated (the config allows
    only rope losses).
    """

    def __init__(self, task: TactileTask, dtype: torch.dtype, device: torch.device) -> None:
        self._init_sensors(task, dtype, device)
        c = task.cable
        n, f64 = c.particles, torch.float64
        seg = c.length / (n - 1)
        h = math.radians(c.heading)
        direction = torch.tensor([math.cos(h), math.sin(h), 0.0], dtype=f64)
        normal = torch.tensor([-math.sin(h), math.cos(h), 0.0], dtype=f64)
        mid = torch.tensor([c.center[0], c.center[1], c.radius], dtype=f64)
        s = (torch.arange(n, dtype=f64) - (n - 1) / 2) * seg  # arclength from the middle
        rest = mid + s[:, None] * direction
        theta = math.radians(c.arc_angle)
        if theta > 0:  # an arc of the same length, bulging towards +normal, chord along direction
            R = c.length / theta
            a = s / R
            start = mid + (R * torch.sin(a))[:, None] * direction + (R * (torch.cos(a) - math.cos(theta / 2)))[:, None] \
                * normal
        else:
            start = rest.clone()
        self.rope = cable.build_rope(rest, linear_density=c.linear_density, radius=c.radius,
                                     stretch_compliance=c.stretch_compliance,
                                     bend_compliance=cable.bend_compliance_from_EI(c.bend_stiffness, seg),
                                     gravity=task.gravity, damping=c.damping,
                                     ground=cable.Ground(0.0, _params(c.table)), iterations=c.iterations,
                                     dtype=dtype, device=device)
        self.rope_start = cable.State(start.to(dtype=dtype, device=device), torch.zeros(n, 3, dtype=dtype, device=device))
        limits = {f"the gel's elastic limit ({nm})": fem.stable_dt(m).dt for m, nm in zip(self.models, self.names)}
        mass = float(self.rope.masses().min())
        for name, p in (("cable.table", c.table), ("cable.contact", c.contact)):
            if p.k_n > 0:
                limits[f"the {name} stiffness limit (k_n = {p.k_n:g} N/m)"] = 0.5 * 2 * math.sqrt(mass / p.k_n)
            if p.k_t > 0:
                limits[f"the {name} friction limit (k_t = {p.k_t:g} N s/m)"] = 0.5 * 2 * mass / p.k_t
        which, limit = min(limits.items(), key=lambda kv: kv[1])
        if task.dt is None:
            dt = 0.9 * limit
        elif task.dt > limit * (1 + 1e-9):
            raise ValueError(f"task.dt: {task.dt:g} s is above {which}, {limit:.3g} s; use at most {limit:.3g} s")
        else:
            dt = float(task.dt)
        self._set_steps(dt)
        self._check_start()

    def _check_start(self) -> None:
        """The rope must not start inside a gel: say by how much it does."""
        x = self.rope_start.x.to(torch.float64)
        r = self.task.cable.radius
        for model, g, n in zip(self.models, self.geometries, self.names):
            v = model.rest_state().x.detach().to(torch.float64)
            tri = v[g.contact_faces]
            # signed distance of each particle centre to each contact triangle's plane, where it
            # projects inside the triangle (a flat gel face: exact)
            nrm = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            nrm = nrm / nrm.norm(dim=1, keepdim=True)
            d = torch.einsum("pfi,fi->pf", x[:, None] - tri[None, :, 0], nrm)
            q = x[:, None] - d[..., None] * nrm[None]
            inside = torch.ones_like(d, dtype=torch.bool)
            for k in range(3):
                a, b = tri[:, k], tri[:, (k + 1) % 3]
                inside &= torch.einsum("pfi,fi->pf", torch.linalg.cross((b - a)[None].expand_as(q), q - a[None]),
                                       nrm) >= -1e-12
            pen = torch.where(inside & (d > -2 * r), r - d, torch.zeros_like(d))
            depth = float(pen.max()) if pen.numel() else 0.0
            if depth > 1e-9:
                raise ValueError(f"task.cable: the rope starts {depth * 1e3:.3g} mm inside the gel of {n!r}; move the "
                                 f"sensor (task.motion) or the cable so that they at most touch at the start")

    def simulate(self, velocities: torch.Tensor | None = None, material: dict | None = None,
                 contact: dict | None = None, steps: int | None = None):
        from diffworld.sims.coupling.fem_cable import CableCoupling, CableGel, CoupledState, fem_cable_rollout

        if contact or material:
            raise ValueError("material and contact overrides are not supported with a 'cable'")
        n = self.n_steps if steps is None else steps * self.substeps
        gels = [CableGel(m, g.contact_faces.to(self.device), fem.Control(translation=p[:n], rotation=q[:n]), name=nm)
                for m, g, (p, q), nm in zip(self.models, self.geometries, self.poses(velocities), self.names)]
        state = CoupledState(tuple(m.rest_state() for m in self.models), self.rope_start)
        return fem_cable_rollout(gels, self.rope, state, self.dt, n, CableCoupling(_params(self.task.cable.contact)),
                                 window=self.task.window, record_every=self.substeps)

    def readings(self, out, velocities: torch.Tensor | None = None, contact=None, markers=None) -> Readings:
        """Readings per record and sensor from the rollout's (detached) gel-force diagnostics."""
        idx = [s - 1 for s in out.steps[1:]]
        zero = torch.zeros(1, len(self.models), 3, dtype=self.dtype, device=self.device)
        force = torch.cat([zero, out.gel_force[idx].to(self.dtype)]).detach()
        pen = torch.cat([torch.zeros(1, dtype=self.dtype), out.penetration[idx].amax(1).to(self.dtype)]).detach()
        return self.sensor_readings(force, pen, out.steps, velocities)

    def rope_positions(self, out, r: int) -> torch.Tensor:
        """Rope particle positions (N, 3) [m] at record ``r``."""
        return out.states[r].rope.x

    def frame_data(self, out, r: int, velocities=None):
        step, st = out.steps[r], out.states[r]
        xs = [g.x.detach() for g in st.gels]
        return (xs, [g.contact_nodes for g in self.geometries], st.rope.x.detach(),
                self.sensor_local(xs[0], step, velocities), step)
