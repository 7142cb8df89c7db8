"""FEM explicit solver: gradients of rollouts against float64 central differences on random
directions (controls, forces, E, nu, density, damping, gravity, initial state; mixed laws on a
jittered mesh), independence of the checkpoint window, float32 against float64, the kinematic
pose, the control helpers, the stability message and bad input."""

import math
import re

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.engine.runtime import init_warp
from diffworld.sims.fem import (Control, SimulationError, State, TetMesh, build_model, check_dt, rollout,
                                rotation_matrix, stable_dt, step)

torch.set_num_threads(1)
init_warp()

F64 = torch.float64
SIZE = (0.03, 0.02, 0.02)  # [m]
STEPS = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scene(dtype=F64):
    """A jittered 3x2x2-cell bar (72 tets, laws mixed tet by tet), clamped to a moving pose at
    x = 0, loaded at x = L; per-tet E in [1e4, 1.3e4] Pa."""
    box = TetMesh.box((0, 0, 0), SIZE, (3, 2, 2))
    kin = box.nodes_in_box((0, 0, 0), (0, SIZE[1], SIZE[2]))
    loads = box.nodes_in_box((SIZE[0], 0, 0), SIZE)
    X = box.vertices + 0.002 * (torch.rand(box.vertices.shape, generator=_gen(1), dtype=F64) - 0.5)
    mesh = TetMesh(X, box.tets, "jittered bar")
    laws = ["stable_neo_hookean", "fixed_corotated", "linear"] * (mesh.n_tets // 3)
    E = 1e4 * (1 + 0.3 * torch.rand(mesh.n_tets, generator=_gen(2), dtype=F64))
    model = build_model(mesh, E=E, nu=0.35, density=1000.0, law=laws, kinematic=kin, load_nodes=loads, damping=2.0,
                        dtype=dtype)
    return model


def _inputs(model):
    """Named inputs of the loss, scaled so that a unit direction moves each of them sensibly."""
    g = _gen(3)
    n, t, m = model.n_nodes, model.n_tets, model.load_nodes.numel()
    return {
        "E_rel": torch.zeros(t, dtype=F64),
        "nu": torch.full((t,), 0.35, dtype=F64),
        "x0": model.mesh.vertices.to(F64).clone(),
        "v0": 0.05 * torch.randn(n, 3, generator=g, dtype=F64),
        "translation": 0.002 * torch.randn(STEPS, 3, generator=g, dtype=F64),
        "rotation": 0.05 * torch.randn(STEPS, 3, generator=g, dtype=F64),
        "forces": 0.01 * torch.randn(STEPS, m, 3, generator=g, dtype=F64),
        "density_rel": torch.zeros(t, dtype=F64),
        "damping": torch.tensor(2.0, dtype=F64),
        "gravity": torch.tensor([0.0, 0.0, -9.81], dtype=F64),
    }


def _loss_fn(model, dt, window=5, record_every=None):
    g = _gen(4)
    wx = torch.randn(model.n_nodes, 3, generator=g, dtype=F64)
    wv = torch.randn(model.n_nodes, 3, generator=g, dtype=F64)
    E0 = model.E.detach()
    X = model.mesh.vertices

    def loss(E_rel, nu, x0, v0, translation, rotation, forces, density_rel, damping, gravity):
        params = dict(E=E0 * (1 + E_rel), nu=nu, density=1000.0 * (1 + density_rel), damping=damping, gravity=gravity)
        out = rollout(model, State(x0, v0), dt, control=Control(translation, rotation, forces), window=window,
                      record_every=record_every, params=params)
        total = 0.0
        for st in out.states[1:]:  # every recorded state (only the final one without record_every)
            total = total + 100.0 * ((st.x - X) * wx).sum() + (st.v * wv).sum()
        return total

    return loss


@pytest.fixture(scope="module")
def scene():
    model = _scene()
    return model, 0.8 * stable_dt(model).dt


@pytest.mark.parametrize("group", ["E_rel", "nu", "x0", "v0", "translation", "rotation", "forces", "density_rel",
                                   "damping", "gravity", "all"])
def test_gradients_match_central_differences(scene, group):
    """d loss / d input along random directions vs float64 central differences, after 16 steps in
    windows of 5 with every 4th state in the loss: measured rel. errors 1e-11 .. 3e-7 (damping
    and gravity, scalars in a loss of magnitude 1e3, take eps 1e-4 to stay clear of round-off)."""
    model, dt = scene
    inputs = _inputs(model)
    loss = _loss_fn(model, dt, record_every=4)
    args = [t.clone().requires_grad_(group in (name, "all")) for name, t in inputs.items()]
    eps = 1e-4 if group in ("damping", "gravity") else 1e-6
    for check in directional_check(loss, args, eps=eps, n_dirs=2, seed=5):
        assert check.rel_error < 1e-5, (group, check)
        assert abs(check.numeric) > 1e-6  # a direction the loss actually depends on


def test_quaternion_control_gradients(scene):
    """The pose as unit quaternions (x, y, z, w), normalized inside: FD on random directions."""
    model, dt = scene
    half = 0.5 * torch.randn(STEPS, 3, generator=_gen(6), dtype=F64) * 0.05
    quat = torch.cat([torch.sin(half), torch.cos(half[:, :1])], 1)
    t = 0.002 * torch.randn(STEPS, 3, generator=_gen(7), dtype=F64)
    w = torch.randn(model.n_nodes, 3, generator=_gen(8), dtype=F64)

    def loss(q, t):
        out = rollout(model, model.rest_state(), dt, control=Control(t, q), window=7)
        return 100.0 * (out.final.x * w).sum() + (out.final.v * w).sum()

    for check in directional_check(loss, [quat.requires_grad_(), t.requires_grad_()], eps=1e-6, n_dirs=2):
        assert check.rel_error < 1e-5, check


def test_gradients_do_not_depend_on_window(scene):
    """Windows of 1, 3, 16 steps and no kept last window: the same final state bit for bit and the
    same gradients to 1e-12 (only the order of the per-window parameter sums differs)."""
    model, dt = scene
    inputs = _inputs(model)
    results = []
    for window, keep in ((16, True), (1, True), (3, True), (3, False), (5, True)):
        args = [t.clone().requires_grad_() for t in inputs.values()]
        params = dict(E=model.E.detach() * (1 + args[0]), nu=args[1], density=1000.0 * (1 + args[7]), damping=args[8],
                      gravity=args[9])
        out = rollout(model, State(args[2], args[3]), dt, control=Control(*args[4:7]), window=window,
                      params=params, record_every=4, keep_last_window=keep)
        loss = sum((st.x * st.x).sum() * 1e3 + (st.v * st.v).sum() for st in out.states[1:])
        grads = torch.autograd.grad(loss, args)
        results.append((out.final, grads))
    ref_state, ref_grads = results[0]
    for state, grads in results[1:]:
        assert torch.equal(state.x, ref_state.x) and torch.equal(state.v, ref_state.v)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-12, atol=1e-12 * float(r.abs().max())), float((g - r).abs().max())


