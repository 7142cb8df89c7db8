"""FlexiCubes tetrahedral output: exact boundary and volume on any field, positive tets on
resolved shapes at resolutions 8-96 (both quad splits), their shape quality (slivers),
float64 finite-difference gradients, and the VTK round trip."""

import math
import warnings

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry import flexicubes_tables as T
from diffworld.geometry import tet_remesh
from diffworld.geometry.flexicubes import flexicubes
from diffworld.geometry.grid import Grid
from diffworld.geometry.mc_tables import EDGE_CORNERS
from diffworld.geometry.mesh_ops import mesh_volume
from diffworld.geometry.shapes import cad_part
from diffworld.geometry.tet_mesh import load_tet_mesh, save_tet_mesh, tet_quality, tet_report, tet_volumes


def _field(name, res):
    p = Grid.make(res).nodes(dtype=torch.float64)
    if name == "sphere":
        return p.norm(dim=-1) - 0.4
    if name == "torus":
        q = torch.stack([p[..., :2].norm(dim=-1) - 0.25, p[..., 2]], -1)
        return q.norm(dim=-1) - 0.1
    if name == "box":
        q = p.abs() - torch.tensor([0.3, 0.2, 0.25], dtype=p.dtype)
        return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)
    if name == "blob":  # off-centre, anisotropic and wavy: no grid symmetry to lean on
        c = torch.tensor([0.03, -0.02, 0.05], dtype=p.dtype)
        k = torch.tensor([1.0, 1.3, 0.8], dtype=p.dtype)
        return ((p - c) * k).norm(dim=-1) - 0.33 + 0.03 * torch.sin(9 * p[..., 0]) * torch.cos(7 * p[..., 1])
    if name == "cad":
        with torch.no_grad():
            return cad_part().double()(p.reshape(-1, 3)).reshape(p.shape[:-1])
    raise KeyError(name)


def _assert_exact(m, res):
    """Boundary = surface (oriented), conforming, no unused vertex, volume = surface volume."""
    r = tet_report(m.vertices, m.tets, m.faces)
    assert r.boundary_is_surface and r.n_bad_interior_faces == 0 and r.n_unreferenced_vertices == 0, r
    surface = float(mesh_volume(m.vertices, m.faces))
    assert abs(r.volume - surface) <= 1e-9 * max(1.0, abs(surface)), (r.volume, surface)
    return r


# Each shape at several resolutions in both modes; the large grids in one mode each (time).
CASES = [(s, r, t) for s in ("sphere", "torus", "box", "blob", "cad") for r in (8, 16, 32) for t in (False, True)] + \
    [("sphere", 64, False), ("cad", 64, True), ("torus", 96, False)]


@pytest.mark.parametrize("shape,res,training", CASES)
def test_resolved_shapes_give_positive_exact_tets(shape, res, training):
    s = _field(shape, res)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no flat tets may be reported on these shapes
        m = flexicubes(s, training=training, output="tetrahedra")
    r = _assert_exact(m, res)
    h3 = (1.0 / res) ** 3
    assert r.n_inverted == 0 and r.min_volume > 1e-4 * h3, (r.min_volume / h3)
    # The surface part of the vertex array is the triangle output, unchanged.
    plain = flexicubes(s, training=training)
    assert torch.equal(m.faces, plain.faces)
    assert torch.allclose(m.vertices[: plain.vertices.shape[0]], plain.vertices)


# Shape quality at 32^3 (eval), with margin under what the sliver pass reaches (mean ratio 1 is
# a regular tet; without the pass: sphere min 0.092, and 0.16 % / 0.44 % of the blob's / torus'
# tets under 0.1): smallest mean ratio, and the largest share of tets under 0.1.
QUALITY = {"sphere": (0.2, 0.0), "box": (0.3, 0.0), "cad": (0.25, 0.0), "blob": (0.0, 5e-4), "torus": (0.0, 2e-3)}


@pytest.mark.parametrize("shape", sorted(QUALITY))
def test_slivers_are_improved(shape):
    m = flexicubes(_field(shape, 32), output="tetrahedra")
    q = tet_quality(m.vertices, m.tets).mean_ratio
    min_q, share = QUALITY[shape]
    assert float(q.min()) > min_q and float((q < 0.1).double().mean()) <= share, (float(q.min()), float((q < 0.1).double().mean()))


def test_sphere_volume_converges():
    exact = 4 / 3 * math.pi * 0.4 ** 3
    err = [abs(float(tet_volumes(m.vertices, m.tets).sum()) - exact) / exact
           for m in (flexicubes(_field("sphere", r), output="tetrahedra") for r in (16, 32, 64))]
    assert err[0] > err[1] > err[2] and err[2] < 3e-3, err


