"""The differentiable kinematic tree (issue 15, robotics effectors): forward kinematics against
closed forms, URDF loading against hand-composed transforms, gradients against float64 central
differences, keyframes and joint limits, and errors on bad trees and URDFs."""

import math

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims.common.kinematics import (Joint, KinematicChain, Pose, compose_poses, interpolate_keyframes,
                                              mount_pose)
from diffworld.sims.common.quaternion import quat_to_matrix

torch.set_num_threads(1)
D = torch.float64
L1, L2 = 0.5, 0.3  # planar arm link lengths [m]


def _planar_arm():
    return KinematicChain([
        Joint.make("shoulder", "revolute", "base", "upper", axis=(0, 0, 1), limits=(-math.pi, math.pi)),
        Joint.make("elbow", "revolute", "upper", "fore", xyz=(L1, 0, 0), axis=(0, 0, 1), limits=(-2.5, 2.5)),
        Joint.make("wrist", "fixed", "fore", "tool", xyz=(L2, 0, 0)),
    ])


def test_planar_arm_matches_closed_form():
    chain = _planar_arm()
    assert chain.joint_names == ("shoulder", "elbow") and chain.links == ("base", "upper", "fore", "tool")
    g = torch.Generator().manual_seed(0)
    q = (torch.rand(200, 2, generator=g, dtype=D) * 2 - 1) * torch.tensor([math.pi, 2.5], dtype=D)
    out = chain.forward(q)
    a, b = q[:, 0], q[:, 1]
    tool = torch.stack([L1 * torch.cos(a) + L2 * torch.cos(a + b), L1 * torch.sin(a) + L2 * torch.sin(a + b),
                        torch.zeros_like(a)], 1)
    elbow = torch.stack([L1 * torch.cos(a), L1 * torch.sin(a), torch.zeros_like(a)], 1)
    quat = torch.stack([torch.zeros_like(a), torch.zeros_like(a), torch.sin((a + b) / 2), torch.cos((a + b) / 2)], 1)
    assert torch.allclose(out.link("tool").position, tool, rtol=0, atol=1e-12)
    assert torch.allclose(out.link("fore").position, elbow, rtol=0, atol=1e-12)
    assert torch.allclose(out.link("tool").quaternion, quat, rtol=0, atol=1e-12)
    assert out.position.shape == (200, 4, 3) and out.quaternion.shape == (200, 4, 4)


def test_base_pose_composes():
    chain = _planar_arm()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 2, generator=g, dtype=D)
    bp, bq = torch.randn(7, 3, generator=g, dtype=D), torch.randn(7, 4, generator=g, dtype=D)
    moved = chain.forward(q, bp, bq)
    rel = chain.forward(q)
    want = compose_poses(Pose(bp[:, None], bq[:, None]), Pose(rel.position, rel.quaternion))
    assert torch.allclose(moved.position, want.position, atol=1e-13)
    assert torch.allclose(quat_to_matrix(moved.quaternion), quat_to_matrix(want.quaternion), atol=1e-13)


def test_prismatic_joint():
    """A revolute base about z carrying a prismatic slide along its x axis, raised by h."""
    h = 0.4
    chain = KinematicChain([
        Joint.make("turn", "continuous", "base", "arm", axis=(0, 0, 1)),
        Joint.make("slide", "prismatic", "arm", "carriage", xyz=(0, 0, h), axis=(2, 0, 0), limits=(0.0, 0.5)),
    ])
    g = torch.Generator().manual_seed(2)
    q = torch.stack([torch.rand(50, generator=g, dtype=D) * 6 - 3, torch.rand(50, generator=g, dtype=D) * 0.5], 1)
    p = chain.link_pose(q, "carriage")
    want = torch.stack([q[:, 1] * torch.cos(q[:, 0]), q[:, 1] * torch.sin(q[:, 0]), torch.full_like(q[:, 0], h)], 1)
    assert torch.allclose(p.position, want, rtol=0, atol=1e-12)
    # The slide does not rotate: the carriage turns with the arm only.
    R = quat_to_matrix(p.quaternion)
    assert torch.allclose(R[:, :2, 0], torch.stack([torch.cos(q[:, 0]), torch.sin(q[:, 0])], 1), atol=1e-12)


# -- URDF ---------------------------------------------------------------------------------------------

