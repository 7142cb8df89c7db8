"""Differentiable losses on particle states, for MPM trajectory optimization (pure torch).

Every function takes and returns torch tensors, is differentiable with respect to the particle
positions (and masses where they appear) and works in float32 and float64 on any device.

* :func:`grid_density`: particle mass splatted to the grid nodes with quadratic B-spline weights
  (the MPM transfer kernel), so a loss can compare mass distributions on the grid.
* :func:`shape_matching_loss` (PlasticineLab): L1 or L2 difference between the particles' grid
  mass and a target's, plus the mass-weighted distance outside the target (an SDF term that
  gives a gradient before the shapes overlap). :func:`target_grids` builds the target grids from
  an SDF and a total mass.
* :func:`pattern_loss` (latte art): a body's mass seen from above (projected along z) vs a
  target image, as distributions (L1), plus the mean distance of the mass outside the pattern.
  :func:`pattern_target` builds the target from an image.
* :func:`trajectory_loss`: mean squared distance of particle positions to a target trajectory.
* :func:`chamfer_distance`: symmetric Chamfer distance between two point sets (the project's one
  Chamfer, :func:`diffworld.geometry.metrics.chamfer_terms`; memory O(N + M), not O(N M)).
* :func:`mixing_loss`: how unmixed two bodies are, from their grid masses (Danckwerts'
  intensity of segregation, or its L1 form): 1 when every node holds one body, 0 when every node
  holds them in the overall ratio (FluidLab's mixing/stirring task).
* :func:`com_loss`, :func:`region_loss`, :func:`shape_cover_loss`: the ``com``, ``region`` and
  ``shape`` loss terms of the ``mpm`` scene task.
* :class:`SceneInfo` and :func:`load_callable`: user-written losses (``python`` loss terms), from
  :mod:`diffworld.sims.mpm.user_losses`.

Shapes: N particles, T recorded states, (gx, gy, gz) grid nodes. Node (i, j, k) sits at
``grid_lower + (i, j, k) * dx``, as in :class:`diffworld.sims.mpm.GridSpec`.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple, Sequence

import torch

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.metrics import chamfer_terms
from diffworld.sims.mpm.user_losses import SceneInfo, call_user_loss, load_callable

__all__ = [
    "SceneInfo",
    "ShapeMatching",
    "TargetGrids",
    "call_user_loss",
    "chamfer_distance",
    "com_loss",
    "grid_density",
    "load_callable",
    "mixing_loss",
    "nearest_sq_distance",
    "PatternTarget",
    "pattern_loss",
    "pattern_target",
    "top_view_fraction",
    "region_loss",
    "sample_shape",
    "shape_cover_loss",
    "shape_matching_loss",
    "target_grids",
    "trajectory_loss",
]

_OFFSETS = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), torch.arange(3), indexing="ij"),
                       -1).reshape(27, 3)


def _check_grid_args(grid_lower: Sequence[float], dx: float, shape: Sequence[int]) -> tuple[int, int, int]:
    if len(grid_lower) != 3:
        raise ValueError(f"Expected 'grid_lower' of 3 numbers [m], got {tuple(grid_lower)}")
    if not (isinstance(dx, (int, float)) and math.isfinite(dx) and dx > 0):
        raise ValueError(f"Expected 'dx' a finite number > 0 [m], got {dx!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"Expected 'shape' of 3 positive node counts (gx, gy, gz), got {shape}")
    return shape


# --- grid density ---------------------------------------------------------------------------------

def grid_density(x: torch.Tensor, mass: torch.Tensor | float, grid_lower: Sequence[float], dx: float,
                 shape: Sequence[int]) -> torch.Tensor:
    """Particle mass splatted to the grid nodes with quadratic B-spline weights.

    Each particle spreads its mass over the 3x3x3 nodes around it with the MLS-MPM weights
    (``0.5 (1.5 - f)^2, 0.75 - (f - 1)^2, 0.5 (f - 0.5)^2`` per axis); the weights sum to one, so
    the total mass is conserved for particles at least 1.5 cells inside the grid. Nodes of a
    stencil that fall outside the grid are dropped (their mass is lost). The weights are C1 in
    the positions: the gradient is continuous.

    Args:
        x: Particle positions [m], shape (N, 3).
        mass: Particle masses [kg], shape (N,), or one number for every particle.
        grid_lower: Position of node (0, 0, 0) [m], 3 numbers.
        dx: Node spacing [m].
        shape: Nodes per axis (gx, gy, gz).

    Returns:
        Mass per node [kg], shape (gx, gy, gz), dtype and device of ``x``; differentiable with
        respect to ``x`` and ``mass``. Divide by ``dx**3`` for a density [kg/m^3].

    Raises:
        TypeError, ValueError: Wrong shapes or dtypes, or invalid grid arguments.
    """
    check_tensor("x", x, shape=(None, 3), finite=False)
    shape = _check_grid_args(grid_lower, dx, shape)
    n = x.shape[0]
    if not isinstance(mass, torch.Tensor):
        mass = torch.full((n,), float(mass), dtype=x.dtype, device=x.device)
    check_tensor("mass", mass, shape=(n,), finite=False)
    mass = mass.to(x.dtype)
    lower = torch.tensor([float(v) for v in grid_lower], dtype=x.dtype, device=x.device)
    u = (x - lower) / dx  # position in node units
    base = torch.floor(u.detach() - 0.5)
    f = u - base  # in [0.5, 1.5): distance to the first stencil node
    w = torch.stack([0.5 * (1.5 - f) ** 2, 0.75 - (f - 1.0) ** 2, 0.5 * (f - 0.5) ** 2], 1)  # (N, 3 nodes, 3 axes)
    off = _OFFSETS.to(x.device)
    weight = w[:, off[:, 0], 0] * w[:, off[:, 1], 1] * w[:, off[:, 2], 2]  # (N, 27)
    idx = base.long()[:, None, :] + off[None]  # (N, 27, 3)
    dims = torch.tensor(shape, device=x.device)
    valid = ((idx >= 0) & (idx < dims)).all(-1)
    flat = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
    contrib = mass[:, None] * weight
    out = torch.zeros(shape[0] * shape[1] * shape[2], dtype=x.dtype, device=x.device)
    out = out.index_add(0, flat[valid], contrib[valid])
    return out.reshape(shape)


# --- shape matching (PlasticineLab) ---------------------------------------------------------------

class TargetGrids(NamedTuple):
    """Target of :func:`shape_matching_loss`, built by :func:`target_grids`.

    Attributes:
        density: Target mass per node [kg], shape (gx, gy, gz).
        sdf: Signed distance to the target shape at the nodes [m], shape (gx, gy, gz), negative
            inside.
        points: The points that sample the target (spacing ``dx / ppc^(1/3)``) [m], shape (M, 3).
    """

    density: torch.Tensor
    sdf: torch.Tensor
    points: torch.Tensor


class ShapeMatching(NamedTuple):
    """Result of :func:`shape_matching_loss` (scalars).

    Attributes:
        loss: ``density_weight * density + sdf_weight * sdf``.
        density: Grid-mass mismatch, dimensionless: L1 ``sum |m - t| / sum t`` (0 to 2) or L2
            ``sum (m - t)^2 / sum t^2``.
        sdf: Mass-weighted distance outside the target, in cells:
            ``sum m * max(sdf, 0) / (dx * sum t)``.
    """

    loss: torch.Tensor
    density: torch.Tensor
    sdf: torch.Tensor


def _as_float64_sdf(sdf: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float64 copy of an SDF module (plain callables are returned as they are)."""
    if isinstance(sdf, torch.nn.Module):
        return copy.deepcopy(sdf).double()
    return sdf


