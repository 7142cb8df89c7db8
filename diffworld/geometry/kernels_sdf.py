"""Warp kernels of the mesh signed-distance queries (one module: one compile, one cache entry).

Per query point the kernel finds the closest face, the barycentric coordinates of the closest
point and (winding mode) the inside/outside sign; the distance itself is formed in torch from
those, so it is differentiable in points and vertices.

Warp meshes (and their BVH) are float32. A float32 closest-point search cannot tell apart faces
whose distances differ by less than ~1e-7 relative (a face interior next to the neighbour's
shared edge, for instance), which would put float32 noise into float64 distances. So the search
runs in two phases:

1. float32 BVH query: closest face and its distance ``d32`` (with sign in winding mode); the
   point is projected onto that face in float64 (exact 0/1 weights on edges and corners);
2. float64 refinement (``refine != 0``, used for float64 queries; it about doubles the cost):
   every face within ``d32 * (1 + 1e-5) + margin`` (``wp.mesh_query_sphere``) is projected
   exactly in float64 against float64 vertices; the nearest wins.

Modes (``SIGN_*``): ``SIGN_WINDING`` thresholds the generalized winding number (robust on open
or imperfect meshes; the mesh must be built with ``support_winding_number=True``).
``SIGN_NONE`` only finds the closest point; the caller signs it with the angle-weighted
pseudo-normal of the closest feature (Warp's own ``mesh_query_point_sign_normal`` blends the
normals of every face within a tolerance of the minimum distance, which cancels out and flips
the sign at points nearly equidistant from many faces, e.g. the center of a sphere).
"""

from __future__ import annotations

import warp as wp

from diffworld.engine.runtime import init_warp

init_warp()
# Gradients are formed in torch from (face, barycentrics): no automatic adjoints needed.
wp.set_module_options({"enable_backward": False})

SIGN_WINDING = wp.constant(0)
SIGN_NONE = wp.constant(1)

# A distance bound no query exceeds (its square stays finite in float32).
UNBOUNDED = wp.constant(1.0e18)

WINDING_ACCURACY = wp.constant(2.0)
WINDING_THRESHOLD = wp.constant(0.5)
# Relative widening of the float64 refinement sphere (float32 distance error is ~1e-7 relative).
REFINE_RELATIVE = wp.constant(1.0e-5)


@wp.func
def _query(mesh: wp.uint64, p: wp.vec3, max_dist: float, mode: int):
    if mode == SIGN_WINDING:
        return wp.mesh_query_point_sign_winding_number(mesh, p, max_dist, WINDING_ACCURACY, WINDING_THRESHOLD)
    return wp.mesh_query_point_no_sign(mesh, p, max_dist)


@wp.func
def _segment_weight(p: wp.vec3d, a: wp.vec3d, b: wp.vec3d) -> wp.float64:
    """Parameter t in [0, 1] of the closest point a + t (b - a) of a segment (0 if a == b)."""
    ab = b - a
    den = wp.dot(ab, ab)
    t = wp.float64(0.0)
    if den > wp.float64(0.0):
        t = wp.clamp(wp.dot(p - a, ab) / den, wp.float64(0.0), wp.float64(1.0))
    return t


