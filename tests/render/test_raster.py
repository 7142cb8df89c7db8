"""The rasterizer: analytic silhouettes and depths of a sphere, agreement with a brute-force
nearest-hit search on random triangle soups, float64 central differences of barycentric
interpolation, depth and normals w.r.t. vertices (pixels whose triangle does not change), the
camera conventions, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from diffworld.engine.gradcheck import directional_check
from diffworld.render.camera import Camera, Views, orbit_camera, orbit_views
from diffworld.render.raster import face_normals, interpolate, rasterize

torch.set_num_threads(1)
F64 = torch.float64


def _sphere(subdivisions=4, r=0.3, dtype=F64):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=r)
    return torch.tensor(m.vertices, dtype=dtype), torch.tensor(m.faces, dtype=torch.int64)


def _look(eye, center=(0, 0, 0), size=(64, 48), fov=40.0):
    eye, center = np.asarray(eye, float), np.asarray(center, float)
    fwd = (center - eye) / np.linalg.norm(center - eye)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    return Camera(eye, center, right, up, fwd, fov)


def test_a_sphere_has_its_analytic_silhouette_and_depth():
    """Pixels covered = the projected disk's area (perspective: a cone of half-angle asin(r/d));
    the depth along the optical axis is d - r; a pixel's depth matches the ray-sphere hit."""
    r, d = 0.3, 2.0
    verts, faces = _sphere(5, r)
    W = H = 128
    views = Views.from_cameras([_look((d, 0, 0)), _look((0, -d, 0.5))], W, H, F64)
    frags = rasterize(verts, faces, views)
    f = float(views.fx[0])
    # the silhouette of a sphere seen from distance D is a circle of radius f tan(asin(r / D))
    for k, D in enumerate((d, math.hypot(d, 0.5))):
        radius_px = f * math.tan(math.asin(r / D))
        area = float(frags.mask[k].sum())
        assert area == pytest.approx(math.pi * radius_px ** 2, rel=0.02), (area, math.pi * radius_px ** 2)
    # centre pixel of view 0: (W/2, H/2) is a pixel corner; the 4 pixels around it see the sphere
    # at depth ~ d - r (the mesh's facets are inside the sphere by < 0.2 %)
    c = frags.depth[0, H // 2 - 1:H // 2 + 1, W // 2 - 1:W // 2 + 1]
    assert float(c.min()) == pytest.approx(d - r, rel=3e-3) and float(c.max()) < d - r + 2e-3
    # every hit is on the mesh: eye + depth * dir (camera z = 1) lies on its triangle's plane
    dirs = views.ray_directions()
    hit = frags.face >= 0
    pts = views.eyes[:, None, None, :] + frags.depth[..., None] * dirs
    tri = faces[frags.face[hit]]
    recon = (verts[tri] * frags.bary[hit][..., None]).sum(1)
    assert float((recon - pts[hit]).abs().max()) < 1e-12
    assert bool((frags.bary[hit] >= -1e-9).all())


def _brute_force(verts, faces, views):
    """Nearest hit per pixel by testing every triangle (float64)."""
    dirs = views.ray_directions()
    V, H, W, _ = dirs.shape
    o = views.eyes[:, None, None, None, :]
    d = dirs[..., None, :]
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    e1, e2 = b - a, c - a
    p = torch.linalg.cross(d.expand(V, H, W, len(faces), 3), e2.expand(V, H, W, -1, 3))
    det = (e1 * p).sum(-1)
    s = o - a
    u = (s * p).sum(-1) / det
    q = torch.linalg.cross(s.expand(V, H, W, -1, 3), e1.expand(V, H, W, -1, 3))
    v = (d * q).sum(-1) / det
    t = (e2 * q).sum(-1) / det
    ok = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0) & (det.abs() > 1e-12)
    t = torch.where(ok, t, torch.full_like(t, float("inf")))
    return t.min(-1).values


def test_nearest_triangle_matches_brute_force_on_random_soups():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        n = 40
        centers = torch.rand(n, 3, generator=g, dtype=F64) - 0.5
        verts = (centers[:, None, :] + 0.25 * torch.randn(n, 3, 3, generator=g, dtype=F64)).reshape(-1, 3)
        faces = torch.arange(3 * n).reshape(n, 3)
        views = orbit_views((0, 0, 0), 0.9, 3, 40, 30, dtype=F64)
        frags = rasterize(verts, faces, views)
        ref = _brute_force(verts, faces, views)
        hit = torch.isfinite(ref)
        # a ray through an edge may be counted as a hit by one side only: allow a few pixels
        assert int((hit != (frags.face >= 0)).sum()) <= 3
        both = hit & (frags.face >= 0)
        assert float((frags.depth[both] - ref[both]).abs().max()) < 1e-5


def _fd_check(loss_fn, x, n_dirs=3, eps=1e-6, seed=0):
    """The project's directional check (central differences on unit random directions)."""
    for c in directional_check(loss_fn, [x.detach().clone().requires_grad_()], eps=eps, n_dirs=n_dirs, seed=seed):
        assert c.rel_error < 1e-6, c


