"""Surface reconstruction metrics and a differentiable Chamfer loss, on KD-trees.

Nearest neighbours come from ``scipy.spatial.cKDTree`` (queries on all cores, ``workers=-1``).

Sampling, so that the cost stays bounded (``max_queries``, default :data:`MAX_QUERIES`):

* the distances are measured *from* at most ``max_queries`` points of each side (a uniform subset
  drawn without replacement by a generator seeded with ``seed``; a side with no more points than
  that is used whole) *to all* points of the other side, which keeps the sample spacing of the
  full sets (and so the metrics' floor for a good fit);
* a distance up to ``FAR_THRESHOLDS * threshold`` [m] is exact; a point farther than that from the
  other side (a failed or unfitted region) is matched within a uniform subset of ``max_queries``
  points of the other side instead. That can only overstate its distance, by at most the subset's
  spacing and, on a smooth surface, by about ``spacing^2 / (2 d)`` (0.02 % for the collapsed case
  below).

Why: a KD-tree query costs as much as the whole tree when the point lies far inside a closed
surface (every cell of a sphere of samples is about as far from its centre). The starting sphere
of ``scenes/reconstruct_genus2.yaml`` measured against its genus-2 target (200k points a side) took
33 s on two cores with every point queried exactly and takes 1-2 s; a result collapsed to a blob
inside a sphere of 200k samples takes 2 s (minutes exactly); a good fit takes a fraction of a
second either way. The means, shares and normal metrics estimate their all-points values
(standard error about ``std / sqrt(max_queries)``); ``hausdorff`` is the largest distance over the
queried points, so for a good fit it is at most the all-points maximum. ``max_queries=None``
measures from every point, exactly.

Definitions (``P`` predicted points, ``G`` ground truth, ``P'`` and ``G'`` their queried subsets,
``d(x, S)`` the Euclidean distance from ``x`` to its nearest neighbour in ``S``):

* ``chamfer_l1 = (mean_{p in P'} d(p, G) + mean_{g in G'} d(g, P)) / 2`` [m],
* ``chamfer_l2``: the same with squared distances [m^2],
* ``precision = share of P' with d(p, G) < threshold``, ``recall = share of G' with d(g, P) <
  threshold``, ``fscore`` their harmonic mean (0 when both are 0),
* ``normal_consistency = (mean_P' |n_p . n_nn(p)| + mean_G' |n_g . n_nn(g)|) / 2`` (normals
  normalized first; orientation-insensitive),
* ``normals_off_5deg``: the same two-direction average of the share of points whose normal is
  more than 5 degrees off the nearest neighbour's (orientation-insensitive),
* ``hausdorff = max(max_P' d(p, G), max_G' d(g, P))`` [m].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.sampling import sample_surface

__all__ = [
    "FAR_THRESHOLDS",
    "MAX_QUERIES",
    "ChamferLoss",
    "SurfaceMetrics",
    "chamfer_loss",
    "chamfer_terms",
    "nearest_indices",
    "mesh_metrics",
    "mesh_to_points_metrics",
    "point_metrics",
    "triangle_quality",
]

_COS_5DEG = math.cos(math.radians(5.0))

#: Default bound on the points of each side whose nearest-neighbour distances are measured (see
#: the module docstring): a mean over 10k points has a standard error of 1 % of the distances'
#: standard deviation, and the worst cases measured take 1-2 s on two cores.
MAX_QUERIES = 10_000

#: Distances up to this many F-score thresholds are exact; a point farther from the other side
#: (a failed or unfitted region) is matched within a subset of it (see the module docstring).
FAR_THRESHOLDS = 10.0


class SurfaceMetrics(NamedTuple):
    """Distances between two sampled surfaces (see the module docstring for definitions).

    With an empty side the distances are ``inf``, precision/recall/fscore 0 and the normal
    metrics NaN; without normals the normal metrics are NaN.

    Attributes:
        chamfer_l1: [m].
        chamfer_l2: [m^2].
        precision: In [0, 1].
        recall: In [0, 1].
        fscore: In [0, 1].
        normal_consistency: In [0, 1]; 1 is perfect.
        normals_off_5deg: In [0, 1]; 0 is perfect.
        hausdorff: [m].
        threshold: The F-score distance threshold [m].
        queried_pred: Predicted points whose distances were measured (all, or ``max_queries``).
        queried_gt: Ground-truth points whose distances were measured (all, or ``max_queries``).
    """

    chamfer_l1: float
    chamfer_l2: float
    precision: float
    recall: float
    fscore: float
    normal_consistency: float
    normals_off_5deg: float
    hausdorff: float
    threshold: float
    queried_pred: int
    queried_gt: int

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain numbers for JSON (the counts stay ints); NaN and inf (not valid JSON) become ``None``."""
        return {k: (v if isinstance(v, int) else float(v) if math.isfinite(v) else None)
                for k, v in self._asdict().items()}


