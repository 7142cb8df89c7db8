"""Tetrahedra filling a FlexiCubes surface: a mesh of the inside ready for FEM.

Every inside grid node owns a *cell*, its share of the inside, and the cells tile the inside.
A cell is bounded by one face per grid edge leaving its node, made of one point from each of
the 4 cubes around the edge:

* a cut edge's face is the surface quad itself (its 2 or 4 triangles);
* an uncut edge's face is a wall shared with the cell at the other end; the two cells are
  filled together by the 4 tetrahedra (node, node, point, next point) around the edge.

The point a cube gives for an edge (:func:`diffworld.geometry.flexicubes_tables.tet_tables`)
is the edge's dual vertex where the surface crosses it, else one point per inside component of
the cube: the dual vertex of the single surface piece bounding the component, or, where
several pieces bound it (tunnels, ambiguous faces), a *hub* at the mean of their dual
vertices (the centre, for a cube fully inside). Where two faces of a cell meet a grid face in
different points, a *connector* polygon on that grid face closes the gap, passing through the
hub when the two points are different pieces of one component, so that the cells meet along
hub edges and never overlap. Each connector is shared by two cells with opposite orientations,
so the boundary of the tet mesh is exactly the surface and its volume the surface's volume,
for any field. Connector polygons are fanned from a canonical point (the smallest hub id, else
the smallest id) so both cells split them the same way; their orientation is decided on an
idealized grid (each cube point a quarter of the way from the cube's centre to its edge), where
every cell is star-shaped around its node, so it does not depend on where weights and
deformation move the points.

Each cell is fanned from its node. A node that sits a hair inside the surface can lie outside
the dual surface (which cuts corners), or so close that its fan is flat; such nodes move (to
the best of a few candidate points, then a seeded random local search), and cells that still
cannot be fanned merge into a deeper neighbour's cell (:func:`_merge_step`). Where the dual
surface folds so that no placement helps (the stars' kernels are empty), the tets around the
trouble are replaced by a constrained tetrahedralization of the smallest surrounding region with
an embedded boundary (:mod:`diffworld.geometry.tet_remesh`, TetGen, optional extra ``tets``).
Tets whose volume stays at or below 1e-4 of a cell are reported with a warning: on resolved
shapes only positive ones, where the surface has a crease thinner than that (docs/isosurfaces.md
gives the measured rates).

Vertices are the surface vertices, then the inside nodes (deformed, or moved as above), the
centres of full cubes, the hubs, and points a re-fill added (each moves with the mean of its
region's boundary vertices); all are differentiable functions of the inputs (moves, merges and
re-fills are discrete choices, like the quad split of eval mode).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from diffworld.geometry import flexicubes_tables as tables
from diffworld.geometry.mc_tables import CORNER_OFFSETS, EDGE_AXIS, EDGE_CORNERS
from diffworld.geometry.tet_mesh import edge_mean_ratio
from diffworld.geometry.tet_remesh import remesh_bad_regions

__all__ = ["tetrahedralize"]


def _local_edge(axis: int, start_corner: int) -> int:
    for e in range(12):
        if int(EDGE_AXIS[e]) == axis and int(EDGE_CORNERS[e, 0]) == start_corner:
            return e
    raise KeyError((axis, start_corner))


def _face_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For the grid face normal to ``a`` between cube L (below) and U (above).

    Returns ``(corner, edges)``: ``corner`` (3, 4, 3) offsets of the face's 4 corner nodes from
    U's origin (counter-clockwise about +a); ``edges`` (3, 4, 2, 2) the local edge ids, in L and
    in U, of the two face edges at each corner (the edge along u, then along v).
    """
    corner = torch.zeros(3, 4, 3, dtype=torch.int64)
    edges = torch.zeros(3, 4, 2, 2, dtype=torch.int64)
    for a in range(3):
        u, v = (a + 1) % 3, (a + 2) % 3
        for q, (du, dv) in enumerate(((0, 0), (1, 0), (1, 1), (0, 1))):
            corner[a, q, u], corner[a, q, v] = du, dv
            for j, (axis, fixed, fixed_side) in enumerate(((u, v, dv), (v, u, du))):
                start = fixed_side << fixed  # the edge's start corner within the face
                edges[a, q, j, 0] = _local_edge(axis, start | (1 << a))  # L: the face is L's +a side
                edges[a, q, j, 1] = _local_edge(axis, start)  # U: the face is U's -a side
    return corner, edges


_FACE_CORNER, _FACE_EDGES = _face_tables()
# Edges leaving each cube corner (3 per corner): a node's cell points in each of its 8 cubes.
_CORNER_EDGES = torch.tensor([[e for e in range(12) if c in EDGE_CORNERS[e]] for c in range(8)], dtype=torch.int64)