URDF = """<?xml version="1.0"?>
<robot name="test_arm">
  <link name="base"/>
  <link name="link1"/>
  <link name="link2"/>
  <link name="tool"/>
  <joint name="j_rev" type="revolute">
    <parent link="base"/>
    <child link="link1"/>
    <origin xyz="0.1 0.2 0.3" rpy="0.3 -0.2 0.5"/>
    <axis xyz="0 0 1"/>
    <limit lower="-2.0" upper="2.0" effort="10" velocity="1"/>
  </joint>
  <joint name="j_pri" type="prismatic">
    <parent link="link1"/>
    <child link="link2"/>
    <origin xyz="0 0.05 0.4" rpy="1.5707963267948966 0 0.25"/>
    <axis xyz="1 1 0"/>
    <limit lower="0" upper="0.1" effort="10" velocity="1"/>
  </joint>
  <joint name="j_fix" type="fixed">
    <parent link="link2"/>
    <child link="tool"/>
    <origin xyz="0.02 0 0.01" rpy="0 0.7 0"/>
  </joint>
</robot>
"""


def _rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _tf(xyz, rpy):
    """URDF origin as a 4x4 matrix: fixed-axis roll, pitch, yaw = Rz Ry Rx."""
    T = np.eye(4)
    T[:3, :3] = _rz(rpy[2]) @ _ry(rpy[1]) @ _rx(rpy[0])
    T[:3, 3] = xyz
    return T


def _hand_fk(q1, q2):
    """World transforms of link1, link2, tool by composing 4x4 matrices by hand."""
    rot = np.eye(4)
    rot[:3, :3] = _rz(q1)  # revolute about z
    slide = np.eye(4)
    slide[:3, 3] = q2 * np.array([1.0, 1.0, 0.0]) / math.sqrt(2)  # prismatic along the normalized axis
    T1 = _tf([0.1, 0.2, 0.3], [0.3, -0.2, 0.5]) @ rot
    T2 = T1 @ _tf([0, 0.05, 0.4], [math.pi / 2, 0, 0.25]) @ slide
    T3 = T2 @ _tf([0.02, 0, 0.01], [0, 0.7, 0])
    return T1, T2, T3


@pytest.fixture
def urdf_file(tmp_path):
    pytest.importorskip("yourdfpy")
    path = tmp_path / "arm.urdf"
    path.write_text(URDF)
    return path


def test_urdf_round_trip(urdf_file):
    chain = KinematicChain.from_urdf(urdf_file)
    assert chain.root == "base" and chain.joint_names == ("j_rev", "j_pri")
    assert set(chain.links) == {"base", "link1", "link2", "tool"}
    lo, hi = chain.limits()
    assert lo.tolist() == [-2.0, 0.0] and hi.tolist() == [2.0, 0.1]
    g = torch.Generator().manual_seed(3)
    q = torch.stack([torch.rand(20, generator=g, dtype=D) * 4 - 2, torch.rand(20, generator=g, dtype=D) * 0.1], 1)
    out = chain.forward(q)
    for t in range(20):
        for name, T in zip(("link1", "link2", "tool"), _hand_fk(*q[t].tolist())):
            pose = out.link(name)
            assert np.allclose(pose.position[t].numpy(), T[:3, 3], rtol=0, atol=1e-12), name
            assert np.allclose(quat_to_matrix(pose.quaternion[t]).numpy(), T[:3, :3], rtol=0, atol=1e-12), name
    # The same tree from the XML text.
    again = KinematicChain.from_urdf(URDF).forward(q)
    assert torch.equal(again.position, out.position) and torch.equal(again.quaternion, out.quaternion)


def _bad(tmp_path, joints, links=("base", "a", "b")):
    pytest.importorskip("yourdfpy")
    body = "".join(f'<link name="{l}"/>' for l in links) + joints
    path = tmp_path / "bad.urdf"
    path.write_text(f'<robot name="bad">{body}</robot>')
    return path


def _joint(name, parent, child, type="revolute"):
    return (f'<joint name="{name}" type="{type}"><parent link="{parent}"/><child link="{child}"/>'
            f'<axis xyz="0 0 1"/><limit lower="-1" upper="1" effort="1" velocity="1"/></joint>')


