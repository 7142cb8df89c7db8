"""Mesh quantities and topology report: convergence on marching-cubes spheres, torus genus,
gradients against float64 finite differences, and broken meshes."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.mesh_ops import (
    MeshReport,
    face_areas,
    face_normals,
    mesh_area,
    mesh_report,
    mesh_volume,
    vertex_normals,
)

R = 0.4


def sphere(res, r=R, center=(0.0, 0.0, 0.0), dtype=torch.float64):
    x = Grid.make(res).nodes(dtype=dtype)
    return marching_cubes((x - torch.tensor(center, dtype=dtype)).norm(dim=-1) - r)


def torus(res, big=0.3, small=0.1, dtype=torch.float64):
    x = Grid.make(res).nodes(dtype=dtype)
    q = torch.stack([x[..., :2].norm(dim=-1) - big, x[..., 2]], -1)
    return marching_cubes(q.norm(dim=-1) - small)


def tetrahedron(dtype=torch.float64):
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=dtype)
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])  # outward
    return v, f


# --- exact values on a tetrahedron ----------------------------------------------------------------

def test_tetrahedron_exact_values():
    v, f = tetrahedron()
    assert torch.allclose(mesh_volume(v, f), torch.tensor(1 / 6, dtype=v.dtype))
    areas = face_areas(v, f)
    assert torch.allclose(areas, torch.tensor([0.5, 0.5, 0.5, math.sqrt(3) / 2], dtype=v.dtype))
    assert torch.allclose(mesh_area(v, f), areas.sum())
    n = face_normals(v, f)
    assert torch.allclose(n[:3], torch.tensor([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=v.dtype))
    assert torch.allclose(n[3], torch.full((3,), 1 / math.sqrt(3), dtype=v.dtype))
    # Inward orientation flips the sign; translation does not change a closed mesh's volume.
    assert torch.allclose(mesh_volume(v, f.flip(1)), torch.tensor(-1 / 6, dtype=v.dtype))
    assert torch.allclose(mesh_volume(v + torch.tensor([3.0, -2.0, 5.0], dtype=v.dtype), f),
                          torch.tensor(1 / 6, dtype=v.dtype))
    r = mesh_report(v, f)
    assert (r.n_vertices, r.n_faces, r.n_edges, r.euler_characteristic, r.genus) == (4, 4, 6, 2, 0)
    assert r.watertight and r.edge_manifold and r.consistently_oriented


def test_vertex_normals_area_weighted():
    # Vertex 0 of the tetrahedron: three unit-area-0.5 faces with normals -z, -y, -x.
    v, f = tetrahedron()
    n = vertex_normals(v, f)
    assert torch.allclose(n[0], -torch.ones(3, dtype=v.dtype) / math.sqrt(3))
    assert torch.allclose(n.norm(dim=-1), torch.ones(4, dtype=v.dtype))
    # Area weighting: doubling one face's size tilts the normal toward it.
    v2 = v.clone()
    v2[1, 0] = 2.0  # face (0, 2, 1) area doubles, face (0, 1, 3) too; (0, 3, 2) unchanged
    n2 = vertex_normals(v2, f)[0]
    expected = torch.nn.functional.normalize(torch.tensor([-0.5, -1.0, -1.0], dtype=v.dtype), dim=0)
    assert torch.allclose(n2, expected)


# --- marching-cubes spheres: topology and second-order convergence ------------------------------

def test_sphere_topology_and_second_order_convergence():
    vol_exact = 4.0 / 3.0 * math.pi * R**3
    area_exact = 4.0 * math.pi * R**2
    vol_err, area_err = [], []
    for res in (32, 64, 128):
        v, f = sphere(res)
        rep = mesh_report(v, f)
        assert rep.watertight and rep.edge_manifold and rep.consistently_oriented
        assert rep.euler_characteristic == 2 and rep.genus == 0 and rep.n_components == 1
        assert rep.n_unreferenced_vertices == 0
        assert rep.n_edges * 2 == rep.n_faces * 3  # closed triangle mesh
        vol_err.append(abs(float(mesh_volume(v, f)) - vol_exact))
        area_err.append(abs(float(mesh_area(v, f)) - area_exact))
    for errs in (vol_err, area_err):
        for coarse, fine in zip(errs, errs[1:]):
            assert 3.0 < coarse / fine < 5.0, errs
    assert vol_err[-1] / vol_exact < 3e-4 and area_err[-1] / area_exact < 3e-4


def test_sphere_normals_point_outward():
    v, f = sphere(32)
    n = face_normals(v, f)
    centroid = v[f].mean(dim=1)
    radial = centroid / centroid.norm(dim=-1, keepdim=True)
    assert float((n * radial).sum(-1).min()) > 0.9
    vn = vertex_normals(v, f)
    assert float((vn * (v / v.norm(dim=-1, keepdim=True))).sum(-1).min()) > 0.99


def test_torus_genus_one():
    v, f = torus(64)
    rep = mesh_report(v, f)
    assert rep.watertight and rep.edge_manifold and rep.consistently_oriented
    assert rep.euler_characteristic == 0
    assert rep.genus == 1 and rep.n_components == 1
    # Volume of a torus 2 pi^2 R r^2 (second-order accurate, coarse tube).
    assert float(mesh_volume(v, f)) == pytest.approx(2 * math.pi**2 * 0.3 * 0.1**2, rel=1e-2)


def test_two_components():
    # One field with two blobs: the union of two disjoint spheres.
    x = Grid.make(48).nodes(dtype=torch.float64)
    d = torch.minimum((x - torch.tensor([-0.25, 0, 0], dtype=x.dtype)).norm(dim=-1),
                      (x - torch.tensor([0.25, 0, 0], dtype=x.dtype)).norm(dim=-1)) - 0.15
    v, f = marching_cubes(d)
    rep = mesh_report(v, f)
    assert rep.n_components == 2 and rep.euler_characteristic == 4 and rep.genus == 0
    assert rep.watertight and rep.consistently_oriented


# --- broken meshes --------------------------------------------------------------------------------

def test_deleted_face_is_not_watertight():
    v, f = sphere(32)
    holed = torch.cat([f[:100], f[101:]])
    rep = mesh_report(v, holed)
    assert not rep.watertight
    assert rep.edge_manifold and rep.consistently_oriented  # boundary edges are allowed
    assert rep.genus is None
    assert rep.euler_characteristic == 1  # a disc
    assert rep.n_faces == f.shape[0] - 1 and rep.n_edges == mesh_report(v, f).n_edges


def test_flipped_face_is_not_consistently_oriented():
    v, f = sphere(32)
    flipped = f.clone()
    flipped[7] = flipped[7].flip(0)
    rep = mesh_report(v, flipped)
    assert rep.watertight and rep.edge_manifold
    assert not rep.consistently_oriented and rep.genus is None


def test_non_manifold_edge_unreferenced_and_degenerate():
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [5, 5, 5], [2, 0, 0]],
                     dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4],  # edge (0, 1) shared by three faces
                      [0, 1, 6],                        # collinear: zero area, and a 4th face on (0, 1)
                      [2, 2, 4]])                       # repeated index
    rep = mesh_report(v, f)
    assert not rep.edge_manifold and not rep.watertight and not rep.consistently_oriented
    assert rep.n_unreferenced_vertices == 1  # vertex 5
    assert rep.n_degenerate_faces == 2
    assert rep.genus is None
    assert isinstance(rep.as_dict()["n_edges"], int)


def test_empty_mesh_well_formed():
    v = torch.zeros((0, 3), dtype=torch.float64, requires_grad=True)
    f = torch.zeros((0, 3), dtype=torch.int64)
    assert face_areas(v, f).shape == (0,)
    assert face_normals(v, f).shape == (0, 3)
    assert vertex_normals(v, f).shape == (0, 3)
    area, vol = mesh_area(v, f), mesh_volume(v, f)
    assert float(area.detach()) == 0.0 and float(vol.detach()) == 0.0
    assert area.requires_grad and vol.requires_grad
    (area + vol).backward()
    assert v.grad.shape == (0, 3)
    rep = mesh_report(v, f)
    assert rep == MeshReport(0, 0, 0, 0, 0, False, True, True, None, 0, 0)
    # Vertices without faces: all unreferenced, no components.
    rep = mesh_report(torch.rand(5, 3), f)
    assert rep.n_unreferenced_vertices == 5 and rep.n_components == 0 and rep.euler_characteristic == 0


def test_degenerate_face_has_zero_normal_and_finite_gradient():
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([[0, 1, 2]])
    n = face_normals(v, f)
    assert torch.equal(n, torch.zeros(1, 3, dtype=v.dtype))
    (n.sum() + face_areas(v, f).sum() + vertex_normals(v, f).sum()).backward()
    assert torch.isfinite(v.grad).all()


# --- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantity", ["volume", "area", "face_normals", "vertex_normals"])
def test_gradients_match_central_differences(quantity):
    v, f = sphere(16)
    w = torch.randn(v.shape if quantity == "vertex_normals" else (f.shape[0], 3),
                    generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fns = {
        "volume": lambda x: mesh_volume(x, f),
        "area": lambda x: mesh_area(x, f),
        "face_normals": lambda x: (face_normals(x, f) * w).sum(),
        "vertex_normals": lambda x: (vertex_normals(x, f) * w).sum(),
    }
    checks = directional_check(fns[quantity], [v.detach().requires_grad_(True)], eps=1e-6, n_dirs=4)
    for c in checks:
        assert c.rel_error < 1e-6, checks


def test_volume_gradient_identities():
    # Independent of finite differences: translation invariance and 3-homogeneity (Euler).
    v, f = sphere(24)
    v = v.detach().requires_grad_(True)
    vol = mesh_volume(v, f)
    (g,) = torch.autograd.grad(vol, v)
    assert torch.allclose(g.sum(0), torch.zeros(3, dtype=v.dtype), atol=1e-12)
    assert float((g * v.detach()).sum()) == pytest.approx(3 * float(vol.detach()), rel=1e-10)
    # The volume gradient at a vertex is a third of its area vector (area-weighted normal).
    area_vec = torch.zeros_like(v).index_add(
        0, f.reshape(-1), (0.5 * torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1))
        .detach().repeat_interleave(3, 0))
    assert torch.allclose(g, area_vec / 3.0, atol=1e-12)


def test_float32_supported():
    v, f = sphere(32, dtype=torch.float32)
    assert mesh_volume(v, f).dtype == torch.float32
    assert float(mesh_volume(v, f)) == pytest.approx(4 / 3 * math.pi * R**3, rel=1e-2)


# --- validation -----------------------------------------------------------------------------------

def test_input_validation():
    v, f = tetrahedron()
    with pytest.raises(TypeError, match="'faces'.*integer"):
        mesh_volume(v, f.double())
    with pytest.raises(TypeError, match="'vertices'"):
        mesh_volume(v.long(), f)
    with pytest.raises(ValueError, match=r"'faces' indices must lie in \[0, 4\)"):
        mesh_area(v, f + 1)
    with pytest.raises(ValueError, match="'faces' of shape"):
        mesh_area(v, f[:, :2])
    with pytest.raises(ValueError, match="'vertices' of shape"):
        mesh_report(v[:, :2], f)
    with pytest.raises(TypeError, match="'faces'"):
        face_areas(v, f.tolist())
