"""Mesh -> SDF with Warp BVH queries: accuracy, sign modes, robustness, gradients, errors."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.mesh_sdf import MeshSDF, mesh_to_sdf
from diffworld.geometry.sdf import Box, sample_grid

F64 = torch.float64
R = 0.3


@pytest.fixture(scope="module")
def sphere_mesh():
    """Watertight, outward-oriented sphere of radius R from marching cubes (float64).

    37 cells: no grid node lies on the sphere, so no zero-area triangles (where the distance is
    not differentiable w.r.t. the vertices).
    """
    values = Grid.make(37).nodes(dtype=F64).norm(dim=-1) - R
    mesh = marching_cubes(values)
    return mesh.vertices.detach(), mesh.faces


def box_mesh(h=(0.2, 0.15, 0.1), dtype=F64):
    """12-triangle box, counter-clockwise seen from outside."""
    hx, hy, hz = h
    v = torch.tensor([[x, y, z] for x in (-hx, hx) for y in (-hy, hy) for z in (-hz, hz)], dtype=dtype)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = [[a, b, c] for a, b, c, d in quads] + [[a, c, d] for a, b, c, d in quads]
    return v, torch.tensor(f)


def test_box_mesh_is_exact():
    v, f = box_mesh()
    grid = Grid.make(12)
    want = sample_grid(Box(torch.tensor([0.2, 0.15, 0.1], dtype=F64)), grid, dtype=F64)
    for sign in ("winding", "normal"):
        got = mesh_to_sdf(v, f, grid, sign=sign, dtype=F64)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sign", ["winding", "normal"])
def test_sphere_mesh_matches_analytic(sphere_mesh, sign):
    v, f = sphere_mesh
    grid = Grid.make(24)
    ref = grid.nodes(dtype=F64).norm(dim=-1) - R
    got = mesh_to_sdf(v, f, grid, sign=sign, dtype=F64)
    assert got.shape == grid.shape and got.dtype == F64
    h = grid.spacing[0]
    # The polygonized sphere is within ~1e-3 of the true one; both signs are checked.
    assert float((got - ref).abs().max()) < 0.25 * h
    assert bool(((got < 0) == (ref < 0))[ref.abs() > 0.01].all())
    assert bool((got < 0).any()) and bool((got > 0).any())
    got32 = mesh_to_sdf(v.float(), f.int(), grid, sign=sign)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, atol=1e-5, rtol=0)


def test_winding_and_normal_agree_on_watertight(sphere_mesh):
    v, f = sphere_mesh
    grid = Grid.make(20, ((-0.45,) * 3, (0.45,) * 3))
    a = mesh_to_sdf(v, f, grid, sign="winding", dtype=F64)
    b = mesh_to_sdf(v, f, grid, sign="normal", dtype=F64)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_winding_sign_robust_to_missing_faces(sphere_mesh):
    v, f = sphere_mesh
    g = torch.Generator().manual_seed(0)
    keep = torch.ones(len(f), dtype=torch.bool)
    keep[torch.randperm(len(f), generator=g)[:12]] = False  # 12 holes scattered over the sphere
    broken = f[keep]
    grid = Grid.make(24)
    ref = grid.nodes(dtype=F64).norm(dim=-1) - R
    got = mesh_to_sdf(v, broken, grid, sign="winding", dtype=F64)
    well = ref.abs() > 0.03
    assert bool(((got < 0) == (ref < 0))[well].all())
    # Distances are unaffected away from the holes' neighbourhood.
    assert float((got - ref)[well].abs().max()) < 0.05


def test_mesh_sdf_module_points_and_gradients(sphere_mesh):
    v, f = sphere_mesh
    field = MeshSDF(v, f)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand((200, 3), generator=g, dtype=F64) - 0.5) * 0.9
    x = x[((x.norm(dim=-1) - R).abs() > 0.02) & (x.norm(dim=-1) > 0.05)]
    values, grads = field.value_and_grad(x)
    torch.testing.assert_close(values, x.norm(dim=-1) - R, atol=3e-3, rtol=0)
    # The gradient is the closest-point direction: unit, and close to the radial direction.
    torch.testing.assert_close(grads.norm(dim=-1), torch.ones(len(x), dtype=F64))
    assert float((grads * x / x.norm(dim=-1, keepdim=True)).sum(-1).min()) > 0.98
    # Same numbers as the grid path at the nodes.
    grid = Grid.make(6)
    torch.testing.assert_close(field(grid.nodes(dtype=F64).reshape(-1, 3)).reshape(grid.shape),
                               mesh_to_sdf(v, f, grid, dtype=F64))
    # Float64 central differences, w.r.t. query points and w.r.t. vertices.
    w = torch.randn(len(x), generator=g, dtype=F64)
    for check in directional_check(lambda p: (field(p) * w).sum(), [x.clone().requires_grad_(True)], eps=1e-6):
        assert check.rel_error < 1e-6, check
    verts = v.clone().requires_grad_(True)
    for check in directional_check(lambda vv: (MeshSDF(vv, f)(x) * w).sum(), [verts], eps=1e-6):
        assert check.rel_error < 1e-6, check


def test_mesh_sdf_refits_when_vertices_change(sphere_mesh):
    v, f = sphere_mesh
    verts = torch.nn.Parameter(v.clone())
    field = MeshSDF(verts, f)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(field(x).detach(), torch.tensor([-R, 0.45 - R], dtype=F64), atol=2e-3, rtol=0)
    with torch.no_grad():
        verts.mul_(1.2)  # in place, as an optimizer step would
    torch.testing.assert_close(field(x).detach(), torch.tensor([-1.2 * R, 0.45 - 1.2 * R], dtype=F64), atol=3e-3, rtol=0)
    (field(x).sum()).backward()
    assert verts.grad is not None and float(verts.grad.abs().sum()) > 0


def test_max_distance_truncates_but_keeps_sign(sphere_mesh):
    v, f = sphere_mesh
    grid = Grid.make(16)
    full = mesh_to_sdf(v, f, grid, dtype=F64)
    for sign in ("winding", "normal"):
        trunc = mesh_to_sdf(v, f, grid, sign=sign, dtype=F64, max_distance=0.05)
        torch.testing.assert_close(trunc, full.clamp(-0.05, 0.05))


def test_empty_query_and_device_default(sphere_mesh):
    v, f = sphere_mesh
    out = MeshSDF(v, f)(torch.zeros(0, 3, dtype=F64))
    assert out.shape == (0,)


def test_errors_name_the_argument(sphere_mesh):
    v, f = sphere_mesh
    grid = Grid.make(4)
    with pytest.raises(ValueError, match=r"'faces' indices must lie in \[0, "):
        mesh_to_sdf(v, torch.cat([f, torch.tensor([[0, 1, len(v)]])]), grid)
    with pytest.raises(ValueError, match=r"'faces' indices"):
        mesh_to_sdf(v, torch.cat([f, torch.tensor([[0, -1, 2]])]), grid)
    bad = v.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="'vertices' contains 1 non-finite"):
        mesh_to_sdf(bad, f, grid)
    with pytest.raises(ValueError, match="'faces' with at least one triangle"):
        mesh_to_sdf(v, torch.zeros((0, 3), dtype=torch.int64), grid)
    with pytest.raises(ValueError, match="'vertices' with at least 3"):
        mesh_to_sdf(torch.zeros((0, 3)), torch.zeros((0, 3), dtype=torch.int64), grid)
    with pytest.raises(ValueError, match=r"'vertices' of shape \(\*, 3\)"):
        mesh_to_sdf(v[:, :2], f, grid)
    with pytest.raises(ValueError, match=r"'faces' of shape \(\*, 3\)"):
        mesh_to_sdf(v, f[:, :2], grid)
    with pytest.raises(TypeError, match="'faces' of an integer dtype"):
        mesh_to_sdf(v, f.double(), grid)
    with pytest.raises(TypeError, match="'vertices'"):
        mesh_to_sdf(v.numpy(), f, grid)
    with pytest.raises(ValueError, match="'sign' to be one of"):
        mesh_to_sdf(v, f, grid, sign="parity")
    with pytest.raises(ValueError, match="'max_distance'"):
        mesh_to_sdf(v, f, grid, max_distance=-1.0)
    with pytest.raises(TypeError, match="'grid'"):
        mesh_to_sdf(v, f, (4, 4, 4))
    with pytest.raises(ValueError, match="degenerate"):
        mesh_to_sdf(torch.zeros((3, 3)), torch.tensor([[0, 1, 2]]), grid)


def test_closest_points_match_brute_force_on_an_open_mesh():
    import trimesh

    from diffworld.geometry.mesh_sdf import closest_points

    m = trimesh.creation.icosphere(subdivisions=2)
    keep = m.triangles_center[:, 2] > 0  # an open cap
    v = torch.as_tensor(m.vertices, dtype=torch.float64)
    f = torch.as_tensor(m.faces[keep])
    g = torch.Generator().manual_seed(0)
    p = 1.5 * torch.randn(200, 3, generator=g, dtype=torch.float64)
    face, w = closest_points(v, f, p)
    c = (w[:, :, None] * v[f[face]]).sum(1)
    d = (p - c).norm(dim=1)
    # Brute force: the closest point on every triangle, densely sampled by barycentrics.
    n = 40
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    ok = (i + j) <= n
    b = torch.stack([i[ok], j[ok], n - i[ok] - j[ok]], 1).double() / n
    samples = torch.einsum("sk,fkd->fsd", b, v[f]).reshape(-1, 3)
    brute = torch.cdist(p, samples).min(1).values
    assert (d <= brute + 1e-12).all() and (brute - d).max() < 0.02
    assert (w >= -1e-12).all() and torch.allclose(w.sum(1), torch.ones(200, dtype=torch.float64))
