"""MPM scenes: trajectory optimization and system identification through the differentiable MPM."""

from diffworld.tasks.mpm import task

__all__ = ["task"]
