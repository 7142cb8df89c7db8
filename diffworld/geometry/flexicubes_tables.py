"""FlexiCubes lookup tables, generated from diffworld's own marching-cubes contours (no copied tables).

FlexiCubes (Shen et al. 2023) places one *dual vertex* per connected piece of a cube's surface.
The pieces of a cube case are the closed contour loops of its marching-cubes triangulation
(:func:`diffworld.geometry.mc_tables.case_loops`): the cut edges of one loop form one group, and
the dual vertex is a weighted mean of the crossings on those edges. Over the 256 cases the number
of groups is 0 (2 cases), 1 (162), 2 (82), 3 (8) or 4 (2); a group holds 3 to 7 edges.

Ambiguity. diffworld's contours connect the inside corners across an ambiguous face (two diagonal
corners inside). For 36 cases this makes one group where the complement case (inside and outside
swapped) has two: the case has exactly one ambiguous face and its single group spans it. When
the neighbouring cube across that face is such a case too, both cubes would put one vertex on
each side of a face whose contour has two separate segments, and the quads around the face's
cut edges would meet in a non-manifold way. FlexiCubes then groups the cube's edges as the
complement case does (two vertices). :data:`AMBIGUOUS_FACE` names that face per case, and
:func:`resolved_case` applies the rule.

Conventions (those of :mod:`diffworld.geometry.mc_tables`): corner ``c`` at offset
``(c & 1, (c >> 1) & 1, (c >> 2) & 1)``; a corner is inside when its value is ``< 0``;
``case = sum(inside_c << c)``; edges 0-3 along x, 4-7 along y, 8-11 along z. Cube faces are
numbered ``2 * axis + side`` (face 0: x = 0, face 1: x = 1, ... face 5: z = 1).
"""

from __future__ import annotations

import functools

import numpy as np

from diffworld.geometry.mc_tables import CORNER_OFFSETS, EDGE_CORNERS, case_loops

__all__ = [
    "AMBIGUOUS_FACE",
    "FACE_CORNERS",
    "MAX_GROUPS",
    "MAX_GROUP_EDGES",
    "QUAD_CUBES",
    "cut_edges",
    "dual_tables",
    "resolved_case",
]

MAX_GROUPS = 4  # the most dual vertices any case has
MAX_GROUP_EDGES = 7  # the most cut edges one dual vertex gathers

# Corners of face 2 * axis + side: those whose coordinate along `axis` equals `side`.
FACE_CORNERS = np.array([[c for c in range(8) if CORNER_OFFSETS[c, axis] == side]
                         for axis in range(3) for side in (0, 1)], dtype=np.int64)


def _ambiguous_faces(case: int) -> list[int]:
    """Faces of ``case`` whose inside corners are exactly one diagonal pair."""
    out = []
    for f, corners in enumerate(FACE_CORNERS):
        inside = [c for c in corners if (case >> int(c)) & 1]
        if len(inside) == 2:
            a, b = inside
            if int(np.abs(CORNER_OFFSETS[a] - CORNER_OFFSETS[b]).sum()) == 2:  # diagonal, not an edge
                out.append(f)
    return out


def _build_ambiguous_face() -> np.ndarray:
    face = -np.ones(256, dtype=np.int64)
    for case in range(256):
        if len(case_loops(case)) == 1 and len(case_loops(255 - case)) == 2:
            faces = _ambiguous_faces(case)
            if len(faces) != 1:
                raise AssertionError(f"case {case}: expected one ambiguous face, got {faces}")
            face[case] = faces[0]
    return face


AMBIGUOUS_FACE = _build_ambiguous_face()
"""int64 (256,): the single ambiguous face of the 36 cases whose one group FlexiCubes may split,
else -1."""


