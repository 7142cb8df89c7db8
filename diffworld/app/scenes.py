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


# Limits on what a scene file may be: far above any real scene, far below what hurts.
MAX_BYTES = 8 * 1024 * 1024  # file size
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_VALUES = 200_000  # values after alias expansion (a "billion laughs" file is refused here)
_SHOWN = 80  # characters of a given value quoted in a message


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` and ``5e+2`` as floats (YAML 1.1 requires a dot) and refuses
    duplicate keys, naming both lines."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)} (first at line {seen[key] + 1}, again at line "
                                    f"{key_node.start_mark.line + 1}); a key may appear once in a mapping",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _short(value: Any, limit: int = _SHOWN) -> str:
    """repr of a value, never more than ``limit`` characters (and never built in full first)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 6, 6, 3
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _decode(path: Path, raw: bytes) -> str:
    """Text of a scene file: UTF-8 (a BOM is allowed), or UTF-16/32 with a BOM."""
    import codecs

    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise SceneError(f"{path}: not valid {encoding.upper()} text despite its byte-order mark "
                                 f"({exc.reason} at byte {exc.start})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SceneError(f"{path}: line {line}, column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8; "
                         f"save the scene as UTF-8 text") from None


def _children(node) -> list:
    """Key and value nodes of a mapping node, items of a sequence node, nothing for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_size(path: Path, root) -> None:
    """Refuse nesting deeper than MAX_DEPTH and more than MAX_VALUES values once aliases are
    expanded, walking the node graph iteratively with memoized sizes (a bomb costs its node count)."""
    sizes: dict[int, int] = {}
    stack = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in _children(node)), MAX_VALUES + 1)
            if sizes[key] > MAX_VALUES:
                raise SceneError(f"{path}: line {node.start_mark.line + 1}: more than {MAX_VALUES} values once "
                                 f"aliases (*name) are expanded; a scene is far smaller (an alias bomb?)")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise SceneError(f"{path}: line {node.start_mark.line + 1}: an alias refers to a node that contains "
                             f"it (a recursive structure); scenes are trees")
        if depth > MAX_DEPTH:
            raise SceneError(f"{path}: line {node.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            on_path.add(key)
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in _children(node))
        else:
            sizes[key] = 1


def _yaml_message(exc: yaml.YAMLError, path: Path) -> str:
    message = str(exc).replace('"<unicode string>"', f'"{path}"')
    return message if len(message) <= 2000 else message[:2000] + " ..."


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML scene file safely: size, encoding, nesting, alias expansion and duplicate keys
    are checked before anything is built.

    Raises:
        SceneError: Missing or unreadable file, bad encoding, invalid YAML (with line and column),
            duplicate keys, too deep or too large.
    """
    path = Path(path)
    if path.is_dir():
        raise SceneError(f"{path}: is a folder; expected a scene file (.yaml)")
    if not path.is_file():
        raise SceneError(f"{path}: scene file not found")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SceneError(f"{path}: {size} bytes; a scene file is at most {MAX_BYTES} bytes "
                             f"(large data belongs in asset files it names)")
        raw = path.read_bytes()
    except OSError as exc:
        raise SceneError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    text = _decode(path, raw)
    try:
        loader = _Loader(text)  # (the reader rejects control characters here)
    except yaml.YAMLError as exc:
        raise SceneError(f"{path}: invalid YAML: {_yaml_message(exc, path)}") from None
    loader.name = str(path)  # marks in messages name the file, not "<unicode string>"
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise SceneError(f"{path}: nested too deeply to parse (more than {MAX_DEPTH} levels allowed)") from None
        if root is None:
            return None
        _check_size(path, root)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise SceneError(f"{path}: invalid YAML: {_yaml_message(exc, path)}") from None
    finally:
        loader.dispose()


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
    for i, part in enumerate(loc):
        if isinstance(node, dict) and node.get("type") == part:
            # a tag, unless the section also has a key of that name that the path goes through
            # (target type 'shape' with a key 'shape': task.target.n_points, not ...shape.n_points)
            more = i + 1 < len(loc)
            if part not in node or (more and not isinstance(node[part], (dict, list))):
                continue
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
        # a section-level check about one key ("lr: expected a number..."): report it at the key
        key = re.match(r"Value error, ([A-Za-z_][A-Za-z0-9_]*): ", msg)
        if key and isinstance(err.get("input"), dict) and key.group(1) in err["input"]:
            loc, msg = (*loc, key.group(1)), msg[len(key.group(0)):]
            err = {**err, "input": err["input"][key.group(1)]}
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        given_txt = "" if err["type"] in ("missing",) else f" (given: {_short(err.get('input'))})"
        if len(msg) > 400:  # a message quoting a huge value
            msg = msg[:397] + "..."
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
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                where = ".".join(keys[:i + 1])
                raise SceneError(f"{path}: {where}: expected a mapping (to set {dotted} from the command line), "
                                 f"got {_short(node)}")
        node[keys[-1]] = value
    try:
        return scene_model().model_validate(data, context={"scene_dir": path.resolve().parent})
    except ValidationError as exc:
        raise SceneError(_format_errors(path, exc, data)) from None


def scene_json_schema() -> dict:
    """JSON Schema of the scene format (every registered task)."""
    return scene_model().model_json_schema()
