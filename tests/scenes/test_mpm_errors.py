"""Bad MPM input gets errors that name the file or key: an open mesh used as a filled body, and
rollout states that turn non-finite."""

import pytest
import torch
import trimesh

from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.mpm.task import ShapeConfig


def test_open_mesh_body_is_rejected_naming_the_file(tmp_path):
    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    open_box = trimesh.Trimesh(box.vertices, box.faces[:-2], process=False)  # one side removed
    path = tmp_path / "open_box.obj"
    open_box.export(path)
    shape = ShapeConfig(type="mesh", path=str(path))
    with pytest.raises(ValueError, match="open_box.obj.*watertight"):
        shape.build()
    closed = tmp_path / "box.obj"
    box.export(closed)
    sdf = ShapeConfig(type="mesh", path=str(closed)).build()
    inside = sdf(torch.full((1, 3), 0.5, dtype=torch.float64))  # re-centred at the default centre
    assert float(inside.reshape(-1)[0]) < 0


def test_non_finite_state_is_reported_with_particle_and_substep():
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=16)
    model, state = mpm.build_model(grid, [mpm.Body(Box((0.1,) * 3, (0.5, 0.5, 0.5)), mpm.material("jelly"))],
                                   dt=1e-3)
    v = state.v.clone()
    v[7, 1] = float("nan")
    with pytest.raises(mpm.SimulationError, match="non-finite .* after substep 4"):
        mpm.rollout(model, mpm.State(state.x, v, state.C, state.F), 4, window=2)