def test_interpolation_depth_and_normals_match_central_differences():
    """Losses on pixels whose triangle does not change under the probe (the silhouette's
    gradient is the antialiasing step's, not this one's)."""
    verts, faces = _sphere(2, 0.3)
    g = torch.Generator().manual_seed(3)
    verts = verts + 0.02 * torch.randn(verts.shape, generator=g, dtype=F64)
    views = orbit_views((0, 0, 0), 0.35, 2, 32, 24, dtype=F64)
    colours = torch.rand(verts.shape[0], 4, generator=g, dtype=F64)
    ref = rasterize(verts, faces, views)
    # pixels whose face id is stable under a 1e-4 shake of the vertices
    stable = ref.face >= 0
    for s in range(4):
        shaken = rasterize(verts + 1e-4 * torch.randn(verts.shape, generator=g, dtype=F64), faces, views)
        stable &= shaken.face == ref.face
    assert int(stable.sum()) > 300
    w1 = torch.randn((*ref.face.shape, 4), generator=g, dtype=F64)
    w2 = torch.randn(ref.face.shape, generator=g, dtype=F64)
    w3 = torch.randn((*ref.face.shape, 3), generator=g, dtype=F64)

    def loss(v):
        fr = rasterize(v, faces, views)
        assert bool((fr.face[stable] == ref.face[stable]).all())
        col = interpolate(colours, fr, faces)
        nrm = face_normals(v, faces, fr)
        m = stable.to(F64)
        return ((col * w1).sum(-1) * m).sum() + (fr.depth * w2 * m).sum() + ((nrm * w3).sum(-1) * m).sum()

    _fd_check(loss, verts)

    def loss_attr(c):
        return (interpolate(c, rasterize(verts, faces, views), faces) * w1).sum()

    _fd_check(loss_attr, colours)


def test_camera_gradients_match_central_differences():
    verts, faces = _sphere(2, 0.3)
    views = orbit_views((0, 0, 0), 0.35, 1, 24, 24, dtype=F64)
    ref = rasterize(verts, faces, views)
    stable = ref.face >= 0
    g = torch.Generator().manual_seed(5)
    w = torch.randn(ref.face.shape, generator=g, dtype=F64)

    def loss(t):
        c2w = views.cam_to_world.clone()
        c2w[:, :3, 3] = c2w[:, :3, 3] + t
        fr = rasterize(verts, faces, Views(c2w, views.fx, views.fy, views.cx, views.cy, 24, 24))
        return (fr.depth * w * stable).sum()

    _fd_check(loss, torch.zeros(3, dtype=F64), eps=1e-7)


def test_views_conventions():
    cam = orbit_camera(np.zeros(3), 0.5, 30.0, 20.0, 4 / 3)
    views = Views.from_cameras([cam], 64, 48, F64)
    # the point looked at projects to the image centre, in front of the camera
    uvz = views.project(torch.zeros(1, 3, dtype=F64))[0, 0]
    assert float(uvz[0]) == pytest.approx(32.0) and float(uvz[1]) == pytest.approx(24.0) and float(uvz[2]) > 0
    # world up (+z) appears above (smaller pixel v); camera right appears to the right
    up = views.project(torch.tensor([[0.0, 0.0, 0.05]], dtype=F64))[0, 0]
    right = views.project(torch.tensor(cam.right[None] * 0.05, dtype=F64))[0, 0]
    assert float(up[1]) < 24.0 and float(right[0]) > 32.0
    # the ray through a pixel centre projects back to that pixel centre
    d = views.ray_directions()[0, 10, 20]
    p = views.project((views.eyes[0] + 2.0 * d)[None])[0, 0]
    assert float(p[0]) == pytest.approx(20.5) and float(p[1]) == pytest.approx(10.5) and float(p[2]) == pytest.approx(2.0)


@pytest.mark.parametrize("bad,want", [
    (dict(cam_to_world=torch.eye(4)[None].repeat(2, 1, 1)), r"fx: expected a tensor of shape \(2,\)"),
    (dict(fx=torch.tensor([-1.0])), "focal lengths must be > 0"),
    (dict(width=0), "width and height must be integers > 0"),
    (dict(cam_to_world=torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0]))[None]), "rotations"),
    (dict(cam_to_world=torch.full((1, 4, 4), float("nan"))), "finite"),
])
def test_bad_views_are_refused(bad, want):
    kw = dict(cam_to_world=torch.eye(4)[None], fx=torch.tensor([10.0]), fy=torch.tensor([10.0]),
              cx=torch.tensor([5.0]), cy=torch.tensor([5.0]), width=10, height=10)
    kw.update(bad)
    with pytest.raises(ValueError, match=want):
        Views(**kw)


def test_bad_meshes_are_refused():
    views = orbit_views((0, 0, 0), 1.0, 1, 8, 8)
    with pytest.raises(ValueError, match="'faces' indices must lie in"):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 3]]), views)
    with pytest.raises(ValueError, match="vertices"):
        rasterize(torch.zeros(3, 2), torch.tensor([[0, 1, 2]]), views)
    # an empty mesh and a mesh out of every view give empty fragments, not errors
    fr = rasterize(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), views)
    assert int((fr.face >= 0).sum()) == 0
    far = torch.tensor([[50.0, 50, 50], [51, 50, 50], [50, 51, 50]])
    assert int((rasterize(far, torch.tensor([[0, 1, 2]]), views).face >= 0).sum()) == 0
