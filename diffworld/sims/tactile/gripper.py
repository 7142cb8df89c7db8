"""A parallel-jaw gripper carrying two flat gel pads (issue 15): the pads' world poses from the
gripper's pose and opening, and the FEM models and per-step controls that drive each pad's gel.

Frames (SI units, quaternions (x, y, z, w)):

* Gripper frame: origin at the wrist (flange); +z is the approach axis (towards the fingertips);
  the jaws close along x. The pads' centres lie on the x axis at ``z = finger_offset``.
* Pad frame: the gel's own frame of :func:`~diffworld.sims.tactile.sensors.flat_pad` (base at
  z = 0, contact face at z = t, its thickness, normal +z). Each pad's +z points at the other pad
  and its +x along the approach axis; the right pad (+x side) is the left pad turned by 180
  degrees about the approach axis, so the two are exactly symmetric under that turn.
* ``opening`` [m] is the gap between the two contact faces (what fits between the jaws). The pad
  bases (sensor origins) are ``opening + 2 t`` apart, at ``x = -/+ (opening / 2 + t)``.

A pad's gel is simulated as its own FEM model (:func:`sensor_model`): the mesh placed at the pad's
start pose, the base nodes anchored in the pad frame with the pivot at its origin, so the
per-step :class:`~diffworld.sims.fem.Control` is simply the pad's world pose at the end of each step
(:func:`sensor_control`), as in the ``tactile`` task's scene.

Example::

    gripper = ParallelGripper(flat_pad(), max_opening=0.05, finger_offset=0.1)
    pads = gripper.pad_poses(g_pos, g_quat, opening)           # (T + 1) poses, row 0 the start
    left = sensor_model(gripper.pad, pads.left_position[0], pads.left_quaternion[0], E=1e5, nu=0.4,
                        density=1100.0)
    steps = pads.select(slice(1, None))                        # row s: the pose at the end of step s
    out = fem.rollout(left, left.rest_state(), dt, control=sensor_control(steps.left_position,
                      steps.left_quaternion), contact=...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from diffworld.sims import fem
from diffworld.sims.common.kinematics import Pose, mount_pose
from diffworld.sims.common.quaternion import quat_multiply, quat_rotate, quat_to_matrix
from diffworld.sims.tactile.sensors import SensorGeometry, flat_pad

__all__ = ["PadPoses", "ParallelGripper", "place_mesh", "sensor_control", "sensor_model"]

# Pad rotations in the gripper frame: the right pad is Ry(-90 deg) (pad +z -> gripper -x, pad +x ->
# gripper +z); the left pad is that turned by 180 deg about the gripper z axis (pad +z -> +x).
_H = math.sqrt(0.5)
_RIGHT = (0.0, -_H, 0.0, _H)
_LEFT = (_H, 0.0, _H, 0.0)  # (0, 0, 1, 0) * _RIGHT: 180 deg about (x + z) / sqrt(2)


class PadPoses(NamedTuple):
    """World poses of the two pads' frames (sensor origins).

    Attributes:
        left_position: [m], (T, 3), the pad on the gripper's -x side.
        left_quaternion: (x, y, z, w), (T, 4).
        right_position: [m], (T, 3), the pad on the +x side.
        right_quaternion: (x, y, z, w), (T, 4).
    """

    left_position: torch.Tensor
    left_quaternion: torch.Tensor
    right_position: torch.Tensor
    right_quaternion: torch.Tensor

    def select(self, index: int | slice | torch.Tensor) -> "PadPoses":
        """The same rows of all four fields, e.g. ``select(slice(1, None))``: the per-step poses
        after the start row."""
        return PadPoses(*(t[index] for t in self))

    @property
    def left(self) -> Pose:
        return Pose(self.left_position, self.left_quaternion)

    @property
    def right(self) -> Pose:
        return Pose(self.right_position, self.right_quaternion)


class ParallelGripper:
    """A parallel-jaw gripper with one gel pad on each jaw.

    Args:
        pad: The pads' gel (both jaws carry the same one), in its own frame with the contact face
            towards +z; default ``flat_pad()`` (20 x 20 x 4 mm).
        max_opening: Largest gap between the contact faces [m] > 0.
        finger_offset: Distance along the approach axis from the gripper origin to the pads'
            centres [m].

    Attributes:
        pad: The pad geometry (:class:`SensorGeometry`).
        thickness: t, the height of the pad's contact face above its base [m].
        max_opening, finger_offset: As given.
    """

    def __init__(self, pad: SensorGeometry | None = None, max_opening: float = 0.05, finger_offset: float = 0.0) -> None:
        pad = flat_pad() if pad is None else pad
        if not isinstance(pad, SensorGeometry):
            raise TypeError(f"ParallelGripper: expected 'pad' a SensorGeometry (e.g. flat_pad()), got "
                            f"{type(pad).__name__}")
        if not (isinstance(max_opening, (int, float)) and math.isfinite(max_opening) and max_opening > 0):
            raise ValueError(f"ParallelGripper: expected 'max_opening' a positive length [m], got {max_opening!r}")
        if not (isinstance(finger_offset, (int, float)) and math.isfinite(finger_offset)):
            raise ValueError(f"ParallelGripper: expected 'finger_offset' a finite length [m], got {finger_offset!r}")
        self.pad = pad
        z = pad.mesh.vertices[:, 2].to(torch.float64)
        self.thickness = float(z[pad.contact_nodes].mean())  # the contact face's height (flat: all equal)
        if self.thickness <= 0:
            raise ValueError(f"ParallelGripper: the pad's contact face must lie above its base (z > 0), got "
                             f"z = {self.thickness:g} m")
        self.max_opening = float(max_opening)
        self.finger_offset = float(finger_offset)

    @property
    def geometries(self) -> tuple[SensorGeometry, SensorGeometry]:
        """The (left, right) pads' geometry, each in its own pad frame (the same gel)."""
        return self.pad, self.pad

    def check_opening(self, opening: torch.Tensor, tol: float = 1e-12) -> None:
        """Raise ValueError if an opening is outside [0, max_opening], naming the step and value."""
        o = opening.detach().to(torch.float64).reshape(-1).cpu()
        bad = ~torch.isfinite(o) | (o < -tol) | (o > self.max_opening + tol)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"ParallelGripper: 'opening' must be in [0, {self.max_opening:g}] m (the gap between "
                             f"the contact faces); step {i} has {float(o[i]):.6g} m")

    def pad_offsets(self, opening: torch.Tensor) -> PadPoses:
        """The pads' poses in the gripper frame for openings (T,) [m] (differentiable)."""
        o = torch.as_tensor(opening)
        o = o.reshape(-1) if o.dim() == 0 else o
        half = (0.5 * o + self.thickness)[:, None]
        z = torch.full_like(half, self.finger_offset)
        zero = torch.zeros_like(half)
        T = o.shape[0]
        return PadPoses(torch.cat([-half, zero, z], 1), o.new_tensor(_LEFT).expand(T, 4),
                        torch.cat([half, zero, z], 1), o.new_tensor(_RIGHT).expand(T, 4))

    def pad_poses(self, gripper_position: torch.Tensor, gripper_quaternion: torch.Tensor, opening: torch.Tensor,
                  check: bool = True) -> PadPoses:
        """World poses of the two pads (differentiable in all inputs).

        Args:
            gripper_position: Gripper origin [m], (T, 3) or (3,).
            gripper_quaternion: Gripper rotation (x, y, z, w), (T, 4) or (4,) (normalized inside).
            opening: Gap between the contact faces [m], (T,) or ().
            check: Raise ValueError for openings outside [0, max_opening].

        Returns:
            :class:`PadPoses` with T = the largest of the three leading sizes.
        """
        for name, x, w in (("gripper_position", gripper_position, 3), ("gripper_quaternion", gripper_quaternion, 4)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ParallelGripper.pad_poses: expected '{name}' a torch tensor, got {type(x).__name__}")
            if x.dim() not in (1, 2) or x.shape[-1] != w:
                raise ValueError(f"ParallelGripper.pad_poses: expected '{name}' of shape (T, {w}) or ({w},), got "
                                 f"{tuple(x.shape)}")
        if not isinstance(opening, torch.Tensor):
            opening = torch.as_tensor(opening, dtype=gripper_position.dtype, device=gripper_position.device)
        if opening.dim() > 1:
            raise ValueError(f"ParallelGripper.pad_poses: expected 'opening' of shape (T,) or (), got "
                             f"{tuple(opening.shape)}")
        lead = [x.shape[0] for x in (gripper_position, gripper_quaternion) if x.dim() == 2]
        sizes = set(lead + ([opening.shape[0]] if opening.dim() == 1 else [])) - {1}
        if len(sizes) > 1:
            raise ValueError(f"ParallelGripper.pad_poses: inconsistent step counts: gripper_position "
                             f"{tuple(gripper_position.shape)}, gripper_quaternion {tuple(gripper_quaternion.shape)}, "
                             f"opening {tuple(opening.shape)}")
        if check:
            self.check_opening(opening)
        T = sizes.pop() if sizes else 1
        p = gripper_position.reshape(-1, 3).expand(T, 3)
        q = gripper_quaternion.reshape(-1, 4)
        q = (q / q.norm(dim=-1, keepdim=True)).expand(T, 4)
        local = self.pad_offsets(opening.to(p).reshape(-1).expand(T))
        return PadPoses(p + quat_rotate(q, local.left_position), quat_multiply(q, local.left_quaternion),
                        p + quat_rotate(q, local.right_position), quat_multiply(q, local.right_quaternion))

    def pad_poses_from_link(self, link: Pose | torch.Tensor, opening: torch.Tensor,
                            mount_position: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
                            mount_quaternion: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0, 1.0),
                            check: bool = True) -> PadPoses:
        """Pad poses of a gripper mounted on a robot link (e.g. a URDF end-effector link from
        :meth:`diffworld.sims.common.kinematics.KinematicChain.link_pose`).

        Args:
            link: The link's world poses, a :class:`~diffworld.sims.common.kinematics.Pose` or (T, 7).
            opening: Gap between the contact faces [m], (T,).
            mount_position: The gripper origin in the link frame [m], (3,).
            mount_quaternion: The gripper rotation w.r.t. the link (x, y, z, w), (4,).
            check: As in :meth:`pad_poses`.
        """
        g = mount_pose(link, mount_position, mount_quaternion)
        return self.pad_poses(g.position, g.quaternion, opening, check)

    def models(self, start: PadPoses, **build_kwargs) -> tuple[fem.Model, fem.Model]:
        """The (left, right) pads' FEM models at row 0 of ``start`` (:func:`sensor_model`)."""
        return (sensor_model(self.pad, start.left_position[0], start.left_quaternion[0], **build_kwargs),
                sensor_model(self.pad, start.right_position[0], start.right_quaternion[0], **build_kwargs))

    @staticmethod
    def controls(poses: PadPoses) -> tuple[fem.Control, fem.Control]:
        """The (left, right) per-step FEM controls of pad poses (row s: the pose at the end of step s)."""
        return sensor_control(poses.left_position, poses.left_quaternion), \
            sensor_control(poses.right_position, poses.right_quaternion)


