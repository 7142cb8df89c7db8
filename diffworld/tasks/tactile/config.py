"""The ``tactile`` task's scene section: a sensor (dome or flat pad), a rigid object, the contact
law, the time stepping and the objective (pydantic models with the checks that need no simulation).

Units are SI. Contact parameters are per unit of gel surface area (a pressure law), so that a
finer sensor mesh gives the same forces: node ``i`` with lumped contact area ``A_i`` gets
``k_n A_i`` [N/m] etc. (see :mod:`diffworld.sims.fem.contact`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import torch

from pydantic import Field, field_validator, model_validator

from diffworld.engine.config.schema import StrictModel, reject_boolean
from diffworld.sims.fem.materials import FEM_MATERIALS
from diffworld.tasks.assets import readable_asset
from diffworld.tasks.mpm.config import BodyConfig, ColliderConfig, DomainConfig
from diffworld.tasks.mpm.shapes import Vec3, resolve_optional

__all__ = [
    "ContactConfig",
    "DOFS",
    "DomeConfig",
    "ForceLossConfig",
    "GelMaterialConfig",
    "ObjectConfig",
    "PadConfig",
    "RotationLossConfig",
    "SensorMotionConfig",
    "SmoothnessLossConfig",
    "SysIdConfig",
    "TactileTask",
    "TrajectoryConfig",
]

DOFS = ("vx", "vy", "vz", "wx", "wy", "wz")  # the components of the sensor's per-step velocity
# Parameters a system identification may fit: the gel's and the contact's.
SYSID_PARAMETERS = ("E", "nu", "k_n", "k_d", "k_t", "mu")


class GelMaterialConfig(StrictModel):
    """The elastomer (uniform over the gel)."""

    law: Literal[tuple(FEM_MATERIALS)] = Field("stable_neo_hookean", description="FEM material law.")
    E: float = Field(8.0e4, gt=0, description="Young's modulus [Pa].")
    nu: float = Field(0.43, gt=-1.0, lt=0.5, description="Poisson's ratio [-].")
    density: float = Field(2000.0, gt=0, description="[kg/m^3] (the reference's rho).")
    damping: float = Field(20.0, ge=0, description="Mass-proportional damping [1/s].")

    _numbers = field_validator("E", "nu", "density", "damping", mode="before")(reject_boolean)


class DomeConfig(StrictModel):
    """A hemispherical gel shell (GelSight-type dome), :func:`diffworld.sims.tactile.dome`; its
    contact side faces the sensor's +z."""

    type: Literal["dome"] = "dome"
    name: str = "sensor"
    inner_radius: float = Field(7.5e-3, gt=0, description="Radius of the bonded inner surface [m].")
    thickness: float = Field(7.5e-3, gt=0, description="Gel thickness [m].")
    layers: int = Field(3, ge=1, le=8, description="Tet layers through the thickness.")
    n_points: int = Field(200, ge=8, le=5000, description="Points of the hemisphere's triangulation per shell.")
    material: GelMaterialConfig = GelMaterialConfig()


class PadConfig(StrictModel):
    """A flat gel pad (GelSight-style gripper finger), :func:`diffworld.sims.tactile.flat_pad`;
    base at the sensor origin, contact face at z = thickness."""

    type: Literal["flat_pad"] = "flat_pad"
    name: str = "sensor"
    size: tuple[float, float] = Field((0.02, 0.02), description="Extent along x and y [m].")
    thickness: float = Field(4e-3, gt=0, description="Gel thickness [m].")
    resolution: tuple[int, int, int] = Field((10, 10, 2), description="Cells along x, y, z.")
    material: GelMaterialConfig = GelMaterialConfig()

    @field_validator("size")
    @classmethod
    def _positive(cls, v):
        if not all(s > 0 for s in v):
            raise ValueError(f"expected two lengths > 0 [m], got {list(v)}")
        return v

    @field_validator("resolution")
    @classmethod
    def _cells(cls, v):
        if not all(1 <= c <= 256 for c in v):
            raise ValueError(f"expected three cell counts in [1, 256], got {list(v)}")
        if v[0] * v[1] * v[2] > 100_000:
            raise ValueError(f"expected at most 100000 cells (600000 tets), got {v[0] * v[1] * v[2]}")
        return v