def test_float32_matches_float64():
    """The same scene in float32: 400 steps (a moving clamp, loads, gravity, mixed laws): positions
    agree to 2e-5 of the largest displacement (11 mm; measured 4.5e-6) and gradients w.r.t. E to
    1e-3 (measured 1.8e-5) relative to their largest entry."""
    out = {}
    for dtype in (torch.float32, F64):
        model = _scene(dtype)
        dt = 0.8 * stable_dt(_scene(F64)).dt
        n = 400
        s = torch.linspace(0, 1, n, dtype=F64)[:, None]
        control = Control(translation=0.003 * s * torch.tensor([[1.0, 0.5, -0.5]], dtype=F64),
                          rotation=0.2 * s * torch.tensor([[0.0, 1.0, 0.0]], dtype=F64),
                          forces=0.02 * torch.ones(n, model.load_nodes.numel(), 3, dtype=F64))
        E = model.E.detach().clone().requires_grad_()
        final = rollout(model, model.rest_state(), dt, control=control, window=50, params={"E": E}).final
        (gE,) = torch.autograd.grad((final.x[:, 2]).sum(), E)
        out[dtype] = (final.x.detach().double(), gE.double(), model.mesh.vertices.double())
    x32, g32, X = out[torch.float32]
    x64, g64, _ = out[F64]
    disp = float((x64 - X).abs().max())
    assert disp > 1e-3
    assert float((x32 - x64).abs().max()) < 2e-5 * disp
    assert float((g32 - g64).abs().max()) < 1e-3 * float(g64.abs().max())


