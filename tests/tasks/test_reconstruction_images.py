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
     "weights.surface: an image target without observed_points has no target points"),
    ({"type": "images", "source": {"type": "shape", "shape": "sphere"}, "channels": ["mask", "normal"],
      "observed_points": True}, {}, "observed_points: the points come from the depth maps"),
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


def _sphere_target(radius=0.3, views=8, size=48, frame=0.3):
    from diffworld.render.camera import orbit_views
    from diffworld.render.images import target_from_mesh

    m = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    v, f = torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces)
    return target_from_mesh(v, f, orbit_views((0, 0, 0), frame, views, size, size, dtype=torch.float64))


def test_observed_space_on_random_points_around_a_sphere():
    """What images of a sphere (r = 0.3 m, 8 orbiting views at +-20 degrees) say about random
    points: every point on the sphere is observed surface and never free space; every point
    outside that some view sees clearly (its ray misses the sphere by margin plus 4 pixels, or
    hits it well behind the point, 2 pixels inside the image) is free and none is surface;
    points well inside are neither (hidden from every view)."""
    from diffworld.tasks.reconstruction.images import observed_space

    images = _sphere_target(size=96, frame=0.5)  # framing the points around the sphere too
    margin = 0.02
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(600, 3, generator=g, dtype=torch.float64), dim=-1)
    dirs = dirs[dirs[:, 2].abs() < 0.25]  # where the views (elevations +-20 deg) see the sphere face on
    on = dirs * 0.3
    free, surface = observed_space(on, images, margin)
    assert not bool(free.any()) and bool(surface.all()), (int(free.sum()), int((~surface).sum()))
    # outside: free wherever some view judges it clearly; the truth from ray-sphere geometry
    r = 0.3 + margin + 0.02 + 0.15 * torch.rand(len(dirs), 1, generator=g, dtype=torch.float64)
    p = dirs * r
    free, surface = observed_space(p, images, margin)
    assert not bool(surface.any())
    v = images.views
    uvz = v.project(p)
    d = p[None] - v.eyes[:, None]  # (V, N, 3) rays eye -> point
    dist = d.norm(dim=-1)
    theta = torch.acos(((-v.eyes[:, None]) * d).sum(-1) / (v.eyes.norm(dim=-1)[:, None] * dist))
    alpha = torch.asin(0.3 / v.eyes.norm(dim=-1))[:, None]  # the sphere's angular radius
    pixel = 1.0 / v.fx[:, None]  # radians per pixel near the image centre
    inside = (uvz[..., 0] > 2) & (uvz[..., 0] < v.width - 2) & (uvz[..., 1] > 2) & (uvz[..., 1] < v.height - 2)
    # the first hit along the ray, as a distance from the eye, and the point's
    b = (d / dist[..., None] * v.eyes[:, None]).sum(-1)
    disc = b ** 2 - (v.eyes.norm(dim=-1)[:, None] ** 2 - 0.09)
    hit = -b - disc.clamp_min(0).sqrt()
    clear_bg = inside & (theta - alpha > margin / uvz[..., 2] + 4 * pixel)
    clear_front = inside & (theta < alpha - 4 * pixel) & (dist < hit - 2 * margin - 0.05)
    judged = (clear_bg | clear_front).any(0)
    assert int(judged.sum()) > 0.7 * len(p) and bool(free[judged].all()), (int(judged.sum()), int(free[judged].sum()))
    inside = dirs * (0.3 - margin - 0.05) * torch.rand(len(dirs), 1, generator=g, dtype=torch.float64)
    free, surface = observed_space(inside, images, margin)
    assert not bool(free.any()) and not bool(surface.any())
    with pytest.raises(ValueError, match="needs depth maps"):
        from diffworld.render.images import ImageTarget

        observed_space(on, ImageTarget(images.views, images.mask), margin)


def test_observed_points_lie_on_the_surface_with_its_normals():
    from diffworld.tasks.reconstruction.images import observed_points

    images = _sphere_target()
    pts, nrm = observed_points(images, max_points=5000)
    assert 1000 < pts.shape[0] <= 5000
    # icosphere (level 5) chords sag at most r (1 - cos(edge/2r)) ~ 0.1 mm below the sphere
    assert float((pts.norm(dim=-1) - 0.3).abs().max()) < 2e-3
    cos = (nrm * torch.nn.functional.normalize(pts, dim=-1)).sum(-1)
    assert float(cos.min()) > 0.99


def test_two_sided_normal_term_ignores_the_winding():
    """An open surface's normals have no outside: with ``two_sided`` the normal term of a
    render is the same for either winding of the same triangles; one-sided it is not."""
    from diffworld.render.images import image_losses, render_views

    images = _sphere_target()
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.29)
    v, f = torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces)
    a = image_losses(render_views(v, f, images.views), images, two_sided=True)["normal"]
    b = image_losses(render_views(v, f.flip(1), images.views), images, two_sided=True)["normal"]
    c = image_losses(render_views(v, f.flip(1), images.views), images)["normal"]
    assert abs(float(a - b)) < 1e-12 and float(a) < 0.02 and float(c) > 1.9


