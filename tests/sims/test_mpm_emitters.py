"""Emitters: particles parked until their activation substep, released at the nozzle. Flux, the
ballistic path of the jet's head, parked particles left alone, window invariance (a recomputed
window releases the same particles), and gradients through a nozzle riding a collider vs float64
finite differences."""

import math

import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims import mpm


def _model(emitters, colliders=(), dtype=torch.float64, gravity=(0.0, 0.0, -9.8), dt=1e-3):
    grid = mpm.GridSpec.make((0, 0, 0), (0.6, 0.6, 0.6), resolution=20)
    return mpm.build_model(grid, [], dt=dt, dtype=dtype, gravity=gravity, colliders=list(colliders),
                           emitters=emitters)


def test_flux_and_ballistic_head_of_a_jet():
    speed, radius, dt = 0.6, 0.03, 1e-3
    jet = mpm.Emitter(mpm.material("water", E=1e4), center=(0.3, 0.3, 0.45), direction=(0, 0, -1), radius=radius,
                      speed=speed, start=0.0, stop=0.1, ppc=8)
    model, state = _model([jet], dt=dt)
    h = model.grid.dx / 2  # ppc 8: spacing dx / 2
    layers = math.floor(0.1 * speed / h) + 1
    per_layer = int(model.emitted.index.numel()) // layers
    assert per_layer * layers == model.emitted.index.numel()
    # Flux: volume released per second = the nozzle's lattice area x speed.
    assert abs(per_layer * h ** 2 - math.pi * radius ** 2) / (math.pi * radius ** 2) < 0.3
    T = 150
    out = mpm.rollout(model, state, T, window=50, record_every=50)
    for s, st in zip(out.substeps, out.states):
        active = model.active_mask(s)
        expected = min(math.floor((s * dt) * speed / h + 1e-9) + 1, layers) * per_layer if s > 0 else per_layer
        assert int(active.sum()) == expected, (s, int(active.sum()), expected)
    # Parked particles have not moved.
    parked = ~model.active_mask(50)
    assert torch.equal(out.states[1].x[parked], state.x[parked])
    # The jet's head (first layer) falls ballistically: z0 - v t - g t^2 / 2 (a water jet in free
    # fall keeps its speed; tolerance: one cell).
    first = model.emitted.index[model.emitted.step == 0]
    t = T * dt
    z = float(out.final.x[first, 2].mean())
    assert abs(z - (0.45 - speed * t - 0.5 * 9.8 * t ** 2)) < model.grid.dx, z


def test_window_size_does_not_change_an_emitting_rollout():
    jet = mpm.Emitter(mpm.material("water", E=1e4), center=(0.3, 0.3, 0.4), radius=0.03, speed=0.5, stop=0.02)
    model, state = _model([jet])
    finals = []
    for window in (1, 7, 30):
        v0 = state.v.clone().requires_grad_()
        out = mpm.rollout(model, mpm.State(state.x, v0, state.C, state.F), 30, window=window)
        (out.final.x[:, 2] ** 2).sum().backward()
        finals.append((out.final.x, v0.grad))
    for x, g in finals[1:]:
        assert torch.equal(x, finals[0][0])
        assert torch.allclose(g, finals[0][1], rtol=1e-10, atol=1e-14)


def test_gradients_through_a_nozzle_on_a_collider_match_finite_differences():
    # A pitcher: a small sphere collider carries the nozzle just below it; its motion is the control.
    col = mpm.Collider("sphere", size=(0.03, 0, 0), friction=0.3, softness=0.0, name="pitcher")
    jet = mpm.Emitter(mpm.material("water", E=2e3), center=(0.0, 0.0, -0.15), direction=(0.3, 0, -1), radius=0.025,
                      speed=0.5, start=0.0, stop=0.012, collider="pitcher")
    model, state = _model([jet], colliders=[col], dt=2e-3)
    T = 12
    ctrl = torch.zeros(T, 1, 13, dtype=torch.float64)
    ctrl[:, 0, :3] = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    ctrl[:, 0, 3:7] = torch.tensor([0.0, 0.1, 0.0, 1.0], dtype=torch.float64) / math.sqrt(1.01)
    ctrl[:, 0, 7] = 0.2
    ctrl[:, 0, 11] = 1.5  # spinning about y
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in state]
    live = model.active_mask(T).to(torch.float64)[:, None]

    def loss(control):
        out = mpm.rollout(model, state, T, control, window=5)
        f = out.final
        return (f.x * w[0] * live).sum() + (f.v * w[1] * live).sum()

    for c in directional_check(loss, [ctrl.clone().requires_grad_()], eps=1e-6, n_dirs=3, seed=1):
        assert c.rel_error < 1e-6, c


def test_bad_emitters_are_rejected_with_the_key():
    import pytest

    with pytest.raises(ValueError, match="emitters\\[0\\].*start < stop"):
        _model([mpm.Emitter(mpm.material("water"), center=(0.3, 0.3, 0.3), start=0.2, stop=0.1)])
    with pytest.raises(ValueError, match="emitters\\[0\\].*collider expected one of"):
        _model([mpm.Emitter(mpm.material("water"), center=(0.3, 0.3, 0.3), collider="nope")])
    with pytest.raises(ValueError, match="emitters\\[0\\].*outside the domain"):
        _model([mpm.Emitter(mpm.material("water"), center=(0.3, 0.3, 0.59))])


def test_parked_particles_of_a_riding_nozzle_are_not_checked_until_released():
    # The nozzle rides a collider: its parked particles sit at their collider-frame points (near the
    # origin, outside the domain's interior) until released. Recording every substep checks the
    # state after each one; a particle released in substep s is live in the state after s + 1.
    col = mpm.Collider("sphere", size=(0.02, 0, 0), friction=0.0, softness=0.0, name="pitcher")
    jet = mpm.Emitter(mpm.material("water", E=2e3), center=(0.0, 0.0, -0.04), radius=0.02, speed=1.5, start=0.0,
                      stop=0.025, collider="pitcher")  # layers released in substeps 0, 5 and 10
    model, state = _model([jet], colliders=[col], dt=2e-3)
    T = 14
    ctrl = torch.zeros(T, 1, 13, dtype=torch.float64)
    ctrl[:, 0, :3] = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    ctrl[:, 0, 6] = 1.0
    out = mpm.rollout(model, state, T, ctrl, record_every=1)  # check_state after every substep
    steps = model.emitted.step
    assert sorted(set(steps.tolist())) == [0, 5, 10] and bool((state.x[model.emitted.index] < 0.1).all())  # parked off the domain
    for s, st in zip(out.substeps, out.states):
        live = model.released_mask(s)
        assert torch.equal(live, model.active_mask(s - 1))
        assert int(live.sum()) == int((steps < s).sum())
        released = live[model.emitted.index]
        if bool(released.any()):  # released particles are in the domain, below the nozzle
            assert bool((st.x[model.emitted.index[released], 2] < 0.37).all())
