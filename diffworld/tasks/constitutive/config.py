"""The ``constitutive_learning`` task's scene section: the ground-truth material and its setup
(NCLaw's), the law to learn, teacher forcing, and the evaluation (pydantic models)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from diffworld.engine.config.schema import StrictModel
from diffworld.tasks.mpm.config import MaterialConfig
from diffworld.tasks.mpm.shapes import Vec3

__all__ = ["ConstitutiveLearningTask", "DataConfig", "LawConfig", "TeacherForcingConfig"]


class DataConfig(StrictModel):
    """The ground-truth trajectory: a cube of ``material`` thrown and spun in a box (NCLaw's set-up:
    a 0.5 m cube of 10^3 particles (one per cell) on a 20^3 grid of the unit box, dt 5e-4, 1000 steps, velocity
    (1, -1.5, -2) plus spin (4, 4, 4) about its centre, gravity -9.8, slip walls 3 cells thick),
    simulated with the project's own analytic law."""

    material: MaterialConfig = Field(..., description="The truth (a built-in material, e.g. {name: jelly}).")
    resolution: int = Field(20, ge=8, le=256, description="Grid cells along the unit box's side.")
    size: float = Field(0.5, gt=0, lt=1, description="Side of the cube [m], centred in the box.")
    ppc: int = Field(1, ge=1, le=64, description="Particles per grid cell (1 at 20^3: 10^3 particles, NCLaw's).")
    dt: float = Field(5e-4, gt=0, description="Step [s] (one recorded frame per step).")
    steps: int = Field(1000, ge=2, le=100000, description="Steps of the training trajectory.")
    velocity: Vec3 = (1.0, -1.5, -2.0)
    spin: Vec3 = Field((4.0, 4.0, 4.0), description="Angular velocity about the cube's centre [rad/s].")
    gravity: Vec3 = (0.0, 0.0, -9.8)

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


class LawConfig(StrictModel):
    """The law to learn: each part a network (``invariant``: NCLaw's rotation-equivariant
    architecture; ``plain``: the MLP-of-F ablation), a built-in law by name (kept fixed), or for
    plasticity ``none`` (elastic only)."""

    elastic: str = Field("invariant", description="invariant | plain | a built-in law name (corotated, ...).")
    plastic: str = Field("invariant", description="invariant | plain | none | a built-in law name (von_mises, ...).")
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

        for key, value, nets in (("elastic", self.elastic, ("invariant", "plain")),
                                 ("plastic", self.plastic, ("invariant", "plain", "none"))):
            if value not in nets and value not in LAWS:
                raise ValueError(f"{key}: expected one of {list(nets)} or a built-in law {sorted(LAWS)}, got {value!r}")
        if self.elastic not in ("invariant", "plain") and self.plastic not in ("invariant", "plain"):
            raise ValueError("elastic, plastic: at least one part must be a network to learn")
        return self


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


class ConstitutiveLearningTask(StrictModel):
    """Learn a material's law from its motion (NCLaw) through the differentiable MPM."""

    type: Literal["constitutive_learning"] = "constitutive_learning"
    data: DataConfig
    law: LawConfig = LawConfig()
    teacher_forcing: TeacherForcingConfig = TeacherForcingConfig()
    window: int = Field(50, ge=1, description="Checkpoint window [steps] of the training rollouts.")
    eval_every: int = Field(5, ge=1, description="Frames between the scored positions (NCLaw: 5).")

