"""FlexiCubes (Shen et al. 2023): a dual isosurface with learnable weights, in torch (reference).

One *dual vertex* per connected piece of the surface inside each cube (groups of cut edges from
:mod:`diffworld.geometry.flexicubes_tables`), placed at a weighted mean of the crossings on its
edges; a quad around every cut grid edge, from the dual vertices of the 4 cubes that share it,
split into 2 triangles (eval, choice by ``gamma``) or 4 around a weighted centre (training).

Weights (raw values, normalized as in the paper): ``beta`` (12 per cube, one per edge) weights
the crossings in a dual vertex, ``1 + 0.99 tanh(raw)``; ``alpha`` (8 per cube, one per corner)
moves each crossing, ``1 + 0.99 tanh(raw)``; ``gamma`` (1 per cube) chooses and weights the quad
split, ``0.99 sigmoid(raw) + 0.005``. ``deform`` moves the grid nodes by at most half a cell,
``(0.5 - 1e-8) h tanh(raw)``. All optional (all-ones weights, no deformation: a plain dual mesh).

Work and memory beyond the node values are proportional to the surface: only cubes with a sign
change are gathered (found by integer ops over the node signs), and weights given per cube are
read only there. Everything after the sign scan is differentiable torch (autograd).

Conventions: node grid (nx+1, ny+1, nz+1) over ``bounds``; negative inside; faces oriented with
normals towards positive values (outward for an SDF).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from diffworld.geometry import flexicubes_tables as T
from diffworld.geometry.flexicubes_tets import tetrahedralize
from diffworld.geometry.grid import Grid, check_node_values, cube_cases, node_attributes
from diffworld.geometry.kernels_flexicubes import surface_scan
from diffworld.geometry.mc_tables import CORNER_OFFSETS, EDGE_CORNERS

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


def _per_cube(name: str, value: torch.Tensor | None, res: tuple[int, int, int], k: int) -> torch.Tensor | None:
    if value is None:
        return None
    want = (*res, k) if k > 1 else res
    if tuple(value.shape) != want:
        raise ValueError(f"'{name}': expected shape {want} (one row per cube), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"'{name}': expected finite values")
    return value


def flexicubes(sdf: torch.Tensor, bounds: Sequence[Sequence[float]] = ((-0.5,) * 3, (0.5,) * 3), *,
               beta: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
               gamma: torch.Tensor | None = None, deform: torch.Tensor | None = None,
               training: bool = False, attributes: torch.Tensor | None = None,
               output: str = "triangles") -> FlexiCubesMesh:
    """Extract the FlexiCubes surface of node values.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), float32/float64, negative inside.
        bounds: ((x0, y0, z0), (x1, y1, z1)) [m] of the node grid.
        beta: Raw edge weights (nx, ny, nz, 12) or None.
        alpha: Raw corner weights (nx, ny, nz, 8) or None.
        gamma: Raw split weights (nx, ny, nz) or None.
        deform: Raw node offsets (nx+1, ny+1, nz+1, 3) or None.
        training: Split each quad into 4 triangles around a weighted centre (differentiable in
            gamma) instead of choosing a diagonal.
        attributes: Extra node values (nx+1, ny+1, nz+1) or (nx+1, ny+1, nz+1, k), interpolated to
            the vertices exactly like the positions (crossings, dual vertices, centres).
        output: ``"triangles"`` (the surface) or ``"tetrahedra"`` (the surface and tets filling
            it, :mod:`diffworld.geometry.flexicubes_tets`).

    Returns:
        :class:`FlexiCubesMesh`; empty tensors when the values do not change sign.

    Raises:
        ValueError: Bad shapes, non-finite values, or a surface that reaches the grid boundary
            (the field must be positive on the boundary nodes, else the mesh would be open).
    """
    check_node_values(sdf)
    if output not in ("triangles", "tetrahedra"):
        raise ValueError(f"'output': expected 'triangles' or 'tetrahedra', got {output!r}")
    if output == "tetrahedra" and attributes is not None:
        raise ValueError("'attributes': only with output='triangles' (tetrahedra carry no attributes)")
    if attributes is not None:
        attributes = node_attributes(attributes, sdf.shape, sdf.dtype)
    grid = Grid.from_values(sdf, bounds)
    res = tuple(int(n) - 1 for n in sdf.shape)
    beta, alpha, gamma = (_per_cube(n, v, res, k) for n, v, k in (("beta", beta, 12), ("alpha", alpha, 8),
                                                                   ("gamma", gamma, 1)))
    dev, dtype = sdf.device, sdf.dtype
    # The only volume-sized work (Warp kernels, one pass over the values): the surface cubes in
    # row-major order, their cases, the cut grid edges; a boundary node inside raises here.
    scan = surface_scan(sdf)
    values = sdf.detach()
    cubes = scan.cubes  # (M, 3)
    empty = sdf.new_zeros((0, 3))
    if cubes.shape[0] == 0:
        z = torch.zeros((0, 3), dtype=torch.int64, device=dev)
        attr0 = None if attributes is None else attributes.new_zeros((0, attributes.shape[-1]))
        tets = torch.zeros((0, 4), dtype=torch.int64, device=dev) if output == "tetrahedra" else None
        return FlexiCubesMesh(empty + sdf.sum() * 0, z, sdf.new_zeros((0,)), z, attr0, tets)
    raw_case = scan.case.to(torch.int64)
    c_case = raw_case
    lin = (cubes[:, 0] * res[1] + cubes[:, 1]) * res[2] + cubes[:, 2]  # sorted (row-major scan)
    # Ambiguity (tables module): flip to the complement's grouping when the neighbour across the
    # ambiguous face is flagged too.
    amb = torch.as_tensor(T.AMBIGUOUS_FACE, device=dev)
    face = amb[c_case]
    flagged = face >= 0
    if bool(flagged.any()):
        axis, side = face.clamp_min(0) // 2, face.clamp_min(0) % 2
        step = torch.zeros_like(cubes)
        step.scatter_(1, axis[:, None], (2 * side - 1)[:, None])
        nb = cubes + step
        ok = flagged & (nb >= 0).all(1) & (nb < torch.tensor(res, device=dev)).all(1)
        nb_case = torch.zeros_like(c_case)
        # The neighbour across an ambiguous face shares its mixed signs: it is a surface cube.
        nb_lin = (nb[ok, 0] * res[1] + nb[ok, 1]) * res[2] + nb[ok, 2]
        nb_case[ok] = raw_case[torch.searchsorted(lin, nb_lin)]
        flip = ok & (amb[nb_case] >= 0)
        c_case = torch.where(flip, 255 - c_case, c_case)
    count, group_edges, edge_group = (torch.as_tensor(t, device=dev, dtype=torch.int64) for t in T.dual_tables())
    M = cubes.shape[0]

    # Node positions of the cube corners (deformed), values, and per-cube weights.
    offs = torch.as_tensor(CORNER_OFFSETS, device=dev)
    corner_idx = cubes[:, None, :] + offs[None]  # (M, 8, 3)
    lo = torch.tensor(grid.lower, dtype=dtype, device=dev)
    h = torch.tensor(grid.spacing, dtype=dtype, device=dev)
    if deform is not None and tuple(deform.shape) != (*sdf.shape, 3):
        raise ValueError(f"'deform': expected shape {(*sdf.shape, 3)}, got {tuple(deform.shape)}")

    def node_position(idx: torch.Tensor) -> torch.Tensor:
        """Deformed positions of nodes ``idx`` (..., 3) int64."""
        p = lo + idx.to(dtype) * h
        if deform is not None:
            p = p + (0.5 - 1e-8) * h * torch.tanh(deform[idx[..., 0], idx[..., 1], idx[..., 2]])
        return p

    x = node_position(corner_idx)
    s = sdf[corner_idx[..., 0], corner_idx[..., 1], corner_idx[..., 2]]  # (M, 8)
    n_attr = 0
    if attributes is not None:
        # Carried as extra coordinates: every interpolation below treats them like x, y, z.
        n_attr = attributes.shape[-1]
        x = torch.cat([x, attributes[corner_idx[..., 0], corner_idx[..., 1], corner_idx[..., 2]]], -1)
    ci, cj, ck = cubes.unbind(1)
    a_w = 1 + 0.99 * torch.tanh(alpha[ci, cj, ck]) if alpha is not None else torch.ones_like(s)
    b_w = 1 + 0.99 * torch.tanh(beta[ci, cj, ck]) if beta is not None else s.new_ones((M, 12))
    g_w = 0.99 * torch.sigmoid(gamma[ci, cj, ck]) + 0.005 if gamma is not None else s.new_ones((M,))

    # Crossings on the 12 edges of each cube (uncut edges masked out below).
    ea = torch.as_tensor(EDGE_CORNERS[:, 0], device=dev)
    eb = torch.as_tensor(EDGE_CORNERS[:, 1], device=dev)
    sa, sb = s[:, ea], s[:, eb]
    cut = (sa < 0) != (sb < 0)  # (M, 12)
    den_ok = torch.where(cut, sb - sa, torch.ones_like(sa))  # never 0 on cut edges
    xa, xb = x[:, ea], x[:, eb]
    wa, wb = a_w[:, ea] * sa, a_w[:, eb] * sb
    den_w = torch.where(cut, wb - wa, torch.ones_like(sa))
    u = (xa * wb[..., None] - xb * wa[..., None]) / den_w[..., None]  # weighted crossing (M, 12, 3 + k)
    u_plain = ((xa * sb[..., None] - xb * sa[..., None]) / den_ok[..., None])[..., :3]

    # Dual vertices: one per (cube, group).
    n_groups = count[c_case]  # (M,)
    gid = torch.arange(T.MAX_GROUPS, device=dev)
    has = gid[None] < n_groups[:, None]  # (M, 4)
    e_tab = group_edges[c_case]  # (M, 4, 7)
    e_valid = (e_tab >= 0) & has[..., None]
    e_safe = e_tab.clamp_min(0)
    b_sel = torch.gather(b_w, 1, e_safe.reshape(M, -1)).reshape(M, T.MAX_GROUPS, -1) * e_valid
    width = 3 + n_attr
    u_sel = torch.gather(u, 1, e_safe.reshape(M, -1, 1).expand(-1, -1, width)).reshape(M, T.MAX_GROUPS, -1, width)
    v_all = (b_sel[..., None] * u_sel).sum(2) / b_sel.sum(2).clamp_min(1e-30)[..., None]  # (M, 4, 3 + k)
    vert_of = torch.full((M, T.MAX_GROUPS), -1, dtype=torch.int64, device=dev)
    vert_of[has] = torch.arange(int(has.sum()), device=dev)
    vertices = v_all[has]

    # L_dev: distance of each dual vertex to its edges' plain crossings, vs their mean.
    up_sel = torch.gather(u_plain, 1, e_safe.reshape(M, -1, 1).expand(-1, -1, 3)).reshape(M, T.MAX_GROUPS, -1, 3)
    d = (up_sel - v_all[:, :, None, :3]).norm(dim=-1)  # (M, 4, 7)
    n_e = e_valid.sum(2).clamp_min(1)
    mean_d = (d * e_valid).sum(2) / n_e
    l_dev = (d - mean_d[..., None]).abs()[e_valid]

    # Quads around the cut grid edges: the 4 cubes sharing the edge, counter-clockwise.
    quads, flips, quad_nodes = [], [], []
    quad_tab = torch.as_tensor(T.QUAD_CUBES, device=dev)
    for a in range(3):
        start = scan.cut_starts[a]  # grid edges along a with a sign change, (Q, 3) start nodes
        if start.shape[0] == 0:
            continue
        cube = start[:, None, :] + quad_tab[a, :, :3][None]  # (Q, 4, 3): all inside the grid (boundary > 0)
        key = (cube[..., 0] * res[1] + cube[..., 1]) * res[2] + cube[..., 2]
        pos = torch.searchsorted(lin, key.contiguous())
        local = quad_tab[a, :, 3][None].expand_as(key)
        grp = edge_group[c_case[pos], local]
        quads.append(vert_of[pos, grp])
        start_in = values[start[:, 0], start[:, 1], start[:, 2]] < 0
        flips.append(~start_in)  # start outside: reverse the order
        step = torch.zeros(3, dtype=torch.int64, device=dev)
        step[a] = 1
        quad_nodes.append(torch.where(start_in[:, None], start, start + step))  # the inside end
    quad = torch.cat(quads)
    flip = torch.cat(flips)
    quad = torch.where(flip[:, None], quad.flip(1), quad)
    # gamma of the 4 cubes of each quad (by dual vertex: its cube)
    cube_of_vert = torch.nonzero(has)[:, 0]
    gq = g_w[cube_of_vert[quad]]  # (Q, 4)
    g02, g13 = gq[:, 0] * gq[:, 2], gq[:, 1] * gq[:, 3]
    if training:
        vq = vertices[quad]  # (Q, 4, 3 + k)
        centre = (g02[:, None] * (vq[:, 0] + vq[:, 2]) / 2 + g13[:, None] * (vq[:, 1] + vq[:, 3]) / 2) / \
            (g02 + g13)[:, None]
        c_id = vertices.shape[0] + torch.arange(quad.shape[0], device=dev)
        faces = torch.cat([torch.stack([quad[:, q], quad[:, (q + 1) % 4], c_id], 1) for q in range(4)])
        vertices = torch.cat([vertices, centre])
    else:
        split02 = (g02 > g13).detach()
        t02 = torch.cat([quad[:, [0, 1, 2]], quad[:, [0, 2, 3]]])
        t13 = torch.cat([quad[:, [1, 2, 3]], quad[:, [1, 3, 0]]])
        faces = torch.where(torch.cat([split02, split02])[:, None], t02, t13)
    attrs = vertices[:, 3:] if attributes is not None else None
    vertices = vertices[:, :3]
    tets = None
    if output == "tetrahedra":
        quad_node = torch.cat(quad_nodes)
        inside = values < 0  # the tets fill the volume: dense node signs and cases are fine here
        case = cube_cases(inside)
        vertices, tets = tetrahedralize(
            inside=inside, case=case, cubes=cubes, raw_case=raw_case, flipped=c_case != raw_case,
            vert_of=vert_of, vertices=vertices, faces=faces,
            face_node=quad_node.repeat(faces.shape[0] // quad.shape[0], 1), node_position=node_position,
            spacing=h)
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
