"""Contact in the implicit FEM integrator (issue 15): a rigid object pressing and sliding on a gel
pad with backward Euler steps far above the explicit limit.

Checks: the incremental potential's contact part has gradient ``-dt f_c`` (the Newton line
search's merit); a quasi-static press at 166x the explicit limit gives the normal force of a fine
explicit run; sliding at stiff friction (``k_t`` far above what an explicit step at its limit
resolves) transmits ``mu`` times the normal force to the sensor base; float64 central differences
w.r.t. the object's pose per step, ``k_n``, ``k_d``, ``k_t``, ``mu`` and ``E``; independence of the
checkpoint window; the Newton failure message. Run with ``-s`` for the measured numbers.
"""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.engine.runtime import init_warp
from diffworld.sims import fem
from diffworld.sims.fem import Contact, ContactParams, RigidObject, SimulationError
from diffworld.sims.fem.implicit import _ContactTerm
from diffworld.sims.fem.rollout import ContactStep, _contact_inputs
from diffworld.sims.tactile.sensors import flat_pad

torch.set_num_threads(1)
init_warp()

D = torch.float64
T = 4e-3  # pad thickness [m]
R = 5e-3  # sphere radius [m]
TIGHT = dict(newton_tol=1e-13, cg_tol=1e-10, adjoint_tol=1e-14)


def _pad(res=(6, 6, 2), damping=2.0):
    g = flat_pad(size=(0.02, 0.02), thickness=T, res=res)
    model = fem.build_model(g.mesh, E=1e5, nu=0.4, density=1100.0, kinematic=g.base_nodes, damping=damping,
                            gravity=(0.0, 0.0, 0.0), dtype=D)
    return model, g


@pytest.fixture(scope="module")
def pad():
    return _pad()


@pytest.mark.parametrize("smooth", [False, True])
def test_contact_potential_gradient_is_minus_dt_force(pad, smooth):
    """The line search's merit: d/dw of the contact potential equals -dt f_c (central differences
    along random directions, hard and smoothed ramps / min), for a state in stick and slip."""
    model, g = pad
    nodes = g.contact_nodes
    kw = dict(penetration_width=2e-5, damping_width=1e-3, friction_exponent=8.0) if smooth else {}
    params = ContactParams(k_n=300.0, k_d=20.0, k_t=5.0, mu=0.4, eps_v=1e-3, **kw)
    pos = torch.tensor([3e-4, -2e-4, T + R - 4e-4], dtype=D)
    contact = Contact(RigidObject.sphere(R, pos, linear_velocity=torch.tensor([0.02, 0.0, -0.01], dtype=D)),
                      nodes, params)
    cols, cps = _contact_inputs(contact, model, 1)
    row = torch.cat([torch.zeros(12, dtype=D), cols[0], cols[0]])
    gen = torch.Generator().manual_seed(3)
    x = model.rest_state().x.clone()
    x[nodes, 2] -= 1e-4 * torch.rand(nodes.numel(), generator=gen, dtype=D)
    v = 0.01 * torch.randn(x.shape, generator=gen, dtype=D)
    dt = 1e-3
    term = _ContactTerm(ContactStep(contact, 12), x, v, row, cps, dt)
    w = 0.02 * torch.randn(x.shape, generator=gen, dtype=D)
    for _ in range(3):
        d = torch.randn(x.shape, generator=gen, dtype=D)
        h = 1e-6
        numeric = (term.potential(w + h * d) - term.potential(w - h * d)) / (2 * h)
        analytic = float(-dt * (term.forces(w) * d).sum())
        print(f"\n[potential] d Phi_c . d {numeric:.10e}, -dt f_c . d {analytic:.10e}")
        assert abs(numeric - analytic) < 1e-6 * abs(analytic), (numeric, analytic)


def _press_poses(n, t_total, depth, explicit):
    """Sphere centre per step: a smooth press to ``depth`` over 60 % of the time, then held. The
    explicit row s is the pose at the start of step s, the implicit one during (at the end of) it."""
    dt = t_total / n
    t = torch.arange(1, n + 1, dtype=D) * dt - (dt if explicit else 0.0)
    ramp = 0.5 * (1 - torch.cos(math.pi * torch.clamp(t / (0.6 * t_total), max=1.0)))
    return torch.stack([torch.zeros_like(t), torch.zeros_like(t), T + R - depth * ramp], 1)


