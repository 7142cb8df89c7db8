"""The ``mpm`` scene task: bodies, colliders and an objective, optimized through the simulator.

Objectives:

* ``system_identification``: an observed trajectory is simulated with the ``truth`` parameters of
  one body; the parameters start from ``initial`` and are fitted to the observations (positions
  at every control step). Moduli are optimized in log space; bounds are enforced by projection.
* ``trajectory``: the velocities (linear and angular, per control step) of the ``controlled``
  colliders are optimized for a weighted sum of losses: ``com`` (centre of mass of a body vs a
  target), ``region`` (fraction of a body inside a box, soft), ``shape`` (particles inside a
  target shape and covering it). Speeds are clipped to ``max_speed`` (action clipping);
  ``optimizer.clip_grad_norm`` clips gradients.

A run writes ``trajectory.npz`` (positions per control step, body ids, collider states),
``before.png``/``after.png`` (particles coloured by body, colliders as meshes), ``rollout.gif``,
``metrics.json``, and the driver's ``log.csv``, ``loss.png`` and checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from diffworld.engine.scene.registry import TASKS
from diffworld.engine.scene.schema import StrictModel
from diffworld.geometry.reconstruction_task import _resolve_path

__all__ = ["MPMTask", "run_mpm"]

Vec3 = tuple[float, float, float]
BODY_COLORS = np.array([[0.20, 0.45, 0.85], [0.90, 0.55, 0.15], [0.30, 0.70, 0.35], [0.80, 0.25, 0.30],
                        [0.55, 0.40, 0.75], [0.50, 0.50, 0.50]])


def _resolve_optional(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    return None if value is None else _resolve_path(value, info)


# --- configuration --------------------------------------------------------------------------------

class ShapeConfig(StrictModel):
    """A solid region: analytic primitive or a watertight mesh file."""

    type: Literal["box", "sphere", "cylinder", "capsule", "mesh"]
    center: Vec3 = Field((0.5, 0.5, 0.5), description="Centre [m].")
    half_extents: Vec3 = Field((0.1, 0.1, 0.1), description="Box half extents [m].")
    radius: float = Field(0.1, gt=0, description="Sphere/cylinder/capsule radius [m].")
    half_height: float = Field(0.1, gt=0, description="Cylinder half height / capsule half segment [m] (z axis).")
    path: Optional[str] = Field(None, description="Mesh file (watertight), relative to the scene file.")
    scale: float = Field(1.0, gt=0, description="Mesh scale.")

    _path = field_validator("path")(_resolve_optional)

    @model_validator(mode="after")
    def _mesh_path(self):
        if self.type == "mesh" and self.path is None:
            raise ValueError("type 'mesh' needs 'path'")
        return self

    def build(self):
        """The SDF of the shape."""
        from diffworld.geometry import sdf

        c = self.center
        if self.type == "box":
            return sdf.Box(self.half_extents, c)
        if self.type == "sphere":
            return sdf.Sphere(self.radius, c)
        if self.type == "cylinder":
            return sdf.Cylinder(self.radius, self.half_height, c)
        if self.type == "capsule":
            a = (c[0], c[1], c[2] - self.half_height)
            b = (c[0], c[1], c[2] + self.half_height)
            return sdf.Capsule(a, b, self.radius)
        from diffworld.engine.io import load_mesh
        from diffworld.geometry.mesh_ops import mesh_report
        from diffworld.geometry.mesh_sdf import MeshSDF

        m = load_mesh(self.path)
        if not mesh_report(m.vertices, m.faces).watertight:
            raise ValueError(f"{self.path}: a filled body needs a watertight mesh (this one has open edges)")
        v = m.vertices.double()
        v = (v - (v.min(0).values + v.max(0).values) / 2) * self.scale + torch.tensor(c, dtype=torch.float64)
        return MeshSDF(v, m.faces)


class MaterialConfig(StrictModel):
    """A material by name with optional parameter overrides (see diffworld.sims.mpm.materials)."""

    name: str = Field(..., description="water, viscous, elastic, jelly, neo_hookean, snow, plasticine, sand.")
    E: Optional[float] = Field(None, gt=0, description="Young's modulus [Pa].")
    nu: Optional[float] = Field(None, gt=-1, lt=0.5, description="Poisson's ratio.")
    density: Optional[float] = Field(None, gt=0, description="[kg/m^3].")
    viscosity: Optional[float] = Field(None, ge=0, description="[Pa s].")
    yield_stress: Optional[float] = Field(None, gt=0, description="von Mises yield stress [Pa].")
    friction_angle: Optional[float] = Field(None, ge=0, lt=90, description="Drucker-Prager friction angle [deg].")
    theta_c: Optional[float] = Field(None, ge=0, lt=1)
    theta_s: Optional[float] = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from diffworld.sims.mpm.materials import MATERIALS

        if v not in MATERIALS:
            raise ValueError(f"unknown material {v!r}; expected one of {sorted(MATERIALS)}")
        return v

    def build(self):
        from diffworld.sims.mpm.materials import Material

        return Material(**self.model_dump())


class BodyConfig(StrictModel):
    name: str = "body"
    shape: ShapeConfig
    material: MaterialConfig
    velocity: Vec3 = (0.0, 0.0, 0.0)
    ppc: int = Field(8, ge=1, description="Particles per cell.")
    sampling: Literal["grid", "poisson"] = "grid"


class KeyframeConfig(StrictModel):
    t: float = Field(..., ge=0, description="Time [s].")
    position: Vec3
    rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Rotation vector [rad].")


class MotionConfig(StrictModel):
    """How a collider moves: at rest, through keyframes, or by per-step velocities (optimizable)."""

    type: Literal["static", "keyframes", "velocities"] = "static"
    position: Vec3 = (0.5, 0.5, 0.5)
    rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Rotation vector [rad].")
    keyframes: list[KeyframeConfig] = Field(default_factory=list)
    velocity: tuple[float, float, float, float, float, float] = Field(
        (0.0,) * 6, description="Initial per-step velocity (linear [m/s], angular [rad/s]) for type velocities.")

    @model_validator(mode="after")
    def _keys(self):
        if self.type == "keyframes" and not self.keyframes:
            raise ValueError("type 'keyframes' needs at least one entry in 'keyframes'")
        return self


class ColliderConfig(StrictModel):
    name: str = "collider"
    shape: Literal["sphere", "box", "capsule", "cylinder", "cup", "plane", "mesh"]
    size: Vec3 = Field((0.1, 0.1, 0.1), description="See diffworld.sims.mpm.Collider.size [m].")
    path: Optional[str] = Field(None, description="Mesh file for shape 'mesh' (voxelized to an SDF grid).")
    sdf_resolution: int = Field(64, ge=8, description="SDF grid resolution of a mesh collider.")
    friction: float = Field(0.5, ge=0)
    softness: float = Field(0.0, ge=0, description="Soft-contact sharpness [1/m]; 0 = hard.")
    sticky: bool = False
    motion: MotionConfig = MotionConfig()

    _path = field_validator("path")(_resolve_optional)


class DomainConfig(StrictModel):
    lower: Vec3 = (0.0, 0.0, 0.0)
    upper: Vec3 = (1.0, 1.0, 1.0)
    resolution: int = Field(32, ge=8, description="Cells along the longest side.")
    wall: Literal["slip", "sticky", "friction"] = "slip"
    wall_friction: float = Field(0.0, ge=0)


class LossTermConfig(StrictModel):
    type: Literal["com", "region", "shape"]
    body: str
    weight: float = Field(1.0, ge=0)
    target: Optional[Vec3] = Field(None, description="com: target centre of mass [m].")
    lower: Optional[Vec3] = Field(None, description="region: box lower corner [m].")
    upper: Optional[Vec3] = Field(None, description="region: box upper corner [m].")
    shape: Optional[ShapeConfig] = Field(None, description="shape: target shape.")

    @model_validator(mode="after")
    def _fields(self):
        need = {"com": ("target",), "region": ("lower", "upper"), "shape": ("shape",)}[self.type]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"loss type '{self.type}' needs {missing}")
        return self


class SystemIdentificationConfig(StrictModel):
    type: Literal["system_identification"]
    body: str
    truth: dict[str, float] = Field(..., description="Parameters that generate the observations.")
    initial: dict[str, float] = Field(..., description="Starting guess of the same parameters.")

    @model_validator(mode="after")
    def _names(self):
        ok = ("E", "nu", "viscosity", "yield_stress", "friction_angle", "density")
        for key in list(self.truth) + list(self.initial):
            if key not in ok:
                raise ValueError(f"unknown parameter {key!r}; expected one of {list(ok)}")
        if set(self.truth) != set(self.initial):
            raise ValueError(f"truth and initial must name the same parameters, got {sorted(self.truth)} and "
                             f"{sorted(self.initial)}")
        return self


class TrajectoryConfig(StrictModel):
    type: Literal["trajectory"]
    controlled: list[str] = Field(..., min_length=1, description="Colliders whose velocities are optimized.")
    losses: list[LossTermConfig] = Field(..., min_length=1)
    max_speed: float = Field(1.0, gt=0, description="Linear speed bound [m/s] (action clipping).")
    max_angular_speed: float = Field(3.0, ge=0, description="Angular speed bound [rad/s].")


ObjectiveConfig = Annotated[Union[SystemIdentificationConfig, TrajectoryConfig], Field(discriminator="type")]


class OutputsConfig(StrictModel):
    frames: int = Field(40, ge=2, description="Frames of the rollout movie.")
    movie: Literal["gif", "mp4", "none"] = "gif"


class MPMTask(StrictModel):
    """Simulate bodies and colliders with MLS-MPM and optimize an objective through the rollout."""

    type: Literal["mpm"]
    domain: DomainConfig = DomainConfig()
    dt: Optional[float] = Field(None, gt=0, description="Substep [s]; default: half the stability limit.")
    gravity: Vec3 = (0.0, 0.0, -9.81)
    substeps: int = Field(10, ge=1, description="Substeps per control step.")
    steps: int = Field(20, ge=1, description="Control steps (horizon).")
    window: int = Field(20, ge=1, description="Substeps per checkpoint window.")
    bodies: list[BodyConfig] = Field(..., min_length=1)
    colliders: list[ColliderConfig] = Field(default_factory=list)
    objective: ObjectiveConfig
    outputs: OutputsConfig = OutputsConfig()

    @model_validator(mode="after")
    def _references(self):
        bodies = [b.name for b in self.bodies]
        cols = [c.name for c in self.colliders]
        if len(set(bodies)) != len(bodies) or len(set(cols)) != len(cols):
            raise ValueError("body and collider names must be unique")
        obj = self.objective
        if obj.type == "system_identification" and obj.body not in bodies:
            raise ValueError(f"objective.body {obj.body!r} is not a body; expected one of {bodies}")
        if obj.type == "trajectory":
            for c in obj.controlled:
                if c not in cols:
                    raise ValueError(f"objective.controlled {c!r} is not a collider; expected one of {cols}")
            for term in obj.losses:
                if term.body not in bodies:
                    raise ValueError(f"objective.losses: body {term.body!r} is not a body; expected one of {bodies}")
        return self


# --- building ----------------------------------------------------------------------------------------

def _collider(cfg: ColliderConfig, dtype):
    from diffworld.sims.mpm.solver import Collider

    if cfg.shape != "mesh":
        return Collider(cfg.shape, cfg.size, cfg.friction, cfg.softness, cfg.sticky, name=cfg.name)
    from diffworld.engine.io import load_mesh
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
                    sdf_lower=tuple(lo.tolist()), sdf_spacing=h, name=cfg.name)


class _Scene:
    """The built simulation of an ``mpm`` task."""

    def __init__(self, task: MPMTask, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        from diffworld.sims import mpm

        self.task = task
        self.grid = mpm.GridSpec.make(task.domain.lower, task.domain.upper, task.domain.resolution)
        bodies = [mpm.Body(b.shape.build(), b.material.build(), b.velocity, b.name, b.sampling, b.ppc)
                  for b in task.bodies]
        colliders = [_collider(c, dtype) for c in task.colliders]
        # dt first from a provisional model (stable_dt needs the particles' materials).
        model, state = mpm.build_model(self.grid, bodies, dt=task.dt or 1.0, gravity=task.gravity,
                                       colliders=colliders, wall=task.domain.wall,
                                       wall_friction=task.domain.wall_friction, dtype=dtype, device=device, seed=seed)
        limit = mpm.stable_dt(model, cfl=1.0)
        if task.dt is None:
            model.dt = 0.5 * limit
        elif task.dt > limit:
            raise ValueError(f"task.dt: {task.dt:g} s is above the stability limit {limit:.3g} s of this scene "
                             f"(elastic wave speed and viscosity at dx = {self.grid.dx:.3g} m); use at most "
                             f"{0.5 * limit:.3g} s or a coarser grid")
        self.model, self.state = model, state
        self.stepper = mpm.Stepper(model)
        self.n_substeps = task.steps * task.substeps
        self.body_index = {b.name: i for i, b in enumerate(task.bodies)}

    def control(self, velocities: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Collider states (T, n_col, 13) with the given optimized velocities (S, 6) by name."""
        from diffworld.sims.mpm import colliders as C

        if not self.task.colliders:
            return None
        rows = []
        dtype = self.model.dtype
        for cfg in self.task.colliders:
            m = cfg.motion
            if cfg.name in velocities or m.type == "velocities":
                vel = velocities.get(cfg.name)
                if vel is None:
                    vel = torch.tensor(m.velocity, dtype=dtype).expand(self.task.steps, 6)
                rows.append(C.from_velocities(torch.tensor(m.position, dtype=dtype), torch.tensor(m.rotation, dtype=dtype),
                                              vel, self.task.substeps, self.model.dt))
            elif m.type == "keyframes":
                rows.append(C.from_keyframes([k.t for k in m.keyframes],
                                             torch.tensor([k.position for k in m.keyframes], dtype=dtype),
                                             torch.tensor([k.rotation for k in m.keyframes], dtype=dtype),
                                             self.n_substeps, self.model.dt))
            else:
                rows.append(C.static(m.position, m.rotation, self.n_substeps, dtype))
        return torch.stack(rows, 1).to(self.model.device)

    def simulate(self, control, params=None):
        from diffworld.sims import mpm

        return mpm.rollout(self.model, self.state, self.n_substeps, control, window=self.task.window,
                           record_every=self.task.substeps, params=params, stepper=self.stepper)

    def mask(self, body: str) -> torch.Tensor:
        return self.model.body == self.body_index[body]


