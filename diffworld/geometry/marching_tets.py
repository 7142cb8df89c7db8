"""Marching tetrahedra on a cube grid split into tets (the DMTet template), in torch.

Every cube is split into the 6 tets of the Freudenthal (Kuhn) subdivision around its main
diagonal, corner 0 -> corner 7: tet ``(0, 1 << i, (1 << i) | (1 << j), 7)`` for each ordering
``(i, j, k)`` of the axes. Every cube uses the same diagonal direction, so the split is conforming
across cube faces and the extracted surface is watertight. A tet whose corners differ in sign
gives one triangle (one corner apart from the other three) or two (two and two), on its cut
edges; vertices are made once per cut grid edge (welded), at the linear zero crossing, which
is differentiable w.r.t. the node values. Only cubes with a sign change are processed.

Conventions: node grid (nx+1, ny+1, nz+1) over ``bounds``; negative inside; faces oriented
with normals towards positive values. Triangle tables are generated below from the tets'
geometry (no copied tables).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Sequence

import numpy as np
import torch

from diffworld.geometry.grid import Grid, check_closed_boundary, check_node_values, cube_cases, node_attributes
from diffworld.geometry.mc_tables import CORNER_OFFSETS

__all__ = ["MarchingTetsMesh", "TET_CORNERS", "marching_tets"]

# The 6 tets of a cube (corner ids), one per ordering of the axes.
TET_CORNERS = np.array([[0, 1 << i, (1 << i) | (1 << j), 7] for i, j, _ in itertools.permutations(range(3))],
                       dtype=np.int64)
_TET_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=np.int64)


class MarchingTetsMesh(NamedTuple):
    """Result of :func:`marching_tets`.

    Attributes:
        vertices: (V, 3) [m], one per cut grid edge.
        faces: (F, 3) int64, oriented towards positive values.
        attributes: (V, k) per-node ``attributes`` interpolated like the positions, or None.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    attributes: torch.Tensor | None = None