def test_bad_urdfs(tmp_path):
    # A joint whose parent link is not declared.
    path = _bad(tmp_path, _joint("j1", "base", "a") + _joint("j2", "ghost", "b"))
    with pytest.raises(ValueError, match=r"joint 'j2' names parent link 'ghost'"):
        KinematicChain.from_urdf(path)
    # A joint without its <parent> element.
    path = _bad(tmp_path, _joint("j1", "base", "a") + '<joint name="j2" type="fixed"><child link="b"/></joint>')
    with pytest.raises(ValueError, match=r"lacks its <parent"):
        KinematicChain.from_urdf(path)
    # A cycle a -> b -> a beside the root.
    path = _bad(tmp_path, _joint("j1", "base", "a") + _joint("j2", "a", "b") + _joint("j3", "b", "a"))
    with pytest.raises(ValueError, match=r"child of two joints, 'j1' and 'j3'"):
        KinematicChain.from_urdf(path)
    path = _bad(tmp_path, _joint("j2", "a", "b") + _joint("j3", "b", "a"), links=("a", "b"))
    with pytest.raises(ValueError, match=r"cycle.*j2 \(a -> b\).*j3 \(b -> a\)|cycle.*j3 \(b -> a\).*j2 \(a -> b\)"):
        KinematicChain.from_urdf(path)
    # An unknown joint type.
    path = _bad(tmp_path, _joint("j1", "base", "a") + _joint("ball", "a", "b", type="spherical"))
    with pytest.raises(ValueError, match=r"joint 'ball' has type 'spherical'"):
        KinematicChain.from_urdf(path)
    # A link that no joint connects: two roots.
    path = _bad(tmp_path, _joint("j1", "base", "a"))
    with pytest.raises(ValueError, match=r"2 roots \['base', 'b'\]"):
        KinematicChain.from_urdf(path)
    # A truncated file (yourdfpy alone would recover the part before the cut).
    path.write_text(path.read_text()[:-8])
    with pytest.raises(ValueError, match=r"is not well-formed XML"):
        KinematicChain.from_urdf(path)
    with pytest.raises(ValueError, match=r"lacks its 'name' attribute"):
        KinematicChain.from_urdf('<robot name="r"><link/></robot>')
    with pytest.raises(ValueError, match=r"is not a file"):
        KinematicChain.from_urdf(tmp_path / "missing.urdf")


def test_bad_joints_without_urdf():
    with pytest.raises(ValueError, match=r"Joint 'j': unknown joint type 'hinge'"):
        Joint("j", "hinge", "a", "b")
    with pytest.raises(ValueError, match=r"Joint 'j': lower limit 1 is above upper limit -1"):
        Joint.make("j", "revolute", "a", "b", limits=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"Joint 'j': 'axis' must be non-zero"):
        Joint("j", "prismatic", "a", "b", axis=(0, 0, 0))
    with pytest.raises(ValueError, match=r"duplicate joint names \['j'\]"):
        KinematicChain([Joint("j", "fixed", "a", "b"), Joint("j", "fixed", "b", "c")])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        _planar_arm().forward(torch.zeros(5, 3, dtype=D))


# -- keyframes and limits -------------------------------------------------------------------------------

def test_keyframes_interpolate_and_hold():
    chain = _planar_arm()
    times = [0.1, 0.5, 0.9]
    keys = torch.tensor([[0.0, 0.0], [1.0, -0.4], [0.2, 2.0]], dtype=D)
    q = chain.keyframes(times, keys, n_steps=12, dt=0.1)
    assert q.shape == (12, 2)
    t = np.arange(12) * 0.1
    for j in range(2):
        assert np.allclose(q[:, j].numpy(), np.interp(t, times, keys[:, j].numpy()), rtol=0, atol=1e-14)
    single = interpolate_keyframes([0.3], keys[:1], 4, 0.1)
    assert torch.equal(single, keys[:1].expand(4, 2))


def test_keyframe_limits_error_names_joint_and_value():
    chain = _planar_arm()
    keys = torch.tensor([[0.0, 0.0], [1.0, 2.7]], dtype=D)
    with pytest.raises(ValueError, match=r"joint 'elbow' = 2\.7 rad at row 1 is outside its limits \[-2\.5, 2\.5\]"):
        chain.keyframes([0.0, 1.0], keys, 10, 0.1)
    with pytest.raises(ValueError, match=r"'times' must be finite and increasing"):
        chain.keyframes([1.0, 0.5], keys * 0, 10, 0.1)
    slide = KinematicChain([Joint.make("s", "prismatic", "a", "b", limits=(0.0, 0.1))])
    with pytest.raises(ValueError, match=r"joint 's' = -0\.02 m at row 0"):
        slide.keyframes([0.0], torch.tensor([[-0.02]], dtype=D), 3, 0.1)


# -- gradients -------------------------------------------------------------------------------------------