def resolved_case(case: np.ndarray | int, neighbour_case: np.ndarray | int) -> np.ndarray:
    """The case whose grouping a cube uses, given the case of its neighbour across its ambiguous face.

    Args:
        case: Cube cases, int array (any shape) or int.
        neighbour_case: Case of the neighbour across ``AMBIGUOUS_FACE[case]`` (same shape; ignored
            where that is -1).

    Returns:
        ``255 - case`` where both the cube and that neighbour are flagged, else ``case``.
    """
    case = np.asarray(case, dtype=np.int64)
    neighbour_case = np.asarray(neighbour_case, dtype=np.int64)
    flip = (AMBIGUOUS_FACE[case] >= 0) & (AMBIGUOUS_FACE[neighbour_case] >= 0)
    return np.where(flip, 255 - case, case)


@functools.lru_cache(maxsize=None)
def dual_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dual-vertex tables of the 256 cases.

    Returns:
        ``(count, group_edges, edge_group)``:

        * ``count`` int32 (256,): dual vertices (groups) of the case;
        * ``group_edges`` int32 (256, MAX_GROUPS, MAX_GROUP_EDGES): the cut edges of each group
          in contour order, -1 padded;
        * ``edge_group`` int32 (256, 12): the group that owns each edge, -1 for edges that the
          surface does not cross.
    """
    count = np.zeros(256, dtype=np.int32)
    group_edges = -np.ones((256, MAX_GROUPS, MAX_GROUP_EDGES), dtype=np.int32)
    edge_group = -np.ones((256, 12), dtype=np.int32)
    for case in range(256):
        loops = case_loops(case)
        if len(loops) > MAX_GROUPS:
            raise AssertionError(f"case {case}: {len(loops)} groups")
        count[case] = len(loops)
        for g, loop in enumerate(loops):
            if len(loop) > MAX_GROUP_EDGES:
                raise AssertionError(f"case {case}: a group of {len(loop)} edges")
            group_edges[case, g, : len(loop)] = loop
            edge_group[case, list(loop)] = g
    return count, group_edges, edge_group


def _quad_cubes() -> np.ndarray:
    """The 4 cubes around a grid edge, counter-clockwise about the edge's axis (see QUAD_CUBES)."""
    from diffworld.geometry.mc_tables import EDGE_AXIS

    out = np.zeros((3, 4, 4), dtype=np.int64)
    for a in range(3):
        u, v = (a + 1) % 3, (a + 2) % 3  # (a, u, v) right-handed: counter-clockwise about +a in (u, v)
        # Cube centres relative to the edge sit at (0.5 - du, 0.5 - dv) in (u, v): angles 45, 135,
        # 225, 315 degrees for these offsets.
        for q, (du, dv) in enumerate(((0, 0), (1, 0), (1, 1), (0, 1))):
            offset = np.zeros(3, dtype=np.int64)
            offset[u], offset[v] = -du, -dv
            corner = (du << u) | (dv << v)  # the edge's start node, as a corner of that cube
            local = [e for e in range(12) if EDGE_AXIS[e] == a and EDGE_CORNERS[e, 0] == corner]
            out[a, q, :3], out[a, q, 3] = offset, local[0]
    return out


QUAD_CUBES = _quad_cubes()
"""int64 (3, 4, 4): for a grid edge along axis ``a`` starting at node ``n``, row ``QUAD_CUBES[a, q]``
= (cube offset x, y, z, local edge id): cube ``n + offset`` holds the edge as its edge ``local``.
The 4 cubes run counter-clockwise about +a, so their dual vertices in this order make a quad
whose normal points along +a: keep the order when the edge's start node is inside (the field
grows along +a), reverse it otherwise."""


def cut_edges(case: int) -> np.ndarray:
    """Edges of a case whose two corners differ in sign, int64 (k,)."""
    inside = np.array([(case >> c) & 1 for c in range(8)])
    return np.nonzero(inside[EDGE_CORNERS[:, 0]] != inside[EDGE_CORNERS[:, 1]])[0]


