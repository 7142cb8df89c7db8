"""Warp kernels of the isosurface extractors (one module: one compile, one cache entry).

Grid layout: node values ``s`` of shape (nx+1, ny+1, nz+1), C order, node linear index
``(i*(ny+1) + j)*(nz+1) + k``. A node is inside when ``s < 0``. Every node owns the three grid
edges that leave it towards +x, +y, +z; the per-node byte ``mask`` holds bit 0 = inside and bits
1-3 = "my +x/+y/+z edge is cut". One surface vertex per cut edge, numbered node by node in
linear order, x-edge before y-edge before z-edge.

The extraction kernels run one thread per grid row (i, j) and walk k inside the thread: on a CPU
this amortizes Warp's per-thread overhead and reuses the four corner values shared by
consecutive cubes. Three passes: count per row -> (torch scan over rows) -> emit vertices ->
emit faces (faces read vertex ids of neighbouring rows, so they need their own pass).
"""

from __future__ import annotations

from typing import Any

import warp as wp

from diffworld.engine.runtime import init_warp

init_warp()
# Only the vertex adjoint is differentiated, and it is hand-written: no automatic adjoints.
wp.set_module_options({"enable_backward": False})


@wp.func
def _inside(x: Any) -> int:
    if x < type(x)(0.0):
        return 1
    return 0


@wp.kernel
def count_rows_kernel(
    s: wp.array3d(dtype=Any),
    tri_count: wp.array(dtype=wp.int32),
    mask: wp.array3d(dtype=wp.uint8),
    cube_case: wp.array3d(dtype=wp.uint8),
    row_vertices: wp.array2d(dtype=wp.int32),
    row_faces: wp.array2d(dtype=wp.int32),
):
    i, j = wp.tid()
    nx = s.shape[0] - 1
    ny = s.shape[1] - 1
    nz = s.shape[2] - 1
    has_x = i < nx
    has_y = j < ny
    cube_row = has_x and has_y
    # Inside bits of the four row corners (i, j), (i+1, j), (i, j+1), (i+1, j+1) at plane k.
    b0 = _inside(s[i, j, 0])
    b1 = int(0)
    b2 = int(0)
    b3 = int(0)
    if has_x:
        b1 = _inside(s[i + 1, j, 0])
    if has_y:
        b2 = _inside(s[i, j + 1, 0])
    if cube_row:
        b3 = _inside(s[i + 1, j + 1, 0])
    n_vert = int(0)
    n_face = int(0)
    for k in range(nz + 1):
        c0 = int(0)
        c1 = int(0)
        c2 = int(0)
        c3 = int(0)
        if k < nz:
            c0 = _inside(s[i, j, k + 1])
            if has_x:
                c1 = _inside(s[i + 1, j, k + 1])
            if has_y:
                c2 = _inside(s[i, j + 1, k + 1])
            if cube_row:
                c3 = _inside(s[i + 1, j + 1, k + 1])
        m = b0
        if has_x and b1 != b0:
            m = m | 2
            n_vert = n_vert + 1
        if has_y and b2 != b0:
            m = m | 4
            n_vert = n_vert + 1
        if k < nz and c0 != b0:
            m = m | 8
            n_vert = n_vert + 1
        mask[i, j, k] = wp.uint8(m)
        if cube_row and k < nz:
            c = b0 | (b1 << 1) | (b2 << 2) | (b3 << 3) | (c0 << 4) | (c1 << 5) | (c2 << 6) | (c3 << 7)
            cube_case[i, j, k] = wp.uint8(c)
            n_face = n_face + tri_count[c]
        b0 = c0
        b1 = c1
        b2 = c2
        b3 = c3
    row_vertices[i, j] = n_vert
    row_faces[i, j] = n_face


