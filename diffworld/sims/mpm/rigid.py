"""Floating rigid bodies by shape matching: two-way coupled with every other material.

A rigid body is a set of MPM particles of law ``rigid`` (no stress). Each substep they take part
in P2G like any particle, so the grid sees their mass and momentum and fluids push on them; after
G2P, the velocities the grid gave them are projected onto the rigid motion with the same linear
and angular momentum about the body's centre of mass:

    V = sum m v / M,   L = sum m r x v,   I = sum m (|r|^2 1 - r r^T),   omega = I^-1 L,
    v_i <- V + omega x r_i,   x_i <- x_i + v_i dt,   C_i <- [omega]_x,   F_i <- 1,

with r_i = x_i - c relative to the centre of mass c, all at the start of the substep. The
projection is a torch function: the solver's adjoint differentiates it with ``torch.autograd``.
The linearised rotation x + (omega x r) dt stretches a body by a factor 1 + (omega dt)^2 / 2 per
substep (1e-8 at 10 rad/s and dt = 1e-4 s).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RigidGroups", "rigid_projection"]


class RigidGroups(NamedTuple):
    """The rigid particles of a model.

    Attributes:
        index: Particle indices of all rigid particles, int64 (R,).
        body: Rigid-body number (0..B-1) of each of them, int64 (R,).
        count: Number of rigid bodies B.
    """

    index: torch.Tensor
    body: torch.Tensor
    count: int


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cross(a, b, dim=-1)


def _skew(w: torch.Tensor) -> torch.Tensor:
    """[w]_x with [w]_x r = w x r, shape (..., 3, 3)."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([z, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], z, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], z], -1)], -2)


def rigid_projection(x: torch.Tensor, v: torch.Tensor, m: torch.Tensor, body: torch.Tensor, count: int,
                     dt: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project particle velocities onto rigid motions, one per body.

    Args:
        x: Positions at the start of the substep [m], shape (R, 3).
        v: Velocities from G2P [m/s], shape (R, 3).
        m: Masses [kg], shape (R,).
        body: Body number of each particle, int64 (R,), values in [0, count).
        count: Number of bodies.
        dt: Substep [s].

    Returns:
        (x_new, v_new, C_new): positions after the substep, rigid velocities, and the rigid
        velocity gradient [omega]_x; shapes (R, 3), (R, 3), (R, 3, 3).
    """
    dtype, device = x.dtype, x.device
    M = torch.zeros(count, dtype=dtype, device=device).index_add(0, body, m)
    c = torch.zeros(count, 3, dtype=dtype, device=device).index_add(0, body, m[:, None] * x) / M[:, None]
    P = torch.zeros(count, 3, dtype=dtype, device=device).index_add(0, body, m[:, None] * v)
    r = x - c[body]
    L = torch.zeros(count, 3, dtype=dtype, device=device).index_add(0, body, m[:, None] * _cross(r, v))
    eye = torch.eye(3, dtype=dtype, device=device)
    rr = (r * r).sum(-1)[:, None, None] * eye - r[:, :, None] * r[:, None, :]
    inertia = torch.zeros(count, 3, 3, dtype=dtype, device=device).index_add(0, body, m[:, None, None] * rr)
    omega = torch.linalg.solve(inertia, L)
    v_new = (P / M[:, None])[body] + _cross(omega[body], r)
    return x + v_new * dt, v_new, _skew(omega)[body]
