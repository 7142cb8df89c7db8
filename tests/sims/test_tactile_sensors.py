"""Sensor elastomer geometry: the dome shell and the flat pad are valid FEM meshes (positive,
conforming, closed boundary of a ball), converge to the analytic volume, and name their contact
surface and base correctly; on hundreds of random parameter sets too."""

import math

import numpy as np
import pytest
import torch

from diffworld.geometry.tet_mesh import tet_quality, tet_report
from diffworld.sims.tactile import dome, flat_pad, prism_tets


def _shell_volume(r_in, t):
    return 2 / 3 * math.pi * ((r_in + t) ** 3 - r_in ** 3)


def _check_valid(mesh):
    r = tet_report(mesh.vertices, mesh.tets)
    assert r.n_inverted == 0 and r.n_bad_interior_faces == 0 and r.n_unreferenced_vertices == 0, r
    faces = mesh.surface_faces()
    # The boundary of a ball: closed, every edge in exactly two faces, Euler characteristic 2.
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    assert (counts == 2).all()
    n_v = torch.unique(faces).numel()
    assert n_v - counts.numel() + faces.shape[0] == 2
    return r


def test_default_dome_matches_the_reference_layout():
    g = dome()
    _check_valid(g.mesh)
    v = g.mesh.vertices
    r = v.norm(dim=1)
    # 4 node shells from 7.5 to 15 mm, 2.5 mm apart; contact on the outer, base on the inner.
    assert torch.allclose(torch.unique(torch.round(r * 1e6)) / 1e6,
                          torch.tensor([7.5e-3, 10e-3, 12.5e-3, 15e-3], dtype=v.dtype))
    assert torch.allclose(r[g.contact_nodes], torch.full_like(r[g.contact_nodes], 15e-3))
    assert torch.allclose(r[g.base_nodes], torch.full_like(r[g.base_nodes], 7.5e-3))
    assert (v[:, 2] >= -1e-12).all()
    # Contact faces point away from the centre, and cover the outer hemisphere's area.
    p = v[g.contact_faces]
    n = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)
    assert ((n * p.mean(1)).sum(1) > 0).all()
    area = 0.5 * n.norm(dim=1).sum()
    assert abs(float(area) / (2 * math.pi * 15e-3 ** 2) - 1) < 0.02
    # They are exactly the mesh's boundary faces on the outer shell, same orientation.
    outer = {tuple(sorted(f)) for f in g.mesh.surface_faces().tolist() if (r[f] > 14.99e-3).all()}
    assert outer == {tuple(sorted(f)) for f in g.contact_faces.tolist()}
    q = tet_quality(g.mesh.vertices, g.mesh.tets).mean_ratio
    assert float(q.min()) > 0.3 and float(q.median()) > 0.6


def test_dome_volume_converges_at_second_order():
    exact = _shell_volume(7.5e-3, 7.5e-3)
    err = [abs(dome(n_points=n).mesh.volume() / exact - 1) for n in (100, 400, 1600)]
    # 4x the points halves the spacing: the error of inscribed facets falls about 4x.
    assert err[0] > err[1] > err[2] and 3.0 < err[0] / err[1] < 5.0 and 3.0 < err[1] / err[2] < 5.0, err


def test_flat_pad_sets():
    g = flat_pad((0.02, 0.03), 4e-3, (10, 15, 4))
    _check_valid(g.mesh)
    assert g.mesh.volume() == pytest.approx(0.02 * 0.03 * 4e-3, rel=1e-12)
    assert g.contact_faces.shape[0] == 2 * 10 * 15 and g.base_nodes.numel() == 11 * 16
    assert torch.allclose(g.mesh.vertices[g.contact_nodes, 2], torch.tensor(4e-3, dtype=torch.float64))
    assert (g.mesh.vertices[g.base_nodes, 2] == 0).all()
    p = g.mesh.vertices[g.contact_faces]
    assert (torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)[:, 2] > 0).all()


def test_prism_split_is_conforming_for_any_numbering():
    # Two layers of prisms over random triangulations of the plane, with shuffled vertex ids.
    from scipy.spatial import Delaunay

    for seed in range(20):
        rng = np.random.default_rng(seed)
        pts = rng.random((30, 2))
        simplices = Delaunay(pts).simplices
        a, b, c = (pts[simplices[:, j]] for j in range(3))
        area = 0.5 * np.abs(np.cross(b - a, c - a)).sum()
        perm = rng.permutation(30)
        tri = perm[simplices]
        pos2 = np.empty_like(pts)
        pos2[perm] = pts
        verts = np.concatenate([np.c_[pos2, np.full(30, z)] for z in (0.0, 0.3, 0.7)])
        tets = np.concatenate([prism_tets(tri + 30 * l, tri + 30 * (l + 1)) for l in range(2)])
        t = torch.from_numpy(tets)
        vol = torch.linalg.det(torch.from_numpy(verts)[t][:, 1:] - torch.from_numpy(verts)[t][:, :1])
        flip = vol < 0
        t[flip] = t[flip][:, [0, 2, 1, 3]]
        r = tet_report(torch.from_numpy(verts), t)
        assert r.n_inverted == 0 and r.n_bad_interior_faces == 0, (seed, r)
        assert r.volume == pytest.approx(0.7 * area, rel=1e-12)


def test_hundreds_of_random_domes_are_valid():
    rng = np.random.default_rng(0)
    for _ in range(150):
        r_in = float(rng.uniform(2e-3, 2e-2))
        t = float(r_in * rng.uniform(0.1, 1.5))
        layers = int(rng.integers(1, 6))
        n = int(rng.integers(8, 300))
        g = dome(r_in, t, layers, n)
        r = tet_report(g.mesh.vertices, g.mesh.tets)
        assert r.n_inverted == 0 and r.n_bad_interior_faces == 0, (r_in, t, layers, n)
        assert abs(g.mesh.volume() / _shell_volume(r_in, t) - 1) < 0.25, (r_in, t, layers, n)


@pytest.mark.parametrize("call,match", [
    (lambda: dome(inner_radius=0.0), "'inner_radius' must be a positive length"),
    (lambda: dome(thickness=float("nan")), "'thickness' must be a positive length"),
    (lambda: dome(layers=0), "'layers' must be an integer >= 1"),
    (lambda: dome(n_points=3), "'n_points' must be an integer >= 8"),
    (lambda: flat_pad((0.02,)), "'size' must be two positive lengths"),
    (lambda: flat_pad(thickness=-1.0), "'thickness' must be a positive length"),
])
def test_bad_sizes_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
