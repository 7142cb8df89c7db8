"""The parallel-jaw gripper with two gel pads (issue 15): pad geometry on random gripper poses,
symmetry, gradients against float64 central differences, and two pads closing on a rigid box
(equal and opposite normal forces; the force within the series-spring bounds of the gel)."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims import fem
from diffworld.sims.common.kinematics import Pose
from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_multiply, quat_to_matrix
from diffworld.sims.tactile import ParallelGripper, flat_pad, sensor_model

torch.set_num_threads(1)
D = torch.float64
THICK = 4e-3  # pad thickness [m]
OFFSET = 0.05  # wrist to pad centres [m]


@pytest.fixture(scope="module")
def gripper():
    return ParallelGripper(flat_pad((0.02, 0.02), THICK, (4, 4, 2)), max_opening=0.05, finger_offset=OFFSET)


def _random_poses(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=D) * 0.3, torch.randn(n, 4, generator=g, dtype=D),
            torch.rand(n, generator=g, dtype=D) * 0.05)


def test_faces_parallel_facing_at_the_opening(gripper):
    """On random gripper poses: the contact faces (the real mesh faces, moved to the world) are
    planes with opposite normals, each facing the other, their gap equal to the opening, and their
    centres on the gripper's closing axis at the finger offset."""
    p, q, opening = _random_poses(40, 0)
    pads = gripper.pad_poses(p, q, opening)
    Rg = quat_to_matrix(q)
    local = gripper.pad.mesh.vertices.to(D)[gripper.pad.contact_nodes]
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=D)
    RL, RR = quat_to_matrix(pads.left_quaternion), quat_to_matrix(pads.right_quaternion)
    nL, nR = RL @ ez, RR @ ez  # contact normals (out of each gel)
    assert torch.allclose(nL, -nR, atol=1e-14)
    assert torch.allclose(nL, Rg[:, :, 0], atol=1e-14)  # the left pad faces +x of the gripper
    wL = pads.left_position[:, None] + local @ RL.transpose(1, 2)
    wR = pads.right_position[:, None] + local @ RR.transpose(1, 2)
    hL, hR = (wL * nL[:, None]).sum(-1), (wR * nL[:, None]).sum(-1)  # heights along the closing axis
    assert (hL.max(1).values - hL.min(1).values).max() < 1e-14  # flat, perpendicular to nL
    assert (hR.max(1).values - hR.min(1).values).max() < 1e-14
    assert torch.allclose(hR[:, 0] - hL[:, 0], opening, atol=1e-14)  # gap = opening, facing each other
    mid = 0.5 * (wL.mean(1) + wR.mean(1))
    assert torch.allclose(mid, p + Rg[:, :, 2] * OFFSET, atol=1e-14)
    # The pad bases (sensor origins) are opening + 2 t apart.
    assert torch.allclose((pads.right_position - pads.left_position).norm(dim=1), opening + 2 * THICK, atol=1e-14)


def test_pads_symmetric_under_half_turn(gripper):
    """The right pad is the left pad turned by 180 degrees about the gripper's approach axis."""
    p, q, opening = _random_poses(25, 1)
    pads = gripper.pad_poses(p, q, opening)
    Rg = quat_to_matrix(q)
    turn = Rg @ torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=D)) @ Rg.transpose(1, 2)  # world half turn
    axis_point = p[:, :, None]
    want_pos = (turn @ (pads.left_position[:, :, None] - axis_point) + axis_point)[:, :, 0]
    assert torch.allclose(pads.right_position, want_pos, atol=1e-14)
    assert torch.allclose(quat_to_matrix(pads.right_quaternion), turn @ quat_to_matrix(pads.left_quaternion),
                          atol=1e-14)
    # Each pad's +x points along the approach axis.
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    for quat in (pads.left_quaternion, pads.right_quaternion):
        assert torch.allclose(quat_to_matrix(quat) @ ex, Rg[:, :, 2], atol=1e-14)