def test_press_matches_fine_explicit():
    """A sphere pressed 0.5 mm into an 8 x 8 x 2 pad over 0.1 s: 10 implicit steps (166x the explicit
    limit) end at the quasi-static normal force of 3,331 explicit steps at half the limit, within
    2 % (measured 0.75 %; 20 and 40 implicit steps: 0.81 %, 0.85 %: the residual is the explicit
    run's own remaining motion)."""
    model, g = _pad((8, 8, 2), damping=20.0)
    nodes = g.contact_nodes
    params = ContactParams(k_n=300.0, k_t=50.0, mu=0.4, eps_v=1e-3)
    lim = fem.stable_dt(model).dt
    forces = {}
    for name, n in (("explicit", int(0.1 / (0.5 * lim)) + 1), ("implicit", 10)):
        pos = _press_poses(n, 0.1, 5e-4, name == "explicit")
        with torch.no_grad():
            x, v = fem.rollout(model, model.rest_state(), 0.1 / n, n, window=n, integrator=name,
                               contact=Contact(RigidObject.sphere(R, pos), nodes, params)).final
            forces[name] = float(fem.contact_forces(x, v, nodes, RigidObject.sphere(R, pos[-1]), params)
                                 .normal_force_total)
    rel = forces["implicit"] / forces["explicit"] - 1
    print(f"\n[press] normal force explicit {forces['explicit']:.5f} N, implicit (10 steps, "
          f"{0.01 / lim:.0f}x limit) {forces['implicit']:.5f} N, difference {rel:+.2%}")
    assert abs(rel) < 0.02


def test_sliding_friction_reaches_coulomb():
    """Press 0.5 mm, then slide 4 mm along x in 0.1 s with stiff friction (k_t 50 N s/m: an explicit
    step resolves it only below 2 m / k_t, ~1e-7 s here): averaged over the second half of the
    slide, the sensor base's tangential reaction is mu = 0.5 times its normal one within 3 %
    (measured 0.506 with 15 steps, 0.505 with 30)."""
    model, g = _pad((8, 8, 2), damping=20.0)
    nodes, base = g.contact_nodes, g.base_nodes
    mu = 0.5
    params = ContactParams(k_n=300.0, k_t=50.0, mu=mu, eps_v=1e-3)
    t_press, t_slide, length = 0.05, 0.1, 4e-3
    n = 15
    dt = (t_press + t_slide) / n
    t = torch.arange(1, n + 1, dtype=D) * dt
    ramp = 0.5 * (1 - torch.cos(math.pi * torch.clamp(t / t_press, max=1.0)))
    slide = torch.clamp((t - t_press) / t_slide, 0.0, 1.0)
    pos = torch.stack([-length / 2 + length * slide, torch.zeros_like(t), T + R - 5e-4 * ramp], 1)
    vx = torch.where((t > t_press) & (t <= t_press + t_slide), length / t_slide, 0.0)
    vel = torch.stack([vx, torch.zeros_like(vx), torch.zeros_like(vx)], 1)
    stepper = fem.ImplicitStepper(model, dt)
    with torch.no_grad():
        out = fem.rollout(model, model.rest_state(), dt, n, window=n, integrator="implicit", stepper=stepper,
                          record_every=1, contact=Contact(RigidObject.sphere(R, pos, linear_velocity=vel), nodes,
                                                          params))
        f = torch.stack([stepper.forces(st.x, model.E, model.nu)[base].sum(0)
                         for st, k in zip(out.states, out.steps) if k * dt >= t_press + 0.5 * t_slide]).mean(0)
    ratio = float(f[0] / -f[2])
    print(f"\n[slide] base reaction tangential / normal {ratio:.4f} (mu {mu}); Newton/step "
          f"{stepper.total_newton / n:.1f}, CG/step {stepper.total_cg / n:.0f}")
    assert abs(ratio / mu - 1) < 0.03


N_STEPS = 5
GROUPS = ("pose", "k_n", "k_d", "k_t", "mu", "E")


