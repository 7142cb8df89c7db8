"""Scene sections shared by every task: runtime, optimizer, output.

Every model forbids unknown keys. Numbers written like ``1e-3`` are floats (PyYAML alone reads
them as strings; the loader's YAML resolver and pydantic's lax mode both accept them).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from diffworld.engine.driver import CHOICES, FIELD_CHECKS, OptimizerSettings

__all__ = ["OptimizerConfig", "OutputConfig", "RuntimeConfig", "StrictModel", "build_scene_model", "reject_boolean",
           "scene_file"]


def reject_boolean(value: Any) -> Any:
    """Before-validator of a numeric field: YAML's true/false would otherwise pass as 1/0
    (``lr: true`` ran as lr = 1.0)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


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


# The largest integer a scene may hold: counts and resolutions far beyond it are typing errors
# (a resolution of 10^30 used to reach torch and fail there).
MAX_INT = 2**31 - 1


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean somewhere (bool, Any, a literal true or false, a
    union or container with one)."""
    if annotation is bool or annotation is Any or isinstance(annotation, bool):
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


def _number_problem(value: Any, depth: int = 0) -> str | None:
    """What is wrong with a value meant to be numbers: a boolean, or an integer beyond MAX_INT."""
    if isinstance(value, bool):
        return f"expected a number, got a boolean ({str(value).lower()})"
    if isinstance(value, int) and abs(value) > MAX_INT:
        return f"expected a number of at most {MAX_INT} in size, got one with {len(str(abs(value)))} digits"
    if isinstance(value, (list, tuple)) and depth < 3:
        for item in value[:64]:
            problem = _number_problem(item, depth + 1)
            if problem:
                return problem
    return None


class StrictModel(BaseModel):
    """Base of every scene model: unknown keys are errors, floats must be finite, numbers must not
    be YAML booleans (``lr: true`` once ran as lr = 1.0) and integers stay below :data:`MAX_INT`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        # (a model-level check: a "*" field validator would also wrap discriminator fields, which
        # pydantic forbids; the loader moves "<key>: ..." messages to the key's path)
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is not None and not _takes_bool(field.annotation):
                    problem = _number_problem(value)
                    if problem:
                        raise ValueError(f"{name}: {problem}")
        return data


class RuntimeConfig(StrictModel):
    """Where the scene runs."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$",
                        description="'auto' (CUDA if Warp sees one, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating-point precision.")


# The scene's optimizer section is derived from the driver's OptimizerSettings: the same fields,
# defaults, choices and checks (driver.FIELD_CHECKS), so the two cannot drift apart. Left out:
# the seed (the scene's top-level ``seed``) and print_every (a command-line matter).
_NOT_IN_SCENES = ("seed", "print_every")
_DESCRIPTIONS = {
    "lr": "Learning rate (SDF grids: grid cells per step).",
    "iterations": "Iterations (per stage for staged tasks).",
    "lbfgs_max_iter": "LBFGS: loss evaluations (inner iterations) per iteration.",
    "lbfgs_line_search": "LBFGS line search.",
    "checkpoint_every": "Checkpoint every this many iterations (0: only at the end of a stage).",
}


class _OptimizerSection(StrictModel):
    _numbers = field_validator(*(n for n in FIELD_CHECKS if n not in CHOICES and n not in _NOT_IN_SCENES),
                               mode="before", check_fields=False)(reject_boolean)

    @field_validator("*", mode="after")
    @classmethod
    def _driver_checks(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            FIELD_CHECKS[info.field_name](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value

    @model_validator(mode="after")
    def _combination(self):
        try:
            self.settings(seed=0)  # the checks across fields (e.g. no weight decay with LBFGS)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc).removeprefix("OptimizerSettings.")) from None
        return self

    def settings(self, seed: int, **changes: Any) -> OptimizerSettings:
        """The driver's settings for this section, with the run's ``seed`` and any ``changes``."""
        return OptimizerSettings(**{**self.model_dump(), "seed": seed, **changes})


def _optimizer_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(OptimizerSettings)
    fields = {}
    for f in dataclasses.fields(OptimizerSettings):
        if f.name in _NOT_IN_SCENES:
            continue
        kind = Literal[CHOICES[f.name]] if f.name in CHOICES else hints[f.name]
        fields[f.name] = (kind, Field(f.default, description=_DESCRIPTIONS.get(f.name)))
    return fields


OptimizerConfig = create_model("OptimizerConfig", __base__=_OptimizerSection, **_optimizer_fields())
OptimizerConfig.__doc__ = "Gradient-based optimizer settings (diffworld.engine.driver.OptimizerSettings)."


class OutputConfig(StrictModel):
    """What a run writes besides log, loss curve, metrics and checkpoints."""

    render: bool = Field(True, description="Render result beside target (PNG).")
    turntable: Literal[False, True, "gif", "mp4"] = Field(
        False, description="Write a turntable of the result: true or 'gif' (turntable.gif), 'mp4' (turntable.mp4, "
                           "H.264), false (none).")

    def turntable_name(self) -> str | None:
        """The turntable's file name, or None when none is asked for."""
        if self.turntable is False:
            return None
        return "turntable.mp4" if self.turntable == "mp4" else "turntable.gif"
    save_mesh: bool = Field(True, description="Write the result mesh (PLY).")


def build_scene_model(task_union) -> type[BaseModel]:
    """The top-level scene model for the currently registered task types."""
    return create_model(
        "Scene",
        __base__=StrictModel,
        version=(Literal[1], Field(..., description="Scene format version.")),
        name=(str, Field("scene", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$",
                         description="Run name (the default output folder runs/<name>): letters, digits, '_', "
                                     "'.', '+', '-', at most 100 characters.")),
        seed=(int, Field(0, description="Seed of every random choice of the run.")),
        runtime=(RuntimeConfig, RuntimeConfig()),
        task=(task_union, Field(..., description="What to optimize; `type` selects the task.")),
        optimizer=(OptimizerConfig, OptimizerConfig()),
        output=(OutputConfig, OutputConfig()),
    )
