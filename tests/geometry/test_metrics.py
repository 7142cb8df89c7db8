"""Surface metrics and the differentiable Chamfer loss: exact cases, concentric spheres, a
brute-force cross-check, gradients against float64 finite differences, empty inputs."""

import json
import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.metrics import (
    ChamferLoss,
    SurfaceMetrics,
    chamfer_loss,
    mesh_metrics,
    mesh_to_points_metrics,
    point_metrics,
)
from diffworld.geometry.sampling import sample_surface


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def directions(n, seed=0, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=gen(seed), dtype=dtype), dim=-1)


def sphere_mesh(res, r, dtype=torch.float64):
    return marching_cubes(Grid.make(res).nodes(dtype=dtype).norm(dim=-1) - r)


# --- point_metrics --------------------------------------------------------------------------------

def test_identical_sets_are_perfect():
    p = directions(5000) * 0.4
    m = point_metrics(p, p, p, p, threshold=0.01)
    assert isinstance(m, SurfaceMetrics)
    assert m.chamfer_l1 == 0.0 and m.chamfer_l2 == 0.0 and m.hausdorff == 0.0
    assert m.precision == m.recall == m.fscore == 1.0
    assert m.normal_consistency == pytest.approx(1.0, abs=1e-12)
    assert m.normals_off_5deg == 0.0 and m.threshold == 0.01
    # Flipped normals count as consistent (orientation-insensitive).
    assert point_metrics(p, -p, p, p).normal_consistency == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("delta", [0.005, 0.02])
def test_concentric_spheres_exact(delta):
    # Same directions at radii r and r + delta: every nearest neighbour is exactly delta away.
    r = 0.4
    u = directions(20_000, seed=1)
    m = point_metrics(u * r, u, u * (r + delta), u, threshold=2 * delta)
    assert m.chamfer_l1 == pytest.approx(delta, rel=1e-9)
    assert m.chamfer_l2 == pytest.approx(delta**2, rel=1e-9)
    assert m.hausdorff == pytest.approx(delta, rel=1e-9)
    assert m.fscore == 1.0 and m.normal_consistency == pytest.approx(1.0) and m.normals_off_5deg == 0.0
    below = point_metrics(u * r, u, u * (r + delta), u, threshold=0.5 * delta)
    assert below.precision == below.recall == below.fscore == 0.0


def test_mesh_spheres_chamfer_is_the_radius_gap():
    delta = 0.02
    pred = sphere_mesh(64, 0.4)
    gt = sphere_mesh(64, 0.4 + delta)
    m = mesh_metrics(*pred, *gt, n_points=50_000, threshold=2 * delta, seed=0)
    assert m.chamfer_l1 == pytest.approx(delta, rel=0.05)
    assert m.hausdorff < 1.5 * delta
    assert m.fscore == 1.0
    assert m.normal_consistency > 0.99
    assert mesh_metrics(*pred, *gt, n_points=50_000, threshold=0.5 * delta).fscore == 0.0
    # Reproducible with the seed.
    assert mesh_metrics(*pred, *gt, n_points=10_000, seed=3) == mesh_metrics(*pred, *gt, n_points=10_000, seed=3)


def test_mesh_to_points_metrics():
    delta = 0.01
    pred = sphere_mesh(64, 0.4)
    u = directions(50_000, seed=2)
    gt_points = u * (0.4 + delta)
    m = mesh_to_points_metrics(*pred, gt_points, u, n_points=50_000, threshold=3 * delta)
    assert m.chamfer_l1 == pytest.approx(delta, rel=0.1) and m.fscore == 1.0
    assert m.normal_consistency > 0.99
    no_normals = mesh_to_points_metrics(*pred, gt_points, n_points=20_000)
    assert math.isnan(no_normals.normal_consistency) and math.isnan(no_normals.normals_off_5deg)


def test_matches_brute_force():
    g = gen(5)
    p = torch.rand(700, 3, generator=g, dtype=torch.float64)
    q = torch.rand(900, 3, generator=g, dtype=torch.float64) * 1.1
    pn = torch.randn(700, 3, generator=g, dtype=torch.float64)
    qn = torch.randn(900, 3, generator=g, dtype=torch.float64)
    t = 0.05
    m = point_metrics(p, pn, q, qn, threshold=t)
    d = torch.cdist(p, q)
    d_pq, i_pq = d.min(1)
    d_qp, i_qp = d.min(0)
    unit = torch.nn.functional.normalize
    cos_pq = (unit(pn, dim=-1) * unit(qn, dim=-1)[i_pq]).sum(-1).abs()
    cos_qp = (unit(qn, dim=-1) * unit(pn, dim=-1)[i_qp]).sum(-1).abs()
    prec, rec = float((d_pq < t).double().mean()), float((d_qp < t).double().mean())
    assert m.chamfer_l1 == pytest.approx(0.5 * float(d_pq.mean() + d_qp.mean()), rel=1e-12)
    assert m.chamfer_l2 == pytest.approx(0.5 * float((d_pq**2).mean() + (d_qp**2).mean()), rel=1e-12)
    assert m.precision == pytest.approx(prec) and m.recall == pytest.approx(rec)
    assert m.fscore == pytest.approx(2 * prec * rec / (prec + rec))
    assert m.hausdorff == pytest.approx(float(torch.maximum(d_pq.max(), d_qp.max())), rel=1e-12)
    assert m.normal_consistency == pytest.approx(0.5 * float(cos_pq.mean() + cos_qp.mean()), rel=1e-12)
    cos5 = math.cos(math.radians(5))
    off = 0.5 * float((cos_pq < cos5).double().mean() + (cos_qp < cos5).double().mean())
    assert m.normals_off_5deg == pytest.approx(off, rel=1e-12)


