"""docs/scene-format.md against the schema: its YAML examples validate, its excerpts match the
scene files they quote, and the choices its comments list (``name: adam  # adam | adamw | sgd |
lbfgs``) are the schema's.

A block may be preceded by ``<!-- excerpt of scenes/X.yaml -->`` (merged into that file, then
validated, and each value must be the file's) or ``<!-- catalogue: why -->`` (an overview of
every option that cannot run as written: its keys must exist in the schema).
"""

import re
import typing
from pathlib import Path

import pytest
import yaml

from diffworld.app.scenes import _Loader, scene_model
from diffworld.engine.config import TASKS, OptimizerConfig, OutputConfig, RuntimeConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "scene-format.md").read_text()
BLOCKS = re.findall(r"(?:<!-- (excerpt of|catalogue:) ?(.*?) -->\n)?```yaml\n(.*?)```", DOC, flags=re.S)
SECTIONS = {"runtime": RuntimeConfig, "optimizer": OptimizerConfig, "output": OutputConfig}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _same_values(excerpt, full, path="") -> None:
    if isinstance(excerpt, dict):
        for k, v in excerpt.items():
            assert k in full, f"{path}.{k} is not in the file"
            _same_values(v, full[k], f"{path}.{k}")
    else:
        assert excerpt == full, (path, excerpt, full)


def test_the_doc_has_examples():
    assert len(BLOCKS) >= 6 and any(kind == "excerpt of" for kind, _, _ in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_example_validates(index, tmp_path):
    kind, what, text = BLOCKS[index]
    data = yaml.load(text, Loader=_Loader)
    assert isinstance(data, dict) and data
    if kind == "catalogue:":
        task_model = TASKS.model(data["task"]["type"])
        assert set(data["task"]) <= set(task_model.model_fields), set(data["task"]) - set(task_model.model_fields)
        return
    if kind == "excerpt of":
        path = ROOT / what
        full = yaml.load(path.read_text(), Loader=_Loader)
        _same_values(data, full)
        scene_model().model_validate(_merge(full, data), context={"scene_dir": path.parent})
        return
    if set(data) <= set(SECTIONS):
        for key, value in data.items():
            SECTIONS[key].model_validate(value)
    else:
        scene_model().model_validate({"version": 1, **data}, context={"scene_dir": tmp_path})


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_listed_choices_are_the_schema_choices(section):
    text = next(t for _, _, t in BLOCKS if t.startswith(f"{section}:"))
    checked = 0
    for key, choices in re.findall(r"^\s+(\w+): \S+\s+# ((?:[\w:.]+ \| )+[\w:.]+)", text, flags=re.M):
        field = SECTIONS[section].model_fields[key]
        if typing.get_origin(field.annotation) is typing.Literal:
            assert choices.split(" | ") == list(typing.get_args(field.annotation)), (section, key)
            checked += 1
    assert checked or section != "optimizer"
