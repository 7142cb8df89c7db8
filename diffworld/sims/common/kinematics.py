"""A small differentiable kinematic tree (issue 15, robotics effectors): revolute, continuous,
prismatic and fixed joints, forward kinematics of a batch of joint vectors in torch, joint-space
keyframes, URDF loading, and the fixed mount that turns a link's pose into a sensor's pose.

Conventions (as everywhere in diffworld): SI units (joint angles [rad], prismatic displacements
and positions [m]), quaternions in (x, y, z, w) order (:mod:`diffworld.sims.common.quaternion`),
a pose is (position (..., 3), quaternion (..., 4)) of a frame's origin and its local-to-world
rotation. URDF origins use URDF's fixed-axis roll-pitch-yaw: ``R = Rz(yaw) Ry(pitch) Rx(roll)``.

A joint's child frame is ``parent * origin * motion(q)``: ``origin`` is the joint's fixed
transform in the parent link's frame, ``motion`` a rotation by ``q`` [rad] about ``axis``
(revolute, continuous) or a translation by ``q`` [m] along ``axis`` (prismatic), both in the
joint frame, as in URDF.

URDF files are read with `yourdfpy <https://github.com/clemense/yourdfpy>`_ (the optional extra
``robots``: ``pip install 'diffworld[robots]'``); the tree is built and checked here (joint types,
unknown links, several parents, cycles, limits), with messages naming the joint or link. Meshes,
inertias and mimic joints are not read.

Example::

    chain = KinematicChain.from_urdf("arm.urdf")
    q = chain.keyframes([0.0, 1.0], torch.tensor([[0.0, 0.1], [0.5, 0.3]]), n_steps=100, dt=0.01)
    tool = chain.link_pose(q, "tool")                   # Pose: (100, 3), (100, 4)
    sensor = mount_pose(tool, (0, 0, 0.02), (0, 0, 0, 1))  # the sensor 2 cm along the tool's z
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from diffworld.sims.common.quaternion import quat_multiply, quat_rotate

__all__ = ["JOINT_TYPES", "Joint", "KinematicChain", "LinkPoses", "Pose", "compose_poses", "interpolate_keyframes",
           "mount_pose", "rpy_to_quat"]

JOINT_TYPES = ("revolute", "continuous", "prismatic", "fixed")
_MOVING = ("revolute", "continuous", "prismatic")


class Pose(NamedTuple):
    """A frame's pose: ``position`` [m] (..., 3) and local-to-world ``quaternion`` (x, y, z, w) (..., 4)."""

    position: torch.Tensor
    quaternion: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        """The pose packed as (..., 7): position then quaternion."""
        return torch.cat([self.position, self.quaternion], -1)


class LinkPoses(NamedTuple):
    """Forward kinematics of every link.

    Attributes:
        position: World positions of the link frames [m], (T, L, 3).
        quaternion: Their local-to-world rotations (x, y, z, w), (T, L, 4).
        links: The L link names, in the order of the middle axis (the root first).
    """

    position: torch.Tensor
    quaternion: torch.Tensor
    links: tuple[str, ...]

    def link(self, name: str) -> Pose:
        """The pose sequence of link ``name``: (T, 3), (T, 4)."""
        if name not in self.links:
            raise ValueError(f"LinkPoses.link: unknown link {name!r}; the links are {list(self.links)}")
        i = self.links.index(name)
        return Pose(self.position[:, i], self.quaternion[:, i])


