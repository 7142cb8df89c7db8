"""Loading scene files: YAML -> validated model, with errors that name file, key path and want.

Relative paths inside a scene resolve against the scene file's folder (validators read the folder
from the validation context key ``scene_dir``).
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from diffworld.engine.config.registry import TASKS
from diffworld.engine.config.schema import build_scene_model

__all__ = ["SceneError", "TASKS", "load_scene", "load_yaml", "scene_json_schema", "scene_model"]

#: Entry-point group through which other packages add task types (their module registers itself
#: in ``TASKS`` on import), e.g. in pyproject.toml:
#: ``[project.entry-points."diffworld.tasks"] my_task = "my_package.my_task"``.
TASK_ENTRY_POINTS = "diffworld.tasks"
_LOADED = False


def load_tasks() -> None:
    """Register every task type: the built-in ones (:mod:`diffworld.tasks`) and the entry points."""
    global _LOADED
    if _LOADED:
        return
    import diffworld.tasks  # noqa: F401 - registers the built-in tasks

    for ep in entry_points(group=TASK_ENTRY_POINTS):
        ep.load()
    _LOADED = True


class SceneError(ValueError):
    """A scene file that cannot be used; the message names the file, key path and expectation."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``5e+2`` as floats (YAML 1.1 requires a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file with the float-friendly loader.

    Raises:
        SceneError: Missing file or invalid YAML (with line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise SceneError(f"{path}: scene file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SceneError(f"{path}: invalid YAML: {exc}") from None


def scene_model() -> type[BaseModel]:
    """The scene model for every registered task type."""
    load_tasks()
    return build_scene_model(TASKS.union())


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _strip_tags(loc: tuple, data: Any) -> tuple:
    """Drop the discriminator tags pydantic inserts into locations (``task.reconstruction.x``)."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # a tag: the key is not in the data, the section's type is
        out.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


def _format_errors(path: Path, exc: ValidationError, data: Any) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = _strip_tags(tuple(err["loc"]), data)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        given = err.get("input")
        given_txt = "" if err["type"] in ("missing",) else f" (given: {given!r})"
        if len(given_txt) > 120:
            given_txt = given_txt[:117] + "...)"
        lines.append(f"{path}: {_format_loc(loc)}: {msg}{given_txt}")
    return "\n".join(lines)


def load_scene(path: str | Path, overrides: dict[str, Any] | None = None) -> BaseModel:
    """Read and validate a scene file.

    Args:
        path: Scene YAML file.
        overrides: Dotted keys to set before validation, e.g. ``{"optimizer.iterations": 10}``.

    Returns:
        The validated scene model (``.task`` holds the task's own model).

    Raises:
        SceneError: Naming the file, the key path and what was expected.
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise SceneError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    try:
        return scene_model().model_validate(data, context={"scene_dir": path.resolve().parent})
    except ValidationError as exc:
        raise SceneError(_format_errors(path, exc, data)) from None


def scene_json_schema() -> dict:
    """JSON Schema of the scene format (every registered task)."""
    return scene_model().model_json_schema()
