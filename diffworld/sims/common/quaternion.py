"""Unit quaternions in (x, y, z, w) order, as differentiable torch ops (colliders, emitters, scenes)."""

from __future__ import annotations

import torch

__all__ = ["axis_angle_to_quat", "quat_multiply", "quat_rotate", "quat_to_matrix", "quat_to_rotvec"]


def axis_angle_to_quat(aa: torch.Tensor) -> torch.Tensor:
    """Quaternions (x, y, z, w) of rotation vectors [rad], shape (..., 3) -> (..., 4)."""
    angle = torch.sqrt((aa * aa).sum(-1, keepdim=True) + 1e-30)
    axis = aa / angle
    half = 0.5 * angle
    return torch.cat([axis * torch.sin(half), torch.cos(half)], -1)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of (x, y, z, w) quaternions."""
    av, aw = a[..., :3], a[..., 3:]
    bv, bw = b[..., :3], b[..., 3:]
    return torch.cat([aw * bv + bw * av + torch.cross(av, bv, dim=-1), aw * bw - (av * bv).sum(-1, keepdim=True)], -1)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of (x, y, z, w) quaternions (normalized first), (..., 4) -> (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(*q.shape[:-1], 3, 3)


def quat_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate v (..., 3) by unit quaternions q (..., 4) in (x, y, z, w) order."""
    qv, w = q[..., :3], q[..., 3:]
    t = 2.0 * torch.linalg.cross(qv, v, dim=-1)
    return v + w * t + torch.linalg.cross(qv, t, dim=-1)


def quat_to_rotvec(q: torch.Tensor) -> torch.Tensor:
    """Rotation vectors [rad] of (x, y, z, w) quaternions, (..., 4) -> (..., 3), angles in [0, pi]."""
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[..., 3:] < 0, -q, q)
    v, w = q[..., :3], q[..., 3:]
    sin = v.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin, w)
    scale = torch.where(sin > 1e-12, angle / sin.clamp_min(1e-12), 2.0 / w.clamp_min(1e-12))
    return v * scale
