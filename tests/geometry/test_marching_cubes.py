"""Marching cubes: table facts, watertightness on random fields, convergence, gradients, errors."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry import mc_tables
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes, marching_cubes_field


def edge_stats(faces: torch.Tensor):
    """(n_edges, all edges shared by exactly 2 faces, every edge used once per direction)."""
    f = faces.numpy()
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    _, counts = np.unique(undirected, axis=0, return_counts=True)
    _, dcounts = np.unique(directed, axis=0, return_counts=True)
    return len(counts), bool((counts == 2).all()), bool((dcounts == 1).all())


def volume(v, f):
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return (a * torch.cross(b, c, dim=-1)).sum() / 6.0


def area(v, f):
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return torch.cross(b - a, c - a, dim=-1).norm(dim=-1).sum() / 2.0


def sphere_grid(res, r=0.4, dtype=torch.float64):
    return Grid.make(res).nodes(dtype=dtype).norm(dim=-1) - r


def torus_grid(res, R=0.3, r=0.1, dtype=torch.float64):
    x = Grid.make(res).nodes(dtype=dtype)
    q = torch.stack([x[..., :2].norm(dim=-1) - R, x[..., 2]], -1)
    return q.norm(dim=-1) - r


# --- tables -------------------------------------------------------------------------------------

def test_table_facts():
    tris, counts = mc_tables.triangle_table()
    assert tris.shape == (256, mc_tables.MAX_TRIANGLES, 3)
    assert counts[0] == 0 and counts[255] == 0
    assert (counts[1:255] > 0).all()
    # Every case's loops use each cut edge exactly once.
    for case in range(256):
        inside = [(case >> c) & 1 for c in range(8)]
        cut = {e for e, (a, b) in enumerate(mc_tables.EDGE_CORNERS) if inside[a] != inside[b]}
        used = [e for loop in mc_tables.case_loops(case) for e in loop]
        assert sorted(used) == sorted(cut)
        # A loop of n edges gives n - 2 triangles.
        assert counts[case] == sum(len(loop) - 2 for loop in mc_tables.case_loops(case))
    # Single-corner cases are one triangle; the classic maximum is 5 triangles per cube.
    assert all(counts[1 << c] == 1 for c in range(8))
    assert counts.max() == 5


def test_edge_layout():
    for e, (a, b) in enumerate(mc_tables.EDGE_CORNERS):
        d = mc_tables.CORNER_OFFSETS[b] - mc_tables.CORNER_OFFSETS[a]
        assert d.tolist() == np.eye(3, dtype=int)[mc_tables.EDGE_AXIS[e]].tolist()


# --- topology -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_random_fields_are_watertight_and_oriented(seed):
    """Noise fields hit every ambiguous configuration; neighbours must agree (no cracks)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn((14, 13, 12), generator=gen, dtype=torch.float64)
    s[0], s[-1], s[:, 0], s[:, -1], s[:, :, 0], s[:, :, -1] = 1, 1, 1, 1, 1, 1  # closed surface
    mesh = marching_cubes(s)
    n_edges, watertight, oriented = edge_stats(mesh.faces)
    assert watertight and oriented
    assert len(torch.unique(mesh.faces)) == mesh.vertices.shape[0]  # no unreferenced vertices
    # One vertex per cut grid edge.
    inside = s < 0
    n_cut = sum(int((inside.narrow(a, 0, s.shape[a] - 1) != inside.narrow(a, 1, s.shape[a] - 1)).sum()) for a in range(3))
    assert mesh.vertices.shape[0] == n_cut
    # Divergence theorem: the enclosed volume is positive for outward orientation.
    assert volume(mesh.vertices, mesh.faces) > 0


@pytest.mark.parametrize("res", [32, 64, 128, 256])
def test_sphere_counts_and_euler(res):
    mesh = marching_cubes(sphere_grid(res, dtype=torch.float32))
    n_edges, watertight, oriented = edge_stats(mesh.faces)
    assert watertight and oriented
    V, F = mesh.vertices.shape[0], mesh.faces.shape[0]
    assert V - n_edges + F == 2
    if res == 64:
        assert (V, F) == (12366, 24728)  # the published reference counts
    if res == 128:
        assert (V, F) == (49470, 98936)


def test_torus_euler_and_reference_counts():
    mesh = marching_cubes(torus_grid(64))
    n_edges, watertight, oriented = edge_stats(mesh.faces)
    assert watertight and oriented
    V, F = mesh.vertices.shape[0], mesh.faces.shape[0]
    assert V - n_edges + F == 0
    assert (V, F) == (7104, 14208)


def test_area_and_volume_converge_at_second_order():
    r, R, rt = 0.4, 0.3, 0.1
    errs = {"sv": [], "sa": [], "tv": [], "ta": []}
    for res in (32, 64, 128, 256):
        m = marching_cubes(sphere_grid(res))
        errs["sv"].append(abs(volume(*m).item() - 4 / 3 * math.pi * r**3))
        errs["sa"].append(abs(area(*m).item() - 4 * math.pi * r**2))
        t = marching_cubes(torus_grid(res))
        errs["tv"].append(abs(volume(*t).item() - 2 * math.pi**2 * R * rt**2))
        errs["ta"].append(abs(area(*t).item() - 4 * math.pi**2 * R * rt))
    for key, e in errs.items():
        orders = [math.log2(e[i] / e[i + 1]) for i in range(len(e) - 1)]
        # Second order on average over the refinements (single steps fluctuate).
        assert sum(orders) / len(orders) > 1.7, (key, e, orders)
    assert errs["sv"][1] / (4 / 3 * math.pi * r**3) < 2e-3


