"""MPM scene shapes: an open mesh used as a filled body is rejected naming the file; CSG shapes
(union, intersection, difference) fill their analytic volume; bad CSG gets a clear error."""

import math

import pytest
import torch
import trimesh

from diffworld.tasks.mpm.config import ShapeConfig


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



def test_csg_shapes_fill_their_analytic_volume():
    from diffworld.sims.mpm.bodies import fill_shape

    block = {"type": "box", "center": [0.5, 0.5, 0.5], "half_extents": [0.2, 0.1, 0.1]}
    slot = {"type": "box", "center": [0.55, 0.5, 0.5], "half_extents": [0.05, 0.2, 0.2]}
    ball = {"type": "sphere", "center": [0.5, 0.5, 0.5], "radius": 0.1}
    h = 0.01
    # union: a ball centred on the block's +x face (it fits the cross-section): box + half a ball.
    # intersection: the ball centred in the block lies inside it: the ball.
    cases = [
        ({"type": "difference", "children": [block, slot]}, 0.4 * 0.2 * 0.2 - 0.1 * 0.2 * 0.2),
        ({"type": "union", "children": [block, {**ball, "center": [0.7, 0.5, 0.5]}]},
         0.4 * 0.2 * 0.2 + 2 / 3 * math.pi * 0.1 ** 3),
        ({"type": "intersection", "children": [block, ball]}, 4 / 3 * math.pi * 0.1 ** 3),
    ]
    for cfg, volume in cases:
        sdf = ShapeConfig(**cfg).build()
        n = fill_shape(sdf, (0.2, 0.2, 0.2), (0.9, 0.8, 0.8), h).shape[0]
        assert abs(n * h ** 3 - volume) / volume < 0.03, (cfg["type"], n * h ** 3, volume)
    with pytest.raises(ValueError, match="two or more 'children'"):
        ShapeConfig(type="union", children=[block])
    with pytest.raises(ValueError, match="'children' belong to union"):
        ShapeConfig(type="box", children=[block, ball])


def test_collider_contact_weight_key_is_validated_and_reaches_the_collider():
    from pydantic import ValidationError

    from diffworld.tasks.mpm.build import build_collider
    from diffworld.tasks.mpm.config import ColliderConfig

    assert build_collider(ColliderConfig(shape="box"), torch.float32).contact_weight == "clamped_exp"  # default
    cfg = ColliderConfig(shape="box", softness=100, contact_weight="smooth")
    assert build_collider(cfg, torch.float32).contact_weight == "smooth"
    with pytest.raises(ValidationError, match="needs softness > 0"):
        ColliderConfig(shape="box", contact_weight="smooth")
    with pytest.raises(ValidationError, match="contact_weight"):
        ColliderConfig(shape="box", softness=100, contact_weight="smoothstep")
