"""Differentiable marching cubes on node grids and on torch fields (DeepMesh gradient).

* :func:`marching_cubes` extracts the level set of node values with Warp kernels. Its gradient
  w.r.t. the values is exact for the extracted mesh: it differentiates the edge interpolation
  ``t = s_a / (s_a - s_b)`` (scale-invariant: ``2 * sdf`` gives the same mesh and gradient).
* :func:`marching_cubes_field` extracts the level set of a torch callable ``f(x; theta)`` (a neural
  SDF) and attaches the DeepMesh gradient ``dL/dtheta = sum_v -(dL/dv . grad f) / |grad f|^2 *
  df(v)/dtheta``. The ``|grad f|^2`` denominator matters: the unit-normal form is wrong by
  ``|grad f|`` for fields that are not unit-gradient.

Surface properties: one vertex per cut grid edge (welded), faces oriented with normals towards
positive values, watertight and edge-manifold whenever the zero set stays inside the grid
(ambiguous faces are resolved from the face's own signs, so neighbours always agree).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from diffworld.engine.bridge import launch, to_warp
from diffworld.engine.runtime import init_warp
from diffworld.geometry.grid import Grid, check_node_values
from diffworld.geometry import mc_tables

__all__ = ["IsoSurface", "marching_cubes", "marching_cubes_field"]

DEFAULT_BOUNDS = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))


class IsoSurface(NamedTuple):
    """A triangle mesh extracted from a field.

    Attributes:
        vertices: [m], shape (V, 3), dtype of the field; differentiable.
        faces: int64 vertex indices, shape (F, 3), counter-clockwise seen from the positive side.
    """

    vertices: torch.Tensor
    faces: torch.Tensor


_TABLE_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triangle table (256, 5, 3), counts (256,), edge offsets (12, 4) = (di, dj, dk, axis)."""
    key = str(device)
    if key not in _TABLE_CACHE:
        tris, counts = mc_tables.triangle_table()
        corner0 = mc_tables.CORNER_OFFSETS[mc_tables.EDGE_CORNERS[:, 0]]
        edge_offset = np.concatenate([corner0, mc_tables.EDGE_AXIS[:, None]], axis=1).astype(np.int32)
        _TABLE_CACHE[key] = (torch.from_numpy(tris).to(device), torch.from_numpy(counts).to(device),
                             torch.from_numpy(edge_offset).to(device))
    return _TABLE_CACHE[key]