def rpy_to_quat(rpy: Sequence[float] | np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) (4,) float64 of URDF roll-pitch-yaw [rad]: ``Rz(yaw) Ry(pitch) Rx(roll)``
    (rotations about the fixed x, then y, then z axes)."""
    return Rotation.from_euler("xyz", np.asarray(rpy, dtype=np.float64)).as_quat()


def _vec(name: str, value, n: int, where: str) -> tuple[float, ...]:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: expected '{name}' {n} numbers, got {value!r}") from None
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise ValueError(f"{where}: expected '{name}' {n} finite numbers, got {value!r}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class Joint:
    """One joint of a kinematic tree.

    Attributes:
        name: Joint name (unique in its chain).
        type: ``revolute`` (angle [rad] about ``axis``, within limits), ``continuous`` (revolute
            without limits), ``prismatic`` (displacement [m] along ``axis``) or ``fixed``.
        parent: Parent link name.
        child: Child link name.
        origin_xyz: Joint frame origin in the parent link's frame [m], (3,).
        origin_quat: Joint frame rotation w.r.t. the parent link (x, y, z, w), (4,), unit.
        axis: Joint axis in the joint frame, (3,), unit (ignored for fixed joints).
        lower: Lower limit [rad] or [m] (None: unlimited).
        upper: Upper limit [rad] or [m] (None: unlimited).
    """

    name: str
    type: str
    parent: str
    child: str
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    origin_quat: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)
    axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    lower: float | None = None
    upper: float | None = None

    def __post_init__(self) -> None:
        where = f"Joint {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Joint: expected 'name' a non-empty string, got {self.name!r}")
        if self.type not in JOINT_TYPES:
            raise ValueError(f"{where}: unknown joint type {self.type!r}; expected one of {list(JOINT_TYPES)}")
        for key in ("parent", "child"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"{where}: expected '{key}' a link name, got {getattr(self, key)!r}")
        if self.parent == self.child:
            raise ValueError(f"{where}: parent and child are the same link {self.parent!r}")
        object.__setattr__(self, "origin_xyz", _vec("origin_xyz", self.origin_xyz, 3, where))
        q = np.asarray(_vec("origin_quat", self.origin_quat, 4, where))
        if abs(np.linalg.norm(q) - 1.0) > 1e-6:
            raise ValueError(f"{where}: 'origin_quat' must be a unit quaternion (x, y, z, w), got {self.origin_quat!r}")
        object.__setattr__(self, "origin_quat", tuple(float(v) for v in q / np.linalg.norm(q)))
        a = np.asarray(_vec("axis", self.axis, 3, where))
        if self.type != "fixed":
            if np.linalg.norm(a) < 1e-12:
                raise ValueError(f"{where}: 'axis' must be non-zero, got {self.axis!r}")
            a = a / np.linalg.norm(a)  # URDF axes need not be normalized
        object.__setattr__(self, "axis", tuple(float(v) for v in a))
        if self.type in ("fixed", "continuous"):
            object.__setattr__(self, "lower", None)
            object.__setattr__(self, "upper", None)
        for key in ("lower", "upper"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{where}: '{key}' limit must be a finite number or None, got {v!r}")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"{where}: lower limit {self.lower:g} is above upper limit {self.upper:g}")

    @classmethod
    def make(cls, name: str, type: str, parent: str, child: str, *, xyz: Sequence[float] = (0.0, 0.0, 0.0),
             rpy: Sequence[float] = (0.0, 0.0, 0.0), axis: Sequence[float] = (1.0, 0.0, 0.0),
             limits: tuple[float, float] | None = None) -> "Joint":
        """A joint with its origin given as URDF ``xyz`` [m] and ``rpy`` [rad] and ``limits`` (lower, upper)."""
        q = rpy_to_quat(_vec("rpy", rpy, 3, f"Joint {name!r}"))
        lo, hi = (None, None) if limits is None else limits
        return cls(name, type, parent, child, tuple(xyz), tuple(q), tuple(axis), lo, hi)

    @property
    def moving(self) -> bool:
        """True when the joint has a degree of freedom (not fixed)."""
        return self.type in _MOVING


class KinematicChain:
    """A kinematic tree of joints, and its forward kinematics in torch.

    Args:
        joints: The joints (any order). Together they must form one tree: every link is the child
            of at most one joint, there are no cycles, and exactly one link (the root) is nobody's
            child.
        links: Optional further link names (e.g. from a URDF); a link that no joint touches is an
            error unless it is the only link.

    Attributes:
        joints: The joints, parents before children.
        root: The root link's name.
        links: All link names, the root first, then in the order of ``joints``' children.
        joint_names: Names of the J moving joints, in the order given (a joint vector's order).

    Raises:
        ValueError: Duplicate names, several parents, cycles, several roots (messages name them).
    """

    def __init__(self, joints: Sequence[Joint], links: Sequence[str] | None = None) -> None:
        joints = list(joints)
        for j in joints:
            if not isinstance(j, Joint):
                raise TypeError(f"KinematicChain: expected 'joints' Joint objects, got {type(j).__name__}")
        names = [j.name for j in joints]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"KinematicChain: duplicate joint names {sorted(dup)}")
        parent_of: dict[str, Joint] = {}
        for j in joints:
            if j.child in parent_of:
                raise ValueError(f"KinematicChain: link {j.child!r} is the child of two joints, "
                                 f"{parent_of[j.child].name!r} and {j.name!r}")
            parent_of[j.child] = j
        all_links = list(dict.fromkeys([*(links or []), *(l for j in joints for l in (j.parent, j.child))]))
        if links is not None:
            declared = set(links)
            for j in joints:
                for key in ("parent", "child"):
                    if getattr(j, key) not in declared:
                        raise ValueError(f"KinematicChain: joint {j.name!r} names {key} link {getattr(j, key)!r}, "
                                         f"which is not declared (links: {sorted(declared)})")
        roots = [l for l in all_links if l not in parent_of]
        if not roots:
            raise ValueError(f"KinematicChain: the joints form a cycle (every link has a parent): "
                             f"{self._cycle(parent_of, all_links[0])}")
        # Walk up from every link: reaching a link twice is a cycle.
        for link in all_links:
            seen, cur = [link], link
            while cur in parent_of:
                cur = parent_of[cur].parent
                if cur in seen:
                    raise ValueError(f"KinematicChain: the joints form a cycle: {self._cycle(parent_of, cur)}")
                seen.append(cur)
        if len(roots) > 1:
            raise ValueError(f"KinematicChain: expected one tree with one root link, got {len(roots)} roots "
                             f"{roots} (a link that no joint connects, or two separate trees)")
        self.root = roots[0]
        # Parents before children: breadth-first from the root, children in the given order.
        order: list[Joint] = []
        frontier = [self.root]
        while frontier:
            nxt = []
            for link in frontier:
                for j in joints:
                    if j.parent == link:
                        order.append(j)
                        nxt.append(j.child)
            frontier = nxt
        self.joints: tuple[Joint, ...] = tuple(order)
        self.links: tuple[str, ...] = (self.root, *(j.child for j in order))
        self.joint_names: tuple[str, ...] = tuple(j.name for j in joints if j.moving)
        self._dof = {n: i for i, n in enumerate(self.joint_names)}

    @staticmethod
    def _cycle(parent_of: dict[str, Joint], start: str) -> str:
        path, cur = [], start
        while True:
            j = parent_of[cur]
            path.append(f"{j.name} ({j.parent} -> {j.child})")
            cur = j.parent
            if cur == start:
                return ", ".join(reversed(path))

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_urdf(cls, source: str | os.PathLike) -> "KinematicChain":
        """The tree of a URDF file (read with yourdfpy; joints, links, origins, axes, limits).

        Args:
            source: Path of a ``.urdf`` file, or the URDF XML text itself (a string starting with ``<``).

        Raises:
            ImportError: yourdfpy is not installed (``pip install 'diffworld[robots]'``).
            ValueError: The file is missing or unreadable, or the tree is invalid: unknown joint
                type, a joint naming an undeclared link, a missing ``<parent>``/``<child>``,
                several parents, cycles (messages name the file and the joint or link).
        """
        try:
            import yourdfpy
        except ImportError as err:  # optional extra
            raise ImportError("KinematicChain.from_urdf needs yourdfpy: pip install 'diffworld[robots]'") from err
        import io

        text = os.fspath(source) if isinstance(source, os.PathLike) else source
        if not isinstance(text, str):
            raise TypeError(f"KinematicChain.from_urdf: expected 'source' a path or URDF text, got {type(source).__name__}")
        is_xml = text.lstrip().startswith("<")
        where = "URDF text" if is_xml else f"URDF {text!r}"
        if not is_xml and not os.path.isfile(text):
            raise ValueError(f"KinematicChain.from_urdf: {where} is not a file")
        from xml.etree import ElementTree

        try:  # yourdfpy silently "recovers" malformed XML (e.g. a truncated file): refuse it first
            ElementTree.parse(io.BytesIO(text.encode()) if is_xml else text)
        except ElementTree.ParseError as err:
            raise ValueError(f"KinematicChain.from_urdf: {where} is not well-formed XML: {err}") from None
        try:
            f = io.BytesIO(text.encode()) if is_xml else text
            urdf = yourdfpy.URDF.load(f, build_scene_graph=False, load_meshes=False, load_collision_meshes=False)
        except KeyError as err:
            raise ValueError(f"KinematicChain.from_urdf: {where}: a <robot>, <link> or <joint> lacks its {err} "
                             f"attribute") from None
        except AttributeError as err:
            # yourdfpy dereferences <parent>/<child> without checking that they exist.
            raise ValueError(f"KinematicChain.from_urdf: {where}: a <joint> lacks its <parent link=...> or "
                             f"<child link=...> element ({err})") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"KinematicChain.from_urdf: {where} could not be read: {type(err).__name__}: {err}") from None
        robot = urdf.robot
        joints = []
        for uj in robot.joints:
            if uj.type not in JOINT_TYPES:
                raise ValueError(f"KinematicChain.from_urdf: {where}: joint {uj.name!r} has type {uj.type!r}; "
                                 f"supported: {list(JOINT_TYPES)}")
            if uj.parent is None or uj.child is None:
                raise ValueError(f"KinematicChain.from_urdf: {where}: joint {uj.name!r} lacks a parent or child link")
            origin = np.eye(4) if uj.origin is None else np.asarray(uj.origin, dtype=np.float64)
            lim = uj.limit
            lower = upper = None
            if uj.type in ("revolute", "prismatic") and lim is not None:
                # URDF's defaults for absent 'lower'/'upper' are 0; a joint without <limit> is unlimited.
                lower = 0.0 if lim.lower is None else float(lim.lower)
                upper = 0.0 if lim.upper is None else float(lim.upper)
            try:
                joints.append(Joint(uj.name, uj.type, uj.parent, uj.child, tuple(origin[:3, 3]),
                                    tuple(Rotation.from_matrix(origin[:3, :3]).as_quat()),
                                    tuple(uj.axis if uj.axis is not None else (1.0, 0.0, 0.0)), lower, upper))
            except (TypeError, ValueError) as err:
                raise ValueError(f"KinematicChain.from_urdf: {where}: {err}") from None
        try:
            return cls(joints, links=[l.name for l in robot.links])
        except ValueError as err:
            raise ValueError(f"KinematicChain.from_urdf: {where}: {err}") from None

    # -- queries --------------------------------------------------------------------------------------

    @property
    def n_dof(self) -> int:
        """J, the number of moving joints."""
        return len(self.joint_names)

    def joint(self, name: str) -> Joint:
        """The joint called ``name``."""
        for j in self.joints:
            if j.name == name:
                return j
        raise ValueError(f"KinematicChain.joint: unknown joint {name!r}; the joints are {[j.name for j in self.joints]}")

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper limits (J,) float64 of the moving joints (-inf / +inf where unlimited)."""
        lo = [-math.inf if j.lower is None else j.lower for j in map(self.joint, self.joint_names)]
        hi = [math.inf if j.upper is None else j.upper for j in map(self.joint, self.joint_names)]
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)

    def check_limits(self, q: torch.Tensor, what: str = "q", tol: float = 1e-9) -> None:
        """Raise ValueError if any joint value of ``q`` (..., J) is outside its limits (+- ``tol``),
        naming the joint, the value, the limits and the row."""
        q = self._check_q(q, what)
        lo, hi = self.limits()
        v = q.detach().to(torch.float64).cpu().reshape(-1, self.n_dof)
        bad = (v < lo - tol) | (v > hi + tol)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            name, unit = self.joint_names[col], "m" if self.joint(self.joint_names[col]).type == "prismatic" else "rad"
            raise ValueError(f"{what}: joint {name!r} = {float(v[row, col]):.6g} {unit} at row {row} is outside its "
                             f"limits [{float(lo[col]):.6g}, {float(hi[col]):.6g}] {unit}")

    def _check_q(self, q, what: str) -> torch.Tensor:
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"{what}: expected a torch tensor of joint values (..., {self.n_dof}), got {type(q).__name__}")
        if q.dim() == 0 or q.shape[-1] != self.n_dof:
            raise ValueError(f"{what}: expected joint values of shape (..., {self.n_dof}) (joints "
                             f"{list(self.joint_names)}), got {tuple(q.shape)}")
        if not q.is_floating_point():
            raise TypeError(f"{what}: expected a floating-point tensor, got {q.dtype}")
        return q

    # -- kinematics -----------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, base_position: torch.Tensor | None = None,
                base_quaternion: torch.Tensor | None = None) -> LinkPoses:
        """World poses of every link for a batch of joint vectors (differentiable).

        Args:
            q: Joint values (T, J) or (J,) ([rad] revolute, [m] prismatic), in ``joint_names`` order.
            base_position: World position of the root link [m], (3,) or (T, 3); default the origin.
            base_quaternion: Its rotation (x, y, z, w), (4,) or (T, 4) (normalized inside); default identity.

        Returns:
            :class:`LinkPoses` with (T, L, 3) positions and (T, L, 4) quaternions ((1, L, .) for (J,) input).
            Limits are not checked here (see :meth:`check_limits`).
        """
        q = self._check_q(q, "KinematicChain.forward: 'q'")
        q = q.reshape(1, -1) if q.dim() == 1 else q
        if q.dim() != 2:
            raise ValueError(f"KinematicChain.forward: expected 'q' of shape (T, {self.n_dof}) or ({self.n_dof},), "
                             f"got {tuple(q.shape)}")
        T, dt, dev = q.shape[0], q.dtype, q.device
        p = torch.zeros(T, 3, dtype=dt, device=dev)
        r = torch.zeros(T, 4, dtype=dt, device=dev)
        r[:, 3] = 1.0
        if base_position is not None:
            p = p + _rows("base_position", base_position, 3, T).to(p)
        if base_quaternion is not None:
            b = _rows("base_quaternion", base_quaternion, 4, T).to(p)
            r = (b / b.norm(dim=-1, keepdim=True)).expand(T, 4)
        poses = {self.root: (p, r)}
        for j in self.joints:
            pp, pr = poses[j.parent]
            xyz = torch.tensor(j.origin_xyz, dtype=dt, device=dev)
            oq = torch.tensor(j.origin_quat, dtype=dt, device=dev)
            cp = pp + quat_rotate(pr, xyz.expand(T, 3))
            cr = quat_multiply(pr, oq.expand(T, 4))
            if j.moving:
                v = q[:, self._dof[j.name], None]
                axis = torch.tensor(j.axis, dtype=dt, device=dev)
                if j.type == "prismatic":
                    cp = cp + quat_rotate(cr, axis * v)
                else:  # exact half-angle form: smooth at q = 0 (no axis-angle normalization)
                    half = 0.5 * v
                    cr = quat_multiply(cr, torch.cat([axis * torch.sin(half), torch.cos(half)], -1))
            poses[j.child] = (cp, cr)
        return LinkPoses(torch.stack([poses[l][0] for l in self.links], 1),
                         torch.stack([poses[l][1] for l in self.links], 1), self.links)

    def link_pose(self, q: torch.Tensor, link: str, base_position: torch.Tensor | None = None,
                  base_quaternion: torch.Tensor | None = None) -> Pose:
        """The world pose sequence of one link, (T, 3) and (T, 4) (see :meth:`forward`)."""
        if link not in self.links:
            raise ValueError(f"KinematicChain.link_pose: unknown link {link!r}; the links are {list(self.links)}")
        return self.forward(q, base_position, base_quaternion).link(link)

    def keyframes(self, times: Sequence[float], q: torch.Tensor, n_steps: int, dt: float,
                  check_limits: bool = True) -> torch.Tensor:
        """Joint-space keyframes -> a per-step joint trajectory (T, J) (:func:`interpolate_keyframes`).

        Args:
            times: Increasing keyframe times [s], length K >= 1.
            q: Keyframe joint vectors (K, J); differentiable.
            n_steps: T, the number of steps (sampled at ``t = s dt``, s = 0..T-1).
            dt: Step [s] > 0.
            check_limits: Raise ValueError when a keyframe is outside a joint's limits (the joint
                limits are a box, so the straight segments between valid keyframes stay valid).

        Returns:
            (T, J) joint values, same dtype as ``q``.
        """
        q = self._check_q(q, "KinematicChain.keyframes: 'q'")
        if check_limits:
            self.check_limits(q, "KinematicChain.keyframes: keyframe 'q'")
        return interpolate_keyframes(times, q, n_steps, dt)