def _urdf_like_chain():
    """The URDF test's tree, built without yourdfpy (so the gradient tests always run)."""
    return KinematicChain([
        Joint.make("j_rev", "revolute", "base", "link1", xyz=(0.1, 0.2, 0.3), rpy=(0.3, -0.2, 0.5), axis=(0, 0, 1)),
        Joint.make("j_pri", "prismatic", "link1", "link2", xyz=(0, 0.05, 0.4), rpy=(math.pi / 2, 0, 0.25),
                   axis=(1, 1, 0)),
        Joint.make("j_fix", "fixed", "link2", "tool", xyz=(0.02, 0, 0.01), rpy=(0, 0.7, 0)),
    ])


def test_hand_built_chain_matches_hand_fk():
    out = _urdf_like_chain().forward(torch.tensor([[0.7, 0.03]], dtype=D))
    for name, T in zip(("link1", "link2", "tool"), _hand_fk(0.7, 0.03)):
        assert np.allclose(out.link(name).position[0].numpy(), T[:3, 3], atol=1e-12)


def test_fk_gradients_fd():
    """d(poses of all links)/d(joints, base pose) vs float64 central differences on random directions."""
    chain = _urdf_like_chain()
    g = torch.Generator().manual_seed(4)
    T = 6
    wp = torch.randn(T, 4, 3, generator=g, dtype=D)
    wq = torch.randn(T, 4, 4, generator=g, dtype=D)

    def loss(q, bp, bq):
        out = chain.forward(q, bp, bq)
        return (out.position * wp).sum() + (out.quaternion * wq).sum()

    inputs = [torch.randn(T, 2, generator=g, dtype=D).requires_grad_(True),
              torch.randn(T, 3, generator=g, dtype=D).requires_grad_(True),
              torch.randn(T, 4, generator=g, dtype=D).requires_grad_(True)]
    checks = directional_check(loss, inputs, eps=1e-6, n_dirs=4)
    assert max(c.rel_error for c in checks) < 1e-7, checks
    # Through the q = 0 configuration too (the half-angle form is smooth there).
    zero = [torch.zeros(T, 2, dtype=D).requires_grad_(True), inputs[1], inputs[2]]
    checks = directional_check(loss, zero, eps=1e-6, n_dirs=3)
    assert max(c.rel_error for c in checks) < 1e-7, checks


def test_keyframe_and_mount_gradients_fd():
    """Keyframe joint vectors -> per-step FK -> a mounted sensor's pose, vs central differences."""
    chain = _urdf_like_chain()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(15, 7, generator=g, dtype=D)

    def loss(keys, mount_p, mount_q):
        q = interpolate_keyframes([0.0, 0.4, 1.0], keys, 15, 0.07)
        sensor = mount_pose(chain.link_pose(q, "tool"), mount_p, mount_q)
        return (sensor.as_tensor() * w).sum()

    inputs = [torch.randn(3, 2, generator=g, dtype=D).requires_grad_(True),
              torch.randn(3, generator=g, dtype=D).requires_grad_(True),
              torch.randn(4, generator=g, dtype=D).requires_grad_(True)]
    checks = directional_check(loss, inputs, eps=1e-6, n_dirs=4)
    assert max(c.rel_error for c in checks) < 1e-7, checks


def test_mount_pose_matches_fixed_joint():
    """Two paths: a sensor mounted on 'tool' vs the same offset as a fixed joint of the tree."""
    xyz, rpy = (0.01, -0.02, 0.05), (0.2, 0.1, -0.4)
    base = _urdf_like_chain()
    longer = KinematicChain([*base.joints, Joint.make("mount", "fixed", "tool", "sensor", xyz=xyz, rpy=rpy)])
    q = torch.randn(9, 2, generator=torch.Generator().manual_seed(6), dtype=D)
    want = longer.link_pose(q, "sensor")
    link = base.link_pose(q, "tool").as_tensor()  # the (T, 7) form
    got = mount_pose(link, xyz, longer.joint("mount").origin_quat)
    assert torch.allclose(got.position, want.position, atol=1e-14)
    assert torch.allclose(got.quaternion, want.quaternion, atol=1e-14)
    with pytest.raises(ValueError, match=r"'link' poses of shape \(T, 7\)"):
        mount_pose(torch.zeros(4, 6, dtype=D))


def test_from_urdf_without_yourdfpy(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yourdfpy", None)  # as if the 'robots' extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'diffworld\[robots\]'"):
        KinematicChain.from_urdf(URDF)