def _exclusive_scan(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = counts.reshape(-1)
    inclusive = torch.cumsum(flat, 0, dtype=torch.int64)
    total = int(inclusive[-1]) if flat.numel() else 0
    if total >= 2**31:
        raise ValueError(f"marching cubes output too large for int32 indexing: {total} elements")
    return (inclusive - flat).to(torch.int32).view(counts.shape), total


def _extract(s: torch.Tensor):
    """Topology + edge parameters of the zero set of ``s`` (no autograd).

    Returns:
        vert_node (V,) int64 linear node index of each vertex's edge start, vert_axis (V,) int64,
        vert_t (V,) edge parameter, faces (F, 3) int64.
    """
    from diffworld.geometry import kernels_isosurface as kernels

    dev = s.device
    tris, counts, edge_offset = _tables(dev)
    n0, n1, n2 = s.shape
    mask = torch.empty(s.shape, dtype=torch.uint8, device=dev)
    case = torch.empty((n0 - 1, n1 - 1, n2 - 1), dtype=torch.uint8, device=dev)
    row_vertices = torch.empty((n0, n1), dtype=torch.int32, device=dev)
    row_faces = torch.empty((n0, n1), dtype=torch.int32, device=dev)
    launch(kernels.count_rows_kernel, (n0, n1),
           [to_warp(s), to_warp(counts), to_warp(mask), to_warp(case), to_warp(row_vertices), to_warp(row_faces)], dev)
    row_first_vertex, n_vert = _exclusive_scan(row_vertices)
    row_first_face, n_face = _exclusive_scan(row_faces)

    # Dense node -> first vertex id; written and read only at nodes with cut edges (no fill).
    vertex_base = torch.empty(s.shape, dtype=torch.int32, device=dev)
    vert_node = torch.empty(n_vert, dtype=torch.int64, device=dev)
    vert_axis = torch.empty(n_vert, dtype=torch.int64, device=dev)
    vert_t = torch.empty(n_vert, dtype=s.dtype, device=dev)
    faces = torch.empty((n_face, 3), dtype=torch.int64, device=dev)
    if n_vert:
        launch(kernels.emit_vertices_kernel, (n0, n1),
               [to_warp(s), to_warp(mask), to_warp(row_vertices), to_warp(row_first_vertex), to_warp(vertex_base),
                to_warp(vert_node), to_warp(vert_axis), to_warp(vert_t)], dev)
    if n_face:
        launch(kernels.emit_faces_kernel, (n0 - 1, n1 - 1),
               [to_warp(mask), to_warp(case), to_warp(vertex_base), to_warp(row_faces[:-1, :-1]),
                to_warp(row_first_face[:-1, :-1]), to_warp(tris), to_warp(counts), to_warp(edge_offset),
                to_warp(faces)], dev)
    return vert_node, vert_axis, vert_t, faces


class _MarchingCubesFn(torch.autograd.Function):
    """s (node values, level already subtracted) -> (t, vert_node, vert_axis, faces)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor):
        s = s.detach().contiguous()
        vert_node, vert_axis, vert_t, faces = _extract(s)
        ctx.save_for_backward(s, vert_node, vert_axis)
        ctx.mark_non_differentiable(vert_node, vert_axis, faces)
        return vert_t, vert_node, vert_axis, faces

    @staticmethod
    def backward(ctx, grad_t, *_):
        from diffworld.geometry import kernels_isosurface as kernels

        wp = init_warp()
        s, vert_node, vert_axis = ctx.saved_tensors
        grad_s = torch.zeros(s.numel(), dtype=s.dtype, device=s.device)
        if grad_t is not None and vert_node.numel():
            n1, n2 = s.shape[1], s.shape[2]
            launch(kernels.vertex_t_adjoint_kernel, vert_node.numel(),
                   [to_warp(s.view(-1)), to_warp(vert_node), to_warp(vert_axis), wp.vec3i(n1 * n2, n2, 1),
                    to_warp(grad_t.contiguous()), to_warp(grad_s)], s.device)
        return grad_s.view(s.shape)


def marching_cubes(sdf: torch.Tensor, bounds: Sequence[Sequence[float]] = DEFAULT_BOUNDS,
                   level: float = 0.0) -> IsoSurface:
    """Extract the ``level`` set of node values as a welded, oriented triangle mesh.

    Args:
        sdf: Node values, shape (nx+1, ny+1, nz+1), float32 or float64, negative inside; node
            [0, 0, 0] at ``bounds[0]``, node [nx, ny, nz] at ``bounds[1]``. Gradients flow to it.
        bounds: ((x0, y0, z0), (x1, y1, z1)) [m], lower < upper.
        level: Iso value; the surface is ``sdf == level``, inside is ``sdf < level``.

    Returns:
        :class:`IsoSurface` with ``vertices`` (V, 3) in the dtype of ``sdf`` and ``faces`` (F, 3)
        int64. Empty surfaces give (0, 3) tensors, still attached to the graph.

    Raises:
        TypeError: ``sdf`` is not a float tensor.
        ValueError: Bad shape, non-finite values, bad bounds or level.
    """
    check_node_values(sdf)
    grid = Grid.from_values(sdf, bounds)
    if not np.isfinite(level):
        raise ValueError(f"Expected 'level' to be a finite number, got {level!r}")
    s = sdf - level if level != 0.0 else sdf
    t, vert_node, vert_axis, faces = _MarchingCubesFn.apply(s)
    return IsoSurface(_vertex_positions(grid, t, vert_node, vert_axis, sdf.shape), faces)


def _vertex_positions(grid: Grid, t, vert_node, vert_axis, shape) -> torch.Tensor:
    n1, n2 = shape[1], shape[2]
    ijk = torch.stack((vert_node // (n1 * n2), (vert_node // n2) % n1, vert_node % n2), dim=-1).to(t.dtype)
    step = torch.nn.functional.one_hot(vert_axis, 3).to(t.dtype) * t[:, None]
    lower = torch.tensor(grid.lower, dtype=t.dtype, device=t.device)
    h = torch.tensor(grid.spacing, dtype=t.dtype, device=t.device)
    return lower + (ijk + step) * h


class _DeepMeshLift(torch.autograd.Function):
    """Vertices as a function of the field values at them: dv/ds = -grad f / |grad f|^2."""

    @staticmethod
    def forward(ctx, s_at_v: torch.Tensor, vertices: torch.Tensor, grad_f: torch.Tensor):
        ctx.save_for_backward(grad_f)
        return vertices.clone()

    @staticmethod
    def backward(ctx, grad_v):
        (grad_f,) = ctx.saved_tensors
        sq = (grad_f * grad_f).sum(-1).clamp_min(torch.finfo(grad_f.dtype).tiny)
        grad_s = -(grad_v * grad_f).sum(-1) / sq
        return grad_s, None, None


def marching_cubes_field(field: Callable[[torch.Tensor], torch.Tensor], resolution: int | Sequence[int],
                         bounds: Sequence[Sequence[float]] = DEFAULT_BOUNDS, level: float = 0.0,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         chunk: int = 262144) -> IsoSurface:
    """Extract the level set of a torch field with the DeepMesh gradient to its parameters.

    The field is sampled on the node grid without gradients, the mesh is extracted, then the
    field is evaluated again at the vertices with gradients; the vertices are tied to those
    values through ``dv/df = -grad f / |grad f|^2`` (first-order motion of the level set).

    Args:
        field: Callable mapping points [m] of shape (N, 3) to values of shape (N,) or (N, 1);
            negative inside. Its torch parameters receive gradients.
        resolution: Cells per axis (int or 3 ints).
        bounds: Box of the grid [m].
        level: Iso value.
        dtype: Dtype of the sampling grid and vertices.
        device: Device of the sampling grid.
        chunk: Points per field evaluation while sampling the grid (bounds memory).

    Returns:
        :class:`IsoSurface`; vertices carry the DeepMesh gradient to the field's parameters.
    """
    if not callable(field):
        raise TypeError(f"Expected 'field' to be callable (points (N, 3) -> values (N,)), got {type(field).__name__}")
    grid = Grid.make(resolution, bounds)
    pts = grid.nodes(device, dtype).reshape(-1, 3)
    with torch.no_grad():
        values = torch.cat([_field_values(field, pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
    values = values.reshape(grid.shape)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("'field' returned non-finite values on the sampling grid")
    mesh = marching_cubes(values, (grid.lower, grid.upper), level)
    v = mesh.vertices.detach()
    # One evaluation at the vertices gives both grad_x f (for the lift) and the graph to the
    # field's parameters (kept for the lift's backward).
    with torch.enable_grad():
        x = v.clone().requires_grad_(True)
        f_x = _field_values(field, x)
        (grad_f,) = torch.autograd.grad(f_x.sum(), x, retain_graph=True)
    vertices = _DeepMeshLift.apply(f_x, v, grad_f.detach())
    return IsoSurface(vertices, mesh.faces)


def _field_values(field, pts: torch.Tensor) -> torch.Tensor:
    out = field(pts)
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != pts.shape[:1]:
        raise ValueError(f"Expected 'field' to return shape ({pts.shape[0]},) or ({pts.shape[0]}, 1), got {tuple(out.shape)}")
    return out