@wp.func
def closest_on_triangle(p: wp.vec3d, a: wp.vec3d, b: wp.vec3d, c: wp.vec3d) -> wp.vec3d:
    """Barycentric weights (of a, b, c) of the point of triangle abc closest to p, in float64.

    Voronoi-region classification: corner regions, then edge regions, then the interior. Weights
    are exactly 0 / 1 in corner and edge regions. Degenerate (zero-area) triangles fall back to
    the nearest of their three edges.
    """
    zero = wp.float64(0.0)
    one = wp.float64(1.0)
    ab = b - a
    ac = c - a
    ap = p - a
    d1 = wp.dot(ab, ap)
    d2 = wp.dot(ac, ap)
    if d1 <= zero and d2 <= zero:
        return wp.vec3d(one, zero, zero)
    bp = p - b
    d3 = wp.dot(ab, bp)
    d4 = wp.dot(ac, bp)
    if d3 >= zero and d4 <= d3:
        return wp.vec3d(zero, one, zero)
    vc = d1 * d4 - d3 * d2
    if vc <= zero and d1 >= zero and d3 <= zero:
        t = d1 / (d1 - d3)
        return wp.vec3d(one - t, t, zero)
    cp = p - c
    d5 = wp.dot(ab, cp)
    d6 = wp.dot(ac, cp)
    if d6 >= zero and d5 <= d6:
        return wp.vec3d(zero, zero, one)
    vb = d5 * d2 - d1 * d6
    if vb <= zero and d2 >= zero and d6 <= zero:
        t = d2 / (d2 - d6)
        return wp.vec3d(one - t, zero, t)
    va = d3 * d6 - d5 * d4
    if va <= zero and (d4 - d3) >= zero and (d5 - d6) >= zero:
        t = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        return wp.vec3d(zero, one - t, t)
    den = va + vb + vc
    if den > zero:
        v = vb / den
        w = vc / den
        return wp.vec3d(one - v - w, v, w)
    # Degenerate triangle: nearest edge.
    t_ab = _segment_weight(p, a, b)
    t_bc = _segment_weight(p, b, c)
    t_ca = _segment_weight(p, c, a)
    q_ab = a + t_ab * (b - a)
    q_bc = b + t_bc * (c - b)
    q_ca = c + t_ca * (a - c)
    best = wp.vec3d(one - t_ab, t_ab, zero)
    best_d = wp.length_sq(p - q_ab)
    d_bc = wp.length_sq(p - q_bc)
    if d_bc < best_d:
        best = wp.vec3d(zero, one - t_bc, t_bc)
        best_d = d_bc
    if wp.length_sq(p - q_ca) < best_d:
        best = wp.vec3d(t_ca, zero, one - t_ca)
    return best


@wp.func
def _project(p: wp.vec3d, verts: wp.array(dtype=wp.vec3d), indices: wp.array(dtype=wp.int32), f: int) -> wp.vec3d:
    return closest_on_triangle(p, verts[indices[3 * f]], verts[indices[3 * f + 1]], verts[indices[3 * f + 2]])


@wp.func
def _eval(w: wp.vec3d, verts: wp.array(dtype=wp.vec3d), indices: wp.array(dtype=wp.int32), f: int) -> wp.vec3d:
    return w[0] * verts[indices[3 * f]] + w[1] * verts[indices[3 * f + 1]] + w[2] * verts[indices[3 * f + 2]]


@wp.kernel
def closest_face_kernel(
    mesh: wp.uint64,
    verts: wp.array(dtype=wp.vec3d),
    indices: wp.array(dtype=wp.int32),
    points: wp.array(dtype=wp.vec3d),
    max_dist: float,
    margin: float,
    mode: int,
    refine: int,
    face: wp.array(dtype=wp.int32),
    weights: wp.array(dtype=wp.vec3d),
    sign: wp.array(dtype=wp.float32),
):
    """Closest face, float64 barycentric weights (corners 0, 1, 2) of the closest point, and in
    winding mode the sign (-1 inside, +1 outside; always +1 in SIGN_NONE mode) of every point.

    A point with no face within ``max_dist`` is queried again without a bound, so its sign is
    still known; ``face = -1`` only if the mesh has no usable (non-sliver) face. ``margin`` [m]
    widens the refinement sphere to cover float32 rounding of points and vertices.
    """
    tid = wp.tid()
    x = points[tid]
    p = wp.vec3(wp.float32(x[0]), wp.float32(x[1]), wp.float32(x[2]))
    q = _query(mesh, p, max_dist, mode)
    if not q.result:
        q = _query(mesh, p, UNBOUNDED, mode)
    if not q.result:
        face[tid] = -1
        weights[tid] = wp.vec3d(wp.float64(1.0), wp.float64(0.0), wp.float64(0.0))
        sign[tid] = 1.0
        return
    if mode == SIGN_WINDING and q.sign < 0.0:
        sign[tid] = -1.0
    else:
        sign[tid] = 1.0

    best_face = q.face
    best_w = _project(x, verts, indices, best_face)
    if refine != 0:
        best_d = wp.length_sq(x - _eval(best_w, verts, indices, best_face))
        d32 = wp.length(wp.mesh_eval_position(mesh, q.face, q.u, q.v) - p)
        radius = d32 * (1.0 + REFINE_RELATIVE) + margin
        sq = wp.mesh_query_sphere(mesh, p, radius)
        f = int(0)
        while wp.mesh_query_next(sq, f):
            if f != q.face:
                w = _project(x, verts, indices, f)
                d = wp.length_sq(x - _eval(w, verts, indices, f))
                if d < best_d:
                    best_d = d
                    best_w = w
                    best_face = f
    face[tid] = best_face
    weights[tid] = best_w
