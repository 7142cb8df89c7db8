"""Procedural test shapes shipped with diffworld (no downloaded data), and surface sampling.

* :func:`genus2_shape`: a smooth double torus (genus 2), for topology-aware reconstruction.
* :func:`cad_part`: a sharp-featured machined block (genus 1), for feature-preserving extraction
  (FlexiCubes).
* :func:`surface_points`: points on the zero set of any field, sampled uniformly by area and
  projected onto the surface with Newton steps, with their normals.

Both shapes fit inside [-0.45, 0.45]^3 and are resolved by a 32^3 grid over [-0.5, 0.5]^3
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

__all__ = ["SurfaceSamples", "cad_part", "genus2_shape", "surface_points"]

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