class ChamferLoss(NamedTuple):
    """Terms of :func:`chamfer_loss`, each a 0-d tensor attached to the graph.

    Attributes:
        total: ``pred_to_target + target_to_pred + normal_weight * normal``.
        pred_to_target: Mean squared distance from each predicted point to its nearest target [m^2].
        target_to_pred: Mean squared distance from each target point to its nearest prediction [m^2].
        normal: Mean of ``1 - |n_pred . n_target|`` over the matched pairs of both directions
            (averaged like the distances); 0 when normals are not supplied.
    """

    total: torch.Tensor
    pred_to_target: torch.Tensor
    target_to_pred: torch.Tensor
    normal: torch.Tensor


def _check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"Expected 'threshold' to be a number, got {type(threshold).__name__}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"Expected 'threshold' to be a finite number > 0, got {threshold!r}")
    return t


def _as_numpy(name: str, t, n: int | None = None) -> np.ndarray:
    check_tensor(name, t, shape=(n, 3))
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


def _check_max_queries(max_queries) -> int | None:
    if max_queries is None:
        return None
    if isinstance(max_queries, bool) or not isinstance(max_queries, (int, np.integer)):
        raise TypeError(f"Expected 'max_queries' to be an int or None, got {type(max_queries).__name__}")
    if max_queries < 1:
        raise ValueError(f"Expected 'max_queries' >= 1 or None, got {max_queries}")
    return int(max_queries)


