"""The closest gel triangles of points, for the couplings of FEM gels with particles (MPM,
:mod:`~diffworld.sims.coupling.fem_mpm`) and cables (:mod:`~diffworld.sims.coupling.fem_cable`): a
Warp BVH (``wp.Mesh``) over a gel's triangles, refit to its node positions before each query,
built and refit on torch's current stream. The ids are a discrete choice (no gradient); the
couplings differentiate the distances to the triangles they name.
"""

from __future__ import annotations

import torch
import warp as wp

from diffworld.engine.bridge import launch, on_torch_stream, to_warp
from diffworld.engine.runtime import init_warp
from diffworld.geometry.triangles import closest_point_on_triangle

__all__ = ["GelBvh", "one_rings"]

init_warp()


@wp.kernel(enable_backward=False)
def _closest_face(mesh: wp.uint64, points: wp.array(dtype=wp.vec3), max_dist: float, face: wp.array(dtype=wp.int32)):
    i = wp.tid()
    q = wp.mesh_query_point_no_sign(mesh, points[i], max_dist)
    if q.result:
        face[i] = q.face
    else:
        face[i] = -1


def one_rings(faces: torch.Tensor) -> torch.Tensor:
    """For every face, the faces that share a vertex with it (itself included), (F, R) int64,
    rows padded with the face itself."""
    n_f = faces.shape[0]
    fid = torch.arange(n_f, device=faces.device).repeat_interleave(3)
    vert = faces.reshape(-1)
    # pairs (face, other face) through each shared vertex
    order = torch.argsort(vert, stable=True)
    v_sorted, f_sorted = vert[order], fid[order]
    _, counts = torch.unique_consecutive(v_sorted, return_counts=True)
    rings: list[set] = [set() for _ in range(n_f)]
    for group in f_sorted.split(counts.tolist()):
        g = group.tolist()
        for a in g:
            rings[a].update(g)
    width = max(len(r) for r in rings)
    out = torch.arange(n_f, device=faces.device)[:, None].repeat(1, width)
    for i, r in enumerate(rings):
        out[i, :len(r)] = torch.tensor(sorted(r), device=faces.device)
    return out


class GelBvh:
    """A Warp BVH over one gel's triangles, refit to new positions before each query.

    :meth:`query` is the BVH's float32 answer; :meth:`faces_of` refines it in the points' dtype
    over the one-ring of the face it returns. Without that, near a fold between two triangles the float32 query picks
    the farther one about 1e-7 relative of the coordinates too often, a jump in the distance that
    float64 finite differences see; with it the distance is the exact minimum over the
    candidates (continuous)."""

    def __init__(self, faces: torch.Tensor, n_nodes: int, device: torch.device) -> None:
        self.device = device
        self.faces = faces.to(device)
        self._rings = None  # one_rings(faces), on the first refined query
        self.points = torch.zeros((n_nodes, 3), dtype=torch.float32, device=device)
        self.indices = faces.to(device=device, dtype=torch.int32).reshape(-1).contiguous()
        self.mesh = None

    def faces_of(self, x_gel: torch.Tensor, points: torch.Tensor, max_dist: float) -> torch.Tensor:
        """Closest triangle id of each point (K,) int64, -1 beyond ``max_dist`` [m]."""
        f = self.query(x_gel, points, max_dist)
        rows = (f >= 0).nonzero()[:, 0]
        if rows.numel():
            with torch.no_grad():
                if self._rings is None:
                    self._rings = one_rings(self.faces)
                cand = self._rings[f[rows]]  # (k, R)
                tri = self.faces[cand]  # (k, R, 3)
                p = points[rows].detach().unsqueeze(1).expand(-1, cand.shape[1], -1)
                xg = x_gel.detach()
                _, _, bary = closest_point_on_triangle(p.reshape(-1, 3), *(xg[tri[..., j].reshape(-1)] for j in range(3)))
                c = (bary.unsqueeze(-1) * xg[tri.reshape(-1, 3)]).sum(1)
                dist = ((p.reshape(-1, 3) - c) ** 2).sum(-1).reshape(cand.shape)
                f = f.clone()
                f[rows] = cand.gather(1, dist.argmin(1, keepdim=True))[:, 0]
        return f

    def query(self, x_gel: torch.Tensor, points: torch.Tensor, max_dist: float) -> torch.Tensor:
        """The BVH's closest triangle of each point (K,) int64 (row of the face list), -1 beyond
        ``max_dist`` [m]: a float32 query, not refined (see :meth:`faces_of`)."""
        # nothing recorded reads these buffers (the query is not differentiated), so refitting in
        # place is safe
        self.points.copy_(x_gel.detach())
        with on_torch_stream(self.device):
            if self.mesh is None:
                self.mesh = wp.Mesh(points=to_warp(self.points, dtype=wp.vec3), indices=to_warp(self.indices))
            else:
                self.mesh.refit()
        q = points.detach().to(torch.float32).contiguous()
        out = torch.empty(q.shape[0], dtype=torch.int32, device=self.device)
        launch(_closest_face, q.shape[0], [self.mesh.id, to_warp(q, dtype=wp.vec3), float(max_dist),
                                            to_warp(out)], self.device)
        return out.to(torch.int64)
