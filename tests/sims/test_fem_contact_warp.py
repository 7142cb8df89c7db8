"""The explicit rollout's Warp contact kernel (diffworld.sims.fem.kernels_contact) for the analytic
SDFs: forces and adjoints equal to the torch op's to round-off, and central differences through a
rollout against the wavy ground (issue 15 item 5)."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.sdf import Box, HalfSpace, Sphere, Waves
from diffworld.sims import fem
from diffworld.sims.fem.rollout import ContactStep, _contact_inputs
from diffworld.sims.tactile.sensors import flat_pad

torch.set_num_threads(1)
D = torch.float64


def _t(*v):
    return torch.tensor(v if len(v) > 1 else v[0], dtype=D)


SDFS = {
    "sphere": lambda: Sphere(_t(0.006), _t(0.001, 0.0, 0.0)),
    "box": lambda: Box(_t(0.004, 0.003, 0.002), _t(0.0, 0.0005, 0.0)),
    "halfspace": lambda: HalfSpace(_t(0.1, 0.2, 1.0), _t(0.001)),
    "waves": lambda: Waves(_t(5e-4), _t(0.004, 0.006), _t(5e-4)),
}
SMOOTH = {"hard": {}, "smooth": dict(penetration_width=1e-4, damping_width=1e-3, friction_exponent=4.0)}


@pytest.fixture(scope="module")
def box_model():
    mesh = fem.TetMesh.box((0, 0, 0), (0.01, 0.01, 0.004), (4, 4, 2))
    return {dt: fem.build_model(mesh, E=1e5, nu=0.3, density=1000.0, dtype=dt) for dt in (torch.float32, D)}


def _step_pair(model, sdf, smooth, seed=0):
    """A Warp-path ContactStep, its torch twin, and random (x, v, row, contact parameters)."""
    g = torch.Generator().manual_seed(seed)
    dtype, n = model.dtype, model.n_nodes
    nodes = torch.arange(0, n, 2)
    obj = fem.RigidObject(sdf, torch.tensor([0.005, 0.005, 0.0045], dtype=dtype),
                          rotation=torch.tensor([0.1, 0.2, 0.05, 1.0]), linear_velocity=torch.tensor([0.01, 0.02, -0.03]),
                          angular_velocity=torch.tensor([0.5, -0.3, 0.2]))
    k_n = torch.rand(nodes.numel(), generator=g, dtype=D).to(dtype) * 1e3 + 500
    params = fem.ContactParams(k_n=k_n, k_d=10.0, k_t=5.0, mu=0.4, eps_v=1e-3, **smooth)
    contact = fem.Contact(obj, nodes, params)
    cols, cps = _contact_inputs(contact, model, 1)
    row = torch.cat([torch.zeros(12, dtype=dtype), cols[0]])
    warp_step, torch_step = ContactStep(contact, 12), ContactStep(contact, 12)
    assert warp_step._kind is not None
    torch_step._kind = None  # the torch op
    x = model.rest_state().x + 1e-4 * torch.randn(n, 3, generator=g, dtype=D).to(dtype)
    v = 0.05 * torch.randn(n, 3, generator=g, dtype=D).to(dtype)
    return warp_step, torch_step, x, v, row, cps


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("smooth", sorted(SMOOTH))
@pytest.mark.parametrize("name", sorted(SDFS))
@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_warp_contact_matches_torch(box_model, name, smooth, dtype):
    model = box_model[dtype]
    ws, ts, x, v, row, cps = _step_pair(model, SDFS[name](), SMOOTH[smooth])
    with torch.no_grad():
        fw, ft = ws.node_forces(x, v, row, cps), ts.node_forces(x, v, row, cps)
    assert int((ft.abs().sum(1) > 0).sum()) >= 5  # several nodes in contact
    tol = 1e-12 if dtype == D else 2e-5
    assert _rel(fw, ft) < tol
    adj_f = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=D).to(dtype)
    out = []
    for step in (ws, ts):
        ar, ac = torch.zeros_like(row), [torch.zeros_like(t) for t in cps]
        gx, gv = step.adjoint(x, v, row, cps, adj_f, ar, ac)
        out.append((gx, gv, ar, ac))
    (gx1, gv1, ar1, ac1), (gx2, gv2, ar2, ac2) = out
    for a, b in [(gx1, gx2), (gv1, gv2), (ar1, ar2), *zip(ac1, ac2)]:
        if b.abs().max() > 0:
            assert _rel(a, b) < (1e-11 if dtype == D else 2e-4)
        else:
            assert a.abs().max() <= 1e-12


def test_other_sdfs_keep_the_torch_op():
    from diffworld.geometry.mesh_sdf import MeshSDF

    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=D)
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    c = fem.Contact(fem.RigidObject(MeshSDF(v, f), torch.zeros(3, dtype=D)), torch.arange(3),
                    fem.ContactParams())
    assert ContactStep(c, 12)._kind is None

    class Shifted(Sphere):  # a subclass may change the formula: not on the kernel
        pass

    c = fem.Contact(fem.RigidObject(Shifted(_t(1.0)), torch.zeros(3, dtype=D)), torch.arange(3), fem.ContactParams())
    assert ContactStep(c, 12)._kind is None


def test_rollout_over_waves_central_differences():
    """A pad pressed into and slid over the wavy ground (float64): pose per step, contact
    parameters and E against central differences on random directions."""
    g = flat_pad(size=(0.01, 0.01), thickness=3e-3, res=(4, 4, 2))
    model = fem.build_model(g.mesh, E=1e5, nu=0.4, density=1100.0, kinematic=g.base_nodes, damping=2.0,
                            gravity=(0.0, 0.0, 0.0), dtype=D)
    dt, n = 0.5 * fem.stable_dt(model).dt, 8
    nodes = g.contact_nodes
    wg = torch.Generator().manual_seed(1)
    wx = torch.randn(model.n_nodes, 3, generator=wg, dtype=D)
    s = torch.arange(n, dtype=D)
    # the ground (solid side up: rotated pi about x) over the pad's top face, sliding along x
    pos0 = torch.stack([1e-4 * s, torch.zeros(n, dtype=D), torch.full((n,), 3e-3 - 1e-4 + 2e-4, dtype=D)], 1)

    def loss(pos, k_n, k_t, E):
        params = fem.ContactParams(k_n=k_n, k_d=20.0, k_t=k_t, mu=2.0, eps_v=1e-3, penetration_width=2e-5,
                                   damping_width=1e-3, friction_exponent=8.0)
        obj = fem.RigidObject(Waves(_t(2e-4), _t(0.004, 0.0), _t(0.0)), pos,
                              rotation=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D),
                              linear_velocity=torch.tensor([0.2, 0.0, 0.0], dtype=D))
        out = fem.rollout(model, model.rest_state(), dt, n, window=3, params={"E": E},
                          contact=fem.Contact(obj, nodes, params))
        return 1e3 * ((out.final.x - model.rest_state().x) * wx).sum()

    inputs = [pos0.clone().requires_grad_(), _t(2e3).requires_grad_(), _t(5.0).requires_grad_(),
              _t(1e5).expand(model.n_tets).clone().requires_grad_()]
    # the contact is active (a loss without it differs)
    with torch.no_grad():
        assert abs(float(loss(*inputs)) - float(loss(pos0 + torch.tensor([0, 0, 1e-3], dtype=D), *inputs[1:]))) > 1e-6
    for scale, which in ((1e-8, 0), (1e-3, 1), (1e-3, 2), (1.0, 3)):
        def part(x, _w=which, _s=scale):
            args = list(inputs)
            args[_w] = x
            return loss(*args)
        res = directional_check(part, [inputs[which]], eps=scale, n_dirs=2)
        for r in res:
            assert r.rel_error < 1e-5, (which, r)
