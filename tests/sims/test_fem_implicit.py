"""FEM implicit integrator (backward Euler, Newton + Jacobi-preconditioned CG): stability far
above the explicit limit, the quasi-static limit against the explicit solution damped to rest
(patch test, cantilever), accuracy and wall time against a fine explicit run, gradients against
float64 central differences, independence of the checkpoint window, and the Newton failure
message. Run with ``-s`` to see the measured numbers (docs/fem.md quotes them)."""

import time

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.engine.runtime import init_warp
from diffworld.sims.fem import (Control, ImplicitStepper, SimulationError, State, TetMesh, build_model, rollout,
                                stable_dt)

torch.set_num_threads(1)
init_warp()

F64 = torch.float64
TIGHT = dict(newton_tol=1e-13, cg_tol=1e-10, adjoint_tol=1e-13)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _energy(model, st):
    return float(model.energy(st).total)


def test_stable_far_above_the_explicit_limit():
    """A stiff block (E 1 MPa) clamped at its base, kicked: 100x the explicit limit, no blow-up,
    energy decays step after step (backward Euler dissipates; no damping set)."""
    mesh = TetMesh.box((0, 0, 0), (0.02, 0.02, 0.02), (3, 3, 3))
    base = mesh.nodes_in_box((0, 0, 0), (0.02, 0.02, 0))
    model = build_model(mesh, E=1e6, nu=0.45, density=1000.0, kinematic=base, dtype=F64)
    lim = stable_dt(model).dt
    v0 = 0.5 * torch.randn(model.n_nodes, 3, generator=_gen(0), dtype=F64)
    v0[base] = 0
    for factor in (10, 100):
        dt = factor * lim
        stepper = ImplicitStepper(model, dt)
        st = State(mesh.vertices.clone(), v0)
        energies = [_energy(model, st)]
        for _ in range(10):
            st = rollout(model, st, dt, 1, integrator="implicit", stepper=stepper).final
            assert bool(torch.isfinite(st.x).all()) and bool(torch.isfinite(st.v).all())
            energies.append(_energy(model, st))
        print(f"\n[stability] dt = {factor} x explicit limit ({dt:.3g} s): energy {energies[0]:.3e} -> "
              f"{energies[-1]:.3e} J, Newton/step {stepper.total_newton / stepper.total_steps:.1f}, "
              f"CG/step {stepper.total_cg / stepper.total_steps:.1f}")
        assert all(b <= a * (1 + 1e-9) for a, b in zip(energies, energies[1:]))
        assert energies[-1] < 0.5 * energies[0]


def _static(model, x0, dt_big=1e3, steps=3, control=None, **opts):
    """Quasi-static limit: backward Euler with a step so large that M / dt^2 is negligible."""
    st = State(x0, torch.zeros_like(x0))
    for _ in range(steps):
        st = rollout(model, st, dt_big, 1, control, integrator="implicit", implicit_options=opts).final
    return st.x


@pytest.mark.parametrize("law", ["stable_neo_hookean", "fixed_corotated", "linear"])
def test_patch_test_quasi_static(law):
    """Boundary nodes of a jittered cube follow an affine map (small, so that the linear law is
    exact too); the free interior nodes' static solution reproduces it to 1e-8 (relative)."""
    box = TetMesh.box((0, 0, 0), (1.0, 1.0, 1.0), (3, 3, 3))
    X = box.vertices.clone()
    inner = ((X > 1e-9) & (X < 1 - 1e-9)).all(1)
    X[inner] += 0.08 * (torch.rand(int(inner.sum()), 3, generator=_gen(5), dtype=F64) - 0.5)
    mesh = TetMesh(X, box.tets, "jittered cube")
    boundary = (~inner).nonzero()[:, 0]
    model = build_model(mesh, E=1e4, nu=0.3, density=1000.0, law=law, kinematic=boundary, dtype=F64)
    A = torch.tensor([[1.01, 0.004, -0.003], [0.002, 0.995, 0.006], [-0.005, 0.001, 1.008]], dtype=F64)
    t = torch.tensor([0.001, -0.002, 0.003], dtype=F64)
    # the pose moves the kinematic nodes rigidly; an affine map is not rigid, so drive it through
    # the model's anchors (the kinematic targets) directly
    model.anchors = (model.anchors - model.pivot) @ A.T + model.pivot + t
    model.gravity = torch.zeros(3, dtype=F64)
    x_static = _static(model, mesh.vertices.clone(), newton_tol=1e-12, cg_tol=1e-8)
    want = (X - model.pivot) @ A.T + model.pivot + t
    err = float((x_static - want).abs().max() / (want - X).abs().max())
    print(f"\n[patch {law}] static affine error {err:.2e} (relative to the displacement)")
    assert err < 1e-8


