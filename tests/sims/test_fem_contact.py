"""Penalty contact between FEM gel nodes and rigid objects (diffworld.sims.fem.contact)."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.mesh_sdf import MeshSDF
from diffworld.sims.common.quaternion import axis_angle_to_quat
from diffworld.sims.fem.contact import ContactParams, RigidObject, contact_forces, penalty_energy
from diffworld.sims.tactile.sensors import flat_pad

D = torch.float64
T = 4e-3  # pad thickness [m]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pad():
    g = flat_pad(size=(0.02, 0.02), thickness=T, res=(8, 8, 2))
    x = g.mesh.vertices.to(D)
    # The mesh is built with float32 rounding: snap the top face to exactly z = T so that the
    # expected penetrations below are exact in float64.
    x[:, 2] = torch.where((x[:, 2] - T).abs() < 1e-8, torch.full_like(x[:, 2], T), x[:, 2])
    return x, g.contact_nodes


def _t(*v):
    return torch.tensor(v, dtype=D)


def _box_mesh(h):
    """Closed, outward triangle mesh of the box [-h, h]^3 with each face split into n x n quads."""
    n = 6
    verts, faces = [], []
    for axis in range(3):
        for sgn in (-1.0, 1.0):
            u, w = [a for a in range(3) if a != axis]
            base = len(verts)
            for i in range(n + 1):
                for j in range(n + 1):
                    p = [0.0, 0.0, 0.0]
                    p[axis] = sgn * h[axis]
                    p[u] = -h[u] + 2 * h[u] * i / n
                    p[w] = -h[w] + 2 * h[w] * j / n
                    verts.append(p)
            for i in range(n):
                for j in range(n):
                    a, b = base + i * (n + 1) + j, base + (i + 1) * (n + 1) + j
                    tri = [(a, b, b + 1), (a, b + 1, a + 1)]
                    for t in tri:
                        faces.append(t)
    v = torch.tensor(verts, dtype=D)
    f = torch.tensor(faces, dtype=torch.int64)
    # Orient outward: flip the faces whose normal points towards the centre.
    e = torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
    inward = (e * v[f].mean(1)).sum(-1) < 0
    f[inward] = f[inward][:, [0, 2, 1]]
    # Weld duplicate vertices on the edges so the mesh is closed.
    uniq, inv = torch.unique(torch.round(v * 1e9), dim=0, return_inverse=True)
    return uniq / 1e9, inv[f]


def test_zero_when_separated_and_continuous_at_touch(pad):
    x, nodes = pad
    v = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(0)) * 1e-2
    prm = ContactParams(k_n=100.0, k_d=50.0, k_t=20.0, mu=0.5)
    R = 5e-3
    far = contact_forces(x, v, nodes, RigidObject.sphere(R, _t(0, 0, T + R + 1e-4)), prm)
    assert far.node_forces.abs().max() == 0 and far.object_force.abs().max() == 0
    assert far.object_torque.abs().max() == 0 and far.penetration.max() == 0
    # The top centre node sits at z = T: forces vanish linearly as the sphere reaches it.
    for eps in (1e-6, 1e-8, 1e-10):
        near = contact_forces(x, v, nodes, RigidObject.sphere(R, _t(0, 0, T + R - eps)), prm)
        assert near.node_forces.abs().max() <= 100.0 * eps * 1.01 + 1e-15


def test_sphere_pressed_into_pad(pad):
    x, nodes = pad
    R, delta, k = 5e-3, 1e-3, 250.0
    obj = RigidObject.sphere(R, _t(0, 0, T + R - delta))
    res = contact_forces(x, torch.zeros_like(x), nodes, obj, ContactParams(k_n=k))
    assert (res.penetration > 0).sum() >= 5 and float(res.penetration.detach().max()) == pytest.approx(delta, rel=1e-12)
    assert float(res.normal_force_total.detach()) == pytest.approx(k * float(res.penetration.detach().sum()), rel=1e-12)
    # Symmetric contact patch: the net force is exactly along z (up on the sphere, down on the gel).
    assert res.object_force[:2].abs().max() < 1e-15 and res.object_force[2] > 0
    assert res.node_forces[:, 2].sum() < 0
    # The centre node (right under the pole) is pushed straight down by k * delta.
    centre = torch.argmin((x - _t(0, 0, T)).norm(dim=1))
    assert torch.allclose(res.node_forces[centre], _t(0, 0, -k * delta), rtol=0, atol=1e-14)
    # A solid half-space z >= T - delta (the plane z_local <= 0 turned upside down): every top
    # node penetrates by delta and is pushed along -z.
    res = contact_forces(x, torch.zeros_like(x), nodes, RigidObject.plane(_t(0, 0, T - delta),
                         rotation=_t(1.0, 0, 0, 0)), ContactParams(k_n=k))
    assert torch.allclose(res.penetration, torch.full_like(res.penetration, delta), rtol=0, atol=1e-15)
    assert float(res.object_force.detach()[2]) == pytest.approx(k * delta * nodes.numel(), rel=1e-12)
    assert res.object_force.detach()[:2].abs().max() < 1e-12 * float(res.object_force.detach()[2])
    assert float(res.normal_force_total.detach()) == pytest.approx(k * delta * nodes.numel(), rel=1e-12)


def test_normal_force_is_conservative(pad):
    x, nodes = pad
    R = 5e-3
    obj = RigidObject.sphere(R, _t(1e-3, -0.5e-3, T + R - 1.2e-3))
    k = torch.rand(nodes.shape, dtype=D, generator=torch.Generator().manual_seed(1)) * 100 + 50
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(penalty_energy(xg, nodes, obj, k), xg)
    res = contact_forces(x, torch.zeros_like(x), nodes, obj, ContactParams(k_n=k))
    assert res.penetration.gt(0).sum() >= 3
    assert torch.allclose(res.node_forces, -grad, rtol=1e-12, atol=1e-14)


def _random_objects(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=D, generator=g)  # noqa: E731
    pos = _t(0, 0, T) + r(3) * 1e-3
    pos[2] = T + 2e-3
    q = axis_angle_to_quat(r(3))
    kw = dict(rotation=q, linear_velocity=r(3) * 1e-2, angular_velocity=r(3))
    return [RigidObject.sphere(3e-3, pos.clone(), **kw),
            RigidObject.box(_t(4e-3, 3e-3, 2.5e-3), pos.clone(), **kw),
            RigidObject.plane(pos - _t(0, 0, 2.3e-3), **kw)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_third_law(pad, seed):
    x, nodes = pad
    g = torch.Generator().manual_seed(10 + seed)
    v = torch.randn(x.shape, dtype=D, generator=g) * 1e-2
    prm = ContactParams(k_n=300.0, k_d=80.0, k_t=50.0, mu=0.4)
    for obj in _random_objects(seed):
        res = contact_forces(x, v, nodes, obj, prm)
        assert res.penetration.gt(0).sum() >= 1
        scale = float(res.node_forces.detach().abs().max())
        assert torch.allclose(res.node_forces.sum(0), -res.object_force, rtol=0, atol=1e-13 * scale)
        moment = torch.linalg.cross(x - obj.position, res.node_forces, dim=-1).sum(0)
        assert torch.allclose(moment, -res.object_torque, rtol=0, atol=1e-13 * scale)


def test_friction_opposes_slip_and_is_capped(pad):
    x, nodes = pad
    R = 5e-3
    g = torch.Generator().manual_seed(3)
    obj = RigidObject.sphere(R, _t(0, 0, T + R - 1e-3), linear_velocity=_t(0.0, 0.0, 0.0))
    prm = ContactParams(k_n=200.0, k_d=0.0, k_t=30.0, mu=0.3, eps_v=1e-6)
    for scale in (1e-4, 1e-1, 10.0):  # stick, mixed, full slide
        v = torch.randn(x.shape, dtype=D, generator=g) * scale
        res = contact_forces(x, v, nodes, obj, prm)
        c = res.penetration > 0
        n = res.normal[c]
        vr = v[nodes][c]
        vt = vr - (vr * n).sum(-1, keepdim=True) * n
        f = res.node_forces[nodes][c]
        fn = (f * n).sum(-1)
        ft = f - fn.unsqueeze(-1) * n
        assert ((ft * vt).sum(-1) < 0).all()  # opposes the slip
        assert (ft.norm(dim=1) <= 0.3 * fn.abs() * (1 + 1e-12) + 1e-15).all()
        if scale == 1e-4:  # small slip: viscous regime k_t |v_t| (eps_v << |v_t|)
            s = torch.sqrt((vt * vt).sum(-1) + 1e-12)
            stick = 30.0 * s < 0.3 * fn  # inside the cone (edge nodes with tiny f_n slide)
            assert stick.sum() >= 3
            # |f_t| = k_t s |v_t| / s = k_t |v_t| exactly below the cone.
            assert torch.allclose(ft.norm(dim=1)[stick], 30.0 * vt.norm(dim=1)[stick], rtol=1e-12)
        if scale == 10.0:
            assert torch.allclose(ft.norm(dim=1), 0.3 * fn, rtol=1e-9)
    # The smooth min keeps the cap and stays within its 2^(-1/p) factor of the hard min.
    smooth = ContactParams(k_n=200.0, k_t=30.0, mu=0.3, eps_v=1e-6, friction_exponent=8.0)
    v = torch.randn(x.shape, dtype=D, generator=g) * 2e-2
    a = contact_forces(x, v, nodes, obj, smooth).node_forces
    b = contact_forces(x, v, nodes, obj, ContactParams(k_n=200.0, k_t=30.0, mu=0.3, eps_v=1e-6)).node_forces
    assert (a - b).norm(dim=1).max() <= (1 - 2 ** (-1 / 8)) * b.norm(dim=1).max()


def _scalar(res, w):
    return (res.node_forces * w).sum() + res.object_torque.sum() * 1e3 + res.penetration.sum() * 10 \
        + res.shear_force_total


@pytest.mark.parametrize("kind", ["sphere", "box"])
@pytest.mark.parametrize("smooth", [False, True])
def test_gradients_finite_differences(pad, kind, smooth):
    x, nodes = pad
    g = torch.Generator().manual_seed(4)
    w = torch.randn(x.shape, dtype=D, generator=g)
    v0 = torch.randn(x.shape, dtype=D, generator=g) * 1e-2
    if smooth:  # a node right at the surface (first touch): only the smooth ramps are differentiable
        pos0 = _t(0, 0, T + 3e-3) if kind == "sphere" else _t(0, 0, T + 2.5e-3)
    else:
        pos0 = _t(0.3e-3, 0.2e-3, T + 3e-3 - 0.7e-3) if kind == "sphere" else _t(0.3e-3, 0.2e-3, T + 1.9e-3)
    q0 = axis_angle_to_quat(_t(0.1, -0.05, 0.2))
    lin0, ang0 = _t(1e-3, -2e-3, -3e-3), _t(0.5, -0.2, 0.3)
    params0 = [_t(300.0), _t(80.0), _t(50.0), _t(0.4)]
    widths = dict(penetration_width=1e-4, damping_width=1e-3, friction_exponent=4.0) if smooth else {}

    def fn(xx, vv, pos, q, lin, ang, k_n, k_d, k_t, mu):
        obj = RigidObject.sphere(3e-3, pos, rotation=q, linear_velocity=lin, angular_velocity=ang) \
            if kind == "sphere" else RigidObject.box(_t(4e-3, 3e-3, 2.5e-3), pos, rotation=q,
                                                     linear_velocity=lin, angular_velocity=ang)
        return _scalar(contact_forces(xx, vv, nodes, obj, ContactParams(k_n, k_d, k_t, mu, 1e-3, **widths)), w)

    inputs = [t.clone().requires_grad_(True) for t in (x, v0, pos0, q0, lin0, ang0, *params0)]
    with torch.no_grad():
        obj_check = fn(*inputs)
    assert torch.isfinite(obj_check)
    checks = directional_check(fn, inputs, eps=1e-8, n_dirs=3, seed=5)
    for c in checks:
        assert c.rel_error < 1e-6, c
    # Each group alone too (the pose and parameter directions are not swamped by x).
    for i in range(len(inputs)):
        only = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        # Steps sized to each input's scale: FD truncation (eps/scale)^2 and round-off both << 1e-6.
        step = (1e-8, 1e-7, 1e-8, 1e-7, 1e-7, 1e-6, 1e-2, 1e-2, 1e-2, 1e-4)[i]
        for c in directional_check(fn, only, eps=step, n_dirs=1, seed=6 + i):
            if kind == "sphere" and i == 3:  # a sphere is invariant under rotation about its centre
                assert abs(c.analytic) < 1e-12 and abs(c.numeric) < 1e-8
            else:
                assert c.rel_error < 1e-6, (i, c)


def test_box_analytic_vs_mesh(pad):
    x, nodes = pad
    h = (4e-3, 3e-3, 2.5e-3)
    verts, faces = _box_mesh(h)
    pos = _t(0.4e-3, -0.3e-3, T + 2.5e-3 - 0.8e-3)
    q = axis_angle_to_quat(_t(0.0, 0.0, 0.3))  # yaw only: the bottom face stays flat on the gel
    kw = dict(rotation=q, linear_velocity=_t(2e-3, -1e-3, -4e-3), angular_velocity=_t(0.0, 0.0, 0.7))
    g = torch.Generator().manual_seed(7)
    v = torch.randn(x.shape, dtype=D, generator=g) * 1e-2
    prm = ContactParams(k_n=300.0, k_d=80.0, k_t=50.0, mu=0.4)
    a = contact_forces(x, v, nodes, RigidObject.box(_t(*h), pos, **kw), prm)
    b = contact_forces(x, v, nodes, RigidObject(MeshSDF(verts, faces, sign="normal"), pos, **kw), prm)
    assert a.penetration.gt(0).sum() >= 4
    # Flat faces are exact in both representations (up to float32 sign evaluation only).
    assert torch.allclose(a.penetration, b.penetration, rtol=0, atol=1e-12)
    assert torch.allclose(a.node_forces, b.node_forces, rtol=0, atol=1e-9 * float(a.node_forces.detach().abs().max()))
    assert torch.allclose(a.object_torque, b.object_torque, rtol=0, atol=1e-9 * float(a.object_torque.detach().abs().max()))
    # Gradients w.r.t. the pose through the mesh SDF match the analytic box as well.
    pa = pos.clone().requires_grad_(True)
    pb = pos.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(contact_forces(x, v, nodes, RigidObject.box(_t(*h), pa, **kw), prm)
                                .object_force.sum(), pa)
    (gb,) = torch.autograd.grad(contact_forces(x, v, nodes, RigidObject(MeshSDF(verts, faces, sign="normal"),
                                                                        pb, **kw), prm).object_force.sum(), pb)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-9 * float(ga.abs().max()))


def test_bad_inputs_name_the_argument(pad):
    x, nodes = pad
    v = torch.zeros_like(x)
    obj = RigidObject.sphere(3e-3, _t(0, 0, T))
    prm = ContactParams()
    with pytest.raises(ValueError, match="'k_n'"):
        contact_forces(x, v, nodes, obj, ContactParams(k_n=-1.0))
    with pytest.raises(ValueError, match="'mu'"):
        contact_forces(x, v, nodes, obj, ContactParams(mu=_t(-0.1)))
    with pytest.raises(ValueError, match="'eps_v'"):
        contact_forces(x, v, nodes, obj, ContactParams(eps_v=0.0))
    with pytest.raises(ValueError, match="'k_t'"):
        contact_forces(x, v, nodes, obj, ContactParams(k_t=torch.ones(3, dtype=D)))
    with pytest.raises(ValueError, match="'penetration_width'"):
        contact_forces(x, v, nodes, obj, ContactParams(penetration_width=-1.0))
    with pytest.raises(ValueError, match="'friction_exponent'"):
        contact_forces(x, v, nodes, obj, ContactParams(friction_exponent=0.5))
    with pytest.raises(ValueError, match="'x'"):
        contact_forces(x[:, :2], v, nodes, obj, prm)
    with pytest.raises(ValueError, match="'v'"):
        contact_forces(x, v[:-1], nodes, obj, prm)
    with pytest.raises(TypeError, match="'nodes'"):
        contact_forces(x, v, nodes.to(torch.int32), obj, prm)
    with pytest.raises(ValueError, match="'nodes'"):
        contact_forces(x, v, torch.tensor([x.shape[0]]), obj, prm)
    with pytest.raises(ValueError, match="'obj.position'"):
        contact_forces(x, v, nodes, RigidObject.sphere(3e-3, _t(0, 0)), prm)
    with pytest.raises(ValueError, match="'obj.rotation'"):
        contact_forces(x, v, nodes, RigidObject.sphere(3e-3, _t(0, 0, T), rotation=_t(0, 0, 1)), prm)
    with pytest.raises(ValueError, match="'obj.linear_velocity'"):
        contact_forces(x, v, nodes, RigidObject.sphere(3e-3, _t(0, 0, T), linear_velocity=_t(1, 2)), prm)
    with pytest.raises(TypeError, match="'obj'"):
        contact_forces(x, v, nodes, "sphere", prm)
    with pytest.raises(TypeError, match="'params'"):
        contact_forces(x, v, nodes, obj, {"k_n": 1.0})
