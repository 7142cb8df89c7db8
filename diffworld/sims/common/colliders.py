"""Kinematic colliders shared by the simulators: what a collider is (:class:`Collider`), its motion
as torch ops (differentiable), and its mesh for rendering.

A simulator reads one kinematic state per collider per step, :data:`COLLIDER_STATE` floats
(position, quaternion x y z w, linear and angular velocity). These functions build that tensor
from what a user optimizes:

* :func:`from_velocities`: per-control-step linear and angular velocities (FluidLab's actions),
  integrated substep by substep from an initial pose;
* :func:`from_keyframes`: poses at given times, interpolated linearly (positions) and by
  normalized linear blending (rotations), velocities from the differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_multiply, quat_to_matrix

__all__ = ["COLLIDER_STATE", "CONTACT_WEIGHTS", "Collider", "SHAPES", "axis_angle_to_quat", "collider_mesh",
           "from_keyframes", "from_velocities", "quat_multiply", "quat_to_matrix", "static"]

#: Floats of one collider's kinematic state at one step: position (3), quaternion x, y, z, w (4),
#: linear velocity (3), angular velocity (3).
COLLIDER_STATE = 13

#: Collider shapes, as signed distance functions in the collider's frame (z is the axis); every
#: simulator's kernels implement each of them.
SHAPES = ("sphere", "box", "capsule", "cylinder", "cup", "plane", "grid")

#: Soft-contact weights w(d) of a node at signed distance d [m] from a collider of softness s
#: [1/m] (see :class:`Collider`): ``clamped_exp`` is min(exp(-s d), 1), whose derivative jumps
#: from -s to 0 at the surface; ``smooth`` is exp(-r(s d)) with the C1 ramp r(u) = 0 (u <= -1),
#: (u + 1)^2 / 4 (|u| < 1), u (u >= 1): 1 from one decay length inside, exp(-s d) from one decay
#: length outside, with a continuous derivative everywhere.
CONTACT_WEIGHTS = ("clamped_exp", "smooth")


@dataclass
class Collider:
    """A kinematic rigid body with an SDF shape, acting on grid velocities.

    Attributes:
        shape: One of ``sphere, box, capsule, cylinder, cup, plane, grid``.
        size: Shape dimensions [m] in the local frame (z is the axis): sphere (r, -, -), box half
            extents, capsule (r, half segment length, -), cylinder (r, half height, -), cup (inner
            r, half height, wall thickness); unused for plane (normal +z) and grid.
        friction: Coulomb coefficient mu (large: no sliding).
        softness: 0 for hard contact (only nodes inside); > 0 [1/m] blends the contact response
            with a weight of the node's signed distance (``contact_weight``) so gradients arrive
            before contact.
        sticky: Nodes in contact take the collider's velocity.
        sdf: For ``grid``: node values of the SDF in the local frame, shape (a, b, c).
        sdf_lower: For ``grid``: local position of node (0, 0, 0) [m].
        sdf_spacing: For ``grid``: node spacing [m].
        name: Label for outputs.
        contact_weight: The soft-contact weight (:data:`CONTACT_WEIGHTS`): ``clamped_exp``
            (default) min(exp(-softness * sdf), 1), or ``smooth``, its C1 version, which equals it
            beyond one decay length 1/softness from the surface; the clamped weight's derivative
            jumps at the surface, so where a node lies exactly on it (a face on a grid-node plane)
            the loss has a kink in the collider's pose. ``smooth`` needs ``softness > 0``.
    """

    shape: str
    size: tuple[float, float, float] = (0.1, 0.1, 0.1)
    friction: float = 0.5
    softness: float = 0.0
    sticky: bool = False
    sdf: torch.Tensor | None = None
    sdf_lower: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sdf_spacing: float = 1.0
    name: str = "collider"
    contact_weight: str = "clamped_exp"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"collider '{self.name}': shape expected one of {list(SHAPES)}, got {self.shape!r}")
        if self.shape == "grid" and (self.sdf is None or self.sdf.dim() != 3 or min(self.sdf.shape) < 2):
            got = None if self.sdf is None else tuple(self.sdf.shape)
            raise ValueError(f"collider '{self.name}': shape 'grid' expects sdf of shape (a, b, c) with a, b, c >= 2, "
                             f"got {got}")
        if self.friction < 0 or self.softness < 0:
            raise ValueError(f"collider '{self.name}': friction and softness expected >= 0, got "
                             f"{self.friction}, {self.softness}")
        if self.contact_weight not in CONTACT_WEIGHTS:
            raise ValueError(f"collider '{self.name}': contact_weight expected one of {list(CONTACT_WEIGHTS)}, got "
                             f"{self.contact_weight!r}")
        if self.contact_weight == "smooth" and self.softness <= 0:
            raise ValueError(f"collider '{self.name}': contact_weight 'smooth' needs softness > 0 (hard contact has "
                             f"no weight to smooth), got softness {self.softness}")




def static(position: Sequence[float], rotation: Sequence[float] = (0.0, 0.0, 0.0), n_substeps: int = 1,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A collider at rest: shape (n_substeps, 13). ``rotation`` is a rotation vector [rad]."""
    q = axis_angle_to_quat(torch.tensor(rotation, dtype=torch.float64))
    row = torch.cat([torch.tensor(position, dtype=torch.float64), q, torch.zeros(6, dtype=torch.float64)])
    return row.to(dtype).expand(n_substeps, 13).clone()


