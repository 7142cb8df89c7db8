"""XPBD rope: hanging rope stretch against alpha T, pendulum period and length, momentum and energy,
float64 FD of rollouts (initial positions, compliances, pinned trajectory, table friction and
stiffness) through checkpoint windows, window independence, float32 against float64, bad input."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims import cable
from diffworld.sims.fem import ContactParams

torch.set_num_threads(1)

D = torch.float64
G = 9.81


def test_hanging_rope_stretch_matches_compliance():
    """A pinned vertical chain at rest: segment j stretches by alpha * T_j, T_j the weight below it."""
    n, seg, alpha = 5, 0.05, 2e-3
    pts = cable.rope_points((0, 0, 0), (0, 0, -seg * (n - 1)), n)
    model = cable.build_rope(pts, linear_density=0.02, radius=1e-3, stretch_compliance=alpha, bending="none",
                             pinned=[0], damping=20.0, iterations=20, dtype=D)
    out = cable.rollout(model, model.rest_state(), 2e-3, 600, window=300)
    x = out.final.x
    stretch = (x[1:] - x[:-1]).norm(dim=1) - model.rest_length
    m = model.masses()
    tension = G * torch.flip(torch.cumsum(torch.flip(m, [0]), 0), [0])[1:]  # weight below each segment [N]
    expected = alpha * tension
    assert float(out.final.v.abs().max()) < 1e-6  # at rest
    rel = ((stretch - expected).abs() / expected).max()
    assert float(rel) < 1e-3, (stretch, expected)  # measured 1.8e-6
    assert float(x[:, :2].abs().max()) < 1e-12  # stays vertical


def test_pendulum_period_and_length():
    """One rigid segment (alpha = 0), 0.05 rad: the small-angle period (with the theta^2/16
    correction) within 0.1 %, length kept."""
    L, th0, dt = 0.5, 0.05, 1e-3
    pts = torch.tensor([[0.0, 0.0, 0.0], [L * math.sin(th0), 0.0, -L * math.cos(th0)]], dtype=D)
    model = cable.build_rope(pts, linear_density=0.1, radius=1e-3, stretch_compliance=0.0, pinned=[0],
                             iterations=2, dtype=D)
    out = cable.rollout(model, model.rest_state(), dt, 3000, window=1000, record_every=1)
    xs = out.positions()[:, 1]  # (T + 1, 3)
    length = xs.norm(dim=1)
    assert float((length - L).abs().max()) < 1e-12
    s = xs[:, 0]
    up = ((s[:-1] < 0) & (s[1:] >= 0)).nonzero()[:, 0]  # upward zero crossings
    t = (up + (-s[up] / (s[up + 1] - s[up]))) * dt
    period = float((t[-1] - t[0]) / (len(t) - 1))
    exact = 2 * math.pi * math.sqrt(L / G) * (1 + th0 ** 2 / 16)
    assert abs(period / exact - 1) < 1e-3, (period, exact)  # measured 1.2e-6


def _free_rope(bending="angle"):
    g = torch.Generator().manual_seed(4)
    pts = cable.rope_points((0, 0, 0), (0.12, 0, 0), 7) + 0.004 * torch.randn(7, 3, generator=g, dtype=D)
    model = cable.build_rope(pts, linear_density=0.03, radius=1e-3, stretch_compliance=1e-4, bend_compliance=0.5,
                             bending=bending, gravity=(0, 0, 0), iterations=8, dtype=D)
    v0 = 0.3 * torch.randn(7, 3, generator=g, dtype=D)
    return model, cable.State(model.rest_positions.clone(), v0)


@pytest.mark.parametrize("bending", ["angle", "distance"])
def test_free_rope_momentum_conserved_energy_not_growing(bending):
    model, s0 = _free_rope(bending)
    out = cable.rollout(model, s0, 1e-3, 300, window=100, record_every=10)
    m = model.masses()
    p0 = (m[:, None] * s0.v).sum(0)
    for s in out.states[1:]:
        p = (m[:, None] * s.v).sum(0)
        assert float((p - p0).norm()) < 1e-11 * float(p0.norm())
    e = torch.stack([model.energy(s).total for s in out.states])
    assert float(e[1:].max()) <= float(e[0]) * (1 + 1e-3)  # XPBD dissipates, never gains
    assert float(e[-1]) < float(e[0])


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

N_FD = 8


def _table_scene(bending="angle", dtype=D):
    """A rope lying on a table, one end pinned and dragged along a trajectory: stretch, bending,
    gravity, the table's normal force and sliding friction all act."""
    r = 1e-3
    pts = cable.rope_points((0, 0, r - 2e-5), (0.05, 0.0, r - 2e-5), 6)
    ground = cable.Ground(0.0, ContactParams(k_n=200.0, k_d=1.0, k_t=0.05, mu=0.4, eps_v=1e-3,
                                             penetration_width=2e-6, damping_width=1e-3, friction_exponent=8.0))
    return cable.build_rope(pts, linear_density=0.02, radius=r, stretch_compliance=1e-4, bend_compliance=0.3,
                            bending=bending, pinned=[0], damping=0.5, ground=ground, iterations=4, dtype=dtype)


