"""Liquid surfaces for pictures: a mesh around liquid particles, from a smoothed fill-fraction grid.

:func:`liquid_surface` splats the particles' volumes to a grid twice as fine as the simulation's
with the MPM's quadratic B-splines (:func:`diffworld.sims.mpm.losses.grid_density`), divides by
the node volume (a *fill fraction*: about 1 inside a liquid at rest density, 0 outside), smooths
it with ``smooth`` passes of the [1, 2, 1] / 4 filter along each axis, and extracts the level set
``fill = level`` with the project's marching cubes
(:func:`diffworld.geometry.marching_cubes.marching_cubes`). The vertices are coloured by the
bodies' shares of the fill at each vertex (so two liquids being mixed show their blend), and each
particle is marked *covered* when the fill at its position reaches the level: a picture draws
the mesh instead of those particles and keeps the others (drops and thin streams too sparse to
reach the level) as points.

For rendering only: the result is detached from any graph (numpy arrays).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["LiquidSurface", "liquid_surface"]


class LiquidSurface(NamedTuple):
    """A liquid surface mesh and which particles it covers.

    Attributes:
        vertices: [m], shape (V, 3), float64 (V may be 0).
        faces: int64 vertex indices, shape (F, 3), oriented outwards.
        colors: RGB in [0, 1] per vertex, shape (V, 3).
        covered: bool per input particle, shape (N,): the fill at the particle reaches half the
            level (it lies inside the surface or just outside it).
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    covered: np.ndarray


def _smooth(values: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` applications of the separable [1, 2, 1] / 4 filter (zero outside the grid)."""
    if passes <= 0:
        return values
    k = torch.tensor([0.25, 0.5, 0.25], dtype=values.dtype, device=values.device)
    v = values[None, None]
    for _ in range(passes):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 3
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1
            v = torch.nn.functional.conv3d(torch.nn.functional.pad(v, pad), k.reshape(shape))
    return v[0, 0]


def liquid_surface(x: torch.Tensor, volume: torch.Tensor, group: torch.Tensor, colors: np.ndarray,
                   grid_lower: Sequence[float], dx: float, shape: Sequence[int], *, level: float = 0.5,
                   refine: int = 2, smooth: int = 1) -> LiquidSurface:
    """The surface ``fill = level`` around liquid particles, coloured by body.

    Args:
        x: Positions of the liquid particles [m], shape (N, 3).
        volume: Their rest volumes [m^3], shape (N,).
        group: Body number of each particle in ``[0, G)``, int64 (N,).
        colors: RGB per body, shape (G, 3), values in [0, 1].
        grid_lower: Position of simulation grid node (0, 0, 0) [m].
        dx: Simulation grid spacing [m].
        shape: Simulation grid nodes per axis.
        level: Iso level as a fraction of the rest fill, in (0, 1) (0.5: half the rest density).
        refine: Surface grid nodes per simulation cell along an axis (>= 1).
        smooth: Passes of the [1, 2, 1] / 4 smoothing filter (>= 0).

    Returns:
        :class:`LiquidSurface`; an empty mesh (V = F = 0) and no covered particle when nothing
        reaches the level (no particle, or only drops).

    Raises:
        ValueError: Bad shapes or settings.
    """
    from diffworld.geometry.marching_cubes import marching_cubes
    from diffworld.sims.mpm.losses import grid_density

    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"Expected 'level' in (0, 1) (a fraction of the rest fill), got {level!r}")
    if int(refine) < 1 or int(smooth) < 0:
        raise ValueError(f"Expected refine >= 1 and smooth >= 0, got {refine!r} and {smooth!r}")
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    n = x.shape[0]
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"Expected 'x' of shape (N, 3), got {tuple(x.shape)}")
    volume = torch.as_tensor(volume).detach().to("cpu", torch.float64).reshape(-1)
    group = torch.as_tensor(group).detach().to("cpu", torch.int64).reshape(-1)
    colors = np.asarray(colors, dtype=np.float64).reshape(-1, 3)
    if volume.shape[0] != n or group.shape[0] != n:
        raise ValueError(f"Expected 'volume' and 'group' of shape ({n},), got {tuple(volume.shape)} and "
                         f"{tuple(group.shape)}")
    if n and (int(group.min()) < 0 or int(group.max()) >= colors.shape[0]):
        raise ValueError(f"Expected 'group' values in [0, {colors.shape[0]}) (one color per body)")
    empty = LiquidSurface(np.zeros((0, 3)), np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros(n, bool))
    if n == 0:
        return empty
    h = float(dx) / int(refine)
    fine = tuple((int(s) - 1) * int(refine) + 1 for s in shape)
    cell = h ** 3
    fills = []
    for g in range(colors.shape[0]):
        sel = group == g
        if bool(sel.any()):
            f = grid_density(x[sel], volume[sel], grid_lower, h, fine) / cell
            fills.append((g, _smooth(f, int(smooth))))
    total = sum(f for _, f in fills)
    lower = tuple(float(v) for v in grid_lower)
    upper = tuple(lo + (m - 1) * h for lo, m in zip(lower, fine))
    bounds = (lower, upper)
    from diffworld.geometry.grid import trilinear

    covered = (trilinear(total, bounds, x) >= 0.5 * level).numpy()
    if float(total.max()) < level:
        return empty._replace(covered=covered)
    iso = marching_cubes(-total, bounds, level=-float(level))  # inside: fill > level
    v = iso.vertices.detach().double()
    faces = iso.faces.detach().cpu().numpy().astype(np.int64)
    if v.shape[0] == 0 or faces.shape[0] == 0:
        return empty._replace(covered=covered)
    weight = torch.stack([trilinear(f, bounds, v) for _, f in fills], 1).clamp_min(0.0)
    rgb = torch.from_numpy(colors[[g for g, _ in fills]])
    mix = weight @ rgb / weight.sum(1, keepdim=True).clamp_min(1e-12)
    fallback = torch.from_numpy(colors[fills[0][0]]).expand_as(mix)
    mix = torch.where(weight.sum(1, keepdim=True) > 1e-12, mix, fallback)
    out = v.numpy()
    if not (np.isfinite(out).all() and math.isfinite(float(mix.sum()))):
        return empty._replace(covered=np.zeros(n, bool))
    return LiquidSurface(out, faces, mix.clamp(0.0, 1.0).numpy(), covered)