@pytest.mark.parametrize("refill", [False, True])
def test_any_field_gives_an_exact_conforming_mesh(refill, monkeypatch):
    # Random fields hit every case: ambiguous faces, tunnels, components bounded by several
    # surface pieces (hubs and connectors). Tets may be inverted there (the surface itself folds),
    # but the mesh must stay conforming with the surface as its boundary: the fan construction
    # alone (80 fields), and with the re-fill of bad regions (20 fields; each re-fill starts a
    # TetGen process).
    import diffworld.geometry.flexicubes_tets as ft

    if not refill:
        monkeypatch.setattr(ft, "remesh_bad_regions", lambda pos, tets, *a: tet_remesh.RemeshResult(
            tets.copy(), np.zeros((0, 3)), [], False, "off", 0))
    n_hub = 0
    for seed in range(20 if refill else 80):
        g = torch.Generator().manual_seed(seed)
        n = 4 + seed % 3
        s = torch.randn(n, n, n, generator=g, dtype=torch.float64) + 0.3 * (seed % 2)
        s[0] = s[-1] = s[:, 0] = s[:, -1] = s[:, :, 0] = s[:, :, -1] = 1.0
        for training in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = flexicubes(s, training=training, output="tetrahedra")
            if m.faces.shape[0]:
                _assert_exact(m, n - 1)
        n_hub += int(m.vertices.shape[0] > m.faces.max() + 1 + int((s < 0).sum()))
    assert n_hub > (2 if refill else 10)  # the hub path was exercised


def test_tet_tables_facts():
    slot, slot_groups, corner_slot = T.tet_tables()
    assert (slot[255, 0] == T.MAX_GROUPS).all()  # a full cube: one point (its centre) for all edges
    for corner in range(8):  # one inside corner: its 3 edges, and only those, use dual vertex 0
        case = 1 << corner
        edges = {e for e in range(12) if corner in EDGE_CORNERS[e]}
        assert set(np.nonzero(slot[case, 0] >= 0)[0]) == edges and set(slot[case, 0][list(edges)]) == {0}
    # Two opposite outside corners (a tunnel case): one component touching two pieces -> one hub.
    case = 255 - 1 - 128
    assert slot_groups[case, 0, 0].sum() == 2 and (corner_slot[case, 0][1:7] == T.MAX_GROUPS).all()
    # Components bounded by one piece never get a hub.
    assert ((slot_groups.sum(-1) == 1).sum()) == 0


# A 6^3 sphere with random offsets has a few near-flat tets (warned); the gradients are exact anyway.
@pytest.mark.filterwarnings("ignore:flexicubes.*flat or inverted")
def test_gradients_match_float64_finite_differences():
    res = 6
    s0 = _field("sphere", res)
    g = torch.Generator().manual_seed(1)
    beta = 0.3 * torch.randn(res, res, res, 12, generator=g, dtype=torch.float64)
    deform = 0.3 * torch.randn(res + 1, res + 1, res + 1, 3, generator=g, dtype=torch.float64)
    w = torch.rand(20000, generator=g, dtype=torch.float64)

    def loss(sdf, beta, deform):
        m = flexicubes(sdf, beta=beta, deform=deform, training=True, output="tetrahedra")
        vol = tet_volumes(m.vertices, m.tets)
        return (w[: vol.shape[0]] * vol).sum() + 0.1 * m.vertices.square().sum()

    for x in (s0, beta, deform):
        inputs = [s0, beta, deform]
        k = [id(v) for v in inputs].index(id(x))
        inputs = [v.clone().requires_grad_(i == k) for i, v in enumerate(inputs)]
        # eps 1e-5: some directional derivatives here are ~2e-5, where the round-off of a 1e-6
        # step alone reaches 1e-5 relative (it falls as 1/eps: 1.2e-5, 1.1e-6, 6.6e-8 at 1e-6,
        # 1e-5, 1e-4); larger steps start to cross the discrete placement choices.
        for c in directional_check(loss, inputs, eps=1e-5, n_dirs=2):
            assert c.rel_error < 1e-5, c


def test_vtk_round_trip(tmp_path):
    m = flexicubes(_field("torus", 16), output="tetrahedra")
    path = save_tet_mesh(tmp_path / "torus.vtu", m.vertices, m.tets, volume=tet_volumes(m.vertices, m.tets))
    v, t = load_tet_mesh(path)
    assert torch.equal(t, m.tets) and torch.allclose(v, m.vertices)
    with pytest.raises(ValueError, match="'.vtu' or '.vtk'"):
        save_tet_mesh(tmp_path / "torus.obj", m.vertices, m.tets)


