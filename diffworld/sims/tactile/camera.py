"""The tactile sensor's camera and the markers on its gel: differentiable torch ops.

A vision-based tactile sensor films the inside of its gel. :class:`SensorCamera` projects points
given in the sensor frame [m] to pixels with a pinhole or an equidistant fisheye model
(r = f theta, the DiffTactile dome's lens: :meth:`SensorCamera.difftactile_fisheye`).
:class:`Markers` are dots printed on the gel's contact surface, fixed to it by barycentric
coordinates, so they move with the deformed mesh exactly and their image positions are smooth
functions of the node positions. (The reference ties each marker to its 5 nearest projected nodes
by inverse-distance weights recomputed from the current image, a lookup whose gradients users
report broken.)

Both are plain torch: gradients flow to the node positions (and through the FEM rollout to
controls and material parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Markers", "SensorCamera"]

_MODELS = ("pinhole", "fisheye_equidistant")


@dataclass(frozen=True)
class SensorCamera:
    """A camera in the sensor frame.

    Camera coordinates: x right, y down (image rows), z along the optical axis. A sensor-frame
    point p has camera coordinates ``rotation @ (p - position)``.

    Attributes:
        model: ``"pinhole"`` (u = cx + f x / z) or ``"fisheye_equidistant"`` (the radius from the
            image centre is f theta, theta the angle from the optical axis).
        focal_px: f [pixels].
        center_px: (cx, cy) the principal point [pixels].
        size_px: (width, height) [pixels].
        position: (3,) the optical centre in the sensor frame [m].
        rotation: (3, 3) sensor frame -> camera frame.
    """

    model: str
    focal_px: float
    center_px: tuple[float, float]
    size_px: tuple[int, int]
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple = field(default=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))

    def __post_init__(self) -> None:
        if self.model not in _MODELS:
            raise ValueError(f"SensorCamera: 'model' must be one of {', '.join(_MODELS)}, got {self.model!r}")
        if not (math.isfinite(self.focal_px) and self.focal_px > 0):
            raise ValueError(f"SensorCamera: 'focal_px' must be a positive number of pixels, got {self.focal_px!r}")
        R = np.asarray(self.rotation, dtype=np.float64)
        if R.shape != (3, 3) or not np.allclose(R @ R.T, np.eye(3), atol=1e-9) or np.linalg.det(R) < 0:
            raise ValueError(f"SensorCamera: 'rotation' must be a 3x3 rotation matrix, got {R.tolist()}")

    @classmethod
    def difftactile_fisheye(cls) -> "SensorCamera":
        """The dome sensor's camera in DiffTactile: r = m f theta with f = 8.627e-4 and m = 173913
        (150.04 px per radian), centre (332, 240), 640 x 480, at the dome's centre looking
        along +z (into the dome)."""
        return cls("fisheye_equidistant", 173913 * 8.627e-4, (332.0, 240.0), (640, 480))

    def to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Camera coordinates (N, 3) [m] of sensor-frame points (N, 3)."""
        R = torch.as_tensor(self.rotation, dtype=points.dtype, device=points.device)
        c = torch.as_tensor(self.position, dtype=points.dtype, device=points.device)
        return (points - c) @ R.T

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (N, 2) (u along the width, v along the height) of sensor-frame points
        (N, 3) [m]; differentiable. Points behind a pinhole (z <= 0) give NaN: check
        :meth:`in_front` first."""
        q = self.to_camera(points)
        x, y, z = q.unbind(-1)
        cx, cy = self.center_px
        f = self.focal_px
        if self.model == "pinhole":
            z = torch.where(z > 0, z, torch.full_like(z, float("nan")))
            return torch.stack([cx + f * x / z, cy + f * y / z], -1)
        rho2 = x * x + y * y
        rho = torch.sqrt(torch.where(rho2 > 0, rho2, torch.ones_like(rho2)))
        # theta / rho, with its series near the axis (atan2(rho, z) / rho = 1/z - rho^2 / (3 z^3)
        # + ...) where the division would lose digits or the sqrt's gradient would be infinite.
        near = (rho2 < (1e-6 * z) ** 2) & (z > 0)
        zs = torch.where(near, z, torch.ones_like(z))
        series = 1 / zs - rho2 / (3 * zs ** 3)
        scale = torch.where(near, series, torch.atan2(rho, z) / rho)
        return torch.stack([cx + f * scale * x, cy + f * scale * y], -1)

    def in_front(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool: in the camera's view half-space: z > 0 in camera coordinates for a pinhole;
        z >= 0 (up to 90 degrees off the axis, e.g. a dome's rim) and not the optical centre
        itself for a fisheye."""
        q = self.to_camera(points)
        if self.model == "pinhole":
            return q[:, 2] > 0
        return (q[:, 2] >= 0) & (q.norm(dim=1) > 0)

    def in_image(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool: in front of the camera and projected inside the image."""
        with torch.no_grad():
            uv = self.project(points)
        w, h = self.size_px
        inside = (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        return self.in_front(points) & inside


@dataclass(frozen=True)
class Markers:
    """Dots on a triangulated surface, fixed to it by barycentric coordinates.

    Attributes:
        faces: (F, 3) int64 the surface triangles (node ids of the mesh).
        face: (M,) int64 the triangle (row of ``faces``) each marker lies on.
        bary: (M, 3) float64 its barycentric coordinates there (non-negative, summing to 1).
    """

    faces: torch.Tensor
    face: torch.Tensor
    bary: torch.Tensor

    @classmethod
    def sample(cls, nodes: torch.Tensor, faces: torch.Tensor, n: int, seed: int = 0) -> "Markers":
        """``n`` markers uniform by area on the surface (nodes (N, 3) [m], faces (F, 3)), seeded."""
        import trimesh

        mesh = trimesh.Trimesh(nodes.detach().cpu().double().numpy(), faces.cpu().numpy(), process=False)
        points, face = trimesh.sample.sample_surface(mesh, int(n), seed=seed)
        return cls._attach(mesh, faces, points, face)

    @classmethod
    def from_points(cls, nodes: torch.Tensor, faces: torch.Tensor, points: torch.Tensor) -> "Markers":
        """Markers at given positions (M, 3) [m] (e.g. a printed dot pattern), attached to the
        closest point of the surface."""
        from diffworld.geometry.mesh_sdf import closest_points

        pts = torch.as_tensor(points, dtype=torch.float64).detach()
        face, bary = closest_points(nodes.detach().double(), faces, pts)
        return cls(faces.long(), face.cpu(), cls._on_triangle(bary.cpu()))

    @classmethod
    def _attach(cls, mesh, faces: torch.Tensor, points: np.ndarray, face: np.ndarray) -> "Markers":
        import trimesh

        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face], points)
        return cls(faces.long(), torch.as_tensor(face, dtype=torch.int64), cls._on_triangle(torch.as_tensor(bary)))

    @staticmethod
    def _on_triangle(bary: torch.Tensor) -> torch.Tensor:
        """Barycentrics on their triangle up to rounding -> exactly on it (non-negative, sum 1)."""
        bary = bary.clamp_min(0.0)
        return bary / bary.sum(1, keepdim=True)

    def positions(self, nodes: torch.Tensor) -> torch.Tensor:
        """Marker positions (M, 3) [m] on the surface with node positions ``nodes`` (N, 3)."""
        corners = nodes[self.faces[self.face].to(nodes.device)]  # (M, 3, 3)
        return (self.bary.to(nodes)[:, :, None] * corners).sum(1)

    def image(self, nodes: torch.Tensor, camera: SensorCamera) -> torch.Tensor:
        """Marker pixel positions (M, 2) seen by ``camera``."""
        return camera.project(self.positions(nodes))

    def flow(self, nodes: torch.Tensor, rest: torch.Tensor, camera: SensorCamera) -> torch.Tensor:
        """Marker displacement in the image (M, 2) [pixels] from the rest nodes to ``nodes``."""
        return self.image(nodes, camera) - self.image(rest, camera).detach()