def from_velocities(position: torch.Tensor, rotation: torch.Tensor, velocities: torch.Tensor, substeps: int,
                    dt: float) -> torch.Tensor:
    """Integrate per-control-step velocities into per-substep collider states.

    Args:
        position: Initial position [m], shape (3,).
        rotation: Initial rotation vector [rad], shape (3,).
        velocities: Per control step (linear [m/s], angular [rad/s]), shape (S, 6); differentiable.
        substeps: Substeps per control step.
        dt: Substep [s].

    Returns:
        States at the start of every substep, shape (S * substeps, 13).
    """
    S = velocities.shape[0]
    v = velocities.repeat_interleave(substeps, 0)  # (T, 6)
    lin, ang = v[:, :3], v[:, 3:]
    # Position at the start of substep t: p0 + dt * sum_{s < t} v_s.
    pos = position + dt * torch.cumsum(torch.cat([torch.zeros_like(lin[:1]), lin[:-1]]), 0)
    q0 = axis_angle_to_quat(rotation)
    dq = axis_angle_to_quat(ang * dt)  # rotation of one substep (world frame)
    quats = [q0]
    for t in range(S * substeps - 1):
        quats.append(quat_multiply(dq[t], quats[-1]))
    return torch.cat([pos, torch.stack(quats), lin, ang], -1)