class GripperConfig(StrictModel):
    """A parallel-jaw gripper with a flat gel pad on each jaw
    (:class:`diffworld.sims.tactile.ParallelGripper`): the gripper frame's +z is the approach
    axis, the jaws close along its x, the pads' centres sit ``finger_offset`` along +z. The task's
    ``motion`` moves the gripper frame; ``opening`` is the gap between the contact faces."""

    type: Literal["gripper"] = "gripper"
    name: str = "gripper"
    pad: PadConfig = PadConfig()
    opening: float = Field(0.03, ge=0, description="Gap between the pads' contact faces at the start [m].")
    max_opening: float = Field(0.08, gt=0, description="Largest gap [m].")
    finger_offset: float = Field(0.0, description="Pad centres along the approach axis [m].")
    grip_velocity: float = Field(0.0, description="Opening rate per control step for motion type velocities "
                                                  "[m/s] (negative closes).")

    @property
    def material(self) -> GelMaterialConfig:
        return self.pad.material

    @property
    def thickness(self) -> float:
        return self.pad.thickness

    @model_validator(mode="after")
    def _opening(self):
        if self.opening > self.max_opening:
            raise ValueError(f"opening: {self.opening:g} m is above max_opening {self.max_opening:g} m")
        return self


SensorConfig = Annotated[Union[DomeConfig, PadConfig, GripperConfig], Field(discriminator="type")]


class TactileKeyframeConfig(StrictModel):
    t: float = Field(..., ge=0, description="Time [s].")
    position: Vec3
    rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Rotation vector [rad].")
    opening: Optional[float] = Field(None, ge=0, description="Gripper opening [m] (grippers only; default: held).")


class JointKeyframeConfig(StrictModel):
    t: float = Field(..., ge=0, description="Time [s].")
    q: list[float] = Field(..., min_length=1, description="Joint values [rad or m], in the URDF's joint order "
                                                            "(movable joints).")
    opening: Optional[float] = Field(None, ge=0, description="Gripper opening [m] (grippers only; default: held).")


class SensorMotionConfig(StrictModel):
    """How the sensor body (its base nodes) moves: held, through keyframes, by per-control-step
    velocities (the optimizable form), or by a robot: ``joints`` keyframes of a URDF kinematic
    chain whose ``link`` carries the sensor at ``mount_position``/``mount_rotation`` (the robot's
    base at ``position``/``rotation``; needs the ``robots`` extra). Otherwise ``position``/
    ``rotation`` place the sensor frame in the world at the start (a dome pointing down: rotation
    [3.14159265, 0, 0]). Keyframes and joints are also the initial guess of a trajectory
    objective (as per-control-step velocities)."""

    type: Literal["static", "keyframes", "velocities", "joints"] = "static"
    position: Vec3 = (0.0, 0.0, 0.0)
    rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Rotation vector [rad].")
    keyframes: list[TactileKeyframeConfig] = Field(default_factory=list,
                                            description="Poses at times [s] (type keyframes); held after the last.")
    velocity: tuple[float, float, float, float, float, float] = Field(
        (0.0,) * 6, description="Per-step velocity (linear [m/s], angular [rad/s], world frame) for type velocities.")
    urdf: Optional[str] = Field(None, description="URDF file of the robot (type joints).")
    link: Optional[str] = Field(None, description="The link carrying the sensor (type joints).")
    mount_position: Vec3 = Field((0.0, 0.0, 0.0), description="Sensor origin in the link frame [m] (type joints).")
    mount_rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Sensor rotation w.r.t. the link, rotation vector "
                                                               "[rad] (type joints).")
    joint_keyframes: list[JointKeyframeConfig] = Field(default_factory=list, description="Joint values at times "
                                                                                         "(type joints).")

    _urdf = field_validator("urdf")(resolve_optional)

    @model_validator(mode="after")
    def _keys(self):
        if self.type == "keyframes" and not self.keyframes:
            raise ValueError("type 'keyframes' needs at least one entry in 'keyframes'")
        if self.type == "joints":
            if not (self.urdf and self.link and self.joint_keyframes):
                raise ValueError("type 'joints' needs 'urdf', 'link' and 'joint_keyframes'")
            from diffworld.sims.common.kinematics import KinematicChain

            chain = KinematicChain.from_urdf(self.urdf)
            if self.link not in chain.links:
                raise ValueError(f"link: {self.link!r} is not a link of {self.urdf}; its links are {list(chain.links)}")
            for i, k in enumerate(self.joint_keyframes):
                if len(k.q) != len(chain.joint_names):
                    raise ValueError(f"joint_keyframes[{i}].q: expected {len(chain.joint_names)} values (joints "
                                     f"{chain.joint_names}), got {len(k.q)}")
            chain.check_limits(torch.tensor([k.q for k in self.joint_keyframes], dtype=torch.float64))
        return self


