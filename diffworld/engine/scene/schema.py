"""Scene sections shared by every task: runtime, optimizer, output.

Every model forbids unknown keys. Numbers written like ``1e-3`` are floats (PyYAML alone reads
them as strings; the loader's YAML resolver and pydantic's lax mode both accept them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, create_model

__all__ = ["OptimizerConfig", "OutputConfig", "RuntimeConfig", "StrictModel", "build_scene_model", "scene_file"]


def scene_file(value: str, info: ValidationInfo) -> str:
    """Field validator of a file path: relative to the scene file's folder, and it must exist.

    Use as ``_path = field_validator("path")(scene_file)``; the loader passes the scene's folder
    as the validation context ``scene_dir``.
    """
    base = (info.context or {}).get("scene_dir")
    p = Path(value)
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if not p.is_file():
        raise ValueError(f"file not found: {p}")
    return str(p)


class StrictModel(BaseModel):
    """Base of every scene model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class RuntimeConfig(StrictModel):
    """Where the scene runs."""

    device: str = Field("auto", description="'auto' (CUDA if Warp sees one, else CPU), 'cpu', or 'cuda:N'.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating-point precision.")


class OptimizerConfig(StrictModel):
    """Gradient-based optimizer settings (see diffworld.engine.driver.OptimizerSettings)."""

    name: Literal["adam", "sgd", "lbfgs"] = "adam"
    lr: float = Field(1e-2, gt=0, description="Learning rate (SDF grids: grid cells per step).")
    iterations: int = Field(200, ge=0, description="Iterations (per stage for staged tasks).")
    momentum: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "exponential", "step"] = "constant"
    schedule_gamma: float = Field(0.1, gt=0)
    schedule_step: PositiveInt = 100
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    clip_grad_value: Optional[float] = Field(None, gt=0)
    lbfgs_max_iter: PositiveInt = Field(20, description="LBFGS: loss evaluations (inner iterations) per iteration.")
    lbfgs_line_search: Literal["strong_wolfe", "none"] = Field("strong_wolfe", description="LBFGS line search.")
    checkpoint_every: PositiveInt = 50
    log_format: Literal["csv", "jsonl"] = "csv"


class OutputConfig(StrictModel):
    """What a run writes besides log, loss curve, metrics and checkpoints."""

    render: bool = Field(True, description="Render result beside target (PNG).")
    turntable: bool = Field(False, description="Write a turntable GIF of the result.")
    save_mesh: bool = Field(True, description="Write the result mesh (PLY).")


def build_scene_model(task_union) -> type[BaseModel]:
    """The top-level scene model for the currently registered task types."""
    return create_model(
        "Scene",
        __base__=StrictModel,
        version=(Literal[1], Field(..., description="Scene format version.")),
        name=(str, Field("scene", description="Run name.")),
        seed=(int, Field(0, description="Seed of every random choice of the run.")),
        runtime=(RuntimeConfig, RuntimeConfig()),
        task=(task_union, Field(..., description="What to optimize; `type` selects the task.")),
        optimizer=(OptimizerConfig, OptimizerConfig()),
        output=(OutputConfig, OutputConfig()),
    )