# ------------------------------------------------------------------------------------------------
# Kinematic nodes and controls
# ------------------------------------------------------------------------------------------------

def test_kinematic_nodes_follow_the_pose(scene):
    """After a step the kinematic nodes sit at pivot + R (anchor - pivot) + t exactly, with the
    velocity of that move; the input state is not written."""
    model, dt = scene
    state = model.rest_state()
    before = state.x.clone()
    rot = torch.tensor([[0.1, -0.2, 0.3]], dtype=F64)
    t = torch.tensor([[1e-3, 2e-3, -1e-3]], dtype=F64)
    out = step(model, state, dt, Control(t, rot))
    R = rotation_matrix(rot)[0]
    want = model.pivot + (model.anchors - model.pivot) @ R.T + t[0]
    k = model.kinematic
    assert torch.allclose(out.x[k], want, atol=1e-15)
    assert torch.allclose(out.v[k], (want - before[k]) / dt, rtol=1e-12)
    assert torch.equal(state.x, before) and not state.v.any()


def test_rotation_matrix_representations():
    """Axis-angle and quaternion give the same rotation; the zero rotation is I with finite
    gradients; results are rotations."""
    r = torch.randn(8, 3, generator=_gen(9), dtype=F64)
    r[0] = 0.0
    r[1] = 1e-5
    theta = r.norm(dim=1, keepdim=True)
    axis = torch.where(theta > 0, r / theta.clamp_min(1e-300), torch.zeros_like(r))
    q = torch.cat([axis * torch.sin(theta / 2), torch.cos(theta / 2)], 1)
    Ra, Rq = rotation_matrix(r), rotation_matrix(-3.0 * q)  # any scale and sign of q
    assert torch.allclose(Ra, Rq, atol=1e-14)
    eye = torch.eye(3, dtype=F64)
    assert torch.allclose(Ra @ Ra.transpose(1, 2), eye.expand(8, 3, 3), atol=1e-14)
    z = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad((rotation_matrix(z) * torch.randn(1, 3, 3, dtype=F64)).sum(), z)
    assert bool(torch.isfinite(g).all()) and g.abs().max() > 0
    # the derivative at zero: d R / d r_k = [e_k]_x
    rr = torch.randn(1, 3, generator=_gen(10), dtype=F64) * 1e-3
    Rs = rotation_matrix(rr)[0]
    K = torch.tensor([[0, -rr[0, 2], rr[0, 1]], [rr[0, 2], 0, -rr[0, 0]], [-rr[0, 1], rr[0, 0], 0]], dtype=F64)
    assert torch.allclose(Rs, eye + K + 0.5 * K @ K, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        rotation_matrix(torch.zeros(2, 5))


def test_upsample_reaches_every_pose():
    """Control.upsample(n): n steps per row, each row's pose reached at its last substep, linear
    in between (from the identity pose, or from ``start``), forces held."""
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]], dtype=F64)
    r = torch.tensor([[0.0, 0.0, 0.4], [0.0, 0.0, 0.8]], dtype=F64)
    f = torch.randn(2, 3, 3, dtype=F64)
    up = Control(t, r, f).upsample(4)
    assert up.n_steps == 8
    assert torch.equal(up.translation[3], t[0]) and torch.equal(up.translation[7], t[1])
    assert torch.allclose(up.translation[1], 0.5 * t[0]) and torch.allclose(up.translation[5], (t[0] + t[1]) / 2)
    assert torch.allclose(up.rotation[5], torch.tensor([0.0, 0.0, 0.6], dtype=F64))
    assert torch.equal(up.forces[:4], f[:1].expand(4, 3, 3)) and torch.equal(up.forces[4:], f[1:].expand(4, 3, 3))
    started = Control(t[:1]).upsample(2, start=Control(torch.tensor([[3.0, 0.0, 0.0]], dtype=F64)))
    assert torch.allclose(started.translation, torch.tensor([[2.0, 0, 0], [1.0, 0, 0]], dtype=F64))
    q = torch.tensor([[0.0, 0.0, math.sin(0.2), math.cos(0.2)]], dtype=F64)
    qu = Control(rotation=q).upsample(2).rotation
    assert torch.allclose(rotation_matrix(qu[1:]), rotation_matrix(q))


