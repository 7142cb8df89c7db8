"""Signed distance to triangle sets by closest triangle: the sign at edges and vertices.

The couplings take the closest triangle of a point and sign the distance; where the closest
point is on an edge or a vertex, the side of that one triangle's plane misreads points in or
near the plane beyond the edge (a block's grid nodes beside a gel pad read as centimetres inside
it). The pseudo-normals of :class:`SurfaceTopology` must give the exact sign on closed surfaces
and read an open surface's rim as a square slab edge.
"""

from __future__ import annotations

import torch

from diffworld.geometry.triangles import SurfaceTopology, closest_point_on_triangle


def _box_mesh(h):
    """A closed box [-h, h] split into 2 x 2 squares per face (so it has interior edges,
    vertices of valence 4 and 5), outward counter-clockwise triangles."""
    import trimesh

    m = trimesh.creation.box(extents=(2 * h[0], 2 * h[1], 2 * h[2]))
    m = m.subdivide()
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.int64)


def _signed(points, x, faces, topo):
    """Brute force: the closest triangle of every point, then the signed distance."""
    P = points[:, None].expand(-1, faces.shape[0], -1)
    a, b, c = (x[faces[:, j]][None].expand_as(P) for j in range(3))
    _, _, bary = closest_point_on_triangle(P, a, b, c)
    q = (bary[..., None] * torch.stack([a, b, c], -2)).sum(-2)
    f = ((P - q) ** 2).sum(-1).argmin(1)
    tri = faces[f]
    fn = None if topo is None else topo.feature_normals(x, f)
    phi, n, _ = closest_point_on_triangle(points, x[tri[:, 0]], x[tri[:, 1]], x[tri[:, 2]], fn)
    return phi, n


def _box_sdf(p, h):
    q = p.abs() - h
    return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)


def test_closed_box_sign_is_exact_near_edges_and_corners():
    h = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64)
    x, faces = _box_mesh(h)
    topo = SurfaceTopology(faces)
    g = torch.Generator().manual_seed(0)
    # random points near the surface, then many exactly in the planes of faces (beyond their rims)
    p = (torch.rand(2000, 3, generator=g, dtype=torch.float64) * 2 - 1) * (h + 0.3)
    planar = (torch.rand(600, 3, generator=g, dtype=torch.float64) * 2 - 1) * (h + 0.3)
    axis = torch.randint(0, 3, (600,), generator=g)
    sgn = torch.where(torch.rand(600, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    planar[torch.arange(600), axis] = sgn * h[axis]
    pts = torch.cat([p, planar])
    d_true = _box_sdf(pts, h)
    keep = d_true.abs() > 1e-9  # exactly on the surface: either sign is right
    phi, n = _signed(pts, x, faces, topo)
    assert torch.allclose(phi.abs(), d_true.abs(), atol=1e-12)
    assert bool((torch.sign(phi[keep]) == torch.sign(d_true[keep])).all())
    # the normal is d phi / d p: compare with finite differences of the true SDF away from the
    # medial axis (the points where the box's outside is smooth)
    out = d_true > 1e-3
    e = 1e-6
    grad = torch.stack([(_box_sdf(pts + e * torch.eye(3, dtype=torch.float64)[k], h) -
                         _box_sdf(pts - e * torch.eye(3, dtype=torch.float64)[k], h)) / (2 * e) for k in range(3)], -1)
    # (FD truncation reaches 1e-4 for points within 1e-3 of an edge, where the SDF curves fast)
    assert torch.allclose(n[out], grad[out], atol=2e-4)


def test_open_square_rim_reads_as_a_slab_edge():
    # a flat square [0, 1]^2 at z = 0, normal +z, 4 x 4 cells: a gel's contact face
    n = 4
    ii, jj = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    x = torch.stack([ii.reshape(-1) / n, jj.reshape(-1) / n, torch.zeros((n + 1) ** 2)], -1).to(torch.float64)
    v = lambda i, j: i * (n + 1) + j  # noqa: E731
    faces = torch.tensor([t for i in range(n) for j in range(n)
                          for t in ((v(i, j), v(i + 1, j), v(i + 1, j + 1)), (v(i, j), v(i + 1, j + 1), v(i, j + 1)))])
    topo = SurfaceTopology(faces)
    assert int((topo.neighbour < 0).sum()) == 4 * n  # the rim
    g = torch.Generator().manual_seed(1)
    # beyond the rim, in the plane or in front of it or behind it at less than 45 degrees: outside
    t = torch.rand(400, generator=g, dtype=torch.float64)
    off = 0.05 + torch.rand(400, generator=g, dtype=torch.float64)
    z = (torch.rand(400, generator=g, dtype=torch.float64) * 2 - 1) * 0.99 * off
    z[:100] = 0.0
    side = torch.randint(0, 4, (400,), generator=g)
    px = torch.where(side == 0, -off, torch.where(side == 1, 1 + off, t))
    py = torch.where(side == 2, -off, torch.where(side == 3, 1 + off, t))
    pts = torch.stack([px, py, z], -1)
    phi, _ = _signed(pts, x, faces, topo)
    assert bool((phi > 0).all())
    # the side of the face's plane alone misreads points nearly in the plane beyond the rim
    pts[:100, 2] = -1e-12
    phi, _ = _signed(pts[:100], x, faces, None)
    assert bool((phi < -0.04).all())
    phi, _ = _signed(pts[:100], x, faces, topo)
    assert bool((phi > 0.04).all())
    # over the face: the plane distance with its sign; far behind the rim (steeper than 45 deg): inside
    q = torch.rand(300, 3, generator=g, dtype=torch.float64)
    q[:, 2] = q[:, 2] * 2 - 1
    phi, _ = _signed(q, x, faces, topo)
    assert torch.allclose(phi, q[:, 2], atol=1e-14)
    behind = torch.tensor([[-0.1, 0.5, -0.5], [1.1, 0.2, -0.3], [-0.05, -0.05, -0.4]], dtype=torch.float64)
    phi, _ = _signed(behind, x, faces, topo)
    assert bool((phi < 0).all())
