"""The optical tactile image: uniform shading of a flat gel, changes only where the gel is
dented, float64 finite-difference gradients w.r.t. the nodes, the dome's fisheye coverage."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims.tactile import OpticalImage, Photometric, SensorCamera, dome, flat_pad

PAD_CAMERA = SensorCamera("pinhole", 60.0, (40.0, 30.0), (80, 60), position=(0.0, 0.0, -0.02))


def _pad():
    geo = flat_pad((0.02, 0.02), 4e-3, (16, 16, 2))
    return geo, OpticalImage.at_rest(geo.mesh.vertices, geo.contact_faces, PAD_CAMERA)


def _dent(nodes, contact, depth=3e-4, width=2e-3, centre=(0.002, -0.001)):
    x = nodes.clone()
    c = torch.tensor(centre, dtype=x.dtype)
    r2 = ((x[contact, :2] - c) ** 2).sum(1)
    x[contact, 2] -= depth * torch.exp(-r2 / (2 * width ** 2))
    return x


def test_flat_gel_is_uniform_and_a_dent_changes_only_its_neighbourhood():
    geo, optical = _pad()
    rest = geo.mesh.vertices
    img = optical.render(rest)
    seen = img.reshape(-1, 3)[optical.pixel]
    # Flat, facing the camera: each light at 60 degrees gives cos = 0.5 (softplus adds ~1e-12).
    assert torch.allclose(seen, torch.full_like(seen, 0.6), atol=1e-9)
    assert optical.pixel.numel() > 0.3 * 80 * 60
    dented = optical.render(_dent(rest, geo.contact_nodes))
    change = (dented - img).abs().amax(-1)
    assert float(change.max()) > 0.05
    # Pixels that see points 4 widths or more from the dent are unchanged.
    pts = (optical.bary[:, :, None] * rest[optical.faces[optical.face]]).sum(1)
    far = ((pts[:, :2] - torch.tensor([0.002, -0.001], dtype=pts.dtype)) ** 2).sum(1).sqrt() > 8e-3
    assert float(change.reshape(-1)[optical.pixel[far]].max()) < 1e-3


def test_image_gradients_match_finite_differences():
    geo, optical = _pad()
    x0 = _dent(geo.mesh.vertices, geo.contact_nodes)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(60, 80, 3, generator=g, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    for shading in (Photometric(), Photometric(poly=((0.5, 0.3, 0.1, 0.2, 0.0, 0.1),) * 3)):
        for c in directional_check(lambda y: (optical.render(y, shading) * w).sum(), [x], eps=1e-8, n_dirs=3):
            assert c.rel_error < 1e-5, c


def test_calibration_polynomial_mode():
    shading = Photometric(poly=((0.2, 1.0, 0.0, 0.0, 0.0, 0.0), (0.3, 0.0, 1.0, 0.0, 0.0, 0.0),
                                (0.4, 0.0, 0.0, 1.0, 0.0, 1.0)))
    n = torch.tensor([[0.0, 0.0, -1.0], [0.6, 0.0, -0.8]], dtype=torch.float64)
    assert torch.allclose(shading.shade(n), torch.tensor([[0.2, 0.3, 0.4], [0.8, 0.3, 0.76]], dtype=torch.float64))


def test_dome_fills_the_fisheye_circle():
    geo = dome()
    cam = SensorCamera.difftactile_fisheye()
    optical = OpticalImage.at_rest(geo.mesh.vertices, geo.contact_faces, cam)
    # The hemisphere (theta up to 90 degrees) images to a disc of radius f pi / 2 = 235.7 px,
    # clipped by the 480-px height at rows 0 and 480 (centre row 240).
    r = cam.focal_px * math.pi / 2
    h = 240.0
    disc = r * r * math.pi - 2 * (r * r * math.acos(h / r) - h * math.sqrt(r * r - h * h)) if r > h else math.pi * r * r
    assert optical.pixel.numel() == pytest.approx(disc, rel=0.02)
    img = optical.render(geo.mesh.vertices)
    assert torch.isfinite(img).all()


def test_bad_inputs_are_named():
    geo, _ = _pad()
    behind = SensorCamera("pinhole", 60.0, (40.0, 30.0), (80, 60), position=(0.0, 0.0, 0.05))
    with pytest.raises(ValueError, match="behind the camera"):
        OpticalImage.at_rest(geo.mesh.vertices, geo.contact_faces, behind)
    with pytest.raises(ValueError, match="'lights' must be unit directions"):
        Photometric(lights=((1.0, 1.0, 0.0),), colors=((1.0, 0.0, 0.0),))
    with pytest.raises(ValueError, match="'poly' must be"):
        Photometric(poly=((1.0,),))
