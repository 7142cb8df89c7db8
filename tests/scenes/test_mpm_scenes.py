"""Every shipped MPM scene runs at a reduced size, its loss decreases, and it leaves its outputs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffworld.engine.cli import app
from diffworld.engine.scene import load_scene

SCENES = sorted((Path(__file__).resolve().parents[2] / "scenes").glob("mpm_*.yaml"))
runner = CliRunner()

REDUCED = {"optimizer.iterations": 4, "task.outputs.frames": 3}


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_mpm_scene_runs_reduced_and_loss_decreases(path, tmp_path):
    from diffworld.engine.runtime import get_runtime
    from diffworld.engine.scene import TASKS

    scene = load_scene(path, REDUCED)
    metrics = TASKS.builder(scene.task.type)(scene, get_runtime("cpu", scene.runtime.dtype), tmp_path,
                                             progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert metrics["final_loss"] < metrics["initial_loss"]
    for name in ("metrics.json", "loss.png", "before.png", "after.png", "rollout.gif", "trajectory.npz"):
        assert (tmp_path / name).is_file(), name
    traj = np.load(tmp_path / "trajectory.npz")
    assert traj["positions"].shape == (scene.task.steps + 1, metrics["particles"], 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["particles"] == metrics["particles"]


def test_mpm_scene_errors_name_the_key(tmp_path):
    path = Path(__file__).resolve().parents[2] / "scenes" / "mpm_push_plasticine.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("name: plasticine", "name: honey"))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "task.bodies[0].material.name" in result.output and "unknown material 'honey'" in result.output
    bad.write_text(path.read_text().replace("controlled: [pusher]", "controlled: [spoon]"))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "'spoon' is not a collider" in result.output
    bad.write_text(path.read_text().replace("  substeps: 20", "  dt: 0.5\n  substeps: 20"))
    result = runner.invoke(app, ["optimize", str(bad), "--out", str(tmp_path / "run"), "-n", "1", "--no-progress"])
    assert result.exit_code == 2 and "above the stability limit" in result.output
