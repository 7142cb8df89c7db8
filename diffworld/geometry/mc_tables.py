"""Marching-cubes lookup tables, generated from first principles (no copied tables).

Conventions (shared by every isosurface in diffworld):

* corner ``c`` of a cube sits at offset ``(c & 1, (c >> 1) & 1, (c >> 2) & 1)``;
* a corner is *inside* when its value is ``< 0``; ``case = sum(inside_c << c)``;
* edges are numbered by axis: 0-3 along x, 4-7 along y, 8-11 along z. Edge ``e`` starts at the
  corner :data:`EDGE_CORNERS` ``[e][0]`` (the lower one) and runs along :data:`EDGE_AXIS` ``[e]``.

Ambiguous faces (two diagonal corners inside, the other two outside) are resolved by sign only:
the inside corners are always connected across the face. The rule looks only at the face's four
corners, which both neighbouring cubes share, so neighbours always agree and the assembled
surface has no cracks. Each cube's contour on its boundary is traced into closed loops, oriented
so that triangle normals point towards positive values, and each loop is triangulated with the
minimum-total-diagonal-length triangulation (computed with the corner-midpoint geometry).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

__all__ = [
    "CORNER_OFFSETS",
    "EDGE_AXIS",
    "EDGE_CORNERS",
    "MAX_TRIANGLES",
    "case_loops",
    "triangle_table",
]

CORNER_OFFSETS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)


def _edges() -> tuple[np.ndarray, np.ndarray]:
    corners, axes = [], []
    for axis in range(3):
        bit = 1 << axis
        for c in range(8):
            if not c & bit:
                corners.append((c, c | bit))
                axes.append(axis)
    return np.array(corners, dtype=np.int64), np.array(axes, dtype=np.int64)


EDGE_CORNERS, EDGE_AXIS = _edges()
MAX_TRIANGLES = 5  # the most triangles any case needs (asserted when the table is built)


def _faces() -> list[tuple[np.ndarray, list[int]]]:
    """The 6 faces: (outward normal, corners in cyclic order)."""
    faces = []
    for axis in range(3):
        for side in (0, 1):
            normal = np.zeros(3)
            normal[axis] = 1.0 if side else -1.0
            corners = [c for c in range(8) if CORNER_OFFSETS[c, axis] == side]
            # Order the 4 corners cyclically around the face centre.
            centre = CORNER_OFFSETS[corners].mean(0)
            u, v = [a for a in range(3) if a != axis]
            corners.sort(key=lambda c: np.arctan2(CORNER_OFFSETS[c, v] - centre[v], CORNER_OFFSETS[c, u] - centre[u]))
            faces.append((normal, corners))
    return faces


_FACES = _faces()


def _edge_of(a: int, b: int) -> int:
    for e, (c0, c1) in enumerate(EDGE_CORNERS):
        if {a, b} == {int(c0), int(c1)}:
            return e
    raise KeyError((a, b))


_MID = (CORNER_OFFSETS[EDGE_CORNERS[:, 0]] + CORNER_OFFSETS[EDGE_CORNERS[:, 1]]) / 2.0


def _face_segments(case: int, normal: np.ndarray, corners: list[int]) -> list[tuple[int, int]]:
    """Oriented contour segments (edge_from, edge_to) on one face."""
    inside = [(case >> c) & 1 for c in corners]
    cut = [i for i in range(4) if inside[i] != inside[(i + 1) % 4]]  # face edge i joins corner i, i+1
    if not cut:
        return []
    edges = [_edge_of(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    if len(cut) == 2:
        pairs = [(cut[0], cut[1])]
    else:
        # Ambiguous face: connect the inside corners, i.e. cut off each outside corner k with the
        # segment between the two face edges that meet at k (face edges k-1 and k).
        outside = [k for k in range(4) if not inside[k]]
        pairs = [((k - 1) % 4, k) for k in outside]
    segments = []
    for i, j in pairs:
        p, q = edges[i], edges[j]
        # Reference corner: the corner that both face edges share when adjacent, else corner i.
        shared = set((i, (i + 1) % 4)) & set((j, (j + 1) % 4))
        k = shared.pop() if shared else i
        ref = CORNER_OFFSETS[corners[k]]
        d = _MID[q] - _MID[p]
        side = np.dot(np.cross(normal, d), ref - _MID[p])
        # n x d must point to the positive (outside) region.
        ref_outside = not inside[k]
        if (side > 0) != ref_outside:
            p, q = q, p
        segments.append((p, q))
    return segments


@functools.lru_cache(maxsize=None)
def case_loops(case: int) -> tuple[tuple[int, ...], ...]:
    """Closed, oriented contour loops (sequences of edge ids) of one cube case."""
    nxt: dict[int, int] = {}
    for normal, corners in _FACES:
        for p, q in _face_segments(case, normal, corners):
            if p in nxt:
                raise AssertionError(f"case {case}: edge {p} leaves twice")
            nxt[p] = q
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, e = [], start
        while e not in seen:
            seen.add(e)
            loop.append(e)
            e = nxt[e]
        if e != start:
            raise AssertionError(f"case {case}: contour does not close")
        loops.append(tuple(loop))
    return tuple(loops)


def _edge_faces() -> list[set[int]]:
    """The two cube faces each edge lies on."""
    out = []
    for a, b in EDGE_CORNERS:
        out.append({f for f, (_, corners) in enumerate(_FACES) if int(a) in corners and int(b) in corners})
    return out


_EDGE_FACES = _edge_faces()


def _triangulate(loop: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Minimum total diagonal length triangulation of a loop (keeps loop orientation).

    A diagonal between two edges on a common cube face is forbidden: the neighbouring cube
    could pick the same one and the mesh edge would then have four triangles.
    """
    n = len(loop)
    if n == 3:
        return [tuple(loop)]
    pts = _MID[list(loop)]
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    for a in range(n):
        for b in range(n):
            if abs(a - b) not in (1, n - 1) and _EDGE_FACES[loop[a]] & _EDGE_FACES[loop[b]]:
                dist[a, b] = np.inf
    cost = np.zeros((n, n))
    split = np.zeros((n, n), dtype=np.int64)
    for gap in range(2, n):
        for i in range(n - gap):
            j = i + gap
            best, arg = np.inf, -1
            for k in range(i + 1, j):
                c = cost[i, k] + cost[k, j] + (dist[i, k] if k - i > 1 else 0.0) + (dist[k, j] if j - k > 1 else 0.0)
                if c < best - 1e-12:
                    best, arg = c, k
            cost[i, j], split[i, j] = best, arg
    if not np.isfinite(cost[0, n - 1]):
        raise AssertionError(f"loop {loop} has no triangulation without same-face diagonals")
    tris: list[tuple[int, int, int]] = []

    def emit(i: int, j: int) -> None:
        if j - i < 2:
            return
        k = int(split[i, j])
        tris.append((loop[i], loop[k], loop[j]))
        emit(i, k)
        emit(k, j)

    emit(0, n - 1)
    return tris


@functools.lru_cache(maxsize=None)
def triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """The 256-case triangle table.

    Returns:
        ``(tris, counts)``: ``tris`` int32 of shape (256, MAX_TRIANGLES, 3) holding edge ids
        (unused rows -1), ``counts`` int32 of shape (256,) with the triangle count per case.
    """
    tris = -np.ones((256, MAX_TRIANGLES, 3), dtype=np.int32)
    counts = np.zeros(256, dtype=np.int32)
    for case in range(256):
        t = list(itertools.chain.from_iterable(_triangulate(loop) for loop in case_loops(case)))
        if len(t) > MAX_TRIANGLES:
            raise AssertionError(f"case {case} needs {len(t)} triangles")
        counts[case] = len(t)
        if t:
            tris[case, : len(t)] = np.array(t, dtype=np.int32)
    return tris, counts