def _loss(model, window):
    g = torch.Generator().manual_seed(2)
    wx = torch.randn(model.n_particles, 3, generator=g, dtype=D)
    wv = torch.randn(model.n_particles, 3, generator=g, dtype=D)
    s = torch.arange(1, N_FD + 1, dtype=D)[:, None, None]
    base = model.rest_positions[:1][None] + s * torch.tensor([3e-4, 2e-4, 1e-4], dtype=D)  # dragged [m]
    v0 = torch.zeros(model.n_particles, 3, dtype=D)
    v0[:, 0] = 0.05  # sliding: friction in the slip regime

    def loss(dx0, ctrl, sc, bc, mu, k_n):
        params = {"stretch_compliance": 1e-4 * (1 + sc), "bend_compliance": 0.3 * (1 + bc),
                  "ground_mu": 0.4 * (1 + mu), "ground_k_n": 200.0 * (1 + k_n)}
        out = cable.rollout(model, cable.State(model.rest_positions + 1e-3 * dx0, v0), 1e-3, N_FD,
                            cable.Control(base + 1e-3 * ctrl), window=window, params=params)
        x, v = out.final
        return 1e3 * ((x - model.rest_positions) * wx).sum() + 10 * (v * wv).sum()
    return loss


def _inputs(model):
    z = lambda *s: torch.zeros(*s, dtype=D)  # noqa: E731
    return [z(model.n_particles, 3), z(N_FD, 1, 3), z(()), z(()), z(()), z(())]


NAMES = ["x0", "control", "stretch_compliance", "bend_compliance", "ground_mu", "ground_k_n"]


@pytest.mark.parametrize("bending", ["angle", "distance"])
def test_rollout_gradients_fd(bending):
    """Float64 central differences of a loss after 8 steps (windows of 3) w.r.t. each input."""
    model = _table_scene(bending)
    loss = _loss(model, window=3)
    for k, name in enumerate(NAMES):
        inputs = _inputs(model)
        inputs[k].requires_grad_(True)
        # relative parameter changes of 1e-4 (the loss's round-off noise, ~1e-9 of it, dominates
        # below), position changes of 1 nm (the table's softplus of width 2 um curves above)
        eps = 1e-6 if k < 2 else 1e-4
        for r in directional_check(loss, inputs, eps=eps, n_dirs=2, seed=k):
            print(bending, name, f"{r.rel_error:.1e}")
            assert r.rel_error < 2e-5, (name, r)
            assert abs(r.numeric) > 1e-6, (name, r)  # the input matters


def test_gradients_window_independent():
    model = _table_scene()
    grads = []
    for window in (1, 3, N_FD):
        inputs = [t.requires_grad_(True) for t in _inputs(model)]
        grads.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(_loss(model, window)(*inputs),
                                                                           inputs)]))
    for g in grads[1:]:
        assert float((g - grads[0]).abs().max()) <= 1e-12 * float(grads[0].abs().max())


def test_float32_matches_float64():
    m64, m32 = _table_scene(dtype=D), _table_scene(dtype=torch.float32)
    o64 = cable.rollout(m64, m64.rest_state(), 1e-3, 20, window=7)
    o32 = cable.rollout(m32, m32.rest_state(), 1e-3, 20, window=7)
    assert o32.final.x.dtype == torch.float32
    assert float((o32.final.x.double() - o64.final.x).abs().max()) < 1e-6  # [m], 5 cm rope


def test_bad_input():
    pts = cable.rope_points((0, 0, 0), (0.1, 0, 0), 4)
    with pytest.raises(ValueError, match="bending"):
        cable.build_rope(pts, linear_density=0.01, radius=1e-3, bending="beam")
    with pytest.raises(ValueError, match="linear_density"):
        cable.build_rope(pts, linear_density=-1.0, radius=1e-3)
    with pytest.raises(ValueError, match="bend_compliance"):
        cable.build_rope(pts, linear_density=0.01, radius=1e-3, bend_compliance=0.0)
    with pytest.raises(ValueError, match="pinned"):
        cable.build_rope(pts, linear_density=0.01, radius=1e-3, pinned=[7])
    model = cable.build_rope(pts, linear_density=0.01, radius=1e-3, pinned=[0], dtype=D)
    with pytest.raises(ValueError, match="positions"):
        cable.rollout(model, model.rest_state(), 1e-3, control=cable.Control(torch.zeros(5, 2, 3, dtype=D)))
    with pytest.raises(ValueError, match="unknown parameter"):
        cable.rollout(model, model.rest_state(), 1e-3, 2, params={"E": 1.0})
    table = _table_scene()
    with pytest.raises(ValueError, match="k_n"):
        cable.rollout(table, table.rest_state(), 1e-3, 2, params={"ground_k_n": 1e6})
