"""Tet shape quality: analytic values (regular tet, the Kuhn simplex of a cube split), invariances,
dihedral angles against an independent construction, float64 central differences, and the
fields of ``tet_report``."""

import itertools
import math

import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.tet_mesh import tet_quality, tet_report

REGULAR = torch.tensor([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)  # positive
KUHN = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)  # a cube's 6-split
ONE = torch.tensor([[0, 1, 2, 3]])


def _dihedrals_by_projection(p):
    """Interior dihedral angles (6,) [rad]: at edge (i, j), the angle between the other two corners
    projected onto the plane normal to the edge (no face normals involved)."""
    out = []
    for i, j in itertools.combinations(range(4), 2):
        k, m = (c for c in range(4) if c not in (i, j))
        d = (p[j] - p[i]) / (p[j] - p[i]).norm()
        a, b = p[k] - p[i], p[m] - p[i]
        a, b = a - (a @ d) * d, b - (b @ d) * d
        out.append(torch.acos((a @ b) / (a.norm() * b.norm())))
    return torch.stack(out)


def test_regular_tet_has_ratio_one_and_equal_dihedrals():
    q = tet_quality(REGULAR, ONE)
    assert torch.allclose(q.mean_ratio, torch.ones(1, dtype=torch.float64), atol=1e-14)
    assert math.isclose(float(q.min_dihedral), math.acos(1 / 3), abs_tol=1e-12)
    assert math.isclose(float(q.max_dihedral), math.acos(1 / 3), abs_tol=1e-12)


def test_kuhn_simplex():
    """Volume 1/6, squared edges 1+2+3+1+2+1 = 10: ratio 12 (1/2)^(2/3) / 10; angles 45, 60, 90 degrees."""
    q = tet_quality(KUHN, ONE)
    assert math.isclose(float(q.mean_ratio), 1.2 * 0.5 ** (2 / 3), rel_tol=1e-14)
    assert math.isclose(float(q.min_dihedral), math.pi / 4, abs_tol=1e-12)
    assert math.isclose(float(q.max_dihedral), math.pi / 2, abs_tol=1e-12)


def test_invariances_and_sign():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=g, dtype=torch.float64)
    if torch.linalg.det(p[1:] - p[:1]) < 0:
        p = p[[0, 2, 1, 3]]
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    rot = rot * torch.sign(torch.linalg.det(rot))  # a proper rotation
    moved = 3.7 * p @ rot.T + torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64)
    a, b = tet_quality(p, ONE), tet_quality(moved, ONE)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-12)
    flipped = tet_quality(p, torch.tensor([[0, 2, 1, 3]]))
    assert torch.allclose(flipped.mean_ratio, -a.mean_ratio, atol=1e-14)
    assert 0 < float(a.mean_ratio) < 1


def test_dihedrals_match_an_independent_construction():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(20, 4, 3, generator=g, dtype=torch.float64)
    neg = torch.linalg.det(p[:, 1:] - p[:, :1]) < 0
    p[neg] = p[neg][:, [0, 2, 1, 3]]
    q = tet_quality(p.reshape(-1, 3), torch.arange(80).view(20, 4))
    ref = torch.stack([_dihedrals_by_projection(t) for t in p])
    assert torch.allclose(q.min_dihedral, ref.min(1).values, atol=1e-10)
    assert torch.allclose(q.max_dihedral, ref.max(1).values, atol=1e-10)


def test_gradients_match_central_differences():
    g = torch.Generator().manual_seed(2)
    p = (KUHN + 0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64)

    def loss(x):
        q = tet_quality(x, ONE)
        return w[0] * q.mean_ratio.sum() + w[1] * q.min_dihedral.sum() + w[2] * q.max_dihedral.sum()

    checks = directional_check(loss, [p], eps=1e-6, n_dirs=4)
    assert max(c.rel_error for c in checks) < 1e-6, checks


def test_report_carries_the_extremes():
    # the cube split into its 6 Kuhn simplices around the main diagonal 0 -> 7
    corners = torch.tensor([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=torch.float64)
    tets = []
    for perm in itertools.permutations(range(3)):
        path, c = [0], [0, 0, 0]
        for axis in perm:
            c[axis] = 1
            path.append(4 * c[0] + 2 * c[1] + c[2])
        if torch.linalg.det(corners[path[1:]] - corners[path[:1]]) < 0:
            path[1], path[2] = path[2], path[1]
        tets.append(path)
    r = tet_report(corners, torch.tensor(tets))
    assert r.valid and r.n_tets == 6 and math.isclose(r.volume, 1.0, rel_tol=1e-14)
    assert math.isclose(r.min_mean_ratio, 1.2 * 0.5 ** (2 / 3), rel_tol=1e-12)
    assert math.isclose(r.min_dihedral_deg, 45.0, abs_tol=1e-9) and math.isclose(r.max_dihedral_deg, 90.0, abs_tol=1e-9)
    empty = tet_report(corners, torch.zeros((0, 4), dtype=torch.int64))
    assert empty.n_tets == 0 and empty.min_mean_ratio == 0.0


def test_tet_mesh_type_from_flexicubes_round_trips_through_vtk(tmp_path):
    """FlexiCubes' tetrahedral output as a TetMesh: valid, its boundary is the surface, and a VTK
    file read back gives the same mesh with the boundary recomputed (oriented outwards)."""
    from diffworld.geometry import TetMesh, flexicubes
    from diffworld.geometry.grid import Grid

    x = Grid.make(16).nodes(dtype=torch.float64)
    m = flexicubes(x.norm(dim=-1) - 0.3, output="tetrahedra")
    tm = m.tet_mesh
    assert isinstance(tm, TetMesh) and torch.equal(tm.surface, m.faces)
    r = tm.report()
    assert r.valid and r.boundary_is_surface and r.n_tets == m.tets.shape[0]
    back = TetMesh.load(tm.save(tmp_path / "sphere.vtu"))
    assert torch.equal(back.tets, m.tets)
    torch.testing.assert_close(back.vertices, m.vertices.detach())
    assert back.report().valid and tet_report(back.vertices, back.tets, m.faces).boundary_is_surface
    assert flexicubes(x.norm(dim=-1) - 0.3).tet_mesh is None
