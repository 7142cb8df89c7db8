"""Warp kernels of FlexiCubes' dual vertices and L_dev distances, with their hand-written adjoint.

The flat layout of :func:`diffworld.geometry.flexicubes.flexicubes`: one row ``q`` per cut grid
edge with end points ``xa, xb`` (Q, W) (position, then any carried attributes) and end values
``sa, sb`` (Q,), and 4 slots ``c`` (the 4 cubes around the edge), each with the dual vertex
``vid[q, c]`` that the edge belongs to in that cube, the normalized corner weights
``aw[q, c] = (alpha_a, alpha_b)`` and edge weight ``bw[q, c]``:

* weighted crossing ``u = (xa wb - xb wa) / (wb - wa)`` with ``wa = alpha_a sa, wb = alpha_b sb``;
* dual vertex ``v = sum(bw u) / sum(bw)`` over its edges;
* L_dev distance ``d[q, c] = |u1 - v[:3]|`` to the plain crossing ``u1 = (xa sb - xb sa) / (sb - sa)``.

Torch would keep (Q, 4, W) intermediates alive from the forward to the backward pass (and
allocate as many again there); these kernels keep nothing: the backward recomputes ``u`` and
``u1`` per edge in registers. One thread per cut edge; vertex sums use atomics. All kernels are
generic over float32/float64.
"""

from __future__ import annotations

from typing import Any

import torch
import warp as wp

from diffworld.engine.bridge import launch, to_warp
from diffworld.engine.runtime import init_warp

init_warp()
# The adjoint is written by hand below (it recomputes instead of storing): Warp's is not needed.
wp.set_module_options({"enable_backward": False})


@wp.kernel
def accumulate_kernel(xa: wp.array2d(dtype=Any), xb: wp.array2d(dtype=Any), sa: wp.array(dtype=Any),
                      sb: wp.array(dtype=Any), aw: wp.array3d(dtype=Any), bw: wp.array2d(dtype=Any),
                      vid: wp.array2d(dtype=wp.int32), acc: wp.array2d(dtype=Any)):
    """acc[v, :W] += bw u, acc[v, W] += bw for the 4 (edge, cube) pairs of edge q."""
    q = wp.tid()
    W = xa.shape[1]
    for c in range(4):
        v = vid[q, c]
        wa = aw[q, c, 0] * sa[q]
        wb = aw[q, c, 1] * sb[q]
        den = wb - wa
        b = bw[q, c]
        for j in range(W):
            wp.atomic_add(acc, v, j, b * (xa[q, j] * wb - xb[q, j] * wa) / den)
        wp.atomic_add(acc, v, W, b)


@wp.kernel
def distance_kernel(xa: wp.array2d(dtype=Any), xb: wp.array2d(dtype=Any), sa: wp.array(dtype=Any),
                    sb: wp.array(dtype=Any), vid: wp.array2d(dtype=wp.int32), vert: wp.array2d(dtype=Any),
                    d: wp.array2d(dtype=Any)):
    """d[q, c] = |u1 - v[:3]| for the 4 pairs of edge q."""
    q = wp.tid()
    den = sb[q] - sa[q]
    for c in range(4):
        v = vid[q, c]
        r = xa.dtype(0.0)
        for j in range(3):
            e = (xa[q, j] * sb[q] - xb[q, j] * sa[q]) / den - vert[v, j]
            r = r + e * e
        d[q, c] = wp.sqrt(r)


