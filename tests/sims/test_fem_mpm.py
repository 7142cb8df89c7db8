"""FEM gel + MPM coupling (diffworld.sims.coupling.fem_mpm): Newton's third law (momentum of
gel + MPM conserved while they collide; with gravity, the MPM's momentum change is gravity's
impulse minus the gel's contact impulse), the MPM grid-force hook against gravity, friction
dragging a block (mu = 0 vs mu > 0), float64 finite differences through several steps of sliding
contact with friction, window independence, and input errors."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.coupling.fem_mpm import Gel, contact_stable_dt, coupled_rollout, gel_surface_distance
from diffworld.sims.fem import model as fm
from diffworld.sims.fem.contact import ContactParams
from diffworld.sims.fem.mesh import TetMesh
from diffworld.sims.mpm.solver import Stepper
from diffworld.sims.tactile.sensors import flat_pad

torch.set_num_threads(1)

DX = 2.5e-3
F64 = torch.float64


def _law(k_n=3e3, k_d=2.0, k_t=1.0, mu=0.5):
    return ContactParams(k_n=k_n, k_d=k_d, k_t=k_t, mu=mu, eps_v=1e-3, penetration_width=1e-4, damping_width=1e-2,
                         friction_exponent=4.0)


def _pad(z0, facing_down, kinematic=True, law=None, E=5e4):
    """A coarse flat pad (4 x 4 x 1 cells, 2 x 2 cm, 4 mm thick) with its contact face at z0."""
    geo = flat_pad(size=(0.02, 0.02), thickness=4e-3, res=(4, 4, 1))
    v = geo.mesh.vertices.clone().to(F64)
    if facing_down:  # rotate 180 degrees about x: the contact face looks down
        v = torch.stack([v[:, 0], -v[:, 1], -v[:, 2]], 1)
        v[:, 2] += z0 + 4e-3
    else:
        v[:, 2] += z0 - 4e-3
    # off the grid's lattice: a grid node exactly below a pad vertex sits on the medial axis of
    # the (deformed) surface, where the closest triangle, and the force split, switch
    v[:, 0] += 0.37 * DX
    v[:, 1] += (-0.21 if facing_down else 0.21) * DX  # so that the two pads are images by a half turn
    mesh = TetMesh.from_arrays(v, geo.mesh.tets)
    model = fm.build_model(mesh, E=E, nu=0.3, density=1000.0, gravity=(0.0, 0.0, 0.0),
                           kinematic=geo.base_nodes if kinematic else None, dtype=F64)
    return Gel(model, law or _law())


def _block(z_lo, gravity=(0.0, 0.0, -9.81), velocity=(0.0, 0.0, 0.0), name="elastic", dt=5e-5, **mat):
    """A 1 cm MPM cube (512 particles) on a 16^3 grid of 4 cm (floor wall top at z = 3 dx)."""
    grid = mpm.GridSpec.make((-0.02, -0.02, 0.0), (0.02, 0.02, 0.04), resolution=16)
    body = mpm.Body(Box((0.005,) * 3, (0.0, 0.0, z_lo + 0.005)), mpm.material(name, E=1e5, **mat), ppc=8,
                    velocity=velocity)
    return mpm.build_model(grid, [body], dt=dt, dtype=F64, gravity=gravity)


def _masses(model):
    return model.params["density"] * model.params["volume"]


@pytest.mark.parametrize("name", ["elastic", "plasticine", "rigid"])
def test_total_momentum_is_conserved_while_gel_and_block_collide(name):
    # no gravity, no kinematic gel nodes, block away from the walls: only the coupling acts
    extra = dict(yield_stress=2e3) if name == "plasticine" else {}
    model, st = _block(0.015, gravity=(0.0, 0.0, 0.0), velocity=(0.1, 0.05, 0.4), name=name, **extra)
    top = float(st.x[:, 2].max())
    gel = _pad(top + 0.4 * DX, True, kinematic=False)  # a particle's ball reaches 0.25 DX (ppc 8)
    out = coupled_rollout([gel], model, [gel.model.rest_state()], st, 60, record_every=10, window=8)
    m, mg = _masses(model), gel.model.masses()
    p0 = (m[:, None] * st.v).sum(0)
    for r, s in enumerate(out.mpm_states):
        p = (m[:, None] * s.v).sum(0) + (mg[:, None] * out.gel_states[r][0].v).sum(0)
        assert float((p - p0).abs().max()) < 1e-12 * float(p0.abs().max())  # round-off (measured ~1e-19 kg m/s)
    # and they did collide: the block lost most of its upward momentum to the gel
    pz = float((m * out.final_mpm.v[:, 2]).sum())
    assert pz < 0.6 * float(p0[2])


def test_contact_impulse_balances_the_blocks_momentum_change_under_gravity():
    # a block falling on an upward pad (base kinematic): for the MPM body alone, the change of
    # momentum is gravity's impulse plus the contact impulse, which is minus the gel's
    zt = 0.015
    model, st = _block(zt + 0.2 * DX, velocity=(0.05, 0.0, -0.2))
    gel = _pad(zt, False)
    n = 80
    out = coupled_rollout([gel], model, [gel.model.rest_state()], st, n, record_every=1, window=20)
    m = _masses(model)
    gel_impulse = sum(f[0].sum(0) for f in out.gel_forces) * model.dt
    dp = (m[:, None] * (out.final_mpm.v - st.v)).sum(0)
    gravity = m.sum() * torch.tensor([0.0, 0.0, -9.81], dtype=F64) * (n * model.dt)
    assert float(gel_impulse[2]) < -1e-4  # they touched (N s)
    assert float((dp - (gravity - gel_impulse)).abs().max()) < 1e-15
    # a tactile reading: the contact force pushes the gel down
    assert float(out.gel_forces[-1][0][:, 2].sum()) <= 0.0


class _ConstantAcceleration:
    """A grid-force hook adding m_i a dt to every node (what gravity a would do)."""

    def __init__(self, a, dt):
        self.a, self.dt = torch.tensor(a, dtype=F64), dt

    def forward(self, box, grid_mv, grid_m, keep):
        return grid_m[..., None] * self.a * self.dt, (grid_m.shape if keep else None)

    def adjoint(self, saved, adj_impulse):
        return None, (adj_impulse * self.a * self.dt).sum(-1)


def test_grid_force_hook_equals_the_same_acceleration_as_gravity():
    a = (0.3, -0.2, -1.0)
    model, st = _block(0.015, gravity=(0.0, 0.0, 0.0), velocity=(0.1, 0.0, 0.0))
    model_g, _ = _block(0.015, gravity=a, velocity=(0.1, 0.0, 0.0))
    s_h, s_g = Stepper(model), Stepper(model_g)
    params = [model.params[k].contiguous() for k in mpm.PARTICLE_PARAMS]
    out_h, _, saved_h = s_h.substep(st, params, None, keep=True, grid_force=_ConstantAcceleration(a, model.dt))
    out_g, _, saved_g = s_g.substep(st, params, None, keep=True)
    for u, w in zip(out_h, out_g):
        assert float((u - w).abs().max()) < 1e-13
    # the adjoint through the hook's mass dependence equals gravity's (grid_velocity has none)
    gen = torch.Generator().manual_seed(0)
    adj_out = mpm.State(*(torch.randn(t.shape, generator=gen, dtype=F64) for t in st))
    adj = []
    for s, saved in ((s_h, saved_h), (s_g, saved_g)):
        ap = [torch.zeros_like(p) for p in params]
        adj.append((s.substep_adjoint(saved, params, adj_out, ap, None)[0], ap))
    for u, w in zip(adj[0][0], adj[1][0]):
        assert float((u - w).abs().max()) < 1e-9 * (1 + float(w.abs().max()))
    # and with a zero hook the substep is bit-identical to the one without
    zero = _ConstantAcceleration((0.0, 0.0, 0.0), model.dt)
    out_z, _, _ = s_h.substep(st, params, None, grid_force=zero)
    out_n, _, _ = s_h.substep(st, params, None)
    assert all(torch.equal(u, w) for u, w in zip(out_z, out_n))


def _drag(mu, k_t, n=100):
    model, st = _block(3 * DX + 1e-4)
    top = float(st.x[:, 2].max())
    gel = _pad(top + 0.6 * DX, True, law=_law(k_t=k_t, mu=mu))
    s = torch.arange(1, n + 1, dtype=F64)[:, None] * model.dt
    trans = torch.cat([0.5 * s, 0.0 * s, -0.2 * s], 1)  # slide along x while pressing
    out = coupled_rollout([gel], model, [gel.model.rest_state()], st, n, gel_controls=[fm.Control(translation=trans)],
                          window=20)
    m = _masses(model)
    shift = float((m * (out.final_mpm.x[:, 0] - st.x[:, 0])).sum() / m.sum())
    return shift, float(trans[-1, 0])


def test_friction_drags_the_block_and_frictionless_contact_does_not():
    slide_free, pad = _drag(0.0, 0.0)
    slide_fric, _ = _drag(0.5, 1.0)
    # measured (100 steps, pad slid 2.5 mm while pressing): 4e-6 m vs 1.7e-4 m; the penalty
    # contact bounces (little normal damping), so the block is dragged only while touched
    assert abs(slide_free) < 0.1 * slide_fric
    assert slide_fric > 0.04 * pad


T = 24
E0, KN0, MU0 = 5e4, 3e3, 0.5


def _fd_setup():
    model, st = _block(3 * DX + 2e-4)
    top = float(st.x[:, 2].max())
    gel = _pad(top + 0.3 * DX, True)
    s = torch.arange(1, T + 1, dtype=F64)[:, None] * model.dt
    trans = torch.cat([0.2 * s, 0.05 * s, -0.3 * s], 1)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(shape, generator=gen, dtype=F64) for shape in (st.x.shape, (gel.model.n_nodes, 3),
                                                                     (gel.model.n_nodes, 3))]
    return model, st, gel, trans, w


def _loss_fn(model, st, gel, trans, w, window=8):
    c = gel.contact

    def loss(a_E, a_kn, a_mu, d_trans, d_x0):
        g = Gel(gel.model, ContactParams(KN0 * (1 + a_kn), c.k_d, c.k_t, MU0 * (1 + a_mu), c.eps_v,
                                         c.penetration_width, c.damping_width, c.friction_exponent))
        out = coupled_rollout([g], model, [gel.model.rest_state()], st._replace(x=st.x + 1e-3 * d_x0), T,
                              gel_controls=[fm.Control(translation=trans + 1e-3 * d_trans)],
                              gel_params=[{"E": E0 * (1 + a_E)}], window=window, record_every=T // 2)
        return (10 * (w[0] * out.final_mpm.x).sum() + 10 * (w[1] * out.final_gels[0].x).sum()
                + (w[2] * out.gel_forces[-1][0]).sum() + (w[2] * out.gel_forces[1][0]).sum())
    return loss


@pytest.mark.parametrize("which", ["gel_E", "k_n", "mu", "pad_pose", "mpm_x0"])
def test_gradients_through_sliding_frictional_contact_match_finite_differences(which):
    model, st, gel, trans, w = _fd_setup()
    loss = _loss_fn(model, st, gel, trans, w)
    names = ["gel_E", "k_n", "mu", "pad_pose", "mpm_x0"]
    shapes = [(), (), (), (T, 3), tuple(st.x.shape)]
    inputs = [torch.zeros(s, dtype=F64, requires_grad=(n == which)) for n, s in zip(names, shapes)]
    for r in directional_check(loss, inputs, eps=1e-6, n_dirs=2, seed=3):
        assert r.rel_error < 1e-5, (which, r)
        assert abs(r.numeric) > 1e-6


def test_window_does_not_change_values_or_gradients():
    model, st, gel, trans, w = _fd_setup()
    inputs = [torch.zeros(s, dtype=F64, requires_grad=True) for s in [(), (), (), (T, 3), tuple(st.x.shape)]]
    res = []
    for window in (3, 8, T):
        loss = _loss_fn(model, st, gel, trans, w, window=window)(*inputs)
        res.append((loss.detach(), torch.autograd.grad(loss, inputs)))
    for loss, grads in res[1:]:
        assert float((loss - res[0][0]).abs()) < 1e-12 * abs(float(res[0][0]))
        for g, g0 in zip(grads, res[0][1]):
            assert float((g - g0).abs().max()) <= 1e-10 * (1 + float(g0.abs().max()))


def test_two_pads_squeeze_a_block_symmetrically():
    # a list of gels: two pads above and below a floating block, mirror images: no net force
    model, st = _block(0.015, gravity=(0.0, 0.0, 0.0))
    lo, hi = float(st.x[:, 2].min()), float(st.x[:, 2].max())
    top, bottom = _pad(hi + 0.16 * DX, True), _pad(lo - 0.16 * DX, False)  # inside the particles' balls
    out = coupled_rollout([top, bottom], model, [top.model.rest_state(), bottom.model.rest_state()], st, 20,
                          window=10)
    f_top, f_bot = out.gel_forces[-1][0].sum(0), out.gel_forces[-1][1].sum(0)
    assert float(f_top[2]) > 1e-3 and float(f_bot[2]) < -1e-3  # squeezed from both sides
    assert abs(float(f_top[2] + f_bot[2])) < 1e-3 * float(f_top[2])
    assert out.penetration.shape == (2, 2)


def test_closest_point_distance_is_exact_on_a_face_and_beyond_an_edge():
    gel = _pad(0.01, False)
    x = gel.model.rest_state().x
    pts = torch.tensor([[0.001, 0.002, 0.0125], [0.001, 0.002, 0.0095], [0.013, 0.0, 0.01]], dtype=F64)
    phi = gel_surface_distance(gel, x, pts, 0.01)
    # above the top face (z = 0.01), inside below it, and 3 mm beyond the side face x = 0.01
    assert torch.allclose(phi, torch.tensor([0.0025, -0.0005, 0.003 - 0.37 * DX], dtype=F64), atol=1e-15)


def test_bad_inputs_raise_clear_errors():
    model, st = _block(0.015)
    gel = _pad(0.03, True)
    rest = [gel.model.rest_state()]
    with pytest.raises(TypeError, match="gels"):
        coupled_rollout(gel, model, rest, st, 2)
    with pytest.raises(ValueError, match="gel_states"):
        coupled_rollout([gel], model, rest * 2, st, 2)
    with pytest.raises(ValueError, match="n_steps"):
        coupled_rollout([gel], model, rest, st, -1)
    with pytest.raises(ValueError, match="mu"):
        coupled_rollout([Gel(gel.model, _law(mu=-1.0))], model, rest, st, 2)
    with pytest.raises(ValueError, match="k_n"):
        coupled_rollout([Gel(gel.model, _law(k_n=torch.ones(3, dtype=F64)))], model, rest, st, 2)
    with pytest.raises(ValueError, match="penalty contact's stable step"):
        coupled_rollout([Gel(gel.model, _law(k_n=1e7))], model, rest, st, 2)
    slow, _ = _block(0.015, dt=1e-3)
    with pytest.raises(ValueError, match="stable"):
        coupled_rollout([gel], slow, rest, st, 2)
    with pytest.raises(ValueError, match="mpm_state.x"):
        coupled_rollout([gel], model, rest, st._replace(x=st.x[:3]), 2)
    with pytest.raises(ValueError, match="gel_controls"):
        coupled_rollout([gel], model, rest, st, 2, gel_controls=[fm.Control(translation=torch.zeros(3, 3))])
    assert contact_stable_dt(gel, model) > model.dt


@pytest.mark.parametrize("name", ["elastic", "rigid"])
def test_a_bounce_off_a_held_gel_gains_no_energy(name):
    # no gravity, a block thrown at a pad whose base is held: the contact is a potential of the
    # relative positions (plus damping), so the block cannot leave faster than it came. (The
    # former grid-node law gave it 60-120 % more kinetic energy.)
    zt = 0.015
    model, st = _block(zt + 0.8 * DX, gravity=(0.0, 0.0, 0.0), velocity=(0.0, 0.0, -0.2), name=name)
    assert float(st.x[:, 2].min()) - 0.25 * DX > zt + 1e-3  # starts apart: no stored penalty energy
    gel = _pad(zt, False, law=_law(k_d=0.0, k_t=0.0, mu=0.0))
    out = coupled_rollout([gel], model, [gel.model.rest_state()], st, 800, record_every=50, window=50)
    m = _masses(model)
    vz = [float((m * s.v[:, 2]).sum() / m.sum()) for s in out.mpm_states]
    assert min(vz) < -0.19 and vz[-1] > 0.05  # it came down and went back up
    ke = [float(0.5 * (m * (s.v ** 2).sum(1)).sum()) for s in out.mpm_states]
    assert max(ke[1:]) <= ke[0] * (1 + 1e-3)
