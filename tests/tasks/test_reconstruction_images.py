"""Reconstruction from images (the ``images`` target): configuration errors, a reduced run from
rendered views of a sphere whose masks, depth and normals it reproduces, and a run from a folder
of images with a reference mesh for the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh
import yaml

from diffworld.app.scenes import SceneError, load_scene
from diffworld.engine.run import run_scene
from diffworld.engine.runtime import get_runtime

torch.set_num_threads(1)


def _scene(tmp_path, target, **task):
    data = {"version": 1, "name": "img", "seed": 0,
            "task": {"type": "reconstruction", "target": target,
                     "representation": {"type": "grid", "resolutions": [16], "init_radius": 0.2},
                     "weights": {"eikonal": 0.1, "smoothness": 0.0}, "evaluation": {"n_points": 20000}, **task},
            "optimizer": {"lr": 0.3, "iterations": 30, "schedule": "cosine"}, "output": {"render": False}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("target,weights,want", [
    ({"type": "images"}, {}, "exactly one of 'source'"),
    ({"type": "images", "source": {"type": "shape", "shape": "sphere"}, "path": "t.json"}, {}, "exactly one of"),
    ({"type": "images", "source": {"type": "shape", "shape": "sphere"}}, {"surface": 2.0},
     "weights.surface: an image target has no target points"),
    ({"type": "images", "source": {"type": "shape", "shape": "sphere"}, "channels": ["depth"]}, {},
     "the mask is always used"),
    ({"type": "images", "source": {"type": "shape", "shape": "sphere"}, "reference": "m.obj"}, {},
     "'reference' goes with 'path'"),
])
def test_bad_image_targets_are_refused(tmp_path, target, weights, want):
    (tmp_path / "t.json").write_text("{}")
    (tmp_path / "m.obj").write_text("")
    p = _scene(tmp_path, target)
    data = yaml.safe_load(p.read_text())
    data["task"]["weights"].update(weights)
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(SceneError, match=want):
        load_scene(p)


def test_a_sphere_is_reconstructed_from_its_rendered_views(tmp_path):
    p = _scene(tmp_path, {"type": "images", "source": {"type": "shape", "shape": "sphere"}, "views": 6,
                          "width": 48, "height": 40})
    scene = load_scene(p, {"optimizer.iterations": 60})
    m = run_scene(scene, get_runtime("cpu", "float32"), tmp_path / "out", progress=False)
    img, res = m["images"], m["result"]
    assert img["mask_iou"] > 0.95 and img["normal_angle_deg"] < 8.0 and img["depth_rmse"] < 0.03, img
    assert res["watertight"] and res["components"] == 1 and res["chamfer_l1"] < 0.015, res
    rows = (tmp_path / "out" / "log.csv").read_text().splitlines()
    head = rows[0].split(",")
    first, last = rows[1].split(","), rows[-1].split(",")
    i = head.index("image_mask")
    assert float(last[i]) < 0.2 * float(first[i])
    assert (tmp_path / "out" / "views.png").is_file()


def test_a_folder_of_images_with_a_reference_mesh(tmp_path):
    from PIL import Image

    from diffworld.render.camera import orbit_views
    from diffworld.render.images import target_from_mesh
    from diffworld.render.transforms import write_transforms

    mesh = trimesh.creation.box(extents=(0.5, 0.4, 0.3))
    mesh.export(tmp_path / "box.obj")
    v, f = torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.faces)
    t = target_from_mesh(v, f, orbit_views((0, 0, 0), 0.35, 6, 48, 40, dtype=torch.float64))
    names = [f"m_{k}.png" for k in range(6)]
    write_transforms(t.views, tmp_path / "transforms.json", names)
    data = json.loads((tmp_path / "transforms.json").read_text())
    for k in range(6):
        Image.fromarray(np.round(t.mask[k].numpy() * 255).astype(np.uint8)).save(tmp_path / names[k])  # grey masks
        np.save(tmp_path / f"d_{k}.npy", t.depth[k].numpy())
        data["frames"][k]["depth_file_path"] = f"d_{k}.npy"
    (tmp_path / "transforms.json").write_text(json.dumps(data))
    p = _scene(tmp_path, {"type": "images", "path": "transforms.json", "reference": "box.obj",
                          "channels": ["mask", "depth"]})
    m = run_scene(load_scene(p), get_runtime("cpu", "float32"), tmp_path / "out", progress=False)
    assert m["images"]["mask_iou"] > 0.93 and "normal_angle_deg" not in m["images"], m["images"]
    assert m["result"]["chamfer_l1"] < 0.02, m["result"]


def test_space_carving_pushes_out_what_a_view_sees_as_background():
    """A grid that is 'inside' everywhere: the carve term is positive, and its gradient raises
    exactly the nodes some view sees on an empty target pixel (here: outside a small disk)."""
    from diffworld.geometry.reconstruction import GridSDF
    from diffworld.render.camera import orbit_views
    from diffworld.render.images import ImageTarget
    from diffworld.tasks.reconstruction.images import carve_term

    views = orbit_views((0, 0, 0), 0.4, 1, 32, 32, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    mask = (((xx - 16) ** 2 + (yy - 16) ** 2) < 36).to(torch.float64)[None]
    rep = GridSDF(torch.full((17, 17, 17), -0.1, dtype=torch.float64, requires_grad=True),
                  ((-0.5,) * 3, (0.5,) * 3))
    term = carve_term(rep, ImageTarget(views, mask))
    (g,) = torch.autograd.grad(term, rep.values)
    assert float(term.detach()) > 0
    x, _ = rep.probe()
    uvz = views.project(x)[0]
    in_image = (uvz[:, 0] >= 0) & (uvz[:, 0] < 32) & (uvz[:, 1] >= 0) & (uvz[:, 1] < 32) & (uvz[:, 2] > 0)
    px, py = uvz[:, 0].clamp(0, 31).long(), uvz[:, 1].clamp(0, 31).long()
    background = in_image & (mask[0, py, px] < 0.5)
    g = g.reshape(-1)
    # only the nodes seen on background are pushed (gradient < 0: raising them lowers the loss)
    assert bool((g[~background] == 0).all()) and bool((g[background] < 0).all()) and int(background.sum()) > 100


def test_single_view_neural_scene_reduced(tmp_path):
    """scenes/reconstruct_images_neural.yaml at 64^2 and 150 iterations: one view with depth
    recovers a closed torus (genus 1) that fills the target's mask."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scenes" / "reconstruct_images_neural.yaml"
    scene = load_scene(path, {"task.target.width": 64, "task.target.height": 64, "optimizer.iterations": 150,
                              "task.evaluation.n_points": 20000, "output.render": False})
    m = run_scene(scene, get_runtime("cpu", "float32"), tmp_path, progress=False)
    assert m["images"]["mask_iou"] > 0.85, m["images"]
    assert m["result"]["watertight"] and m["result"]["genus"] == 1, m["result"]