class ObjectConfig(StrictModel):
    """A rigid object touching the gel (static at its pose)."""

    name: str = "object"
    shape: Literal["sphere", "box", "plane", "waves", "mesh"] = Field(
        ..., description="sphere (radius), box (half_extents), plane (z <= 0 in its frame), waves (a bumpy ground "
                         "z <= amplitude cos(2 pi x / wavelength_x) cos(2 pi y / wavelength_y)), mesh (a closed "
                         "triangle mesh file, Warp-BVH signed distance).")
    radius: float = Field(5e-3, gt=0, description="Sphere radius [m].")
    half_extents: Vec3 = Field((5e-3, 5e-3, 5e-3), description="Box half sizes [m].")
    amplitude: float = Field(1e-3, ge=0, description="Waves amplitude [m].")
    wavelength: tuple[float, float] = Field((1e-2, 0.0), description="Waves wavelengths along x, y [m] (0: flat).")
    path: Optional[str] = Field(None, description="Mesh file for shape 'mesh' (any format trimesh reads) [m].")
    position: Vec3 = (0.0, 0.0, 0.0)
    rotation: Vec3 = Field((0.0, 0.0, 0.0), description="Rotation vector [rad].")

    _path = field_validator("path")(resolve_optional)
    _readable = field_validator("path")(readable_asset("mesh"))

    @field_validator("path")
    @classmethod
    def _closed(cls, v):
        """The object's signed distance is a winding number: on a surface with a hole it is no
        longer a distance to a solid (a point can be 'inside' through the hole)."""
        if v is None:
            return v
        import numpy as np

        from diffworld.geometry import io

        m = io.load_mesh(v)
        edges = np.sort(m.faces.cpu().numpy()[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        _, counts = np.unique(edges, axis=0, return_counts=True)
        open_edges, non_manifold = int((counts == 1).sum()), int((counts > 2).sum())
        if open_edges or non_manifold:
            raise ValueError(f"{v} is not a closed triangle mesh ({open_edges} boundary edge(s), {non_manifold} "
                             f"edge(s) shared by more than two triangles); the object's signed distance needs a "
                             f"closed surface (fill the holes, e.g. trimesh.repair.fill_holes)")
        return v

    @model_validator(mode="after")
    def _mesh_needs_path(self):
        if self.shape == "mesh" and self.path is None:
            raise ValueError("shape 'mesh' needs 'path'")
        if self.shape == "box" and not all(h > 0 for h in self.half_extents):
            raise ValueError(f"half_extents: expected three lengths > 0 [m], got {list(self.half_extents)}")
        if self.shape == "waves" and not all(w >= 0 for w in self.wavelength):
            raise ValueError(f"wavelength: expected two lengths >= 0 [m], got {list(self.wavelength)}")
        return self


class ContactConfig(StrictModel):
    """Penalty contact per unit gel surface area (node ``i`` gets ``k A_i``): normal stiffness,
    Hunt-Crossley damping, viscous stick and Coulomb friction."""

    k_n: float = Field(2.0e8, ge=0, description="Normal stiffness per area [N/m^3] (pressure per penetration).")
    k_d: float = Field(0.0, ge=0, description="Damping per area [N s/m^4] (pressure k_d d max(-v_n, 0)).")
    k_t: float = Field(1.0e6, ge=0, description="Viscous tangential coefficient per area [N s/m^3].")
    mu: float = Field(0.5, ge=0, description="Coulomb friction coefficient [-].")
    eps_v: float = Field(1e-4, gt=0, description="Slip-velocity regularization [m/s].")
    penetration_width: float = Field(2e-5, ge=0, description="Softplus width of the penetration ramp [m] (0: hard).")

    _numbers = field_validator("k_n", "k_d", "k_t", "mu", "eps_v", "penetration_width", mode="before")(reject_boolean)


class MPMObjectsConfig(StrictModel):
    """Deformable objects simulated by MPM, coupled two-way with the gel(s) in one step
    (:mod:`diffworld.sims.coupling.fem_mpm`); the domain's walls are the table and the box."""

    domain: DomainConfig
    bodies: list[BodyConfig] = Field(..., min_length=1)
    contact: ContactConfig = Field(default_factory=lambda: ContactConfig(k_n=2.0e7, k_t=5.0e4, mu=1.0,
                                                                         penetration_width=1e-4, eps_v=1e-3),
                                   description="Gel - MPM contact, per unit area (a grid node gets k dx^2).")
    colliders: list[ColliderConfig] = Field(default_factory=list, description="Static rigid colliders of the MPM "
                                            "bodies (a ledge, a stop, a fixed base): the MPM task's colliders, at "
                                            "rest at motion.position / motion.rotation; the gel does not touch them.")

    @model_validator(mode="after")
    def _static_colliders(self):
        for i, c in enumerate(self.colliders):
            if c.motion.type != "static":
                raise ValueError(f"colliders[{i}].motion.type: expected 'static' (the sensor is what moves in a "
                                 f"tactile scene), got {c.motion.type!r}")
        names = [c.name for c in self.colliders]
        if len(set(names)) != len(names):
            raise ValueError(f"colliders: names must be distinct, got {names}")
        return self


class CableContactConfig(StrictModel):
    """Penalty contact of the rope's particles (spheres of the rope's radius) per particle."""

    k_n: float = Field(300.0, ge=0, description="Normal stiffness [N/m].")
    k_d: float = Field(0.0, ge=0, description="Damping [N s/m^2].")
    k_t: float = Field(0.2, ge=0, description="Viscous tangential coefficient [N s/m].")
    mu: float = Field(0.5, ge=0, description="Coulomb friction coefficient [-].")
    eps_v: float = Field(1e-3, gt=0, description="Slip-velocity regularization [m/s].")
    penetration_width: float = Field(1e-4, ge=0, description="Softplus width of the penetration ramp [m].")


class CableConfig(StrictModel):
    """A differentiable XPBD rope (:mod:`diffworld.sims.cable`) lying on a table at z = 0, straight
    at rest, starting bent into a circular arc in the table's plane; coupled two-way with the
    gel(s) in every step (:mod:`diffworld.sims.coupling.fem_cable`)."""

    length: float = Field(0.1, gt=0, description="Rope length [m].")
    particles: int = Field(21, ge=3, le=2000, description="Particles along the rope.")
    radius: float = Field(0.002, gt=0, description="Rope radius [m] (contact spheres).")
    linear_density: float = Field(0.01, gt=0, description="[kg/m].")
    bend_stiffness: float = Field(1e-6, gt=0, description="Bending stiffness EI [N m^2].")
    stretch_compliance: float = Field(0.0, ge=0, description="[m/N]; 0: inextensible.")
    damping: float = Field(10.0, ge=0, description="Mass-proportional damping [1/s].")
    iterations: int = Field(10, ge=1, le=200, description="Constraint iterations per step.")
    center: tuple[float, float] = Field((0.0, 0.0), description="Middle of the rope on the table (x, y) [m].")
    arc_angle: float = Field(60.0, ge=0, lt=360, description="Initial bend: the arc's angle [deg] (0: straight).")
    heading: float = Field(0.0, description="Direction of the chord from the first to the last particle [deg from x].")
    table: CableContactConfig = Field(default_factory=lambda: CableContactConfig(k_n=200.0, k_t=0.4, mu=1.0),
                                      description="Rope - table contact.")
    contact: CableContactConfig = Field(default_factory=CableContactConfig, description="Gel - rope contact.")


class ForceLossConfig(StrictModel):
    """Track a target force in the sensor frame at every control step from ``start`` on:
    mean of ((F - target) / scale)^2 (over the pads of a gripper too). ``component``: ``normal``
    (pressing force, >= 0) or ``shear`` (magnitude of the tangential force)."""

    type: Literal["force"] = "force"
    component: Literal["normal", "shear"] = "normal"
    target: float = Field(..., description="Target force [N].")
    scale: Optional[float] = Field(None, gt=0, description="Force scale [N]; default |target| (or 1 N if 0).")
    start: int = Field(0, ge=0, description="First control step scored.")
    weight: float = Field(1.0, ge=0)


class SmoothnessLossConfig(StrictModel):
    """Penalize changes of the controlled velocity between control steps: mean of
    |v_k - v_(k-1)|^2 / scale^2 over the optimized components."""

    type: Literal["smoothness"] = "smoothness"
    scale: float = Field(0.01, gt=0, description="Velocity scale [m/s] (angular: [rad/s]).")
    weight: float = Field(0.1, ge=0)


class SlipLossConfig(StrictModel):
    """No slip (DiffTactile's grasp loss): mean over control steps from ``start`` and over the
    pads of ``(shear / (mu normal + eps))^2``; below 1 the pad holds inside its friction cone."""

    type: Literal["slip"] = "slip"
    mu: float = Field(1.0, gt=0, description="Friction coefficient of the cone [-].")
    eps: float = Field(0.01, gt=0, description="Force added to the cone's size [N] (no division by zero).")
    start: int = Field(0, ge=0)
    weight: float = Field(1.0, ge=0)


class ComLossConfig(StrictModel):
    """An MPM body's centre of mass vs a target at every control step from ``start`` on: mean of
    squared distance over the listed axes, / scale^2."""

    type: Literal["com"] = "com"
    body: str
    target: Vec3
    axes: list[Literal["x", "y", "z"]] = Field(["x", "y", "z"], min_length=1)
    scale: float = Field(0.01, gt=0, description="Distance scale [m].")
    start: int = Field(0, ge=0)
    weight: float = Field(1.0, ge=0)


class DeformationLossConfig(StrictModel):
    """Keep an MPM body's shape (DiffTactile's plastic grasp): at the final control step, the mean
    squared displacement of its particles relative to their initial positions, after removing the
    mean translation, / scale^2 (a rigid lift costs nothing; squashing and dents do)."""

    type: Literal["deformation"] = "deformation"
    body: str
    scale: float = Field(0.001, gt=0, description="Displacement scale [m].")
    weight: float = Field(1.0, ge=0)


class RotationLossConfig(StrictModel):
    """Turn an MPM body about an axis (DiffTactile's box opening and block repose): its angle
    about ``axis`` (through its centre of mass) from the start, at every control step from
    ``start`` on, vs ``target``: mean of ((angle - target) / scale)^2.

    The angle is the best-fit (Procrustes) rotation of the body's particles, projected on the
    plane normal to ``axis``: ``atan2(A_wu - A_uw, A_uu + A_ww)`` with ``A = sum_p m_p (x_p - c)
    (X_p - C)^T`` in an orthonormal basis (u, w) of that plane (right-handed about ``axis``). It
    needs no SVD, so it is smooth for symmetric bodies (a cube) too, and it serves deformable
    bodies (a lid that bends) as their mean turn. Range (-pi, pi].
    """

    type: Literal["rotation"] = "rotation"
    body: str
    axis: Vec3 = Field(..., description="Rotation axis (world frame; normalized), right-handed.")
    target: float = Field(..., ge=-3.14159, le=3.14159, description="Target angle [rad].")
    scale: float = Field(0.1, gt=0, description="Angle scale [rad].")
    start: int = Field(0, ge=0, description="First control step scored.")
    weight: float = Field(1.0, ge=0)

    @field_validator("axis")
    @classmethod
    def _nonzero(cls, v):
        if sum(c * c for c in v) < 1e-24:
            raise ValueError(f"expected a non-zero direction, got {list(v)}")
        return v


class StraightnessLossConfig(StrictModel):
    """Straighten a cable: ``((1 - |x_last - x_first| / length) / scale)^2`` at the final control
    step (0 when straight)."""

    type: Literal["straightness"] = "straightness"
    scale: float = Field(0.05, gt=0, description="Relative scale [-].")
    weight: float = Field(1.0, ge=0)


LossTermConfig = Annotated[Union[ForceLossConfig, SmoothnessLossConfig, SlipLossConfig, ComLossConfig,
                                 DeformationLossConfig, RotationLossConfig, StraightnessLossConfig],
                           Field(discriminator="type")]


class TrajectoryConfig(StrictModel):
    """Optimize the sensor's per-control-step velocity (the ``dofs`` listed) for the loss terms."""

    type: Literal["trajectory"] = "trajectory"
    dofs: list[Literal[DOFS + ("grip",)]] = Field(list(DOFS), description="Optimized velocity components ('grip': "
                                                                          "a gripper's opening rate); the others "
                                                                          "keep their initial values.")
    max_speed: float = Field(0.1, gt=0, description="Bound on the linear speed [m/s] per control step.")
    max_angular_speed: float = Field(5.0, gt=0, description="Bound on the angular speed [rad/s].")
    losses: list[LossTermConfig] = Field(..., min_length=1)


class SysIdConfig(StrictModel):
    """Recover gel and contact parameters from a press-and-slide probe: the observed total force
    and marker displacements (sensor frame, every control step) come from a finer sensor mesh
    (``refine`` times the points / cells, one more layer) with the ``truth`` parameters, plus
    Gaussian noise of ``noise`` times each channel's RMS; the model starts from ``initial``."""

    type: Literal["system_identification"] = "system_identification"
    truth: dict[Literal[SYSID_PARAMETERS], float] = Field(..., min_length=1)
    initial: dict[Literal[SYSID_PARAMETERS], float] = Field(..., min_length=1)
    noise: float = Field(0.02, ge=0, le=1, description="Relative noise of the observations.")
    refine: int = Field(2, ge=1, le=4, description="Truth mesh refinement factor (1: the model's own mesh).")
    markers: int = Field(40, ge=1, le=2000, description="Markers on the contact surface.")
    marker_weight: float = Field(1.0, ge=0, description="Weight of the marker term against the force term.")

    @model_validator(mode="after")
    def _same_keys(self):
        if set(self.truth) != set(self.initial):
            raise ValueError(f"'truth' and 'initial' must name the same parameters, got {sorted(self.truth)} and "
                             f"{sorted(self.initial)}")
        for name, values in (("truth", self.truth), ("initial", self.initial)):
            for k, v in values.items():
                bad = (v <= 0 if k in ("E", "k_n", "k_d", "k_t") else (not -1 < v < 0.5) if k == "nu" else v < 0)
                if bad:
                    want = {"nu": "in (-1, 0.5)", "mu": ">= 0"}.get(k, "> 0")
                    raise ValueError(f"{name}.{k}: expected {want}, got {v}")
        return self


ObjectiveConfig = Annotated[Union[TrajectoryConfig, SysIdConfig], Field(discriminator="type")]


class OutputsConfig(StrictModel):
    frames: int = Field(24, ge=0, le=1000, description="Frames of the rollout GIF (0: none).")


class TactileTask(StrictModel):
    """A vision-based tactile sensor touching a rigid object, optimized through the FEM.

    One control step is ``substeps`` FEM steps of ``dt``; the sensor's pose is interpolated
    linearly within a control step. With ``control_dt`` the control step has that duration
    instead, and the number of FEM steps in it follows from the stable ``dt`` (or the given one),
    so keyframe times mean the same whatever the mesh and the contact stiffness.
    """

    type: Literal["tactile"] = "tactile"
    sensor: SensorConfig
    motion: SensorMotionConfig = SensorMotionConfig()
    object: Optional[ObjectConfig] = Field(None, description="A rigid object (or 'mpm' bodies).")
    mpm: Optional[MPMObjectsConfig] = Field(None, description="Deformable MPM objects (or a rigid 'object').")
    cable: Optional[CableConfig] = Field(None, description="A rope on a table (or an 'object' or 'mpm').")
    contact: ContactConfig = ContactConfig()
    gravity: Vec3 = (0.0, 0.0, -9.81)
    integrator: Literal["explicit", "implicit"] = "explicit"
    dt: Optional[float] = Field(None, gt=0, description="FEM step [s]; default 0.9 x the stability limit (explicit).")
    substeps: Optional[int] = Field(None, ge=1, le=100000, description="FEM steps per control step (default 10; "
                                                                        "none with 'control_dt').")
    control_dt: Optional[float] = Field(None, gt=0, description="Duration of a control step [s] (instead of "
                                                                 "'substeps': the FEM steps per control step follow "
                                                                 "from dt).")
    steps: int = Field(20, ge=1, le=100000, description="Control steps.")
    window: int = Field(50, ge=1, description="Checkpoint window [FEM steps].")
    objective: ObjectiveConfig
    outputs: OutputsConfig = OutputsConfig()

    @model_validator(mode="after")
    def _implicit_needs_dt(self):
        if self.integrator == "implicit" and self.dt is None:
            raise ValueError("integrator 'implicit' needs 'dt' (it has no stability limit to derive it from)")
        if self.control_dt is not None and self.substeps is not None:
            raise ValueError("give 'substeps' or 'control_dt', not both")
        if self.control_dt is None and self.substeps is None:
            self.substeps = 10
        if sum(x is not None for x in (self.object, self.mpm, self.cable)) != 1:
            raise ValueError("give a rigid 'object', 'mpm' bodies or a 'cable' (exactly one of them)")
        if self.cable is not None:
            if self.integrator != "explicit":
                raise ValueError("a 'cable' is coupled to the gel by the explicit integrator only")
            if self.objective.type != "trajectory":
                raise ValueError("a 'cable': only objective type 'trajectory' for now")
            for i, t in enumerate(self.objective.losses):
                if t.type in ("force", "slip", "com", "deformation", "rotation"):
                    raise ValueError(f"objective.losses[{i}]: {t.type!r} is not available with a cable (its forces are "
                                     f"reported, not differentiated); use straightness and smoothness")
        elif any(t.type == "straightness" for t in getattr(self.objective, "losses", [])):
            raise ValueError("objective.losses: 'straightness' needs a 'cable'")
        if self.mpm is not None:
            if self.integrator != "explicit":
                raise ValueError("'mpm' objects are coupled to the gel by the explicit integrator only")
            if self.objective.type != "trajectory":
                raise ValueError("'mpm' objects: only objective type 'trajectory' for now")
        if self.sensor.type == "gripper" and self.object is not None:
            raise ValueError("a 'gripper' grasps 'mpm' bodies or a 'cable': a rigid object cannot be lifted")
        if self.sensor.type != "gripper" and any(
                k.opening is not None for k in (*self.motion.keyframes, *self.motion.joint_keyframes)):
            raise ValueError("motion.keyframes: 'opening' is for a gripper only")
        if self.objective.type == "trajectory":
            names = {b.name for b in self.mpm.bodies} if self.mpm is not None else set()
            for i, t in enumerate(self.objective.losses):
                if t.type in ("com", "deformation", "rotation") and t.body not in names:
                    raise ValueError(f"objective.losses[{i}].body: unknown MPM body {t.body!r}; expected one of "
                                     f"{sorted(names)}")
            if "grip" in self.objective.dofs and self.sensor.type != "gripper":
                raise ValueError("objective.dofs: 'grip' is for a gripper only")
        return self

    @model_validator(mode="after")
    def _buildable(self):
        """The checks that need the sensor's mesh but no simulation (stable dt, objects not
        starting inside the gel), so that ``diffworld validate`` catches them."""
        import torch

        from diffworld.tasks.tactile.build import build_scene

        try:
            build_scene(self, torch.float64, torch.device("cpu"), check_only=True)
        except (RuntimeError, TypeError) as exc:  # e.g. a mesh the SDF cannot use
            raise ValueError(str(exc)) from None
        return self
