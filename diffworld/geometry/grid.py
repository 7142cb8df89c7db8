"""Regular node grids over an axis-aligned box.

A grid of resolution (nx, ny, nz) has (nx+1, ny+1, nz+1) nodes; node (i, j, k) sits at
``lower + (i, j, k) * spacing`` and node (nx, ny, nz) at ``upper``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Grid", "check_bounds", "check_closed_boundary", "check_node_values", "cube_cases", "node_attributes"]

Bounds = tuple[Sequence[float], Sequence[float]]


def check_bounds(bounds, name: str = "bounds") -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Validate ``((x0, y0, z0), (x1, y1, z1))`` with lower < upper on every axis.

    Raises:
        ValueError: With the argument name, what was expected and what was given.
    """
    try:
        lower, upper = bounds
        lower = tuple(float(x) for x in lower)
        upper = tuple(float(x) for x in upper)
    except (TypeError, ValueError):
        raise ValueError(f"Expected '{name}' as ((x0, y0, z0), (x1, y1, z1)), got {bounds!r}") from None
    if len(lower) != 3 or len(upper) != 3:
        raise ValueError(f"Expected '{name}' as ((x0, y0, z0), (x1, y1, z1)), got {bounds!r}")
    for a in range(3):
        if not lower[a] < upper[a]:
            raise ValueError(f"'{name}': lower must be < upper on every axis, got lower={lower}, upper={upper}")
    return lower, upper


def check_node_values(values: torch.Tensor, name: str = "sdf") -> torch.Tensor:
    """Validate node values: a finite float tensor (nx+1, ny+1, nz+1) with every n >= 1."""
    from diffworld.engine.bridge import check_tensor

    check_tensor(name, values, ndim=3)
    if min(values.shape) < 2:
        raise ValueError(f"Expected '{name}' of shape (nx+1, ny+1, nz+1) with every n >= 1, got {tuple(values.shape)}")
    return values


def check_closed_boundary(inside: torch.Tensor, name: str = "sdf") -> None:
    """Raise ValueError when a boundary node is inside (the extracted surface would be open there).

    Args:
        inside: bool node grid (nx+1, ny+1, nz+1).
        name: Argument named in the message.
    """
    faces = (inside[0], inside[-1], inside[:, 0], inside[:, -1], inside[:, :, 0], inside[:, :, -1])
    if any(bool(f.any()) for f in faces):
        raise ValueError(f"'{name}': negative (inside) values on the grid boundary: the surface would be open there; "
                         f"enlarge the bounds or make the field positive on the boundary nodes")


def cube_cases(inside: torch.Tensor) -> torch.Tensor:
    """Marching-cubes case of every cube: ``sum(inside_c << c)``, corner ``c`` at ``(c & 1, c >> 1 & 1, c >> 2)``.

    Args:
        inside: bool node grid (nx+1, ny+1, nz+1).

    Returns:
        uint8 (nx, ny, nz) (uint8 rather than int64: 8x less memory traffic over the volume).
    """
    ins = inside.to(torch.uint8)
    nx, ny, nz = (int(n) - 1 for n in inside.shape)
    case = torch.zeros((nx, ny, nz), dtype=torch.uint8, device=inside.device)
    for c in range(8):
        ox, oy, oz = c & 1, (c >> 1) & 1, (c >> 2) & 1
        case |= ins[ox:ox + nx, oy:oy + ny, oz:oz + nz] << c
    return case


def node_attributes(attributes: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Validate extra node values (shape or (*shape, k)) and return them as (*shape, k) in ``dtype``."""
    if attributes.dim() not in (3, 4) or tuple(attributes.shape[:3]) != tuple(shape):
        raise ValueError(f"'attributes': expected shape {tuple(shape)} or {(*shape, 'k')}, got "
                         f"{tuple(attributes.shape)}")
    if not bool(torch.isfinite(attributes).all()):
        raise ValueError("'attributes': expected finite values")
    return attributes.reshape(*shape, -1).to(dtype)


@dataclass(frozen=True)
class Grid:
    """A node grid.

    Attributes:
        resolution: Cells per axis (nx, ny, nz), each >= 1.
        lower: Box corner of node (0, 0, 0) [m].
        upper: Box corner of node (nx, ny, nz) [m].
    """

    resolution: tuple[int, int, int]
    lower: tuple[float, float, float]
    upper: tuple[float, float, float]

    @staticmethod
    def make(resolution: int | Sequence[int], bounds: Bounds = ((-0.5,) * 3, (0.5,) * 3)) -> "Grid":
        """Build a grid from a resolution (int or 3 ints) and bounds, validating both."""
        res = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
        if len(res) != 3 or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in res):
            raise ValueError(f"Expected 'resolution' as a positive int or 3 positive ints, got {resolution!r}")
        lower, upper = check_bounds(bounds)
        return Grid(res, lower, upper)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Node-array shape (nx+1, ny+1, nz+1)."""
        return tuple(r + 1 for r in self.resolution)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Cell size per axis [m]."""
        return tuple((u - l) / r for l, u, r in zip(self.lower, self.upper, self.resolution))

    def nodes(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Node positions [m], shape (nx+1, ny+1, nz+1, 3)."""
        axes = [torch.linspace(l, u, r + 1, dtype=torch.float64) for l, u, r in zip(self.lower, self.upper, self.resolution)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).to(device=device, dtype=dtype)

    @staticmethod
    def from_values(values: torch.Tensor, bounds: Bounds) -> "Grid":
        """The grid that a node-value tensor of shape (nx+1, ny+1, nz+1) spans over ``bounds``."""
        lower, upper = check_bounds(bounds)
        return Grid(tuple(int(n) - 1 for n in values.shape), lower, upper)


def trilinear(values: torch.Tensor, bounds: Bounds, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of node values at points; differentiable in both.

    Args:
        values: Node values, shape (nx+1, ny+1, nz+1).
        bounds: Box of the grid [m].
        points: Query points [m], shape (N, 3); points outside are clamped to the border.

    Returns:
        Values at the points, shape (N,).
    """
    lower = torch.tensor(bounds[0], dtype=points.dtype, device=points.device)
    upper = torch.tensor(bounds[1], dtype=points.dtype, device=points.device)
    u = (points - lower) / (upper - lower) * 2.0 - 1.0
    # grid_sample reads (x, y, z) as (W, H, D); our axes are (D, H, W) = (x, y, z).
    coords = u.flip(-1).reshape(1, -1, 1, 1, 3).to(values.dtype)
    out = torch.nn.functional.grid_sample(values[None, None], coords, mode="bilinear", padding_mode="border",
                                          align_corners=True)
    return out.reshape(-1)


def trilinear_gradient(values: torch.Tensor, bounds: Bounds, points: torch.Tensor, step: float) -> torch.Tensor:
    """Central-difference gradient of the trilinear interpolant, shape (N, 3); differentiable."""
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * step
    cols = [(trilinear(values, bounds, points + d) - trilinear(values, bounds, points - d)) / (2 * step) for d in offsets]
    return torch.stack(cols, dim=-1)


__all__ += ["trilinear", "trilinear_gradient"]