def test_msdf_terms_from_images_leave_hidden_template_vertices_alone():
    """The msdf regularizers from images push free-space vertices down and observed-surface
    ones up, and give no gradient to vertices no view can judge."""
    from diffworld.geometry.gshell import msdf_regularizers

    nu = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.5], dtype=torch.float64, requires_grad=True)
    surface = torch.tensor([True, False, False, False, False])
    free = torch.tensor([False, True, False, True, False])
    reg = msdf_regularizers(nu, surface, 0.1, negative=free)
    # free: (-0.2 + 0.1) -> 0, (0.5 + 0.1)^2 / 0.01 = 36 -> mean 18; surface: 0.3 >= 0.1 -> 0
    assert abs(float(reg.negative.detach()) - 18.0) < 1e-9 and float(reg.positive.detach()) == 0.0
    (g,) = torch.autograd.grad(reg.negative + reg.positive, nu)
    assert g[2] == 0 and g[4] == 0 and g[0] == 0 and g[3] > 0
    with pytest.raises(ValueError, match="'negative': expected a bool tensor"):
        msdf_regularizers(nu, surface, 0.1, negative=free[:3])


def test_open_cup_template_is_classified_from_its_views():
    """On the cup's own G-Shell fields, the images (16 views of 96^2 with depth) never put a
    vertex of the cup in free space, and put nearly all of the lid there: what the msdf terms
    need to cut the lid away and keep the cup."""
    from diffworld.app.scenes import load_scene as load
    from diffworld.tasks.reconstruction.images import image_reference, observed_space
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scenes" / "reconstruct_images_gshell.yaml"
    scene = load(path, {"task.target.width": 96, "task.target.height": 96, "task.evaluation.n_points": 2000})
    ref, images = image_reference(scene.task, 0, torch.float64, "cpu")
    base = ref.baseline_gshell(32, scene.task.bounds, torch.float64)
    t = base.template
    kept = t.attributes[:, 0] > 0
    free, surface = observed_space(t.vertices, images, 1.0 / 32)
    assert not bool((free & kept).any())
    assert float(surface[kept].double().mean()) > 0.98
    assert float(free[~kept].double().mean()) > 0.9, float(free[~kept].double().mean())


def test_msdf_image_terms_push_the_free_grid_nodes():
    """G-Shell on a sphere's own SDF, images of that sphere: no template vertex is in free space,
    so the negative msdf term's gradient is exactly on the grid nodes the views see as free
    (computed once per grid shape and cached), and none of them is on the sphere."""
    from diffworld.geometry.reconstruction import GShellGrid
    from diffworld.geometry.grid import Grid
    from diffworld.geometry.sdf import Sphere, sample_grid
    from diffworld.tasks.reconstruction.images import msdf_image_terms, observed_space

    images = _sphere_target(size=64, frame=0.45)
    bounds = ((-0.5,) * 3, (0.5,) * 3)
    h = 1.0 / 16
    values = sample_grid(Sphere(0.3).double(), Grid.make(16, bounds), dtype=torch.float64)
    rep = GShellGrid(values, torch.full_like(values, h), bounds, msdf_eps=h, msdf_radius=h)
    mesh = rep.extract()
    t_free, t_surface = observed_space(mesh.template.vertices, images, h)
    assert not bool(t_free.any()) and float(t_surface.double().mean()) > 0.9
    cache = {}
    reg = msdf_image_terms(mesh, images, h, h, rep, cache)
    (g,) = torch.autograd.grad(reg.negative, rep.msdf)
    nodes, _ = rep.probe()
    free = observed_space(nodes, images, h)[0]
    assert list(cache) == [tuple(rep.msdf.shape)] and torch.equal(cache[tuple(rep.msdf.shape)], free)
    assert bool((g.reshape(-1)[free] > 0).all()) and bool((g.reshape(-1)[~free] == 0).all())
    assert int(free.sum()) > 1000 and not bool((free & ((nodes.norm(dim=-1) - 0.3).abs() < 0.5 * h)).any())


def test_observed_points_refuse_targets_without_usable_depth():
    from diffworld.render.images import ImageTarget
    from diffworld.tasks.reconstruction.images import observed_points

    t = _sphere_target()
    with pytest.raises(ValueError, match="need depth maps"):
        observed_points(ImageTarget(t.views, t.mask))
    with pytest.raises(ValueError, match="no foreground pixel with depth"):
        observed_points(ImageTarget(t.views, t.mask, torch.zeros_like(t.depth)))
    with pytest.raises(ValueError, match="no foreground pixel with depth"):  # zero normals everywhere
        observed_points(ImageTarget(t.views, t.mask, t.depth, torch.zeros_like(t.normal)))
