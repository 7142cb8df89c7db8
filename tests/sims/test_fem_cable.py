"""FEM gel + XPBD rope coupling: third law, a rope on a table pressed by a flat pad (forces balance),
friction dragging the rope when the pad slides (stick with mu = 1, none with mu = 0), float64 FD
of a coupled rollout w.r.t. the pad's pose, k_n, mu and the rope's initial positions, and window
independence."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims import cable, fem
from diffworld.sims.coupling.fem_cable import (CableCoupling, CableGel, CoupledState, closest_faces,
                                               fem_cable_rollout, gel_rope_forces)
from diffworld.sims.fem import ContactParams
from diffworld.sims.fem.mesh import TetMesh
from diffworld.sims.tactile.sensors import flat_pad

torch.set_num_threads(1)

D = torch.float64
R = 1.5e-3  # rope radius [m]
T = 4e-3  # pad thickness [m]
DT = 8e-5  # [s], under the pad's explicit limit (9.6e-5 s)
G = 9.81


def _pad(gap):
    """A 2 x 2 cm flat pad turned face down (rotated by pi about x), its contact face ``gap`` [m]
    above the top of a rope lying on the table z = 0."""
    geo = flat_pad(size=(0.02, 0.02), thickness=T, res=(4, 4, 2))
    V = geo.mesh.vertices.to(D)
    V = torch.stack([V[:, 0], -V[:, 1], -V[:, 2] + 2 * R + gap + T], 1)
    mesh = TetMesh.from_arrays(V, geo.mesh.tets, orient=True)
    model = fem.build_model(mesh, E=5e4, nu=0.4, density=1000.0, kinematic=geo.base_nodes, damping=30.0,
                            gravity=(0, 0, 0), dtype=D)
    return model, geo.contact_faces


def _rope(mu_table=0.5, n=9, widths=False, k_d=5000.0):
    smooth = dict(penetration_width=2e-6, damping_width=1e-3, friction_exponent=8.0) if widths else {}
    ground = cable.Ground(0.0, ContactParams(k_n=2000.0, k_d=k_d, k_t=0.1, mu=mu_table, eps_v=1e-3, **smooth))
    pts = cable.rope_points((0, -0.02, R), (0, 0.02, R), n)
    return cable.build_rope(pts, linear_density=0.01, radius=R, stretch_compliance=1e-6, bend_compliance=10.0,
                            damping=50.0, ground=ground, iterations=5, dtype=D)


def _coupling(mu, widths=False, k_n=2000.0):
    smooth = dict(penetration_width=2e-6, damping_width=1e-3, friction_exponent=8.0) if widths else {}
    # k_d ~ critical damping of a particle on its penalty spring at ~40 um penetration
    return CableCoupling(ContactParams(k_n=k_n, k_d=5000.0, k_t=0.1, mu=mu, eps_v=1e-3, **smooth))


def test_third_law_and_bvh_query():
    """Forces on the gel sum to minus those on the rope; the BVH finds the brute-force closest face."""
    model, faces = _pad(0.0)
    rope = _rope()
    g = torch.Generator().manual_seed(0)
    xr = rope.rest_positions + torch.tensor([0.0, 0.0, 1e-4], dtype=D) + 5e-4 * torch.randn(9, 3, generator=g,
                                                                                              dtype=D)
    vr = 0.01 * torch.randn(9, 3, generator=g, dtype=D)
    xg = model.rest_state().x
    vg = 0.01 * torch.randn(xg.shape, generator=g, dtype=D)
    ids = closest_faces(xg, faces, xr, 3 * R)
    # brute force: the face whose closest point is nearest
    from diffworld.geometry.triangles import closest_point_on_triangle
    tri = xg[faces]
    assert int((ids >= 0).sum()) >= 4  # the particles under the pad
    for i in range(xr.shape[0]):
        p = xr[i].expand(faces.shape[0], 3)
        phi, _, _ = closest_point_on_triangle(p, tri[:, 0], tri[:, 1], tri[:, 2])
        best = phi.abs().min()
        if int(ids[i]) < 0:
            assert float(best) > 3 * R  # none in range
        else:
            assert abs(float(phi[ids[i]].abs() - best)) < 1e-7  # float32 BVH, float64 distance
    cp = [torch.tensor(v, dtype=D) for v in (2000.0, 50.0, 0.1, 0.5, 1e-3)]
    f = gel_rope_forces(xg, vg, faces, ids, xr, vr, R, cp, ContactParams())
    assert float(f.penetration.max()) > 1e-4  # in contact
    total = f.gel.sum(0) + f.rope.sum(0)
    assert float(total.abs().max()) < 1e-15 * float(f.rope.abs().sum())
    assert float(f.normal_force.sum()) > 0


@pytest.fixture(scope="module")
def pressed():
    """The pad pressed 0.2 mm past touching the rope over 300 steps, then held 200 steps."""
    model, faces = _pad(2e-4)
    rope = _rope()
    n_press, n_hold = 300, 200
    depth = torch.cat([torch.linspace(0, 1, n_press, dtype=D), torch.ones(n_hold, dtype=D)])[:, None] * 4e-4
    tz = torch.cat([torch.zeros_like(depth), torch.zeros_like(depth), -depth], 1)
    gel = CableGel(model, faces, control=fem.Control(translation=tz))
    st = CoupledState((model.rest_state(),), rope.rest_state())
    out = fem_cable_rollout([gel], rope, st, DT, n_press + n_hold, _coupling(1.0), window=100)
    return model, faces, rope, out, tz[-1]


def test_pressed_rope_forces_balance(pressed):
    model, faces, rope, out, _ = pressed
    s = out.final
    f_gel = out.gel_force[-1, 0]  # on the gel, from the rope
    weight = float(rope.masses().sum()) * G
    stepper = cable.RopeStepper(rope, DT)
    ground = stepper.ground_forces(s.rope.x, s.rope.v, cable.rope_params(rope)[5:])
    table = float(ground[:, 2].sum())
    press = float(f_gel[2])
    print(f"pad force {press:.4f} N, table {table:.4f} N, weight {weight:.5f} N, "
          f"max penetration {float(out.penetration.max()) * 1e6:.1f} um")
    assert float(s.rope.v.abs().max()) < 5e-3  # settled [m/s]
    assert press > 50 * weight  # a real press
    assert abs(table - (press + weight)) < 0.01 * table  # the rope is in equilibrium
    assert abs(float(f_gel[0])) < 0.05 * press and abs(float(f_gel[1])) < 0.05 * press
    assert float(out.penetration.max()) < R  # no particle centre went through the gel


def test_sliding_pad_drags_rope_by_friction(pressed):
    """The pressed pad slides 1 mm along x (table mu 0.5). mu = 0: only the dent the rope makes in
    the gel pushes it; a small mu (0.02) caps the friction (slip) and drags it further; mu >= ~0.1
    is in the viscous stick regime (k_t |v_t| under the cap): the result no longer depends on mu."""
    model, faces, rope, out, t_end = pressed
    n = 250
    slide = torch.linspace(0, 1, n, dtype=D)[:, None] * torch.tensor([1e-3, 0, 0], dtype=D)
    gel = CableGel(model, faces, control=fem.Control(translation=t_end + slide))
    dx = {}
    for mu in (0.0, 0.02, 1.0, 2.0):
        res = fem_cable_rollout([gel], rope, out.final, DT, n, _coupling(mu), window=125)
        dx[mu] = float((res.final.rope.x[:, 0] - out.final.rope.x[:, 0]).mean())
    print({k: f"{v * 1e3:.3f} mm" for k, v in dx.items()})
    assert dx[0.0] < 0.7 * dx[0.02] < 0.7 * dx[1.0]
    assert dx[1.0] > 0.4e-3
    assert abs(dx[2.0] - dx[1.0]) < 1e-9  # the cap is not reached: stick


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

N_FD = 6


def _fd_loss(window):
    """Pad starting 0.1 mm into the rope, moving down and sideways; smooth contact law."""
    model, faces = _pad(-1e-4)
    rope = _rope(widths=True, n=5)
    g = torch.Generator().manual_seed(5)
    wg = torch.randn(model.n_nodes, 3, generator=g, dtype=D)
    wr = torch.randn(rope.n_particles, 3, generator=g, dtype=D)
    s = torch.arange(1, N_FD + 1, dtype=D)[:, None]
    base = s * torch.tensor([2e-6, 1e-6, -3e-6], dtype=D)

    def loss(ctrl, k_n, mu, dx0):
        gel = CableGel(model, faces, control=fem.Control(translation=base + 1e-6 * ctrl))
        coup = CableCoupling(ContactParams(k_n=2000.0 * (1 + k_n), k_d=20.0, k_t=0.1, mu=0.5 * (1 + mu), eps_v=1e-3,
                                           penetration_width=2e-6, damping_width=1e-3, friction_exponent=8.0))
        # off the pad's node lines: a particle right under a mesh vertex is equidistant from its
        # triangles, and the float32 BVH may pick different ones for the +- FD perturbations
        xr = rope.rest_positions + torch.tensor([1.3e-3, 0.7e-3, 0.0], dtype=D) + 1e-4 * dx0
        vr = torch.zeros_like(xr)
        vr[:, 0] = 0.02  # sliding under the pad: friction in the slip regime
        st = CoupledState((model.rest_state(),), cable.State(xr, vr))
        out = fem_cable_rollout([gel], rope, st, DT, N_FD, coup, window=window)
        f = out.final
        return 1e4 * ((f.gels[0].x - model.rest_state().x) * wg).sum() + 1e3 * ((f.rope.x - xr) * wr).sum() \
            + (f.rope.v * wr).sum()
    return loss, model, rope


def _fd_inputs(rope):
    z = lambda *s: torch.zeros(*s, dtype=D)  # noqa: E731
    return [z(N_FD, 3), z(()), z(()), z(rope.n_particles, 3)]


def test_coupled_gradients_fd():
    loss, model, rope = _fd_loss(window=2)
    for k, name in enumerate(["pad translation", "k_n", "mu", "rope x0"]):
        inputs = _fd_inputs(rope)
        inputs[k].requires_grad_(True)
        eps = 1e-4
        for r in directional_check(loss, inputs, eps=eps, n_dirs=2, seed=k):
            print(name, f"{r.rel_error:.1e}", r.numeric)
            assert r.rel_error < 1e-5, (name, r)
            assert abs(r.numeric) > 1e-8, (name, r)


def test_coupled_gradients_window_independent():
    grads = []
    for window in (1, 4, N_FD):
        loss, model, rope = _fd_loss(window)
        inputs = [t.requires_grad_(True) for t in _fd_inputs(rope)]
        grads.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(*inputs), inputs)]))
    for g in grads[1:]:
        assert float((g - grads[0]).abs().max()) <= 1e-12 * float(grads[0].abs().max())


def test_bad_input():
    model, faces = _pad(2e-4)
    rope = _rope()
    st = CoupledState((model.rest_state(),), rope.rest_state())
    with pytest.raises(ValueError, match="stability limit"):
        fem_cable_rollout([CableGel(model, faces)], rope, st, 1e-3, 2, _coupling(0.5))
    with pytest.raises(ValueError, match="k_n"):
        fem_cable_rollout([CableGel(model, faces)], rope, st, DT, 2, _coupling(0.5, k_n=1e7))
    with pytest.raises(TypeError, match="gel state"):
        fem_cable_rollout([CableGel(model, faces)], rope, CoupledState((), rope.rest_state()), DT, 2)
