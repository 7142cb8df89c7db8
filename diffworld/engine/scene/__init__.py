"""Scene files: versioned YAML -> strict pydantic models -> builders found in registries."""

from diffworld.engine.scene.loader import SceneError, load_scene, load_yaml, scene_json_schema
from diffworld.engine.scene.registry import TASKS, Registry
from diffworld.engine.scene.schema import OptimizerConfig, OutputConfig, RuntimeConfig, StrictModel

__all__ = [
    "OptimizerConfig",
    "OutputConfig",
    "Registry",
    "RuntimeConfig",
    "SceneError",
    "StrictModel",
    "TASKS",
    "load_scene",
    "load_yaml",
    "scene_json_schema",
]
