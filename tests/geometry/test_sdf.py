"""Analytic SDFs: values, exactness, parameter gradients, CSG, transforms, shipped shapes."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.sdf import (
    SDF,
    Box,
    Capsule,
    Cone,
    Cylinder,
    Difference,
    HalfSpace,
    Intersection,
    RoundedBox,
    SmoothUnion,
    Sphere,
    Torus,
    Transform,
    Union,
    axis_angle_to_matrix,
    sample_grid,
)
from diffworld.geometry.shapes import cad_part, genus2_shape, surface_points

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def random_points(n, seed=0, half=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3), generator=g, dtype=F64) * 2 - 1) * half


def euler_and_closed(faces: torch.Tensor):
    f = faces.numpy()
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    n_vertices = len(np.unique(f))
    return n_vertices - len(unique) + len(f), bool((counts == 2).all())


# --- primitive values at known points ----------------------------------------------------------

def test_sphere_values():
    s = Sphere(t64(0.3), t64([0.1, 0.0, 0.0]))
    p = t64([[0.1, 0, 0], [0.5, 0, 0], [0.1, 0.3, 0.4]])
    torch.testing.assert_close(s(p), t64([-0.3, 0.1, 0.2]))


def test_box_values():
    b = Box(t64([0.2, 0.1, 0.3]))
    p = t64([[0, 0, 0], [0.5, 0, 0], [0.3, 0.2, 0.0], [0.3, 0.2, 0.5], [0.15, 0.0, 0.0], [0.0, 0.05, 0.29]])
    want = [-0.1, 0.3, math.hypot(0.1, 0.1), math.sqrt(0.01 + 0.01 + 0.04), -0.05, -0.01]
    torch.testing.assert_close(b(p), t64(want))


def test_rounded_box_values():
    b = RoundedBox(t64([0.2, 0.1, 0.3]), t64(0.05))
    p = t64([[0, 0, 0], [0.5, 0, 0], [0.3, 0.2, 0.0], [0.2, 0.1, 0.3]])
    # Corner region: distance to the rounding sphere at the inner corner (0.15, 0.05, 0.25).
    corner = math.sqrt(3 * 0.05 ** 2) - 0.05
    want = [-0.1, 0.3, math.hypot(0.15, 0.15) - 0.05, corner]
    torch.testing.assert_close(b(p), t64(want))


def test_torus_values():
    t = Torus(t64(0.25), t64(0.1))
    p = t64([[0, 0, 0], [0.25, 0, 0], [0, 0.4, 0], [0.25, 0, 0.3], [0, 0, 0.5]])
    want = [0.15, -0.1, 0.05, 0.2, math.hypot(0.25, 0.5) - 0.1]
    torch.testing.assert_close(t(p), t64(want))


def test_capsule_values():
    c = Capsule(t64([0, 0, -0.2]), t64([0, 0, 0.2]), t64(0.1))
    p = t64([[0, 0, 0], [0.3, 0, 0.1], [0, 0, 0.5], [0.3, 0.4, -0.2 - 0.0]])
    want = [-0.1, 0.2, 0.2, 0.4]
    torch.testing.assert_close(c(p), t64(want))
    # Degenerate segment: a sphere.
    s = Capsule(t64([0.1, 0, 0]), t64([0.1, 0, 0]), t64(0.2))
    torch.testing.assert_close(s(t64([[0.5, 0, 0]])), t64([0.2]))


def test_cylinder_values():
    c = Cylinder(t64(0.2), t64(0.1))
    p = t64([[0, 0, 0], [0.5, 0, 0], [0, 0, 0.5], [0.3, 0, 0.2], [0.15, 0, 0.0], [0.0, 0.0, 0.08]])
    want = [-0.1, 0.3, 0.4, math.hypot(0.1, 0.1), -0.05, -0.02]
    torch.testing.assert_close(c(p), t64(want))


def test_cone_values():
    # Base radius 0.2 at z = -0.2, apex at z = +0.2.
    c = Cone(t64(0.2), t64(0.4))
    slant = math.hypot(0.2, 0.4)
    p = t64([[0, 0, 0], [0, 0, 0.5], [0, 0, -0.5], [0.5, 0, 0], [0.3, 0, -0.3], [0, 0, -0.15]])
    want = [
        -(0.2 * 0.2) / slant,  # origin to the slant line
        0.3,  # above the apex
        0.3,  # below the base
        (0.3 * 0.4 + 0.2 * 0.2) / slant,  # outside the slant, projection inside the edge
        math.hypot(0.1, 0.1),  # below-outside the base rim
        -0.05,  # just above the base center
    ]
    torch.testing.assert_close(c(p), t64(want))


def test_half_space_values():
    h = HalfSpace(t64([0, 0, 2.0]), t64(0.1))
    torch.testing.assert_close(h(t64([[0.3, 0.2, 0.5], [0, 0, 0]])), t64([0.4, -0.1]))


EXACT = {
    "sphere": lambda: Sphere(t64(0.3), t64([0.05, -0.02, 0.01])),
    "box": lambda: Box(t64([0.25, 0.15, 0.3])),
    "rounded_box": lambda: RoundedBox(t64([0.25, 0.15, 0.3]), t64(0.06)),
    "torus": lambda: Torus(t64(0.25), t64(0.1)),
    "capsule": lambda: Capsule(t64([-0.1, 0.05, -0.2]), t64([0.1, 0.0, 0.2]), t64(0.12)),
    "cylinder": lambda: Cylinder(t64(0.2), t64(0.25)),
    "cone": lambda: Cone(t64(0.25), t64(0.5)),
    "transformed_box": lambda: Transform(Box(t64([0.2, 0.1, 0.15])), t64([0.05, 0, -0.02]), t64([0.3, -0.2, 0.5]),
                                         t64(1.5)),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_unit_gradient(name):
    f = EXACT[name]()
    x = random_points(2000, seed=1)
    _, g = f.value_and_grad(x)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(len(x), dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_distance_to_own_surface(name):
    """|f(x)| equals the distance from x to the zero set (inside and outside), measured by brute
    force against dense projected surface samples."""
    f = EXACT[name]()
    s = surface_points(f, 30000, resolution=64, seed=3, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(f(s.points), torch.zeros(len(s.points), dtype=F64), atol=1e-9, rtol=0)
    # Normals are the unit gradient, also exactly on the surface.
    torch.testing.assert_close(s.normals.norm(dim=-1), torch.ones(len(s.points), dtype=F64))
    x = random_points(300, seed=2, half=0.45)
    brute = torch.cdist(x, s.points).min(dim=1).values
    with torch.no_grad():
        d = f(x).abs()
    assert bool((d <= brute + 1e-9).all())  # never farther than a surface point
    gap = brute - d  # bounded by the sample spacing (~0.005 m; sparser at apexes and rims)
    assert float(gap.max()) < 0.015 and float(gap.mean()) < 0.004


# --- parameter gradients vs central differences (float64) ----------------------------------------

PARAMS = {
    "sphere": (lambda r, c: Sphere(r, c), [0.3, [0.05, -0.02, 0.01]]),
    "box": (lambda h, c: Box(h, c), [[0.25, 0.15, 0.3], [0.01, 0.02, -0.03]]),
    "rounded_box": (lambda h, r, c: RoundedBox(h, r, c), [[0.25, 0.15, 0.3], 0.06, [0.0, 0.01, 0.0]]),
    "torus": (lambda R, r, c: Torus(R, r, c), [0.25, 0.1, [0.01, 0.0, 0.02]]),
    "capsule": (lambda a, b, r: Capsule(a, b, r), [[-0.1, 0.05, -0.2], [0.1, 0.0, 0.2], 0.12]),
    "cylinder": (lambda r, h, c: Cylinder(r, h, c), [0.2, 0.25, [0.0, 0.02, 0.01]]),
    "cone": (lambda r, h, c: Cone(r, h, c), [0.25, 0.5, [0.01, 0.0, -0.02]]),
    "half_space": (lambda n, o: HalfSpace(n, o), [[0.2, 0.3, 1.0], 0.1]),
    "smooth_union": (lambda r, k: SmoothUnion(Sphere(r, t64([-0.12, 0, 0])), Sphere(r, t64([0.12, 0, 0])), k),
                     [0.15, 0.08]),
    "transform": (lambda t, w, s: Transform(Box(t64([0.2, 0.1, 0.15])), t, w, s),
                  [[0.05, 0.0, -0.02], [0.3, -0.2, 0.5], 1.3]),
    "transform_matrix": (lambda t, R, s: Transform(Torus(t64(0.2), t64(0.08)), t, R, s),
                         [[0.05, 0.0, -0.02], axis_angle_to_matrix(t64([0.4, 0.1, -0.3])).tolist(), 0.9]),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_gradient_matches_finite_differences(name):
    build, values = PARAMS[name]
    params = [t64(v).requires_grad_(True) for v in values]
    x = random_points(64, seed=4, half=0.4)
    w = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=F64)

    def loss(*ps):
        return (build(*ps)(x) * w).sum()

    for check in directional_check(loss, params, eps=1e-6, n_dirs=3, seed=7):
        assert abs(check.analytic) > 1e-6
        assert check.rel_error < 1e-6, check


def test_point_gradient_matches_finite_differences():
    f = genus2_shape().double()
    x = random_points(32, seed=6, half=0.4).requires_grad_(True)
    w = torch.randn(32, generator=torch.Generator().manual_seed(8), dtype=F64)
    for check in directional_check(lambda p: (f(p) * w).sum(), [x], eps=1e-6, n_dirs=3):
        assert check.rel_error < 1e-6, check


def test_floats_become_parameters_and_tensors_keep_their_graph():
    s = Sphere(0.3, (0.0, 0.1, 0.0))
    assert isinstance(s.radius, torch.nn.Parameter) and isinstance(s.center, torch.nn.Parameter)
    assert {n for n, _ in s.named_parameters()} == {"radius", "center"}
    # A tensor that requires grad is kept by reference: gradients reach the caller's leaf.
    r = torch.tensor(0.3, requires_grad=True)
    s2 = Sphere(r * 2.0)
    s2(torch.zeros(1, 3)).sum().backward()
    assert float(r.grad) == pytest.approx(-2.0)
    # float32 shape queried with float64 points: output float64.
    assert s(torch.zeros(2, 3, dtype=F64)).dtype == F64


# --- CSG -------------------------------------------------------------------------------------------

def test_csg_set_semantics():
    a = Sphere(t64(0.25), t64([-0.1, 0, 0]))
    b = Box(t64([0.2, 0.2, 0.2]), t64([0.1, 0.05, 0]))
    c = Torus(t64(0.2), t64(0.08))
    x = random_points(5000, seed=9)
    ia, ib, ic = a(x) < 0, b(x) < 0, c(x) < 0
    assert torch.equal(Union(a, b, c)(x) < 0, ia | ib | ic)
    assert torch.equal(Intersection(a, b, c)(x) < 0, ia & ib & ic)
    assert torch.equal(Difference(a, b)(x) < 0, ia & ~ib)
    assert torch.equal((a | b)(x), Union(a, b)(x))
    assert torch.equal((a & b)(x), Intersection(a, b)(x))
    assert torch.equal((a - b)(x), Difference(a, b)(x))
    # Union of exact SDFs is exact outside.
    out = ~(ia | ib)
    torch.testing.assert_close(Union(a, b)(x)[out], torch.minimum(a(x), b(x))[out])


def test_smooth_union_is_min_away_from_blend_and_below_it_inside():
    a = Sphere(t64(0.15), t64([-0.12, 0, 0]))
    b = Sphere(t64(0.15), t64([0.12, 0, 0]))
    k = 0.05
    su = SmoothUnion(a, b, t64(k))
    x = random_points(5000, seed=10)
    fa, fb, fs = a(x), b(x), su(x)
    far = (fa - fb).abs() >= k
    torch.testing.assert_close(fs[far], torch.minimum(fa, fb)[far])
    assert bool((fs <= torch.minimum(fa, fb) + 1e-12).all())
    assert bool((fs >= torch.minimum(fa, fb) - k / 4 - 1e-12).all())


def test_transform_scale_keeps_distance():
    t, w, s = t64([0.05, -0.03, 0.02]), t64([0.2, 0.4, -0.1]), t64(2.0)
    x = random_points(1000, seed=11)
    # A scaled sphere is a bigger sphere.
    torch.testing.assert_close(Transform(Sphere(t64(0.1)), t, w, s)(x), Sphere(t64(0.2), t)(x))
    # A scaled box is the bigger box in the rotated frame.
    R = axis_angle_to_matrix(w)
    h = t64([0.1, 0.05, 0.08])
    want = Box(s * h)((x - t) @ R)
    torch.testing.assert_close(Transform(Box(h), t, w, s)(x), want)
    # Matrix and axis-angle forms agree; the default transform is the identity.
    torch.testing.assert_close(Transform(Box(h), t, R, s)(x), want)
    torch.testing.assert_close(Transform(Box(h))(x), Box(h)(x))
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=F64))


def test_axis_angle_small_angles_and_gradient_at_zero():
    w = t64([1e-9, -2e-9, 0.5e-9])
    torch.testing.assert_close(axis_angle_to_matrix(w), torch.eye(3, dtype=F64), atol=1e-8, rtol=0)
    z = torch.zeros(3, dtype=F64, requires_grad=True)
    axis_angle_to_matrix(z)[0, 1].backward()
    torch.testing.assert_close(z.grad, t64([0, 0, -1.0]))


# --- grid sampling and shipped shapes ------------------------------------------------------------

def test_sample_grid_matches_direct_evaluation_and_chunking():
    grid = Grid.make((6, 7, 5), ((-0.4, -0.5, -0.3), (0.5, 0.4, 0.3)))
    f = Torus(t64(0.25), t64(0.1))
    want = f(grid.nodes(dtype=F64).reshape(-1, 3)).reshape(grid.shape)
    torch.testing.assert_close(sample_grid(f, grid, dtype=F64), want)
    torch.testing.assert_close(sample_grid(f, grid, dtype=F64, chunk=17), want)
    assert sample_grid(lambda p: p[:, :1], grid).shape == grid.shape  # (N, 1) accepted


@pytest.mark.parametrize("res", [32, 64])
def test_genus2_shape_topology(res):
    with torch.no_grad():
        values = sample_grid(genus2_shape(), Grid.make(res))
    mesh = marching_cubes(values)
    euler, closed = euler_and_closed(mesh.faces)
    assert closed
    assert euler == -2  # 2 - 2g, g = 2
    assert float(mesh.vertices.abs().max()) < 0.45


def test_cad_part_topology():
    with torch.no_grad():
        values = sample_grid(cad_part(), Grid.make(64))
    mesh = marching_cubes(values)
    euler, closed = euler_and_closed(mesh.faces)
    assert closed and euler == 0  # genus 1
    assert float(mesh.vertices.abs().max()) < 0.45


def test_surface_points_on_surface_uniform_and_deterministic():
    s = Sphere(0.3)
    a = surface_points(s, 4000, resolution=48, seed=1)
    b = surface_points(s, 4000, resolution=48, seed=1)
    c = surface_points(s, 4000, resolution=48, seed=2)
    assert torch.equal(a.points, b.points) and torch.equal(a.normals, b.normals)
    assert not torch.equal(a.points, c.points)
    assert a.points.shape == (4000, 3) and a.normals.shape == (4000, 3)
    assert float(s(a.points).detach().abs().max()) < 1e-6
    torch.testing.assert_close(a.normals, a.points / 0.3, atol=1e-5, rtol=0)
    # Uniform by area on a sphere: z is uniform on [-r, r] (Archimedes).
    hist = torch.histc(a.points[:, 2], bins=4, min=-0.3, max=0.3)
    assert float((hist / 1000 - 1).abs().max()) < 0.12
    # Genus-2 shape: projected samples are on the zero set.
    g = surface_points(genus2_shape(), 2000, resolution=64, seed=0)
    assert float(genus2_shape()(g.points).detach().abs().max()) < 1e-5


# --- errors ----------------------------------------------------------------------------------------

def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="'radius' > 0"):
        Sphere(-0.1)
    with pytest.raises(ValueError, match="'center' of shape"):
        Sphere(0.1, (0.0, 0.0))
    with pytest.raises(ValueError, match="'half_extents' > 0"):
        Box((0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="'radius' <= min"):
        RoundedBox((0.1, 0.2, 0.3), 0.15)
    with pytest.raises(ValueError, match="'minor_radius' > 0"):
        Torus(0.2, 0.0)
    with pytest.raises(ValueError, match="'height' > 0"):
        Cone(0.2, -1.0)
    with pytest.raises(ValueError, match="'k' > 0"):
        SmoothUnion(Sphere(0.1), Sphere(0.2), 0.0)
    with pytest.raises(ValueError, match="'scale' > 0"):
        Transform(Sphere(0.1), scale=0.0)
    with pytest.raises(ValueError, match="'rotation' matrix orthonormal"):
        Transform(Sphere(0.1), rotation=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]])
    with pytest.raises(ValueError, match="'rotation' as an axis-angle"):
        Transform(Sphere(0.1), rotation=[1.0, 2.0])
    with pytest.raises(ValueError, match="'radius' must be finite"):
        Sphere(float("nan"))
    with pytest.raises(TypeError, match="'radius'"):
        Sphere("big")
    with pytest.raises(TypeError, match=r"'children\[1\]'"):
        Union(Sphere(0.1), lambda p: p[:, 0])
    with pytest.raises(ValueError, match="'normal' to be non-zero"):
        HalfSpace((0.0, 0.0, 0.0), 0.0)


def test_forward_and_sampling_errors():
    s = Sphere(0.3)
    with pytest.raises(ValueError, match=r"'points' of shape \(\*, 3\)"):
        s(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="'points'"):
        s(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="'grid'"):
        sample_grid(s, (8, 8, 8))
    with pytest.raises(ValueError, match="'chunk'"):
        sample_grid(s, Grid.make(4), chunk=0)
    with pytest.raises(ValueError, match="return shape"):
        sample_grid(lambda p: p, Grid.make(4))
    with pytest.raises(ValueError, match="no zero crossing"):
        surface_points(Sphere(2.0), 10, resolution=8)
    assert isinstance(s, SDF) and s(torch.zeros(0, 3)).shape == (0,)
