"""Cameras: one type for the pictures (:mod:`diffworld.viz`) and the coming differentiable renderer.

A :class:`Camera` is a pinhole looking from ``eye`` towards ``center`` with an orthonormal frame
(``right``, ``up``, ``forward``) and a vertical field of view; :func:`orbit_camera` places one on a
sphere around a point, the way the pictures frame a scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Camera", "orbit_camera"]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in world coordinates [m].

    Attributes:
        eye: Position, shape (3,).
        center: Point looked at, shape (3,).
        right: Unit screen-right direction, shape (3,).
        up: Unit screen-up direction, shape (3,).
        forward: Unit direction from ``eye`` towards ``center``, shape (3,).
        fov_deg: Vertical field of view [degrees].
    """

    eye: np.ndarray
    center: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    fov_deg: float = 30.0

    def view_matrix(self) -> np.ndarray:
        """World -> camera transform (4, 4): x right, y up, z backwards (OpenGL convention)."""
        rot = np.stack([self.right, self.up, -self.forward])
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = -rot @ self.eye
        return m


def orbit_camera(center: np.ndarray, radius: float, azimuth: float, elevation: float, aspect: float,
                 margin: float = 1.0, fov_deg: float = 30.0) -> Camera:
    """A camera at (azimuth, elevation) [degrees] that frames the sphere (center, radius) [m] in a
    viewport of width/height ``aspect``, with ``margin`` >= 1 of room around it.

    Screen-up is world +z, except looking straight down or up, where it becomes the horizontal
    direction away from the camera (the limit of the z-up view).
    """
    center = np.asarray(center, dtype=float)
    a, e = math.radians(azimuth), math.radians(elevation)
    to_eye = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    half_v = math.radians(fov_deg) / 2
    half = min(half_v, math.atan(math.tan(half_v) * aspect))
    eye = center + to_eye * (radius * margin / math.sin(half))
    forward = -to_eye
    world_up = np.array([0.0, 0.0, 1.0]) if abs(math.sin(e)) < 0.9999 else np.sign(e) * -np.array(
        [math.cos(a), math.sin(a), 0.0])
    right = np.cross(forward, world_up)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return Camera(eye, center, right, up, forward, fov_deg)
