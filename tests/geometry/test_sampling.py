"""Surface sampling: points on faces, uniformity by area and inside triangles, gradients, empty
meshes; PCA normal estimation."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.mesh_ops import face_areas, face_normals
from diffworld.geometry.sampling import SurfaceSamples, estimate_normals, sample_surface


def sphere(res, r=0.4, dtype=torch.float64):
    return marching_cubes(Grid.make(res).nodes(dtype=dtype).norm(dim=-1) - r)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def chi_square_bound(dof: int) -> float:
    """A generous upper quantile of chi^2(dof): mean + 5 standard deviations."""
    return dof + 5.0 * math.sqrt(2.0 * dof)


def test_points_lie_on_their_faces():
    v, f = sphere(12)
    s = sample_surface(v, f, 5000, generator=gen())
    assert isinstance(s, SurfaceSamples)
    assert s.points.shape == (5000, 3) and s.normals.shape == (5000, 3) and s.face_index.shape == (5000,)
    assert s.face_index.dtype == torch.int64 and s.points.dtype == torch.float64
    tri = v[f[s.face_index]]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    # Solve p = a + u (b - a) + w (c - a) in the least-squares sense; the residual is the plane distance.
    m = torch.stack([b - a, c - a], dim=-1)  # (n, 3, 2)
    uw = torch.linalg.lstsq(m, (s.points - a).unsqueeze(-1)).solution.squeeze(-1)
    residual = (m @ uw.unsqueeze(-1)).squeeze(-1) - (s.points - a)
    assert float(residual.norm(dim=-1).max()) < 1e-12
    u, w = uw[:, 0], uw[:, 1]
    tol = 1e-9
    assert bool((u >= -tol).all() and (w >= -tol).all() and (u + w <= 1 + tol).all())
    # Normals are the unit face normals of the faces drawn.
    assert torch.allclose(s.normals, face_normals(v, f)[s.face_index])


def test_face_counts_proportional_to_area():
    # Six triangles with areas 1 : 2 : ... : 6 (scaled right triangles).
    tris = []
    for i in range(6):
        k = math.sqrt(i + 1)
        tris.append([[10.0 * i, 0, 0], [10.0 * i + k, 0, 0], [10.0 * i, k, 0]])
    v = torch.tensor(tris, dtype=torch.float64).reshape(-1, 3)
    f = torch.arange(18).reshape(6, 3)
    n = 210_000
    counts = torch.bincount(sample_surface(v, f, n, generator=gen(3)).face_index, minlength=6).double()
    areas = face_areas(v, f)
    expected = n * areas / areas.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(5), (counts, expected)


def test_uniform_inside_a_triangle():
    # Midpoint subdivision splits a triangle into 4 equal-area pieces: each gets a quarter. Without
    # the square-root barycentric map the corner piece at vertex a would get far more.
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2]])
    n = 100_000
    p = sample_surface(v, f, n, generator=gen(5)).points
    x, y = p[:, 0], p[:, 1]
    piece = torch.where(x >= 0.5, 0, torch.where(y >= 0.5, 1, torch.where(x + y <= 0.5, 2, 3)))
    counts = torch.bincount(piece, minlength=4).double()
    expected = torch.full((4,), n / 4, dtype=torch.float64)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(3), counts
    # Also uniform in a finer sense: the mean is the centroid.
    assert torch.allclose(p.mean(0), torch.tensor([1 / 3, 1 / 3, 0], dtype=torch.float64), atol=3e-3)


def test_reproducible_with_generator():
    v, f = sphere(10)
    a = sample_surface(v, f, 1000, generator=gen(7))
    b = sample_surface(v, f, 1000, generator=gen(7))
    c = sample_surface(v, f, 1000, generator=gen(8))
    assert torch.equal(a.points, b.points) and torch.equal(a.face_index, b.face_index)
    assert not torch.equal(a.points, c.points)


def test_gradient_matches_central_differences():
    v, f = sphere(10)
    w1, w2 = torch.randn(2, 3, generator=gen(11), dtype=torch.float64)

    def loss(x):
        s = sample_surface(x, f, 2000, generator=gen(4))  # same draw every call
        return (s.points.mean(0) * w1).sum() + (s.normals.mean(0) * w2).sum()

    checks = directional_check(loss, [v.detach().requires_grad_(True)], eps=1e-6, n_dirs=4)
    for c in checks:
        assert c.rel_error < 1e-6, checks


def test_mean_point_gradient_is_barycentric_weight():
    # d(mean point)/d(vertex) is the mean barycentric weight of that vertex over the draws.
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([[0, 1, 2]])
    s = sample_surface(v, f, 50_000, generator=gen(2))
    s.points.mean(0)[0].backward()
    # Weights average to 1/3 each for a uniform draw; the x-gradient lives in column 0 only.
    assert torch.allclose(v.grad[:, 0], torch.full((3,), 1 / 3, dtype=torch.float64), atol=5e-3)
    assert float(v.grad[:, 1:].abs().max()) == 0.0
    assert float(v.grad[:, 0].sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", ["no_faces", "zero_n", "zero_area"])
def test_empty_results_well_formed(case):
    v = torch.rand(4, 3, dtype=torch.float64, generator=gen()).requires_grad_(True)
    if case == "no_faces":
        f, n = torch.zeros((0, 3), dtype=torch.int64), 100
    elif case == "zero_n":
        f, n = torch.tensor([[0, 1, 2]]), 0
    else:
        f, n = torch.tensor([[0, 0, 1]]), 100  # degenerate: no area to sample
    s = sample_surface(v, f, n)
    assert s.points.shape == (0, 3) and s.normals.shape == (0, 3) and s.face_index.shape == (0,)
    assert s.points.dtype == torch.float64 and s.face_index.dtype == torch.int64
    assert s.points.requires_grad and s.normals.requires_grad
    (s.points.sum() + s.normals.sum()).backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_sample_surface_validation():
    v, f = sphere(8)
    with pytest.raises(ValueError, match="'n' >= 0"):
        sample_surface(v, f, -1)
    with pytest.raises(TypeError, match="'n'"):
        sample_surface(v, f, 10.0)
    with pytest.raises(TypeError, match="'generator'"):
        sample_surface(v, f, 10, generator=0)
    with pytest.raises(ValueError, match="'faces' indices"):
        sample_surface(v, f + v.shape[0], 10)


def test_estimate_normals_on_sphere_and_plane():
    v, f = sphere(48)
    s = sample_surface(v, f, 20_000, generator=gen(1))
    n = estimate_normals(s.points, k=16)
    assert n.shape == (20_000, 3) and n.dtype == s.points.dtype
    assert torch.allclose(n.norm(dim=-1), torch.ones(20_000, dtype=n.dtype))
    radial = s.points / s.points.norm(dim=-1, keepdim=True)
    assert float((n * radial).sum(-1).abs().mean()) > 0.999
    # Points on z = 0.3 (float32): normals are +-z.
    xy = torch.rand(2000, 2, generator=gen(2))
    plane = torch.cat([xy, torch.full((2000, 1), 0.3)], dim=1)
    npl = estimate_normals(plane, k=8)
    assert npl.dtype == torch.float32
    assert float(npl[:, 2].abs().min()) > 0.9999


def test_estimate_normals_edge_cases():
    assert estimate_normals(torch.zeros((0, 3))).shape == (0, 3)
    two = estimate_normals(torch.rand(2, 3))
    assert torch.equal(two, torch.zeros(2, 3))
    # Fewer points than k: k is clamped.
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert torch.allclose(estimate_normals(pts, k=16)[:, 2].abs(), torch.ones(4))
    with pytest.raises(ValueError, match="'k' >= 3"):
        estimate_normals(pts, k=2)
    with pytest.raises(ValueError, match="'points' of shape"):
        estimate_normals(torch.rand(5, 2))
    assert np.isfinite(estimate_normals(torch.rand(100, 3)).numpy()).all()
