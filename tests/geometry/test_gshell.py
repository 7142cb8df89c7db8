"""G-Shell on the FlexiCubes and marching-tets templates: the sphere r = 0.4 cut by msdf = 0.1 - z gives one
boundary loop of the analytic length (2.4335 within 0.2 % at 64^3), Euler characteristic 1, a
manifold with boundary whose boundary vertices are welded, and gradients w.r.t. sdf and msdf
that match float64 finite differences."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.gshell import cut_open_surface, gshell_flexicubes, gshell_marching_tets
from diffworld.geometry.mesh_ops import mesh_report


def _fields(res, dtype=torch.float64):
    p = Grid.make(res).nodes(dtype=dtype)
    return p.norm(dim=-1) - 0.4, 0.1 - p[..., 2]


def _edge_face_counts(faces):
    f = faces.numpy()
    e = np.sort(np.stack([f, f[:, [1, 2, 0]]], -1).reshape(-1, 2), axis=1)
    keys, counts = np.unique(e, axis=0, return_counts=True)
    return {tuple(k): int(c) for k, c in zip(keys, counts)}


TEMPLATES = {"flexicubes_eval": lambda s, nu: gshell_flexicubes(s, nu),
             "flexicubes_training": lambda s, nu: gshell_flexicubes(s, nu, training=True),
             "marching_tets": gshell_marching_tets}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_sphere_cut_by_a_plane(template):
    m = TEMPLATES[template](*_fields(64))
    r = mesh_report(m.vertices, m.faces)
    assert r.edge_manifold and r.consistently_oriented and r.n_components == 1
    assert r.euler_characteristic == 1 and not r.watertight
    assert r.n_unreferenced_vertices == 0 and r.n_degenerate_faces == 0
    b = m.boundary_edges
    length = float((m.vertices[b[:, 0]] - m.vertices[b[:, 1]]).norm(dim=1).sum())
    exact = 2 * math.pi * math.sqrt(0.4 ** 2 - 0.1 ** 2)
    assert abs(length - exact) / exact < 2e-3, (length, exact)
    # The boundary edges are exactly the mesh edges with one face, and they chain into one loop.
    counts = _edge_face_counts(m.faces)
    ones = {e for e, c in counts.items() if c == 1}
    assert ones == {tuple(sorted(e)) for e in b.tolist()}
    nxt = dict(b.tolist())
    assert len(nxt) == b.shape[0]  # every boundary vertex starts exactly one edge: welded
    start, v, steps = b[0, 0].item(), nxt[b[0, 0].item()], 1
    while v != start:
        v, steps = nxt[v], steps + 1
    assert steps == b.shape[0]
    # On the plane z = 0.1 (msdf = 0 there; msdf is linear in z, so the cut is exact).
    assert float((m.vertices[b[:, 0], 2] - 0.1).abs().max()) < 1e-9
    assert bool((m.vertices[:, 2] <= 0.1 + 1e-9).all())


@pytest.mark.parametrize("template", ["flexicubes_training", "marching_tets"])
def test_gradients_match_finite_differences(template):
    build = TEMPLATES[template]
    s, nu = _fields(8)
    gen = torch.Generator().manual_seed(0)
    s = s + 0.01 * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    ref = build(s, nu)
    w = torch.randn(ref.vertices.shape, generator=gen, dtype=torch.float64)

    def loss(sdf, msdf):
        return (build(sdf, msdf).vertices * w).sum()

    for grad_of in (0, 1):
        args = [t.clone().requires_grad_(i == grad_of) for i, t in enumerate((s, nu))]
        for c in directional_check(loss, args, eps=1e-6, n_dirs=2, seed=1):
            assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, (grad_of, c)


def test_all_kept_or_all_dropped():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2]])
    kept = cut_open_surface(v, f, torch.ones(3, dtype=torch.float64))
    assert kept[1].tolist() == [[0, 1, 2]] and kept[2].shape == (0, 2)
    dropped = cut_open_surface(v, f, -torch.ones(3, dtype=torch.float64))
    assert dropped[0].shape == (0, 3) and dropped[1].shape == (0, 3)
    with pytest.raises(ValueError, match="'msdf'"):
        gshell_flexicubes(*_fields(8)[:1], torch.zeros(3, 3, 3))
