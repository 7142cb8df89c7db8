"""Bad MPM scene input gets errors that name the file: an open mesh used as a filled body."""

import pytest
import torch
import trimesh

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

