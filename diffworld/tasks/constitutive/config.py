"""The ``constitutive_learning`` task's scene section: the ground-truth material and its setup
(NCLaw's), the law to learn, teacher forcing, and the evaluation (pydantic models)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from diffworld.engine.config.schema import StrictModel
from diffworld.tasks.mpm.config import MaterialConfig
from diffworld.tasks.mpm.shapes import ShapeConfig, Vec3, resolve_optional

__all__ = ["ConstitutiveLearningTask", "DataConfig", "EvaluationCase", "LawConfig", "TeacherForcingConfig"]


class DataConfig(StrictModel):
    """The ground-truth trajectory: a cube of ``material`` thrown and spun in a box (NCLaw's set-up:
    a 0.5 m cube of 10^3 particles (one per cell) on a 20^3 grid of the unit box, dt 5e-4, 1000 steps, velocity
    (1, -1.5, -2) plus spin (4, 4, 4) about its centre, gravity -9.8, slip walls 3 cells thick),
    simulated with the project's own analytic law."""

    material: MaterialConfig = Field(..., description="The truth (a built-in material, e.g. {name: jelly}).")
    resolution: int = Field(20, ge=8, le=256, description="Grid cells along the unit box's side.")
    size: float = Field(0.5, gt=0, lt=1, description="Side of the cube [m], centred in the box.")
    shape: Optional[ShapeConfig] = Field(None, description="Another body shape than the cube (then 'size' is "
                                                           "unused); it must stay inside the walls.")
    ppc: int = Field(1, ge=1, le=64, description="Particles per grid cell (1 at 20^3: 10^3 particles, NCLaw's).")
    dt: float = Field(5e-4, gt=0, description="Step [s] (one recorded frame per step).")
    steps: int = Field(1000, ge=2, le=100000, description="Steps of the training trajectory.")
    velocity: Vec3 = (1.0, -1.5, -2.0)
    spin: Vec3 = Field((4.0, 4.0, 4.0), description="Angular velocity about the cube's centre [rad/s].")
    gravity: Vec3 = (0.0, 0.0, -9.8)
    trajectory: Optional[str] = Field(None, description="Learn from this recorded motion (.npz with x, v, C, F "
                                                        "of every frame, as a run writes to truth.npz) instead of "
                                                        "simulating the truth; relative to the scene file. It "
                                                        "must hold steps + 1 frames of this set-up's particles.")

    _trajectory = field_validator("trajectory")(resolve_optional)

    @model_validator(mode="after")
    def _builtin(self):
        if self.material.type != "builtin":
            raise ValueError("material.type: the truth is a built-in material (the law to learn is 'law')")
        # the set-up's checks (the cube inside the walls, a stable dt), so that `diffworld validate`
        # catches them; build_setup's messages start with "data.<key>: "
        import torch

        from diffworld.tasks.constitutive.training import build_setup

        try:
            build_setup(self, torch.float64, "cpu")
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("data.")) from None
        return self


NETWORK_KINDS = ("invariant", "plain")


class LawConfig(StrictModel):
    """The law to learn: each part a network (``network``: of the architecture ``kind``;
    ``invariant`` or ``plain`` name the architecture for that part alone), a built-in law by name
    (kept fixed), or for plasticity ``none`` (elastic only). Architectures: ``invariant``, NCLaw's
    rotation-equivariant one; ``plain``, the MLP-of-F ablation."""

    kind: Literal["invariant", "plain"] = Field("invariant", description="Architecture of the parts set to "
                                                                         "'network' (a sweep switches both at once).")
    elastic: str = Field("network", description="network | invariant | plain | a built-in law name (corotated, ...).")
    plastic: str = Field("network", description="network | invariant | plain | none | a built-in law name "
                                                "(von_mises, ...).")
    width: int = Field(64, ge=1, le=4096)
    depth: int = Field(2, ge=1, le=16, description="Hidden layers.")
    alpha: float = Field(1e-3, gt=0, description="Scale of the plastic correction.")
    output_scale: Optional[float] = Field(None, gt=0, description="Stress scale of the elastic network [Pa]; "
                                                                  "default the truth's Young's modulus. The "
                                                                  "network's last layer starts at zero (a "
                                                                  "stress-free start).")
    elastic_lr: float = Field(1.0, gt=0, description="Learning-rate factor of the elastic weights (x optimizer.lr).")
    plastic_lr: float = Field(0.1, gt=0, description="Learning-rate factor of the plastic weights (x optimizer.lr).")
    init: Optional[str] = Field(None, description="Start from this law file instead of random weights (same "
                                                  "architecture).")

    @model_validator(mode="after")
    def _names(self):
        from diffworld.sims.constitutive import LAWS

        for key, value, nets in (("elastic", self.elastic, ("network", *NETWORK_KINDS)),
                                 ("plastic", self.plastic, ("network", *NETWORK_KINDS, "none"))):
            if value not in nets and value not in LAWS:
                raise ValueError(f"{key}: expected one of {list(nets)} or a built-in law {sorted(LAWS)}, got {value!r}")
        if self.part("elastic") not in NETWORK_KINDS and self.part("plastic") not in NETWORK_KINDS:
            raise ValueError("elastic, plastic: at least one part must be a network to learn")
        return self

    def part(self, key: str) -> str:
        """What part ``key`` (elastic | plastic) is: an architecture (invariant | plain), a built-in
        law name, or none."""
        value = getattr(self, key)
        return self.kind if value == "network" else value