def _rows(name: str, x, width: int, T: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    if x.shape not in ((width,), (T, width), (1, width)):
        raise ValueError(f"expected '{name}' of shape ({width},) or ({T}, {width}), got {tuple(x.shape)}")
    return x.reshape(-1, width).expand(T, width)


def interpolate_keyframes(times: Sequence[float], values: torch.Tensor, n_steps: int, dt: float) -> torch.Tensor:
    """Piecewise-linear interpolation of keyframes at ``t = s dt``, s = 0..T-1 (differentiable in ``values``).

    Values are held before the first and after the last keyframe (the same sampling as
    :func:`diffworld.sims.common.colliders.from_keyframes`).

    Args:
        times: Increasing keyframe times [s], length K >= 1.
        values: (K, D) keyframe values (e.g. joint vectors).
        n_steps: T >= 1.
        dt: Sample spacing [s] > 0.

    Returns:
        (T, D) values.
    """
    where = "interpolate_keyframes"
    try:
        tk = torch.tensor([float(t) for t in times], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: expected 'times' a sequence of numbers [s], got {times!r}") from None
    K = tk.numel()
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] != K or K == 0:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where}: expected K >= 1 'times' and 'values' of shape (K, D) with K = {K}, got {shape}")
    if not torch.isfinite(tk).all() or (K > 1 and (tk[1:] <= tk[:-1]).any()):
        raise ValueError(f"{where}: 'times' must be finite and increasing, got {list(times)}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"{where}: expected 'n_steps' an integer >= 1, got {n_steps!r}")
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"{where}: expected 'dt' a positive step [s], got {dt!r}")
    if K == 1:
        return values.expand(int(n_steps), values.shape[1])
    t = torch.arange(int(n_steps), dtype=torch.float64) * dt
    seg = torch.clamp(torch.searchsorted(tk, t, right=True) - 1, 0, K - 2)
    a = ((t - tk[seg]) / (tk[seg + 1] - tk[seg])).clamp(0, 1).to(values)[:, None]
    seg = seg.to(values.device)
    return values[seg] * (1 - a) + values[seg + 1] * a


