"""FlexiCubes extraction (torch reference): closed, manifold, oriented meshes on analytic shapes
(the reference's counts at 64^3), the ambiguity rule on random fields, volume convergence,
float64 finite-difference checks of every input, and errors for bad input."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.flexicubes import flexicubes
from diffworld.geometry.grid import Grid
from diffworld.geometry.mesh_ops import mesh_report, mesh_volume


def _sphere(res, r=0.4):
    return Grid.make(res).nodes(dtype=torch.float64).norm(dim=-1) - r


def _closed(report):
    return (report.watertight and report.edge_manifold and report.consistently_oriented
            and report.n_unreferenced_vertices == 0 and report.n_degenerate_faces == 0)


@pytest.mark.parametrize("training", [False, True])
def test_sphere_is_closed_and_its_volume_converges(training):
    exact = 4 / 3 * math.pi * 0.4 ** 3
    errors = []
    for res in (16, 32, 64):
        m = flexicubes(_sphere(res), training=training)
        r = mesh_report(m.vertices, m.faces)
        assert _closed(r) and r.euler_characteristic == 2 and r.n_components == 1, (res, r)
        errors.append(abs(float(mesh_volume(m.vertices, m.faces)) - exact) / exact)
        if res == 64:  # the public implementation's counts on this field (eval; training adds quad centres)
            quads = 24732 // 2
            assert m.vertices.shape[0] == 12368 + (quads if training else 0)
            assert m.faces.shape[0] == 24732 * (2 if training else 1)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 3e-3, errors


def test_torus_has_genus_one():
    p = Grid.make(48).nodes(dtype=torch.float64)
    q = torch.stack([p[..., :2].norm(dim=-1) - 0.3, p[..., 2]], -1)
    m = flexicubes(q.norm(dim=-1) - 0.1)
    r = mesh_report(m.vertices, m.faces)
    assert _closed(r) and r.euler_characteristic == 0 and r.genus == 1
    exact = 2 * math.pi ** 2 * 0.3 * 0.1 ** 2
    assert abs(float(mesh_volume(m.vertices, m.faces)) - exact) < 0.03 * exact  # tube radius: 2.4 cells


def test_random_fields_give_manifold_meshes():
    # Random node values hit the ambiguous cases often; without the complement rule most of these
    # meshes have edges shared by 4 faces.
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(7, 7, 7, generator=g, dtype=torch.float64)
        s[0] = s[-1] = s[:, 0] = s[:, -1] = s[:, :, 0] = s[:, :, -1] = 1.0
        for training in (False, True):
            m = flexicubes(s, training=training)
            if m.faces.shape[0]:
                assert _closed(mesh_report(m.vertices, m.faces)), (seed, training)


def test_gradients_match_finite_differences():
    res = 6
    gen = torch.Generator().manual_seed(1)
    s = _sphere(res, 0.33) + 0.02 * torch.randn(res + 1, res + 1, res + 1, generator=gen, dtype=torch.float64)
    raw = {"beta": (res, res, res, 12), "alpha": (res, res, res, 8), "gamma": (res, res, res),
           "deform": (res + 1, res + 1, res + 1, 3)}
    inputs = {k: 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in raw.items()}
    ref = flexicubes(s, training=True, **inputs)
    w = torch.randn(ref.vertices.shape, generator=gen, dtype=torch.float64)

    def loss(sdf, beta, alpha, gamma, deform):
        m = flexicubes(sdf, beta=beta, alpha=alpha, gamma=gamma, deform=deform, training=True)
        return (m.vertices * w).sum() + m.l_dev.sum()

    for name in ("sdf", *raw):
        args = [s, *inputs.values()]
        idx = 0 if name == "sdf" else 1 + list(raw).index(name)
        args = [a.clone().requires_grad_(i == idx) for i, a in enumerate(args)]
        for c in directional_check(loss, args, eps=1e-6, n_dirs=2, seed=3):
            assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, (name, c)


def test_empty_and_bad_input():
    m = flexicubes(torch.ones(5, 5, 5))
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3)
    s = _sphere(8)
    with pytest.raises(ValueError, match="grid boundary"):
        flexicubes(s - 1.0)
    with pytest.raises(ValueError, match="'beta': expected shape \\(8, 8, 8, 12\\)"):
        flexicubes(s, beta=torch.zeros(8, 8, 8, 8))
    with pytest.raises(ValueError, match="'deform'"):
        flexicubes(s, deform=torch.zeros(9, 9, 9))
    bad = s.clone()
    bad[4, 4, 4] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        flexicubes(bad)


def test_sdf_sign_loss():
    from diffworld.geometry import sdf_sign_loss

    # One sign change on a 2-node line of a 2x2x2 grid: the loss is the two BCE terms by hand.
    s = torch.full((2, 2, 2), 1.0, dtype=torch.float64)
    s[0, 0, 0] = -0.5
    sp = torch.nn.functional.softplus
    # edges from node 000 along x, y, z: each (s_a = -0.5 -> target 1) + (s_b = 1 -> target 0)
    by_hand = (sp(torch.tensor(0.5, dtype=torch.float64)) + sp(torch.tensor(1.0, dtype=torch.float64))).item()
    assert abs(float(sdf_sign_loss(s)) - by_hand) < 1e-12
    assert float(sdf_sign_loss(torch.ones(3, 3, 3))) == 0.0
    x = _sphere(6).requires_grad_()
    for c in directional_check(sdf_sign_loss, [x], eps=1e-6, n_dirs=2):
        assert c.rel_error < 1e-7, c


# --- the flat (cut edge, cube) layout vs the paper's formulas, cube by cube ---------------------

def _by_hand(s, beta, alpha, deform, h, lower):
    """Dual vertices and L_dev of FlexiCubes, one surface cube and one group at a time (slow).

    Straight from the definitions: crossing on edge (a, b) u = (x_a a_b s_b - x_b a_a s_a) /
    (a_b s_b - a_a s_a), vertex = sum(beta u) / sum(beta) over the group's edges, L_dev =
    |d - mean d| with d the distance to the plain crossing; cubes in row-major order, groups and
    edges in table order, the ambiguity rule applied with the neighbour's case.
    """
    from diffworld.geometry import flexicubes_tables as T
    from diffworld.geometry.mc_tables import CORNER_OFFSETS, EDGE_CORNERS

    count, group_edges, _ = T.dual_tables()
    res = [n - 1 for n in s.shape]
    case = torch.zeros(res, dtype=torch.int64)
    for c, (ox, oy, oz) in enumerate(CORNER_OFFSETS.tolist()):
        case |= (s[ox:ox + res[0], oy:oy + res[1], oz:oz + res[2]] < 0).long() << c
    verts, l_dev = [], []
    for i, j, k in torch.nonzero((case > 0) & (case < 255)).tolist():
        c = int(case[i, j, k])
        f = int(T.AMBIGUOUS_FACE[c])
        if f >= 0:
            nb = [i, j, k]
            nb[f // 2] += 2 * (f % 2) - 1
            if all(0 <= n < r for n, r in zip(nb, res)):
                c = int(T.resolved_case(c, int(case[tuple(nb)])))
        corner = [(i + ox, j + oy, k + oz) for ox, oy, oz in CORNER_OFFSETS.tolist()]
        x = [torch.tensor(lower, dtype=s.dtype) + torch.tensor(n, dtype=s.dtype) * h
             + (0.5 - 1e-8) * h * torch.tanh(deform[n]) for n in corner]
        aw = [1 + 0.99 * torch.tanh(alpha[i, j, k, q]) for q in range(8)]
        for g in range(int(count[c])):
            num, den, plain = 0.0, 0.0, []
            for e in (int(e) for e in group_edges[c, g] if e >= 0):
                a, b = (int(q) for q in EDGE_CORNERS[e])
                sa, sb = s[corner[a]], s[corner[b]]
                u = (x[a] * aw[b] * sb - x[b] * aw[a] * sa) / (aw[b] * sb - aw[a] * sa)
                bw = 1 + 0.99 * torch.tanh(beta[i, j, k, e])
                num, den = num + bw * u, den + bw
                plain.append((x[a] * sb - x[b] * sa) / (sb - sa))
            v = num / den
            d = torch.stack([(p - v).norm() for p in plain])
            verts.append(v)
            l_dev.append((d - d.mean()).abs())
    return torch.stack(verts), torch.cat(l_dev)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vertices_and_l_dev_match_the_definitions(seed):
    res = 6
    g = torch.Generator().manual_seed(seed)
    if seed == 0:
        s = _sphere(res, 0.3) + 0.03 * torch.randn(res + 1, res + 1, res + 1, generator=g, dtype=torch.float64)
    else:  # random signs: ambiguous cases, several groups per cube
        s = torch.randn(res + 1, res + 1, res + 1, generator=g, dtype=torch.float64)
        s[0] = s[-1] = s[:, 0] = s[:, -1] = s[:, :, 0] = s[:, :, -1] = 1.0
    w = _raw_inputs(res, g)
    for training in (False, True):
        m = flexicubes(s, training=training, **w)
        v, l_dev = _by_hand(s, w["beta"], w["alpha"], w["deform"], 1.0 / res, (-0.5,) * 3)
        assert torch.allclose(m.vertices[: v.shape[0]], v, atol=1e-13, rtol=0)
        assert torch.allclose(m.l_dev, l_dev, atol=1e-13, rtol=0)


# --- looked-up weights and deformation -----------------------------------------------------------

def _raw_inputs(res, gen):
    shapes = {"beta": (res, res, res, 12), "alpha": (res, res, res, 8), "gamma": (res, res, res),
              "deform": (res + 1, res + 1, res + 1, 3)}
    return {k: 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in shapes.items()}


def _index_dense(beta, alpha, gamma):
    """A ``weights`` function that just reads dense tensors at the cubes it is given."""
    def weights(cubes):
        i, j, k = cubes.unbind(1)
        return beta[i, j, k], alpha[i, j, k], gamma[i, j, k]
    return weights


class _SparseTable:
    """Raw values for a fixed set of grid cells or nodes (sorted linear keys), 0 elsewhere."""

    def __init__(self, keys, shape, values):
        self.shape = shape
        lin = self.lin(keys)
        order = torch.argsort(lin)
        self.keys, self.values = lin[order], values[order]

    def lin(self, idx):
        return (idx[:, 0] * self.shape[1] + idx[:, 1]) * self.shape[2] + idx[:, 2]

    def __call__(self, idx, values=None):
        values = self.values if values is None else values
        q = self.lin(idx)
        row = torch.searchsorted(self.keys, q).clamp_max(self.keys.shape[0] - 1)
        found = (self.keys[row] == q).reshape(-1, *([1] * (values.dim() - 1)))
        return torch.where(found, values[row], torch.zeros((), dtype=values.dtype))


@pytest.mark.parametrize("output", ["triangles", "tetrahedra"])
def test_lookup_weights_equal_the_dense_path(output):
    res = 8
    g = torch.Generator().manual_seed(4)
    s = _sphere(res, 0.3) + 0.03 * torch.randn(res + 1, res + 1, res + 1, generator=g, dtype=torch.float64)
    w = _raw_inputs(res, g)
    for training in (False, True):
        dense = flexicubes(s, training=training, output=output, **w)
        deform = w["deform"]
        looked = flexicubes(s, training=training, output=output, weights=_index_dense(w["beta"], w["alpha"], w["gamma"]),
                            deform=lambda n: deform[n[:, 0], n[:, 1], n[:, 2]])
        for name in ("vertices", "faces", "l_dev", "cubes", "tets"):
            a, b = getattr(dense, name), getattr(looked, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    # Partial lookups: None entries mean all-ones weights, as for the dense arguments.
    for which in range(3):
        dense_kw = {n: w[n] if i == which else None for i, n in enumerate(("beta", "alpha", "gamma"))}
        fn = _index_dense(w["beta"], w["alpha"], w["gamma"])
        a = flexicubes(s, training=True, **dense_kw)
        b = flexicubes(s, training=True, weights=lambda c: tuple(x if i == which else None
                                                                 for i, x in enumerate(fn(c))))
        assert torch.equal(a.vertices, b.vertices) and torch.equal(a.l_dev, b.l_dev)


def test_lookup_is_called_on_the_surface_cubes_only():
    res = 10
    s = _sphere(res, 0.3)
    seen = []

    def weights(cubes):
        seen.append(cubes)
        return None, None, torch.zeros(cubes.shape[0], dtype=torch.float64)

    m = flexicubes(s, weights=weights)
    assert len(seen) == 1 and torch.equal(seen[0], m.cubes)
    calls = []
    flexicubes(torch.ones(5, 5, 5), weights=lambda c: calls.append(c))  # no surface: never called
    assert not calls


def test_lookup_gradients_match_finite_differences():
    # Weights and offsets stored for the surface cubes / their nodes only (memory ~ surface):
    # the gradient reaches the stored rows through the lookup.
    res = 6
    gen = torch.Generator().manual_seed(5)
    s = _sphere(res, 0.33) + 0.02 * torch.randn(res + 1, res + 1, res + 1, generator=gen, dtype=torch.float64)
    cubes = flexicubes(s).cubes
    offs = torch.tensor([[(c >> q) & 1 for q in range(3)] for c in range(8)])
    nodes = torch.unique((cubes[:, None] + offs).reshape(-1, 3), dim=0)
    cube_table = _SparseTable(cubes, (res, res, res), torch.zeros(cubes.shape[0]))
    node_table = _SparseTable(nodes, (res + 1,) * 3, torch.zeros(nodes.shape[0]))
    M, N = cubes.shape[0], nodes.shape[0]
    params = {"beta": (M, 12), "alpha": (M, 8), "gamma": (M,), "deform": (N, 3)}
    values = {k: 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in params.items()}
    ref = flexicubes(s, training=True)
    w = torch.randn(ref.vertices.shape, generator=gen, dtype=torch.float64)

    def loss(beta, alpha, gamma, deform):
        m = flexicubes(s, training=True, deform=lambda n: node_table(n, deform),
                       weights=lambda c: (cube_table(c, beta), cube_table(c, alpha), cube_table(c, gamma)))
        return (m.vertices * w).sum() + m.l_dev.sum()

    for name in params:
        args = [v.clone().requires_grad_(k == name) for k, v in values.items()]
        # Steps above the round-off of the loss differences (gamma moves only the training centres,
        # a small derivative, but smoothly: the truncation error at 1e-4 is ~1e-9).
        for c in directional_check(loss, args, eps=1e-4 if name == "gamma" else 1e-5, n_dirs=2, seed=3):
            assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, (name, c)


def test_lookup_by_a_function_of_the_cube_index():
    # A tiny "network" of the cube index: its parameters get the gradient (finite differences).
    res = 6
    gen = torch.Generator().manual_seed(6)
    s = _sphere(res, 0.33)
    W = 0.3 * torch.randn(3, 21, generator=gen, dtype=torch.float64)

    def loss(W):
        def weights(cubes):
            raw = torch.sin(cubes.to(W.dtype) @ W)
            return raw[:, :12], raw[:, 12:20], raw[:, 20]
        m = flexicubes(s, weights=weights, training=True)
        return m.vertices.square().sum() + m.l_dev.sum()

    for c in directional_check(loss, [W.requires_grad_()], eps=1e-6, n_dirs=3, seed=1):
        assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, c


def test_lookup_errors():
    s = _sphere(8)
    beta = torch.zeros(8, 8, 8, 12, dtype=torch.float64)
    ok = _index_dense(beta, torch.zeros(8, 8, 8, 8, dtype=torch.float64), torch.zeros(8, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="'weights' and 'beta', 'gamma'"):
        flexicubes(s, weights=ok, beta=beta, gamma=torch.zeros(8, 8, 8))
    with pytest.raises(ValueError, match="'weights': expected a function"):
        flexicubes(s, weights=beta)
    with pytest.raises(ValueError, match="'weights': expected the function to return"):
        flexicubes(s, weights=lambda c: ok(c)[:2])
    with pytest.raises(ValueError, match=r"'weights': expected beta_raw of shape \(\d+, 12\)"):
        flexicubes(s, weights=lambda c: (torch.zeros(c.shape[0], 8), None, None))
    with pytest.raises(ValueError, match=r"'weights': expected gamma_raw of shape \(\d+,\)"):
        flexicubes(s, weights=lambda c: (None, None, torch.zeros(c.shape[0], 1)))
    with pytest.raises(ValueError, match="'weights': alpha_raw must be a floating-point tensor"):
        flexicubes(s, weights=lambda c: (None, torch.zeros(c.shape[0], 8, dtype=torch.int64), None))
    with pytest.raises(ValueError, match="'alpha': expected finite values"):
        flexicubes(s, weights=lambda c: (None, torch.full((c.shape[0], 8), float("nan")), None))
    with pytest.raises(ValueError, match=r"'deform': expected the function to return raw offsets of shape"):
        flexicubes(s, deform=lambda n: torch.zeros(n.shape[0], 2))
    with pytest.raises(ValueError, match="'deform': expected finite values"):
        flexicubes(s, deform=lambda n: torch.full((n.shape[0], 3), float("inf")))


def test_dense_weights_are_checked_where_read():
    # Finiteness is checked on the entries the surface reads, not by a pass over the volume: a NaN
    # far from the surface is harmless (no value or gradient depends on it), one on it raises.
    s = _sphere(8, 0.2)
    cubes = flexicubes(s).cubes
    for name, shape in (("beta", (8, 8, 8, 12)), ("alpha", (8, 8, 8, 8)), ("gamma", (8, 8, 8)),
                        ("deform", (9, 9, 9, 3))):
        far = torch.zeros(shape, dtype=torch.float64)
        far[0, 0, 0] = float("nan")  # a corner cube / node: outside the sphere's band
        m = flexicubes(s, **{name: far.requires_grad_()}, training=True)
        assert torch.isfinite(m.vertices).all()
        m.vertices.sum().backward()
        assert torch.isfinite(far.grad).all()
        near = torch.zeros(shape, dtype=torch.float64)
        i, j, k = cubes[0].tolist()
        if name == "deform":  # the cube's 8 nodes: some are ends of its cut edges
            near[i:i + 2, j:j + 2, k:k + 2] = float("nan")
        else:  # the cube's whole row: some entries belong to its cut edges
            near[i, j, k] = float("nan")
        with pytest.raises(ValueError, match=f"'{name}': expected finite values"):
            flexicubes(s, **{name: near}, training=True)
