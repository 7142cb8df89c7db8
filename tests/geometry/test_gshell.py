"""G-Shell on the FlexiCubes and marching-tets templates: the sphere r = 0.4 cut by msdf = 0.1 - z gives one
boundary loop of the analytic length (2.4335 within 0.2 % at 64^3), Euler characteristic 1, a
manifold with boundary whose boundary vertices are welded, and gradients w.r.t. sdf and msdf
that match float64 finite differences. The msdf regularizers: exact values and one-sidedness,
float64 finite differences, and on their own they cut a sphere where a point target ends."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.gshell import (
    cut_open_surface,
    gshell_flexicubes,
    gshell_marching_tets,
    msdf_regularizers,
    msdf_supervision,
)
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


def test_msdf_regularizers_values_are_one_sided_hinges():
    eps = 0.02
    nu = torch.tensor([-0.05, -0.02, -0.01, 0.0, 0.01, 0.03], dtype=torch.float64)
    sup = torch.tensor([False, False, False, True, True, True])
    reg = msdf_regularizers(nu, sup, eps)
    # Unsupervised: -0.05 and -0.02 are at or past -eps (no cost); -0.01 is 0.01 short.
    assert float(reg.negative) == pytest.approx((0.01 / eps) ** 2 / 3)
    # Supervised: 0 is eps short (cost 1), 0.01 is half short (1/4), 0.03 is past +eps.
    assert float(reg.positive) == pytest.approx((1.0 + 0.25) / 3)
    # Empty groups give zeros that stay on the graph.
    nu = nu.clone().requires_grad_(True)
    reg = msdf_regularizers(nu, torch.ones(6, dtype=torch.bool), eps)
    assert float(reg.negative.detach()) == 0.0 and reg.negative.requires_grad
    with pytest.raises(ValueError, match="'supervised'"):
        msdf_regularizers(nu, torch.ones(5, dtype=torch.bool), eps)
    with pytest.raises(ValueError, match="'eps'"):
        msdf_regularizers(nu, sup, 0.0)


def test_msdf_regularizers_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(3)
    nu = 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)
    sup = torch.rand(200, generator=gen) < 0.5

    def loss(x):
        r = msdf_regularizers(x, sup, 0.02)
        return r.negative + 0.7 * r.positive

    for c in directional_check(loss, [nu.requires_grad_(True)], eps=1e-7, n_dirs=3, seed=4):
        assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, c


def test_msdf_supervision_is_a_distance_threshold():
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.0, 0.09], [1.0, 0.11, 0.0], [0.5, 0.0, 0.0], [0.93, 0.0, 0.0]], dtype=torch.float64)
    assert msdf_supervision(v, target, 0.1).tolist() == [True, False, False, True]
    assert msdf_supervision(v[:0], target, 0.1).shape == (0,)
    with pytest.raises(ValueError, match="'radius'"):
        msdf_supervision(v, target, -1.0)
    with pytest.raises(ValueError, match="'target_points'"):
        msdf_supervision(v, target[:0], 0.1)
    with pytest.raises(ValueError, match="'tangential'"):
        msdf_supervision(v, target, 0.1, target_normals=torch.ones_like(target), tangential=0.0)


def test_msdf_supervision_tangential_test_stops_at_the_edge_of_an_open_target():
    """Target: the half plane z = 0, x <= 0 (dense points, normal +z). A vertex above it is
    supervised; one past its edge along the plane is not, though it is as close to the points."""
    g = torch.linspace(-0.5, 0.0, 101, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, torch.linspace(-0.25, 0.25, 101, dtype=torch.float64), indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.zeros(xx.numel(), dtype=torch.float64)], 1)
    nrm = torch.zeros_like(pts)
    nrm[:, 2] = 1.0
    v = torch.tensor([[-0.2, 0.0, 0.03], [0.03, 0.0, 0.0], [0.01, 0.0, 0.0]], dtype=torch.float64)
    assert msdf_supervision(v, pts, 0.05).tolist() == [True, True, True]
    assert msdf_supervision(v, pts, 0.05, target_normals=nrm, tangential=0.02).tolist() == [True, False, True]
    assert msdf_supervision(v, pts, 0.05, target_normals=-nrm, tangential=0.02).tolist() == [True, False, True]


def test_regularizers_alone_cut_a_sphere_where_the_target_ends():
    """Template: the sphere r = 0.4 (fixed); target: points of its part below z = 0.1. From msdf = +1
    cell everywhere, minimizing the two regularizers over msdf alone cuts the template within a
    cell of z = 0.1: one boundary loop of about the circle's length, a disk (chi = 1)."""
    res = 32
    h = 1.0 / res
    sdf, _ = _fields(res)
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(30000, 3, generator=gen, dtype=torch.float64)
    pts = 0.4 * d / d.norm(dim=1, keepdim=True)
    pts = pts[pts[:, 2] < 0.1]
    msdf = torch.full_like(sdf, h).requires_grad_(True)
    opt = torch.optim.Adam([msdf], lr=0.2 * h)
    template = gshell_flexicubes(sdf, msdf.detach()).template
    sup = msdf_supervision(template.vertices, pts, 0.5 * h)  # the template does not move: once
    for _ in range(60):
        opt.zero_grad()
        nu = gshell_flexicubes(sdf, msdf).template.attributes[:, 0]
        reg = msdf_regularizers(nu, sup, h)
        (reg.negative + reg.positive).backward()
        opt.step()
    m = gshell_flexicubes(sdf, msdf.detach())
    r = mesh_report(m.vertices, m.faces)
    assert r.edge_manifold and r.consistently_oriented and r.n_components == 1 and r.euler_characteristic == 1
    b = m.boundary_edges
    z = m.vertices[b.reshape(-1), 2]
    assert float((z - 0.1).abs().max()) < h
    length = float((m.vertices[b[:, 0]] - m.vertices[b[:, 1]]).norm(dim=1).sum())
    exact = 2 * math.pi * math.sqrt(0.4 ** 2 - 0.1 ** 2)
    assert abs(length - exact) / exact < 0.1, (length, exact)


