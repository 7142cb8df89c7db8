"""The box-lid and block-repose tactile scenes (DiffTactile's box opening and object repose): their
static MPM colliders (a clamped box, a sticky hinge mount, a rough strip), what those colliders
are for (the hinge holds, the pivot edge does not slip), and the reduced scenes' losses falling."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from diffworld.app.scenes import load_scene
from diffworld.engine.runtime import init_warp

torch.set_num_threads(1)
init_warp()

SCENES = Path(__file__).resolve().parents[2] / "scenes"
F32 = torch.float32


def _task(name: str, **over):
    from diffworld.tasks.tactile.config import TactileTask

    task = yaml.safe_load((SCENES / name).read_text())["task"]
    for k, v in over.items():
        node = task
        *path, last = k.split(".")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = v
    return TactileTask.model_validate(task)


def _simulate(task):
    from diffworld.tasks.tactile.build import build_scene

    scene = build_scene(task, F32, torch.device("cpu"))
    with torch.no_grad():
        out = scene.simulate()
    return scene, out


def _pivot_edge(scene, out):
    """The block's particles on its bottom +x edge at the start, and their positions per record."""
    mask = scene.mpm_model.body == scene.body_index["block"]
    x0 = out.mpm_states[0].x[mask]
    edge = (x0[:, 0] > x0[:, 0].max() - 1e-4) & (x0[:, 2] < x0[:, 2].min() + 1e-4)
    assert int(edge.sum()) >= 3
    return torch.stack([s.x[mask][edge] for s in out.mpm_states])


def test_the_rough_strip_holds_the_pivot_edge_and_the_plain_table_does_not():
    """The repose scene's initial push for 40 control steps: with the rough strip the block turns
    about its bottom +x edge (the edge moves < 0.5 mm along x while the block turns > 0.3 rad); on
    the plain table (friction 1) the same push slides that edge by over 1 mm."""
    scene, out = _simulate(_task("tactile_repose_block.yaml", steps=40))
    angle = scene.body_angle(out, "block", (0, 1, 0))
    edge = _pivot_edge(scene, out)
    slip = float((edge[:, :, 0] - edge[0, :, 0]).abs().max())
    assert float(angle[-1]) > 0.3 and slip < 5e-4, (float(angle[-1]), slip)
    plain = _task("tactile_repose_block.yaml", steps=40)
    plain.mpm.colliders = []
    scene, out = _simulate(plain)
    edge = _pivot_edge(scene, out)
    assert float((edge[-1, :, 0] - edge[0, :, 0]).mean()) > 1e-3


def test_the_lid_turns_about_its_hinge_and_the_hinge_stays_on_the_box():
    """The lid scene's initial lift for 30 control steps: the lid turns about -y by over 0.05 rad
    while the hinge's centre of mass moves less than 0.3 mm (glued by the sticky mount)."""
    scene, out = _simulate(_task("tactile_open_lid.yaml", steps=30))
    angle = scene.body_angle(out, "lid", (0, -1, 0))
    hinge = scene.com(out, "hinge")
    assert float(angle[-1]) > 0.05, angle
    assert float((hinge - hinge[0]).norm(dim=1).max()) < 3e-4


def test_moving_colliders_are_refused_in_a_tactile_scene():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"colliders\.0|colliders\[0\]\.motion\.type: expected 'static'"):
        _task("tactile_open_lid.yaml", **{"mpm.colliders.0.motion": {"type": "keyframes", "keyframes": [
            {"t": 0.0, "position": [0.03, 0.03, 0.00875]}]}})


@pytest.mark.parametrize("name,over", [
    ("tactile_open_lid.yaml", {"task.steps": 15, "task.objective.losses": [
        {"type": "rotation", "body": "lid", "axis": [0, -1, 0], "target": 0.1, "scale": 0.05, "start": 10}]}),
    ("tactile_repose_block.yaml", {"task.steps": 20, "task.objective.losses": [
        {"type": "rotation", "body": "block", "axis": [0, 1, 0], "target": 0.3, "scale": 0.2, "start": 15}]}),
], ids=["lid", "repose"])
def test_lid_and_repose_scenes_reduced(tmp_path, name, over):
    """Shorter horizons with reachable targets, 2 iterations: the rotation loss falls; the
    pictures, forces and GIF are written."""
    from diffworld.engine.run import run_scene
    from diffworld.engine.runtime import get_runtime

    scene = load_scene(SCENES / name, {"optimizer.iterations": 2, "task.outputs.frames": 2, **over})
    m = run_scene(scene, get_runtime("cpu", scene.runtime.dtype), tmp_path, progress=False)
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "log.csv"))]
    assert len(losses) == 2
    assert m["final_loss"] < m["initial_loss"]
    for f in ("forces.png", "before.png", "after.png", "rollout.gif", "velocities.npy"):
        assert (tmp_path / f).is_file(), f
