"""The ground of every configuration: strict models, registries, and the sections every scene has.

Task packages (``diffworld.tasks``) register their config model and runner in :data:`TASKS`; the
scene files themselves are read by :mod:`diffworld.app.scenes`.
"""

from diffworld.engine.config.registry import TASKS, Registry
from diffworld.engine.config.schema import OptimizerConfig, OutputConfig, RuntimeConfig, StrictModel, scene_file

__all__ = ["OptimizerConfig", "OutputConfig", "Registry", "RuntimeConfig", "StrictModel", "TASKS", "scene_file"]