def _queried(n: int, max_queries: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of the points of a side of ``n`` whose distances are measured: all of
    them, or a uniform subset of ``max_queries`` drawn without replacement."""
    if max_queries is None or n <= max_queries:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_queries, replace=False))


def _unit(n: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def _tree(points: np.ndarray):
    """A KD-tree with sliding-midpoint splits (``balanced_tree=False``, about twice as fast to
    build as median splits) and 32-point leaves (about 25% faster queries than the default 16 when
    the two sets are offset by more than their spacing, the usual case for metrics)."""
    from scipy.spatial import cKDTree

    return cKDTree(points, leafsize=32, balanced_tree=False)


def _nearest(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each ``src`` point to its nearest ``dst`` point, and that point's index."""
    return _tree(dst).query(src, k=1, workers=-1)


def _nearest_near_exact(src: np.ndarray, dst: np.ndarray, far: float, n_far: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_nearest`, exact within ``far`` [m]; a ``src`` point with no ``dst`` point that close
    is matched within a uniform subset of ``n_far`` ``dst`` points instead (see the module
    docstring), which keeps the cost of such points to ``n_far`` each."""
    d, i = _tree(dst).query(src, k=1, distance_upper_bound=far, workers=-1)
    out = ~np.isfinite(d)
    if out.any():
        sub = _queried(dst.shape[0], n_far, rng)
        d[out], i_sub = _tree(dst[sub]).query(src[out], k=1, workers=-1)
        i[out] = sub[i_sub]
    return d, i


def point_metrics(pred_points: torch.Tensor, pred_normals: torch.Tensor | None, gt_points: torch.Tensor,
                  gt_normals: torch.Tensor | None, threshold: float = 0.01, max_queries: int | None = MAX_QUERIES,
                  seed: int = 0) -> SurfaceMetrics:
    """Metrics between two point sets (e.g. surface samples).

    Args:
        pred_points: [m], shape (N, 3).
        pred_normals: Shape (N, 3) or ``None``; need not be unit or oriented.
        gt_points: [m], shape (M, 3).
        gt_normals: Shape (M, 3) or ``None``.
        threshold: F-score distance threshold [m], > 0.
        max_queries: Points of each side whose distances are measured (a seeded uniform subset,
            see the module docstring), >= 1; ``None`` measures from every point.
        seed: Seed of the subset's generator; same inputs and seed give the same numbers.

    Returns:
        :class:`SurfaceMetrics`; the normal metrics are NaN unless both normal sets are given.

    Raises:
        TypeError, ValueError: Bad tensors (naming the argument), threshold or max_queries.
    """
    threshold = _check_threshold(threshold)
    max_queries = _check_max_queries(max_queries)
    p = _as_numpy("pred_points", pred_points)
    g = _as_numpy("gt_points", gt_points)
    pn = None if pred_normals is None else _as_numpy("pred_normals", pred_normals, p.shape[0])
    gn = None if gt_normals is None else _as_numpy("gt_normals", gt_normals, g.shape[0])
    nan = float("nan")
    if p.shape[0] == 0 or g.shape[0] == 0:
        inf = float("inf")
        return SurfaceMetrics(inf, inf, 0.0, 0.0, 0.0, nan, nan, inf, threshold, 0, 0)

    rng = np.random.default_rng(int(seed))
    qp, qg = _queried(p.shape[0], max_queries, rng), _queried(g.shape[0], max_queries, rng)
    if max_queries is None:
        (d_pg, i_pg), (d_gp, i_gp) = _nearest(p, g), _nearest(g, p)
    else:
        far = FAR_THRESHOLDS * threshold
        d_pg, i_pg = _nearest_near_exact(p[qp], g, far, max_queries, rng)
        d_gp, i_gp = _nearest_near_exact(g[qg], p, far, max_queries, rng)
    chamfer_l1 = 0.5 * (float(d_pg.mean()) + float(d_gp.mean()))
    chamfer_l2 = 0.5 * (float(np.square(d_pg).mean()) + float(np.square(d_gp).mean()))
    precision = float((d_pg < threshold).mean())
    recall = float((d_gp < threshold).mean())
    fscore = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    hausdorff = max(float(d_pg.max()), float(d_gp.max()))

    nc = off = nan
    if pn is not None and gn is not None:
        pn, gn = _unit(pn), _unit(gn)
        cos_pg = np.abs(np.einsum("ij,ij->i", pn[qp], gn[i_pg]))
        cos_gp = np.abs(np.einsum("ij,ij->i", gn[qg], pn[i_gp]))
        nc = 0.5 * (float(cos_pg.mean()) + float(cos_gp.mean()))
        off = 0.5 * (float((cos_pg < _COS_5DEG).mean()) + float((cos_gp < _COS_5DEG).mean()))
    return SurfaceMetrics(chamfer_l1, chamfer_l2, precision, recall, fscore, nc, off, hausdorff, threshold,
                          int(qp.size), int(qg.size))


def _samples(vertices: torch.Tensor, faces: torch.Tensor, n: int, gen: torch.Generator, vname: str, fname: str):
    from diffworld.geometry.mesh_ops import check_mesh

    vertices, faces = check_mesh(vertices, faces, vertices_name=vname, faces_name=fname)
    with torch.no_grad():
        s = sample_surface(vertices.detach().cpu(), faces.cpu(), n, generator=gen)
    return s.points, s.normals


def _check_n_points(n_points) -> int:
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)):
        raise TypeError(f"Expected 'n_points' to be an int, got {type(n_points).__name__}")
    if n_points < 1:
        raise ValueError(f"Expected 'n_points' >= 1, got {n_points}")
    return int(n_points)


def mesh_metrics(pred_vertices: torch.Tensor, pred_faces: torch.Tensor, gt_vertices: torch.Tensor,
                 gt_faces: torch.Tensor, n_points: int = 200_000, threshold: float = 0.01,
                 seed: int = 0, max_queries: int | None = MAX_QUERIES) -> SurfaceMetrics:
    """Metrics between two meshes, each sampled uniformly by area with face normals.

    Args:
        pred_vertices: [m], shape (V, 3).
        pred_faces: Integer indices, shape (F, 3).
        gt_vertices: [m], shape (V', 3).
        gt_faces: Integer indices, shape (F', 3).
        n_points: Samples per mesh, >= 1.
        threshold: F-score distance threshold [m], > 0.
        seed: Seed of the (CPU) sampling and query-subset generators; same inputs and seed give
            the same numbers.
        max_queries: Samples of each mesh whose distances are measured (see :func:`point_metrics`).

    Returns:
        :class:`SurfaceMetrics`.
    """
    n_points = _check_n_points(n_points)
    threshold = _check_threshold(threshold)
    max_queries = _check_max_queries(max_queries)
    gen = torch.Generator().manual_seed(int(seed))
    pp, pn = _samples(pred_vertices, pred_faces, n_points, gen, "pred_vertices", "pred_faces")
    gp, gn = _samples(gt_vertices, gt_faces, n_points, gen, "gt_vertices", "gt_faces")
    return point_metrics(pp, pn, gp, gn, threshold, max_queries, seed)


def mesh_to_points_metrics(pred_vertices: torch.Tensor, pred_faces: torch.Tensor, gt_points: torch.Tensor,
                           gt_normals: torch.Tensor | None = None, n_points: int = 200_000,
                           threshold: float = 0.01, seed: int = 0,
                           max_queries: int | None = MAX_QUERIES) -> SurfaceMetrics:
    """Metrics between a mesh (sampled uniformly by area) and a ground-truth point cloud.

    Args:
        pred_vertices: [m], shape (V, 3).
        pred_faces: Integer indices, shape (F, 3).
        gt_points: [m], shape (M, 3), used as given.
        gt_normals: Shape (M, 3) or ``None`` (then the normal metrics are NaN).
        n_points: Samples on the mesh, >= 1.
        threshold: F-score distance threshold [m], > 0.
        seed: Seed of the sampling and query-subset generators.
        max_queries: Points of each side whose distances are measured (see :func:`point_metrics`).

    Returns:
        :class:`SurfaceMetrics`.
    """
    n_points = _check_n_points(n_points)
    threshold = _check_threshold(threshold)
    max_queries = _check_max_queries(max_queries)
    gen = torch.Generator().manual_seed(int(seed))
    pp, pn = _samples(pred_vertices, pred_faces, n_points, gen, "pred_vertices", "pred_faces")
    return point_metrics(pp, pn, gt_points, gt_normals, threshold, max_queries, seed)


def nearest_indices(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``dst`` point of every ``src`` point (exact, KD-tree on the CPU).

    Args:
        src: [m], shape (N, 3).
        dst: [m], shape (M, 3), M >= 1.

    Returns:
        int64 indices into ``dst``, shape (N,), on the device of ``src``.
    """
    _, i = _nearest(src.detach().cpu().numpy(), dst.detach().cpu().numpy())
    return torch.from_numpy(i.astype(np.int64)).to(src.device)


def chamfer_terms(points: torch.Tensor, target: torch.Tensor, normals: torch.Tensor | None = None,
                  target_normals: torch.Tensor | None = None, oriented: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The one Chamfer computation of diffworld (reconstruction, MPM losses, :func:`chamfer_loss`).

    Nearest neighbours are found on detached copies (:func:`nearest_indices`, both directions);
    the matched squared distances are recomputed in torch, so gradients flow to both point sets
    (the assignment is piecewise constant and not differentiated: exact wherever it does not
    change). No argument checks: callers validate.

    Args:
        points: (N, 3) [m], N >= 1.
        target: (M, 3) [m], M >= 1.
        normals, target_normals: Unit normals (N, 3) and (M, 3), or None (no normal term).
        oriented: Normal term ``1 - cos`` (an inside-out pair costs 2) instead of ``1 - |cos|``.

    Returns:
        ``(mean_i |p_i - t_nn(i)|^2, mean_j |t_j - p_nn(j)|^2, normal term or None)`` [m^2, m^2, -];
        the normal term averages ``1 - cos`` over the pairs of both directions.
    """
    i_pt, i_tp = nearest_indices(points, target), nearest_indices(target, points)
    to_target = (points - target[i_pt]).square().sum(-1).mean()
    to_points = (target - points[i_tp]).square().sum(-1).mean()
    if normals is None or target_normals is None:
        return to_target, to_points, None
    cos_pt = (normals * target_normals[i_pt]).sum(-1)
    cos_tp = (target_normals * normals[i_tp]).sum(-1)
    if not oriented:
        cos_pt, cos_tp = cos_pt.abs(), cos_tp.abs()
    return to_target, to_points, 0.5 * ((1.0 - cos_pt).mean() + (1.0 - cos_tp).mean())


def chamfer_loss(pred_points: torch.Tensor, target_points: torch.Tensor, target_normals: torch.Tensor | None = None,
                 pred_normals: torch.Tensor | None = None, normal_weight: float = 1.0) -> ChamferLoss:
    """Differentiable symmetric squared Chamfer distance (plus an optional normal term).

    Nearest neighbours are found on detached copies with KD-trees (both directions); the matched
    distances are then recomputed in torch, so gradients flow to ``pred_points`` (and to
    ``target_points`` / the normals if they require grad). The assignment itself is piecewise
    constant and not differentiated, which is exact wherever it does not change.

    Args:
        pred_points: [m], shape (N, 3), N >= 1; differentiable.
        target_points: [m], shape (M, 3), M >= 1; same dtype and device.
        target_normals: Shape (M, 3) or ``None``.
        pred_normals: Shape (N, 3) or ``None``; with ``target_normals`` it enables the normal term.
            Both are normalized inside (safely), so unnormalized normals are fine.
        normal_weight: Weight of the normal term in ``total``.

    Returns:
        :class:`ChamferLoss`.

    Raises:
        TypeError, ValueError: Bad tensors, empty point sets, mismatched dtype/device, or
            ``pred_normals`` without ``target_normals``.
    """
    from diffworld.geometry.mesh_ops import _safe_normalize

    check_tensor("pred_points", pred_points, shape=(None, 3))
    check_tensor("target_points", target_points, shape=(None, 3))
    for name, t in (("pred_points", pred_points), ("target_points", target_points)):
        if t.shape[0] == 0:
            raise ValueError(f"Expected '{name}' with at least one point, got shape {tuple(t.shape)}")
    if target_points.dtype != pred_points.dtype or target_points.device != pred_points.device:
        raise ValueError(f"Expected 'target_points' with the dtype/device of 'pred_points' "
                         f"({pred_points.dtype}, {pred_points.device}), got ({target_points.dtype}, "
                         f"{target_points.device})")
    if pred_normals is not None:
        check_tensor("pred_normals", pred_normals, shape=(pred_points.shape[0], 3))
        if target_normals is None:
            raise ValueError("'pred_normals' was given without 'target_normals'; the normal term needs both")
    if target_normals is not None:
        check_tensor("target_normals", target_normals, shape=(target_points.shape[0], 3))
    normal_weight = float(normal_weight)

    if pred_normals is not None and target_normals is not None:
        pred_normals, target_normals = _safe_normalize(pred_normals), _safe_normalize(target_normals)
    else:
        pred_normals = target_normals = None
    pred_to_target, target_to_pred, normal = chamfer_terms(pred_points, target_points, pred_normals, target_normals)
    if normal is None:
        normal = pred_to_target.new_zeros(())
    total = pred_to_target + target_to_pred + normal_weight * normal
    return ChamferLoss(total, pred_to_target, target_to_pred, normal)


def triangle_quality(vertices: torch.Tensor, faces: torch.Tensor, small_angle_deg: float = 10.0) -> dict[str, float]:
    """Shape quality of a triangle mesh: the spread of its edge lengths (standard deviation over
    mean, 0 for equal edges) and the share of triangles whose smallest angle is under
    ``small_angle_deg`` (slivers), with the smallest angle [degrees].

    Degenerate triangles (zero area) count as slivers with angle 0.
    """
    v = vertices.detach().double()
    f = faces.long()
    if f.shape[0] == 0:
        return {"edge_length_spread": 0.0, "small_angle_share": 0.0, "min_angle_deg": 0.0}
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    lengths = torch.stack([(b - a).norm(dim=1), (c - b).norm(dim=1), (a - c).norm(dim=1)], 1)

    def angle(p, q, r):  # at p
        u, w = q - p, r - p
        den = (u.norm(dim=1) * w.norm(dim=1)).clamp_min(1e-300)
        return torch.rad2deg(torch.acos(((u * w).sum(1) / den).clamp(-1, 1)))

    ang = torch.stack([angle(a, b, c), angle(b, c, a), angle(c, a, b)], 1).min(1).values
    ang = torch.where(lengths.min(1).values > 0, ang, torch.zeros_like(ang))
    e = lengths.reshape(-1)
    return {"edge_length_spread": float(e.std() / e.mean().clamp_min(1e-300)),
            "small_angle_share": float((ang < small_angle_deg).double().mean()),
            "min_angle_deg": float(ang.min())}
