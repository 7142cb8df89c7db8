"""Closest points on triangles, differentiable (the gel-surface queries of the couplings)."""

from __future__ import annotations

import torch

__all__ = ["closest_point_on_triangle"]


def closest_point_on_triangle(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """Signed distance of points to triangles, its gradient, and the closest point's weights.

    Args:
        p, a, b, c: Points and triangle corners [m], each (..., 3) (counter-clockwise seen from
            the positive side).

    Returns:
        ``phi`` (...,) [m]: the distance to the triangle's plane when the closest point lies
        inside the triangle, else ``+-|p - q|`` (the sign of the side of the plane); ``normal``
        (..., 3) ``= d phi / d p`` (unit); ``bary`` (..., 3) weights of the closest point ``q`` on
        (a, b, c). Differentiable in all inputs (continuous across region boundaries).
    """
    tiny = torch.finfo(p.dtype).tiny
    ab, ac, ap = b - a, c - a, p - a
    nrm = torch.linalg.cross(ab, ac, dim=-1)
    nh = nrm / torch.sqrt((nrm * nrm).sum(-1, keepdim=True)).clamp_min(tiny)
    d00, d01, d11 = (ab * ab).sum(-1), (ab * ac).sum(-1), (ac * ac).sum(-1)
    d20, d21 = (ap * ab).sum(-1), (ap * ac).sum(-1)
    den = (d00 * d11 - d01 * d01).clamp_min(tiny)
    bv = (d11 * d20 - d01 * d21) / den
    bw = (d00 * d21 - d01 * d20) / den
    bu = 1.0 - bv - bw
    inside = (bu >= 0) & (bv >= 0) & (bw >= 0)

    def segment(s0, s1):
        d = s1 - s0
        t = (((p - s0) * d).sum(-1) / (d * d).sum(-1).clamp_min(tiny)).clamp(0.0, 1.0)
        q = s0 + t.unsqueeze(-1) * d
        return q, t, ((p - q) ** 2).sum(-1)

    q_ab, t_ab, e_ab = segment(a, b)
    q_bc, t_bc, e_bc = segment(b, c)
    q_ca, t_ca, e_ca = segment(c, a)
    zero = torch.zeros_like(t_ab)
    edge = torch.stack([e_ab, e_bc, e_ca], -1).argmin(-1)
    q_edge = torch.where((edge == 0).unsqueeze(-1), q_ab, torch.where((edge == 1).unsqueeze(-1), q_bc, q_ca))
    b_edge = torch.where((edge == 0).unsqueeze(-1), torch.stack([1 - t_ab, t_ab, zero], -1),
                         torch.where((edge == 1).unsqueeze(-1), torch.stack([zero, 1 - t_bc, t_bc], -1),
                                     torch.stack([t_ca, zero, 1 - t_ca], -1)))
    bary = torch.where(inside.unsqueeze(-1), torch.stack([bu, bv, bw], -1), b_edge)
    diff = p - q_edge
    dist2 = (diff * diff).sum(-1)
    # the unused branch must not make NaN gradients: its square root sees 1 on face rows
    dist = torch.sqrt(torch.where(inside, torch.ones_like(dist2), dist2).clamp_min(tiny))
    side = torch.where((diff * nh).sum(-1) >= 0, 1.0, -1.0).to(p.dtype)
    plane = (ap * nh).sum(-1)
    phi = torch.where(inside, plane, side * dist)
    normal = torch.where(inside.unsqueeze(-1), nh, (side / dist).unsqueeze(-1) * diff)
    return phi, normal, bary
