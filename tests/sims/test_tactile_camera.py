"""The sensor camera and the gel markers: analytic projections, float64 finite-difference
gradients (on the optical axis too), markers that stay on the deformed surface."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims.tactile import Markers, SensorCamera, dome, flat_pad

FISHEYE = SensorCamera.difftactile_fisheye()
PINHOLE = SensorCamera("pinhole", 400.0, (320.0, 240.0), (640, 480), position=(0.0, 0.0, -0.02))


def test_fisheye_radius_is_focal_times_angle():
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(200, generator=g, dtype=torch.float64) * 1.5  # up to 86 degrees
    phi = torch.rand(200, generator=g, dtype=torch.float64) * 2 * math.pi
    dist = 0.005 + 0.01 * torch.rand(200, generator=g, dtype=torch.float64)
    p = dist[:, None] * torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], 1)
    uv = FISHEYE.project(p)
    d = uv - torch.tensor([332.0, 240.0], dtype=torch.float64)
    assert torch.allclose(d.norm(dim=1), FISHEYE.focal_px * theta, rtol=1e-12, atol=1e-9)
    assert torch.allclose(torch.atan2(d[:, 1], d[:, 0]) % (2 * math.pi), phi, atol=1e-9)
    assert FISHEYE.focal_px == pytest.approx(150.04, abs=0.01)


def test_pinhole_is_similar_triangles():
    p = torch.tensor([[0.01, -0.005, 0.03], [0.0, 0.0, 0.01]], dtype=torch.float64)
    uv = PINHOLE.project(p)
    z = p[:, 2] + 0.02
    assert torch.allclose(uv, torch.stack([320 + 400 * p[:, 0] / z, 240 + 400 * p[:, 1] / z], 1))
    assert torch.isnan(PINHOLE.project(torch.tensor([[0.0, 0.0, -0.03]], dtype=torch.float64))).all()
    assert PINHOLE.in_image(p).tolist() == [True, True]


@pytest.mark.parametrize("camera", [FISHEYE, PINHOLE], ids=["fisheye", "pinhole"])
def test_projection_gradients_match_finite_differences_on_and_off_axis(camera):
    g = torch.Generator().manual_seed(1)
    p = 0.01 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    p[:, 2] = p[:, 2].abs() + 0.005
    p[:3, :2] = 0.0  # exactly on the optical axis
    p[3, :2] = 1e-12  # within the series' range
    w = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x = p.clone().requires_grad_(True)
    for c in directional_check(lambda q: (camera.project(q) * w).sum(), [x], eps=1e-7, n_dirs=4):
        assert c.rel_error < 1e-6, c
    (grad,) = torch.autograd.grad((camera.project(x) * w).sum(), x)
    assert torch.isfinite(grad).all()


def test_markers_follow_the_surface_and_their_flow_is_differentiable():
    geo = dome()
    rest = geo.mesh.vertices
    markers = Markers.sample(rest, geo.contact_faces, 300, seed=3)
    # On the outer shell at rest (inscribed triangles: within the chord sag of the sphere).
    r = markers.positions(rest).norm(dim=1)
    assert (r <= 15e-3 + 1e-12).all() and (r > 14.5e-3).all()
    assert torch.equal(markers.flow(rest, rest, FISHEYE), torch.zeros(300, 2, dtype=torch.float64))
    # A rigid motion of the gel moves every marker by the same motion.
    shift = torch.tensor([1e-4, -2e-4, 3e-4], dtype=torch.float64)
    assert torch.allclose(markers.positions(rest + shift), markers.positions(rest) + shift)
    # Gradients of the image flow w.r.t. the node positions, float64 central differences.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 2, generator=g, dtype=torch.float64)
    x = (rest + 1e-4 * torch.randn(rest.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    for c in directional_check(lambda y: (markers.flow(y, rest, FISHEYE) * w).sum(), [x], eps=1e-8, n_dirs=3):
        assert c.rel_error < 1e-6, c


def test_markers_from_points_attach_to_the_closest_surface_point():
    geo = flat_pad((0.02, 0.02), 4e-3, (8, 8, 2))
    pts = torch.tensor([[0.001, 0.002, 4.5e-3], [-0.003, 0.004, 3.9e-3]], dtype=torch.float64)
    m = Markers.from_points(geo.mesh.vertices, geo.contact_faces, pts)
    on = m.positions(geo.mesh.vertices)
    assert torch.allclose(on[:, :2], pts[:, :2], atol=1e-12) and torch.allclose(on[:, 2], torch.full((2,), 4e-3,
                                                                                                       dtype=torch.float64))
    assert (m.bary >= 0).all() and torch.allclose(m.bary.sum(1), torch.ones(2, dtype=torch.float64))


def test_bad_cameras_are_named():
    with pytest.raises(ValueError, match="'model' must be one of pinhole, fisheye_equidistant"):
        SensorCamera("fisheye", 100.0, (0.0, 0.0), (10, 10))
    with pytest.raises(ValueError, match="'focal_px'"):
        SensorCamera("pinhole", -1.0, (0.0, 0.0), (10, 10))
    with pytest.raises(ValueError, match="'rotation'"):
        SensorCamera("pinhole", 1.0, (0.0, 0.0), (10, 10), rotation=((1, 0, 0), (0, 1, 0), (0, 0, -1)))