def test_unused_vertex_stays_and_clamp_holds_under_gravity():
    """A vertex no tet uses has no mass: it stays put (no NaN); without a control the kinematic
    nodes stay at their anchors."""
    box = TetMesh.box((0, 0, 0), (0.02, 0.01, 0.01), (2, 1, 1))
    X = torch.cat([box.vertices, torch.tensor([[0.5, 0.5, 0.5]], dtype=F64)])
    mesh = TetMesh(X, box.tets)
    clamped = box.nodes_in_box((0, 0, 0), (0, 0.01, 0.01))
    model = build_model(mesh, E=1e5, nu=0.3, density=1000.0, kinematic=clamped, dtype=F64)
    out = rollout(model, model.rest_state(), stable_dt(model).dt, 50).final
    assert torch.equal(out.x[-1], X[-1]) and torch.equal(out.x[clamped], X[clamped])
    assert float(out.x[:-1, 2].min()) < -1e-6  # the rest sags


# ------------------------------------------------------------------------------------------------
# Stability check and bad input
# ------------------------------------------------------------------------------------------------

def test_stability_message_names_the_limit():
    """dt above the limit: a ValueError with dt, the limit, the smallest edge, the p-wave speed and
    the substeps that fit (which do fit); dt at the limit runs."""
    mesh = TetMesh.box((0, 0, 0), (0.05, 0.01, 0.01), (20, 4, 4))  # edges 2.5 mm
    model = build_model(mesh, E=8e3, nu=0.43, density=2000.0)
    lim = stable_dt(model)
    c = math.sqrt(8e3 * (1 - 0.43) / ((1 + 0.43) * (1 - 0.86)) / 2000.0)
    assert lim.wave_speed == pytest.approx(c) and lim.edge == pytest.approx(2.5e-3)
    dt = 4.2 * lim.dt
    with pytest.raises(ValueError) as err:
        rollout(model, model.rest_state(), dt, 10)
    msg = str(err.value)
    assert msg.startswith(f"dt {dt:.3g} s is above the stability limit {lim.dt:.3g} s of this mesh and material")
    assert "smallest edge 2.5 mm" in msg and f"p-wave speed {c:.3g} m/s" in msg
    n = int(re.search(r"substeps >= (\d+)", msg).group(1))
    assert n == 5 and dt / n <= lim.dt and dt / (n - 1) > lim.dt
    assert check_dt(model, lim.dt) == lim
    rollout(model, model.rest_state(), lim.dt, 2)
    with pytest.raises(ValueError, match="dt: expected a finite number > 0"):
        check_dt(model, -1.0)


def test_blow_up_is_reported():
    """Past the limit with the check turned off: a SimulationError naming the node and the step."""
    mesh = TetMesh.box((0, 0, 0), (0.02, 0.01, 0.01), (2, 1, 1))
    model = build_model(mesh, E=1e5, nu=0.3, density=1000.0, dtype=F64, gravity=(0, 0, 0))
    v = 1e-3 * torch.randn(model.n_nodes, 3, generator=_gen(12), dtype=F64)
    with pytest.raises(SimulationError, match=r"non-finite [xv] of node \d+ after step \d+"):
        rollout(model, State(model.mesh.vertices.clone(), v), 20 * stable_dt(model).dt, 5000, record_every=100,
                stability_check=False)