def test_normals_off_5_degrees():
    p = torch.zeros(2, 3, dtype=torch.float64)
    p[1, 0] = 1.0
    n_gt = torch.tensor([[0.0, 0, 1], [0, 0, 1]], dtype=torch.float64)
    tilt = lambda deg: [math.sin(math.radians(deg)), 0.0, math.cos(math.radians(deg))]  # noqa: E731
    n_pred = torch.tensor([tilt(4.0), tilt(6.0)], dtype=torch.float64)
    m = point_metrics(p, n_pred, p, n_gt)
    assert m.normals_off_5deg == pytest.approx(0.5)
    assert m.normal_consistency == pytest.approx(0.5 * (math.cos(math.radians(4)) + math.cos(math.radians(6))))


def test_no_normals_empty_sets_and_json():
    p = directions(100)
    m = point_metrics(p, None, p, None)
    assert math.isnan(m.normal_consistency) and math.isnan(m.normals_off_5deg)
    d = m.as_dict()
    assert d["normal_consistency"] is None and d["chamfer_l1"] == 0.0
    json.dumps(d, allow_nan=False)
    e = point_metrics(torch.zeros((0, 3)), None, p, None)
    assert math.isinf(e.chamfer_l1) and math.isinf(e.hausdorff) and e.fscore == 0.0
    json.dumps(e.as_dict(), allow_nan=False)
    # A mesh with no faces samples nothing: the same "failed reconstruction" numbers.
    empty = mesh_metrics(torch.zeros((0, 3)), torch.zeros((0, 3), dtype=torch.int64), *sphere_mesh(16, 0.4),
                         n_points=1000)
    assert math.isinf(empty.chamfer_l1) and empty.recall == 0.0


def test_metrics_validation():
    p = directions(10)
    with pytest.raises(ValueError, match="'threshold'"):
        point_metrics(p, None, p, None, threshold=0.0)
    with pytest.raises(ValueError, match="'gt_normals' of shape"):
        point_metrics(p, None, p, p[:5])
    with pytest.raises(ValueError, match="'pred_points' of shape"):
        point_metrics(p[:, :2], None, p, None)
    with pytest.raises(ValueError, match="'n_points' >= 1"):
        mesh_metrics(*sphere_mesh(8, 0.4), *sphere_mesh(8, 0.4), n_points=0)


# --- chamfer_loss ---------------------------------------------------------------------------------

def test_chamfer_loss_values():
    t = directions(3000, seed=3) * 0.4
    loss = chamfer_loss(t, t)
    assert isinstance(loss, ChamferLoss)
    assert float(loss.total) == 0.0 and float(loss.normal) == 0.0
    # A shift much smaller than the point spacing keeps the pairing: both terms are |c|^2.
    c = torch.tensor([1e-4, -2e-4, 5e-5], dtype=torch.float64)
    shifted = chamfer_loss(t + c, t)
    assert float(shifted.pred_to_target) == pytest.approx(float(c @ c), rel=1e-9)
    assert float(shifted.target_to_pred) == pytest.approx(float(c @ c), rel=1e-9)
    # The normal term: 1 - |cos| averaged; perpendicular normals give 1, flipped ones 0.
    n = directions(3000, seed=3)
    assert float(chamfer_loss(t, t, n, pred_normals=-n).normal) == pytest.approx(0.0, abs=1e-12)
    perp = torch.nn.functional.normalize(torch.cross(n, torch.randn_like(n), dim=-1), dim=-1)
    full = chamfer_loss(t, t, n, pred_normals=perp, normal_weight=2.0)
    assert float(full.normal) == pytest.approx(1.0, abs=1e-9)
    assert float(full.total) == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize("with_normals", [False, True])