def test_empty_and_bad_output_argument():
    m = flexicubes(torch.ones(5, 5, 5), output="tetrahedra")
    assert m.tets.shape == (0, 4) and m.vertices.shape == (0, 3)
    with pytest.raises(ValueError, match="'output'"):
        flexicubes(_field("sphere", 8), output="tets")
    with pytest.raises(ValueError, match="'attributes'"):
        flexicubes(_field("sphere", 8), output="tetrahedra", attributes=_field("sphere", 8))


# --- Positive tets on fields nobody picked: smooth random fields, nodes exactly on the surface,
# touching shapes. A shape is resolved when both phases survive an opening by a ball of one
# cell (checked on the field sampled 4x finer, up to the one fine voxel a digital opening
# shaves off a smooth boundary).

def _smooth_field(res, seed, up=1):
    """A closed, smooth random shape: a sphere of radius 0.3 with cosine noise (wavelengths
    about 0.6, amplitude 0.08), cut off beyond radius 0.42; the same shape at any ``res``."""
    g = torch.Generator().manual_seed(seed)
    p = Grid.make(res * up).nodes(dtype=torch.float64)
    f = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for _ in range(20):
        w = torch.randn(3, generator=g, dtype=torch.float64) * 6
        ph = torch.rand(1, generator=g, dtype=torch.float64) * 6.28
        a = torch.randn(1, generator=g, dtype=torch.float64) / (1 + w.norm() / 6)
        f = f + a * torch.cos(p @ w + ph)
    f = 0.08 * f / f.std() + (p.norm(dim=-1) - 0.3)
    return torch.maximum(f, 5 * (p.norm(dim=-1) - 0.42))


def _resolved(field, up=4):
    from scipy import ndimage

    f = field(up).numpy()
    r = np.arange(-up, up + 1)
    ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= up * up
    cross = ndimage.generate_binary_structure(3, 1)
    for phase in (f < 0, f >= 0):
        border = int(phase[0, 0, 0])
        opened = ndimage.binary_opening(phase, ball, border_value=border)
        core = ndimage.binary_erosion(phase, cross, border_value=border)
        if not (opened | ~core).all():
            return False
    return True


