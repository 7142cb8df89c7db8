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


def test_any_field_gives_an_exact_conforming_mesh():
    # Random fields hit every case: ambiguous faces, tunnels, components bounded by several
    # surface pieces (hubs and connectors). Tets may be inverted there (the surface itself folds),
    # but the mesh must stay conforming with the surface as its boundary.
    n_hub = 0
    for seed in range(80):
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
    assert n_hub > 10  # the hub path was exercised


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