def test_pad_pose_gradients_fd(gripper):
    """d(pad poses)/d(gripper position, quaternion, opening) vs float64 central differences."""
    p, q, opening = _random_poses(8, 2)
    w = torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(3), dtype=D)

    def loss(p, q, o):
        out = gripper.pad_poses(p, q, o, check=False)
        return sum((t * w[i, :, :t.shape[1]]).sum() for i, t in enumerate(out))

    inputs = [p.requires_grad_(True), q.requires_grad_(True), opening.requires_grad_(True)]
    checks = directional_check(loss, inputs, eps=1e-6, n_dirs=4)
    assert max(c.rel_error for c in checks) < 1e-7, checks


def test_pad_poses_from_link_gradients_fd(gripper):
    """A gripper mounted on a robot link: d(pad poses)/d(link poses (T, 7), mount) vs central differences,
    and the same poses as mounting by hand."""
    g = torch.Generator().manual_seed(4)
    link = torch.randn(6, 7, generator=g, dtype=D)
    opening = torch.rand(6, generator=g, dtype=D) * 0.04
    mp, mq = torch.randn(3, generator=g, dtype=D) * 0.1, torch.randn(4, generator=g, dtype=D)
    w = torch.randn(4, 6, 4, generator=g, dtype=D)

    def loss(link, mp, mq):
        out = gripper.pad_poses_from_link(link, opening, mp, mq)
        return sum((t * w[i, :, :t.shape[1]]).sum() for i, t in enumerate(out))

    checks = directional_check(loss, [link.requires_grad_(True), mp.requires_grad_(True), mq.requires_grad_(True)],
                               eps=1e-6, n_dirs=4)
    assert max(c.rel_error for c in checks) < 1e-7, checks
    with torch.no_grad():
        pads = gripper.pad_poses_from_link(Pose(link[:, :3], link[:, 3:]), opening, mp, mq)
        lq = link[:, 3:] / link[:, 3:].norm(dim=1, keepdim=True)
        gp = link[:, :3] + quat_to_matrix(lq) @ mp
        direct = gripper.pad_poses(gp, quat_multiply(lq, (mq / mq.norm()).expand(6, 4)), opening)
    assert torch.allclose(pads.left_position, direct.left_position, atol=1e-14)


def test_bad_inputs(gripper):
    p, q = torch.zeros(3, 3, dtype=D), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match=r"'opening' must be in \[0, 0.05\] m .* step 2 has 0.06 m"):
        gripper.pad_poses(p, q, torch.tensor([0.01, 0.02, 0.06], dtype=D))
    with pytest.raises(ValueError, match=r"inconsistent step counts"):
        gripper.pad_poses(p, q, torch.zeros(4, dtype=D))
    with pytest.raises(ValueError, match=r"'gripper_quaternion' of shape \(T, 4\)"):
        gripper.pad_poses(p, torch.zeros(3, 3, dtype=D), torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match=r"'max_opening' a positive length"):
        ParallelGripper(max_opening=-1.0)
    with pytest.raises(TypeError, match=r"'pad' a SensorGeometry"):
        ParallelGripper(pad="flat")
    with pytest.raises(ValueError, match=r"'kinematic' is set by the sensor"):
        sensor_model(gripper.pad, torch.zeros(3), q, E=1e5, nu=0.4, density=1e3, kinematic=[0])


# -- both pads closing on a rigid box ---------------------------------------------------------------

E, NU, RHO = 1e5, 0.4, 1100.0
WIDTH, DEPTH, GAP = 0.01, 2e-4, 1e-4  # box width, final squeeze per side, start gap per side [m]
K_N = 1e3  # penalty stiffness per contact node [N/m]
N_STEPS = 300