def _cantilever(E=1e5, damping=0.0):
    """A 6 x 1 x 1 cm beam (6 x 1 x 1 cells) clamped at x = 0 under gravity."""
    mesh = TetMesh.box((0, 0, 0), (0.06, 0.01, 0.01), (6, 1, 1))
    clamp = mesh.nodes_in_box((0, 0, 0), (0, 0.01, 0.01))
    model = build_model(mesh, E=E, nu=0.3, density=1000.0, kinematic=clamp, damping=damping, dtype=F64)
    tip = mesh.nodes_in_box((0.06, 0, 0), (0.06, 0.01, 0.01))
    return model, tip


def test_cantilever_quasi_static_equals_explicit_at_rest():
    """The quasi-static solution (backward Euler, dt 1e3 s) of a cantilever under gravity equals
    the explicit run damped to rest (mass-proportional damping ~ 2 omega_1, 1.5 s)."""
    model, tip = _cantilever(damping=60.0)
    X = model.mesh.vertices
    t0 = time.perf_counter()
    x_imp = _static(model, X.clone(), newton_tol=1e-12, cg_tol=1e-8)
    t_imp = time.perf_counter() - t0
    lim = stable_dt(model).dt
    n = int(1.5 / lim) + 1
    t0 = time.perf_counter()
    out = rollout(model, model.rest_state(), 1.5 / n, n, window=n)
    t_exp = time.perf_counter() - t0
    d_imp = (x_imp[tip] - X[tip])[:, 2].mean()
    d_exp = (out.final.x[tip] - X[tip])[:, 2].mean()
    rel = float(abs(d_imp - d_exp) / abs(d_exp))
    print(f"\n[cantilever] tip deflection quasi-static {float(d_imp):.6e} m ({t_imp:.3f} s), explicit at rest "
          f"{float(d_exp):.6e} m ({n} steps, {t_exp:.2f} s): relative difference {rel:.2e}; residual velocity "
          f"{float(out.final.v.abs().max()):.1e} m/s")
    assert rel < 1e-4


def _swing(model, n, integrator):
    """The cantilever released from rest under gravity, n steps over 0.1 s (about half its first
    period): final state, wall time [s], stepper."""
    dt = 0.1 / n
    if integrator == "implicit":
        stepper = ImplicitStepper(model, dt)
    else:
        from diffworld.sims.fem import Stepper
        stepper = Stepper(model, dt)
    t0 = time.perf_counter()
    st = rollout(model, model.rest_state(), dt, n, integrator=integrator, stepper=stepper, window=64).final
    return st, time.perf_counter() - t0, stepper


