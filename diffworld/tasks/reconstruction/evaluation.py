"""Measuring a reconstruction: distances to the reference, topology and open boundaries."""

from __future__ import annotations


import torch

from diffworld.tasks.reconstruction.config import EvaluationConfig
from diffworld.tasks.reconstruction.reference import Reference

__all__ = ["result_metrics"]


def _boundary_loops(edges: torch.Tensor) -> tuple[int, bool]:
    """Number of loops of a set of boundary edges (B, 2), and whether they chain into simple loops.

    Simple: every boundary vertex starts exactly one boundary edge and ends exactly one (no
    pinched vertex where two loops touch).
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges.shape[0] == 0:
        return 0, True
    e = edges.detach().cpu().numpy()
    used, inv = np.unique(e.reshape(-1), return_inverse=True)
    inv = inv.reshape(-1, 2)
    starts, ends = np.bincount(inv[:, 0], minlength=used.size), np.bincount(inv[:, 1], minlength=used.size)
    simple = bool((starts == 1).all() and (ends == 1).all())
    graph = coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(used.size, used.size))
    return int(connected_components(graph, directed=False)[0]), simple


def _boundary_edges(faces: torch.Tensor) -> torch.Tensor:
    """Directed edges (B, 2) used by exactly one face (in that face's direction)."""
    a = faces.reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    n = int(faces.max()) + 1 if faces.numel() else 1
    _, inv, counts = torch.unique(lo * n + hi, return_inverse=True, return_counts=True)
    one = counts[inv] == 1
    return torch.stack([a[one], b[one]], 1)


def result_metrics(vertices, faces, ref: Reference, cfg: EvaluationConfig, seed: int) -> dict:
    """Distances to the reference, topology, and the boundary (edges with one face: their count,
    loops and length [m]; 0 for a closed mesh; for an open registry shape also the distance to
    its true boundary [m])."""
    from diffworld.geometry.mesh_ops import mesh_report
    from diffworld.geometry.metrics import mesh_to_points_metrics

    if faces.shape[0] == 0:
        return {"empty": True}
    m = mesh_to_points_metrics(vertices.detach().double(), faces, ref.eval_points.double(),
                               None if ref.eval_normals is None else ref.eval_normals.double(),
                               n_points=cfg.n_points, threshold=cfg.threshold, seed=seed)
    rep = mesh_report(vertices.detach(), faces)
    out = m.as_dict()
    out.update(vertices=int(vertices.shape[0]), faces=int(faces.shape[0]), watertight=bool(rep.watertight),
               edge_manifold=bool(rep.edge_manifold), consistently_oriented=bool(rep.consistently_oriented),
               genus=None if rep.genus is None else float(rep.genus),
               components=int(rep.n_components), euler_characteristic=int(rep.euler_characteristic))
    from diffworld.geometry.metrics import triangle_quality

    out.update(triangle_quality(vertices, faces))
    b = _boundary_edges(faces)
    loops, simple = _boundary_loops(b)
    v = vertices.detach().double()
    out.update(boundary_edges=int(b.shape[0]), boundary_loops=loops, boundary_simple=simple,
               boundary_length=float((v[b[:, 0]] - v[b[:, 1]]).norm(dim=1).sum()))
    if ref.open is not None:
        # Symmetric mean distance [m] between the mesh boundary (its vertices) and the target's
        # boundary (dense points): where the cut is, not only how long it is.
        from scipy.spatial import cKDTree

        rim = ref.open.boundary_points(20000).numpy()
        if b.shape[0]:
            bv = v[b.reshape(-1).unique()].numpy()
            d_br = cKDTree(rim).query(bv, k=1)[0]
            d_rb = cKDTree(bv).query(rim, k=1)[0]
            out.update(boundary_chamfer_l1=0.5 * float(d_br.mean() + d_rb.mean()),
                       boundary_hausdorff=float(max(d_br.max(), d_rb.max())))
        else:
            out.update(boundary_chamfer_l1=None, boundary_hausdorff=None)
    return out