def _inside_components(case: int, grouping: int) -> list[list[int]]:
    """Inside corners of ``case`` grouped by connectivity inside the cube.

    Corners joined by an edge with both ends inside are connected; two diagonal inside corners
    of an ambiguous face are connected unless the contour of ``grouping`` (the case whose loops
    the cube uses, see :func:`resolved_case`) cuts one of them off on that face.
    """
    inside = [(case >> c) & 1 for c in range(8)]
    parent = list(range(8))

    def root(c: int) -> int:
        while parent[c] != c:
            c = parent[c]
        return c

    for a, b in EDGE_CORNERS:
        if inside[a] and inside[b]:
            parent[root(int(a))] = root(int(b))
    segments = set()  # contour segments as unordered pairs of consecutive loop edges
    for loop in case_loops(grouping):
        for i, e in enumerate(loop):
            segments.add(frozenset((e, loop[(i + 1) % len(loop)])))
    for f in _ambiguous_faces(case):
        a, c = (int(x) for x in FACE_CORNERS[f] if inside[x])
        a_edges = frozenset(e for e in range(12) if a in EDGE_CORNERS[e] and set(EDGE_CORNERS[e]) <= set(FACE_CORNERS[f]))
        if a_edges not in segments:  # the contour does not cut corner a off: a and c meet across the face
            parent[root(a)] = root(c)
    groups: dict[int, list[int]] = {}
    for c in range(8):
        if inside[c]:
            groups.setdefault(root(c), []).append(c)
    return list(groups.values())


@functools.lru_cache(maxsize=None)
def tet_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which point of a cube the tetrahedral interior uses on each edge.

    The interior of a FlexiCubes surface is filled cell by cell around the inside grid nodes
    (:mod:`diffworld.geometry.flexicubes_tets`). Each cell needs, in every cube around its node and
    for every cube edge leaving the node, one point of that cube: the edge's dual vertex when the
    surface crosses the edge, else a point shared by the whole inside component of the cube that
    holds the edge. A component bounded by one surface piece uses that piece's dual vertex; a
    component bounded by several (or none: a cube fully inside) gets its own point, a *slot*
    ``MAX_GROUPS + k``.

    Returns:
        ``(slot, slot_groups)``:

        * ``slot`` int8 (256, 2, 12), indexed by (raw case, flipped to the complement's grouping,
          edge): -1 for edges with no inside corner, ``g < MAX_GROUPS`` for dual vertex ``g``,
          ``MAX_GROUPS + k`` for the component point ``k``;
        * ``slot_groups`` bool (256, 2, MAX_GROUPS, MAX_GROUPS): the dual vertices whose mean
          places component point ``k`` (none for the full cube: its centre is used);
        * ``corner_slot`` int8 (256, 2, 8): the component point of each inside corner's
          component, -1 where that component is bounded by a single surface piece.
    """
    _, _, edge_group = dual_tables()
    slot = -np.ones((256, 2, 12), dtype=np.int8)
    corner_slot = -np.ones((256, 2, 8), dtype=np.int8)
    slot_groups = np.zeros((256, 2, MAX_GROUPS, MAX_GROUPS), dtype=bool)
    for case in range(1, 256):
        for flip in (0, 1):
            grouping = 255 - case if flip else case
            if flip and AMBIGUOUS_FACE[case] < 0:
                continue  # never used: only flagged cases flip
            k = 0
            for comp in _inside_components(case, grouping):
                touched = sorted({int(edge_group[grouping, e]) for e in range(12)
                                  if (EDGE_CORNERS[e, 0] in comp) != (EDGE_CORNERS[e, 1] in comp)})
                for e in range(12):
                    a, b = (int(x) for x in EDGE_CORNERS[e])
                    if a in comp and b in comp:
                        if len(touched) == 1:
                            slot[case, flip, e] = touched[0]
                        else:
                            slot[case, flip, e] = MAX_GROUPS + k
                    elif a in comp or b in comp:
                        slot[case, flip, e] = edge_group[grouping, e]
                if len(touched) != 1:
                    if k >= MAX_GROUPS:
                        raise AssertionError(f"case {case}: more than {MAX_GROUPS} component points")
                    slot_groups[case, flip, k, touched] = True
                    corner_slot[case, flip, comp] = MAX_GROUPS + k
                    k += 1
    return slot, slot_groups, corner_slot
