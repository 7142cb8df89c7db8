"""The optical tactile image: the gel's reflective contact surface, lit by coloured lights, as the
sensor camera sees it. A differentiable torch op of the node positions.

Each pixel is tied once, at rest, to the point of the contact surface it sees (the surface's
triangles projected by the camera and located with matplotlib's triangle finder; the
correspondence is in image space, exact for the projected vertices and linear in between). When
the gel deforms, the pixel shows the same material point with its deformed normal: the image
changes through the shading, as in a GelSight sensor, where the indentation is a small fraction of
the gel's distance to the camera (the reference's pixel-based neural optical model was never
released). The normal at a pixel interpolates the area-weighted vertex normals of the deformed
surface with the pixel's barycentrics, so shading is smooth across triangles.

Shading: :class:`Photometric` maps a unit normal, expressed in the camera frame, to RGB either
by Lambertian lights (``ambient + sum_k colour_k max(n . l_k, 0)``, softened by a softplus so
the image stays differentiable where a light grazes the surface) or by a calibration polynomial
of the normal's x and y (the usual GelSight calibration, fitted to a real sensor's
normal-to-colour table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffworld.sims.tactile.camera import SensorCamera

__all__ = ["OpticalImage", "Photometric"]


@dataclass(frozen=True)
class Photometric:
    """Normal (camera frame) -> colour.

    Attributes:
        lights: (K, 3) unit directions towards each light, in the camera frame (Lambertian mode).
        colors: (K, 3) RGB of each light in [0, 1].
        ambient: (3,) RGB added everywhere.
        poly: None, or (3, 6) coefficients of RGB = c0 + c1 nx + c2 ny + c3 nx^2 + c4 nx ny + c5 ny^2
            (calibration mode; overrides the lights).
        sharpness: Softplus sharpness of max(n . l, 0) (large: the hard clamp).
    """

    lights: tuple = ((0.0, -0.8660254, -0.5), (0.75, 0.4330127, -0.5), (-0.75, 0.4330127, -0.5))
    colors: tuple = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    ambient: tuple = (0.1, 0.1, 0.1)
    poly: tuple | None = None
    sharpness: float = 50.0

    def __post_init__(self) -> None:
        L, C = np.asarray(self.lights, dtype=np.float64), np.asarray(self.colors, dtype=np.float64)
        if L.ndim != 2 or L.shape[1] != 3 or C.shape != L.shape:
            raise ValueError(f"Photometric: 'lights' and 'colors' must both be (K, 3), got {L.shape} and {C.shape}")
        if not np.allclose(np.linalg.norm(L, axis=1), 1.0, atol=1e-6):
            raise ValueError(f"Photometric: 'lights' must be unit directions, got norms {np.linalg.norm(L, axis=1)}")
        if self.poly is not None and np.asarray(self.poly).shape != (3, 6):
            raise ValueError(f"Photometric: 'poly' must be (3, 6) coefficients, got {np.asarray(self.poly).shape}")
        if not (math.isfinite(self.sharpness) and self.sharpness > 0):
            raise ValueError(f"Photometric: 'sharpness' must be positive, got {self.sharpness!r}")

    def shade(self, normals: torch.Tensor) -> torch.Tensor:
        """RGB (..., 3) of unit normals (..., 3) in the camera frame."""
        if self.poly is not None:
            nx, ny = normals[..., 0], normals[..., 1]
            basis = torch.stack([torch.ones_like(nx), nx, ny, nx * nx, nx * ny, ny * ny], -1)
            return basis @ torch.as_tensor(self.poly, dtype=normals.dtype, device=normals.device).T
        L = torch.as_tensor(self.lights, dtype=normals.dtype, device=normals.device)
        C = torch.as_tensor(self.colors, dtype=normals.dtype, device=normals.device)
        k = self.sharpness
        lit = torch.nn.functional.softplus(normals @ L.T, beta=k)  # (..., K): smooth max(n . l, 0)
        return torch.as_tensor(self.ambient, dtype=normals.dtype, device=normals.device) + lit @ C


def _vertex_normals(nodes: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit area-weighted vertex normals (N, 3) (zero rows for nodes off the surface)."""
    p = nodes[faces]
    fn = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)  # 2 x area x unit normal
    vn = torch.zeros_like(nodes).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, 0))
    return vn / vn.norm(dim=1, keepdim=True).clamp_min(1e-300)


