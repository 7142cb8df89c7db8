"""The ``mpm`` scene task: bodies, emitters, colliders and an objective, optimized through the simulator.

Emitters release particles over time (a pitcher, a dispenser; their nozzle may ride a
collider); losses and renders select them by name like bodies and count only the released ones.

Objectives:

* ``system_identification``: an observed trajectory is simulated with the ``truth`` parameters of
  one body; the parameters start from ``initial`` and are fitted to the observations (positions
  at every control step). Moduli are optimized in log space; bounds are enforced by projection.
* ``trajectory``: the velocities (linear and angular, per control step) of the ``controlled``
  colliders are optimized for a weighted sum of loss terms (:mod:`diffworld.sims.mpm.losses`):
  ``com`` (centre of mass of a body vs a target), ``region`` (fraction of a body inside a box,
  soft), ``shape`` (particles inside a target shape and covering it), ``density`` (PlasticineLab
  shape matching: grid mass vs a target shape, plus the distance outside it), ``chamfer`` (final
  particles vs points filling a target shape), ``target_trajectory`` (positions at every control
  step vs an .npz file), ``mixing`` (intensity of segregation of two bodies on the grid) and
  ``pattern`` (a body seen from above vs a target image: latte art) and ``python`` (a user
  function ``fn(states, info) -> scalar tensor``).
  Aids (FluidLab): action clipping (``max_speed``, ``max_angular_speed``), gradient clipping
  (``optimizer.clip_grad_norm``), ``freeze_steps`` (the first actions are not optimized), ``dofs``
  (only some velocity components are optimized), a ``workspace`` box for a collider's position,
  an initial guess from keyframes, and a ``horizon`` that starts short and grows when progress
  stalls (only the horizon is simulated).

A run writes ``trajectory.npz`` (positions per control step, body ids, collider states),
``before.png``/``after.png`` (particles coloured by body, liquids as a surface mesh, colliders as
meshes), ``rollout.gif``, ``metrics.json``, and the driver's ``log.csv``, ``loss.png`` and
checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, PrivateAttr, ValidationInfo, create_model, field_validator, model_validator

from diffworld.engine.config.registry import TASKS
from diffworld.engine.config.schema import StrictModel, scene_file
from diffworld.sims.common.colliders import SHAPES
from diffworld.sims.mpm.materials import MATERIALS, PARAMETER_DOCS, PARAMETERS, Material, parameter_problem
from diffworld.sims.common.quaternion import quat_to_rotvec

__all__ = ["HorizonSchedule", "MPMTask", "TrajectoryProblem", "run_mpm"]

Vec3 = tuple[float, float, float]
DOFS = ("vx", "vy", "vz", "wx", "wy", "wz")  # the components of a collider's per-step velocity
BODY_COLORS = np.array([[0.20, 0.45, 0.85], [0.90, 0.55, 0.15], [0.30, 0.70, 0.35], [0.80, 0.25, 0.30],
                        [0.55, 0.40, 0.75], [0.50, 0.50, 0.50]])


def _resolve_optional(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    return None if value is None else scene_file(value, info)


# --- configuration --------------------------------------------------------------------------------

class ShapeConfig(StrictModel):
    """A solid region: analytic primitive, a watertight mesh file, or CSG of other shapes.

    CSG: ``union`` and ``intersection`` of ``children`` (two or more), ``difference`` of the
    first child minus the others.
    """

    type: Literal["box", "sphere", "cylinder", "capsule", "mesh", "union", "intersection", "difference"]
    center: Vec3 = Field((0.5, 0.5, 0.5), description="Centre [m].")
    half_extents: Vec3 = Field((0.1, 0.1, 0.1), description="Box half extents [m].")
    radius: float = Field(0.1, gt=0, description="Sphere/cylinder/capsule radius [m].")
    half_height: float = Field(0.1, gt=0, description="Cylinder half height / capsule half segment [m] (z axis).")
    path: Optional[str] = Field(None, description="Mesh file (watertight), relative to the scene file.")
    scale: float = Field(1.0, gt=0, description="Mesh scale.")
    children: list["ShapeConfig"] = Field(default_factory=list, description="Operands of union, intersection, "
                                                                             "difference (two or more).")

    _path = field_validator("path")(_resolve_optional)

    @model_validator(mode="after")
    def _mesh_path(self):
        if self.type == "mesh" and self.path is None:
            raise ValueError("type 'mesh' needs 'path'")
        csg = self.type in ("union", "intersection", "difference")
        if csg and len(self.children) < 2:
            raise ValueError(f"type {self.type!r} needs two or more 'children', got {len(self.children)}")
        if not csg and self.children:
            raise ValueError(f"'children' belong to union, intersection or difference, not to type {self.type!r}")
        return self

    def build(self):
        """The SDF of the shape."""
        from diffworld.geometry import sdf

        if self.type in ("union", "intersection"):
            parts = [c.build() for c in self.children]
            return sdf.Union(*parts) if self.type == "union" else sdf.Intersection(*parts)
        if self.type == "difference":
            first, *rest = [c.build() for c in self.children]
            return sdf.Difference(first, rest[0] if len(rest) == 1 else sdf.Union(*rest))
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
        from diffworld.geometry.io import load_mesh
        from diffworld.geometry.mesh_ops import mesh_report
        from diffworld.geometry.mesh_sdf import MeshSDF

        m = load_mesh(self.path)
        if not mesh_report(m.vertices, m.faces).watertight:
            raise ValueError(f"{self.path}: a filled body needs a watertight mesh (this one has open edges)")
        v = m.vertices.double()
        v = (v - (v.min(0).values + v.max(0).values) / 2) * self.scale + torch.tensor(c, dtype=torch.float64)
        return MeshSDF(v, m.faces)


class _MaterialSection(StrictModel):
    """A material by name with optional parameter overrides (see diffworld.sims.mpm.materials)."""

    name: str = Field(..., description=f"One of: {', '.join(MATERIALS)}.")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MATERIALS:
            raise ValueError(f"unknown material {v!r}; expected one of {sorted(MATERIALS)}")
        return v

    @field_validator(*PARAMETERS, mode="before", check_fields=False)
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML's true/false would pass as 1/0
            raise ValueError("expected a number, got a boolean")
        return v

    @field_validator(*PARAMETERS, check_fields=False)
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        problem = None if v is None else parameter_problem(info.field_name, v)
        if problem:
            raise ValueError(problem)
        return v

    def build(self) -> Material:
        return Material(**self.model_dump())


# Generated from the material parameters (materials.PARAMETERS, PARAMETER_DOCS, PARAMETER_RANGES):
# one definition for the library's Material and the scene's material section.
MaterialConfig = create_model(
    "MaterialConfig", __base__=_MaterialSection,
    **{p: (Optional[float], Field(None, description=PARAMETER_DOCS[p] + " Default: the material's.")) for p in PARAMETERS},
)


class BodyConfig(StrictModel):
    name: str = "body"
    shape: ShapeConfig
    material: MaterialConfig
    velocity: Vec3 = (0.0, 0.0, 0.0)
    ppc: int = Field(8, ge=1, description="Particles per cell.")
    sampling: Literal["grid", "poisson"] = "grid"


class EmitterConfig(StrictModel):
    """A nozzle releasing a jet of one material between ``start`` and ``stop`` (a pitcher, a dispenser).

    Its particles are parked until released (see :mod:`diffworld.sims.mpm.emitters`); losses and
    renders select them by ``name`` like a body's, and count only the released ones.
    """

    name: str = "emitter"
    material: MaterialConfig
    center: Vec3 = Field(..., description="Nozzle exit centre [m]: world frame, or the collider's frame when "
                                          "'collider' is given.")
    direction: Vec3 = Field((0.0, 0.0, -1.0), description="Jet direction (normalized), same frame as 'center'.")
    radius: float = Field(0.02, gt=0, description="Nozzle radius [m].")
    speed: float = Field(0.5, gt=0, description="Jet speed [m/s].")
    start: float = Field(0.0, ge=0, description="Time the jet starts [s].")
    stop: float = Field(..., gt=0, description="Time the jet stops [s]; at most the end of the run.")
    ppc: int = Field(8, ge=1, description="Particles per cell of the jet.")
    collider: Optional[str] = Field(None, description="Collider carrying the nozzle (it moves with it); "
                                                      "default: a fixed nozzle.")

    @model_validator(mode="after")
    def _check(self):
        if self.start >= self.stop:
            raise ValueError(f"expected start < stop [s], got start={self.start}, stop={self.stop}")
        if sum(d * d for d in self.direction) < 1e-24:
            raise ValueError(f"direction: expected a non-zero vector, got {list(self.direction)}")
        return self

    def build(self):
        from diffworld.sims.mpm.emitters import Emitter

        return Emitter(self.material.build(), self.center, self.direction, self.radius, self.speed, self.start,
                       self.stop, self.ppc, self.collider, self.name)


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


# The colliders' shapes (a "grid" is what a scene's "mesh" becomes), so the two cannot drift.
COLLIDER_SHAPES = Literal[tuple(name for name in SHAPES if name != "grid") + ("mesh",)]


class ColliderConfig(StrictModel):
    name: str = "collider"
    shape: COLLIDER_SHAPES = Field(..., description="A kernel shape, or 'mesh' (a file voxelized to an SDF grid).")
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


class _LossTerm(StrictModel):
    weight: float = Field(1.0, ge=0, description="Weight of the term in the total loss.")


class ComLossConfig(_LossTerm):
    """Squared distance of a body's centre of mass to a target [m^2] (final state)."""

    type: Literal["com"]
    body: str
    target: Vec3 = Field(..., description="Target centre of mass [m].")
    axes: list[Literal["x", "y", "z"]] = Field(["x", "y", "z"], min_length=1,
                                               description="Axes that count (e.g. [x, y]: horizontal distance).")