def _positive_tets(s, res):
    """Tets of the field, checked exact; (smallest volume in cells, warnings)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = flexicubes(s, output="tetrahedra")
    _assert_exact(m, res)
    return float(tet_volumes(m.vertices, m.tets).min()) * res ** 3, [str(x.message) for x in w]


def _random_fields_check(res, seeds, monkeypatch):
    """Every tet positive on every resolved field (returns the counts: resolved fields, those
    with tets under the 1e-4-cell floor, unresolved fields with non-positive tets, re-fills)."""
    import diffworld.geometry.flexicubes_tets as ft

    calls = []
    real = ft.remesh_bad_regions

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(ft, "remesh_bad_regions", spy)
    n_resolved = n_flat = n_unresolved_bad = 0
    for seed in seeds:
        v, warned = _positive_tets(_smooth_field(res, seed), res)
        if _resolved(lambda up: _smooth_field(res, seed, up)):
            n_resolved += 1
            assert v > 0, (seed, v, warned)
            # Flat but positive tets are reported, and only as an unresolved crease of the surface.
            n_flat += v <= 1e-4
            assert (v <= 1e-4) == bool(warned) and all("unresolved feature" in w for w in warned), (seed, v, warned)
        else:
            n_unresolved_bad += v <= 0
    return n_resolved, n_flat, n_unresolved_bad, sum(c.region_tets > 0 for c in calls)


def test_random_smooth_fields_give_positive_tets(monkeypatch):
    n_resolved, n_flat, _, n_refilled = _random_fields_check(16, range(24), monkeypatch)
    # Both kinds occur, and the re-fill of fans that overlap a fold is exercised.
    assert n_resolved >= 8 and n_refilled >= 5 and n_flat == 0, (n_resolved, n_refilled, n_flat)


# Measured on seeds 1000 on (2026-12-05): resolved fields 36 of 100 at 12^3, 68 of 150 at 16^3,
# 31 of 60 at 24^3; no non-positive tet on any of them; 2, 0 and 2 of them keep a few positive
# tets under the floor (down to 1.1e-5 of a cell, warned); 1 unresolved field (of 175) keeps an
# inverted tet (a one-node blob whose tiny surface TetGen calls self-intersecting).
@pytest.mark.slow
@pytest.mark.parametrize("res,n,max_flat", [(12, 100, 0.1), (16, 150, 0.1), (24, 60, 0.1)])
def test_hundreds_of_random_smooth_fields_give_positive_tets(res, n, max_flat, monkeypatch):
    n_resolved, n_flat, n_bad, n_refilled = _random_fields_check(res, range(1000, 1000 + n), monkeypatch)
    print(f"{res}^3: {n} fields, {n_resolved} resolved, {n_flat} of them with flat positive tets, "
          f"{n_bad} unresolved with non-positive tets, {n_refilled} re-filled")
    assert n_flat <= max_flat * n_resolved


def _sphere(res, r, c=(0.0, 0.0, 0.0), dtype=torch.float64):
    p = Grid.make(res).nodes(dtype=dtype)
    return (p - torch.tensor(c, dtype=dtype)).norm(dim=-1) - r


@pytest.mark.parametrize("case", ["sphere20", "sphere40", "sphere40_f32", "touching_spheres", "touching_boxes",
                                  "sphere_on_box"])
def test_nodes_on_the_surface_give_no_flat_tets(case):
    # Radius 0.25 = 5 and 10 cells: grid nodes lie on the sphere, with values like -3e-17.
    if case == "sphere20":
        res, s = 20, _sphere(20, 0.25)
    elif case == "sphere40":
        res, s = 40, _sphere(40, 0.25)
    elif case == "sphere40_f32":
        res, s = 40, _sphere(40, 0.25, dtype=torch.float32)
    elif case == "touching_spheres":  # touching at the grid node at the origin
        res, s = 20, torch.minimum(_sphere(20, 0.2, (-0.2, 0, 0)), _sphere(20, 0.2, (0.2, 0, 0)))
    else:
        res = 20
        p = Grid.make(res).nodes(dtype=torch.float64)

        def box(c, half):
            q = (p - torch.tensor(c, dtype=p.dtype)).abs() - torch.tensor(half, dtype=p.dtype)
            return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)

        if case == "touching_boxes":  # faces on a grid plane, touching along it
            s = torch.minimum(box((-0.15, 0, 0), (0.15, 0.2, 0.2)), box((0.15, 0.05, 0), (0.15, 0.2, 0.2)))
        else:  # a sphere resting on a box face that lies on a grid plane
            s = torch.minimum(box((0, 0, -0.2), (0.3, 0.3, 0.1)), _sphere(res, 0.2, (0, 0, 0.1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = flexicubes(s, output="tetrahedra")
    r = _assert_exact(m, res)
    assert r.n_inverted == 0 and r.min_volume > 1e-4 / res ** 3, r.min_volume * res ** 3


def test_values_exactly_or_nearly_zero_give_no_flat_tets():
    # Resolved smooth fields with chosen near-surface nodes set to zero and to its roundings.
    res, done = 16, 0
    for seed in range(8):
        if done == 2:
            break
        if not _resolved(lambda up: _smooth_field(res, seed, up)):
            continue
        s = _smooth_field(res, seed)
        near = s.abs().reshape(-1).argsort()[:12]
        for value in (0.0, -1e-300, -3e-17, -1e-12):
            t = s.clone().reshape(-1)
            t[near] = value
            v, warned = _positive_tets(t.reshape(s.shape), res)
            assert v > 1e-4 and not warned, (seed, value, v, warned)
        done += 1
    assert done == 2


def test_snapping_keeps_gradients_and_far_values():
    from diffworld.geometry.flexicubes import snap_near_zero

    s = _sphere(20, 0.25).requires_grad_(True)
    out = snap_near_zero(s)
    snapped = (s.detach() < 0) & (out.detach() == 0)
    # The nodes at radius 5 cells off the axes, (3, 4, 0) cells and its 23 images, round to
    # about -3e-17 (those on the axes are exactly 0, outside already).
    assert int(snapped.sum()) == 24
    cells = Grid.make(20).nodes(dtype=torch.float64)[snapped] * 20
    assert torch.allclose(cells.norm(dim=-1), torch.full((24,), 5.0, dtype=torch.float64))
    assert torch.equal(out.detach()[~snapped], s.detach()[~snapped])
    w = torch.randn_like(s)
    (g,) = torch.autograd.grad((out * w).sum(), s)
    assert torch.equal(g, w)  # straight through: the snap changes values, not derivatives
    far = _sphere(20, 0.2613)
    assert snap_near_zero(far) is far
