"""Hand-written adjoint kernels of the MPM substep vs Warp's automatic adjoints of the same forward
maps (float64, every law, random deformations including F = I and plastic yielding).

The solver does one SVD per particle per substep: ``plasticity_stress`` returns the projected F
and the elastic stress at it from one SVD, and ``plasticity_stress_adjoint`` back-propagates both
from one SVD. They are checked against ``plasticity_stress_ref`` (project, then stress: two SVDs,
automatic adjoint); ``particle_affine_adjoint`` and ``stress_adjoint`` against the automatic
adjoints of ``particle_affine`` and ``stress_eval``.
"""

import pytest
import torch

from diffworld.engine.runtime import init_warp
from diffworld.sims.mpm import kernels as K

wp = init_warp()
KF = K.build("float64")
N = 96
LAWS = list(K.LAW)


def _wrap(t, kind="s"):
    t = t.contiguous()
    dtype = {"s": wp.float64, "v": KF["vec3"], "m": KF["mat33"], "i": wp.int32}[kind]
    return wp.from_torch(t, dtype=dtype)


def _inputs(law: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    F = torch.eye(3, dtype=torch.float64) + 0.25 * r(N, 3, 3)
    F[torch.linalg.det(F) < 0.3] = torch.eye(3, dtype=torch.float64)
    F[:8] = torch.eye(3, dtype=torch.float64)  # coincident singular values
    F[8:16] = torch.eye(3, dtype=torch.float64) + 1e-7 * r(8, 3, 3)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(N, generator=gen, dtype=torch.float64)  # noqa: E731
    params = dict(E=u(1e4, 1e6), nu=u(0.1, 0.45), eta=u(0.0, 5.0), rho=u(500, 3000), vol=u(1e-7, 1e-6),
                  ys=u(5e2, 5e3), fa=u(0.3, 0.8), tc=u(0.01, 0.05), ts=u(0.002, 0.01))
    return dict(F=F, C=5.0 * r(N, 3, 3), v=r(N, 3), law=torch.full((N,), K.LAW[law], dtype=torch.int32),
                active=torch.ones(N, dtype=torch.int32), **params)


def _adjoints(names, like):
    return {n: torch.zeros_like(like[n]) for n in names}


def _close(hand, auto, names, what):
    for n in names:
        scale = auto[n].abs().max().clamp_min(1e-300)
        assert torch.isfinite(hand[n]).all(), (what, n)
        assert (hand[n] - auto[n]).abs().max() / scale < 1e-9, (what, n, float((hand[n] - auto[n]).abs().max() / scale))


def test_particle_affine_adjoint_matches_automatic():
    d = _inputs("fluid", 1)
    dt, inv_dx = 1e-4, 32.0
    gen = torch.Generator().manual_seed(2)
    d["tau"] = 1e3 * torch.randn(N, 3, 3, generator=gen, dtype=torch.float64)
    gA = torch.randn(N, 3, 3, generator=gen, dtype=torch.float64)
    gp = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    gm = torch.randn(N, generator=gen, dtype=torch.float64)
    d["active"][::7] = 0
    ins = [_wrap(d["F"], "m"), _wrap(d["C"], "m"), _wrap(d["v"], "v"), _wrap(d["tau"], "m"), _wrap(d["active"], "i"),
           _wrap(d["eta"]), _wrap(d["rho"]), _wrap(d["vol"])]
    A, p, m = (torch.empty(N, 3, 3, dtype=torch.float64), torch.empty(N, 3, dtype=torch.float64),
               torch.empty(N, dtype=torch.float64))
    outs = [_wrap(A, "m"), _wrap(p, "v"), _wrap(m)]
    names = ["F", "C", "v", "tau", "eta", "rho", "vol"]
    auto, hand = _adjoints(names, d), _adjoints(names, d)
    wp.launch(KF["particle_affine"], N, ins + [dt, inv_dx], outs, device="cpu")
    wp.launch(KF["particle_affine"], N, ins + [dt, inv_dx], outs, device="cpu", adjoint=True,
              adj_inputs=[_wrap(auto["F"], "m"), _wrap(auto["C"], "m"), _wrap(auto["v"], "v"), _wrap(auto["tau"], "m"),
                          None, _wrap(auto["eta"]), _wrap(auto["rho"]), _wrap(auto["vol"]), 0.0, 0.0],
              adj_outputs=[_wrap(gA, "m"), _wrap(gp, "v"), _wrap(gm)])
    wp.launch(KF["particle_affine_adjoint"], N,
              ins + [dt, inv_dx, _wrap(gA, "m"), _wrap(gp, "v"), _wrap(gm), _wrap(hand["F"], "m"), _wrap(hand["C"], "m"),
                     _wrap(hand["v"], "v"), _wrap(hand["tau"], "m"), _wrap(hand["eta"]), _wrap(hand["rho"]),
                     _wrap(hand["vol"])], device="cpu")
    _close(hand, auto, names, "particle_affine")


@pytest.mark.parametrize("law", LAWS)
def test_stress_adjoint_matches_automatic(law):
    d = _inputs(law, 6)
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(N, 3, 3, generator=gen, dtype=torch.float64)
    ins = [_wrap(d["F"], "m"), _wrap(d["law"], "i"), _wrap(d["E"]), _wrap(d["nu"])]
    tau = torch.empty(N, 3, 3, dtype=torch.float64)
    names = ["F", "E", "nu"]
    auto, hand = _adjoints(names, d), _adjoints(names, d)
    wp.launch(KF["stress_eval"], N, ins, [_wrap(tau, "m")], device="cpu")
    wp.launch(KF["stress_eval"], N, ins, [_wrap(tau, "m")], device="cpu", adjoint=True,
              adj_inputs=[_wrap(auto["F"], "m"), None, _wrap(auto["E"]), _wrap(auto["nu"])], adj_outputs=[_wrap(G, "m")])
    wp.launch(KF["stress_adjoint"], N, ins + [_wrap(G, "m"), _wrap(hand["F"], "m"), _wrap(hand["E"]), _wrap(hand["nu"])],
              device="cpu")
    _close(hand, auto, names, law)


@pytest.mark.parametrize("law", LAWS)
def test_plasticity_stress_matches_reference_and_its_adjoint_the_automatic_one(law):
    d = _inputs(law, 3)
    if law in ("von_mises", "drucker_prager", "snow"):
        # Larger strains so that a good share of the particles yield.
        gen = torch.Generator().manual_seed(4)
        d["F"][16:] = torch.linalg.matrix_exp(0.3 * torch.randn(N - 16, 3, 3, generator=gen, dtype=torch.float64))
    gen = torch.Generator().manual_seed(5)
    gF = torch.randn(N, 3, 3, generator=gen, dtype=torch.float64)
    gT = 1e-4 * torch.randn(N, 3, 3, generator=gen, dtype=torch.float64)
    ins = [_wrap(d["F"], "m"), _wrap(d["law"], "i"), _wrap(d["E"]), _wrap(d["nu"]), _wrap(d["ys"]), _wrap(d["fa"]),
           _wrap(d["tc"]), _wrap(d["ts"])]
    out, tau = torch.empty(N, 3, 3, dtype=torch.float64), torch.empty(N, 3, 3, dtype=torch.float64)
    out_r, tau_r = torch.empty_like(out), torch.empty_like(tau)
    wp.launch(KF["plasticity_stress"], N, ins, [_wrap(out, "m"), _wrap(tau, "m")], device="cpu")
    wp.launch(KF["plasticity_stress_ref"], N, ins, [_wrap(out_r, "m"), _wrap(tau_r, "m")], device="cpu")
    assert (out - out_r).abs().max() < 1e-12
    assert (tau - tau_r).abs().max() <= 1e-10 * tau_r.abs().max().clamp_min(1.0)
    moved = (out - d["F"]).flatten(1).norm(dim=1) > 1e-9
    if law in ("von_mises", "drucker_prager", "snow", "fluid"):
        assert int(moved[16:].sum()) > 10, "the test must exercise the projection"
    names = ["F", "E", "nu", "ys", "fa", "tc", "ts"]
    auto, hand = _adjoints(names, d), _adjoints(names, d)
    wp.launch(KF["plasticity_stress_ref"], N, ins, [_wrap(out_r, "m"), _wrap(tau_r, "m")], device="cpu", adjoint=True,
              adj_inputs=[_wrap(auto["F"], "m"), None] + [_wrap(auto[n]) for n in names[1:]],
              adj_outputs=[_wrap(gF, "m"), _wrap(gT, "m")])
    wp.launch(KF["plasticity_stress_adjoint"], N,
              ins + [_wrap(gF, "m"), _wrap(gT, "m"), _wrap(hand["F"], "m")] + [_wrap(hand[n]) for n in names[1:]],
              device="cpu")
    _close(hand, auto, names, law)


def _wall_box(mode: int):
    """A box that touches all six walls (bound 3): zero masses, masses below, at and above the
    floor, velocities into and out of the walls, components exactly 0, friction that stops the
    tangential motion and friction that only slows it. Returns (shape, origin, full, bound,
    min_mass, m (n,), mv (n, 3), gravity, dt, mu)."""
    gen = torch.Generator().manual_seed(10 + mode)
    shape, origin, full, bound = (9, 8, 7), (0, 1, 0), (9, 9, 7), 3
    n = shape[0] * shape[1] * shape[2]
    min_mass = 1e-6
    m = torch.rand(n, generator=gen, dtype=torch.float64)
    m[::5] = 0.0
    m[1::11] = 0.3 * min_mass
    m[2::13] = min_mass
    mv = torch.randn(n, 3, generator=gen, dtype=torch.float64) * m[:, None].clamp_min(min_mass)
    mv[3::7, 1] = 0.0  # v components exactly 0 (with g = 0 along that axis): no hit
    mv[4::9] *= 1e-3  # slow nodes: small normal components
    return shape, origin, full, bound, min_mass, m, mv, KF["vec3"](0.0, 0.0, -9.8), 1e-3, 0.7


@pytest.mark.parametrize("mode", sorted(K.WALL.values()))
def test_grid_velocity_walls_equals_grid_velocity_then_grid_walls(mode):
    """The fused flat kernel (one thread per box node, its (i, j, k) from the flat index) against
    the two 3-d kernels it fuses, bitwise, on a box whose origin is off the grid's corner: a
    wrong node index would put the walls elsewhere."""
    shape, origin, full, bound, min_mass, m, mv, gravity, dt, mu = _wall_box(mode)
    n = m.numel()
    v3d = lambda t: wp.from_torch(t.reshape(*shape, 3), dtype=KF["vec3"])  # noqa: E731  (shape: late-bound)
    v_mid, v_ref, v = (torch.full((n, 3), float("nan"), dtype=torch.float64) for _ in range(3))
    wp.launch(KF["grid_velocity"], shape, [v3d(mv), wp.from_torch(m.reshape(shape)), gravity, dt, min_mass],
              [v3d(v_mid)], device="cpu")
    wp.launch(KF["grid_walls"], shape, [v3d(v_mid), wp.vec3i(*origin), wp.vec3i(*full), bound, mode, mu],
              [v3d(v_ref)], device="cpu")
    wp.launch(KF["grid_velocity_walls"], n, [wp.from_torch(mv, dtype=KF["vec3"]), wp.from_torch(m), gravity, dt,
                                             min_mass, wp.vec3i(*shape), wp.vec3i(*origin), wp.vec3i(*full), bound,
                                             mode, mu], [wp.from_torch(v, dtype=KF["vec3"])], device="cpu")
    assert torch.equal(v, v_ref)
    changed = (v_ref != v_mid).any(-1)  # the walls acted: on nodes near the faces only
    assert bool(changed.any())
    # random boxes: shapes down to one node thick, origins anywhere in the grid, empty, NaN and
    # tiny masses, exactly zero momenta (bitwise, NaN masses give v = 0 in both)
    gen = torch.Generator().manual_seed(30 + mode)
    for _ in range(40):
        shape = tuple(int(d) for d in torch.randint(1, 9, (3,), generator=gen))
        full = tuple(d + int(torch.randint(0, 6, (1,), generator=gen)) for d in shape)
        origin = tuple(int(torch.randint(0, f - d + 1, (1,), generator=gen)) for d, f in zip(shape, full))
        n = shape[0] * shape[1] * shape[2]
        m = torch.rand(n, generator=gen, dtype=torch.float64)
        pick = torch.rand(n, generator=gen)
        m[pick < 0.4] = 0.0
        m[(pick >= 0.4) & (pick < 0.45)] = float("nan")
        m[(pick >= 0.45) & (pick < 0.5)] = 0.1 * min_mass
        mv = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        mv[torch.rand(n, 3, generator=gen) < 0.1] = 0.0
        bound_r = int(torch.randint(0, 4, (1,), generator=gen))
        v_mid, v_ref, v = (torch.full((n, 3), float("nan"), dtype=torch.float64) for _ in range(3))
        wp.launch(KF["grid_velocity"], shape, [v3d(mv), wp.from_torch(m.reshape(shape)), gravity, dt, min_mass],
                  [v3d(v_mid)], device="cpu")
        wp.launch(KF["grid_walls"], shape, [v3d(v_mid), wp.vec3i(*origin), wp.vec3i(*full), bound_r, mode, mu],
                  [v3d(v_ref)], device="cpu")
        wp.launch(KF["grid_velocity_walls"], n, [wp.from_torch(mv, dtype=KF["vec3"]), wp.from_torch(m), gravity,
                                                 dt, min_mass, wp.vec3i(*shape), wp.vec3i(*origin), wp.vec3i(*full),
                                                 bound_r, mode, mu], [wp.from_torch(v, dtype=KF["vec3"])],
                  device="cpu")
        assert torch.equal(v, v_ref), (shape, origin, full, bound_r)


def _walls_adjoints(ins: list, g_out: torch.Tensor) -> tuple[dict, dict]:
    """(hand, auto): d loss / d (grid_mv, grid_m) of grid_velocity_walls on the flat launch
    arguments ``ins`` from d loss / dv ``g_out`` (n, 3), by the hand-written adjoint kernel and by
    Warp's automatic adjoint of the forward kernel."""
    n = g_out.shape[0]
    v3 = lambda t: wp.from_torch(t, dtype=KF["vec3"])  # noqa: E731
    auto_mv, auto_m = torch.zeros(n, 3, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    wp.launch(KF["grid_velocity_walls"], n, ins, [v3(torch.empty(n, 3, dtype=torch.float64))], device="cpu",
              adjoint=True, adj_inputs=[v3(auto_mv), wp.from_torch(auto_m), KF["vec3"](), 0.0, 0.0, wp.vec3i(),
                                        wp.vec3i(), wp.vec3i(), 0, 0, 0.0], adj_outputs=[v3(g_out)])
    hand_mv = torch.full((n, 3), float("nan"), dtype=torch.float64)
    hand_m = torch.full((n,), float("nan"), dtype=torch.float64)
    wp.launch(KF["grid_velocity_walls_adjoint"], n, ins + [v3(g_out), v3(hand_mv), wp.from_torch(hand_m)],
              device="cpu")
    return {"mv": hand_mv, "m": hand_m}, {"mv": auto_mv, "m": auto_m}


@pytest.mark.parametrize("mode", sorted(K.WALL.values()))
def test_grid_velocity_walls_adjoint_matches_automatic(mode):
    """The hand adjoint against Warp's automatic one on every node of :func:`_wall_box`."""
    shape, origin, full, bound, min_mass, m, mv, gravity, dt, mu = _wall_box(mode)
    n = m.numel()
    gen = torch.Generator().manual_seed(20 + mode)
    g_out = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    v3 = lambda t: wp.from_torch(t, dtype=KF["vec3"])  # noqa: E731
    ins = [v3(mv), wp.from_torch(m), gravity, dt, min_mass, wp.vec3i(*shape), wp.vec3i(*origin), wp.vec3i(*full),
           bound, mode, mu]
    out = torch.empty(n, 3, dtype=torch.float64)
    wp.launch(KF["grid_velocity_walls"], n, ins, [v3(out)], device="cpu")
    # the case mix the test claims: nodes on walls, hits with and without clamped friction
    v = out.reshape(*shape, 3)
    assert bool((v == 0).all(-1).any()) and bool((v != 0).all(-1).any())
    hand, auto = _walls_adjoints(ins, g_out)
    _close(hand, auto, ["mv", "m"], f"grid_velocity_walls mode {mode}")
    # random boxes anywhere in a grid, one node thick and up, with empty and tiny masses
    for _ in range(20):
        shape = tuple(int(d) for d in torch.randint(1, 8, (3,), generator=gen))
        full = tuple(d + int(torch.randint(0, 5, (1,), generator=gen)) for d in shape)
        origin = wp.vec3i(*(int(torch.randint(0, f - d + 1, (1,), generator=gen)) for d, f in zip(shape, full)))
        n = shape[0] * shape[1] * shape[2]
        m = torch.rand(n, generator=gen, dtype=torch.float64)
        m[torch.rand(n, generator=gen) < 0.4] = 0.0
        m[torch.rand(n, generator=gen) < 0.05] = 0.2 * min_mass
        mv = torch.randn(n, 3, generator=gen, dtype=torch.float64) * m[:, None].clamp_min(min_mass)
        g_out = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        ins = [v3(mv), wp.from_torch(m), gravity, dt, min_mass, wp.vec3i(*shape), origin, wp.vec3i(*full), bound, mode,
               mu]
        hand, auto = _walls_adjoints(ins, g_out)
        _close(hand, auto, ["mv", "m"], f"grid_velocity_walls mode {mode}, box {shape} at {tuple(origin)} of {full}")
