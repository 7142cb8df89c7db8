"""Objectives of the ``tactile`` task: the sensor trajectory problem (force tracking, e.g. surface
following) and system identification of gel and contact parameters from a probe."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.problem import BaseProblem
from diffworld.sims.tactile import Markers
from diffworld.tasks.tactile.build import Readings, TactileScene
from diffworld.tasks.tactile.config import (ComLossConfig, DeformationLossConfig, ForceLossConfig, RotationLossConfig,
                                            SlipLossConfig, SmoothnessLossConfig, StraightnessLossConfig, SysIdConfig,
                                            TrajectoryConfig)

__all__ = ["PROBLEMS", "SystemIdentificationProblem", "TrajectoryProblem", "sysid_task"]


def _term_names(terms) -> list[str]:
    """Log names of the loss terms: ``force_normal``, ``smoothness``, ... (numbered when repeated)."""
    base = [f"force_{t.component}" if isinstance(t, ForceLossConfig) else
            f"com_{t.body}" if isinstance(t, ComLossConfig) else
            f"deformation_{t.body}" if isinstance(t, DeformationLossConfig) else
            f"rotation_{t.body}" if isinstance(t, RotationLossConfig) else t.type for t in terms]
    return [b if base.count(b) == 1 else f"{b}_{base[:i + 1].count(b)}" for i, b in enumerate(base)]


class TrajectoryProblem(BaseProblem):
    """Optimize the sensor's per-control-step velocity (a float64 leaf (S, 6): linear [m/s],
    angular [rad/s], world frame; a gripper's 7th column is its opening rate [m/s]); components
    not in ``dofs`` keep their initial values (zero gradient, restored by :meth:`project`), and
    speeds are clipped to the bounds (the opening rate to ``max_speed``)."""

    stage = "trajectory"

    def __init__(self, scene: TactileScene, obj: TrajectoryConfig) -> None:
        self.scene, self.obj = scene, obj
        self.names = _term_names(obj.losses)
        self.velocity = scene.initial_velocities().clone().requires_grad_()
        self.free = torch.tensor([c in obj.dofs for c in scene.dofs], dtype=torch.bool)
        keep = self.free.to(torch.float64)
        self.velocity.register_hook(lambda g: g * keep)
        with torch.no_grad():
            self._clip()
        self.initial = self.velocity.detach().clone()

    def params(self) -> dict[str, torch.Tensor]:
        return {"velocity": self.velocity}

    def control(self) -> torch.Tensor:
        return self.velocity.detach().clone()

    def _loss(self, r: Readings, out=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = r.force.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for t, name in zip(self.obj.losses, self.names):
            if isinstance(t, ForceLossConfig):
                value = r.normal if t.component == "normal" else r.shear
                scale = t.scale or (abs(t.target) if t.target != 0 else 1.0)
                # readings[0] is the start; control step k ends at readings[k]
                v = ((value[1 + t.start:] - t.target) / scale) ** 2
                term = v.mean() if v.numel() else value.new_zeros(())
            elif isinstance(t, SlipLossConfig):
                ratio = r.shear[1 + t.start:] / (t.mu * r.normal[1 + t.start:].clamp_min(0.0) + t.eps)
                term = (ratio ** 2).mean() if ratio.numel() else total.new_zeros(())
            elif isinstance(t, ComLossConfig):
                com = self.scene.com(out, t.body)[1 + t.start:]
                axes = ["xyz".index(a) for a in t.axes]
                d = (com[:, axes] - torch.tensor(t.target, dtype=com.dtype, device=com.device)[axes]) / t.scale
                term = (d * d).sum(1).mean() if d.shape[0] else total.new_zeros(())
            elif isinstance(t, DeformationLossConfig):
                x0, x1 = self.scene.body_positions(out, t.body, 0), self.scene.body_positions(out, t.body, -1)
                d = ((x1 - x1.mean(0)) - (x0 - x0.mean(0))) / t.scale
                term = (d * d).sum(1).mean()
            elif isinstance(t, RotationLossConfig):
                angle = self.scene.body_angle(out, t.body, t.axis)[1 + t.start:]
                term = (((angle - t.target) / t.scale) ** 2).mean() if angle.numel() else total.new_zeros(())
            elif isinstance(t, StraightnessLossConfig):
                x = self.scene.rope_positions(out, -1)
                term = ((1 - (x[-1] - x[0]).norm() / self.scene.task.cable.length) / t.scale) ** 2
            elif isinstance(t, SmoothnessLossConfig):
                d = (self.velocity[1:] - self.velocity[:-1])[:, self.free] / t.scale
                term = (d * d).sum(1).mean().to(total.dtype) if d.shape[0] else total.new_zeros(())
            else:  # pragma: no cover - the config union is closed
                raise ValueError(f"unknown loss term {t.type!r}")
            terms[name] = term.detach()
            total = total + t.weight * term
        return total, terms

    def evaluate(self):
        """(rollout and readings, total loss, terms) with the current velocities."""
        out = self.scene.simulate(self.velocity)
        r = self.scene.readings(out, self.velocity)
        total, terms = self._loss(r, out)
        return (out, r), total, terms

    def loss_fn(self, _iteration: int):
        _, total, terms = self.evaluate()
        return total, terms

    def _clip(self) -> None:
        v = self.velocity
        for part, bound in ((slice(0, 3), self.obj.max_speed), (slice(3, 6), self.obj.max_angular_speed),
                            (slice(6, 7), self.obj.max_speed)):
            u = v[:, part]
            n = u.norm(dim=1, keepdim=True)
            u.mul_(torch.where(n > bound, bound / n.clamp_min(1e-30), torch.ones_like(n)))

    def project(self) -> None:
        v = self.velocity
        v.copy_(torch.where(self.free, v, self.initial))
        self._clip()

    def metrics(self, phase: str, total: torch.Tensor, terms: dict, result) -> dict:
        _, r = result
        normal = r.normal.detach()
        return {f"{phase}_loss": float(total), f"{phase}_terms": {k: float(v) for k, v in terms.items()},
                f"{phase}_max_penetration_mm": float(r.penetration.max()) * 1e3,
                # per control step: the sensor's normal force, or a list over the gripper's pads
                f"{phase}_normal_force_N": [round(float(f[0]), 6) if f.numel() == 1 else [round(float(v), 6) for v in f]
                                            for f in normal]}

    def write(self, out_dir: Path) -> None:
        np.save(out_dir / "velocities.npy", self.velocity.detach().numpy())


# Fitted in log space (positive scales); nu and mu are clamped to bounds.
_LOG = ("E", "k_n", "k_d", "k_t")
_BOUNDS = {"nu": (-0.5, 0.49), "mu": (0.0, 5.0)}
# Upper bound of a fitted stiffness, as a multiple of the largest of its truth, initial and scene
# values: the explicit step is chosen stable up to it (and the fit is clamped below it).
_HEADROOM = 2.0


def sysid_task(task):
    """The task a system identification runs: its explicit ``dt`` stable for every value the fit
    may reach (``E``, ``k_n``, ``k_t`` up to :data:`_HEADROOM` x the largest of truth, initial and
    the scene's value), with the control step's duration kept; and those upper bounds by name."""
    from diffworld.tasks.tactile.build import TactileScene

    obj = task.objective
    bounds, material, contact = {}, {}, {}
    for k in ("E", "k_n", "k_t"):
        if k in obj.truth:
            scene_value = getattr(task.sensor.material, k) if k == "E" else getattr(task.contact, k)
            bounds[k] = _HEADROOM * max(obj.truth[k], obj.initial[k], scene_value)
            (material if k == "E" else contact)[k] = bounds[k]
    if task.integrator == "implicit" or task.dt is not None or not bounds:
        return task, bounds
    step_time = TactileScene(task, torch.float64, torch.device("cpu")).step_time
    sensor = task.sensor.model_copy(update={"material": task.sensor.material.model_copy(update=material)})
    probe = task.model_copy(update={"sensor": sensor, "contact": task.contact.model_copy(update=contact),
                                    "control_dt": None})
    dt = TactileScene(probe, torch.float64, torch.device("cpu")).dt
    sub = max(1, math.ceil(step_time / dt))
    return task.model_copy(update={"dt": step_time / sub, "control_dt": step_time}), bounds


class SystemIdentificationProblem(BaseProblem):
    """Recover gel (``E``, ``nu``) and contact (``k_n``, ``k_d``, ``k_t``, ``mu``) parameters
    from the scene's probe motion.

    The observations are simulated once on a finer sensor mesh (``refine``) with the ``truth``
    values: the total contact force in the sensor frame and the marker positions (sensor frame)
    at every control step, plus Gaussian noise of ``noise`` times each channel's RMS (seeded).
    The markers are the same physical dots on both meshes (attached by closest point). The
    loss is the mean squared force error over the force RMS squared plus ``marker_weight`` times
    the mean squared marker displacement error over the displacement RMS squared.
    """

    stage = "sysid"

    def __init__(self, scene: TactileScene, obj: SysIdConfig, seed: int = 0, bounds: dict | None = None) -> None:
        self.scene, self.obj = scene, obj
        self.upper = dict(bounds or {})  # upper bounds of fitted stiffnesses (see sysid_task)
        geo = scene.geometry
        rest = geo.mesh.vertices.to(scene.dtype)
        self.markers = Markers.sample(rest, geo.contact_faces, obj.markers, seed=seed)
        self.marker_rest = self.markers.positions(rest).detach()
        # the truth: its own material and contact values, its own stable dt for the finer mesh,
        # the same control steps
        t_mat, t_con = self._split(dict(obj.truth))
        task = scene.task
        sensor = task.sensor.model_copy(update={"material": task.sensor.material.model_copy(update=t_mat)})
        truth_task = task.model_copy(update={"sensor": sensor, "contact": task.contact.model_copy(update=t_con),
                                             "control_dt": scene.step_time,
                                             "dt": None if task.integrator == "explicit" else task.dt})
        truth_scene = TactileScene(truth_task, scene.dtype, scene.device, refine=obj.refine)
        trest = truth_scene.geometry.mesh.vertices.to(scene.dtype)
        truth_markers = Markers.from_points(trest, truth_scene.geometry.contact_faces, self.marker_rest)
        self.truth_info = {"nodes": truth_scene.model.n_nodes, "tets": truth_scene.model.n_tets,
                           "dt": truth_scene.dt, "substeps": truth_scene.substeps}
        with torch.no_grad():
            mat, con = self._split({k: torch.tensor(v, dtype=torch.float64) for k, v in obj.truth.items()})
            out = truth_scene.simulate(material=mat, contact=con)
            r = truth_scene.readings(out, contact=con, markers=truth_markers)
        g = torch.Generator().manual_seed(seed + 1)
        force, disp = r.force.detach(), (r.markers - self.marker_rest).detach()
        self.force_rms = float(force.square().mean().sqrt()) or 1.0
        self.disp_rms = float(disp.square().mean().sqrt()) or 1.0
        self.observed_force = force + obj.noise * self.force_rms * torch.randn(force.shape, generator=g,
                                                                               dtype=force.dtype)
        self.observed_disp = disp + obj.noise * self.disp_rms * torch.randn(disp.shape, generator=g, dtype=disp.dtype)
        self.observed_force[0] = 0.0  # the start is known exactly (rest, no contact)
        self.observed_disp[0] = 0.0
        self.raw = {k: torch.tensor(math.log(v) if k in _LOG else v, dtype=torch.float64, requires_grad=True)
                    for k, v in obj.initial.items()}

    @staticmethod
    def _split(values: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        mat = {k: v for k, v in values.items() if k in ("E", "nu")}
        con = {k: v for k, v in values.items() if k not in ("E", "nu")}
        return mat, con

    def values(self) -> dict[str, torch.Tensor]:
        """Current parameter values (scene units), differentiable in the optimizer's leaves."""
        return {k: torch.exp(v) if k in _LOG else v for k, v in self.raw.items()}

    def current(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.values().items()}

    def params(self) -> dict[str, torch.Tensor]:
        return self.raw

    def control(self) -> torch.Tensor:
        return self.scene.initial_velocities()

    def evaluate(self):
        mat, con = self._split(self.values())
        out = self.scene.simulate(material=mat, contact=con)
        r = self.scene.readings(out, contact=con, markers=self.markers)
        ef = ((r.force - self.observed_force) ** 2).mean() / self.force_rms ** 2
        em = ((r.markers - self.marker_rest - self.observed_disp) ** 2).mean() / self.disp_rms ** 2
        total = ef + self.obj.marker_weight * em
        return (out, r), total, {"force": ef.detach(), "markers": em.detach()}

    def loss_fn(self, _iteration: int):
        _, total, terms = self.evaluate()
        return total, terms

    def project(self) -> None:
        for k, (lo, hi) in _BOUNDS.items():
            if k in self.raw:
                self.raw[k].clamp_(lo, hi)
        for k, hi in self.upper.items():
            if k in self.raw:
                self.raw[k].clamp_(max=math.log(hi))

    def metrics(self, phase: str, total: torch.Tensor, terms: dict, result) -> dict:
        if phase == "initial":
            return {"initial": self.current(), "initial_loss": float(total), "truth_mesh": self.truth_info}
        found, truth = self.current(), dict(self.obj.truth)
        return {"recovered": found, "truth": truth, "final_loss": float(total),
                "relative_error": {k: abs(found[k] - truth[k]) / abs(truth[k]) if truth[k] else abs(found[k])
                                   for k in found}}

    def write(self, out_dir: Path) -> None:
        np.savez(out_dir / "observations.npz", force=self.observed_force.numpy(),
                 marker_displacement=self.observed_disp.numpy())


PROBLEMS = {"trajectory": TrajectoryProblem, "system_identification": SystemIdentificationProblem}
