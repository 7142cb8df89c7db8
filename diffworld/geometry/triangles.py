"""Closest points on triangles, differentiable (the gel-surface queries of the couplings), and
the pseudo-normals that decide inside/outside where the closest point is on an edge or a vertex."""

from __future__ import annotations

import math

import torch

__all__ = ["SurfaceTopology", "closest_point_on_triangle"]


class SurfaceTopology:
    """The edge adjacency of a triangle set, for the inside/outside sign at edges and vertices.

    Where the closest point of a query lies on an edge or a vertex, the side of one adjacent
    triangle's plane is not the side of the surface: a point in the plane of a flat face, a
    little beyond its rim, is "behind" that plane by rounding alone and was read as deep inside
    (a gel pad pushing an MPM block: grid nodes beside the pad got the distance to the rim as
    penetration, and the step blew up). The sign is taken instead against the feature's
    pseudo-normal (Baerentzen and Aanaes 2005): an edge's is the sum of its two faces' unit
    normals, a vertex's the angle-weighted sum of its faces' normals; for a closed surface the sign
    is then exact. On an open surface (a gel's contact faces only) a boundary edge counts as a
    square rim: its second normal is the in-plane direction out of the face, so a point beyond
    the rim is outside and the surface reads like the front face of a slab.

    Args:
        faces: (F, 3) int64 triangles, counter-clockwise seen from outside.
    """

    def __init__(self, faces: torch.Tensor) -> None:
        self.faces = faces
        n_f = faces.shape[0]
        # the three edges of every face: (a, b), (b, c), (c, a)
        e = torch.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2)
        key = e.min(1).values * (int(faces.max()) + 1 if faces.numel() else 1) + e.max(1).values
        order = torch.argsort(key, stable=True)
        ks = key[order]
        # for every edge slot, another slot with the same key (the neighbour), else -1
        nbr = torch.full((3 * n_f,), -1, dtype=torch.int64, device=faces.device)
        same_next = ks[1:] == ks[:-1]
        a, b = order[:-1][same_next], order[1:][same_next]
        nbr[a], nbr[b] = b, a
        self.neighbour = torch.where(nbr >= 0, nbr // 3, nbr).reshape(n_f, 3)  # (F, 3) face across, or -1

    def feature_normals(self, x: torch.Tensor, face_ids: torch.Tensor) -> torch.Tensor:
        """Pseudo-normals (K, 6, 3) of the queried faces (detached, unnormalized): rows 0-2 the
        edges ab, bc, ca, rows 3-5 the vertices a, b, c, with the surface at vertex positions
        ``x`` (V, 3)."""
        with torch.no_grad():
            x = x.detach()
            f = self.faces
            p = x[f]  # (F, 3, 3)
            n = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
            n = n / n.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            d = torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 1], p[:, 0] - p[:, 2]], 1)  # edge vectors
            rim = torch.linalg.cross(d, n[:, None].expand_as(d), dim=-1)
            rim = rim / rim.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            nb = self.neighbour
            edge = n[:, None] + torch.where((nb >= 0)[..., None], n[nb.clamp_min(0)], rim)
            # angle-weighted vertex normals, plus pi/2 of the outward rim per boundary edge end
            u, w = p[:, [1, 2, 0]] - p, p[:, [2, 0, 1]] - p
            cos = (u * w).sum(-1) / (u.norm(dim=-1) * w.norm(dim=-1)).clamp_min(torch.finfo(x.dtype).tiny)
            ang = torch.arccos(cos.clamp(-1.0, 1.0))  # (F, 3) corner angles
            vert = torch.zeros_like(x).index_add_(0, f.reshape(-1), (ang[..., None] * n[:, None]).reshape(-1, 3))
            boundary = (nb < 0)
            if bool(boundary.any()):
                ends = torch.stack([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], 1)  # (F, 3, 2)
                r = (0.5 * math.pi * rim * boundary[..., None])[:, :, None].expand(-1, -1, 2, -1)
                vert.index_add_(0, ends.reshape(-1), r.reshape(-1, 3))
            q = face_ids
            return torch.cat([edge[q], vert[f[q]]], 1)


def closest_point_on_triangle(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                              feature_normals: torch.Tensor | None = None):
    """Signed distance of points to triangles, its gradient, and the closest point's weights.

    Args:
        p, a, b, c: Points and triangle corners [m], each (..., 3) (counter-clockwise seen from
            the positive side).
        feature_normals: Optional (..., 6, 3) pseudo-normals of the triangle's edges (ab, bc, ca)
            and vertices (a, b, c) (:meth:`SurfaceTopology.feature_normals`): where the closest
            point is on an edge or a vertex, the sign is the side of its pseudo-normal instead of
            the side of this triangle's plane (which misreads points in or near the plane beyond
            the edge).

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
    if feature_normals is None:
        sign_n = nh
    else:
        t = torch.where(edge == 0, t_ab, torch.where(edge == 1, t_bc, t_ca))
        # edge k runs from vertex k to vertex (k + 1) % 3; an end of it (t = 0 or 1) is a vertex
        row = torch.where(t <= 0, 3 + edge, torch.where(t >= 1, 3 + (edge + 1) % 3, edge))
        sign_n = feature_normals.gather(-2, row[..., None, None].expand(*row.shape, 1, 3)).squeeze(-2)
    side = torch.where((diff * sign_n).sum(-1) >= 0, 1.0, -1.0).to(p.dtype)
    plane = (ap * nh).sum(-1)
    phi = torch.where(inside, plane, side * dist)
    normal = torch.where(inside.unsqueeze(-1), nh, (side / dist).unsqueeze(-1) * diff)
    return phi, normal, bary