class RegionLossConfig(_LossTerm):
    """One minus the soft fraction of a body inside a box (final state), in [0, 1]."""

    type: Literal["region"]
    body: str
    lower: Vec3 = Field(..., description="Box lower corner [m].")
    upper: Vec3 = Field(..., description="Box upper corner [m].")


class ShapeLossConfig(_LossTerm):
    """Particles inside a target shape and covering it [m^2] (final state)."""

    type: Literal["shape"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")


class DensityLossConfig(_LossTerm):
    """PlasticineLab shape matching (final state): grid mass vs a target filled with the body's mass.

    ``density_weight * sum|m - t| / sum t`` (L1; L2 with ``norm: l2``) plus ``sdf_weight`` times
    the mass-weighted distance outside the target in cells (see
    :func:`diffworld.sims.mpm.losses.shape_matching_loss`).
    """

    type: Literal["density"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")
    density_weight: float = Field(1.0, ge=0, description="Weight of the grid-mass difference (dimensionless).")
    sdf_weight: float = Field(1.0, ge=0, description="Weight of the distance outside the target [cells].")
    norm: Literal["l1", "l2"] = Field("l1", description="Norm of the grid-mass difference.")
    ppc: Optional[int] = Field(None, ge=1, description="Target sample points per cell; default: the body's ppc.")


class TargetTrajectoryLossConfig(_LossTerm):
    """Mean squared distance [m^2] of a body's particles to target positions at every control step."""

    type: Literal["target_trajectory"]
    body: str
    path: str = Field(..., description="A .npz file, relative to the scene file, holding the targets.")
    key: str = Field("x", description="Array of the .npz: shape (steps, N, 3) [m], row k = after control step k+1, "
                                      "particles in the body's order.")

    _path = field_validator("path")(scene_file)

    _targets: Optional[np.ndarray] = PrivateAttr(None)  # the array, read once at validation

    @model_validator(mode="after")
    def _array(self):
        self._targets = _npz_array(self.path, self.key)
        shape = self._targets.shape
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"{self.path}: array {self.key!r} has shape {shape}; expected (steps, N, 3)")
        return self


def _npz_array(path: str, key: str) -> np.ndarray:
    """Array ``key`` of an .npz file (ValueError naming the file and key otherwise)."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (np.savez), got a single array")
    with data:
        if key not in data.files:
            raise ValueError(f"{path}: no array {key!r} (key); the file holds {sorted(data.files)}")
        return data[key]


class ChamferLossConfig(_LossTerm):
    """Chamfer distance [m^2] between a body's particles (final state) and points filling a target shape."""

    type: Literal["chamfer"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")
    ppc: Optional[int] = Field(None, ge=1, description="Target points per cell; default: the body's ppc.")


class MixingLossConfig(_LossTerm):
    """How unmixed two bodies are (final state), from their grid masses: 1 segregated ... 0 mixed.

    See :func:`diffworld.sims.mpm.losses.mixing_loss` (``l2``: Danckwerts' intensity of
    segregation; ``l1``: its absolute-value form).
    """

    type: Literal["mixing"]
    bodies: tuple[str, str] = Field(..., description="The two bodies (A, B) to mix.")
    target: Optional[float] = Field(None, gt=0, lt=1, description="Target mass fraction of A per node; default: "
                                                                   "A's share of the two bodies' mass.")
    norm: Literal["l1", "l2"] = Field("l2", description="l2: intensity of segregation; l1: mean |fraction - target|.")

    @field_validator("bodies")
    @classmethod
    def _distinct(cls, v: tuple[str, str]) -> tuple[str, str]:
        if v[0] == v[1]:
            raise ValueError(f"expected two different bodies, got {list(v)}")
        return v


class PatternLossConfig(_LossTerm):
    """A body seen from above vs a target image (latte art), final state.

    The body's mass, projected along z, as a fraction per grid column vs the image laid on the
    rectangle ``lower..upper`` (top row at ``upper[1]``): ``density_weight * sum|p - t|`` (0 to 2)
    plus ``distance_weight`` times the mean distance of the mass from the pattern [cells] (see
    :func:`diffworld.sims.mpm.losses.pattern_loss`).
    """

    type: Literal["pattern"]
    body: str
    image: str = Field(..., description="Image file (PNG...), relative to the scene file; bright = pattern.")
    lower: tuple[float, float] = Field(..., description="Lower corner (x, y) of the image on the xy plane [m].")
    upper: tuple[float, float] = Field(..., description="Upper corner (x, y) [m].")
    density_weight: float = Field(1.0, ge=0, description="Weight of the L1 difference of the fractions.")
    distance_weight: float = Field(1.0, ge=0, description="Weight of the distance from the pattern [cells].")

    _image = field_validator("image")(scene_file)
    _pixels: Optional[np.ndarray] = PrivateAttr(None)  # the image, read once at validation

    @model_validator(mode="after")
    def _check(self):
        if not (self.lower[0] < self.upper[0] and self.lower[1] < self.upper[1]):
            raise ValueError(f"expected lower < upper in x and y, got lower={list(self.lower)}, "
                             f"upper={list(self.upper)}")
        self._pixels = _read_image(self.image)
        return self


def _read_image(path: str) -> np.ndarray:
    """Pixels of an image file (ValueError naming the file otherwise)."""
    import imageio.v3 as iio

    try:
        return np.asarray(iio.imread(path))
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


class PythonLossConfig(_LossTerm):
    """A user-written torch loss: ``fn(states, info) -> scalar tensor``.

    ``states``: recorded states (index 0 initial, then one per control step up to the horizon);
    ``info``: :class:`diffworld.sims.mpm.losses.SceneInfo` (masks, masses, grid, actions, options).
    """

    type: Literal["python"]
    function: str = Field(..., description="'package.module:callable' (importable) or 'file.py:callable' "
                                           "(relative to the scene file); imported, never evaluated.")
    body: Optional[str] = Field(None, description="Passed to the function as info.body.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the function as info.options.")

    @field_validator("function")
    @classmethod
    def _importable(cls, v: str, info: ValidationInfo) -> str:
        from diffworld.sims.mpm.losses import load_callable

        base = (info.context or {}).get("scene_dir")
        if isinstance(v, str) and v.count(":") == 1 and v.split(":")[0].endswith(".py"):
            file, attr = v.split(":")
            p = Path(file)
            if not p.is_absolute() and base is not None:
                v = f"{Path(base) / p}:{attr}"
        load_callable(v, base)
        return v


LossTermConfig = Annotated[Union[ComLossConfig, RegionLossConfig, ShapeLossConfig, DensityLossConfig,
                                 TargetTrajectoryLossConfig, ChamferLossConfig, MixingLossConfig, PatternLossConfig,
                                 PythonLossConfig],
                           Field(discriminator="type")]


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


class HorizonConfig(StrictModel):
    """A loss horizon that grows when progress stalls (FluidLab).

    The loss is evaluated on the first ``initial`` control steps (only they are simulated); when
    the relative improvement ``(L[i - patience] - L[i]) / |L[i - patience]|`` of the loss over the
    last ``patience`` iterations at the current horizon falls below ``tolerance``, the horizon
    grows by ``grow`` steps, up to ``task.steps``.
    """

    initial: int = Field(..., ge=1, description="Control steps of the first horizon.")
    grow: int = Field(..., ge=1, description="Control steps added when progress stalls.")
    patience: int = Field(5, ge=1, description="Iterations over which the improvement is measured.")
    tolerance: float = Field(0.01, ge=0, description="Relative improvement below which the horizon grows.")


class WorkspaceConfig(StrictModel):
    """A box for a collider's position (its origin) [m]; velocities are projected to stay inside."""

    lower: Vec3
    upper: Vec3

    @model_validator(mode="after")
    def _order(self):
        if any(a >= b for a, b in zip(self.lower, self.upper)):
            raise ValueError(f"expected lower < upper on every axis, got lower={list(self.lower)}, "
                             f"upper={list(self.upper)}")
        return self


class TrajectoryConfig(StrictModel):
    type: Literal["trajectory"]
    controlled: list[str] = Field(..., min_length=1, description="Colliders whose velocities are optimized.")
    losses: list[LossTermConfig] = Field(..., min_length=1)
    max_speed: float = Field(1.0, gt=0, description="Linear speed bound [m/s] (action clipping).")
    max_angular_speed: float = Field(3.0, ge=0, description="Angular speed bound [rad/s].")
    horizon: Optional[HorizonConfig] = Field(None, description="Growing loss horizon; default: every step.")
    freeze_steps: int = Field(0, ge=0, description="The first K actions keep their initial value (not optimized).")
    dofs: dict[str, list[Literal["vx", "vy", "vz", "wx", "wy", "wz"]]] = Field(
        default_factory=dict, description="Optimized velocity components per controlled collider (linear vx vy vz "
                                          "[m/s], angular wx wy wz [rad/s]); the others keep their initial value. "
                                          "Default: all six.")
    workspace: dict[str, WorkspaceConfig] = Field(
        default_factory=dict, description="Box that a controlled collider's position must stay in (per collider).")


ObjectiveConfig = Annotated[Union[SystemIdentificationConfig, TrajectoryConfig], Field(discriminator="type")]


class OutputsConfig(StrictModel):
    frames: int = Field(40, ge=2, description="Frames of the rollout movie.")
    movie: Literal["gif", "mp4", "none"] = "gif"
    liquid_surface: bool = Field(True, description="Draw liquid bodies (water, viscous) as a surface mesh in the "
                                                   "renders and the movie (particles outside it stay points).")
    surface_level: float = Field(0.5, gt=0, lt=1, description="Iso level of the liquid surface, a fraction of "
                                                              "the rest density.")
    camera: Union[Literal["iso", "front", "side", "top"], tuple[float, float]] = Field(
        "iso", description="View of the renders and the movie: iso, front, side, top, or [azimuth, elevation] "
                           "[deg].")


class MPMTask(StrictModel):
    """Simulate bodies and colliders with MLS-MPM and optimize an objective through the rollout."""

    type: Literal["mpm"]
    domain: DomainConfig = DomainConfig()
    dt: Optional[float] = Field(None, gt=0, description="Substep [s]; default: half the stability limit.")
    gravity: Vec3 = (0.0, 0.0, -9.81)
    substeps: int = Field(10, ge=1, description="Substeps per control step.")
    steps: int = Field(20, ge=1, description="Control steps (horizon).")
    window: int = Field(20, ge=1, description="Substeps per checkpoint window.")
    bodies: list[BodyConfig] = Field(default_factory=list, description="Bodies present from the start.")
    emitters: list[EmitterConfig] = Field(default_factory=list, description="Nozzles releasing particles over "
                                                                            "time; at least one body or emitter.")
    colliders: list[ColliderConfig] = Field(default_factory=list)
    objective: ObjectiveConfig
    outputs: OutputsConfig = OutputsConfig()

    @model_validator(mode="after")
    def _references(self):
        if not self.bodies and not self.emitters:
            raise ValueError("bodies: expected at least one body or emitter, got none")
        # Emitters are selected by name like bodies (losses, renders): one namespace.
        bodies = [b.name for b in self.bodies] + [e.name for e in self.emitters]
        cols = [c.name for c in self.colliders]
        if len(set(bodies)) != len(bodies) or len(set(cols)) != len(cols):
            raise ValueError(f"body and emitter names (one namespace) and collider names must be unique, got "
                             f"{bodies} and {cols}")
        for i, e in enumerate(self.emitters):
            if e.collider is not None and e.collider not in cols:
                raise ValueError(f"emitters[{i}].collider: {e.collider!r} is not a collider; expected one of {cols}")
        obj = self.objective
        if obj.type == "system_identification" and obj.body not in bodies[:len(self.bodies)]:
            raise ValueError(f"objective.body {obj.body!r} is not a body; expected one of "
                             f"{bodies[:len(self.bodies)]}")
        if obj.type == "trajectory":
            for c in obj.controlled:
                if c not in cols:
                    raise ValueError(f"objective.controlled {c!r} is not a collider; expected one of {cols}")
            for i, term in enumerate(obj.losses):
                if getattr(term, "body", None) is not None and term.body not in bodies:
                    raise ValueError(f"objective.losses[{i}].body: {term.body!r} is not a body; expected one of "
                                     f"{bodies}")
                for j, b in enumerate(getattr(term, "bodies", ())):
                    if b not in bodies:
                        raise ValueError(f"objective.losses[{i}].bodies[{j}]: {b!r} is not a body; expected one of "
                                         f"{bodies}")
                if term.type == "target_trajectory":
                    if term.body not in bodies[:len(self.bodies)]:
                        raise ValueError(f"objective.losses[{i}].body: {term.body!r} is an emitter; a target "
                                         f"trajectory needs a body present from the start")
                    shape = term._targets.shape
                    if shape[0] != self.steps:
                        raise ValueError(f"objective.losses[{i}].path: {term.path} holds {term.key!r} of shape "
                                         f"{shape}; expected ({self.steps}, N, 3): one row per control step "
                                         f"(task.steps = {self.steps})")
            if obj.horizon is not None and obj.horizon.initial > self.steps:
                raise ValueError(f"objective.horizon.initial: {obj.horizon.initial} is more than task.steps "
                                 f"({self.steps}); expected 1..{self.steps}")
            for name, comps in obj.dofs.items():
                if name not in obj.controlled:
                    raise ValueError(f"objective.dofs: {name!r} is not a controlled collider; expected one of "
                                     f"{obj.controlled}")
                if not comps:
                    raise ValueError(f"objective.dofs.{name}: expected at least one of vx vy vz wx wy wz (leave the "
                                     f"collider out of 'controlled' to keep its motion fixed)")
            motion = {c.name: c.motion for c in self.colliders}
            for name, box in obj.workspace.items():
                if name not in obj.controlled:
                    raise ValueError(f"objective.workspace: {name!r} is not a controlled collider; expected one of "
                                     f"{obj.controlled}")
                m = motion[name]
                pos = m.keyframes[0].position if m.type == "keyframes" else m.position
                if any(not lo <= p <= hi for p, lo, hi in zip(pos, box.lower, box.upper)):
                    raise ValueError(f"objective.workspace.{name}: the collider starts at {list(pos)}, outside the box "
                                     f"{list(box.lower)}..{list(box.upper)}")
            if obj.freeze_steps >= self.steps:
                raise ValueError(f"objective.freeze_steps: {obj.freeze_steps} freezes every action "
                                 f"(task.steps = {self.steps}); expected 0..{self.steps - 1}")
        return self


# --- building ----------------------------------------------------------------------------------------

def _collider(cfg: ColliderConfig, dtype):
    from diffworld.sims.common.colliders import Collider

    if cfg.shape != "mesh":
        return Collider(cfg.shape, cfg.size, cfg.friction, cfg.softness, cfg.sticky, name=cfg.name)
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
        emitters = [e.build() for e in task.emitters]

        def build(dt: float):
            return mpm.build_model(self.grid, bodies, dt=dt, gravity=task.gravity, colliders=colliders,
                                   wall=task.domain.wall, wall_friction=task.domain.wall_friction, dtype=dtype,
                                   device=device, seed=seed, emitters=emitters)

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


def _term_names(terms) -> list[str]:
    """Log names of the loss terms: ``type_body`` (``python_<callable>``, ``mixing_<a>_<b>``), indexed when not
    unique."""

    def key(t):
        if t.type == "python":
            return t.function.rsplit(":", 1)[1]
        return "_".join(t.bodies) if t.type == "mixing" else t.body

    keys = [(t.type, key(t)) for t in terms]
    return [f"{k[0]}_{k[1]}" if keys.count(k) == 1 else f"{k[0]}_{k[1]}_{i}" for i, k in enumerate(keys)]


class _Losses:
    """The loss terms of a ``trajectory`` objective, with their targets prepared once.

    Final-state terms (``com``, ``region``, ``shape``, ``density``, ``chamfer``, ``mixing``) read the last
    recorded state (the state at the current horizon); ``target_trajectory`` reads every recorded
    state up to it; ``python`` terms get all of them.
    """

    def __init__(self, scene: _Scene, terms) -> None:
        from diffworld.sims.mpm import losses

        self.scene, self.terms, self.names = scene, list(terms), _term_names(terms)
        dtype, device, grid = scene.model.dtype, scene.model.device, scene.grid
        self.mass = scene.masses()
        self.masks = {name: scene.mask(name) for name in scene.body_index}
        body_cfg = {b.name: b for b in [*scene.task.bodies, *scene.task.emitters]}  # (ppc)
        self.prepared: list = []
        for i, term in enumerate(self.terms):
            key = f"task.objective.losses[{i}]"
            if term.type == "com":
                prep = torch.tensor(term.target, dtype=dtype, device=device)
            elif term.type == "region":
                prep = (term.lower, term.upper)
            elif term.type == "shape":
                sdf = term.shape.build()
                points = losses.sample_shape(sdf, grid.lower, grid.upper, grid.dx)
                prep = (sdf.to(dtype) if isinstance(sdf, torch.nn.Module) else sdf, points.to(device, dtype))
            elif term.type == "density":
                total = float(self.mass[self.masks[term.body]].double().sum())
                try:
                    prep = losses.target_grids(term.shape.build(), total, grid.lower, grid.dx, grid.shape,
                                          ppc=term.ppc or body_cfg[term.body].ppc, dtype=dtype, device=device)
                except ValueError as exc:
                    raise ValueError(f"{key}.shape: {exc}") from None
            elif term.type == "chamfer":
                ppc = term.ppc or body_cfg[term.body].ppc
                points = losses.sample_shape(term.shape.build(), grid.lower, grid.upper, grid.dx / ppc ** (1.0 / 3.0))
                if points.shape[0] == 0:
                    raise ValueError(f"{key}.shape: the target shape holds no point inside the domain")
                prep = points.to(device, dtype)
            elif term.type == "target_trajectory":
                arr = term._targets
                n = int(self.masks[term.body].sum())
                want = (scene.task.steps, n, 3)
                if tuple(arr.shape) != want:
                    raise ValueError(f"{key}.path: {term.path} holds {term.key!r} of shape {tuple(arr.shape)}; "
                                     f"expected {want}: {scene.task.steps} control steps (task.steps) and the {n} "
                                     f"particles of body {term.body!r}")
                prep = torch.from_numpy(np.ascontiguousarray(arr)).to(device, dtype)
            elif term.type == "mixing":
                prep = None
            elif term.type == "pattern":
                try:
                    prep = losses.pattern_target(term._pixels, term.lower, term.upper, grid.lower, grid.dx,
                                            grid.shape, dtype=dtype, device=device)
                except ValueError as exc:
                    raise ValueError(f"{key}.image: {exc}") from None
            else:
                try:
                    prep = losses.load_callable(term.function)
                except ValueError as exc:
                    raise ValueError(f"{key}.function: {exc}") from None
            self.prepared.append(prep)

    def __call__(self, states, actions: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms (detached) of the recorded ``states``."""
        from diffworld.sims.mpm import losses

        scene, grid = self.scene, self.scene.grid
        horizon = len(states) - 1
        final = states[-1].x
        # Emitted particles count from their release on (parked ones sit at the nozzle).
        masks = self.masks
        if scene.model.emitted is not None:
            active = scene.model.released_mask(horizon * scene.task.substeps)
            masks = {k: m & active for k, m in masks.items()}
        out: dict[str, torch.Tensor] = {}
        total = final.new_zeros(())
        for i, (term, name, prep) in enumerate(zip(self.terms, self.names, self.prepared)):
            body = getattr(term, "body", None)
            mask = masks.get(body) if body is not None else None
            x = final[mask] if mask is not None else final
            if term.type == "com":
                value = losses.com_loss(x, prep, ["xyz".index(a) for a in term.axes])
            elif term.type == "region":
                value = losses.region_loss(x, prep[0], prep[1], grid.dx)
            elif term.type == "shape":
                value = losses.shape_cover_loss(x, prep[0], prep[1])
            elif term.type == "density":
                value = losses.shape_matching_loss(x, self.mass[mask], prep.density, prep.sdf, grid.lower, grid.dx,
                                              density_weight=term.density_weight, sdf_weight=term.sdf_weight,
                                              norm=term.norm).loss
            elif term.type == "chamfer":
                value = losses.chamfer_distance(x, prep)
            elif term.type == "pattern":
                value = losses.pattern_loss(x, self.mass[mask], prep, grid.lower, grid.dx,
                                       density_weight=term.density_weight, distance_weight=term.distance_weight).loss
            elif term.type == "mixing":
                ma, mb = (masks[b] for b in term.bodies)
                value = losses.mixing_loss(final[ma], self.mass[ma], final[mb], self.mass[mb], grid.lower, grid.dx,
                                      grid.shape, target=term.target, norm=term.norm)
            elif term.type == "target_trajectory":
                value = losses.trajectory_loss([s.x[mask] for s in states[1:]], prep[:horizon]) if horizon else \
                    final.sum() * 0.0
            else:
                info = losses.SceneInfo(model=scene.model, masks=masks, mass=self.mass, grid_lower=grid.lower,
                                   dx=grid.dx, grid_shape=grid.shape, dt=scene.model.dt, substeps=scene.task.substeps,
                                   steps=horizon, total_steps=scene.task.steps, actions=dict(actions or {}),
                                   body=term.body, options=dict(term.options))
                value = losses.call_user_loss(prep, states, info, f"task.objective.losses[{i}] ({term.function})")
            out[name] = value.detach()
            total = total + term.weight * value.to(total.dtype)
        return total, out


class HorizonSchedule:
    """A loss horizon (in control steps) that grows when the loss stops improving (FluidLab).

    Feed the loss of every iteration to :meth:`update`; it returns the horizon of the next one.
    The losses are compared only at the same horizon: after ``patience + 1`` iterations at a
    horizon, if ``(L[i - patience] - L[i]) / |L[i - patience]| < tolerance`` the horizon grows by
    ``grow`` steps (at most ``total``) and the comparison restarts.

    Args:
        initial: First horizon (>= 1; clipped to ``total``).
        grow: Steps added at a stall (>= 1).
        patience: Iterations over which the improvement is measured (>= 1).
        tolerance: Relative improvement below which the horizon grows (>= 0).
        total: Largest horizon (the task's control steps).

    Attributes:
        horizon: The horizon of the next iteration.
        history: The horizon used at each iteration fed so far.
    """

    def __init__(self, initial: int, grow: int, patience: int, tolerance: float, total: int) -> None:
        for name, v in (("initial", initial), ("grow", grow), ("patience", patience), ("total", total)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HorizonSchedule.{name}: expected an int >= 1, got {v!r}")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"HorizonSchedule.tolerance: expected a finite number >= 0, got {tolerance!r}")
        self.grow, self.patience, self.tolerance, self.total = grow, patience, float(tolerance), total
        self.horizon = min(initial, total)
        self.history: list[int] = []
        self._losses: list[float] = []

    def update(self, loss: float) -> int:
        """Record the loss of the iteration just run (at :attr:`horizon`); return the next horizon."""
        self.history.append(self.horizon)
        self._losses.append(float(loss))
        if self.horizon < self.total and len(self._losses) > self.patience:
            ref, cur = self._losses[-1 - self.patience], self._losses[-1]
            if (ref - cur) / max(abs(ref), 1e-30) < self.tolerance:
                self.horizon = min(self.horizon + self.grow, self.total)
                self._losses = []
        return self.horizon


class TrajectoryProblem:
    """The optimization problem of a ``trajectory`` objective: parameters, loss, projection, horizon.

    Parameters are the per-control-step velocities of the controlled colliders, float64 leaves of
    shape (steps, 6) (linear [m/s], angular [rad/s]). Aids:

    * action clipping (``max_speed``, ``max_angular_speed``): :meth:`project` after every step,
      and once on the initial guess;
    * ``freeze_steps``: the first K rows get a zero gradient (a hook, so gradient clipping does
      not see them) and :meth:`project` restores their initial value;
    * ``dofs``: the velocity components of a collider that are not listed get a zero gradient
      (the same hook) and keep their initial value; action clipping then scales only the
      optimized components (the fixed ones are never changed after the initial clipping);
    * ``workspace``: after clipping, each step's free linear components are scaled down where
      the collider would leave its box (:meth:`_keep_in_workspace`), once on the initial guess
      too;
    * ``horizon``: :meth:`loss_fn` simulates and scores only the first :attr:`horizon` steps;
      :meth:`callback` (the driver's per-iteration callback) grows it (:class:`HorizonSchedule`).
    Gradient clipping is the driver's (``optimizer.clip_grad_norm`` / ``clip_grad_value``).
    """

    def __init__(self, scene: _Scene, obj: TrajectoryConfig) -> None:
        task = scene.task
        self.scene, self.obj = scene, obj
        self.losses = _Losses(scene, obj.losses)
        cfgs = {c.name: c for c in task.colliders}
        start = {n: scene.initial_motion(cfgs[n]) for n in obj.controlled}
        self.velocities = {n: start[n][2].clone().requires_grad_() for n in obj.controlled}
        # 1 where a velocity component is optimized (objective.dofs; default all six).
        self.free = {n: torch.tensor([c in obj.dofs.get(n, DOFS) for c in DOFS], dtype=torch.bool)
                     for n in obj.controlled}
        k = obj.freeze_steps
        for n, v in self.velocities.items():
            if k or not bool(self.free[n].all()):
                keep = self.free[n].to(torch.float64).expand(task.steps, 6).clone()
                keep[:k] = 0.0
                v.register_hook(lambda g, keep=keep: g * keep)
        self.start = {n: start[n][0] for n in obj.controlled}  # start positions [m]
        self.step_time = task.substeps * scene.model.dt  # [s] per control step
        with torch.no_grad():
            self._clip()
            self._keep_in_workspace()
        self.initial = {n: v.detach().clone() for n, v in self.velocities.items()}
        h = obj.horizon
        self.schedule = HorizonSchedule(h.initial, h.grow, h.patience, h.tolerance, task.steps) if h else None

    @property
    def horizon(self) -> int:
        """Control steps simulated and scored by :meth:`loss_fn` now."""
        return self.schedule.horizon if self.schedule is not None else self.scene.task.steps

    def params(self) -> dict[str, torch.Tensor]:
        """The optimized tensors by log name (``velocity_<collider>``)."""
        return {f"velocity_{n}": v for n, v in self.velocities.items()}

    def control(self) -> torch.Tensor | None:
        return self.scene.control({n: v.to(self.scene.model.dtype) for n, v in self.velocities.items()})

    def evaluate(self, steps: int | None = None):
        """(rollout, total loss, terms) over the first ``steps`` control steps (default: all)."""
        out = self.scene.simulate(self.control(), steps=steps)
        total, terms = self.losses(out.states, self.velocities)
        return out, total, terms

    def loss_fn(self, _iteration: int) -> tuple[torch.Tensor, dict]:
        """The driver's loss function: the loss at the current horizon (logged as term ``horizon``)."""
        _, total, terms = self.evaluate(self.horizon)
        if self.schedule is not None:
            terms = {**terms, "horizon": float(self.horizon)}
        return total, terms

    def _clip(self, free: dict[str, torch.Tensor] | None = None) -> None:
        """Scale each row's linear and angular velocity down to the speed bounds.

        With ``free`` (a bool mask (6,) per collider) only the free components are scaled, by the
        largest factor in [0, 1] that brings the whole vector within the bound (the fixed part is
        within it already: it kept its initially clipped value).
        """
        obj = self.obj
        for n, v in self.velocities.items():
            for part, bound in ((slice(0, 3), obj.max_speed), (slice(3, 6), obj.max_angular_speed)):
                u = v[:, part]
                m = free[n][part].to(u.dtype) if free is not None else torch.ones(3, dtype=u.dtype)
                p, f = u * m, u * (1 - m)
                pp, fp, ff = (p * p).sum(1), (f * p).sum(1), (f * f).sum(1)
                # largest s with |f + s p| <= bound: the positive root of pp s^2 + 2 fp s + ff - bound^2
                disc = (fp * fp - pp * (ff - bound * bound)).clamp_min(0.0)
                s = ((torch.sqrt(disc) - fp) / pp.clamp_min(1e-24)).clamp(0.0, 1.0)
                s = torch.where((ff + 2 * fp + pp) > bound * bound, s, torch.ones_like(s))
                u.copy_(f + s[:, None] * p)

    def _keep_in_workspace(self, free: dict[str, torch.Tensor] | None = None) -> None:
        """Scale down linear velocities step by step so that the position stays in the workspace box.

        The position after step k is ``p_k = p_{k-1} + v_k * step_time``; where it would leave the
        box, the free components of ``v_k`` (all three without ``free``) are scaled by the largest
        factor in [0, 1] that keeps it inside. Frozen rows are left as they are.
        """
        k0 = self.obj.freeze_steps if free is not None else 0
        for n, box in self.obj.workspace.items():
            v = self.velocities[n]
            lo = torch.tensor(box.lower, dtype=v.dtype)
            hi = torch.tensor(box.upper, dtype=v.dtype)
            m = free[n][:3].to(v.dtype) if free is not None else torch.ones(3, dtype=v.dtype)
            p = self.start[n].to(v.dtype)
            for k in range(v.shape[0]):
                step = v[k, :3] * self.step_time
                if k >= k0:
                    fixed, moving = step * (1 - m), step * m
                    base = p + fixed
                    # largest s in [0, 1] with lo <= base + s * moving <= hi on every axis
                    room = torch.where(moving > 0, (hi - base) / moving.clamp_min(1e-30),
                                       torch.where(moving < 0, (lo - base) / moving.clamp_max(-1e-30),
                                                   torch.full_like(base, math.inf)))
                    s = float(room.clamp(0.0, 1.0).min())
                    if s < 1.0:
                        v[k, :3] = (fixed + s * moving) / self.step_time
                        step = v[k, :3] * self.step_time
                p = p + step

    def project(self) -> None:
        """Fixed components (``dofs``) back to their initial values, action clipping of the free ones,
        the workspace, then the frozen rows back to their initial values (under no_grad)."""
        for n, v in self.velocities.items():
            if not bool(self.free[n].all()):
                v.copy_(torch.where(self.free[n], v, self.initial[n]))
        self._clip(self.free)
        self._keep_in_workspace(self.free)
        k = self.obj.freeze_steps
        if k:
            for n, v in self.velocities.items():
                v[:k] = self.initial[n][:k]

    def callback(self, _iteration: int, row: dict) -> None:
        """Feed the iteration's loss to the horizon schedule."""
        if self.schedule is not None:
            self.schedule.update(row["loss"])

    def replay(self, checkpoint: Path) -> None:
        """Rebuild the horizon schedule from a driver checkpoint's history (for ``--resume``)."""
        if self.schedule is None or not checkpoint.is_file():
            return
        try:
            history = torch.load(checkpoint, map_location="cpu", weights_only=True)["history"]
        except Exception:  # noqa: BLE001 - the driver reports unreadable checkpoints itself
            return
        for row in history:
            self.schedule.update(row["loss"])


# --- running -----------------------------------------------------------------------------------------

_LOG_PARAMS = ("E", "viscosity", "yield_stress", "density")


def run_mpm(scene_cfg, task: MPMTask, runtime, out_dir: Path, *, resume: bool = False, progress: bool = True,
            optimize: bool = True) -> dict:
    """Run an ``mpm`` scene; returns the metrics written to metrics.json."""
    from diffworld.engine.driver import optimize as run_optimizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(scene_cfg.seed)
    scene = _Scene(task, runtime.dtype, runtime.device, scene_cfg.seed)
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
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

        def optimizer_values(values: dict[str, float], grad: bool = False) -> dict[str, torch.Tensor]:
            """Parameter values as the optimizer sees them (moduli in log space)."""
            return {k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v, dtype=torch.float64, requires_grad=grad)
                    for k, v in values.items()}

        control = scene.control({})
        with torch.no_grad():
            observed = [s.x.detach() for s in scene.simulate(control, body_params(optimizer_values(obj.truth))).states]
        raw = optimizer_values(obj.initial, grad=True)
        bounds = {"nu": (-0.9, 0.45), "friction_angle": (1.0, 60.0)}

        def error(states) -> torch.Tensor:
            err = sum(((s.x - o) ** 2).sum(1).mean() for s, o in zip(states[1:], observed[1:])) / (len(states) - 1)
            return err / scene.grid.dx ** 2

        def loss_fn(_it):
            return error(scene.simulate(control, body_params(raw)).states), {}

        def project():
            for k, (lo, hi) in bounds.items():
                if k in raw:
                    raw[k].clamp_(lo, hi)

        def current() -> dict[str, float]:
            return {k: float(torch.exp(v.detach())) if k in _LOG_PARAMS else float(v.detach()) for k, v in raw.items()}

        metrics["initial"] = current()
        with torch.no_grad():
            before = scene.simulate(control, body_params(raw))
            metrics["initial_loss"] = float(error(before.states))
        if optimize:
            run_optimizer(raw, loss_fn, settings, out_dir, stage="sysid", resume=resume, progress=progress,
                          projection=project)
        found = current()
        metrics["recovered"] = found
        metrics["truth"] = dict(obj.truth)
        metrics["relative_error"] = {k: abs(found[k] - obj.truth[k]) / abs(obj.truth[k]) for k in found}
        with torch.no_grad():
            after = scene.simulate(control, body_params(raw))
            metrics["final_loss"] = float(error(after.states))
    else:
        problem = TrajectoryProblem(scene, obj)
        vel = problem.velocities
        with torch.no_grad():
            before, l0, terms0 = problem.evaluate()
            control_before = problem.control()
        metrics["initial_loss"] = float(l0)
        metrics["initial_terms"] = {k: float(v) for k, v in terms0.items()}
        if optimize:
            if resume:
                problem.replay(out_dir / "checkpoints" / "trajectory.pt")
            run_optimizer(problem.params(), problem.loss_fn, settings, out_dir, stage="trajectory", resume=resume,
                          progress=progress, projection=problem.project, callback=problem.callback)
        if problem.schedule is not None:
            metrics["horizon_schedule"] = list(problem.schedule.history)
            metrics["final_horizon"] = problem.horizon
        with torch.no_grad():
            control = problem.control()
            after, l1, terms1 = problem.evaluate()
        metrics["final_loss"] = float(l1)
        metrics["final_terms"] = {k: float(v) for k, v in terms1.items()}
        metrics["pattern_images"] = _write_patterns(problem.losses, before, after, out_dir)
        np.save(out_dir / "velocities.npy", {n: v.detach().numpy() for n, v in vel.items()}, allow_pickle=True)
    metrics["seconds"] = time.perf_counter() - t0
    if obj.type == "system_identification":
        control_before = control
    metrics["liquid_surface"] = _write_outputs(scene, before, after, out_dir, task, control, control_before)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _liquid_bodies(task: MPMTask) -> list[int]:
    """Ids of the bodies and emitters (in that order) whose material is a liquid (law ``fluid``)."""
    from diffworld.sims.mpm.materials import MATERIALS

    return [i for i, b in enumerate([*task.bodies, *task.emitters]) if MATERIALS[b.material.name][0] == "fluid"]


class _SurfaceDrawer:
    """Liquid surfaces for the pictures of a run (``outputs.liquid_surface``); never raises.

    :meth:`frame` returns what to draw for one state: the points (liquid particles under the
    surface left out), their colours, and the surface meshes. Any failure (or an empty surface)
    falls back to drawing the particles; the first failure is reported once as a warning and
    counted in :attr:`report` (written to metrics.json).
    """

    def __init__(self, scene: _Scene, task: MPMTask, colors: np.ndarray) -> None:
        self.scene, self.colors = scene, colors
        ids = scene.model.body.detach().cpu()
        liquid = _liquid_bodies(task) if task.outputs.liquid_surface else []
        self.level = task.outputs.surface_level
        self.mask = torch.zeros_like(ids, dtype=torch.bool)
        for b in liquid:
            self.mask |= ids == b
        lut = torch.full((len(task.bodies) + len(task.emitters),), -1, dtype=torch.int64)
        lut[liquid] = torch.arange(len(liquid))
        self.group = lut[ids[self.mask].long()]  # liquid body number 0..G-1 of each liquid particle
        self.group_colors = BODY_COLORS[np.array(liquid, dtype=np.int64) % len(BODY_COLORS)].reshape(-1, 3)
        self.volume = scene.model.params["volume"].detach().cpu()[self.mask] if liquid else None
        self.report = {"enabled": bool(liquid), "frames": 0, "with_surface": 0, "fallback": 0, "error": None}

    def frame(self, x: torch.Tensor, substep: int):
        """Points, colours and surface meshes of the state after ``substep`` substeps (parked particles
        hidden)."""
        x = x.detach().cpu()
        self.report["frames"] += 1
        active = self.scene.model.released_mask(substep).cpu()
        if not self.report["enabled"]:
            return x[active], self.colors[active.numpy()], []
        liquid = self.mask & active
        try:
            from diffworld.sims.mpm.surface import liquid_surface

            g = self.scene.grid
            sel = active[self.mask]  # released ones among the liquid particles
            surf = liquid_surface(x[liquid], self.volume[sel], self.group[sel], self.group_colors, g.lower, g.dx,
                                  g.shape, level=self.level)
        except Exception as exc:  # noqa: BLE001 - a picture must never stop a run
            if self.report["error"] is None:
                import warnings

                self.report["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"liquid surface failed ({self.report['error']}); drawing the particles instead",
                              RuntimeWarning, stacklevel=2)
            self.report["fallback"] += 1
            return x[active], self.colors[active.numpy()], []
        if surf.faces.shape[0] == 0:
            self.report["fallback"] += 1
            return x[active], self.colors[active.numpy()], []
        self.report["with_surface"] += 1
        keep = active.clone()
        keep[torch.nonzero(liquid).reshape(-1)[torch.from_numpy(surf.covered)]] = False
        return x[keep], self.colors[keep.numpy()], [(surf.vertices, surf.faces, surf.colors)]


def _write_patterns(losses: _Losses, before, after, out_dir: Path) -> list[str]:
    """For each ``pattern`` loss term: ``pattern_<body>.png``, the target next to the body seen from
    above before and after optimization (fraction of the mass per grid column). Returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.sims.mpm.losses import top_view_fraction

    scene, names = losses.scene, []
    g = scene.grid
    extent = (g.lower[0], g.lower[0] + g.dx * (g.shape[0] - 1), g.lower[1], g.lower[1] + g.dx * (g.shape[1] - 1))
    for term, prep in zip(losses.terms, losses.prepared):
        if term.type != "pattern":
            continue
        views = [("target", prep.fraction)]
        for label, out in (("before", before), ("after", after)):
            live = losses.masks[term.body] & scene.model.released_mask(out.substeps[-1])
            with torch.no_grad():
                views.append((label, top_view_fraction(out.final.x[live], losses.mass[live], g.lower, g.dx,
                                                         prep.fraction.shape)))
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
        vmax = max(float(v.max()) for _, v in views)
        for ax, (label, v) in zip(axes, views):
            ax.imshow(v.detach().cpu().numpy().T, origin="lower", extent=extent, cmap="copper", vmin=0, vmax=vmax)
            ax.set_title(f"{term.body}: {label}")
            ax.set_xlabel("x [m]")
        axes[0].set_ylabel("y [m]")
        fig.suptitle("seen from above: fraction of the mass per grid column")
        fig.tight_layout()
        name = f"pattern_{term.body}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def _write_outputs(scene: _Scene, before, after, out_dir: Path, task: MPMTask, control, control_before=None) -> dict:
    """Write trajectory.npz, before/after renders and the movie; returns the liquid-surface report.

    ``control`` moved the colliders of ``after`` (and of the movie), ``control_before`` those of
    ``before`` (default: ``control``).
    """
    from diffworld.viz import render_particles
    from diffworld.sims.common.colliders import collider_mesh

    pos = after.positions().detach().cpu().numpy()
    ids = scene.model.body.cpu().numpy()
    col_states = control.detach().cpu().numpy() if control is not None else np.zeros((0, 0, 13))
    # active[k, i]: particle i released by state k (emitters; parked particles' positions mean nothing)
    active = np.stack([scene.model.released_mask(s).cpu().numpy() for s in after.substeps])
    np.savez_compressed(out_dir / "trajectory.npz", positions=pos, body=ids, substeps=np.array(after.substeps),
                        collider_states=col_states, dt=scene.model.dt, bodies=np.array(scene.model.body_names),
                        active=active)
    colors = BODY_COLORS[ids % len(BODY_COLORS)]
    bounds = (scene.grid.lower, scene.grid.upper)
    camera = task.outputs.camera if isinstance(task.outputs.camera, str) else tuple(task.outputs.camera)
    drawer = _SurfaceDrawer(scene, task, colors)

    local = [collider_mesh(c, plane_extent=0.5) for c in scene.model.colliders]  # own frames, built once

    def meshes(step: int, states=control):
        if states is None:
            return []
        t = min(step, states.shape[0] - 1)
        return [collider_mesh(c, states[t, i], local=m) for i, (c, m) in enumerate(zip(scene.model.colliders, local))]

    def draw(states, substeps):
        frames, surfaces = [], []
        for s, k in zip(states, substeps):
            x, c, surf = drawer.frame(s.x, k)
            frames.append((x, c))
            surfaces.append(surf)
        return frames, surfaces

    last = after.substeps[-1]
    for name, rollout, states, title in (("before", before, control if control_before is None else control_before,
                                          "before optimization"), ("after", after, control, "after optimization")):
        frames, surfaces = draw([rollout.final], [rollout.substeps[-1]])
        render_particles(out_dir / f"{name}.png", frames, meshes=[meshes(last, states)], surfaces=surfaces,
                         bounds=bounds, titles=[title], camera=camera)
    if task.outputs.movie != "none":
        idx = np.unique(np.linspace(0, len(after.states) - 1, task.outputs.frames).round().astype(int))
        frames, surfaces = draw([after.states[i] for i in idx], [after.substeps[i] for i in idx])
        render_particles(out_dir / f"rollout.{task.outputs.movie}", frames,
                         meshes=[meshes(after.substeps[i]) for i in idx], surfaces=surfaces, bounds=bounds, fps=10,
                         camera=camera)
    return drawer.report


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    torch_threads = torch.get_num_threads()
    try:
        return run_mpm(scene, scene.task, runtime, out_dir, **kwargs)
    finally:
        torch.set_num_threads(torch_threads)


TASKS.register("mpm", MPMTask, _run)
