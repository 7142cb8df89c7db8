"""Procedural test shapes shipped with diffworld (no downloaded data), and surface sampling.

* :func:`genus2_shape`: a smooth double torus (genus 2), for topology-aware reconstruction.
* :func:`cad_part`: a sharp-featured machined block (genus 1), for feature-preserving extraction
  (FlexiCubes).
* :func:`open_cup`: an open surface (a cup without lid and with a wavy rim), for G-Shell: exact
  area-uniform samples with normals, a triangle mesh, its boundary length, and a closed
  template with a manifold SDF that cuts the cup out of it.
* :func:`surface_points`: points on the zero set of any field, sampled uniformly by area and
  projected onto the surface with Newton steps, with their normals.

The shapes fit inside [-0.45, 0.45]^3 and are resolved by a 32^3 grid over [-0.5, 0.5]^3
(cell 1/32 m): every hole is wider than 0.12 m and every wall thicker than 0.08 m.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import math

import torch

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.grid import Grid, check_bounds
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.sampling import sample_surface
from diffworld.geometry.sdf import (
    SDF,
    Box,
    Cylinder,
    Difference,
    HalfSpace,
    Intersection,
    SmoothUnion,
    Torus,
    Union,
    sample_grid,
)

__all__ = ["OpenCup", "OpenSurface", "SurfaceSamples", "cad_part", "genus2_shape", "open_cup", "surface_points"]

DEFAULT_BOUNDS = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))


def genus2_shape() -> SDF:
    """A smooth double torus of genus 2 (Euler characteristic -2).

    Two tori in the xy-plane (major radius 0.16 m, tube radius 0.065 m) centered at
    x = -0.18 m and x = +0.18 m overlap around x = 0 and are blended with a polynomial smooth
    union (k = 0.03 m). Extent: |x| <= 0.405, |y| <= 0.225, |z| <= 0.07 [m] (the blend adds
    at most k/4 of material). The two holes are 0.19 m wide; the tube (wall) is 0.13 m thick.

    Returns:
        :class:`SDF` with trainable parameters (float32 by default; ``.double()`` for float64).
    """
    left = Torus(0.16, 0.065, center=(-0.18, 0.0, 0.0))
    right = Torus(0.16, 0.065, center=(0.18, 0.0, 0.0))
    return SmoothUnion(left, right, k=0.03)


def cad_part() -> SDF:
    """A machined block with sharp features: genus 1 (Euler characteristic 0).

    A 0.7 x 0.5 x 0.3 m block centered at the origin with

    * a drilled through-hole along z (radius 0.08 m, axis at x = -0.1, y = 0): the one handle
      (genus 1);
    * a slot 0.12 m wide and 0.1 m deep cut across the top face (along y) at x = +0.15 m
      (a blind cut: no change in genus);
    * a 45-degree chamfer (0.08 m legs) replacing the vertical edge x = -0.35, y = -0.25.

    Walls: 0.17 m between hole and block sides, 0.11 m between hole and slot, 0.2 m under the
    slot. Every feature is a sharp edge or corner (CSG of exact primitives), so this is the
    target of feature-preserving extraction. Extent: |x| <= 0.35, |y| <= 0.25, |z| <= 0.15 [m].

    Returns:
        :class:`SDF` (a bound away from the surface, exact zero set).
    """
    block = Box((0.35, 0.25, 0.15))
    hole = Cylinder(radius=0.08, half_height=0.3, center=(-0.1, 0.0, 0.0))
    slot = Box((0.06, 0.3, 0.1), center=(0.15, 0.0, 0.15))
    # Plane through (-0.35 + 0.08, -0.25) and (-0.35, -0.25 + 0.08), outward normal (-1, -1, 0)/sqrt(2).
    n = (-1.0 / math.sqrt(2.0), -1.0 / math.sqrt(2.0), 0.0)
    offset = n[0] * (-0.35 + 0.08) + n[1] * -0.25
    chamfer = HalfSpace(n, offset)
    return Difference(Intersection(block, chamfer), Union(hole, slot))


class OpenSurface:
    """Interface of a procedural open surface (a surface with a boundary, no inside).

    Subclasses give exact samples, a mesh for pictures and tests, the boundary (length and
    points along it), and a closed template with a manifold SDF (positive on the part of the
    template that is the surface): G-Shell on those two fields reproduces the surface, the
    baseline of a fit.
    """

    def sample(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> "SurfaceSamples":
        """``n`` points [m] uniformly by area on the surface with unit normals, each (n, 3)."""
        raise NotImplementedError

    def mesh(self, resolution: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """A triangle mesh of the surface: vertices (V, 3) [m], faces (F, 3) int64."""
        raise NotImplementedError

    def boundary_length(self) -> float:
        """Total length of the boundary [m]."""
        raise NotImplementedError

    def boundary_points(self, n: int) -> torch.Tensor:
        """``n`` points [m] along the boundary, shape (n, 3)."""
        raise NotImplementedError

    def template_sdf(self) -> SDF:
        """SDF of a closed surface that contains this one (negative inside)."""
        raise NotImplementedError

    def manifold_sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Values (N,) at points (N, 3) [m]: positive where the template is this surface."""
        raise NotImplementedError


