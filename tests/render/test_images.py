"""Image targets: rendering a mesh into masks, depth and normals; reading a folder of images
with a transforms.json (round trip through PNG and .npy files) and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh

from diffworld.render.camera import orbit_views
from diffworld.render.images import image_losses, load_image_target, render_views, target_from_mesh
from diffworld.render.transforms import write_transforms

F64 = torch.float64


def _sphere():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    return torch.tensor(m.vertices, dtype=F64), torch.tensor(m.faces)


def _write_folder(tmp_path, target, depth=True, normal=True):
    from PIL import Image

    V = len(target.views)
    names = [f"r_{k}.png" for k in range(V)]
    write_transforms(target.views, tmp_path / "transforms.json", names)
    data = json.loads((tmp_path / "transforms.json").read_text())
    for k in range(V):
        rgba = np.zeros((target.views.height, target.views.width, 4), np.uint8)
        rgba[..., :3] = 200
        rgba[..., 3] = np.round(target.mask[k].numpy() * 255).astype(np.uint8)
        Image.fromarray(rgba).save(tmp_path / names[k])
        if depth:
            np.save(tmp_path / f"d_{k}.npy", target.depth[k].numpy())
            data["frames"][k]["depth_file_path"] = f"d_{k}.npy"
        if normal:
            np.save(tmp_path / f"n_{k}.npy", target.normal[k].numpy())
            data["frames"][k]["normal_file_path"] = f"n_{k}.npy"
    (tmp_path / "transforms.json").write_text(json.dumps(data))
    return data


def test_a_rendered_target_has_the_sphere_s_depth_and_normals():
    v, f = _sphere()
    views = orbit_views((0, 0, 0), 0.3, 3, 40, 32, dtype=F64)
    t = target_from_mesh(v, f, views)
    seen = t.mask > 0.99
    hits = views.eyes[:, None, None, :] + t.depth[..., None] * views.ray_directions()
    assert float((hits[seen].norm(dim=-1) - 0.3).abs().max()) < 0.3 * 0.01  # on the (faceted) sphere
    # outward normals: along the hit point's direction, facing the camera
    cos = (t.normal[seen] * hits[seen] / hits[seen].norm(dim=-1, keepdim=True)).sum(-1)
    assert float(cos.min()) > 0.98
    assert float(image_losses(render_views(v, f, views), t)["mask"]) == 0.0


def test_truncated_depth_term_bounds_layer_mismatches():
    """With ``depth_truncation`` t, pixels whose depth residual is beyond t cost t^2 and give no
    gradient; within it the term and its gradient are plain L2's."""
    from diffworld.render.images import ImageTarget

    v, f = _sphere()
    views = orbit_views((0, 0, 0), 0.3, 2, 32, 32, dtype=F64)
    t = target_from_mesh(v, f, views)
    near = t.depth.clone()
    far = t.depth.clone()
    seen = t.mask > 0.5
    far[:, :16][seen[:, :16]] += 0.5  # half of the image sees another layer, 0.5 m behind
    far[:, 16:][seen[:, 16:]] += 0.015  # the other half 1.5 units off: within the cap
    vv = v.clone().requires_grad_(True)
    r = render_views(vv, f, views)
    scale, cap = 0.01, 3.0
    ref = image_losses(r, ImageTarget(views, t.mask, near), depth_scale=scale)["depth"]
    cut = image_losses(r, ImageTarget(views, t.mask, near), depth_scale=scale, depth_truncation=cap)["depth"]
    # every residual is within the cap here (the render of the same mesh): identical terms
    assert float(ref.detach()) < cap ** 2 and torch.equal(ref, cut)
    out = image_losses(r, ImageTarget(views, t.mask, far), depth_scale=scale, depth_truncation=cap)["depth"]
    both = (r.fragments.face >= 0) & seen
    res = ((r.depth - far)[both] / scale).abs()
    assert float(out.detach()) == pytest.approx(float(res.detach().clamp_max(cap).pow(2).mean()), rel=1e-12)
    # the far half adds no gradient: the same as the near half alone with the far pixels at the cap
    (g,) = torch.autograd.grad(out, vv, retain_graph=True)
    mask_far = torch.zeros_like(seen)
    mask_far[:, :16] = True
    n = float(both.sum())
    within = both & ~(mask_far & seen)
    expect = ((r.depth - far)[within] / scale).pow(2).sum() / n
    (g2,) = torch.autograd.grad(expect, vv)
    assert float(g2.abs().max()) > 1e-3 and torch.allclose(g, g2, atol=1e-12)


def test_a_folder_of_images_round_trips(tmp_path):
    v, f = _sphere()
    t = target_from_mesh(v, f, orbit_views((0, 0, 0), 0.3, 3, 40, 32, dtype=F64))
    _write_folder(tmp_path, t)
    back = load_image_target(tmp_path / "transforms.json", F64)
    assert torch.allclose(back.mask, t.mask, atol=0.5 / 255)
    assert torch.allclose(back.depth, t.depth) and torch.allclose(back.normal, t.normal)
    assert torch.allclose(back.views.cam_to_world, t.views.cam_to_world, atol=1e-12)


@pytest.mark.parametrize("break_it,want", [
    ("size", r"r_1.png: 20 x 16 pixels, the cameras say 40 x 32"),
    ("nan", r"d_2.npy: has NaN or infinite values \(frames\[2\].depth_file_path\)"),
    ("some_depth", r"depth_file_path is given for 2 of 3 frames"),
    ("empty", r"every mask is empty: the object is outside every view"),
    ("normal_shape", r"n_0.npy: shape \(32, 40\), expected \(32, 40, 3\)"),
    ("missing", r"r_2.png: no such image"),
])
def test_bad_folders_are_refused(tmp_path, break_it, want):
    from PIL import Image

    v, f = _sphere()
    t = target_from_mesh(v, f, orbit_views((0, 0, 0), 0.3, 3, 40, 32, dtype=F64))
    data = _write_folder(tmp_path, t)
    if break_it == "size":
        Image.fromarray(np.zeros((16, 20, 4), np.uint8)).save(tmp_path / "r_1.png")
    elif break_it == "nan":
        d = t.depth[2].numpy().copy()
        d[3, 4] = np.nan
        np.save(tmp_path / "d_2.npy", d)
    elif break_it == "some_depth":
        del data["frames"][1]["depth_file_path"]
        (tmp_path / "transforms.json").write_text(json.dumps(data))
    elif break_it == "empty":
        for k in range(3):
            Image.fromarray(np.zeros((32, 40, 4), np.uint8)).save(tmp_path / f"r_{k}.png")
    elif break_it == "normal_shape":
        np.save(tmp_path / "n_0.npy", np.zeros((32, 40)))
    elif break_it == "missing":
        (tmp_path / "r_2.png").unlink()
    with pytest.raises(ValueError, match=want):
        load_image_target(tmp_path / "transforms.json", F64)
