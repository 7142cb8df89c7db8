"""The ``rotation`` loss term's angle (box opening, block repose): the best-fit planar rotation
of a body's particles about an axis, without an SVD."""

from __future__ import annotations

import math

import torch

from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_to_matrix
from diffworld.tasks.tactile.build_mpm import body_angle
from diffworld.tasks.tactile.config import RotationLossConfig


def _rotate(X, axis, angle):
    a = torch.tensor(axis, dtype=torch.float64)
    R = quat_to_matrix(axis_angle_to_quat(a / a.norm() * angle))
    return X @ R.T


def test_angle_of_rigid_turns_about_random_axes_including_a_cube():
    g = torch.Generator().manual_seed(0)
    # a cube's lattice (equal principal moments: an SVD's rotation has no unique gradient there)
    t = torch.linspace(-1, 1, 5, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    for k in range(200):
        X = cube if k % 2 == 0 else torch.randn(50, 3, generator=g, dtype=torch.float64)
        axis = torch.randn(3, generator=g, dtype=torch.float64).tolist()
        angle = float((torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * 3.1)
        shift = torch.randn(3, generator=g, dtype=torch.float64)
        m = torch.rand(X.shape[0], generator=g, dtype=torch.float64) + 0.5
        C = (X * m[:, None]).sum(0) / m.sum()
        x = _rotate(X - C, axis, angle) + C + shift
        got = float(body_angle(x, X, m, axis))
        assert abs(got - angle) < 1e-10, (k, got, angle)
    # the same turn read about the opposite axis has the opposite sign
    x = _rotate(cube, (0, 1, 0), 0.3)
    assert abs(float(body_angle(x, cube, torch.ones(len(cube)), (0, -1, 0))) + 0.3) < 1e-12
    # +y turns +z towards +x (a block tipped over its +x edge)
    top = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    x = _rotate(top, (0, 1, 0), 0.5)
    assert float(x[0, 0]) > 0 and abs(float(body_angle(x, top, torch.ones(4), (0, 1, 0))) - 0.5) < 1e-12


def test_angle_gradient_matches_central_differences_on_a_deformed_cube():
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(-1, 1, 4, dtype=torch.float64)
    X = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    x = (_rotate(X, (0.3, 1.0, 0.2), 0.7) + 0.05 * torch.randn(X.shape, generator=g, dtype=torch.float64))
    m = torch.rand(X.shape[0], generator=g, dtype=torch.float64) + 0.5
    axis = (0.3, 1.0, 0.2)
    x = x.requires_grad_()
    body_angle(x, X, m, axis).backward()
    for _ in range(5):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        e = 1e-6
        with torch.no_grad():
            fd = (body_angle(x + e * d, X, m, axis) - body_angle(x - e * d, X, m, axis)) / (2 * e)
        assert abs(float(fd) - float((x.grad * d).sum())) < 1e-8 * (1 + abs(float(fd)))


def test_rotation_loss_config_refuses_a_zero_axis():
    import pytest

    with pytest.raises(ValueError, match="non-zero direction"):
        RotationLossConfig(body="b", axis=(0, 0, 0), target=0.3)
    assert RotationLossConfig(body="b", axis=(0, 1, 0), target=math.pi / 2).scale == 0.1