@dataclass(frozen=True)
class OpticalImage:
    """The pixel -> surface correspondence of a sensor, fixed at rest, and its rendering.

    Attributes:
        camera: The sensor camera.
        faces: (F, 3) int64 the contact surface (outward).
        pixel: (P,) int64 flat indices (row * width + column) of the pixels that see the surface.
        face: (P,) int64 the triangle each of them sees.
        bary: (P, 3) float64 where on it (image-space barycentrics).
        background: (3,) RGB of pixels that see no surface.
    """

    camera: SensorCamera
    faces: torch.Tensor
    pixel: torch.Tensor
    face: torch.Tensor
    bary: torch.Tensor
    background: tuple = (0.0, 0.0, 0.0)

    @classmethod
    def at_rest(cls, rest: torch.Tensor, faces: torch.Tensor, camera: SensorCamera,
                background: tuple = (0.0, 0.0, 0.0)) -> "OpticalImage":
        """Tie every pixel to the contact-surface point it sees at rest.

        Args:
            rest: (N, 3) rest node positions [m] (sensor frame).
            faces: (F, 3) the contact surface triangles; their projection must not overlap itself
                (true for a dome seen from its centre and a pad seen from below).
            camera: The sensor camera.
        """
        import matplotlib.tri as mtri

        faces = faces.long()
        used = torch.unique(faces)
        if not bool(camera.in_front(rest[used]).all()):
            raise ValueError("OpticalImage: part of the contact surface is behind the camera")
        uv = camera.project(rest.detach().double()).numpy()
        tri = mtri.Triangulation(uv[:, 0], uv[:, 1], faces.numpy())
        w, h = camera.size_px
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)  # pixel centres
        found = tri.get_trifinder()(cols.ravel(), rows.ravel())
        pixel = np.nonzero(found >= 0)[0]
        face = found[pixel]
        a, b, c = (uv[faces.numpy()[face, j]] for j in range(3))
        q = np.stack([cols.ravel()[pixel], rows.ravel()[pixel]], 1)
        # Barycentrics of q in the projected triangle (a, b, c).
        v0, v1, v2 = b - a, c - a, q - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        bary = np.clip(np.stack([1 - l1 - l2, l1, l2], 1), 0.0, None)
        bary /= bary.sum(1, keepdims=True)
        return cls(camera, faces, torch.as_tensor(pixel, dtype=torch.int64), torch.as_tensor(face, dtype=torch.int64),
                   torch.as_tensor(bary), tuple(background))

    def normals(self, nodes: torch.Tensor) -> torch.Tensor:
        """Unit surface normals (P, 3) at the pixels' material points, in the camera frame."""
        vn = _vertex_normals(nodes, self.faces.to(nodes.device))
        n = (self.bary.to(nodes)[:, :, None] * vn[self.faces[self.face]]).sum(1)
        R = torch.as_tensor(self.camera.rotation, dtype=nodes.dtype, device=nodes.device)
        return (n / n.norm(dim=1, keepdim=True)) @ R.T

    def render(self, nodes: torch.Tensor, shading: Photometric | None = None) -> torch.Tensor:
        """The RGB image (height, width, 3) of the surface with node positions ``nodes`` (N, 3).

        The camera looks at the surface from inside the gel, so the normals it shades are the
        outward normals turned towards it (-n): the coating's side the light reaches."""
        shading = shading or Photometric()
        colour = shading.shade(-self.normals(nodes))
        w, h = self.camera.size_px
        img = torch.as_tensor(self.background, dtype=nodes.dtype, device=nodes.device).repeat(h * w, 1)
        img = img.index_copy(0, self.pixel.to(nodes.device), colour)
        return img.reshape(h, w, 3)
