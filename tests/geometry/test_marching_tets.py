"""Marching tetrahedra (the DMTet template): generated triangle tables, closed and oriented
meshes on a sphere and a torus with converging volume, manifold meshes on random fields, welded
vertices (one per cut grid edge), float64 finite-difference gradients, and bad input."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_tets import TET_CORNERS, marching_tets, triangle_table
from diffworld.geometry.mc_tables import CORNER_OFFSETS
from diffworld.geometry.mesh_ops import mesh_report, mesh_volume


def _closed(r):
    return (r.watertight and r.edge_manifold and r.consistently_oriented and r.n_unreferenced_vertices == 0
            and r.n_degenerate_faces == 0)


def test_tets_fill_the_cube_and_tables_count_triangles():
    vols = []
    for corners in TET_CORNERS:
        p = CORNER_OFFSETS[corners].astype(float)
        vols.append(abs(np.linalg.det(p[1:] - p[0])) / 6)
    assert abs(sum(vols) - 1.0) < 1e-12 and min(vols) > 0
    _, counts = triangle_table()
    for case in range(16):
        k = bin(case).count("1")
        assert (counts[:, case] == (0 if k in (0, 4) else 1 if k in (1, 3) else 2)).all()


def test_sphere_and_torus():
    exact = 4 / 3 * math.pi * 0.4 ** 3
    errors = []
    for res in (16, 32, 64):
        s = Grid.make(res).nodes(dtype=torch.float64).norm(dim=-1) - 0.4
        m = marching_tets(s)
        r = mesh_report(m.vertices, m.faces)
        assert _closed(r) and r.euler_characteristic == 2
        errors.append(abs(float(mesh_volume(m.vertices, m.faces)) - exact) / exact)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors
    p = Grid.make(48).nodes(dtype=torch.float64)
    q = torch.stack([p[..., :2].norm(dim=-1) - 0.3, p[..., 2]], -1)
    m = marching_tets(q.norm(dim=-1) - 0.1)
    r = mesh_report(m.vertices, m.faces)
    assert _closed(r) and r.genus == 1


def test_random_fields_and_welding():
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(7, 7, 7, generator=g, dtype=torch.float64)
        s[0] = s[-1] = s[:, 0] = s[:, -1] = s[:, :, 0] = s[:, :, -1] = 1.0
        m = marching_tets(s)
        if m.faces.shape[0]:
            assert _closed(mesh_report(m.vertices, m.faces)), seed
            # one vertex per cut grid edge: no two vertices at the same place
            assert torch.unique(m.vertices, dim=0).shape[0] == m.vertices.shape[0]


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    s = Grid.make(6).nodes(dtype=torch.float64).norm(dim=-1) - 0.33
    s = s + 0.02 * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(marching_tets(s).vertices.shape, generator=gen, dtype=torch.float64)
    for c in directional_check(lambda x: (marching_tets(x).vertices * w).sum(), [s.clone().requires_grad_()],
                               eps=1e-6, n_dirs=3):
        assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-7, c


def test_empty_and_bad_input():
    m = marching_tets(torch.ones(4, 4, 4))
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3)
    with pytest.raises(ValueError, match="grid boundary"):
        marching_tets(-torch.ones(4, 4, 4))
    with pytest.raises(ValueError, match="'attributes'"):
        marching_tets(torch.ones(4, 4, 4), attributes=torch.ones(3, 3, 3))