def _fd_setup(model, nodes):
    dt = 20 * fem.stable_dt(model).dt
    gen = torch.Generator().manual_seed(1)
    wx = torch.randn(model.n_nodes, 3, generator=gen, dtype=D)
    wv = torch.randn(model.n_nodes, 3, generator=gen, dtype=D)
    vel = torch.tensor([0.01, 0.0, -0.005], dtype=D)
    s = torch.arange(N_STEPS, dtype=D)
    pos = torch.stack([2e-4 + vel[0] * dt * s, torch.full_like(s, 3e-4), T + R - 3e-4 - 2e-6 * s], 1)
    inputs = dict(pose=pos, k_n=torch.tensor(300.0, dtype=D), k_d=torch.tensor(20.0, dtype=D),
                  k_t=torch.tensor(5.0, dtype=D), mu=torch.tensor(0.4, dtype=D), E=torch.tensor(1e5, dtype=D))

    def loss(pose, k_n, k_d, k_t, mu, E, window=2):
        params = ContactParams(k_n=k_n, k_d=k_d, k_t=k_t, mu=mu, eps_v=1e-3, penetration_width=2e-5,
                               damping_width=1e-3, friction_exponent=8.0)
        obj = RigidObject.sphere(R, pose, linear_velocity=vel)
        x, v = fem.rollout(model, model.rest_state(), dt, N_STEPS, window=window, params={"E": E},
                           integrator="implicit", implicit_options=TIGHT, contact=Contact(obj, nodes, params)).final
        r = fem.contact_forces(x, v, nodes, RigidObject.sphere(R, pose[-1], linear_velocity=vel), params)
        return (1e3 * ((x - model.rest_state().x) * wx).sum() + 1e-1 * (v * wv).sum()
                + 10.0 * r.normal_force_total + 100.0 * r.shear_force_total)

    return inputs, loss


@pytest.mark.parametrize("group", GROUPS)
def test_gradients_match_central_differences(pad, group):
    """5 implicit steps at 20x the explicit limit, the sphere pressing and sliding (stick and slip
    nodes, smoothed ramps and min): float64 central differences of a loss of the final state and
    the final contact forces, each input alone, relative error < 1e-5. Measured: pose 1e-9, k_n
    3e-8, k_d 7e-8, k_t 3e-8, mu 8e-8, E 7e-9 (steps of 1e-4 of the scalar's value: the solves'
    round-off limits smaller steps)."""
    model, g = pad
    inputs, loss = _fd_setup(model, g.contact_nodes)
    args = [t.clone().requires_grad_(k == group) for k, t in inputs.items()]
    scale = float(inputs[group].abs().max())
    for r in directional_check(loss, args, eps=(1e-6 if group == "pose" else 1e-4) * scale, n_dirs=1, seed=2):
        print(f"\n[fd {group}] analytic {r.analytic:.10e} numeric {r.numeric:.10e} rel {r.rel_error:.1e}")
        assert r.rel_error < 1e-5


def test_gradients_do_not_depend_on_window(pad):
    model, g = pad
    inputs, loss = _fd_setup(model, g.contact_nodes)
    grads = []
    for window in (1, 2, N_STEPS):
        args = [t.clone().requires_grad_(True) for t in inputs.values()]
        out = loss(*args, window=window)
        grads.append(torch.cat([out.detach().reshape(1)] + [t.reshape(-1) for t in torch.autograd.grad(out, args)]))
    for gr in grads[1:]:
        rel = float(((gr - grads[0]).abs() / grads[0].abs().clamp_min(1e-300)).max())
        print(f"\n[window] max relative difference {rel:.1e}")
        assert rel < 1e-10


def test_newton_failure_names_step_and_residual(pad):
    model, g = pad
    pos = torch.tensor([0.0, 0.0, T + R - 5e-4], dtype=D)
    msg = r"implicit step 0: Newton did not converge in 1 iterations \(residual "
    with pytest.raises(SimulationError, match=msg):
        fem.rollout(model, model.rest_state(), 1e-3, 2, integrator="implicit", window=1,
                    implicit_options=dict(newton_max=1, newton_tol=1e-14, cg_max=1),
                    contact=Contact(RigidObject.sphere(R, pos), g.contact_nodes, ContactParams(k_n=300.0)))


def test_far_object_changes_nothing(pad):
    """An object that never touches (hard ramps) adds exact zeros to the implicit step too."""
    model, g = pad
    x0 = model.rest_state().x.clone()
    x0[g.contact_nodes, 2] += 1e-4 * torch.rand(g.contact_nodes.numel(), generator=torch.Generator().manual_seed(2),
                                                dtype=D)
    st = fem.State(x0, torch.zeros_like(x0))
    dt = 20 * fem.stable_dt(model).dt
    far = Contact(RigidObject.sphere(R, torch.tensor([0.0, 0.0, 1.0], dtype=D)), g.contact_nodes,
                  ContactParams(k_n=300.0, k_t=5.0, mu=0.4))
    a = fem.rollout(model, st, dt, 3, integrator="implicit").final
    b = fem.rollout(model, st, dt, 3, integrator="implicit", contact=far).final
    assert torch.equal(a.x, b.x) and torch.equal(a.v, b.v)
