"""transforms.json: round trip, the NeRF-synthetic convention (OpenGL axes, camera_angle_x), and
errors naming the frame and key."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffworld.render.camera import orbit_views
from diffworld.render.transforms import read_transforms, write_transforms

F64 = torch.float64


def test_round_trip(tmp_path):
    views = orbit_views((0.1, 0.0, 0.2), 0.4, 5, 40, 30, dtype=F64)
    write_transforms(views, tmp_path / "transforms.json", [f"img_{k}.png" for k in range(5)])
    back, files = read_transforms(tmp_path / "transforms.json", dtype=F64)
    assert (back.width, back.height) == (40, 30) and files[2] == str(tmp_path / "img_2.png")
    for name in ("cam_to_world", "fx", "fy", "cx", "cy"):
        assert torch.allclose(getattr(back, name), getattr(views, name), atol=1e-12), name


def test_nerf_synthetic_convention(tmp_path):
    """A camera at (0, 0, 4) with the identity rotation in OpenGL axes looks down -z at the
    origin: the origin lands at the image centre, in front; +y world is up in the image."""
    data = {"camera_angle_x": 2 * math.atan(0.5), "frames": [{"file_path": "./r_0",
            "transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]}]}
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"frames\[0\]: no image size"):
        read_transforms(tmp_path / "t.json")
    views, _ = read_transforms(tmp_path / "t.json", 100, 80, dtype=F64)
    assert float(views.fx[0]) == pytest.approx(100.0)  # 0.5 w / tan(angle / 2)
    uvz = views.project(torch.tensor([[0.0, 0, 0], [0, 0.5, 0]], dtype=F64))[0]
    assert uvz[0].tolist() == pytest.approx([50.0, 40.0, 4.0])
    assert float(uvz[1, 1]) < 40.0  # world +y is image-up (smaller row)


@pytest.mark.parametrize("edit,want", [
    (lambda d: d.pop("frames"), "non-empty 'frames'"),
    (lambda d: d["frames"][0].pop("file_path"), r"frames\[0\].file_path: missing"),
    (lambda d: d["frames"][0].update(transform_matrix=[[1, 0], [0, 1]]), r"frames\[0\].transform_matrix: expected a finite 4 x 4"),
    (lambda d: d["frames"][0].update(transform_matrix="eye"), r"frames\[0\].transform_matrix: expected a 4 x 4 list"),
    (lambda d: d.pop("camera_angle_x"), r"frames\[0\]: no intrinsics"),
    (lambda d: d.update(camera_angle_x=4.0), r"camera_angle_x: expected an angle in \(0, pi\)"),
    (lambda d: d["frames"][0].update(w=64), r"frames\[0\]: the file says 64 x 48 pixels, the images are 32 x 48"),
    (lambda d: d["frames"][0]["transform_matrix"][0].__setitem__(0, 2.0), "rotations"),
])
def test_bad_files_are_refused(tmp_path, edit, want):
    data = {"camera_angle_x": 0.7, "h": 48,
            "frames": [{"file_path": "a.png", "transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]}]}
    edit(data)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=want):
        read_transforms(p, width=32)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_transforms(p)
