"""The Problem protocol: what a task hands the optimizer, and :func:`solve`, which runs one.

A task builds a problem object per optimization stage (the MPM's trajectory and system
identification, a reconstruction stage); :func:`solve` resumes it and runs the driver on it. The
driver stays task-agnostic (it sees tensors and a loss function), and so does everything a
problem adds on top: projections, per-iteration callbacks, state rebuilt on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from diffworld.engine.driver import LossOutput, OptimizeResult, OptimizerSettings, ParamsArg, optimize

__all__ = ["BaseProblem", "Problem", "solve"]


@runtime_checkable
class Problem(Protocol):
    """An optimization stage.

    Attributes:
        stage: Stage name (the log column and ``checkpoints/{stage}.pt``).
    """

    stage: str

    def params(self) -> ParamsArg:
        """The optimized tensors by name (or parameter groups; see :func:`~diffworld.engine.driver.optimize`)."""
        ...

    def loss_fn(self, iteration: int) -> LossOutput:
        """Loss of one iteration, optionally with named terms to log."""
        ...

    def project(self) -> None:
        """Called under ``no_grad`` after every step (bounds, fixed components...)."""
        ...

    def callback(self, iteration: int, row: dict[str, Any]) -> bool | None:
        """Called after every iteration with its log row; True stops the stage."""
        ...

    def replay(self, checkpoint: Path) -> None:
        """Rebuild state that is not in the parameters (a schedule) from a checkpoint, on resume."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State the numbers depend on beyond the parameters and torch's global RNG (a private
        generator's state): saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint on resume."""
        ...


def solve(problem: Problem, settings: OptimizerSettings, out_dir: str | Path | None = None, *,
          resume: bool = False, progress: bool = True) -> OptimizeResult:
    """Run ``problem`` with the driver: replay its checkpoint when resuming, then optimize.

    Args:
        problem: The stage.
        settings: Optimizer settings.
        out_dir: Run folder (None writes nothing).
        resume: Continue from ``checkpoints/{problem.stage}.pt`` when it exists.
        progress: Show progress.

    Returns:
        The driver's :class:`~diffworld.engine.driver.OptimizeResult`.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"solve: expected a Problem (stage, params, loss_fn, project, callback, replay, "
                        f"state_dict, load_state_dict), "
                        f"got {type(problem).__name__}")
    if resume and out_dir is not None:
        problem.replay(Path(out_dir) / "checkpoints" / f"{problem.stage}.pt")
    return optimize(problem.params(), problem.loss_fn, settings, out_dir, stage=problem.stage, resume=resume,
                    progress=progress, callback=problem.callback, projection=problem.project,
                    state=problem.state_dict, load_state=problem.load_state_dict)


class BaseProblem:
    """Defaults for the optional parts of :class:`Problem`: no projection, no callback, nothing to
    replay, no state beyond the parameters."""

    stage = "main"

    def project(self) -> None:
        return None

    def callback(self, iteration: int, row: dict[str, Any]) -> bool | None:
        return None

    def replay(self, checkpoint: Path) -> None:
        return None


    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