def test_bad_input():
    mesh = TetMesh.box((0, 0, 0), (0.02, 0.01, 0.01), (2, 1, 1))
    kin = mesh.nodes_in_box((0, 0, 0), (0, 0.01, 0.01))
    with pytest.raises(ValueError, match="E expected a finite number > 0"):
        build_model(mesh, E=-1.0, nu=0.3, density=1000.0)
    with pytest.raises(ValueError, match=r"nu expected .* \(element 3\)"):
        build_model(mesh, E=1e4, nu=torch.tensor([0.3] * 3 + [0.5] + [0.3] * 8), density=1000.0)
    with pytest.raises(ValueError, match="'density' must be finite and > 0"):
        build_model(mesh, E=1e4, nu=0.3, density=0.0)
    with pytest.raises(ValueError, match="load node .* is also kinematic"):
        build_model(mesh, E=1e4, nu=0.3, density=1e3, kinematic=kin, load_nodes=kin[:1])
    with pytest.raises(ValueError, match="'anchors' of shape"):
        build_model(mesh, E=1e4, nu=0.3, density=1e3, kinematic=kin, anchors=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"'kinematic' ids must lie in \[0, 12\)"):
        build_model(mesh, E=1e4, nu=0.3, density=1e3, kinematic=[0, 12])
    with pytest.raises(ValueError, match="unknown name 'rubber'"):
        build_model(mesh, E=1e4, nu=0.3, density=1e3, law="rubber")
    model = build_model(mesh, E=1e4, nu=0.3, density=1e3, kinematic=kin, dtype=F64)
    dt = stable_dt(model).dt
    st = model.rest_state()
    with pytest.raises(ValueError, match=r"state.x of shape \(12, 3\)"):
        rollout(model, State(st.x[:3], st.v), dt, 1)
    with pytest.raises(ValueError, match="n_steps 3 but the control has 2 steps"):
        rollout(model, st, dt, 3, Control(torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="'translation' has a non-finite value .* at step 1"):
        rollout(model, st, dt, control=Control(torch.tensor([[0.0, 0, 0], [math.nan, 0, 0]])))
    with pytest.raises(ValueError, match="'forces' given but the model has no load nodes"):
        rollout(model, st, dt, control=Control(forces=torch.zeros(2, 1, 3)))
    with pytest.raises(ValueError, match="unknown parameter 'yield_stress'"):
        rollout(model, st, dt, 1, params={"yield_stress": torch.ones(1)})
    with pytest.raises(ValueError, match=r"params\['damping'\] must be finite and >= 0"):
        rollout(model, st, dt, 1, params={"damping": torch.tensor(-1.0)})
    with pytest.raises(ValueError, match="rollout: params: E expected a finite number > 0"):
        rollout(model, st, dt, 1, params={"E": torch.tensor(-5.0)})
    with pytest.raises(ValueError, match="give 'n_steps' or a control"):
        rollout(model, st, dt)


def test_external_force_hook_adjoint(scene):
    """Stepper.step(external=...) adds nodal forces; step_adjoint(adj_external=...) returns
    d loss / d external: checked against float64 central differences of one step."""
    from diffworld.sims.fem.solver import Stepper

    model, dt = scene
    stepper = Stepper(model, dt)
    g = _gen(9)
    x0 = model.mesh.vertices.to(F64) + 1e-4 * torch.randn(model.n_nodes, 3, generator=g, dtype=F64)
    v0 = 0.01 * torch.randn(model.n_nodes, 3, generator=g, dtype=F64)
    ext = 0.01 * torch.randn(model.n_nodes, 3, generator=g, dtype=F64)
    row = Control().rows(model, 1)[0].contiguous()
    params = [t.contiguous() for t in (model.E, model.nu, model.masses(model.density), model.damping.reshape(1),
                                       model.gravity)]
    wx, wv = torch.randn(model.n_nodes, 3, generator=g, dtype=F64), torch.randn(model.n_nodes, 3, generator=g,
                                                                                dtype=F64)

    def loss(e):
        x1, v1, _ = stepper.step(x0, v0, params, row, external=e)
        return float((x1 * wx).sum() + (v1 * wv).sum())

    x1, v1, saved = stepper.step(x0, v0, params, row, keep=True, external=ext)
    adj_ext = torch.zeros_like(ext)
    adj_params = [torch.zeros_like(p) for p in params]
    stepper.step_adjoint(saved, params, wx, wv, adj_params, torch.zeros_like(row), adj_external=adj_ext)
    d = torch.randn(ext.shape, generator=g, dtype=F64)
    eps = 1e-3
    numeric = (loss(ext + eps * d) - loss(ext - eps * d)) / (2 * eps)
    analytic = float((adj_ext * d).sum())
    assert abs(numeric) > 1e-8
    assert abs(analytic - numeric) <= 1e-7 * abs(numeric)
    # kinematic nodes ignore external forces: their adjoint is zero
    assert float(adj_ext[model.kinematic].abs().max()) == 0.0