class TeacherForcingConfig(StrictModel):
    """The state is reset to the truth every ``lambda`` steps; ``lambda`` grows on a cosine
    schedule from ``start`` to ``end`` over the iterations (NCLaw: 25 -> 200)."""

    start: int = Field(25, ge=1)
    end: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _order(self):
        if self.end < self.start:
            raise ValueError(f"end: expected >= start ({self.start}), got {self.end}")
        return self


class EvaluationCase(StrictModel):
    """One evaluation trajectory: the training set-up (``data``) with some keys replaced, e.g.
    twice the steps, another initial velocity, another shape at a finer grid, tilted gravity (a
    slope). The truth is simulated with the truth material, the learned law from the same start;
    the score is NCLaw's (the position MSE at every ``eval_every``-th frame, averaged)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_]+$", description="Short name (metrics eval_<name>_mse).")
    steps: Optional[int] = Field(None, ge=2, le=100000)
    velocity: Optional[Vec3] = None
    spin: Optional[Vec3] = None
    gravity: Optional[Vec3] = None
    resolution: Optional[int] = Field(None, ge=8, le=256)
    ppc: Optional[int] = Field(None, ge=1, le=64)
    size: Optional[float] = Field(None, gt=0, lt=1)
    shape: Optional[ShapeConfig] = None

    def data(self, base: DataConfig) -> DataConfig:
        """``base`` with this case's keys replaced (validated again: the set-up checks run)."""
        from pydantic import ValidationError

        changes = {k: v for k, v in self.model_dump(exclude={"name"}, exclude_none=True).items()}
        try:
            return DataConfig.model_validate({**base.model_dump(), **changes})
        except ValidationError as exc:  # one plain line per problem, not pydantic's report
            raise ValueError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'data'}: "
                                       f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())) from None


class ConstitutiveLearningTask(StrictModel):
    """Learn a material's law from its motion (NCLaw) through the differentiable MPM."""

    type: Literal["constitutive_learning"] = "constitutive_learning"
    data: DataConfig
    law: LawConfig = LawConfig()
    teacher_forcing: TeacherForcingConfig = TeacherForcingConfig()
    window: int = Field(50, ge=1, description="Checkpoint window [steps] of the training rollouts.")
    eval_every: int = Field(5, ge=1, description="Frames between the scored positions (NCLaw: 5).")
    evaluate: list[EvaluationCase] = Field(default_factory=list, description="Trajectories to score the learned "
                                                                             "law on besides the training one.")

    @model_validator(mode="after")
    def _unique_cases(self):
        names = [c.name for c in self.evaluate]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"training"} & set(names)))
        if dup:
            raise ValueError(f"evaluate: names must be unique and not 'training' (the training trajectory's), "
                             f"got {dup} more than once or reserved")
        for i, c in enumerate(self.evaluate):
            try:
                c.data(self.data)
            except Exception as exc:  # pydantic's ValidationError or the set-up's ValueError
                raise ValueError(f"evaluate[{i}] ({c.name}): {exc}") from None
        return self

