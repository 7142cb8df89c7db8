"""Antialiasing (silhouette gradients): coverage of triangles against their exact projected
area, continuity as an edge sweeps over pixel centres, float64 central differences of a shaded,
antialiased image w.r.t. vertices (silhouettes included) and cameras, silhouette edges."""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from diffworld.engine.gradcheck import directional_check
from diffworld.render import Views, interpolate, orbit_views, rasterize
from diffworld.render.antialias import _silhouette_edges, antialias, edge_topology

torch.set_num_threads(1)
F64 = torch.float64


def _front_view(size=32, f=40.0):
    one = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    return Views(torch.eye(4, dtype=F64)[None], one(f), one(f), one(size / 2), one(size / 2), size, size)


def _area(uv):
    return 0.5 * abs(float((uv[1, 0] - uv[0, 0]) * (uv[2, 1] - uv[0, 1]) - (uv[2, 0] - uv[0, 0]) * (uv[1, 1] - uv[0, 1])))


def test_antialiased_coverage_approaches_the_exact_area():
    """200 random triangles at least 3 pixels thick: the antialiased mask's sum is within 10 % of
    the projected area (mean ~1 %), less than half the plain mask's mean error."""
    views = _front_view()
    g = torch.Generator().manual_seed(0)
    faces = torch.tensor([[0, 1, 2]])
    plain, smooth = [], []
    while len(plain) < 200:
        tri = torch.cat([torch.rand(3, 2, generator=g, dtype=F64) * 0.6 - 0.3, torch.ones(3, 1, dtype=F64)], 1)
        tri = tri * (1.0 + torch.rand(1, generator=g, dtype=F64))  # depth 1-2, same projection
        uv = views.project(tri)[0, :, :2]
        area = _area(uv)
        longest = max(float((uv[i] - uv[j]).norm()) for i, j in ((0, 1), (1, 2), (2, 0)))
        if 2 * area / longest < 3.0:
            continue
        fr = rasterize(tri, faces, views)
        aa = antialias(fr.mask[..., None], fr, tri, faces, views)
        plain.append(abs(float(fr.mask.sum()) - area) / area)
        smooth.append(abs(float(aa.sum()) - area) / area)
    assert max(smooth) < 0.10 and np.mean(smooth) < 0.5 * np.mean(plain), (max(smooth), np.mean(smooth), np.mean(plain))


def test_coverage_is_continuous_as_edges_sweep_over_pixel_centres():
    views = _front_view()
    faces = torch.tensor([[0, 1, 2]])
    # vertices outside the image (in front of the camera): only edges sweep over the pixels (near
    # a vertex the per-edge blend is an approximation with jumps, as in nvdiffrast)
    base = torch.tensor([[-0.6, -0.3, 1.0], [0.6, -0.175, 1.0], [-0.25, 0.7, 1.0]], dtype=F64)
    sums, plain = [], []
    for k in range(400):  # 2 pixels in steps of 0.005 px
        tri = base + torch.tensor([k * 0.005 / 40.0, 0.0, 0.0], dtype=F64)
        fr = rasterize(tri, faces, views)
        # (the outermost pixels left out: an edge leaving the image has no pixel pair to blend)
        sums.append(float(antialias(fr.mask[..., None], fr, tri, faces, views)[0, 1:-1, 1:-1].sum()))
        plain.append(float(fr.mask[0, 1:-1, 1:-1].sum()))
    steps = np.abs(np.diff(sums))
    assert np.abs(np.diff(plain)).max() >= 1.0  # the plain mask jumps by whole pixels
    # the antialiased one moves by the swept area (edge length in the image x 0.005 px) each step
    assert steps.max() < 2.0 * np.median(steps) and steps.max() < 0.1, (steps.max(), np.median(steps))


def _fd(loss, x, seed, n=4, eps=1e-6):
    """The project's directional check (central differences on unit random directions)."""
    for c in directional_check(loss, [x.detach().clone().requires_grad_()], eps=eps, n_dirs=n, seed=seed):
        assert c.rel_error < 1e-5, c


def test_shaded_antialiased_image_gradients_match_central_differences():
    """The whole image (interior colours, background, silhouettes of a bumpy sphere in two
    views) w.r.t. the vertices and the camera positions."""
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    g = torch.Generator().manual_seed(0)
    verts = torch.tensor(m.vertices, dtype=F64) + 0.02 * torch.randn(len(m.vertices), 3, generator=g, dtype=F64)
    faces = torch.tensor(m.faces)
    views = orbit_views((0, 0, 0), 0.35, 2, 32, 24, dtype=F64)
    colours = torch.rand(verts.shape[0], 3, generator=g, dtype=F64)
    w = torch.randn(2, 24, 32, 3, generator=g, dtype=F64)
    topo = edge_topology(faces)
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=F64)

    def image(v, vw):
        fr = rasterize(v, faces, vw)
        return antialias(interpolate(colours, fr, faces) + (1 - fr.mask[..., None]) * bg, fr, v, faces, vw, topo)

    _fd(lambda v: (image(v, views) * w).sum(), verts, seed=1)

    def by_camera(t):
        c2w = views.cam_to_world.clone()
        c2w[:, :3, 3] = c2w[:, :3, 3] + t
        return (image(verts, Views(c2w, views.fx, views.fy, views.cx, views.cy, 32, 24)) * w).sum()

    _fd(by_camera, torch.zeros(2, 3, dtype=F64), seed=2)
    # the silhouette carries gradient: a mask-only loss still has one
    mask_loss = lambda v: (antialias(rasterize(v, faces, views).mask[..., None], rasterize(v, faces, views), v,  # noqa: E731
                                     faces, views, topo) * w[..., :1]).sum()
    _fd(mask_loss, verts, seed=3)


def test_silhouette_edges_of_a_closed_sphere_form_closed_loops():
    """Each view's silhouette edges of a convex closed mesh form one closed loop: every vertex on
    it has exactly two silhouette edges."""
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    verts, faces = torch.tensor(m.vertices, dtype=F64), torch.tensor(m.faces)
    views = orbit_views((0, 0, 0), 0.35, 4, 16, 16, dtype=F64)
    topo = edge_topology(faces)
    sil = _silhouette_edges(verts, faces, views, topo)
    edges = topo[0]
    for k in range(len(views)):
        e = edges[sil[k]]
        assert e.shape[0] > 10
        counts = torch.bincount(e.reshape(-1), minlength=verts.shape[0])
        assert set(counts[counts > 0].tolist()) == {2}
    # an open square: its 4 boundary edges are silhouettes in every view, the diagonal never
    sq = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=F64)
    fs = torch.tensor([[0, 1, 2], [0, 2, 3]])
    t2 = edge_topology(fs)
    s2 = _silhouette_edges(sq, fs, views, t2)
    diag = ((t2[0] == torch.tensor([0, 2])).all(1)).nonzero()[0, 0]
    assert int(s2.sum(1).min()) == 4 and not bool(s2[:, diag].any())