def from_keyframes(times: Sequence[float], positions: torch.Tensor, rotations: torch.Tensor, n_substeps: int,
                   dt: float) -> torch.Tensor:
    """Piecewise-linear motion through keyframes.

    Args:
        times: Increasing keyframe times [s], length K >= 1 (held before the first and after the last).
        positions: [m], shape (K, 3); differentiable.
        rotations: Rotation vectors [rad], shape (K, 3); differentiable.
        n_substeps: Number of substeps T.
        dt: Substep [s].

    Returns:
        Collider states, shape (T, 13).
    """
    K = len(times)
    if K == 0 or positions.shape != (K, 3) or rotations.shape != (K, 3):
        raise ValueError(f"keyframes: expected K >= 1 times with positions and rotations of shape (K, 3), got "
                         f"{K} times, {tuple(positions.shape)}, {tuple(rotations.shape)}")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"keyframes: times must increase, got {list(times)}")
    dtype = positions.dtype
    t = torch.arange(n_substeps, dtype=torch.float64) * dt
    tk = torch.tensor(list(times), dtype=torch.float64)
    seg = torch.clamp(torch.searchsorted(tk, t, right=True) - 1, 0, max(K - 2, 0))
    if K == 1:
        a = torch.zeros_like(t)
        i0 = i1 = torch.zeros_like(seg)
        rate = torch.zeros_like(t)
    else:
        i0, i1 = seg, seg + 1
        span = tk[i1] - tk[i0]
        a = ((t - tk[i0]) / span).clamp(0, 1)
        rate = torch.where((t >= tk[0]) & (t < tk[-1]), 1.0 / span, torch.zeros_like(span))
    a_ = a.to(dtype)[:, None]
    pos = positions[i0] * (1 - a_) + positions[i1] * a_
    lin = (positions[i1] - positions[i0]) * rate.to(dtype)[:, None]
    q0, q1 = axis_angle_to_quat(rotations[i0]), axis_angle_to_quat(rotations[i1])
    q1 = torch.where(((q0 * q1).sum(-1, keepdim=True) < 0), -q1, q1)
    q = q0 * (1 - a_) + q1 * a_
    q = q / q.norm(dim=-1, keepdim=True)
    ang = (rotations[i1] - rotations[i0]) * rate.to(dtype)[:, None]  # exact for rotations about one axis
    return torch.cat([pos, q, lin, ang], -1)


def collider_mesh(c: Collider, state: torch.Tensor | None = None, plane_extent: float = 1.0,
                  local: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A triangle mesh of a collider at one kinematic state (for rendering).

    Args:
        c: The collider.
        state: Its state, shape (13,); None for the mesh in the collider's own frame.
        plane_extent: Half size [m] of the square drawn for a plane.
        local: The collider's own-frame mesh from an earlier call without ``state`` (built once
            and placed per frame: a mesh collider's costs a marching-cubes pass).

    Returns:
        (vertices (V, 3), faces (F, 3)) as numpy arrays.
    """
    if local is None:
        local = _local_mesh(c, plane_extent)
    if state is None:
        return local
    st = state.detach().cpu().double()
    R = quat_to_matrix(st[3:7]).numpy()
    return local[0] @ R.T + st[:3].numpy(), local[1]


def _local_mesh(c: Collider, plane_extent: float) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    s = c.size
    if c.shape == "sphere":
        m = trimesh.creation.icosphere(subdivisions=2, radius=s[0])
    elif c.shape == "box":
        m = trimesh.creation.box(extents=[2 * s[0], 2 * s[1], 2 * s[2]])
    elif c.shape == "capsule":
        m = trimesh.creation.capsule(height=2 * s[1], radius=s[0])
        m.apply_translation([0, 0, -s[1]])
    elif c.shape == "cylinder":
        m = trimesh.creation.cylinder(radius=s[0], height=2 * s[1])
    elif c.shape == "cup":
        outer = trimesh.creation.annulus(r_min=s[0], r_max=s[0] + s[2], height=2 * s[1])
        bottom = trimesh.creation.cylinder(radius=s[0] + s[2], height=s[2])
        bottom.apply_translation([0, 0, -s[1] + s[2] / 2])
        m = trimesh.util.concatenate([outer, bottom])
    elif c.shape == "plane":
        e = plane_extent
        m = trimesh.Trimesh(vertices=[[-e, -e, 0], [e, -e, 0], [e, e, 0], [-e, e, 0]], faces=[[0, 1, 2], [0, 2, 3]])
    else:
        from diffworld.geometry.marching_cubes import marching_cubes

        vals = c.sdf.detach().cpu().double()
        lo = np.asarray(c.sdf_lower, dtype=np.float64)
        hi = lo + c.sdf_spacing * (np.asarray(vals.shape) - 1)
        iso = marching_cubes(vals, (tuple(lo), tuple(hi)))
        m = trimesh.Trimesh(vertices=iso.vertices.numpy(), faces=iso.faces.numpy(), process=False)
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)