def test_accuracy_and_wall_time_against_fine_explicit():
    """Swinging cantilever over 0.1 s: implicit runs at 25 to 200 x the explicit limit against an
    explicit run at a quarter of its limit; the error is the final displacement's (max over nodes)
    relative to the maximum displacement. Backward Euler is first order and damps the swing (the
    worst case for it): the error falls ~2x per halving of dt (0.80 -> 0.47 -> 0.26 -> 0.13 -> 0.07
    for 20 to 320 steps)."""
    model, tip = _cantilever(E=1e5)
    lim = stable_dt(model).dt
    n_fine = 4 * (int(0.1 / lim) + 1)
    ref, t_ref, _ = _swing(model, n_fine, "explicit")
    X = model.mesh.vertices
    scale = float((ref.x - X).abs().max())
    errs = []
    for n in (10, 40, 160):
        st, t_run, stp = _swing(model, n, "implicit")
        err = float((st.x - ref.x).abs().max()) / scale
        errs.append(err)
        print(f"\n[swing] implicit {n} steps (dt {0.1 / n:.3g} s = {0.1 / n / lim:.0f} x explicit limit): error "
              f"{err:.2e}, wall {t_run:.3f} s, Newton/step {stp.total_newton / n:.1f}, CG/step {stp.total_cg / n:.0f}")
    print(f"[swing] explicit fine: {n_fine} steps (dt {0.1 / n_fine:.3g} s), wall {t_ref:.3f} s, tip deflection "
          f"{float((ref.x - X)[tip, 2].mean()):.3e} m")
    assert all(b < 0.6 * a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.2


def test_pressed_gel_block_against_fine_explicit():
    """A gel block (2 x 2 x 1 cm, E 50 kPa, nu 0.45) clamped at its base, its top pressed 1 mm down
    by a smooth ramp over 0.1 s (a tactile press: slow against the block's vibration): the implicit
    run at 10 steps (~60 x the explicit limit) against explicit steps at the limit."""
    mesh = TetMesh.box((0, 0, 0), (0.02, 0.02, 0.01), (4, 4, 2))
    top = mesh.nodes_in_box((0, 0, 0.01), (0.02, 0.02, 0.01))
    base = mesh.nodes_in_box((0, 0, 0), (0.02, 0.02, 0))
    model = build_model(mesh, E=5e4, nu=0.45, density=1100.0, kinematic=torch.cat([top, base]), dtype=F64)
    lim = stable_dt(model).dt
    k_top = torch.isin(model.kinematic, top)
    out = {}
    for name, n in (("explicit", int(0.1 / lim) + 1), ("implicit", 10)):
        dt = 0.1 / n
        if name == "implicit":
            stepper = ImplicitStepper(model, dt)
        else:
            from diffworld.sims.fem import Stepper
            stepper = Stepper(model, dt)
        # the press moves only the top nodes: a per-step pose would move the base too, so the top
        # anchors (data of the stepper) are lowered step by step
        anchors0 = stepper.anchor_t[:-1].clone()
        st = model.rest_state()
        t0 = time.perf_counter()
        for i in range(n):
            depth = 1e-3 * 0.5 * (1 - torch.cos(torch.tensor(torch.pi * (i + 1) / n, dtype=F64)))
            stepper.anchor_t[:-1] = anchors0
            stepper.anchor_t[:-1][k_top, 2] -= depth
            st = rollout(model, st, dt, 1, integrator=name, stepper=stepper).final
        out[name] = (st, time.perf_counter() - t0, n, stepper)
    ref = out["explicit"][0].x
    scale = float((ref - mesh.vertices).abs().max())
    err = float((out["implicit"][0].x - ref).abs().max()) / scale
    imp = out["implicit"][3]
    print(f"\n[press] implicit 10 steps ({0.01 / lim:.0f} x explicit limit): error {err:.2e} of the 1 mm press, wall "
          f"{out['implicit'][1]:.3f} s, Newton/step {imp.total_newton / 10:.1f}, CG/step {imp.total_cg / 10:.0f}; "
          f"explicit {out['explicit'][2]} steps: wall {out['explicit'][1]:.3f} s")
    assert err < 5e-3


def _grad_scene():
    box = TetMesh.box((0, 0, 0), (0.03, 0.02, 0.02), (3, 2, 2))
    kin = box.nodes_in_box((0, 0, 0), (0, 0.02, 0.02))
    loads = box.nodes_in_box((0.03, 0, 0), (0.03, 0.02, 0.02))
    X = box.vertices + 0.002 * (torch.rand(box.vertices.shape, generator=_gen(1), dtype=F64) - 0.5)
    mesh = TetMesh(X, box.tets, "jittered bar")
    laws = ["stable_neo_hookean", "fixed_corotated", "linear"] * (mesh.n_tets // 3)
    E = 1e4 * (1 + 0.3 * torch.rand(mesh.n_tets, generator=_gen(2), dtype=F64))
    return build_model(mesh, E=E, nu=0.35, density=1000.0, law=laws, kinematic=kin, load_nodes=loads, damping=2.0,
                       dtype=F64)


STEPS = 4
NAMES = ("E_rel", "nu", "v0", "translation", "rotation", "forces", "density_rel", "damping", "gravity")


def _grad_setup(model):
    g = _gen(3)
    n, t, m = model.n_nodes, model.n_tets, model.load_nodes.numel()
    inputs = {
        "E_rel": torch.zeros(t, dtype=F64),
        "nu": torch.full((t,), 0.35, dtype=F64),
        "v0": 0.05 * torch.randn(n, 3, generator=g, dtype=F64),
        "translation": 0.002 * torch.randn(STEPS, 3, generator=g, dtype=F64),
        "rotation": 0.05 * torch.randn(STEPS, 3, generator=g, dtype=F64),
        "forces": 0.01 * torch.randn(STEPS, m, 3, generator=g, dtype=F64),
        "density_rel": torch.zeros(t, dtype=F64),
        "damping": torch.tensor(2.0, dtype=F64),
        "gravity": torch.tensor([0.0, 0.0, -9.81], dtype=F64),
    }
    wx = torch.randn(n, 3, generator=g, dtype=F64)
    wv = torch.randn(n, 3, generator=g, dtype=F64)
    dt = 20 * stable_dt(model).dt
    X, E0 = model.mesh.vertices, model.E.detach()

    def loss(E_rel, nu, v0, translation, rotation, forces, density_rel, damping, gravity, window=2):
        params = dict(E=E0 * (1 + E_rel), nu=nu, density=1000.0 * (1 + density_rel), damping=damping, gravity=gravity)
        out = rollout(model, State(X.clone(), v0), dt, control=Control(translation, rotation, forces), window=window,
                      params=params, integrator="implicit", implicit_options=TIGHT)
        st = out.final
        return 100.0 * ((st.x - X) * wx).sum() + (st.v * wv).sum()

    return inputs, loss


@pytest.fixture(scope="module")
def grad_scene():
    return _grad_scene()


@pytest.mark.parametrize("group", [("translation", "rotation", "forces"), ("E_rel",), ("nu",), ("v0",),
                                   ("density_rel", "damping", "gravity")])
def test_implicit_gradients_match_central_differences(grad_scene, group):
    """4 implicit steps at 20x the explicit limit, mixed laws on a jittered bar, clamp on a moving
    pose, loads: float64 central differences along random directions, relative error < 1e-5."""
    inputs, loss = _grad_setup(grad_scene)
    args = [inputs[k].clone().requires_grad_(k in group) for k in NAMES]
    for check in directional_check(loss, args, eps=1e-6, n_dirs=2, seed=5):
        print(f"\n[fd {'+'.join(group)}] analytic {check.analytic:.10e} numeric {check.numeric:.10e} "
              f"rel {check.rel_error:.1e}")
        assert check.rel_error < 1e-5


def test_implicit_gradients_do_not_depend_on_window(grad_scene):
    inputs, loss = _grad_setup(grad_scene)
    grads = []
    for window in (1, 2, 4):
        args = [inputs[k].clone().requires_grad_() for k in NAMES]
        g = torch.autograd.grad(loss(*args, window=window), args)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    for g in grads[1:]:
        rel = float((g - grads[0]).abs().max() / grads[0].abs().max())
        print(f"\n[window] max relative difference {rel:.1e}")
        assert rel < 1e-10


def test_newton_failure_names_step_and_residual():
    model, _ = _cantilever()
    msg = r"implicit step \d+: Newton did not converge in 1 iterations \(residual "
    with pytest.raises(SimulationError, match=msg):
        rollout(model, model.rest_state(), 0.05, 3, integrator="implicit", window=1,
                implicit_options=dict(newton_max=1, newton_tol=1e-14, cg_max=1))


def test_explicit_is_the_default_and_bad_integrator_refused():
    model, _ = _cantilever()
    dt = stable_dt(model).dt
    a = rollout(model, model.rest_state(), dt, 5).final
    b = rollout(model, model.rest_state(), dt, 5, integrator="explicit").final
    assert torch.equal(a.x, b.x) and torch.equal(a.v, b.v)
    with pytest.raises(ValueError, match="integrator"):
        rollout(model, model.rest_state(), dt, 1, integrator="backward")


def test_float32_matches_float64():
    """40 implicit steps of the swinging cantilever in float32 end within 1e-4 (relative) of
    float64 (Newton ends at the positions' round-off in float32)."""
    tips = []
    for dtype in (torch.float32, F64):
        mesh = TetMesh.box((0, 0, 0), (0.06, 0.01, 0.01), (6, 1, 1))
        clamp = mesh.nodes_in_box((0, 0, 0), (0, 0.01, 0.01))
        model = build_model(mesh, E=1e5, nu=0.3, density=1000.0, kinematic=clamp, dtype=dtype)
        out = rollout(model, model.rest_state(), 0.0025, 40, integrator="implicit")
        tips.append((out.final.x - mesh.vertices).to(F64))
    rel = float((tips[0] - tips[1]).abs().max() / tips[1].abs().max())
    print(f"\n[float32] relative difference {rel:.1e}")
    assert rel < 1e-4