def compose_poses(a: Pose, b: Pose) -> Pose:
    """The world pose ``a * b`` of a frame whose pose relative to frame ``a`` is ``b`` (leading
    dimensions broadcast; differentiable; ``a``'s quaternion is normalized)."""
    qa = a.quaternion / a.quaternion.norm(dim=-1, keepdim=True)
    lead = torch.broadcast_shapes(a.position.shape[:-1], qa.shape[:-1], b.position.shape[:-1], b.quaternion.shape[:-1])
    pa, qa = a.position.expand(*lead, 3), qa.expand(*lead, 4)
    pb, qb = b.position.expand(*lead, 3), b.quaternion.expand(*lead, 4)
    return Pose(pa + quat_rotate(qa, pb), quat_multiply(qa, qb))


def mount_pose(link: Pose | torch.Tensor, mount_position: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
               mount_quaternion: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0, 1.0)) -> Pose:
    """A sensor (or gripper) rigidly mounted on a link: its world pose sequence from the link's.

    This is how a URDF link pose sequence drives a tactile sensor: the sensor frame (the gel's
    frame of :mod:`diffworld.sims.tactile.sensors`) sits at ``mount`` in the link's frame.

    Args:
        link: The link's poses: a :class:`Pose` ((T, 3), (T, 4)) or packed (T, 7) (position, quaternion).
        mount_position: The sensor origin in the link frame [m], (3,); may require grad.
        mount_quaternion: The sensor rotation w.r.t. the link (x, y, z, w), (4,); may require grad.

    Returns:
        :class:`Pose` of the sensor, (T, 3) and (T, 4).
    """
    if isinstance(link, torch.Tensor):
        if link.dim() != 2 or link.shape[1] != 7:
            raise ValueError(f"mount_pose: expected 'link' poses of shape (T, 7) (position, quaternion), "
                             f"got {tuple(link.shape)}")
        link = Pose(link[:, :3], link[:, 3:])
    if not isinstance(link, Pose):
        raise TypeError(f"mount_pose: expected 'link' a Pose or a (T, 7) tensor, got {type(link).__name__}")
    ref = link.position
    mp = torch.as_tensor(mount_position, dtype=ref.dtype, device=ref.device)
    mq = torch.as_tensor(mount_quaternion, dtype=ref.dtype, device=ref.device)
    if mp.shape != (3,) or mq.shape != (4,):
        raise ValueError(f"mount_pose: expected 'mount_position' (3,) and 'mount_quaternion' (4,), got "
                         f"{tuple(mp.shape)} and {tuple(mq.shape)}")
    return compose_poses(link, Pose(mp, mq / mq.norm()))
