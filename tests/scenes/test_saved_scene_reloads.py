"""A run's ``scene.yaml`` (the scene as validated, every default written out) loads again as the
same scene, for every shipped scene: a user can rerun or edit the copy a run leaves behind."""

from pathlib import Path

import pytest
import yaml

from diffworld.app.scenes import load_scene

SCENES = sorted((Path(__file__).resolve().parents[2] / "scenes").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_saved_scene_reloads_as_the_same_scene(tmp_path, path):
    scene = load_scene(path)
    dumped = scene.model_dump(mode="json")
    saved = tmp_path / "scene.yaml"
    saved.write_text(yaml.safe_dump(dumped, sort_keys=False))  # as the CLI writes it
    assert load_scene(saved).model_dump(mode="json") == dumped