@functools.lru_cache(maxsize=None)
def triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each (tet type, case): local tet edges, oriented towards positive values.

    Returns:
        ``(tris, counts)``: int64 (6, 16, 2, 3) local edge ids (-1 unused) and int64 (6, 16).
        ``case = sum([s_c < 0] << c)`` over the tet's 4 corners.
    """
    tris = -np.ones((6, 16, 2, 3), dtype=np.int64)
    counts = np.zeros((6, 16), dtype=np.int64)
    for t, corners in enumerate(TET_CORNERS):
        pos = CORNER_OFFSETS[corners].astype(np.float64)
        for case in range(1, 15):
            inside = [(case >> c) & 1 for c in range(4)]
            cut = [e for e, (a, b) in enumerate(_TET_EDGES) if inside[a] != inside[b]]
            mid = {e: pos[_TET_EDGES[e]].mean(0) for e in cut}
            c_in = pos[[c for c in range(4) if inside[c]]].mean(0)
            c_out = pos[[c for c in range(4) if not inside[c]]].mean(0)
            if len(cut) == 3:
                faces = [cut]
            else:  # a quad: order its 4 edges around the loop (consecutive edges share a tet corner)
                loop = [cut[0]]
                rest = cut[1:]
                while rest:
                    nxt = next(e for e in rest if set(_TET_EDGES[e]) & set(_TET_EDGES[loop[-1]]))
                    loop.append(nxt)
                    rest.remove(nxt)
                faces = [[loop[0], loop[1], loop[2]], [loop[0], loop[2], loop[3]]]
            for k, f in enumerate(faces):
                n = np.cross(mid[f[1]] - mid[f[0]], mid[f[2]] - mid[f[0]])
                if np.dot(n, c_out - c_in) < 0:
                    f = [f[0], f[2], f[1]]
                tris[t, case, k] = f
            counts[t, case] = len(faces)
    return tris, counts


def marching_tets(sdf: torch.Tensor, bounds: Sequence[Sequence[float]] = ((-0.5,) * 3, (0.5,) * 3), *,
                  attributes: torch.Tensor | None = None) -> MarchingTetsMesh:
    """Extract the zero set of node values with marching tetrahedra.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), float, negative inside; gradients flow to it.
        bounds: ((x0, y0, z0), (x1, y1, z1)) [m].
        attributes: Extra node values (nx+1, ny+1, nz+1) or (..., k), interpolated to the
            vertices like the positions.

    Returns:
        :class:`MarchingTetsMesh` (empty tensors when the values do not change sign).

    Raises:
        ValueError: Bad shapes, non-finite values, or inside values on the grid boundary (the
            surface would be open).
    """
    check_node_values(sdf)
    attr = None if attributes is None else node_attributes(attributes, sdf.shape, sdf.dtype)
    grid = Grid.from_values(sdf, bounds)
    dev, dtype = sdf.device, sdf.dtype
    inside = sdf.detach() < 0
    check_closed_boundary(inside)
    case = cube_cases(inside)
    cubes = torch.nonzero((case > 0) & (case < 255))  # (M, 3)
    empty_attr = None if attr is None else attr.new_zeros((0, attr.shape[-1]))
    if cubes.shape[0] == 0:
        return MarchingTetsMesh(sdf.new_zeros((0, 3)) + sdf.sum() * 0, torch.zeros((0, 3), dtype=torch.int64,
                                                                                  device=dev), empty_attr)
    # Tets of the surface cubes: node indices (M * 6, 4, 3).
    offs = torch.as_tensor(CORNER_OFFSETS[TET_CORNERS], device=dev)  # (6, 4, 3)
    nodes = (cubes[:, None, None, :] + offs[None]).reshape(-1, 4, 3)
    tet_type = torch.arange(6, device=dev).repeat(cubes.shape[0])
    flat = (nodes[..., 0] * sdf.shape[1] + nodes[..., 1]) * sdf.shape[2] + nodes[..., 2]  # (T, 4)
    tin = inside.reshape(-1)[flat]
    case = (tin.to(torch.int64) << torch.arange(4, device=dev)).sum(1)
    tris_np, counts_np = triangle_table()
    tris, counts = torch.as_tensor(tris_np, device=dev), torch.as_tensor(counts_np, device=dev)
    n_tri = counts[tet_type, case]
    keep = n_tri > 0
    flat, tet_type, case, n_tri = flat[keep], tet_type[keep], case[keep], n_tri[keep]
    # Welded vertices: one per cut grid edge (pair of node ids).
    te = torch.as_tensor(_TET_EDGES, device=dev)
    ea, eb = flat[:, te[:, 0]], flat[:, te[:, 1]]  # (T, 6)
    lo, hi = torch.minimum(ea, eb), torch.maximum(ea, eb)
    n_nodes = sdf.numel()
    cut = inside.reshape(-1)[ea] != inside.reshape(-1)[eb]
    keys, inv = torch.unique((lo * n_nodes + hi)[cut], return_inverse=True)
    vid = torch.full(ea.shape, -1, dtype=torch.int64, device=dev)
    vid[cut] = inv
    a, b = keys // n_nodes, keys % n_nodes
    s_flat = sdf.reshape(-1)
    sa, sb = s_flat[a], s_flat[b]
    t = (sa / (sa - sb))[:, None]
    lower = torch.tensor(grid.lower, dtype=dtype, device=dev)
    h = torch.tensor(grid.spacing, dtype=dtype, device=dev)
    strides = torch.tensor([sdf.shape[1] * sdf.shape[2], sdf.shape[2], 1], device=dev)

    def position(node: torch.Tensor) -> torch.Tensor:
        ijk = (node[:, None] // strides) % torch.tensor(sdf.shape, device=dev)
        return lower + ijk.to(dtype) * h

    xa, xb = position(a), position(b)
    vertices = xa + t * (xb - xa)
    vattr = None
    if attr is not None:
        af = attr.reshape(n_nodes, -1)
        vattr = af[a] + t * (af[b] - af[a])
    # Faces from the table (local tet edges -> welded vertex ids).
    local = tris[tet_type, case]  # (T, 2, 3)
    second = n_tri == 2
    faces = torch.cat([torch.gather(vid, 1, local[:, 0]), torch.gather(vid[second], 1, local[second, 1])])
    return MarchingTetsMesh(vertices, faces, vattr)