def test_float32_and_float64_agree():
    m32 = marching_cubes(sphere_grid(40, dtype=torch.float32))
    m64 = marching_cubes(sphere_grid(40, dtype=torch.float64))
    assert torch.equal(m32.faces, m64.faces)
    assert m32.vertices.dtype == torch.float32 and m64.vertices.dtype == torch.float64
    assert torch.allclose(m32.vertices.double(), m64.vertices, atol=1e-6)


def test_level_and_bounds():
    bounds = ((-1.0, -2.0, -1.0), (1.0, 2.0, 3.0))
    g = Grid.make((20, 40, 40), bounds)
    x = g.nodes(dtype=torch.float64)
    s = (x - torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).norm(dim=-1)
    m = marching_cubes(s, bounds, level=0.7)
    d = (m.vertices - torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).norm(dim=-1)
    assert torch.allclose(d, torch.full_like(d, 0.7), atol=0.01)


def test_empty_surface_is_well_formed_and_attached():
    s = torch.ones((9, 9, 9), dtype=torch.float64, requires_grad=True)
    m = marching_cubes(s)
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3) and m.faces.dtype == torch.int64
    assert m.vertices.requires_grad
    m.vertices.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# --- gradients ----------------------------------------------------------------------------------

def test_grid_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    x = Grid.make(10).nodes(dtype=torch.float64)
    s0 = x.norm(dim=-1) - 0.3 + 0.02 * torch.randn(x.shape[:-1], generator=gen, dtype=torch.float64)
    w = torch.randn((10000, 3), generator=gen, dtype=torch.float64)
    faces0 = marching_cubes(s0).faces

    def loss(s):
        m = marching_cubes(s)
        assert torch.equal(m.faces, faces0)  # FD steps must not change the topology
        return (m.vertices * w[: m.vertices.shape[0]]).sum() + 3.0 * volume(*m)

    for check in directional_check(loss, [s0.requires_grad_(True)], eps=1e-6, n_dirs=4):
        assert check.rel_error < 1e-6, check


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_volume_radius_derivative_on_grid(scale):
    """d(volume)/dr = 4 pi r^2 within 0.5 % at 64^3, also for 2 * SDF (scale invariance)."""
    r = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    s = scale * (Grid.make(64).nodes(dtype=torch.float64).norm(dim=-1) - r)
    volume(*marching_cubes(s)).backward()
    assert abs(r.grad.item() / (4 * math.pi * 0.16) - 1) < 5e-3


class ScaledSphere(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
        self.k = k

    def forward(self, p):
        return self.k * (p.norm(dim=-1) - self.r)


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_deepmesh_radius_derivative(scale):
    """DeepMesh with the |grad f|^2 denominator is exact for non-unit-gradient fields."""
    f = ScaledSphere(scale)
    volume(*marching_cubes_field(f, 64, dtype=torch.float64)).backward()
    assert abs(f.r.grad.item() / (4 * math.pi * 0.16) - 1) < 5e-3


def test_deepmesh_matches_grid_path_for_a_neural_field():
    """Cross-check: DeepMesh gradient vs the exact gradient of the extracted mesh (grid path)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Softplus(beta=20), torch.nn.Linear(32, 1)).double()
    with torch.no_grad():
        net[2].weight.mul_(0.05)

    def field(p):
        return p.norm(dim=-1) - 0.35 + net(p)[:, 0]

    res = 96
    (g_deep,) = torch.autograd.grad(volume(*marching_cubes_field(field, res, dtype=torch.float64)), net[2].weight)
    s = field(Grid.make(res).nodes(dtype=torch.float64).reshape(-1, 3)).reshape((res + 1,) * 3)
    (g_grid,) = torch.autograd.grad(volume(*marching_cubes(s)), net[2].weight)
    rel = (g_deep - g_grid).norm() / g_grid.norm()
    assert rel < 0.02, rel


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value, kwargs, exc, text",
    [
        (torch.zeros((4, 4)), {}, ValueError, "sdf"),
        (torch.zeros((4, 4, 4), dtype=torch.int32), {}, TypeError, "float32 or float64"),
        ("grid", {}, TypeError, "torch.Tensor"),
        (torch.full((4, 4, 4), float("nan")), {}, ValueError, "non-finite"),
        (torch.zeros((1, 4, 4)), {}, ValueError, "nx+1"),
        (torch.zeros((4, 4, 4)), {"bounds": ((0, 0, 0), (1, 0, 1))}, ValueError, "lower must be < upper"),
        (torch.zeros((4, 4, 4)), {"bounds": (1, 2)}, ValueError, "bounds"),
        (torch.zeros((4, 4, 4)), {"level": float("inf")}, ValueError, "level"),
    ],
)
def test_bad_input(value, kwargs, exc, text):
    with pytest.raises(exc, match=text.replace("+", r"\+")):
        marching_cubes(value, **kwargs)


def test_bad_field():
    with pytest.raises(TypeError, match="callable"):
        marching_cubes_field(3.0, 8)
    with pytest.raises(ValueError, match="resolution"):
        marching_cubes_field(lambda p: p[:, 0], 0)
    with pytest.raises(ValueError, match="shape"):
        marching_cubes_field(lambda p: p, 8)
