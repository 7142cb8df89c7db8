"""Cameras: :class:`Camera` for the pictures (:mod:`diffworld.viz`) and :class:`Views`, a batch of
calibrated pinhole views for the rasterizer (:mod:`diffworld.render.raster`).

A :class:`Camera` is a pinhole looking from ``eye`` towards ``center`` with an orthonormal frame
(``right``, ``up``, ``forward``) and a vertical field of view; :func:`orbit_camera` places one on a
sphere around a point, the way the pictures frame a scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Camera", "Views", "orbit_camera", "orbit_views"]


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


# ---------------------------------------------------------------------------------- batched views


@dataclass(frozen=True)
class Views:
    """A batch of V calibrated pinhole views of one image size, for the rasterizer.

    Conventions (OpenCV): camera axes x right, y down, z forward (the camera looks along +z);
    pixel (0, 0) is the top-left pixel and its centre is at (0.5, 0.5); a camera-space point
    (x, y, z) lands at pixel coordinates (fx x / z + cx, fy y / z + cy). :meth:`from_camera` and
    the ``transforms.json`` reader convert from the OpenGL axes (y up, looking along -z).

    Attributes:
        cam_to_world: Camera-to-world rigid transforms (V, 4, 4), OpenCV axes [m].
        fx, fy: Focal lengths [pixels], (V,).
        cx, cy: Principal point [pixels], (V,).
        width, height: Image size [pixels].
    """

    cam_to_world: "torch.Tensor"
    fx: "torch.Tensor"
    fy: "torch.Tensor"
    cx: "torch.Tensor"
    cy: "torch.Tensor"
    width: int
    height: int

    def __post_init__(self):
        import torch

        V = self.cam_to_world.shape[0] if self.cam_to_world.ndim == 3 else -1
        if self.cam_to_world.ndim != 3 or tuple(self.cam_to_world.shape[1:]) != (4, 4):
            raise ValueError(f"Views: cam_to_world: expected shape (V, 4, 4), got {tuple(self.cam_to_world.shape)}")
        for name in ("fx", "fy", "cx", "cy"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (V,):
                raise ValueError(f"Views: {name}: expected a tensor of shape ({V},), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(self.cam_to_world.detach()).all()) or not all(
                bool(torch.isfinite(getattr(self, n).detach()).all()) for n in ("fx", "fy", "cx", "cy")):
            raise ValueError("Views: cameras must be finite")
        if not bool((self.fx > 0).all() and (self.fy > 0).all()):
            raise ValueError(f"Views: focal lengths must be > 0, got fx {self.fx.tolist()}, fy {self.fy.tolist()}")
        if not (isinstance(self.width, int) and isinstance(self.height, int) and self.width > 0 and self.height > 0):
            raise ValueError(f"Views: width and height must be integers > 0, got {self.width!r}, {self.height!r}")
        R = self.cam_to_world[:, :3, :3].detach()
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        if float((R.transpose(1, 2) @ R - eye).abs().max()) > 1e-4 or bool((torch.linalg.det(R) < 0).any()):
            raise ValueError("Views: cam_to_world must hold rotations (orthonormal, det +1) in its upper-left 3x3")

    def __len__(self) -> int:
        return self.cam_to_world.shape[0]

    @property
    def eyes(self) -> "torch.Tensor":
        """Camera centres in world coordinates (V, 3) [m]."""
        return self.cam_to_world[:, :3, 3]

    def to(self, dtype=None, device=None) -> "Views":
        """The same views with tensors in ``dtype`` on ``device``."""
        conv = {n: getattr(self, n).to(dtype=dtype, device=device) for n in ("cam_to_world", "fx", "fy", "cx", "cy")}
        return Views(width=self.width, height=self.height, **conv)

    def ray_directions(self) -> "torch.Tensor":
        """World-space directions (V, H, W, 3) of the rays through every pixel centre, scaled so
        that their camera-space z is 1 (a hit at ``eye + t d`` has depth t)."""
        import torch

        dt, dev = self.cam_to_world.dtype, self.cam_to_world.device
        u = torch.arange(self.width, dtype=dt, device=dev) + 0.5
        v = torch.arange(self.height, dtype=dt, device=dev) + 0.5
        x = (u[None, None, :] - self.cx[:, None, None]) / self.fx[:, None, None]
        y = (v[None, :, None] - self.cy[:, None, None]) / self.fy[:, None, None]
        x, y = torch.broadcast_tensors(x, y)
        d_cam = torch.stack([x, y, torch.ones_like(x)], -1)  # (V, H, W, 3)
        return torch.einsum("vij,vhwj->vhwi", self.cam_to_world[:, :3, :3], d_cam)

    def project(self, points: "torch.Tensor") -> "torch.Tensor":
        """Pixel coordinates and depth (V, N, 3): (u, v, z) of world points (N, 3) in each view."""
        import torch

        w2c = torch.linalg.inv(self.cam_to_world)
        p = torch.einsum("vij,nj->vni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
        z = p[..., 2]
        return torch.stack([self.fx[:, None] * p[..., 0] / z + self.cx[:, None],
                            self.fy[:, None] * p[..., 1] / z + self.cy[:, None], z], -1)

    @staticmethod
    def from_cameras(cameras: "list[Camera]", width: int, height: int, dtype=None) -> "Views":
        """Views of :class:`Camera` s (OpenGL frames, vertical field of view) at one image size,
        square pixels, principal point at the image centre."""
        import torch

        dtype = dtype or torch.float32
        c2w = []
        for cam in cameras:
            m = np.eye(4)
            # OpenCV axes: x right, y down (-up), z forward
            m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = cam.right, -np.asarray(cam.up), cam.forward, cam.eye
            c2w.append(m)
        f = [0.5 * height / math.tan(math.radians(cam.fov_deg) / 2) for cam in cameras]
        t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
        n = len(cameras)
        return Views(t(np.stack(c2w)), t(f), t(f), t([width / 2] * n), t([height / 2] * n), width, height)


def orbit_views(center, radius: float, n: int, width: int, height: int, elevations=(20.0, -20.0),
                fov_deg: float = 40.0, margin: float = 1.1, dtype=None) -> Views:
    """``n`` views spread in azimuth around the sphere (center, radius) [m], alternating through
    ``elevations`` [degrees], each framing the sphere with ``margin``."""
    cams = [orbit_camera(np.asarray(center, float), radius, 360.0 * k / n + 17.0, elevations[k % len(elevations)],
                         width / height, margin, fov_deg) for k in range(n)]
    return Views.from_cameras(cams, width, height, dtype)