@wp.kernel
def emit_vertices_kernel(
    s: wp.array3d(dtype=Any),
    mask: wp.array3d(dtype=wp.uint8),
    row_vertices: wp.array2d(dtype=wp.int32),
    row_first_vertex: wp.array2d(dtype=wp.int32),
    vertex_base: wp.array3d(dtype=wp.int32),
    vert_node: wp.array(dtype=wp.int64),
    vert_axis: wp.array(dtype=wp.int64),
    vert_t: wp.array(dtype=Any),
):
    i, j = wp.tid()
    if row_vertices[i, j] == 0:
        return
    n1 = s.shape[1]
    n2 = s.shape[2]
    v = int(row_first_vertex[i, j])
    row_node = (wp.int64(i) * wp.int64(n1) + wp.int64(j)) * wp.int64(n2)
    for k in range(n2):
        m = int(mask[i, j, k])
        if m > 1:
            vertex_base[i, j, k] = v
            sa = s[i, j, k]
            node = row_node + wp.int64(k)
            if m & 2:
                sb = s[i + 1, j, k]
                vert_node[v] = node
                vert_axis[v] = wp.int64(0)
                vert_t[v] = sa / (sa - sb)
                v = v + 1
            if m & 4:
                sb = s[i, j + 1, k]
                vert_node[v] = node
                vert_axis[v] = wp.int64(1)
                vert_t[v] = sa / (sa - sb)
                v = v + 1
            if m & 8:
                sb = s[i, j, k + 1]
                vert_node[v] = node
                vert_axis[v] = wp.int64(2)
                vert_t[v] = sa / (sa - sb)
                v = v + 1


@wp.func
def _edge_vertex(mask: wp.array3d(dtype=wp.uint8), vertex_base: wp.array3d(dtype=wp.int32),
                 i: int, j: int, k: int, axis: int) -> wp.int64:
    m = int(mask[i, j, k])
    # Rank of this edge among the node's cut edges (x before y before z).
    rank = int(0)
    if axis > 0:
        rank = (m >> 1) & 1
    if axis > 1:
        rank = rank + ((m >> 2) & 1)
    return wp.int64(vertex_base[i, j, k] + rank)


@wp.kernel
def emit_faces_kernel(
    mask: wp.array3d(dtype=wp.uint8),
    cube_case: wp.array3d(dtype=wp.uint8),
    vertex_base: wp.array3d(dtype=wp.int32),
    row_faces: wp.array2d(dtype=wp.int32),
    row_first_face: wp.array2d(dtype=wp.int32),
    tri_table: wp.array3d(dtype=wp.int32),
    tri_count: wp.array(dtype=wp.int32),
    edge_offset: wp.array2d(dtype=wp.int32),
    faces: wp.array2d(dtype=wp.int64),
):
    i, j = wp.tid()
    if row_faces[i, j] == 0:
        return
    f = int(row_first_face[i, j])
    for k in range(cube_case.shape[2]):
        c = int(cube_case[i, j, k])
        for t in range(tri_count[c]):
            for corner in range(3):
                e = tri_table[c, t, corner]
                faces[f, corner] = _edge_vertex(mask, vertex_base, i + edge_offset[e, 0], j + edge_offset[e, 1],
                                                k + edge_offset[e, 2], edge_offset[e, 3])
            f = f + 1


@wp.kernel
def vertex_t_adjoint_kernel(
    s_flat: wp.array(dtype=Any),
    vert_node: wp.array(dtype=wp.int64),
    vert_axis: wp.array(dtype=wp.int64),
    strides: wp.vec3i,
    grad_t: wp.array(dtype=Any),
    grad_s: wp.array(dtype=Any),
):
    # t = sa / (sa - sb):  dt/dsa = -sb / (sa - sb)^2,  dt/dsb = sa / (sa - sb)^2.
    v = wp.tid()
    a = vert_node[v]
    b = a + wp.int64(strides[int(vert_axis[v])])
    sa = s_flat[a]
    sb = s_flat[b]
    d = sa - sb
    g = grad_t[v] / (d * d)
    wp.atomic_add(grad_s, a, -sb * g)
    wp.atomic_add(grad_s, b, sa * g)


for _T in (wp.float32, wp.float64):
    wp.overload(count_rows_kernel, {"s": wp.array3d(dtype=_T)})
    wp.overload(emit_vertices_kernel, {"s": wp.array3d(dtype=_T), "vert_t": wp.array(dtype=_T)})
    wp.overload(vertex_t_adjoint_kernel,
                {"s_flat": wp.array(dtype=_T), "grad_t": wp.array(dtype=_T), "grad_s": wp.array(dtype=_T)})