def _close_on_box(gripper, gravity, n_steps=N_STEPS, opening=None):
    """Both pads of a tilted gripper close on a box centred between them and hold; returns the
    force on the box from each pad at every recorded step, in the gripper frame (R, 3) each."""
    gq = axis_angle_to_quat(torch.tensor([0.3, -0.5, 0.7], dtype=D))
    gp = torch.tensor([0.1, -0.05, 0.2], dtype=D)
    if opening is None:
        s = torch.arange(n_steps + 1, dtype=D)
        opening = torch.clamp(WIDTH + 2 * GAP - 2 * (GAP + DEPTH) * s / (0.5 * n_steps), min=WIDTH - 2 * DEPTH)
    pads = gripper.pad_poses(gp, gq, opening)  # row 0: the start pose (where the models are built)
    models = gripper.models(pads, E=E, nu=NU, density=RHO, damping=200.0, gravity=gravity, dtype=D)
    controls = gripper.controls(pads.select(slice(1, None)))
    Rg = quat_to_matrix(gq)
    box = fem.RigidObject.box(torch.tensor([WIDTH / 2, 0.015, 0.015], dtype=D), gp + Rg[:, 2] * OFFSET, rotation=gq)
    cp = fem.ContactParams(k_n=K_N)
    nodes = gripper.pad.contact_nodes
    dt = 0.5 * fem.stable_dt(models[0]).dt  # also below the contact limit 2 sqrt(m / k_n)
    forces = []
    for model, control in zip(models, controls):
        out = fem.rollout(model, model.rest_state(), dt, n_steps, control, window=50, record_every=50,
                          contact=fem.Contact(box, nodes, cp))
        forces.append(torch.stack([fem.contact_forces(s.x, s.v, nodes, box, cp).object_force @ Rg for s in out.states]))
    return forces


def test_pads_close_on_box_equal_and_opposite(gripper):
    with torch.no_grad():
        left, right = _close_on_box(gripper, gravity=(0.0, 0.0, 0.0))
    # Without gravity the scene is exactly symmetric under the half turn: equal and opposite to round-off.
    assert float(left[-1, 0]) > 1.0  # the left pad pushes the box towards +x [N]
    assert torch.allclose(left, -right, rtol=0, atol=1e-10 * float(left[-1, 0]))
    assert float(left[:, 1:].abs().max()) < 1e-10 * float(left[-1, 0])  # along the closing axis only
    # Held squeeze DEPTH per side: the gel (between uniaxial stress E and uniaxial strain M, over
    # A / t) in series with the penalty springs of its 25 contact nodes.
    A, nodes = 0.02 * 0.02, gripper.pad.contact_nodes.numel()
    M = E * (1 - NU) / ((1 + NU) * (1 - 2 * NU))
    k_pen = K_N * nodes
    lo, hi = (DEPTH / (THICK / (k * A) + 1 / k_pen) for k in (E, M))
    f = float(left[-1, 0])
    assert lo < f < hi, (lo, f, hi)
    assert abs(float(left[-1, 0]) - float(left[-2, 0])) < 0.01 * f  # settled (held for the last half)


def test_pads_close_on_box_with_gravity(gripper):
    """Gravity breaks the exact symmetry; the pads' weight is ~1 % of the squeeze."""
    with torch.no_grad():
        left, right = _close_on_box(gripper, gravity=(0.0, 0.0, -9.81))
    fl, fr = float(left[-1, 0]), float(-right[-1, 0])
    assert fl > 1.0 and abs(fl - fr) < 0.03 * fl, (fl, fr)


def test_squeeze_gradient_fd(gripper):
    """d(final squeeze force)/d(opening schedule), through pad poses -> controls -> FEM rollout
    with contact, vs float64 central differences (rows 1.. of the schedule: row 0 places the mesh)."""
    n = 30
    start = torch.tensor([WIDTH - DEPTH], dtype=D)  # already in contact, so every node stays pressed
    sched = WIDTH - DEPTH - DEPTH * torch.linspace(0, 1, n, dtype=D)

    def loss(sched):
        left, right = _close_on_box(gripper, (0.0, 0.0, -9.81), n, torch.cat([start, sched]))
        return left[-1, 0] - 0.5 * right[-1, 0]

    checks = directional_check(loss, [sched.requires_grad_(True)], eps=1e-7, n_dirs=2)
    assert max(c.rel_error for c in checks) < 1e-6, checks