class OpenCup(OpenSurface):
    """A cup without lid: a flat bottom disk and a cylindrical side wall up to a wavy rim.

    The side is ``{rho = radius, bottom <= z <= rim(theta)}`` with ``rim(theta) = rim_height +
    rim_amplitude cos(rim_waves theta)`` (``theta`` the azimuth around z), the bottom
    ``{rho <= radius, z = bottom}``. Topologically a disk: Euler characteristic 1, one boundary
    loop (the rim); a sharp edge where side and bottom meet. Normals point away from the cup's
    inside (outward on the wall, down on the bottom), like the closed template's.

    Args:
        radius: Wall radius [m].
        bottom: Height of the bottom disk [m].
        rim_height: Mean height of the rim [m] (> bottom + rim_amplitude).
        rim_amplitude: Amplitude of the rim's waves [m] (>= 0).
        rim_waves: Number of waves around the rim (>= 0).
    """

    def __init__(self, radius: float = 0.22, bottom: float = -0.25, rim_height: float = 0.18,
                 rim_amplitude: float = 0.04, rim_waves: int = 3) -> None:
        if not (radius > 0 and rim_amplitude >= 0 and rim_height - rim_amplitude > bottom and rim_waves >= 0):
            raise ValueError(f"OpenCup: expected radius > 0, rim_amplitude >= 0, rim_height - rim_amplitude > "
                             f"bottom, rim_waves >= 0; got radius={radius}, bottom={bottom}, "
                             f"rim_height={rim_height}, rim_amplitude={rim_amplitude}, rim_waves={rim_waves}")
        self.radius, self.bottom = float(radius), float(bottom)
        self.rim_height, self.rim_amplitude, self.rim_waves = float(rim_height), float(rim_amplitude), int(rim_waves)

    def rim(self, theta: torch.Tensor) -> torch.Tensor:
        """Rim height [m] at azimuths ``theta`` [rad]."""
        return self.rim_height + self.rim_amplitude * torch.cos(self.rim_waves * theta)

    def areas(self) -> tuple[float, float]:
        """(side, bottom) areas [m^2] (the waves average out of the side's area)."""
        return 2 * math.pi * self.radius * (self.rim_height - self.bottom), math.pi * self.radius ** 2

    def sample(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> "SurfaceSamples":
        """``n`` points uniformly by area, exactly on the surface, with their unit normals.

        The side is sampled in (theta, z) with theta drawn by rejection against the wall
        height ``rim(theta) - bottom`` (the side's area density in theta), z uniform below the
        rim; the bottom with ``rho = radius sqrt(u)``.

        Returns:
            :class:`SurfaceSamples` (points (n, 3) [m], normals (n, 3)), float64 draws cast to ``dtype``.
        """
        gen = torch.Generator().manual_seed(int(seed))
        side, bottom = self.areas()
        on_side = torch.rand(n, generator=gen, dtype=torch.float64) < side / (side + bottom)
        n_side = int(on_side.sum())
        top = self.rim_height + self.rim_amplitude - self.bottom
        thetas = []
        got = 0
        while got < n_side:
            th = 2 * math.pi * torch.rand(2 * (n_side - got) + 16, generator=gen, dtype=torch.float64)
            u = torch.rand(th.shape, generator=gen, dtype=torch.float64)
            th = th[u * top < self.rim(th) - self.bottom]
            thetas.append(th)
            got += th.numel()
        th = torch.cat(thetas)[:n_side] if n_side else torch.zeros(0, dtype=torch.float64)
        z = self.bottom + torch.rand(n_side, generator=gen, dtype=torch.float64) * (self.rim(th) - self.bottom)
        side_p = torch.stack([self.radius * torch.cos(th), self.radius * torch.sin(th), z], -1)
        side_n = torch.stack([torch.cos(th), torch.sin(th), torch.zeros_like(th)], -1)
        m = n - n_side
        rho = self.radius * torch.sqrt(torch.rand(m, generator=gen, dtype=torch.float64))
        phi = 2 * math.pi * torch.rand(m, generator=gen, dtype=torch.float64)
        bot_p = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), torch.full_like(rho, self.bottom)], -1)
        bot_n = torch.zeros_like(bot_p)
        bot_n[:, 2] = -1.0
        points = torch.empty(n, 3, dtype=torch.float64)
        normals = torch.empty(n, 3, dtype=torch.float64)
        points[on_side], normals[on_side] = side_p, side_n
        points[~on_side], normals[~on_side] = bot_p, bot_n
        return SurfaceSamples(points.to(dtype), normals.to(dtype))

    def mesh(self, resolution: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """A triangle mesh of the cup: ``resolution`` segments around, welded at the bottom edge.

        Returns:
            (vertices (V, 3) float64 [m], faces (F, 3) int64), oriented like the normals, with one
            boundary loop (the rim) and Euler characteristic 1.
        """
        k = int(resolution)
        if k < 3:
            raise ValueError(f"'resolution': expected an int >= 3, got {resolution!r}")
        th = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        rings = max(2, k // 4)  # rows up the wall, and rings across the bottom
        t = torch.linspace(0, 1, rings + 1, dtype=torch.float64)
        # Wall rows j = 0 (bottom edge) .. rings (rim); bottom rings r = 1 .. rings - 1 inside the
        # edge (ring r at rho = radius * r / rings) and the centre.
        z = self.bottom + t[:, None] * (self.rim(th)[None] - self.bottom)  # (rings + 1, k)
        wall = torch.stack([self.radius * torch.cos(th).expand_as(z), self.radius * torch.sin(th).expand_as(z), z], -1)
        rho = self.radius * t[1:-1]
        disk = torch.stack([rho[:, None] * torch.cos(th), rho[:, None] * torch.sin(th),
                            torch.full((rings - 1, k), self.bottom, dtype=torch.float64)], -1)
        centre = torch.tensor([[0.0, 0.0, self.bottom]], dtype=torch.float64)
        vertices = torch.cat([wall.reshape(-1, 3), disk.reshape(-1, 3), centre])
        col = torch.arange(k)
        nxt = (col + 1) % k
        faces = []
        # Wall quad (j, i) -> (j, i+1) -> (j+1, i+1) -> (j+1, i): counter-clockwise seen from outside.
        for j in range(rings):
            a, b = j * k + col, j * k + nxt
            c, d = (j + 1) * k + nxt, (j + 1) * k + col
            faces += [torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)]
        # Bottom, seen from below (normal -z): ring r+1 (outer) to ring r (inner), reversed winding.
        ring_id = [None] * (rings + 1)
        ring_id[rings] = col  # the wall's bottom row is the outer ring
        for r in range(1, rings):
            ring_id[r] = (rings + 1) * k + (r - 1) * k + col
        c_id = vertices.shape[0] - 1
        for r in range(1, rings):
            inner, outer = ring_id[r], ring_id[r + 1]
            inner_n, outer_n = inner[nxt], outer[nxt]
            faces += [torch.stack([outer, inner, inner_n], 1), torch.stack([outer, inner_n, outer_n], 1)]
        inner = ring_id[1]
        faces.append(torch.stack([torch.full_like(col, c_id), inner[nxt], inner], 1))
        return vertices, torch.cat(faces)

    def boundary_length(self) -> float:
        """Length of the rim [m] (the curve (radius cos t, radius sin t, rim(t)), integrated numerically)."""
        th = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)
        dz = -self.rim_amplitude * self.rim_waves * torch.sin(self.rim_waves * th)
        return float(torch.trapezoid(torch.sqrt(self.radius ** 2 + dz * dz), th))

    def boundary_points(self, n: int) -> torch.Tensor:
        """``n`` points [m] evenly spaced in azimuth along the rim, shape (n, 3), float64."""
        th = torch.arange(int(n), dtype=torch.float64) * (2 * math.pi / int(n))
        return torch.stack([self.radius * torch.cos(th), self.radius * torch.sin(th), self.rim(th)], -1)

    def template_sdf(self) -> SDF:
        """A closed cylinder (exact SDF) whose wall and bottom hold the cup, lid above the rim's crest."""
        top = self.rim_height + self.rim_amplitude + 0.05
        return Cylinder(radius=self.radius, half_height=0.5 * (top - self.bottom),
                        center=(0.0, 0.0, 0.5 * (top + self.bottom)))

    def manifold_sdf(self, points: torch.Tensor) -> torch.Tensor:
        """``rim(theta) - z`` [m] at points (N, 3): positive on the wall below the rim and on the
        bottom, negative on the template's lid (its zero set on the wall is the rim)."""
        theta = torch.atan2(points[:, 1], points[:, 0])
        return self.rim(theta) - points[:, 2]