def sample_shape(sdf: Callable[[torch.Tensor], torch.Tensor], lower: Sequence[float], upper: Sequence[float],
                 spacing: float) -> torch.Tensor:
    """Points filling a shape: a cell-centred lattice of ``spacing`` in the box, kept where sdf < 0.

    Args:
        sdf: The shape (see :func:`target_grids`); modules are evaluated on a float64 copy.
        lower: Box lower corner [m].
        upper: Box upper corner [m].
        spacing: Lattice spacing [m] (``dx / ppc^(1/3)`` samples like a body of ``ppc`` particles per cell).

    Returns:
        float64 points [m], shape (M, 3) (M may be 0).
    """
    from diffworld.sims.mpm.bodies import fill_shape

    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"Expected 'spacing' a finite number > 0 [m], got {spacing!r}")
    return fill_shape(_as_float64_sdf(sdf), lower, upper, spacing)


def _eval_chunked(fn: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, chunk: int = 262144) -> torch.Tensor:
    if p.shape[0] == 0:
        return p.new_zeros((0,))
    return torch.cat([fn(c).reshape(-1) for c in p.split(chunk)])


def target_grids(sdf: Callable[[torch.Tensor], torch.Tensor], total_mass: float, grid_lower: Sequence[float],
                 dx: float, shape: Sequence[int], *, ppc: int = 8, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> TargetGrids:
    """Target grids of a shape filled with a total mass, as a body of ``ppc`` particles per cell would be.

    The shape is filled with points on a lattice of spacing ``dx / ppc^(1/3)`` (the sampling of
    a ``grid`` body), each carrying ``total_mass / M``, and splatted with :func:`grid_density`:
    a body that fills the target at the same density has (nearly) the same grid mass.

    Args:
        sdf: The target shape: a callable (an SDF of :mod:`diffworld.geometry.sdf`, a
            :class:`~diffworld.geometry.mesh_sdf.MeshSDF`...) mapping float64 points (P, 3) [m]
            to signed distances (P,) [m], negative inside. Modules are evaluated on a float64 copy.
        total_mass: Mass to spread over the target [kg] (usually the body's mass), > 0.
        grid_lower: Position of node (0, 0, 0) [m].
        dx: Node spacing [m].
        shape: Nodes per axis (gx, gy, gz).
        ppc: Target sample points per cell (>= 1).
        dtype: dtype of the returned grids.
        device: Device of the returned grids.

    Returns:
        :class:`TargetGrids`.

    Raises:
        ValueError: Invalid arguments, or a target with no sample point inside the grid.
    """
    shape = _check_grid_args(grid_lower, dx, shape)
    if not (math.isfinite(total_mass) and total_mass > 0):
        raise ValueError(f"Expected 'total_mass' a finite number > 0 [kg], got {total_mass!r}")
    if int(ppc) < 1:
        raise ValueError(f"Expected 'ppc' >= 1, got {ppc!r}")
    f64 = _as_float64_sdf(sdf)
    lower = [float(v) for v in grid_lower]
    upper = [lo + (n - 1) * dx for lo, n in zip(lower, shape)]
    pts = sample_shape(f64, lower, upper, dx / int(ppc) ** (1.0 / 3.0))
    if pts.shape[0] == 0:
        raise ValueError(f"target shape: no sample point inside the grid {tuple(lower)}..{tuple(upper)} "
                         f"(spacing {dx / int(ppc) ** (1.0 / 3.0):.3g} m); check its position and size")
    density = grid_density(pts, torch.full((pts.shape[0],), total_mass / pts.shape[0], dtype=torch.float64),
                           lower, dx, shape)
    axes = [torch.tensor(lower[a], dtype=torch.float64) + dx * torch.arange(shape[a], dtype=torch.float64)
            for a in range(3)]
    nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        values = _eval_chunked(f64, nodes).double().reshape(shape)
    return TargetGrids(density.to(device, dtype), values.to(device, dtype), pts.to(device, dtype))


def shape_matching_loss(x: torch.Tensor, mass: torch.Tensor | float, target_density: torch.Tensor,
                        target_sdf: torch.Tensor, grid_lower: Sequence[float], dx: float, *,
                        density_weight: float = 1.0, sdf_weight: float = 1.0, norm: str = "l1") -> ShapeMatching:
    """PlasticineLab's shape-matching loss: grid-mass difference plus mass-weighted distance outside.

    With ``m = grid_density(x, mass)`` and the target ``t`` (see :func:`target_grids`):

    * density term, dimensionless: L1 ``sum |m - t| / sum t`` (0 when the mass distributions
      agree, 2 when they do not overlap) or L2 ``sum (m - t)^2 / sum t^2``;
    * SDF term, in cells: ``sum m * max(sdf, 0) / (dx * sum t)``, the mass-weighted mean distance
      of the body's mass outside the target. It pulls the body towards the target from afar,
      where the density term has no gradient.

    Args:
        x: Particle positions [m], shape (N, 3).
        mass: Particle masses [kg], shape (N,), or one number.
        target_density: Target mass per node [kg], shape (gx, gy, gz), positive sum.
        target_sdf: Signed distance to the target at the nodes [m], shape (gx, gy, gz).
        grid_lower: Position of node (0, 0, 0) [m].
        dx: Node spacing [m].
        density_weight: Weight of the density term (>= 0).
        sdf_weight: Weight of the SDF term (>= 0).
        norm: ``"l1"`` (PlasticineLab) or ``"l2"``.

    Returns:
        :class:`ShapeMatching` (loss and its two unweighted terms), differentiable with respect to
        ``x`` and ``mass``.

    Raises:
        TypeError, ValueError: Wrong shapes, dtypes, weights or norm.
    """
    check_tensor("target_density", target_density, ndim=3, finite=False)
    check_tensor("target_sdf", target_sdf, shape=tuple(target_density.shape), finite=False)
    if norm not in ("l1", "l2"):
        raise ValueError(f"Expected 'norm' 'l1' or 'l2', got {norm!r}")
    for name, w in (("density_weight", density_weight), ("sdf_weight", sdf_weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"Expected '{name}' a finite number >= 0, got {w!r}")
    m = grid_density(x, mass, grid_lower, dx, target_density.shape)
    t = target_density.to(m.dtype)
    t_sum = t.sum()
    if not bool(t_sum > 0):
        raise ValueError("Expected 'target_density' with a positive total mass, got a sum <= 0")
    diff = m - t
    density = diff.abs().sum() / t_sum if norm == "l1" else (diff * diff).sum() / (t * t).sum()
    sdf = (m * target_sdf.to(m.dtype).clamp_min(0)).sum() / (dx * t_sum)
    return ShapeMatching(density_weight * density + sdf_weight * sdf, density, sdf)


# --- top-view pattern (latte art) ------------------------------------------------------------------

class PatternTarget(NamedTuple):
    """Target of :func:`pattern_loss`, built by :func:`pattern_target` (grid nodes in x and y).

    Attributes:
        fraction: Target fraction of the mass per node column, shape (gx, gy), sums to 1.
        distance: Distance from each node column to the pattern [m], 0 on it, shape (gx, gy).
    """

    fraction: torch.Tensor
    distance: torch.Tensor


def pattern_target(image, lower: Sequence[float], upper: Sequence[float], grid_lower: Sequence[float], dx: float,
                   shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> PatternTarget:
    """A top-view target from an image laid on the rectangle ``lower..upper`` of the xy plane.

    The image is read as intensity in [0, 1] (grey, or RGB averaged; alpha, where present,
    multiplies it); its top row lies at ``upper[1]``, its left column at ``lower[0]`` (the
    picture as seen from above, +x right, +y up). Node columns outside the rectangle get 0.

    Args:
        image: Intensities, array (H, W) or (H, W, C) in [0, 1] (uint8 is scaled by 1/255).
        lower, upper: Corners of the rectangle in the xy plane [m], 2 numbers each.
        grid_lower: Position of node (0, 0, 0) [m], 3 numbers.
        dx: Node spacing [m].
        shape: Grid nodes per axis (gx, gy, gz); only gx and gy are used.
        dtype, device: Of the returned tensors.

    Returns:
        :class:`PatternTarget`.

    Raises:
        ValueError: An empty image, a rectangle with lower >= upper, or a pattern that covers no
            node column (too small or outside the grid).
    """
    import numpy as np
    from scipy import ndimage

    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    img = img.astype(np.float64)
    if img.ndim == 3:
        alpha = img[..., 3] if img.shape[2] == 4 else 1.0
        img = img[..., :3].mean(-1) * alpha if img.shape[2] >= 3 else img[..., 0]
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"pattern image: expected an (H, W) or (H, W, C) array, got shape {np.shape(image)}")
    lo, hi = [float(v) for v in lower[:2]], [float(v) for v in upper[:2]]
    if not (len(lower) == 2 and len(upper) == 2 and lo[0] < hi[0] and lo[1] < hi[1]):
        raise ValueError(f"pattern rectangle: expected 2 numbers each with lower < upper, got {list(lower)}, "
                         f"{list(upper)}")
    gx, gy = int(shape[0]), int(shape[1])
    xs = float(grid_lower[0]) + dx * np.arange(gx)
    ys = float(grid_lower[1]) + dx * np.arange(gy)
    h, w = img.shape
    # Node column -> continuous pixel coordinates (row 0 at the top = upper y), linear interpolation.
    col = (xs - lo[0]) / (hi[0] - lo[0]) * w - 0.5
    row = (hi[1] - ys) / (hi[1] - lo[1]) * h - 0.5
    cc, rr = np.meshgrid(col, row, indexing="ij")
    inside = (cc >= -0.5) & (cc <= w - 0.5) & (rr >= -0.5) & (rr <= h - 0.5)
    values = ndimage.map_coordinates(img, [rr.ravel(), cc.ravel()], order=1, mode="nearest").reshape(gx, gy)
    values = np.where(inside, np.clip(values, 0.0, 1.0), 0.0)
    if values.sum() <= 0:
        raise ValueError(f"pattern image: the pattern covers no grid node in the rectangle {lo}..{hi} "
                         f"(node spacing {dx:g} m); enlarge the rectangle or check the image")
    on = values >= 0.5 * values.max()
    distance = ndimage.distance_transform_edt(~on, sampling=dx)
    to = dict(dtype=dtype, device=device)
    return PatternTarget(torch.as_tensor(values / values.sum(), **to), torch.as_tensor(distance, **to))


def top_view_fraction(x: torch.Tensor, mass: torch.Tensor | float, grid_lower: Sequence[float], dx: float,
                      shape_xy: Sequence[int]) -> torch.Tensor:
    """Fraction of the mass per grid column seen from above (splatted, summed along z), shape (gx, gy).

    Args:
        x: Particle positions [m], shape (N, 3).
        mass: Particle masses [kg], shape (N,), or one number.
        grid_lower: Position of node (0, 0, 0) [m].
        dx: Node spacing [m].
        shape_xy: Nodes along x and y.

    Returns:
        Fractions summing to 1 (0 everywhere for no mass), differentiable w.r.t. ``x`` and ``mass``.
    """
    gx, gy = int(shape_xy[0]), int(shape_xy[1])
    # Only the z layers the particles reach: the sum along z needs no more.
    gz = int(x.detach()[:, 2].max().sub(float(grid_lower[2])).div(dx).floor()) + 3 if x.shape[0] else 1
    m = grid_density(x, mass, grid_lower, dx, (gx, gy, max(gz, 1))).sum(-1)
    return m / m.sum().clamp_min(torch.finfo(m.dtype).tiny)


def pattern_loss(x: torch.Tensor, mass: torch.Tensor | float, target: PatternTarget, grid_lower: Sequence[float],
                 dx: float, *, density_weight: float = 1.0, distance_weight: float = 1.0) -> ShapeMatching:
    """How far a body's mass seen from above is from a target pattern.

    The mass is splatted to the grid (:func:`grid_density`), summed along z and normalized to a
    fraction ``p`` per node column (so the amount of mass does not matter, only where it is):

    * density term: ``sum |p - t|`` (0 on a match, 2 when disjoint);
    * distance term, in cells: ``sum p * distance / dx``, the mean distance of the mass from the
      pattern; it gives a gradient where the density term has none (mass far from the pattern).

    Args:
        x: Particle positions [m], shape (N, 3), N >= 1.
        mass: Particle masses [kg], shape (N,), or one number.
        target: From :func:`pattern_target` on the same grid.
        grid_lower: Position of node (0, 0, 0) [m].
        dx: Node spacing [m].
        density_weight, distance_weight: Weights (>= 0).

    Returns:
        :class:`ShapeMatching` whose ``sdf`` field holds the distance term; differentiable with
        respect to ``x`` and ``mass``.
    """
    check_tensor("target.fraction", target.fraction, ndim=2, finite=False)
    for name, w in (("density_weight", density_weight), ("distance_weight", distance_weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"Expected '{name}' a finite number >= 0, got {w!r}")
    p = top_view_fraction(x, mass, grid_lower, dx, target.fraction.shape)
    density = (p - target.fraction.to(p.dtype)).abs().sum()
    distance = (p * target.distance.to(p.dtype)).sum() / dx
    return ShapeMatching(density_weight * density + distance_weight * distance, density, distance)


# --- mixing -----------------------------------------------------------------------------------------

def mixing_loss(x_a: torch.Tensor, mass_a: torch.Tensor | float, x_b: torch.Tensor, mass_b: torch.Tensor | float,
                grid_lower: Sequence[float], dx: float, shape: Sequence[int], *, target: float | None = None,
                norm: str = "l2") -> torch.Tensor:
    """How unmixed two bodies are: the spread of body A's mass fraction over the grid nodes.

    Both bodies are splatted to the grid with :func:`grid_density` (masses ``a``, ``b`` per node,
    ``m = a + b``); the fraction of A at a node is ``phi = a / m`` and the target fraction
    ``phi*`` is A's share of the two bodies' total mass (or ``target``). Nodes count with their
    mass:

    * ``"l2"``: Danckwerts' intensity of segregation ``sum m (phi - phi*)^2 / (M phi* (1 - phi*))``
      (``M = sum m``), computed as ``sum (a - phi* m)^2 / m``;
    * ``"l1"``: ``sum m |phi - phi*| / (2 M phi* (1 - phi*))``, computed as ``sum |a - phi* m|``.

    Both are 1 when no node holds both bodies (with ``phi*`` the overall share) and 0 when every
    node holds them in the ratio ``phi*``. The B-spline splat mixes over about 3 cells, so the
    measure sees mixing down to the grid scale, not below it. Nodes with almost no mass
    contribute almost nothing (the quotient is regularized by a mass a million times smaller
    than an average particle's).

    Args:
        x_a: Positions of body A's particles [m], shape (Na, 3), Na >= 1.
        mass_a: Their masses [kg], shape (Na,), or one number.
        x_b: Positions of body B's particles [m], shape (Nb, 3), Nb >= 1.
        mass_b: Their masses [kg], shape (Nb,), or one number.
        grid_lower: Position of node (0, 0, 0) [m].
        dx: Node spacing [m].
        shape: Nodes per axis (gx, gy, gz).
        target: Target fraction of A in (0, 1); default: ``sum mass_a / (sum mass_a + sum mass_b)``.
        norm: ``"l2"`` (intensity of segregation) or ``"l1"``.

    Returns:
        The loss, dimensionless (0 mixed ... 1 segregated; above 1 only with an explicit
        ``target`` far from the overall share), a scalar differentiable with respect to the
        positions and masses.

    Raises:
        TypeError, ValueError: Wrong shapes or dtypes, an empty body, a bad target or norm.
    """
    check_tensor("x_a", x_a, shape=(None, 3), finite=False)
    check_tensor("x_b", x_b, shape=(None, 3), finite=False)
    if x_a.shape[0] == 0 or x_b.shape[0] == 0:
        raise ValueError(f"Expected two non-empty bodies, got {x_a.shape[0]} and {x_b.shape[0]} particles")
    if norm not in ("l1", "l2"):
        raise ValueError(f"Expected 'norm' 'l1' or 'l2', got {norm!r}")
    shape = _check_grid_args(grid_lower, dx, shape)
    if target is not None and not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise ValueError(f"Expected 'target' a fraction in (0, 1), got {target!r}")
    x_b = x_b.to(x_a.dtype)
    a = grid_density(x_a, mass_a, grid_lower, dx, shape)
    b = grid_density(x_b, mass_b, grid_lower, dx, shape)
    m = a + b

    def total(mass, n: int) -> torch.Tensor:
        if isinstance(mass, torch.Tensor):
            return mass.to(m.dtype).sum()
        return torch.tensor(float(mass) * n, dtype=m.dtype, device=m.device)

    total_a, total_b = total(mass_a, x_a.shape[0]), total(mass_b, x_b.shape[0])
    ta, tb = float(total_a.detach()), float(total_b.detach())
    if not (ta > 0 and tb > 0):
        raise ValueError(f"Expected two bodies of positive mass, got {ta} and {tb} kg")
    phi = total_a / (total_a + total_b) if target is None else float(target)
    dev = a - phi * m
    norm_mass = m.sum() * (phi * (1.0 - phi))
    if norm == "l1":
        return dev.abs().sum() / (2.0 * norm_mass)
    eps = 1.0e-6 * (total_a + total_b) / (x_a.shape[0] + x_b.shape[0])  # a millionth of a mean particle mass
    return (dev * dev / (m + eps)).sum() / norm_mass


# --- point-set losses -----------------------------------------------------------------------------

def _stack_states(name: str, xs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if not isinstance(xs, torch.Tensor):
        xs = list(xs)
        if not xs:
            raise ValueError(f"Expected '{name}' with at least one state, got none")
        xs = torch.stack(list(xs))
    return check_tensor(name, xs, shape=(None, None, 3), finite=False)


def trajectory_loss(xs: torch.Tensor | Sequence[torch.Tensor],
                    targets: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared distance of particle positions to a target trajectory.

    Args:
        xs: Positions per state [m]: a tensor (T, N, 3) or a sequence of T tensors (N, 3).
        targets: Target positions [m], the same shape (T, N, 3) (or a sequence); particle ``i`` of
            state ``k`` is compared with target ``i`` of state ``k``.

    Returns:
        ``mean over k, i of |xs[k, i] - targets[k, i]|^2`` [m^2], a scalar; 0 for N = 0.

    Raises:
        TypeError, ValueError: Wrong shapes, or shapes that differ.
    """
    x = _stack_states("xs", xs)
    t = _stack_states("targets", targets)
    if tuple(x.shape) != tuple(t.shape):
        raise ValueError(f"Expected 'targets' of the shape of 'xs' {tuple(x.shape)} (states, particles, 3), "
                         f"got {tuple(t.shape)}")
    if x.numel() == 0:
        return x.sum() * 0.0
    return ((x - t.to(x.dtype)) ** 2).sum(-1).mean()


def nearest_sq_distance(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Squared distance from each point of ``a`` to its nearest point of ``b``, chunked.

    The nearest neighbours are found without a graph (``torch.cdist`` on chunks of ``chunk`` rows
    of ``a``); the distances are then recomputed on the matched pairs with autograd, so the
    backward stores O(N) values instead of the (N, M) distance matrix. The gradient is the one of
    ``min`` (it flows to the matched pair).

    Args:
        a: Points [m], shape (N, 3).
        b: Points [m], shape (M, 3), M >= 1.
        chunk: Rows of ``a`` per block (memory per block: ``chunk * M`` values).

    Returns:
        Squared distances [m^2], shape (N,), differentiable with respect to ``a`` and ``b``.

    Raises:
        TypeError, ValueError: Wrong shapes, or ``b`` empty.
    """
    check_tensor("a", a, shape=(None, 3), finite=False)
    check_tensor("b", b, shape=(None, 3), finite=False)
    if b.shape[0] == 0:
        raise ValueError("Expected 'b' with at least one point, got shape (0, 3)")
    if chunk < 1:
        raise ValueError(f"Expected 'chunk' >= 1, got {chunk}")
    b = b.to(a.dtype)
    with torch.no_grad():
        ad, bd = a.detach(), b.detach()
        idx = torch.cat([torch.cdist(c, bd).argmin(1) for c in ad.split(chunk)]) if a.shape[0] else \
            torch.zeros((0,), dtype=torch.long, device=a.device)
    return ((a - b[idx]) ** 2).sum(1)


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance between two point sets (squared distances).

    ``mean_i min_j |a_i - b_j|^2 + mean_j min_i |a_i - b_j|^2``: the project's one Chamfer,
    :func:`diffworld.geometry.metrics.chamfer_terms` (exact nearest neighbours on a KD-tree,
    distances recomputed in torch: O(N + M) memory both ways).

    Args:
        a: Points [m], shape (N, 3), N >= 1.
        b: Points [m], shape (M, 3), M >= 1.

    Returns:
        Chamfer distance [m^2], a scalar, differentiable with respect to ``a`` and ``b``.

    Raises:
        TypeError, ValueError: Wrong shapes, or an empty set.
    """
    check_tensor("a", a, shape=(None, 3), finite=False)
    check_tensor("b", b, shape=(None, 3), finite=False)
    for name, t in (("a", a), ("b", b)):
        if t.shape[0] == 0:
            raise ValueError(f"Expected '{name}' with at least one point, got shape (0, 3)")
    to_b, to_a, _ = chamfer_terms(a, b.to(a.dtype))
    return to_b + to_a


# --- the simple scene-task terms ------------------------------------------------------------------

def com_loss(x: torch.Tensor, target: Sequence[float] | torch.Tensor, axes: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """Squared distance of the particles' mean position to a target [m^2], over some axes.

    Args:
        x: Particle positions [m], shape (N, 3), N >= 1.
        target: Target centre [m], 3 numbers.
        axes: The axes that count (0 x, 1 y, 2 z); default all three.

    Returns:
        ``sum over axes of (mean(x) - target)^2`` [m^2], a scalar.
    """
    check_tensor("x", x, shape=(None, 3), finite=False)
    axes = list(axes)
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"Expected 'axes' a non-empty list of 0, 1, 2, got {axes}")
    t = torch.as_tensor(target, dtype=x.dtype, device=x.device)
    return ((x.mean(0) - t) ** 2)[axes].sum()


def region_loss(x: torch.Tensor, lower: Sequence[float], upper: Sequence[float], width: float) -> torch.Tensor:
    """One minus the (soft) fraction of particles inside a box.

    A particle's membership is ``prod_axes sigmoid((x - lower) / width) * sigmoid((upper - x) / width)``.

    Args:
        x: Particle positions [m], shape (N, 3), N >= 1.
        lower: Box lower corner [m].
        upper: Box upper corner [m].
        width: Softness length [m] (the scene task uses one cell).

    Returns:
        ``1 - mean membership``, dimensionless in [0, 1], a scalar.
    """
    check_tensor("x", x, shape=(None, 3), finite=False)
    lo = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(upper, dtype=x.dtype, device=x.device)
    inside = (torch.sigmoid((x - lo) / width) * torch.sigmoid((hi - x) / width)).prod(1)
    return 1.0 - inside.mean()


def shape_cover_loss(x: torch.Tensor, sdf: Callable[[torch.Tensor], torch.Tensor],
                     target_points: torch.Tensor) -> torch.Tensor:
    """Particles inside a target shape and covering it (the ``shape`` loss term).

    ``mean_i max(sdf(x_i), 0)^2 + mean_j min_i |p_j - x_i|^2`` with ``p`` points filling the target.

    Args:
        x: Particle positions [m], shape (N, 3), N >= 1.
        sdf: Target SDF, points (N, 3) in the dtype of ``x`` -> values (N,) [m].
        target_points: Points filling the target [m], shape (M, 3).

    Returns:
        The loss [m^2], a scalar.
    """
    check_tensor("x", x, shape=(None, 3), finite=False)
    inside = sdf(x).clamp_min(0).pow(2).mean()
    return inside + nearest_sq_distance(target_points.to(x.dtype), x).mean()