def test_chamfer_loss_gradient_matches_central_differences(with_normals):
    g = gen(9)
    pred = torch.rand(300, 3, generator=g, dtype=torch.float64)
    target = torch.rand(500, 3, generator=g, dtype=torch.float64)
    tn = torch.randn(500, 3, generator=g, dtype=torch.float64)
    pn = torch.randn(300, 3, generator=g, dtype=torch.float64)
    if with_normals:
        inputs = [pred.requires_grad_(True), pn.requires_grad_(True)]
        fn = lambda p, n: chamfer_loss(p, target, tn, pred_normals=n).total  # noqa: E731
    else:
        inputs = [pred.requires_grad_(True)]
        fn = lambda p: chamfer_loss(p, target).total  # noqa: E731
    # eps 1e-6 is far below the gaps between competing neighbour distances (spacing ~0.1), so the
    # assignments are stable; the tolerance covers round-off of an O(1) loss over 2 eps.
    checks = directional_check(fn, inputs, eps=1e-6, n_dirs=4)
    for c in checks:
        assert c.rel_error < 1e-6, checks


def test_chamfer_loss_gradient_closed_form():
    # With fixed pairings, d/dp of mean |p - t_nn(p)|^2 is 2 (p - t_nn) / N, plus the reverse terms.
    g = gen(4)
    pred = torch.rand(50, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.rand(80, 3, generator=g, dtype=torch.float64)
    chamfer_loss(pred, target).total.backward()
    d = torch.cdist(pred.detach(), target)
    i_pt, i_tp = d.argmin(1), d.argmin(0)
    expected = 2 * (pred.detach() - target[i_pt]) / 50
    expected = expected.index_add(0, i_tp, -2 * (target - pred.detach()[i_tp]) / 80)
    assert torch.allclose(pred.grad, expected, atol=1e-14)


def test_chamfer_loss_float32_and_validation():
    p = directions(100, dtype=torch.float32).requires_grad_(True)
    loss = chamfer_loss(p, directions(200, seed=1, dtype=torch.float32))
    assert loss.total.dtype == torch.float32
    loss.total.backward()
    assert p.grad.shape == (100, 3)
    t = directions(20)
    with pytest.raises(ValueError, match="'pred_points' with at least one point"):
        chamfer_loss(torch.zeros((0, 3), dtype=torch.float64), t)
    with pytest.raises(ValueError, match="'target_points' with the dtype"):
        chamfer_loss(t, t.float())
    with pytest.raises(ValueError, match="'pred_normals' was given without 'target_normals'"):
        chamfer_loss(t, t, pred_normals=t)
    with pytest.raises(ValueError, match="'target_normals' of shape"):
        chamfer_loss(t, t, t[:3])


def test_sampled_mesh_chamfer_gradient_flows_to_vertices():
    # The reconstruction use: sample a differentiable mesh, compare with a target cloud.
    v, f = sphere_mesh(12, 0.35)
    v = v.detach().requires_grad_(True)
    target = sample_surface(*sphere_mesh(24, 0.4), 4000, generator=gen(1)).points
    s = sample_surface(v, f, 4000, generator=gen(2))
    chamfer_loss(s.points, target).total.backward()
    # Growing the sphere reduces the loss: the gradient points inward (descent = outward).
    radial = v.detach() / v.detach().norm(dim=-1, keepdim=True)
    assert float((v.grad * radial).sum()) < 0


# --- bounded queries ------------------------------------------------------------------------------

def test_distances_are_measured_from_a_bounded_seeded_subset():
    g = gen(11)
    p = torch.rand(30_000, 3, generator=g, dtype=torch.float64)
    q = torch.rand(25_000, 3, generator=g, dtype=torch.float64) * 1.05
    pn, qn = directions(30_000, seed=12), directions(25_000, seed=13)
    exact = point_metrics(p, pn, q, qn, threshold=0.02, max_queries=None)
    assert (exact.queried_pred, exact.queried_gt) == (30_000, 25_000)
    m = point_metrics(p, pn, q, qn, threshold=0.02, max_queries=2_000, seed=4)
    assert (m.queried_pred, m.queried_gt) == (2_000, 2_000)
    # Means and shares estimate the all-points values; the maximum can only be lower.
    assert m.chamfer_l1 == pytest.approx(exact.chamfer_l1, rel=0.05)
    assert m.chamfer_l2 == pytest.approx(exact.chamfer_l2, rel=0.1)
    assert m.fscore == pytest.approx(exact.fscore, abs=0.03)
    assert m.normal_consistency == pytest.approx(exact.normal_consistency, abs=0.02)
    assert m.hausdorff <= exact.hausdorff
    # Seeded: the same seed gives the same numbers, another seed another subset.
    assert point_metrics(p, pn, q, qn, threshold=0.02, max_queries=2_000, seed=4) == m
    assert point_metrics(p, pn, q, qn, threshold=0.02, max_queries=2_000, seed=5) != m
    # A side no larger than the bound is used whole: the exact numbers.
    assert point_metrics(p, pn, q, qn, threshold=0.02, max_queries=30_000) == exact
    d = m.as_dict()
    assert d["queried_pred"] == 2_000 and isinstance(d["queried_pred"], int)
    with pytest.raises(ValueError, match="'max_queries' >= 1"):
        point_metrics(p, None, q, None, max_queries=0)
    with pytest.raises(TypeError, match="'max_queries'"):
        mesh_metrics(*sphere_mesh(8, 0.4), *sphere_mesh(8, 0.4), max_queries=1.5)


def test_far_points_are_matched_within_a_subset_and_near_ones_exactly():
    # Concentric spheres: every nearest neighbour is exactly delta away. Within FAR_THRESHOLDS
    # thresholds the distances are exact; beyond, matched within a subset of the other side: at
    # least the true distance, and on a smooth surface only second-order more.
    from diffworld.geometry.metrics import FAR_THRESHOLDS

    r, threshold, u = 0.4, 0.01, directions(30_000, seed=1)
    near = 0.5 * FAR_THRESHOLDS * threshold
    m = point_metrics(u * r, u, u * (r + near), u, threshold=threshold)
    assert m.chamfer_l1 == pytest.approx(near, rel=1e-9) and m.hausdorff == pytest.approx(near, rel=1e-9)
    far = 2 * FAR_THRESHOLDS * threshold
    m = point_metrics(u * r, u, u * (r + far), u, threshold=threshold)
    assert far * (1 - 1e-12) <= m.chamfer_l1 < 1.01 * far
    assert far * (1 - 1e-12) <= m.hausdorff < 1.05 * far
    assert m.normal_consistency > 0.99


def test_kd_tree_work_is_bounded_and_near_matches_see_every_point(monkeypatch):
    # Points near the centre of a sampled sphere are a KD-tree's worst case: every cell of the
    # sphere is about as far, so each query visits most of the tree (an unfitted shape against
    # its target: the starting sphere of reconstruct_genus2 took 33 s at 200k points a side on two
    # cores). Full searches (unbounded distance) only run on trees of at most MAX_QUERIES points;
    # the trees of every point (the metrics' resolution) are searched within the far distance.
    import scipy.spatial

    from diffworld.geometry.metrics import MAX_QUERIES

    calls = []

    class SpyTree(scipy.spatial.cKDTree):
        def query(self, x, *args, **kwargs):
            calls.append((self.n, len(x), math.isfinite(kwargs.get("distance_upper_bound", math.inf))))
            return super().query(x, *args, **kwargs)

    monkeypatch.setattr(scipy.spatial, "cKDTree", SpyTree)
    n = 3 * MAX_QUERIES
    sphere = directions(n, seed=21) * 0.4
    blob = directions(n, seed=22) * torch.rand(n, 1, generator=gen(23), dtype=torch.float64) * 0.05
    m = point_metrics(sphere, None, blob, None, threshold=0.01)
    assert calls and all(queries <= MAX_QUERIES for _, queries, _ in calls), calls
    assert all(tree <= MAX_QUERIES for tree, _, bounded in calls if not bounded), calls
    assert [tree for tree, _, bounded in calls if bounded] == [n, n], calls
    assert (m.queried_pred, m.queried_gt) == (MAX_QUERIES, MAX_QUERIES)
    assert 0.35 < m.chamfer_l1 < 0.4 and m.fscore == 0.0


def test_triangle_quality_on_known_triangles():
    from diffworld.geometry.metrics import triangle_quality

    s3 = 3 ** 0.5
    # an equilateral triangle, a 30-60-90 one and a degenerate one
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0.5, s3 / 2, 0], [0, 0, 1], [s3, 0, 1], [0, 1, 1],
                      [0, 0, 2], [1, 0, 2], [2, 0, 2]], dtype=torch.float64)
    q = triangle_quality(v, torch.tensor([[0, 1, 2]]))
    assert q["edge_length_spread"] < 1e-12 and q["small_angle_share"] == 0.0
    assert abs(q["min_angle_deg"] - 60.0) < 1e-9
    q = triangle_quality(v, torch.tensor([[3, 4, 5]]))
    assert abs(q["min_angle_deg"] - 30.0) < 1e-9 and q["small_angle_share"] == 0.0
    q = triangle_quality(v, torch.tensor([[0, 1, 2], [6, 7, 8]]))
    assert q["small_angle_share"] == 0.5 and q["min_angle_deg"] == 0.0
    # a sliver of 5 degrees
    t = torch.tensor([[0, 0, 0], [1, 0, 0], [0.5, 0.5 * math.tan(math.radians(5.0)), 0]], dtype=torch.float64)
    q = triangle_quality(t, torch.tensor([[0, 1, 2]]))
    assert abs(q["min_angle_deg"] - 5.0) < 1e-9 and q["small_angle_share"] == 1.0