def open_cup() -> OpenCup:
    """The default :class:`OpenCup`: radius 0.22 m, bottom at z = -0.25 m, rim at 0.18 +- 0.04 m
    with 3 waves (Euler characteristic 1, one boundary loop of 1.480 m)."""
    return OpenCup()


class SurfaceSamples(NamedTuple):
    """Points on a zero set.

    Attributes:
        points: [m], shape (n, 3).
        normals: Unit outward normals (normalized field gradient), shape (n, 3).
    """

    points: torch.Tensor
    normals: torch.Tensor


def _value_grad(field: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        x = p.detach().requires_grad_(True)
        f = field(x)
        if f.dim() == 2 and f.shape[1] == 1:
            f = f[:, 0]
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g


def surface_points(sdf: Callable[[torch.Tensor], torch.Tensor], n: int,
                   bounds: Sequence[Sequence[float]] = DEFAULT_BOUNDS, resolution: int = 192, seed: int = 0,
                   newton_steps: int = 3, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> SurfaceSamples:
    """Sample points on the zero set of a field, uniformly by area, projected onto the surface.

    The field is sampled on a ``resolution``^3 grid over ``bounds``, the zero set is extracted
    with marching cubes, ``n`` points are drawn uniformly by area on the triangles, then each is
    moved onto the zero set with Newton steps ``p <- p - f(p) grad f / |grad f|^2`` (autograd).

    Args:
        sdf: Callable field, points (N, 3) -> values (N,) or (N, 1), negative inside.
        n: Number of points, >= 0.
        bounds: Sampling box [m]; the surface must lie inside it.
        resolution: Cells per axis of the extraction grid.
        seed: Seed of the sampling (same seed, same points on CPU).
        newton_steps: Projection steps, >= 0.
        dtype: float32 or float64.
        device: Device of the grid and the results.

    Returns:
        :class:`SurfaceSamples` (points (n, 3), unit normals (n, 3)), detached from any graph.

    Raises:
        TypeError: ``sdf`` not callable.
        ValueError: Bad ``n``/``resolution``/``newton_steps``/``bounds``, or no surface inside ``bounds``.
    """
    if not callable(sdf):
        raise TypeError(f"Expected 'sdf' to be callable (points (N, 3) -> values (N,)), got {type(sdf).__name__}")
    for name, val, lo in (("n", n, 0), ("resolution", resolution, 1), ("newton_steps", newton_steps, 0),
                          ("seed", seed, None)):
        if isinstance(val, bool) or not isinstance(val, int) or (lo is not None and val < lo):
            want = "an int" if lo is None else f"an int >= {lo}"
            raise ValueError(f"Expected '{name}' to be {want}, got {val!r}")
    lower, upper = check_bounds(bounds)
    grid = Grid.make(resolution, (lower, upper))
    with torch.no_grad():
        values = sample_grid(sdf, grid, device=device, dtype=dtype)
    check_tensor("sdf values on the sampling grid", values)
    mesh = marching_cubes(values.detach(), (lower, upper))
    if mesh.faces.shape[0] == 0:
        raise ValueError(f"'sdf' has no zero crossing inside bounds {(lower, upper)} at resolution {resolution}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = sample_surface(mesh.vertices.detach(), mesh.faces, n, generator=gen).points
    for _ in range(newton_steps):
        f, g = _value_grad(sdf, p)
        # The floor keeps a vanishing gradient (a point already on a kink) from throwing p away.
        sq = (g * g).sum(-1).clamp_min(1e-6)
        p = (p - (f / sq)[:, None] * g).detach()
    _, g = _value_grad(sdf, p)
    normals = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return SurfaceSamples(p.detach(), normals.detach())
