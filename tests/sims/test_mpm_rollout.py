"""MPM rollouts: directional derivatives vs float64 finite differences (controls, initial state,
every material parameter, with a soft frictional collider and walls in the loop), conservation
laws, determinism, and errors for bad input."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.sdf import Box, Sphere
from diffworld.sims import mpm

T = 16


def _scene(name: str, dtype=torch.float64, colliders=True, gravity=(0.0, 0.0, -9.8), **mat):
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=12)
    cols = [mpm.Collider("sphere", size=(0.1, 0, 0), friction=0.3, softness=50.0)] if colliders else []
    body = mpm.Body(Box((0.1,) * 3, (0.5, 0.5, 0.4)), mpm.material(name, **mat), ppc=8, velocity=(0.2, 0, -0.5))
    model, state = mpm.build_model(grid, [body], dt=2e-3, dtype=dtype, colliders=cols, gravity=gravity)
    ctrl = torch.zeros(T, len(cols), 13, dtype=dtype)
    if cols:
        ctrl[:, 0, :3] = torch.tensor([0.5, 0.5, 0.18])
        ctrl[:, 0, 6] = 1.0
        ctrl[:, 0, 9] = 0.3
    return model, state, ctrl


def _weights(state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in state]


# material -> (material overrides, parameters checked with their FD step)
CASES = {
    "water": (dict(E=2e3), {"E": 1e-2, "nu": 1e-6, "density": 1e-3}),
    "viscous": (dict(E=2e3, viscosity=0.5), {"viscosity": 1e-6, "density": 1e-3}),
    "jelly": (dict(E=2e3), {"E": 1e-2, "nu": 1e-6}),
    "neo_hookean": (dict(E=2e3), {"E": 1e-2, "nu": 1e-6}),
    "snow": (dict(E=2e3), {"theta_c": 1e-7, "theta_s": 1e-7}),
    "plasticine": (dict(E=2e3, yield_stress=200.0), {"yield_stress": 1e-3, "E": 1e-2}),
    "sand": (dict(E=2e3), {"friction_angle": 1e-7, "nu": 1e-6}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rollout_gradients_match_finite_differences(name):
    over, checked = CASES[name]
    model, state, ctrl = _scene(name, **over)
    w = _weights(state)

    def loss(x0, v0, control, *values):
        params = dict(zip(checked, values))
        out = mpm.rollout(model, mpm.State(x0, v0, state.C, state.F), T, control, window=5, params=params,
                          record_every=8)
        f = out.final
        return sum((a * b).sum() for a, b in zip(f, w)) + (out.states[1].x * w[0]).sum()

    base = [state.x, state.v, ctrl] + [model.params[k] for k in checked]
    steps = {"x0": 1e-5, "v0": 1e-5, "control": 1e-5, **checked}
    for i, key in enumerate(["x0", "v0", "control", *checked]):
        ins = [t.detach().clone() for t in base]
        ins[i].requires_grad_()
        for c in directional_check(loss, ins, eps=steps[key], n_dirs=2, seed=i):
            assert c.rel_error < 1e-4, (name, key, c)


def test_keeping_the_last_window_gives_the_same_gradients_as_recomputing_it():
    model, state, ctrl = _scene("plasticine", E=2e3, yield_stress=200.0)
    grads = []
    for keep in (True, False):
        ctrl_g = ctrl.clone().requires_grad_()
        E = model.params["E"].clone().requires_grad_()
        out = mpm.rollout(model, state, T, ctrl_g, window=5, params={"E": E}, keep_last_window=keep)
        ((out.final.x ** 2).sum() + out.final.F.sum()).backward()
        grads.append((ctrl_g.grad, E.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_window_size_does_not_change_values_or_gradients():
    model, state, ctrl = _scene("jelly", E=2e3)
    results = []
    for window in (1, 4, T):
        ctrl_g = ctrl.clone().requires_grad_()
        E = model.params["E"].clone().requires_grad_()
        out = mpm.rollout(model, state, T, ctrl_g, window=window, params={"E": E})
        loss = (out.final.x ** 2).sum()
        loss.backward()
        results.append((out.final.x, ctrl_g.grad, E.grad))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_momentum_changes_only_by_gravity_in_free_flight():
    # No collider, no wall contact: APIC transfers conserve linear momentum exactly, so the total
    # momentum after t seconds is p0 + M g t.
    g = (0.3, -0.2, -9.8)
    model, state, _ = _scene("jelly", colliders=False, gravity=g, E=5e3)
    m = model.params["density"] * model.params["volume"]
    p0 = (m[:, None] * state.v).sum(0)
    out = mpm.rollout(model, state, T, window=8)
    t = T * model.dt
    expected = p0 + m.sum() * torch.tensor(g, dtype=torch.float64) * t
    p = (m[:, None] * out.final.v).sum(0)
    assert torch.allclose(p, expected, rtol=1e-12, atol=1e-12 * float(m.sum()))


def test_angular_momentum_is_conserved_without_gravity():
    # APIC conserves angular momentum: L = sum m x x v + m C^T-part (Jiang et al. 2015).
    model, state, _ = _scene("jelly", colliders=False, gravity=(0, 0, 0), E=5e3)
    gen = torch.Generator().manual_seed(1)
    v0 = torch.cross(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64).expand_as(state.x),
                     state.x - state.x.mean(0), dim=1) + 0.1 * torch.randn(state.x.shape, generator=gen,
                                                                            dtype=torch.float64)
    state = mpm.State(state.x, v0, state.C, state.F)
    m = model.params["density"] * model.params["volume"]
    D = model.grid.dx ** 2 / 4

    def angular(s):
        L = (m[:, None] * torch.cross(s.x, s.v, dim=1)).sum(0)
        # the affine part contributes m D eps_abc C_cb (quadratic B-splines)
        Ct = s.C
        spin = torch.stack([Ct[:, 2, 1] - Ct[:, 1, 2], Ct[:, 0, 2] - Ct[:, 2, 0], Ct[:, 1, 0] - Ct[:, 0, 1]], 1)
        return L + (m[:, None] * D * spin).sum(0)

    out = mpm.rollout(model, state, T, window=8)
    L0, L1 = angular(state), angular(out.final)
    assert torch.allclose(L0, L1, rtol=1e-3, atol=1e-9)


def test_grid_mass_equals_particle_mass():
    model, state, ctrl = _scene("water")
    stepper = mpm.Stepper(model)
    params = [model.params[k] for k in mpm.PARTICLE_PARAMS]
    _, _, keep = stepper.substep(state, params, ctrl[0], keep=True)
    total = float((model.params["density"] * model.params["volume"]).sum())
    assert math.isclose(float(keep.grid_m.sum()), total, rel_tol=1e-12)


def test_same_inputs_give_identical_results_float32():
    model, state, ctrl = _scene("sand", dtype=torch.float32)
    a = mpm.rollout(model, state, T, ctrl).final.x
    b = mpm.rollout(model, state, T, ctrl).final.x
    assert torch.equal(a, b)


def test_cfl_breach_is_reported_with_a_remedy():
    model, state, ctrl = _scene("water")
    fast = mpm.State(state.x, state.v + torch.tensor([60.0, 0, 0], dtype=torch.float64), state.C, state.F)
    with pytest.raises(mpm.SimulationError, match=r"CFL breached after substep 1: .*Lower dt to at most"):
        mpm.rollout(model, fast, 1, ctrl[:1])


def test_stable_dt_is_the_elastic_wave_limit():
    model, _, _ = _scene("jelly", E=1e5, nu=0.2)
    mu, lam = 1e5 / 2.4, 1e5 * 0.2 / (1.2 * 0.6)
    c = math.sqrt((lam + 2 * mu) / 1000.0)
    assert math.isclose(mpm.stable_dt(model, cfl=0.5), 0.5 * model.grid.dx / c, rel_tol=1e-6)


def test_bad_input_errors_name_the_argument():
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=12)
    outside = mpm.Body(Sphere(0.2, (0.1, 0.5, 0.5)), mpm.material("water"))
    with pytest.raises(ValueError, match=r"bodies\[0\] \('body'\): \d+ particles outside the domain"):
        mpm.build_model(grid, [outside], dt=1e-3)
    with pytest.raises(ValueError, match="no particle"):
        mpm.build_model(grid, [mpm.Body(Sphere(0.001, (0.5, 0.5, 0.5)), mpm.material("water"))], dt=1e-3)
    with pytest.raises(ValueError, match="dt: expected a finite number > 0"):
        mpm.build_model(grid, [mpm.Body(Sphere(0.1, (0.5, 0.5, 0.5)), mpm.material("water"))], dt=0.0)
    model, state, ctrl = _scene("water")
    with pytest.raises(ValueError, match=r"control: expected shape \(16, 1, 13\)"):
        mpm.rollout(model, state, T, ctrl[:3])
    with pytest.raises(ValueError, match="unknown parameter 'stiffness'"):
        mpm.rollout(model, state, T, ctrl, params={"stiffness": torch.ones(1)})
    with pytest.raises(ValueError, match="shape expected one of"):
        mpm.Collider("teapot")
    nan_state = mpm.State(state.x, state.v.clone(), state.C, state.F)
    nan_state.v[3, 0] = float("nan")
    with pytest.raises(mpm.SimulationError, match=r"non-finite .* of particle \d+ after substep 4"):
        mpm.rollout(model, nan_state, 4, ctrl[:4], window=2)


def _saved_bytes(fn) -> int:
    """Bytes of distinct tensor storages autograd keeps for the backward pass of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_recording_does_not_cut_the_windows():
    """Recording every 4 substeps (as the MPM task records every control step) must leave the
    window setting in force: fewer checkpoints, hence less memory held, as the window grows."""
    model, state, ctrl = _scene("jelly", E=2e3)
    T2 = 32
    ctrl = ctrl[:1].expand(T2, -1, -1).clone()
    held = []
    for window in (4, 8, 16, 32):
        x0 = state.x.clone().requires_grad_()
        nbytes, out = _saved_bytes(lambda: mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), T2, ctrl,
                                                       window=window, record_every=4, keep_last_window=False))
        assert out.substeps == list(range(0, T2 + 1, 4))
        held.append(nbytes)
    assert held[0] > held[1] > held[2] > held[3], held
    # one state (x, v, C, F) is 24 values per particle; 8 windows -> 1 window saves 7 checkpoints
    per_state = state.x.shape[0] * 24 * 8
    assert held[0] - held[3] >= 7 * per_state, (held, per_state)


def test_gradients_do_not_depend_on_the_window_when_recording_inside_windows():
    model, state, ctrl = _scene("plasticine", E=2e3, yield_stress=200.0)
    grads, xs = [], []
    for window in (3, 5, 16):
        c = ctrl.clone().requires_grad_()
        x0 = state.x.clone().requires_grad_()
        out = mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), T, c, window=window, record_every=4)
        xs.append(torch.stack([s.x for s in out.states]).detach())
        loss = sum((s.x ** 2).sum() * (i + 1) + s.F.sum() for i, s in enumerate(out.states[1:]))
        loss.backward()
        grads.append((c.grad, x0.grad))
    for other, g in zip(xs[1:], grads[1:]):
        assert torch.equal(other, xs[0])  # the same forward numbers, bit for bit
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
