"""FlexiCubes (Shen et al. 2023): a dual isosurface with learnable weights, sparse (surface cubes only).

One *dual vertex* per connected piece of the surface inside each cube (groups of cut edges from
:mod:`diffworld.geometry.flexicubes_tables`), placed at a weighted mean of the crossings on its
edges; a quad around every cut grid edge, from the dual vertices of the 4 cubes that share it,
split into 2 triangles (eval, choice by ``gamma``) or 4 around a weighted centre (training).

Weights (raw values, normalized as in the paper): ``beta`` (12 per cube, one per edge) weights
the crossings in a dual vertex, ``1 + 0.99 tanh(raw)``; ``alpha`` (8 per cube, one per corner)
moves each crossing, ``1 + 0.99 tanh(raw)``; ``gamma`` (1 per cube) chooses and weights the quad
split, ``0.99 sigmoid(raw) + 0.005``. ``deform`` moves the grid nodes by at most half a cell,
``(0.5 - 1e-8) h tanh(raw)``. All optional (all-ones weights, no deformation: a plain dual mesh).

Work and memory beyond the node values are proportional to the surface: a Warp kernel scans the
node signs once and finds the cubes with a sign change; weights given per cube are read only
there. After the scan, the dual vertices and L_dev distances are Warp kernels with a hand-written
adjoint (:mod:`diffworld.geometry.kernels_flexicubes_dual`, which keeps no per-(edge, cube)
intermediates for the backward pass); the rest is torch (autograd), one row per cut grid edge.

Conventions: node grid (nx+1, ny+1, nz+1) over ``bounds``; negative inside; faces oriented with
normals towards positive values (outward for an SDF).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from diffworld.geometry import flexicubes_tables as tables
from diffworld.geometry.flexicubes_tets import tetrahedralize
from diffworld.geometry.grid import Grid, check_node_values, cube_cases, node_attributes
from diffworld.geometry.kernels_flexicubes import surface_scan
from diffworld.geometry.kernels_flexicubes_dual import dual_vertices
from diffworld.geometry.mc_tables import EDGE_CORNERS
from diffworld.geometry.tet_mesh import TetMesh

__all__ = ["FlexiCubesMesh", "flexicubes", "sdf_sign_loss"]


class FlexiCubesMesh(NamedTuple):
    """Result of :func:`flexicubes`.

    Attributes:
        vertices: (V, 3) [m]: dual vertices, then (training) one centre per quad.
        faces: (F, 3) int64, oriented towards positive values.
        l_dev: (P,) FlexiCubes' L_dev per (dual vertex, cut edge) pair: ``|d - mean_d|`` with
            ``d`` the distance from the vertex to the edge's plain (unweighted) crossing.
        cubes: (M, 3) int64, the cubes that hold the dual vertices (surface cubes).
        attributes: (V, k) per-node ``attributes`` carried to the vertices with the weights of
            the positions (G-Shell's manifold SDF), or None.
        tets: (T, 4) int64 tetrahedra filling the surface (``output="tetrahedra"``), positively
            oriented; ``vertices`` then continues after the surface vertices with the interior
            ones (inside nodes, centres of full cubes, component points), and ``faces`` (which
            index only surface vertices) is the boundary of ``tets``. None for triangles.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    l_dev: torch.Tensor
    cubes: torch.Tensor
    attributes: torch.Tensor | None = None
    tets: torch.Tensor | None = None

    @property
    def tet_mesh(self) -> TetMesh | None:
        """The tetrahedral output as a :class:`~diffworld.geometry.tet_mesh.TetMesh` (surface =
        ``faces``), or None for ``output="triangles"``."""
        return None if self.tets is None else TetMesh(self.vertices, self.tets, self.faces)


WeightsFn = Callable[[torch.Tensor], Sequence[Optional[torch.Tensor]]]
"""``fn(cubes (M, 3) int64) -> (beta_raw (M, 12) | None, alpha_raw (M, 8) | None, gamma_raw (M,) | None)``."""
DeformFn = Callable[[torch.Tensor], torch.Tensor]
"""``fn(nodes (N, 3) int64) -> deform_raw (N, 3)``."""


@functools.lru_cache(maxsize=None)
def _pair_tables() -> tuple[np.ndarray, ...]:
    """Tables of the flat (cut grid edge, 4 cubes) layout, from :func:`flexicubes_tables.dual_tables`.

    Returns:
        ``(count, edge_group, edge_rank, n_cut, slot_edge, slot_corners)``: ``count`` (256,) dual
        vertices per case; ``edge_group`` (256 * 12,) the group of each edge (-1: not cut);
        ``edge_rank`` (256 * 12,) the rank of each cut edge among the case's cut edges taken
        group by group in contour order (the order of ``group_edges``, which is the order of
        ``l_dev``); ``n_cut`` (256,) cut edges per case; ``slot_edge`` (3, 4) the cube edge that
        a grid edge along axis ``a`` is in the ``q``-th cube around it (``QUAD_CUBES``);
        ``slot_corners`` (3, 4, 2) that edge's two corners (start node first).
    """
    count, group_edges, edge_group = tables.dual_tables()
    edge_rank = -np.ones((256, 12), dtype=np.int64)
    n_cut = np.zeros(256, dtype=np.int64)
    for case in range(256):
        flat = [int(e) for e in group_edges[case].reshape(-1) if e >= 0]
        edge_rank[case, flat] = np.arange(len(flat))
        n_cut[case] = len(flat)
    slot_edge = tables.QUAD_CUBES[:, :, 3]
    slot_corners = EDGE_CORNERS[slot_edge]  # (3, 4, 2)
    return (count.astype(np.int64), edge_group.astype(np.int64).reshape(-1), edge_rank.reshape(-1), n_cut,
            slot_edge, slot_corners)


def _check_shape(name: str, value: torch.Tensor | None, want: tuple[int, ...], what: str) -> None:
    if value is not None and tuple(value.shape) != want:
        raise ValueError(f"'{name}': expected shape {want} ({what}), got {tuple(value.shape)}")


def _check_finite(name: str, read: torch.Tensor) -> None:
    # Only the entries the extraction reads (surface cubes / nodes), never a pass over the volume.
    if not bool(torch.isfinite(read.detach()).all()):
        raise ValueError(f"'{name}': expected finite values (found NaN or Inf where the surface reads them)")


def _lookup_weights(weights: WeightsFn, cubes: torch.Tensor, sdf: torch.Tensor
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Call a ``weights`` function on the surface cubes and validate what it returns."""
    out = weights(cubes)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError(f"'weights': expected the function to return (beta_raw, alpha_raw, gamma_raw) "
                         f"(each a tensor or None), got {type(out).__name__}")
    M = cubes.shape[0]
    checked = []
    for name, value, want in zip(("beta", "alpha", "gamma"), out, ((M, 12), (M, 8), (M,))):
        if value is not None:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"'weights': {name}_raw must be a floating-point tensor or None, "
                                 f"got {type(value).__name__}")
            if tuple(value.shape) != want:
                raise ValueError(f"'weights': expected {name}_raw of shape {want} (one row per cube passed), "
                                 f"got {tuple(value.shape)}")
            if value.device != sdf.device:
                raise ValueError(f"'weights': {name}_raw on {value.device}, expected {sdf.device} (the device of 'sdf')")
        checked.append(value)
    return tuple(checked)


# With output="tetrahedra", an inside node closer to the surface than this fraction of a cell
# (along every grid edge leaving it) counts as outside: see :func:`snap_near_zero`.
SNAP_CELLS = 1e-6


def snap_near_zero(sdf: torch.Tensor, cells: float = SNAP_CELLS) -> torch.Tensor:
    """Set inside values that are zero up to rounding to +0 (outside), keeping their gradients.

    A grid node that lies on the surface in exact arithmetic often gets a value like -3e-17
    (rounding in ``|p| - r``): it is inside, every surface crossing on its edges sits at the node
    itself, and the tets fanned from it are flat (volume ~1e-16 cell). A value counts as zero when
    every crossing on the node's 6 grid edges would lie within ``cells`` of a cell of the node,
    i.e. ``|v| < cells * max_n |v_n - v|`` over its grid neighbours ``n``. Exact zeros are already
    outside (inside means negative), so this makes "on the surface" mean the same thing whatever
    the rounding. The snapped values are ``v - v.detach()``: zero, with the gradient of ``v``.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), negative inside.
        cells: Threshold, in cells along the edges.

    Returns:
        ``sdf`` itself when no value is that close, else a copy with those values snapped.
    """
    v = sdf.detach()
    scale = float(v.abs().max()) if v.numel() else 0.0
    # The local test implies |v| < 2 * cells * max|v|: a cheap pass finds the few candidates.
    cand = torch.nonzero((v < 0) & (v > -2.0 * cells * scale))
    if cand.shape[0] == 0:
        return sdf
    hi = torch.tensor(v.shape, device=v.device) - 1
    diff = torch.zeros(cand.shape[0], dtype=v.dtype, device=v.device)
    here = v[cand[:, 0], cand[:, 1], cand[:, 2]]
    for a in range(3):
        for d in (-1, 1):
            nb = cand.clone()
            nb[:, a] = (nb[:, a] + d).clamp(min=0, max=int(hi[a]))
            diff = torch.maximum(diff, (v[nb[:, 0], nb[:, 1], nb[:, 2]] - here).abs())
    snap = here.abs() < cells * diff
    if not bool(snap.any()):
        return sdf
    idx = cand[snap]
    mask = torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    mask[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return torch.where(mask, sdf - sdf.detach(), sdf)


def flexicubes(sdf: torch.Tensor, bounds: Sequence[Sequence[float]] = ((-0.5,) * 3, (0.5,) * 3), *,
               beta: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
               gamma: torch.Tensor | None = None, deform: torch.Tensor | DeformFn | None = None,
               weights: WeightsFn | None = None, training: bool = False,
               attributes: torch.Tensor | None = None, output: str = "triangles") -> FlexiCubesMesh:
    """Extract the FlexiCubes surface of node values.

    The per-cube weights can be given densely (``beta``, ``alpha``, ``gamma``: one row per cube of
    the grid) or looked up (``weights``: a function called once with the surface cubes). Dense
    weights are only read at the surface cubes, but their gradients are dense (autograd allocates
    a gradient the size of each dense leaf: at 256^3, 1.4 GB for the three). With ``weights`` the
    caller stores the raw weights in whatever structure it likes (a tensor indexed through a
    sorted key table or a dict, a hash grid, a small network of the cube index), and memory and
    gradients stay proportional to the surface. Example, raw weights for a fixed set of cubes
    ``keys`` (K, 3) (unknown cubes get raw 0, i.e. weights 1 + 0.99 tanh(0) = 1)::

        lin = lambda c: (c[:, 0] * ny + c[:, 1]) * nz + c[:, 2]
        order = lin(keys).sort()
        table = torch.zeros(K, 12, requires_grad=True)   # beta rows of keys[order.indices]

        def weights(cubes):
            q = lin(cubes)
            row = torch.searchsorted(order.values, q).clamp_max(K - 1)
            found = (order.values[row] == q)[:, None]
            return torch.where(found, table[row], 0.0), None, None

    ``deform`` likewise accepts a function of node indices.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), float32/float64, negative inside.
        bounds: ((x0, y0, z0), (x1, y1, z1)) [m] of the node grid.
        beta: Raw edge weights (nx, ny, nz, 12) or None (all 1).
        alpha: Raw corner weights (nx, ny, nz, 8) or None (all 1).
        gamma: Raw split weights (nx, ny, nz) or None (all 1).
        deform: Raw node offsets: a tensor (nx+1, ny+1, nz+1, 3), or a function
            ``fn(nodes (N, 3) int64) -> (N, 3)`` returning the raw offsets of the given node
            indices (called with the end nodes of the cut grid edges, repeats included, and with
            ``output="tetrahedra"`` also with interior nodes; it must be a function of the index
            only), or None. A node moves by ``(0.5 - 1e-8) h tanh(raw)`` [m].
        weights: Raw per-cube weights looked up instead of passed densely:
            ``fn(cubes (M, 3) int64) -> (beta_raw (M, 12) | None, alpha_raw (M, 8) | None,
            gamma_raw (M,) | None)``, called once per call with the surface cubes (row-major
            order; not called when there is no surface). Rows follow ``cubes``; None means all 1,
            as for the dense arguments; values in the units of ``beta``/``alpha``/``gamma``.
            Gradients flow into whatever the function reads. Mutually exclusive with ``beta``,
            ``alpha`` and ``gamma``.
        training: Split each quad into 4 triangles around a weighted centre (differentiable in
            gamma) instead of choosing a diagonal.
        attributes: Extra node values (nx+1, ny+1, nz+1) or (nx+1, ny+1, nz+1, k), interpolated to
            the vertices exactly like the positions (crossings, dual vertices, centres).
        output: ``"triangles"`` (the surface) or ``"tetrahedra"`` (the surface and tets filling
            it, :mod:`diffworld.geometry.flexicubes_tets`). With tetrahedra, inside values within
            1e-6 of a cell of zero count as outside first (:func:`snap_near_zero`); the returned
            surface is that of the snapped values.

    Returns:
        :class:`FlexiCubesMesh`; empty tensors when the values do not change sign.

    Raises:
        ValueError: Bad shapes, ``weights`` together with ``beta``/``alpha``/``gamma``, a
            ``weights`` function returning bad shapes, non-finite values (weights and offsets are
            checked only where the surface reads them), or a surface that reaches the grid
            boundary (the field must be positive on the boundary nodes, else the mesh would be
            open).
    """
    check_node_values(sdf)
    if output not in ("triangles", "tetrahedra"):
        raise ValueError(f"'output': expected 'triangles' or 'tetrahedra', got {output!r}")
    if output == "tetrahedra":
        sdf = snap_near_zero(sdf)
    if output == "tetrahedra" and attributes is not None:
        raise ValueError("'attributes': only with output='triangles' (tetrahedra carry no attributes)")
    if weights is not None:
        given = [n for n, v in (("beta", beta), ("alpha", alpha), ("gamma", gamma)) if v is not None]
        if given:
            raise ValueError(f"'weights' and {', '.join(repr(n) for n in given)}: pass the per-cube weights either "
                             f"densely (beta=, alpha=, gamma=) or as a lookup function (weights=), not both")
        if not callable(weights):
            raise ValueError(f"'weights': expected a function cubes (M, 3) -> (beta_raw, alpha_raw, gamma_raw), "
                             f"got {type(weights).__name__}")
    if attributes is not None:
        attributes = node_attributes(attributes, sdf.shape, sdf.dtype)
    grid = Grid.from_values(sdf, bounds)
    res = tuple(int(n) - 1 for n in sdf.shape)
    for name, value, k in (("beta", beta, (12,)), ("alpha", alpha, (8,)), ("gamma", gamma, ())):
        _check_shape(name, value, (*res, *k), "one row per cube")
    deform_fn = deform if callable(deform) else None
    if deform_fn is None:
        _check_shape("deform", deform, (*sdf.shape, 3), "one row per node")
    dev, dtype = sdf.device, sdf.dtype
    # The only volume-sized work (Warp kernels, one pass over the values): the surface cubes in
    # row-major order, their cases, the cut grid edges; a boundary node inside raises here.
    scan = surface_scan(sdf)
    cubes = scan.cubes  # (M, 3)
    if cubes.shape[0] == 0:
        z = torch.zeros((0, 3), dtype=torch.int64, device=dev)
        attr0 = None if attributes is None else attributes.new_zeros((0, attributes.shape[-1]))
        tets = torch.zeros((0, 4), dtype=torch.int64, device=dev) if output == "tetrahedra" else None
        return FlexiCubesMesh(sdf.new_zeros((0, 3)) + sdf.sum() * 0, z, sdf.new_zeros((0,)), z, attr0, tets)
    raw_case = scan.case.to(torch.int64)
    c_case = raw_case
    lin = (cubes[:, 0] * res[1] + cubes[:, 1]) * res[2] + cubes[:, 2]  # sorted (row-major scan)
    # Ambiguity (tables module): flip to the complement's grouping when the neighbour across the
    # ambiguous face is flagged too.
    amb = torch.as_tensor(tables.AMBIGUOUS_FACE, device=dev)
    face = amb[c_case]
    flagged = face >= 0
    if bool(flagged.any()):
        sel = torch.nonzero(flagged)[:, 0]  # a few percent of the cubes: work on those only
        f = face[sel]
        axis, side = f // 2, f % 2
        nb = cubes[sel].clone()
        nb[torch.arange(sel.shape[0], device=dev), axis] += 2 * side - 1
        ok = (nb >= 0).all(1) & (nb < torch.tensor(res, device=dev)).all(1)
        # The neighbour across an ambiguous face shares its mixed signs: it is a surface cube.
        nb_lin = (nb[:, 0] * res[1] + nb[:, 1]) * res[2] + nb[:, 2]
        nb_pos = torch.searchsorted(lin, nb_lin).clamp_max(lin.shape[0] - 1)
        flip = ok & (amb[raw_case[nb_pos]] >= 0)
        c_case = c_case.clone()
        c_case[sel[flip]] = 255 - c_case[sel[flip]]
    count, edge_group, edge_rank, n_cut, slot_edge, slot_corners = (
        torch.as_tensor(t, device=dev) for t in _pair_tables())
    M = cubes.shape[0]
    n_groups = count[c_case]  # (M,)
    first_vert = torch.cumsum(n_groups, 0) - n_groups  # dual vertex (m, g) is first_vert[m] + g
    V = int(first_vert[-1] + n_groups[-1])

    # Flat layout: one row per cut grid edge, 4 slots = the 4 cubes around it (QUAD_CUBES order).
    # Every (surface cube, cut edge) pair is exactly one (edge, slot): nothing is computed for
    # the uncut edges of a cube, and the edge's end nodes are read once for its 4 cubes.
    n_per_axis = [int(c.shape[0]) for c in scan.cut_starts]
    start = torch.cat(scan.cut_starts)  # (Q, 3) start node of each cut grid edge
    Q = start.shape[0]
    axis = torch.repeat_interleave(torch.arange(3, device=dev), torch.tensor(n_per_axis, device=dev))
    quad_off = torch.as_tensor(tables.QUAD_CUBES[:, :, :3], device=dev)  # (3, 4, 3)
    off_lin = (quad_off[..., 0] * res[1] + quad_off[..., 1]) * res[2] + quad_off[..., 2]  # (3, 4)
    # All 4 cubes lie inside the grid (the boundary is outside), so the start node's cube
    # coordinates plus the slot's offset are valid cubes, all surface cubes.
    key = ((start[:, 0] * res[1] + start[:, 1]) * res[2] + start[:, 2])[:, None] + off_lin[axis]  # (Q, 4)
    pos = torch.searchsorted(lin, key)  # (Q, 4) row of each cube in `cubes`
    case_edge = c_case[pos] * 12 + slot_edge[axis]  # (Q, 4) index into the (case, edge) tables
    # (Q, 4) dual vertex of each (edge, cube) pair; int32 (V < 2^31): autograd keeps it for every
    # gather below, and half the bytes is a visible share of the peak at 256^3.
    vid = (first_vert[pos] + edge_group[case_edge]).to(torch.int32)

    # End nodes, values and (deformed) positions, once per cut grid edge.
    n_shape = sdf.shape
    node_stride = torch.tensor([n_shape[1] * n_shape[2], n_shape[2], 1], device=dev)
    node0 = (start[:, 0] * n_shape[1] + start[:, 1]) * n_shape[2] + start[:, 2]
    nodes = torch.stack([node0, node0 + node_stride[axis]], 1)  # (Q, 2) linear node ids
    s2 = sdf.reshape(-1).index_select(0, nodes.reshape(-1)).view(Q, 2)  # one gather: one dense grad buffer
    sa, sb = s2[:, 0], s2[:, 1]
    lo = torch.tensor(grid.lower, dtype=dtype, device=dev)
    h = torch.tensor(grid.spacing, dtype=dtype, device=dev)

    def deform_raw(idx: torch.Tensor, lin_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Raw offsets (N, 3) of nodes ``idx`` (N, 3) int64 (``lin_idx``: their linear ids)."""
        if deform_fn is not None:
            out = deform_fn(idx)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (idx.shape[0], 3):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"'deform': expected the function to return raw offsets of shape "
                                 f"{(idx.shape[0], 3)} (one row per node passed), got {got}")
            return out
        if lin_idx is None:
            lin_idx = (idx[:, 0] * n_shape[1] + idx[:, 1]) * n_shape[2] + idx[:, 2]
        return deform.reshape(-1, 3).index_select(0, lin_idx)

    def node_position(idx: torch.Tensor, lin_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Deformed positions (..., 3) [m] of nodes ``idx`` (..., 3) int64."""
        p = lo + idx.to(dtype) * h
        if deform is not None:
            raw = deform_raw(idx.reshape(-1, 3), None if lin_idx is None else lin_idx.reshape(-1))
            _check_finite("deform", raw)
            p = p + (0.5 - 1e-8) * h * torch.tanh(raw.reshape(p.shape))
        return p

    unit = torch.eye(3, dtype=torch.int64, device=dev)
    end_idx = torch.stack([start, start + unit[axis]], 1)  # (Q, 2, 3)
    x2 = node_position(end_idx, nodes)  # (Q, 2, 3)
    # Locals live until the return: temporaries are dropped as soon as they are used, so that
    # later steps reuse their memory (at 256^3 they add up to about a quarter of the peak).
    del end_idx, node0
    n_attr = 0
    if attributes is not None:
        # Carried as extra coordinates: every interpolation below treats them like x, y, z.
        n_attr = attributes.shape[-1]
        x2 = torch.cat([x2, attributes.reshape(-1, n_attr).index_select(0, nodes.reshape(-1)).view(Q, 2, n_attr)], -1)
    xa, xb = x2[:, 0], x2[:, 1]  # (Q, 3 + k)

    # Raw per-cube weights: dense tensors are read at (cube linear id, entry), lookup results at
    # (row in `cubes`, entry); either way one gather per tensor and only the entries used.
    if weights is not None:
        beta, alpha, gamma = _lookup_weights(weights, cubes, sdf)
        row_of, cube_row = pos, torch.arange(M, device=dev)
    else:
        row_of, cube_row = key, lin
    a_raw = b_raw = None
    if alpha is not None:
        corner = (row_of[..., None] * 8 + slot_corners[axis]).reshape(-1)  # (Q * 4 * 2,)
        a_raw = alpha.reshape(-1).index_select(0, corner).view(Q, 4, 2)
        _check_finite("alpha", a_raw)
        del corner
    if beta is not None:
        b_raw = beta.reshape(-1).index_select(0, (row_of * 12 + slot_edge[axis]).reshape(-1)).view(Q, 4)
        _check_finite("beta", b_raw)
    flat_vid = vid.reshape(-1)
    n_e = torch.bincount(flat_vid, minlength=V).to(dtype)  # cut edges per dual vertex (3..7)

    # Dual vertices (beta-weighted means of the alpha-weighted crossings of their edges) and the
    # L_dev distances (each pair's dual vertex to the edge's plain crossing), in Warp kernels
    # whose backward recomputes the crossings: no (Q, 4, 3) tensor is kept (kernels_flexicubes_dual).
    a_w = 1 + 0.99 * torch.tanh(a_raw) if a_raw is not None else xa.new_ones((Q, 4, 2))
    b_w = 1 + 0.99 * torch.tanh(b_raw) if b_raw is not None else xa.new_ones((Q, 4))
    del a_raw, b_raw
    v_all, d = dual_vertices(xa, xb, sa, sb, a_w, b_w, vid, V)
    del a_w, b_w
    mean_d = d.new_zeros(V).index_add(0, flat_vid, d.reshape(-1)) / n_e
    dev_pair = (d - mean_d[vid]).reshape(-1)
    del d, mean_d
    vq = v_all[vid]  # (Q, 4, 3 + k): the quad corners
    # Returned per (dual vertex, edge) in vertex order, each vertex's edges in contour order:
    # the pair's rank is the cube's first pair plus the edge's rank within its case.
    pair_first = torch.cumsum(n_cut[c_case], 0) - n_cut[c_case]
    rank = (pair_first[pos] + edge_rank[case_edge]).reshape(-1)
    order = torch.empty_like(rank).scatter_(0, rank, torch.arange(rank.shape[0], device=dev))
    l_dev = dev_pair[order].abs()
    del dev_pair, pair_first, rank, order, case_edge, key, row_of, nodes

    # Quads around the cut grid edges: the 4 cubes counter-clockwise about +axis; reversed when
    # the start node is outside, so that the normals point to positive values.
    start_in = sa.detach() < 0
    quad = torch.where(start_in[:, None], vid, vid.flip(1)).long()
    if gamma is not None:
        g_raw = gamma.reshape(-1).index_select(0, cube_row)  # (M,): one value per surface cube
        _check_finite("gamma", g_raw)
        g_w = 0.99 * torch.sigmoid(g_raw) + 0.005
    else:
        g_w = sdf.new_ones((M,))
    gq = g_w[pos]  # (Q, 4) gamma of the 4 cubes, unreversed order
    g02, g13 = gq[:, 0] * gq[:, 2], gq[:, 1] * gq[:, 3]
    if training:
        # Independent of the reversal (it swaps the 0-2 and 1-3 terms): unreversed corners.
        centre = (g02[:, None] * (vq[:, 0] + vq[:, 2]) / 2 + g13[:, None] * (vq[:, 1] + vq[:, 3]) / 2) / \
            (g02 + g13)[:, None]
        c_id = V + torch.arange(Q, device=dev)
        faces = torch.cat([torch.stack([quad[:, q], quad[:, (q + 1) % 4], c_id], 1) for q in range(4)])
        vertices = torch.cat([v_all, centre])
    else:
        # Diagonal 0-2 of the (possibly reversed) quad: the unreversed 1-3 diagonal when reversed.
        split02 = torch.where(start_in, g02 > g13, g13 > g02).detach()
        t02 = torch.cat([quad[:, [0, 1, 2]], quad[:, [0, 2, 3]]])
        t13 = torch.cat([quad[:, [1, 2, 3]], quad[:, [1, 3, 0]]])
        faces = torch.where(torch.cat([split02, split02])[:, None], t02, t13)
        vertices = v_all
    attrs = vertices[:, 3:] if attributes is not None else None
    vertices = vertices[:, :3]
    tets = None
    if output == "tetrahedra":
        gid = torch.arange(tables.MAX_GROUPS, device=dev)
        vert_of = torch.where(gid < n_groups[:, None], first_vert[:, None] + gid, -1)  # (M, MAX_GROUPS)
        quad_node = torch.where(start_in[:, None], start, start + unit[axis])  # the inside end of each edge
        values = sdf.detach()
        inside = values < 0  # the tets fill the volume: dense node signs and cases are fine here
        case = cube_cases(inside)
        vertices, tets = tetrahedralize(
            inside=inside, case=case, cubes=cubes, raw_case=raw_case, flipped=c_case != raw_case,
            vert_of=vert_of, vertices=vertices, faces=faces,
            face_node=quad_node.repeat(faces.shape[0] // Q, 1), node_position=node_position,
            spacing=h, n_quads=Q)
    return FlexiCubesMesh(vertices, faces, l_dev, cubes, attrs, tets)


def sdf_sign_loss(sdf: torch.Tensor) -> torch.Tensor:
    """The SDF sign regularizer of nvdiffrec/FlexiCubes: fewer sign changes, no floaters.

    Over the grid edges whose end values differ in sign, the mean of
    ``BCE_with_logits(s_a, [s_b > 0]) + BCE_with_logits(s_b, [s_a > 0])``: each end is pushed
    towards the other's sign, most where the values are small.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1).

    Returns:
        Scalar tensor (0 when no edge changes sign), differentiable w.r.t. ``sdf``.
    """
    if sdf.dim() != 3:
        raise ValueError(f"'sdf': expected node values (nx+1, ny+1, nz+1), got shape {tuple(sdf.shape)}")
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    terms = []
    for a in range(3):
        sa = sdf.narrow(a, 0, sdf.shape[a] - 1).reshape(-1)
        sb = sdf.narrow(a, 1, sdf.shape[a] - 1).reshape(-1)
        cut = (sa > 0) != (sb > 0)
        sa, sb = sa[cut], sb[cut]
        terms.append(bce(sa, (sb > 0).to(sa.dtype), reduction="none") + bce(sb, (sa > 0).to(sb.dtype), reduction="none"))
    values = torch.cat(terms)
    return values.mean() if values.numel() else sdf.sum() * 0.0
