"""FlexiCubes tables generated from diffworld's marching-cubes contours: the dual-vertex count
histogram (2/162/82/8/2) and group sizes, groups partitioning the cut edges, the 36 ambiguous
cases and their resolution, and the table of the 4 cubes around a grid edge."""

from collections import Counter

import numpy as np

from diffworld.geometry import flexicubes_tables as T
from diffworld.geometry.mc_tables import CORNER_OFFSETS, EDGE_AXIS, EDGE_CORNERS


def test_dual_vertex_counts_and_group_sizes():
    count, group_edges, edge_group = T.dual_tables()
    assert sorted(Counter(count.tolist()).items()) == [(0, 2), (1, 162), (2, 82), (3, 8), (4, 2)]
    sizes = (group_edges >= 0).sum(-1)[group_edges[:, :, 0] >= 0]
    assert sizes.min() == 3 and sizes.max() == 7
    assert int(count.sum()) == int((group_edges[:, :, 0] >= 0).sum())


def test_groups_partition_the_cut_edges():
    count, group_edges, edge_group = T.dual_tables()
    for case in range(256):
        cut = set(T.cut_edges(case).tolist())
        seen = []
        for g in range(count[case]):
            edges = [int(e) for e in group_edges[case, g] if e >= 0]
            seen += edges
            assert all(edge_group[case, e] == g for e in edges)
        assert sorted(seen) == sorted(cut), case  # every cut edge in exactly one group
        assert set(np.nonzero(edge_group[case] >= 0)[0].tolist()) == cut
        assert not any(group_edges[case, g, 0] >= 0 for g in range(count[case], T.MAX_GROUPS))


def test_the_36_ambiguous_cases_and_their_resolution():
    count, group_edges, edge_group = T.dual_tables()
    flagged = np.nonzero(T.AMBIGUOUS_FACE >= 0)[0]
    assert len(flagged) == 36
    assert np.bincount(T.AMBIGUOUS_FACE[flagged]).tolist() == [6] * 6  # 6 per cube face
    for case in flagged:
        comp = 255 - case
        assert count[case] == 1 and count[comp] == 2
        assert T.AMBIGUOUS_FACE[comp] == -1  # the complement is not flagged
        face = T.AMBIGUOUS_FACE[case]
        corners = set(T.FACE_CORNERS[face].tolist())
        face_edges = [e for e in range(12) if set(EDGE_CORNERS[e].tolist()) <= corners]
        assert len(face_edges) == 4 and all(e in T.cut_edges(case) for e in face_edges)
        # The complement's grouping separates the face: two of its cut edges in each group.
        assert sorted(Counter(edge_group[comp, face_edges].tolist()).values()) == [2, 2]
        # Same cut edges, so the complement's groups are a valid grouping of this cube's edges.
        assert np.array_equal(T.cut_edges(case), T.cut_edges(comp))
    # The rule: flip only when the neighbour across the face is flagged too.
    a, b = int(flagged[0]), int(flagged[1])
    unflagged = int(np.nonzero(T.AMBIGUOUS_FACE < 0)[0][5])
    assert T.resolved_case(a, b) == 255 - a and T.resolved_case(a, unflagged) == a
    assert T.resolved_case(unflagged, a) == unflagged
    cases = np.array([[a, unflagged]])
    assert T.resolved_case(cases, np.array([[b, a]])).tolist() == [[255 - a, unflagged]]


def test_the_four_cubes_around_a_grid_edge():
    for a in range(3):
        centres = []
        for q in range(4):
            offset, local = T.QUAD_CUBES[a, q, :3], int(T.QUAD_CUBES[a, q, 3])
            assert EDGE_AXIS[local] == a
            # The edge's start corner in that cube is the grid edge's start node.
            assert np.array_equal(offset + CORNER_OFFSETS[EDGE_CORNERS[local, 0]], np.zeros(3))
            assert offset[a] == 0 and set(offset.tolist()) <= {0, -1}
            centres.append(offset + 0.5)
        c = np.array(centres)
        # Counter-clockwise about +a: the polygon's area vector points along +a.
        area = sum(np.cross(c[q], c[(q + 1) % 4]) for q in range(4))
        assert area[a] > 0 and np.allclose(np.delete(area, a), 0)
        assert len({tuple(row) for row in T.QUAD_CUBES[a, :, :3].tolist()}) == 4