def _loss_terms(scene: _Scene, states, terms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    final = states[-1].x
    out: dict[str, torch.Tensor] = {}
    total = final.new_zeros(())
    for i, term in enumerate(terms):
        x = final[scene.mask(term.body)]
        if term.type == "com":
            value = ((x.mean(0) - torch.tensor(term.target, dtype=x.dtype, device=x.device)) ** 2).sum()
        elif term.type == "region":
            lo = torch.tensor(term.lower, dtype=x.dtype, device=x.device)
            hi = torch.tensor(term.upper, dtype=x.dtype, device=x.device)
            tau = scene.grid.dx
            inside = (torch.sigmoid((x - lo) / tau) * torch.sigmoid((hi - x) / tau)).prod(1)
            value = 1.0 - inside.mean()
        else:
            sdf = term.shape.build().to(x.dtype)
            d = sdf(x)
            target = _shape_points(term.shape, scene, x.dtype)
            cover = torch.cdist(target, x).min(1).values.pow(2).mean()
            value = d.clamp_min(0).pow(2).mean() + cover
        name = f"{term.type}_{term.body}" if sum(t.type == term.type and t.body == term.body for t in terms) == 1 \
            else f"{term.type}_{term.body}_{i}"
        out[name] = value.detach()
        total = total + term.weight * value
    return total, out


_SHAPE_CACHE: dict[int, torch.Tensor] = {}


def _shape_points(cfg: ShapeConfig, scene: _Scene, dtype) -> torch.Tensor:
    from diffworld.sims.mpm.bodies import fill_shape

    key = id(cfg)
    if key not in _SHAPE_CACHE:
        _SHAPE_CACHE[key] = fill_shape(cfg.build().double(), scene.grid.lower, scene.grid.upper, scene.grid.dx)
    return _SHAPE_CACHE[key].to(dtype=dtype, device=scene.model.device)


# --- running -----------------------------------------------------------------------------------------

_LOG_PARAMS = ("E", "viscosity", "yield_stress", "density")


def run_mpm(scene_cfg, task: MPMTask, runtime, out_dir: Path, *, resume: bool = False, progress: bool = True,
            optimize: bool = True) -> dict:
    """Run an ``mpm`` scene; returns the metrics written to metrics.json."""
    from diffworld.engine.driver import OptimizerSettings
    from diffworld.engine.driver import optimize as run_optimizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(scene_cfg.seed)
    scene = _Scene(task, runtime.dtype, runtime.device, scene_cfg.seed)
    settings = OptimizerSettings(**{**scene_cfg.optimizer.model_dump(), "seed": scene_cfg.seed})
    obj = task.objective
    metrics: dict = {"particles": scene.model.n_particles, "dt": scene.model.dt, "substeps": scene.n_substeps,
                     "grid": list(scene.model.grid.shape)}
    t0 = time.perf_counter()

    if obj.type == "system_identification":
        mask = scene.mask(obj.body)
        dtype = scene.model.dtype

        def body_params(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in values.items():
                base = scene.model.params[k].detach()
                val = torch.exp(v) if k in _LOG_PARAMS else (torch.deg2rad(v) if k == "friction_angle" else v)
                out[k] = torch.where(mask, val.to(dtype), base)
            return out

        control = scene.control({})
        with torch.no_grad():
            truth = {k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v, dtype=torch.float64)
                     for k, v in obj.truth.items()}
            observed = [s.x.detach() for s in scene.simulate(control, body_params(truth)).states]
        raw = {k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v, dtype=torch.float64, requires_grad=True)
               for k, v in obj.initial.items()}
        bounds = {"nu": (-0.9, 0.45), "friction_angle": (1.0, 60.0)}

        def loss_fn(_it):
            states = scene.simulate(control, body_params(raw)).states
            err = sum(((s.x - o) ** 2).sum(1).mean() for s, o in zip(states[1:], observed[1:])) / (len(states) - 1)
            return err / scene.grid.dx ** 2, {}

        def project():
            for k, (lo, hi) in bounds.items():
                if k in raw:
                    raw[k].clamp_(lo, hi)

        def current() -> dict[str, float]:
            return {k: float(torch.exp(v.detach())) if k in _LOG_PARAMS else float(v.detach()) for k, v in raw.items()}

        metrics["initial"] = current()
        with torch.no_grad():
            metrics["initial_loss"] = float(loss_fn(0)[0])
        if optimize:
            run_optimizer(raw, loss_fn, settings, out_dir, stage="sysid", resume=resume, progress=progress,
                          projection=project)
        found = current()
        metrics["recovered"] = found
        metrics["truth"] = dict(obj.truth)
        metrics["relative_error"] = {k: abs(found[k] - obj.truth[k]) / abs(obj.truth[k]) for k in found}
        with torch.no_grad():
            metrics["final_loss"] = float(loss_fn(0)[0])
            before = scene.simulate(control, body_params({k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v,
                                                                             dtype=torch.float64)
                                                           for k, v in obj.initial.items()}))
            after = scene.simulate(control, body_params(raw))
    else:
        names = list(obj.controlled)
        vel = {n: torch.tensor(next(c.motion.velocity for c in task.colliders if c.name == n),
                               dtype=torch.float64).repeat(task.steps, 1).requires_grad_() for n in names}

        def loss_fn(_it):
            control = scene.control({n: v.to(scene.model.dtype) for n, v in vel.items()})
            return _loss_terms(scene, scene.simulate(control).states, obj.losses)

        def project():
            for v in vel.values():
                lin, ang = v[:, :3], v[:, 3:]
                speed = lin.norm(dim=1, keepdim=True).clamp_min(1e-12)
                lin.mul_(torch.clamp(obj.max_speed / speed, max=1.0))
                aspeed = ang.norm(dim=1, keepdim=True).clamp_min(1e-12)
                ang.mul_(torch.clamp(obj.max_angular_speed / aspeed, max=1.0))

        with torch.no_grad():
            control0 = scene.control({n: v.to(scene.model.dtype) for n, v in vel.items()})
            before = scene.simulate(control0)
            l0, terms0 = _loss_terms(scene, before.states, obj.losses)
        metrics["initial_loss"] = float(l0)
        metrics["initial_terms"] = {k: float(v) for k, v in terms0.items()}
        if optimize:
            run_optimizer({f"velocity_{n}": v for n, v in vel.items()}, loss_fn, settings, out_dir,
                          stage="trajectory", resume=resume, progress=progress, projection=project)
        with torch.no_grad():
            control = scene.control({n: v.to(scene.model.dtype) for n, v in vel.items()})
            after = scene.simulate(control)
            l1, terms1 = _loss_terms(scene, after.states, obj.losses)
        metrics["final_loss"] = float(l1)
        metrics["final_terms"] = {k: float(v) for k, v in terms1.items()}
        np.save(out_dir / "velocities.npy", {n: v.detach().numpy() for n, v in vel.items()}, allow_pickle=True)
    metrics["seconds"] = time.perf_counter() - t0
    _write_outputs(scene, before, after, out_dir, task,
                   scene.control({}) if obj.type == "system_identification" else control)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _write_outputs(scene: _Scene, before, after, out_dir: Path, task: MPMTask, control) -> None:
    from diffworld.engine.render import render_particles
    from diffworld.sims.mpm.colliders import collider_mesh

    pos = after.positions().detach().cpu().numpy()
    ids = scene.model.body.cpu().numpy()
    col_states = control.detach().cpu().numpy() if control is not None else np.zeros((0, 0, 13))
    np.savez_compressed(out_dir / "trajectory.npz", positions=pos, body=ids, substeps=np.array(after.substeps),
                        collider_states=col_states, dt=scene.model.dt, bodies=np.array(scene.model.body_names))
    colors = BODY_COLORS[ids % len(BODY_COLORS)]
    bounds = (scene.grid.lower, scene.grid.upper)

    def meshes(step: int):
        if control is None:
            return []
        t = min(step, control.shape[0] - 1)
        return [collider_mesh(c, control[t, i], plane_extent=0.5) for i, c in enumerate(scene.model.colliders)]

    last = after.substeps[-1]
    render_particles(out_dir / "before.png", [(before.final.x.detach().cpu(), colors)], meshes=[meshes(last)],
                     bounds=bounds, titles=["before optimization"])
    render_particles(out_dir / "after.png", [(after.final.x.detach().cpu(), colors)], meshes=[meshes(last)],
                     bounds=bounds, titles=["after optimization"])
    if task.outputs.movie != "none":
        idx = np.unique(np.linspace(0, len(after.states) - 1, task.outputs.frames).round().astype(int))
        frames = [(after.states[i].x.detach().cpu(), colors) for i in idx]
        render_particles(out_dir / f"rollout.{task.outputs.movie}", frames,
                         meshes=[meshes(after.substeps[i]) for i in idx], bounds=bounds, fps=10)


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    torch_threads = torch.get_num_threads()
    try:
        return run_mpm(scene, scene.task, runtime, out_dir, **kwargs)
    finally:
        torch.set_num_threads(torch_threads)


TASKS.register("mpm", MPMTask, _run)