class _CubePoints:
    """Point ids per (cube, local edge) for every cube with an inside corner, with idealized positions."""

    def __init__(self, cube_ids: torch.Tensor, table: torch.Tensor, res: tuple[int, int, int]):
        self.res = res
        self.lin = (cube_ids[:, 0] * res[1] + cube_ids[:, 1]) * res[2] + cube_ids[:, 2]  # sorted
        self.table = table  # (C, 12) int64, -1 where the edge has no inside corner
        dev = table.device
        self._mid = torch.as_tensor(CORNER_OFFSETS[EDGE_CORNERS[:, 0]] + CORNER_OFFSETS[EDGE_CORNERS[:, 1]],
                                    device=dev, dtype=torch.float64) / 2  # (12, 3) edge midpoints in a cube

    def index(self, cubes: torch.Tensor) -> torch.Tensor:
        """Rows of ``cubes`` (K, 3) in the table (they must hold an inside corner)."""
        key = (cubes[:, 0] * self.res[1] + cubes[:, 1]) * self.res[2] + cubes[:, 2]
        pos = torch.searchsorted(self.lin, key.contiguous()).clamp_max(self.lin.numel() - 1)
        if not bool((self.lin[pos] == key).all()):
            raise AssertionError("flexicubes tetrahedra: a cell reaches a cube with no inside corner")
        return pos

    def ids(self, cubes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return self.table[self.index(cubes), edges]

    def ideal(self, cubes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Idealized positions (grid units): a quarter of the way from the cube centre to the edge."""
        centre = cubes.to(torch.float64) + 0.5
        return centre + 0.25 * (cubes.to(torch.float64) + self._mid[edges] - centre)


def _polygon_tets(apex: torch.Tensor, poly: torch.Tensor, sign: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Tets fanning a polygon from one of its points, then to ``apex``.

    The fan must be canonical, so that the cell on the other side of the polygon splits it the
    same way and the two cells share whole triangles: it starts at the smallest hub id (the
    polygon's sides through a hub are shared with other cells' polygons, so no diagonal may
    join two points on either side of a hub), else at the smallest id. Triangles with a repeated
    id (where consecutive polygon points coincide) are dropped.

    Args:
        apex: (K,) vertex ids. poly: (K, n) vertex ids in order around the polygon. sign: (K,)
            bool, True where the polygon's order is positive as seen from the apex.
        first: (K, n) bool, the points a fan may start from (the hubs, or all).
    """
    K, n = poly.shape
    big = torch.iinfo(poly.dtype).max
    start = torch.where(first, poly, torch.full_like(poly, big)).argmin(1)
    r = (start[:, None] + torch.arange(n, device=poly.device)[None]) % n
    poly = torch.gather(poly, 1, r)
    out = []
    for i in range(1, n - 1):
        tri = poly[:, [0, i, i + 1]]
        tri = torch.where(sign[:, None], tri, tri[:, [0, 2, 1]])
        keep = (tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])
        out.append(torch.cat([apex[:, None], tri], 1)[keep])
    return torch.cat(out)


# Candidate moves of a near-surface node: (fraction towards its cell centre, fraction of that
# distance along the inward normal of its surface triangles).
_MOVES = ((0.0, 0.0), (0.25, 0.0), (0.5, 0.0), (0.75, 0.0), (1.0, 0.0), (0.0, 0.25), (0.0, 0.5),
          (0.5, 0.25), (0.5, 0.5), (1.0, 0.5), (1.0, 1.0))
# ... and steps along the grid axes, in cells (any direction may be the one that clears a fold).
_AXIS_STEPS = (0.15, 0.3)
_PLACEMENT_ROUNDS = 6  # rounds of placing nodes and merging cells
# A tet whose 6 x volume is at most this many cubed cells counts as flat (1e-4 of a cell's volume).
_MIN_DET = 6e-4
# Tets with a mean ratio under this are slivers the final pass tries to improve (1 = regular;
# a cube's 6-tet split gives 0.76), with this many random trials per radius (in cells): at 64^3
# it costs 0.3-1.3 s and lifts the sphere's worst tet from 0.02 to 0.22.
_SLIVER = 0.3
_SLIVER_TRIALS = 12
_SLIVER_RADII = (0.2, 0.1, 0.05)


@torch.no_grad()
def _place_nodes(positions: torch.Tensor, moves: torch.Tensor, movable: torch.Tensor, first_node: int,
                 tets: torch.Tensor, h: float, sweeps: int = 3) -> torch.Tensor:
    """Which candidate move each near-surface node takes: the one that maximizes the smallest
    signed volume of the tets around it (a few Jacobi sweeps, since neighbouring nodes move too).
    A discrete choice, like FlexiCubes' quad split: positions stay differentiable for a fixed
    choice.

    Args:
        positions: (W, 3) all tet vertices, nodes unmoved (ids ``first_node + i``).
        moves: (N, K, 3) candidate offsets per node (candidate 0: no move).
        movable: (N,) bool.
        tets: (T, 4) int64.

    Returns:
        (N,) int64 the chosen candidate per node (0 for nodes that do not move).
    """
    N, K = moves.shape[:2]
    choice = torch.zeros(N, dtype=torch.int64, device=positions.device)
    node_of = tets - first_node
    is_mov = (node_of >= 0) & (node_of < N)
    is_mov &= movable[node_of.clamp(0, N - 1)]
    tid, slot = torch.nonzero(is_mov, as_tuple=True)  # (tet, corner) pairs at a movable node
    if tid.numel() == 0:
        return choice
    owner = node_of[tid, slot]
    sub = tets[tid]
    rows = torch.arange(sub.shape[0], device=sub.device)
    for _ in range(sweeps):
        pos = positions.clone()
        pos[first_node:first_node + N] += moves[torch.arange(N, device=moves.device), choice]
        p = pos[sub]  # (P, 4, 3)
        worst = []
        for k in range(K):
            q = p.clone()
            q[rows, slot] = positions[first_node + owner] + moves[owner, k]
            worst.append(_node_score(torch.linalg.det(q[:, 1:] - q[:, :1]), owner, N, h))
        choice = torch.where(movable, torch.stack(worst, 1).argmax(1), choice)
    return choice


def _node_score(vol: torch.Tensor, owner: torch.Tensor, N: int, h: float,
                quality: torch.Tensor | None = None) -> torch.Tensor:
    """Per node, a score that orders first by fewer inverted tets, then by the larger smallest
    volume: ``-count + atan(min_volume / h^3) / pi`` (the second term lies in (-1/2, 1/2)); with
    ``quality`` (per tet, in [-1, 1]), by the larger smallest quality instead: ``-3 count + min``."""
    count = torch.zeros(N, dtype=vol.dtype, device=vol.device).index_add_(0, owner, (vol <= _MIN_DET * h ** 3).to(vol.dtype))
    if quality is not None:
        w = torch.full((N,), 1.0, dtype=vol.dtype, device=vol.device).scatter_reduce(0, owner, quality, "amin")
        return -3 * count + w
    w = torch.full((N,), float("inf"), dtype=vol.dtype, device=vol.device).scatter_reduce(0, owner, vol, "amin")
    return -count + torch.atan(w / h ** 3) / torch.pi


@torch.no_grad()
def _refine_nodes(positions: torch.Tensor, first_node: int, nodes: torch.Tensor, tets: torch.Tensor,
                  movable: torch.Tensor, h: float, trials: int = 48, radii: tuple[float, ...] = (0.3, 0.15, 0.07),
                  sliver: float | None = None) -> torch.Tensor:
    """Random local search for the nodes still in an inverted tet: offsets (N, 3) (zero elsewhere)
    that raise the smallest volume around each such node (seeded, so extraction is repeatable).
    ``radii`` are in cells. Nodes move by grid parity in turns: a tet holds at most two nodes,
    and those are grid neighbours, so nodes of one parity never share a tet. With ``sliver``,
    the nodes of tets whose mean ratio is below it move instead, to raise the smallest mean
    ratio around them without making any tet flat (a move is kept only if its node's score
    rises, so neither the flat count nor any node's worst quality can get worse)."""
    N = nodes.shape[0]
    parity = nodes.sum(1) % 2
    offset = torch.zeros((N, 3), dtype=positions.dtype, device=positions.device)
    if sliver is not None:
        p = positions[tets]
        bad = edge_mean_ratio(p[:, 1:] - p[:, :1])[0] < sliver
        del p
    else:
        bad = _signed_volumes(positions, tets) <= _MIN_DET * h ** 3
    ids = tets[bad].reshape(-1) - first_node
    ids = ids[(ids >= 0) & (ids < N)]
    todo = torch.zeros(N, dtype=torch.bool, device=positions.device)
    todo[ids] = True
    todo &= movable
    if not bool(todo.any()):
        return offset
    node_of = tets - first_node
    hit = (node_of >= 0) & (node_of < N)
    hit &= todo[node_of.clamp(0, N - 1)]
    tid, slot = torch.nonzero(hit, as_tuple=True)
    owner = node_of[tid, slot]
    sub = tets[tid]
    rows = torch.arange(sub.shape[0], device=sub.device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def worst(off: torch.Tensor) -> torch.Tensor:
        pos = positions.clone()
        pos[first_node:first_node + N] += offset
        p = pos[sub]
        p[rows, slot] = positions[first_node + owner] + off[owner]
        if sliver is not None:
            q, det = edge_mean_ratio(p[:, 1:] - p[:, :1])
            return _node_score(det, owner, N, h, quality=q)
        return _node_score(torch.linalg.det(p[:, 1:] - p[:, :1]), owner, N, h)

    for r in radii:
        for t in range(trials):
            current = worst(offset)
            step = (torch.rand((N, 3), generator=gen, dtype=positions.dtype) * 2 - 1).to(positions.device) * r * h
            trial = offset + step
            w = worst(trial)
            better = todo & (parity == t % 2) & (w > current)
            offset = torch.where(better[:, None], trial, offset)
    return offset


def _conforming(tets: torch.Tensor) -> bool:
    """Whether no face of ``tets`` is used by more than two of them, or twice the same way round."""
    if tets.shape[0] == 0:
        return True
    faces = torch.cat([tets[:, [1, 2, 3]], tets[:, [0, 3, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 1]]])
    key, order = faces.sort(1)
    parity = ((order[:, 0] > order[:, 1]).long() + (order[:, 0] > order[:, 2]).long()
              + (order[:, 1] > order[:, 2]).long()) % 2
    if int(key[:, 2].max()) < (1 << 21):
        # Vertex ids fit in 21 bits: a face is one int64 and the unique is 1-D (10x faster than
        # unique over rows, which dominated the merge loop).
        key = (key[:, 0] << 42) | (key[:, 1] << 21) | key[:, 2]
    _, inv, count = torch.unique(key, dim=0 if key.dim() > 1 else None, return_inverse=True, return_counts=True)
    signed = torch.zeros(count.shape[0], dtype=torch.int64, device=tets.device).index_add_(0, inv, 1 - 2 * parity)
    return not bool(((count > 2) | ((count == 2) & (signed != 0))).any())


def _signed_volumes(positions: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    p = positions[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1])


def _wall_volumes(apex: torch.Tensor, poly: torch.Tensor, apex_side_is_start: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Smallest signed volume (K,) of the tets fanning the wall polygons ``poly`` (K, 4) of uncut
    edges from ``apex`` (K,) vertex ids, on the side of the edge's start node or end node."""
    tets = []
    start = poly.argmin(1)
    r = (start[:, None] + torch.arange(4, device=poly.device)[None]) % 4
    p = torch.gather(poly, 1, r)
    out = torch.full((poly.shape[0],), float("inf"), dtype=positions.dtype, device=poly.device)
    for i in (1, 2):
        tri = p[:, [0, i, i + 1]]
        tri = torch.where(apex_side_is_start[:, None], tri, tri[:, [0, 2, 1]])
        out = torch.minimum(out, _signed_volumes(positions, torch.cat([apex[:, None], tri], 1)))
    del tets
    return out


def _grow_cluster(cluster: torch.Tensor, c: int, nodes: torch.Tensor, candidates: torch.Tensor,
                  positions: torch.Tensor, first_node: int, edge_a: torch.Tensor, edge_b: torch.Tensor,
                  edge_p: torch.Tensor, floor: float, steps: int = 3) -> torch.Tensor:
    """The nodes that merge into ``c`` with ``cluster`` (N,) bool: the cluster, its neighbours
    next to ``c`` (a wall between a cluster node and such a node lies beyond ``c``), and, a few
    steps out, the far node of any wall that ``c`` would see from the wrong side (near the
    surface, the wall between two nodes can lie along the surface instead of across the edge)."""
    grown = cluster.clone()
    grown[candidates[(nodes[candidates] - nodes[c]).abs().sum(1) == 1]] = True
    grown[c] = False
    for _ in range(steps):
        ext = grown[edge_a] ^ grown[edge_b]
        other = torch.where(grown[edge_a], edge_b, edge_a)
        ext &= other != c
        if not bool(ext.any()):
            break
        start_in = grown[edge_a][ext]
        worst = _wall_volumes(torch.full_like(other[ext], first_node + c), edge_p[ext], start_in, positions)
        wrong = worst <= floor
        if not bool(wrong.any()):
            break
        grown[other[ext][wrong]] = True
    return grown


@torch.no_grad()
def _merge_step(assemble: Callable[..., torch.Tensor], positions: torch.Tensor, first_node: int,
                edge_a: torch.Tensor, edge_b: torch.Tensor, edge_p: torch.Tensor, nodes: torch.Tensor,
                member: torch.Tensor, tets: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of cell merging. Returns ``(rep, member)``: ``rep`` (N,) int64 the node fanning
    each node's cell, ``member`` (N,) bool the nodes that ever were in an inverted tet.

    The nodes of inverted ``tets`` join ``member``; members form clusters (connected through
    uncut edges); each cluster merges into the inside neighbour ``c`` whose fan has the largest
    smallest volume, together with the further neighbours :func:`_grow_cluster` adds.
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    N = nodes.shape[0]
    dev = edge_a.device
    bad = _signed_volumes(positions, tets) <= floor
    ids = tets[bad].reshape(-1) - first_node
    member = member.clone()
    member[ids[(ids >= 0) & (ids < N)]] = True
    rep = torch.arange(N, device=dev)
    both = member[edge_a] & member[edge_b]
    idx = torch.nonzero(member).flatten()
    if idx.numel() == 0:
        return rep, member
    local = -np.ones(N, dtype=np.int64)
    local[idx.cpu().numpy()] = np.arange(idx.numel())
    ea, eb = edge_a[both].cpu().numpy(), edge_b[both].cpu().numpy()
    graph = coo_matrix((np.ones(len(ea)), (local[ea], local[eb])), shape=(idx.numel(),) * 2)
    _, label = connected_components(graph, directed=False)
    label = torch.as_tensor(label, device=dev)
    one_end = member[edge_a] ^ member[edge_b]
    inner = torch.where(member[edge_a], edge_a, edge_b)[one_end]
    outer = torch.where(member[edge_a], edge_b, edge_a)[one_end]
    inner_label = label[torch.searchsorted(idx, inner)]
    # Merges chosen this round: rep[i] != i marks members; is_target marks the fanning nodes.
    # A later cluster may join an earlier merge's target, but never take its nodes or target.
    is_target = torch.zeros(N, dtype=torch.bool, device=dev)
    for k in range(int(label.max()) + 1):
        cluster = torch.zeros(N, dtype=torch.bool, device=dev)
        cluster[idx[label == k]] = True
        candidates = torch.unique(outer[inner_label == k])
        best, best_s, best_c = -float("inf"), None, None
        for c in candidates.tolist():
            if int(rep[c]) != c:
                continue
            grown = _grow_cluster(cluster, c, nodes, candidates, positions, first_node, edge_a, edge_b, edge_p, floor)
            members = rep != torch.arange(N, device=dev)
            if bool((grown & ((members & (rep != c)) | is_target)).any()):
                continue  # it would take another merge's nodes: each region needs one fanning node
            trial = rep.clone()
            trial[grown] = c
            with_c = grown.clone()
            with_c[c] = True
            local = assemble(trial, with_c)
            if not _conforming(local):
                continue  # the merged region folds onto itself around c: not a cell c can fan
            v = _signed_volumes(positions, assemble(trial, grown))
            worst = float(v.min()) if v.numel() else float("inf")
            if worst > best:
                best, best_s, best_c = worst, grown, c
        if best_c is not None:
            rep[best_s] = best_c
            is_target[best_c] = True
    return rep, member


def tetrahedralize(*, inside: torch.Tensor, case: torch.Tensor, cubes: torch.Tensor, raw_case: torch.Tensor,
                   flipped: torch.Tensor, vert_of: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                   face_node: torch.Tensor, node_position: Callable[[torch.Tensor], torch.Tensor],
                   spacing: torch.Tensor, n_quads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a FlexiCubes surface with tetrahedra.

    Args:
        inside: (nx+1, ny+1, nz+1) bool, node value < 0.
        case: (nx, ny, nz) uint8 raw cube cases.
        cubes: (M, 3) int64 surface cubes (row-major order); raw_case (M,) their cases;
            flipped (M,) bool, using the complement's grouping (ambiguity rule).
        vert_of: (M, MAX_GROUPS) int64 dual-vertex id per (surface cube, group), -1 if none.
        vertices: (V, 3) surface vertices (dual vertices, then training centres).
        faces: (F, 3) int64 surface triangles, outward.
        face_node: (F, 3) int64 the inside grid node of the cut edge each triangle belongs to.
        n_quads: Q, the number of surface quads: triangle ``f`` belongs to quad ``f mod Q``.
        node_position: Maps node indices (K, 3) int64 to deformed positions (K, 3).
        spacing: (3,) grid spacing [m].

    Returns:
        ``(all_vertices, tets)``: (V + W, 3) the surface vertices followed by the interior ones,
        and (T, 4) int64 tetrahedra with positive orientation on the idealized grid and, on
        resolved shapes with the ``tets`` extra, in space (module docstring).
    """
    dev = vertices.device
    res = tuple(int(n) for n in case.shape)
    V = vertices.shape[0]
    offs = torch.as_tensor(CORNER_OFFSETS, device=dev)
    nodes = torch.nonzero(inside)
    N = nodes.shape[0]
    node_lin = (nodes[:, 0] * inside.shape[1] + nodes[:, 1]) * inside.shape[2] + nodes[:, 2]

    def face_node_idx(idx: torch.Tensor) -> torch.Tensor:
        """Row in ``nodes`` of grid nodes ``idx`` (K, 3) (inside nodes only)."""
        key = (idx[:, 0] * inside.shape[1] + idx[:, 1]) * inside.shape[2] + idx[:, 2]
        return torch.searchsorted(node_lin, key.contiguous())

    def node_id(idx: torch.Tensor) -> torch.Tensor:
        return V + face_node_idx(idx)

    # Cube points: centres of full cubes, then the hubs of components bounded by several pieces.
    full = torch.nonzero(case == 255)
    full_centre = node_position((full[:, None, :] + offs[None]).reshape(-1, 3)).reshape(-1, 8, 3).mean(1)
    full_id = V + N + torch.arange(full.shape[0], device=dev)
    slot_tab, groups_tab, corner_tab = (torch.as_tensor(t, device=dev) for t in tables.tet_tables())
    flip = flipped.to(torch.int64)
    slot = slot_tab[raw_case, flip].to(torch.int64)  # (M, 12)
    comp_groups = groups_tab[raw_case, flip]  # (M, MAX_GROUPS, MAX_GROUPS)
    has_hub = comp_groups.any(-1)  # (M, MAX_GROUPS)
    w = comp_groups[has_hub].to(vertices.dtype)
    hub_pos = (w[..., None] * vertices[vert_of[has_hub.nonzero()[:, 0]].clamp_min(0)]).sum(1) / w.sum(1, keepdim=True)
    hub_of = torch.full(has_hub.shape, -1, dtype=torch.int64, device=dev)
    hub_of[has_hub] = V + N + full.shape[0] + torch.arange(int(has_hub.sum()), device=dev)

    def resolve(s: torch.Tensor) -> torch.Tensor:
        """Slots (M, k) -> vertex ids (-1 stays -1)."""
        g = torch.gather(vert_of, 1, s.clamp(0, tables.MAX_GROUPS - 1))
        h = torch.gather(hub_of, 1, (s - tables.MAX_GROUPS).clamp(0, tables.MAX_GROUPS - 1))
        return torch.where(s < 0, torch.full_like(s, -1), torch.where(s < tables.MAX_GROUPS, g, h))

    edge_table = torch.cat([resolve(slot), full_id[:, None].expand(-1, 12)])
    hub_table = torch.cat([resolve(corner_tab[raw_case, flip].to(torch.int64)),
                           torch.full((full.shape[0], 8), -1, dtype=torch.int64, device=dev)])
    all_cubes = torch.cat([cubes, full])
    lin = (all_cubes[:, 0] * res[1] + all_cubes[:, 1]) * res[2] + all_cubes[:, 2]
    order = torch.argsort(lin)
    pts = _CubePoints(all_cubes[order], edge_table[order], res)
    hub_table = hub_table[order]
    point_pos = torch.cat([vertices, vertices.new_zeros((N, 3)), full_centre, hub_pos])

    # The pieces, before choosing where each cell's fan starts: fans (apex node, triangle) and,
    # for each uncut inside edge, its two nodes and the 4 cube points around it.
    fan_apex, fan_tri = [face_node_idx(face_node)], [faces]
    # 1. The surface: each triangle with the inside node of its cut edge (above).

    # 2. Uncut inside edges: nodes (a, b) and the points P_q counter-clockwise about a -> b.
    quad_tab = torch.as_tensor(tables.QUAD_CUBES, device=dev)
    edge_a, edge_b, edge_p = [], [], []
    for a in range(3):
        n0 = inside.narrow(a, 0, inside.shape[a] - 1)
        n1 = inside.narrow(a, 1, inside.shape[a] - 1)
        start = torch.nonzero(n0 & n1)
        if start.shape[0] == 0:
            continue
        step = torch.zeros(3, dtype=torch.int64, device=dev)
        step[a] = 1
        edge_a.append(face_node_idx(start))
        edge_b.append(face_node_idx(start + step))
        edge_p.append(torch.stack([pts.ids(start + quad_tab[a, q, :3], quad_tab[a, q, 3].expand(start.shape[0]))
                                   for q in range(4)], 1))
    z = torch.zeros(0, dtype=torch.int64, device=dev)
    edge_a = torch.cat(edge_a) if edge_a else z
    edge_b = torch.cat(edge_b) if edge_b else z
    edge_p = torch.cat(edge_p) if edge_p else z.reshape(0, 4)

    # 3. Connectors across the grid faces of surface cubes: between the two face edges at an
    # inside corner whose points differ on one side, passing through that side's hub when the
    # two points are different points of a component bounded by several surface pieces.
    face_keys = []
    for a in range(3):
        below = cubes.clone()
        below[:, a] -= 1  # the face under each cube has the cube below as its lower cube
        for lower in (cubes, below):
            face_keys.append(torch.cat([torch.full_like(lower[:, :1], a), lower], 1))
    fk = torch.unique(torch.cat(face_keys), dim=0)
    axis, low = fk[:, 0], fk[:, 1:]
    up = low + torch.nn.functional.one_hot(axis, 3)
    ok = (low >= 0).all(1) & (up < torch.tensor(res, device=dev)).all(1)
    axis, low, up = axis[ok], low[ok], up[ok]
    corner = _FACE_CORNER.to(dev)[axis]  # (K, 4, 3)
    fedges = _FACE_EDGES.to(dev)[axis]  # (K, 4, 2, 2)
    for q in range(4):
        node = up + corner[:, q]
        sel = inside[node[:, 0], node[:, 1], node[:, 2]]
        if not bool(sel.any()):
            continue
        n, fe = node[sel], fedges[sel, q]
        rows = (pts.index(low[sel]), pts.index(up[sel]))
        p = [[pts.table[rows[s], fe[:, j, s]] for s in (0, 1)] for j in (0, 1)]  # p[j][side]
        # The hub of the node's component on each side (the node is a corner of both cubes).
        hub = []
        for s, c in ((0, low[sel]), (1, up[sel])):
            local = ((n - c) * torch.tensor([1, 2, 4], device=dev)).sum(1)
            h = hub_table[rows[s], local]
            via = (p[0][s] != p[1][s]) & (h >= 0) & (p[0][s] != h) & (p[1][s] != h)
            hub.append(torch.where(via, h, p[1][s] if s == 1 else p[0][s]))
        # Around the connector: L1, U1, (U hub), U2, L2, (L hub); a missing hub repeats a neighbour.
        poly = torch.stack([p[0][0], p[0][1], hub[1], p[1][1], p[1][0], hub[0]], 1)
        ideal = [pts.ideal(low[sel], fe[:, 0, 0]), pts.ideal(up[sel], fe[:, 0, 1]), pts.ideal(up[sel], fe[:, 1, 1])]
        d = torch.stack(ideal, 1) - n.to(torch.float64)[:, None]
        sign = torch.linalg.det(d) > 0  # orientation of L1 -> U1 -> U2 seen from the node
        is_hub = torch.stack([torch.zeros_like(sign), torch.zeros_like(sign), hub[1] != p[1][1],
                              torch.zeros_like(sign), torch.zeros_like(sign), hub[0] != p[0][0]], 1)
        first = torch.where(is_hub.any(1, keepdim=True), is_hub, torch.ones_like(is_hub))
        t = _polygon_tets(face_node_idx(n), poly, sign, first)
        fan_apex.append(t[:, 0])
        fan_tri.append(t[:, 1:])
    fan_apex, fan_tri = torch.cat(fan_apex), torch.cat(fan_tri)

    def assemble(rep: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
        """Tets with node ``i``'s cell fanned from node ``rep[i]`` (itself, or the neighbour it
        merged into). An uncut edge whose two cells keep their own nodes gives the 4 tets around
        it; where a node merged, each side is fanned from its node over the canonical split of
        the 4 points; an edge inside one merged cell gives nothing. ``only`` (N,) bool limits
        the result to the pieces of those nodes' cells."""
        fa, ft, ea, eb, ep = fan_apex, fan_tri, edge_a, edge_b, edge_p
        if only is not None:
            f_sel, e_sel = only[fa], only[ea] | only[eb]
            fa, ft, ea, eb, ep = fa[f_sel], ft[f_sel], ea[e_sel], eb[e_sel], ep[e_sel]
        fans = torch.cat([(V + rep[fa])[:, None], ft], 1)
        moved = rep[fa] != fa
        if bool(moved.any()):
            # A face between a merged cell and the cell it merged into (a connector) now appears
            # twice in one fan, with opposite orientations: both copies go.
            target = torch.zeros(N, dtype=torch.bool, device=dev)
            target[rep[fa][moved]] = True
            at_target = target[rep[fa]]
            key = fans[at_target].sort(1).values
            _, inv, cnt = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
            keep = torch.ones(fans.shape[0], dtype=torch.bool, device=dev)
            keep[at_target] = cnt[inv] == 1
            fans = fans[keep]
        out = [fans]
        ra, rb = rep[ea], rep[eb]
        whole = (ra == ea) & (rb == eb)
        ia, ib, p = V + ea[whole], V + eb[whole], ep[whole]
        out += [torch.stack([ia, ib, p[:, q], p[:, (q + 1) % 4]], 1) for q in range(4)]
        split = ~whole & (ra != rb)
        if bool(split.any()):
            p = ep[split]
            ones = torch.ones(p.shape[0], dtype=torch.bool, device=dev)
            out.append(_polygon_tets(V + ra[split], p, ones, torch.ones_like(p, dtype=torch.bool)))
            out.append(_polygon_tets(V + rb[split], p, ~ones, torch.ones_like(p, dtype=torch.bool)))
        return torch.cat(out)

    identity = torch.arange(N, device=dev)
    # Inside nodes. A node whose cell reaches the surface may lie outside the extracted surface
    # (the dual surface is smoother than the node signs), or so close to it that its fan is
    # flat. Two remedies, alternated until no tet is inverted (the best round is kept):
    # such a node's vertex moves (towards its cell's centre, inwards, or along an axis: the
    # candidate that makes its worst tet best, :func:`_place_nodes`), and cells that still
    # cannot be fanned merge into a deeper neighbour's (:func:`_merge_step`). Deeper nodes keep
    # their (deformed) grid positions.
    near = torch.zeros(N, dtype=torch.bool, device=dev)
    padded = torch.nn.functional.pad(inside, (1, 1, 1, 1, 1, 1), value=False)
    for a in range(3):
        for d in (-1, 1):
            nb = nodes + 1
            nb[:, a] += d
            near |= ~padded[nb[:, 0], nb[:, 1], nb[:, 2]]
    node_pos0 = node_position(nodes)
    moves = [torch.zeros_like(node_pos0)]
    if bool(near.any()):
        ce = _CORNER_EDGES.to(dev)
        b_nodes = nodes[near]
        ids = torch.stack([pts.ids(b_nodes - offs[c], ce[c, j].expand(b_nodes.shape[0]))
                           for c in range(8) for j in range(3)], 1)  # (B, 24)
        toward = torch.zeros_like(node_pos0)
        toward[near] = point_pos[ids].mean(1) - node_pos0[near]
        # Inward: minus the summed area-weighted normals of the node's surface triangles.
        tri = vertices[faces]
        area_n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
        inward = torch.zeros_like(node_pos0).index_add_(0, face_node_idx(face_node), -area_n)
        inward = inward / inward.norm(dim=1, keepdim=True).clamp_min(1e-30) * toward.norm(dim=1, keepdim=True)
        moves = [lam * toward + mu * inward for lam, mu in _MOVES]
        for step in _AXIS_STEPS:
            for a in range(3):
                for sgn in (-1.0, 1.0):
                    m = torch.zeros_like(node_pos0)
                    m[:, a] = sgn * step * spacing[a]
                    moves.append(m)
    fixed = torch.cat([point_pos[:V], node_pos0, point_pos[V + N:]]).detach()

    rep, member = identity, torch.zeros(N, dtype=torch.bool, device=dev)
    floor = _MIN_DET * float(spacing.min()) ** 3  # tets at or below this count as flat
    best = first = None
    for _ in range(_PLACEMENT_ROUNDS):
        tets = assemble(rep)
        # Nodes fanning merged cells may also slide towards the centre of the nodes they took.
        merged = rep != identity
        target = torch.zeros(N, dtype=torch.bool, device=dev)
        target[rep[merged]] = True
        count = torch.zeros(N, dtype=node_pos0.dtype, device=dev).index_add_(0, rep, torch.ones_like(node_pos0[:, 0]))
        centre = torch.zeros_like(node_pos0).index_add_(0, rep, node_pos0) / count[:, None]
        to_centre = torch.where(target[:, None], centre - node_pos0, torch.zeros_like(node_pos0))
        cand = torch.stack(moves + [lam * to_centre for lam in (0.25, 0.5, 0.75, 1.0)], 1)  # (N, K, 3)
        # Only nodes of inverted tets move: the others keep their places (and the work stays
        # proportional to the trouble, not to the surface).
        vol0 = _signed_volumes(fixed, tets)
        in_bad = torch.zeros(N, dtype=torch.bool, device=dev)
        ids = tets[vol0 <= floor].reshape(-1) - V
        in_bad[ids[(ids >= 0) & (ids < N)]] = True
        movable = in_bad & (near | target) & (rep == identity)
        pick = _place_nodes(fixed, cand.detach(), movable, V, tets, float(spacing.min()))
        node_pos = node_pos0 + cand[identity, pick]
        positions = torch.cat([point_pos[:V], node_pos, point_pos[V + N:]]).detach()
        extra = _refine_nodes(positions, V, nodes, tets, movable, float(spacing.min()))
        node_pos = node_pos + extra
        positions[V:V + N] += extra
        n_bad = int((_signed_volumes(positions, tets) <= floor).sum())
        if best is None or n_bad < best[0]:
            best = (n_bad, tets, node_pos)
        if first is None:
            first = best
        if n_bad == 0:
            break
        rep, member = _merge_step(assemble, positions, V, edge_a, edge_b, edge_p, nodes, member, tets, floor)
    n_bad, tets, node_pos = best
    if best is not first and not _conforming(tets):
        n_bad, tets, node_pos = first  # merges that interact badly: the unmerged mesh is always conforming
    # Slivers: a surface triangle fanned from a node that lies nearly in its plane is a valid but
    # flat-shaped tet (without this pass, mean ratio under 0.1 for 0.05-0.09 % of the tets of
    # curved shapes at 64^3), bad for FEM conditioning. The same local search, scored by mean
    # ratio, moves those nodes; the offsets are constants, so positions stay differentiable.
    positions = torch.cat([point_pos[:V], node_pos, point_pos[V + N:]]).detach()
    used = torch.zeros(N, dtype=torch.bool, device=dev)
    node_ids = tets.reshape(-1) - V
    used[node_ids[(node_ids >= 0) & (node_ids < N)]] = True
    node_pos = node_pos + _refine_nodes(positions, V, nodes, tets, used, float(spacing.min()), trials=_SLIVER_TRIALS,
                                        radii=_SLIVER_RADII, sliver=_SLIVER)
    all_vertices = torch.cat([vertices, node_pos, full_centre, hub_pos])
    positions = all_vertices.detach()
    if bool((_signed_volumes(positions, tets) <= floor).any()):
        # What the local search left (the fans of a few nodes overlap a fold of the surface):
        # the tets around them are replaced by a constrained fill of an embedded region
        # (tet_remesh). Points TetGen adds inside move with the mean of their region's boundary.
        fix = remesh_bad_regions(positions.double().cpu().numpy(), tets.cpu().numpy(), V, floor)
        tets = torch.as_tensor(fix.tets, device=dev)
        if fix.steiner.shape[0]:
            shift = torch.stack([all_vertices[torch.as_tensor(a, device=dev)].mean(0) for a in fix.steiner_anchors])
            steiner = torch.as_tensor(fix.steiner, dtype=all_vertices.dtype, device=dev)
            all_vertices = torch.cat([all_vertices, steiner + shift - shift.detach()])
        positions = all_vertices.detach()
        # Counted after every pass, so the warning names only tets that remain.
        n_bad = int((_signed_volumes(positions, tets) <= floor).sum())
        if n_bad:
            warnings.warn(f"flexicubes: {n_bad} of {tets.shape[0]} tetrahedra are flat or inverted (volume under "
                          f"1e-4 of a cell) and could not be re-meshed: {fix.reason}", stacklevel=3)
    # Vertices no tet uses (merged nodes, hubs no connector or wall needed) are dropped.
    used = torch.zeros(all_vertices.shape[0], dtype=torch.bool, device=dev)
    used[tets.reshape(-1)] = True
    used[:V] = True
    if not bool(used.all()):
        remap = torch.cumsum(used, 0) - 1
        tets = remap[tets]
        all_vertices = all_vertices[used]
    return all_vertices, tets