def place_mesh(geometry: SensorGeometry, position: torch.Tensor, quaternion: torch.Tensor,
               name: str = "sensor") -> fem.TetMesh:
    """The sensor's rest mesh moved to a world pose (float64; no gradient: a model's rest shape is fixed).

    Args:
        geometry: The gel in its sensor frame.
        position: Sensor origin [m], (3,).
        quaternion: Sensor rotation (x, y, z, w), (4,).
    """
    p = torch.as_tensor(position).detach().to(torch.float64).cpu()
    q = torch.as_tensor(quaternion).detach().to(torch.float64).cpu()
    if p.shape != (3,) or q.shape != (4,):
        raise ValueError(f"place_mesh: expected 'position' (3,) and 'quaternion' (4,), got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    local = geometry.mesh.vertices.to(torch.float64)
    return fem.TetMesh(local @ quat_to_matrix(q).T + p, geometry.mesh.tets, name)


def sensor_model(geometry: SensorGeometry, position: torch.Tensor, quaternion: torch.Tensor, *,
                 name: str = "sensor", **build_kwargs) -> fem.Model:
    """An FEM model of a sensor's gel placed at its start pose, its base driven by the sensor pose.

    The base nodes are kinematic with anchors at their sensor-frame positions and the pivot at the
    sensor origin, so :func:`sensor_control` of the sensor's world poses moves the base rigidly
    with the sensor (the same construction as the ``tactile`` task's scene).

    Args:
        geometry: The gel in its sensor frame.
        position: Start position of the sensor origin [m], (3,).
        quaternion: Start rotation (x, y, z, w), (4,).
        name: Mesh name.
        **build_kwargs: Passed to :func:`diffworld.sims.fem.build_model` (``E``, ``nu``, ``density``
            required; ``law``, ``gravity``, ``damping``, ``dtype``, ``device``...); ``kinematic``,
            ``anchors`` and ``pivot`` are set here.
    """
    for key in ("kinematic", "anchors", "pivot"):
        if key in build_kwargs:
            raise ValueError(f"sensor_model: '{key}' is set by the sensor (its base nodes, anchored in the sensor "
                             f"frame, pivot at its origin); do not pass it")
    local = geometry.mesh.vertices.to(torch.float64)
    return fem.build_model(place_mesh(geometry, position, quaternion, name), kinematic=geometry.base_nodes,
                           anchors=local[geometry.base_nodes], pivot=(0.0, 0.0, 0.0), **build_kwargs)


def sensor_control(position: torch.Tensor, quaternion: torch.Tensor) -> fem.Control:
    """The FEM control of a :func:`sensor_model` from the sensor's world poses at the end of each
    step: positions (T, 3) [m], quaternions (T, 4) (differentiable)."""
    if position.dim() != 2 or position.shape[1] != 3 or quaternion.shape != (position.shape[0], 4):
        raise ValueError(f"sensor_control: expected 'position' (T, 3) and 'quaternion' (T, 4), got "
                         f"{tuple(position.shape)} and {tuple(quaternion.shape)}")
    return fem.Control(translation=position, rotation=quaternion)