@wp.kernel
def distance_adjoint_kernel(xa: wp.array2d(dtype=Any), xb: wp.array2d(dtype=Any), sa: wp.array(dtype=Any),
                            sb: wp.array(dtype=Any), vid: wp.array2d(dtype=wp.int32), vert: wp.array2d(dtype=Any),
                            d: wp.array2d(dtype=Any), g_d: wp.array2d(dtype=Any), g_vert: wp.array2d(dtype=Any),
                            g_xa: wp.array2d(dtype=Any), g_xb: wp.array2d(dtype=Any), g_sa: wp.array(dtype=Any),
                            g_sb: wp.array(dtype=Any)):
    """Gradient of d through u1 (written to g_xa, g_xb, g_sa, g_sb) and v (added to g_vert)."""
    q = wp.tid()
    s_a = sa[q]
    s_b = sb[q]
    den = s_b - s_a
    zero = xa.dtype(0.0)
    ga_s = zero
    gb_s = zero
    for j in range(3):
        u1 = (xa[q, j] * s_b - xb[q, j] * s_a) / den
        g_u1 = zero
        for c in range(4):
            dist = d[q, c]
            if dist > zero:
                # d(|u1 - v|) = (u1 - v) / |u1 - v|; undefined at 0, taken as 0 there
                t = g_d[q, c] * (u1 - vert[vid[q, c], j]) / dist
                g_u1 = g_u1 + t
                wp.atomic_sub(g_vert, vid[q, c], j, t)
        # u1 = (xa sb - xb sa) / (sb - sa)
        g_xa[q, j] = g_u1 * s_b / den
        g_xb[q, j] = -g_u1 * s_a / den
        ga_s = ga_s + g_u1 * (u1 - xb[q, j]) / den
        gb_s = gb_s + g_u1 * (xa[q, j] - u1) / den
    for j in range(3, xa.shape[1]):
        g_xa[q, j] = zero
        g_xb[q, j] = zero
    g_sa[q] = ga_s
    g_sb[q] = gb_s


@wp.kernel
def accumulate_adjoint_kernel(xa: wp.array2d(dtype=Any), xb: wp.array2d(dtype=Any), sa: wp.array(dtype=Any),
                              sb: wp.array(dtype=Any), aw: wp.array3d(dtype=Any), bw: wp.array2d(dtype=Any),
                              vid: wp.array2d(dtype=wp.int32), g_acc: wp.array2d(dtype=Any),
                              g_xa: wp.array2d(dtype=Any), g_xb: wp.array2d(dtype=Any), g_sa: wp.array(dtype=Any),
                              g_sb: wp.array(dtype=Any), g_aw: wp.array3d(dtype=Any), g_bw: wp.array2d(dtype=Any)):
    """Gradient of the accumulation given g_acc (V, W + 1); added to g_xa, g_xb, g_sa, g_sb."""
    q = wp.tid()
    W = xa.shape[1]
    s_a = sa[q]
    s_b = sb[q]
    zero = xa.dtype(0.0)
    ga_s = zero
    gb_s = zero
    for c in range(4):
        v = vid[q, c]
        a_a = aw[q, c, 0]
        a_b = aw[q, c, 1]
        wa = a_a * s_a
        wb = a_b * s_b
        den = wb - wa
        b = bw[q, c]
        g_b = g_acc[v, W]
        g_wa = zero
        g_wb = zero
        for j in range(W):
            u = (xa[q, j] * wb - xb[q, j] * wa) / den
            ga = g_acc[v, j]
            g_b = g_b + ga * u
            g_u = b * ga
            g_xa[q, j] = g_xa[q, j] + g_u * wb / den
            g_xb[q, j] = g_xb[q, j] - g_u * wa / den
            g_wa = g_wa + g_u * (u - xb[q, j]) / den
            g_wb = g_wb + g_u * (xa[q, j] - u) / den
        g_bw[q, c] = g_b
        g_aw[q, c, 0] = g_wa * s_a
        g_aw[q, c, 1] = g_wb * s_b
        ga_s = ga_s + g_wa * a_a
        gb_s = gb_s + g_wb * a_b
    g_sa[q] = g_sa[q] + ga_s
    g_sb[q] = g_sb[q] + gb_s


for _T in (wp.float32, wp.float64):
    a1, a2, a3 = wp.array(dtype=_T), wp.array2d(dtype=_T), wp.array3d(dtype=_T)
    wp.overload(accumulate_kernel, {"xa": a2, "xb": a2, "sa": a1, "sb": a1, "aw": a3, "bw": a2, "acc": a2})
    wp.overload(distance_kernel, {"xa": a2, "xb": a2, "sa": a1, "sb": a1, "vert": a2, "d": a2})
    wp.overload(distance_adjoint_kernel, {"xa": a2, "xb": a2, "sa": a1, "sb": a1, "vert": a2, "d": a2, "g_d": a2,
                                          "g_vert": a2, "g_xa": a2, "g_xb": a2, "g_sa": a1, "g_sb": a1})
    wp.overload(accumulate_adjoint_kernel, {"xa": a2, "xb": a2, "sa": a1, "sb": a1, "aw": a3, "bw": a2, "g_acc": a2,
                                            "g_xa": a2, "g_xb": a2, "g_sa": a1, "g_sb": a1, "g_aw": a3, "g_bw": a2})