def test_open_cup_samples_mesh_and_its_own_fields():
    """The procedural open target: exact area-uniform samples with outward normals, a mesh that is a
    disk (chi = 1, one rim loop), and G-Shell on its own template and manifold SDF reproduces it."""
    from diffworld.geometry.sdf import sample_grid
    from diffworld.geometry.shapes import open_cup

    cup = open_cup()
    s = cup.sample(200000, seed=1, dtype=torch.float64)
    p, n = s.points, s.normals
    side = (p[:, 2] - cup.bottom).abs() > 1e-12
    rho = p[:, :2].norm(dim=1)
    theta = torch.atan2(p[:, 1], p[:, 0])
    assert torch.allclose(rho[side], torch.full_like(rho[side], cup.radius))
    assert bool((p[side, 2] <= cup.rim(theta[side]) + 1e-12).all()) and bool((rho[~side] <= cup.radius).all())
    assert torch.allclose(n[side, :2], p[side, :2] / cup.radius) and bool((n[~side, 2] == -1).all())
    a_side, a_bottom = cup.areas()
    assert float((~side).double().mean()) == pytest.approx(a_bottom / (a_side + a_bottom), abs=3e-3)
    # Side samples are uniform by area: their density in theta follows the wall height.
    hist = torch.histc(theta[side], bins=12, min=-math.pi, max=math.pi)
    mids = -math.pi + (torch.arange(12, dtype=torch.float64) + 0.5) * (2 * math.pi / 12)
    share = cup.rim(mids) - cup.bottom
    assert torch.allclose(hist / hist.sum(), share / share.sum(), atol=0.003)

    v, f = cup.mesh(256)
    r = mesh_report(v, f)
    assert r.edge_manifold and r.consistently_oriented and r.euler_characteristic == 1 and r.n_components == 1
    counts = _edge_face_counts(f)
    rim = [e for e, c in counts.items() if c == 1]
    length = sum(float((v[a] - v[b]).norm()) for a, b in rim)
    assert length == pytest.approx(cup.boundary_length(), rel=1e-3) and cup.boundary_length() == pytest.approx(1.480, abs=1e-3)

    grid = Grid.make(64)
    with torch.no_grad():
        sdf = sample_grid(cup.template_sdf(), grid, dtype=torch.float64)
        msdf = cup.manifold_sdf(grid.nodes(dtype=torch.float64).reshape(-1, 3)).reshape(grid.shape)
    m = gshell_flexicubes(sdf, msdf)
    r = mesh_report(m.vertices, m.faces)
    assert r.edge_manifold and r.consistently_oriented and r.euler_characteristic == 1 and r.n_components == 1
    b = m.boundary_edges
    cut = float((m.vertices[b[:, 0]] - m.vertices[b[:, 1]]).norm(dim=1).sum())
    assert cut == pytest.approx(cup.boundary_length(), rel=0.01)
    bv = m.vertices[b[:, 0]]
    assert float((bv[:, 2] - cup.rim(torch.atan2(bv[:, 1], bv[:, 0]))).abs().max()) < 0.25 / 64
