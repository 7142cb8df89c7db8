"""The ``mpm`` task's scene section: bodies, emitters, colliders, domain, objective, outputs
(pydantic models with the checks that need no simulation)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from diffworld.engine.config.schema import StrictModel, reject_boolean
from diffworld.sims.common.colliders import CONTACT_WEIGHTS, SHAPES
from diffworld.sims.mpm.materials import MATERIALS, PARAMETER_DOCS, PARAMETERS, Material, parameter_problem
from diffworld.tasks.mpm.loss_terms import (LOSS_TERMS, ChamferLossConfig, ComLossConfig, DensityLossConfig,
                                            MixingLossConfig, PatternLossConfig, PythonLossConfig, RegionLossConfig,
                                            ShapeLossConfig, TargetTrajectoryLossConfig)
from diffworld.tasks.assets import readable_asset
from diffworld.tasks.mpm.shapes import ShapeConfig, Vec3, resolve_optional

__all__ = [
    "BODY_COLORS",
    "BodyConfig",
    "COLLIDER_SHAPES",
    "ChamferLossConfig",
    "ColliderConfig",
    "ComLossConfig",
    "DOFS",
    "DensityLossConfig",
    "DomainConfig",
    "EmitterConfig",
    "HorizonConfig",
    "KeyframeConfig",
    "LossTermConfig",
    "MPMTask",
    "MaterialConfig",
    "MixingLossConfig",
    "MotionConfig",
    "ObjectiveConfig",
    "OutputsConfig",
    "PatternLossConfig",
    "PythonLossConfig",
    "RegionLossConfig",
    "ShapeConfig",
    "ShapeLossConfig",
    "SystemIdentificationConfig",
    "TargetTrajectoryLossConfig",
    "TrajectoryConfig",
    "Vec3",
    "WorkspaceConfig",
]


DOFS = ("vx", "vy", "vz", "wx", "wy", "wz")  # the components of a collider's per-step velocity
BODY_COLORS = np.array([[0.20, 0.45, 0.85], [0.90, 0.55, 0.15], [0.30, 0.70, 0.35], [0.80, 0.25, 0.30],
                        [0.55, 0.40, 0.75], [0.50, 0.50, 0.50]])


class _MaterialSection(StrictModel):
    """A material by name with optional parameter overrides (see diffworld.sims.mpm.materials)."""

    type: Literal["builtin", "neural"] = Field(
        "builtin", description="builtin: the law of 'name'; neural: a learned law file ('path', "
                               "diffworld.sims.constitutive.save_law) whose particles keep the density of 'name' "
                               "(default jelly), and its E, nu for the time-step limit and any analytic part.")
    name: Optional[str] = Field(None, description=f"One of: {', '.join(MATERIALS)} (required for type builtin).")
    path: Optional[str] = Field(None, description="The learned law (.pt beside its .json) for type neural.")

    _path = field_validator("path")(resolve_optional)

    @field_validator("name")
    @classmethod
    def _known(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in MATERIALS:
            raise ValueError(f"unknown material {v!r}; expected one of {sorted(MATERIALS)}")
        return v

    @model_validator(mode="after")
    def _kind(self):
        if self.type == "builtin":
            if self.name is None:
                raise ValueError(f"name: required for a built-in material; expected one of {sorted(MATERIALS)}")
            if self.path is not None:
                raise ValueError("path: only for type 'neural'")
        else:
            if self.path is None:
                raise ValueError("path: required for type 'neural' (a law written by save_law: NAME.pt and "
                                 "NAME.json)")
            from diffworld.sims.constitutive.neural import load_law

            try:
                load_law(self.path, torch.float64)
            except ValueError as exc:
                raise ValueError(f"path: {exc}") from None
            if self.name is None:
                self.name = "jelly"
        return self

    def law(self, dtype: torch.dtype, device) -> Optional["TorchLaw"]:
        """The learned law of a neural material (its weights fixed: a scene uses it, a
        constitutive_learning task trains it), else None."""
        if self.type != "neural":
            return None
        from diffworld.sims.constitutive.neural import load_law

        law = load_law(self.path, dtype, device)
        law.requires_grad_(False)
        return law

    _numbers = field_validator(*PARAMETERS, mode="before", check_fields=False)(reject_boolean)

    @field_validator(*PARAMETERS, check_fields=False)
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        problem = None if v is None else parameter_problem(info.field_name, v)
        if problem:
            raise ValueError(problem)
        return v

    def build(self) -> Material:
        return Material(**self.model_dump(exclude={"type", "path"}))


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
    ppc: int = Field(8, ge=1, le=1000, description="Particles per cell.")
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
    ppc: int = Field(8, ge=1, le=1000, description="Particles per cell of the jet.")
    collider: Optional[str] = Field(None, description="Collider carrying the nozzle (it moves with it); "
                                                      "default: a fixed nozzle.")

    @model_validator(mode="after")
    def _check(self):
        if self.start >= self.stop:
            raise ValueError(f"expected start < stop [s], got start={self.start}, stop={self.stop}")
        if self.material.type == "neural":
            raise ValueError("material.type: an emitter's particles take built-in laws only (a learned law binds a "
                             "body)")
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
    sdf_resolution: int = Field(64, ge=8, le=512, description="SDF grid resolution of a mesh collider.")
    friction: float = Field(0.5, ge=0)
    softness: float = Field(0.0, ge=0, description="Soft-contact sharpness [1/m]; 0 = hard.")
    contact_weight: Literal[CONTACT_WEIGHTS] = Field(
        "clamped_exp", description="Soft-contact weight of a node at signed distance d: 'clamped_exp' "
        "min(exp(-softness d), 1), or 'smooth', equal to it beyond 1/softness from the surface and C1 "
        "everywhere (no kink in the loss where a face lies on a grid-node plane); 'smooth' needs softness > 0.")
    sticky: bool = False
    motion: MotionConfig = MotionConfig()

    _path = field_validator("path")(resolve_optional)
    _readable = field_validator("path")(readable_asset("mesh"))

    @model_validator(mode="after")
    def _smooth_needs_softness(self):
        if self.contact_weight == "smooth" and self.softness <= 0:
            raise ValueError(f"contact_weight 'smooth' needs softness > 0 (hard contact has no weight to smooth), "
                             f"got softness {self.softness}")
        return self


class DomainConfig(StrictModel):
    lower: Vec3 = (0.0, 0.0, 0.0)
    upper: Vec3 = (1.0, 1.0, 1.0)
    resolution: int = Field(32, ge=8, le=1024, description="Cells along the longest side.")
    wall: Literal["slip", "sticky", "friction"] = "slip"
    wall_friction: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self):
        if not all(a < b for a, b in zip(self.lower, self.upper)):
            raise ValueError(f"expected lower < upper on every axis, got lower={list(self.lower)}, "
                             f"upper={list(self.upper)}")
        return self


# The registered loss terms (loss_terms.LOSS_TERMS): one entry per `type`.
LossTermConfig = LOSS_TERMS.union()


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
    frames: int = Field(40, ge=2, le=10000, description="Frames of the rollout movie.")
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