class DualVertices(torch.autograd.Function):
    """(xa, xb, sa, sb, aw, bw) -> dual vertices (V, W) and L_dev distances d (Q, 4); see the module."""

    @staticmethod
    def forward(ctx, xa, xb, sa, sb, aw, bw, vid, n_vertices: int):
        xa, xb, sa, sb, aw, bw = (t.contiguous() for t in (xa, xb, sa, sb, aw, bw))
        Q, W = xa.shape
        dev = xa.device
        acc = xa.new_zeros((n_vertices, W + 1))
        launch(accumulate_kernel, Q, [to_warp(xa), to_warp(xb), to_warp(sa), to_warp(sb), to_warp(aw), to_warp(bw),
                                      to_warp(vid), to_warp(acc)], dev)
        vert = acc[:, :W] / acc[:, W:].clamp_min(1e-30)
        d = xa.new_empty((Q, 4))
        launch(distance_kernel, Q, [to_warp(xa), to_warp(xb), to_warp(sa), to_warp(sb), to_warp(vid),
                                    to_warp(vert), to_warp(d)], dev)
        ctx.save_for_backward(xa, xb, sa, sb, aw, bw, vid, vert, acc[:, W].clone(), d)
        return vert, d

    @staticmethod
    def backward(ctx, g_vert, g_d):
        xa, xb, sa, sb, aw, bw, vid, vert, wsum, d = ctx.saved_tensors
        Q, W = xa.shape
        dev = xa.device
        g_vert = torch.zeros_like(vert) if g_vert is None else g_vert.contiguous().clone()
        g_d = torch.zeros_like(d) if g_d is None else g_d.contiguous()
        g_xa, g_xb = torch.empty_like(xa), torch.empty_like(xb)
        g_sa, g_sb = torch.empty_like(sa), torch.empty_like(sb)
        launch(distance_adjoint_kernel, Q, [to_warp(xa), to_warp(xb), to_warp(sa), to_warp(sb), to_warp(vid),
                                            to_warp(vert), to_warp(d), to_warp(g_d), to_warp(g_vert), to_warp(g_xa),
                                            to_warp(g_xb), to_warp(g_sa), to_warp(g_sb)], dev)
        # vert = acc[:, :W] / acc[:, W]
        w = wsum.clamp_min(1e-30)[:, None]
        g_acc = torch.cat([g_vert / w, -(g_vert * vert).sum(1, keepdim=True) / w], 1).contiguous()
        g_aw, g_bw = torch.empty_like(aw), torch.empty_like(bw)
        launch(accumulate_adjoint_kernel, Q, [to_warp(xa), to_warp(xb), to_warp(sa), to_warp(sb), to_warp(aw),
                                              to_warp(bw), to_warp(vid), to_warp(g_acc), to_warp(g_xa),
                                              to_warp(g_xb), to_warp(g_sa), to_warp(g_sb), to_warp(g_aw),
                                              to_warp(g_bw)], dev)
        return g_xa, g_xb, g_sa, g_sb, g_aw, g_bw, None, None


def dual_vertices(xa: torch.Tensor, xb: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, aw: torch.Tensor,
                  bw: torch.Tensor, vid: torch.Tensor, n_vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual vertices (V, W) and L_dev distances (Q, 4), differentiable in every float input.

    Args:
        xa, xb: End points (Q, W) of the cut grid edges [m] (then attributes).
        sa, sb: End values (Q,).
        aw: Normalized corner weights (Q, 4, 2) of the edge's ends in each of its 4 cubes.
        bw: Normalized edge weights (Q, 4).
        vid: Dual vertex (Q, 4) int32 of each (edge, cube) pair.
        n_vertices: V.
    """
    return DualVertices.apply(xa, xb, sa, sb, aw, bw, vid.to(torch.int32).contiguous(), int(n_vertices))
