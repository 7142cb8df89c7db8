"""Penalty contact between FEM gel surface nodes and one rigid object, as a differentiable torch op.

:func:`contact_forces` evaluates, for the gel's contact nodes, the signed distance to a rigid
object (an SDF in the object's local frame, posed by a position and a rotation), and returns the
penalty forces on the nodes and the equal and opposite force and torque on the object. Everything
is vectorized torch, so autograd differentiates the result w.r.t. the node positions and
velocities, the object's pose and velocity, the SDF's own parameters (e.g. mesh vertices) and the
contact parameters.

Law (per contact node i, world frame; ``phi`` the object's signed distance, ``n`` its unit
gradient pointing out of the object, ``v_rel = v_i - (v_obj + w_obj x (x_i - p_obj))``):

* penetration ``d = ramp(-phi)``: ``max(-phi, 0)`` (default), or ``w softplus(-phi / w)`` with
  ``ContactParams.penetration_width = w > 0`` so the force and its gradient are smooth at first
  touch (at the price of a force ``k_n w log 2`` on a node exactly on the surface, decaying as
  ``exp(-phi / w)`` outside);
* normal force ``f_n = (k_n d + k_d d max(-v_rel . n, 0)) n`` (Hunt-Crossley-like damping,
  proportional to the penetration, so the force is continuous at touch and never pulls); the
  approach-rate ``max`` is smoothed the same way by ``ContactParams.damping_width`` [m/s];
* friction ``f_t = -min(k_t s, mu |f_n|) v_t / s`` with ``v_t`` the tangential relative velocity
  and ``s = sqrt(|v_t|^2 + eps_v^2)``: regularized Coulomb (viscous ``k_t`` below the cone,
  capped at ``mu |f_n|``). ``ContactParams.friction_exponent = p`` replaces the ``min`` by the
  smooth ``(a^-p + b^-p)^(-1/p)``, which never exceeds the min (the cap holds) and is 0 when
  either argument is.

Differences from DiffTactile (see shared/reference/tactile.md, "Contact (penalty)"):

* detection is an SDF of the object evaluated at the gel nodes (analytic, or a Warp-BVH mesh
  SDF), not a brute-force nearest-triangle search from object particles to the sensor mesh;
  forces act on the gel nodes themselves instead of being split 1/3 per triangle node;
* DiffTactile's damping ``k_d max(v_rel . n, 0) (-sdf)`` is kept (it is also proportional to the
  penetration) but its ``max`` can be smoothed;
* DiffTactile switches friction off below ``|v_t| = 1e-4`` (a discontinuity); here ``eps_v``
  regularizes ``v_t / |v_t|`` smoothly, so static contact gets viscous friction ``k_t v_t``;
* optional smooth ramps (penetration, damping, friction min) so gradients exist at the kinks.

Units: ``k_n`` is a per-node stiffness [N/m] (as DiffTactile; the total force then scales with
the mesh resolution). For a resolution-independent pressure law pass a per-node tensor
``k_n = k_area * A_i`` [N/m] with ``A_i`` the node's lumped surface area [m^2] and ``k_area``
[N/m^3]; every parameter accepts a scalar or a per-contact-node (C,) tensor. ``k_d`` [N s/m^2],
``k_t`` [N s/m], ``mu`` [-], ``eps_v`` [m/s].

Quaternions follow :mod:`diffworld.sims.common.quaternion`: (x, y, z, w), normalized inside.

Gradients: the normal is the autograd gradient of the SDF, and its own derivatives (needed by
the force Jacobian and the pose gradient) come from double backward through the analytic SDFs.
A :class:`~diffworld.geometry.mesh_sdf.MeshSDF` holds its closest point fixed, which would give a
wrong normal derivative; its local normal is treated as constant instead (exact on faces; at
mesh edges/vertices the curvature term and the normal's dependence on the vertices are dropped,
while the distance itself stays differentiable in points, pose and vertices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.mesh_sdf import MeshSDF
from diffworld.geometry.sdf import Box, HalfSpace, Sphere
from diffworld.sims.common.quaternion import quat_to_matrix

__all__ = ["ContactParams", "ContactResult", "RigidObject", "contact_forces", "penalty_energy", "smooth_min",
           "softplus_ramp"]

TensorLike = Any


def _as_tensor(name: str, value: TensorLike) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"Expected '{name}' to be a number or tensor, got {value!r}")
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected '{name}' to be a number or tensor, got {type(value).__name__}")
    return value


def _f64(value: TensorLike) -> TensorLike:
    # Plain numbers would be stored by the SDF modules in float32 (a 1e-8 relative error in a
    # float64 contact); tensors are kept as given (they may be trainable).
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


@dataclass
class RigidObject:
    """A rigid body: a signed distance field in its local frame, a pose and a velocity.

    Attributes:
        sdf: Signed distance [m] in the object's local frame, negative inside, e.g. a
            :class:`diffworld.geometry.sdf.SDF` (``Sphere``, ``Box``, ``HalfSpace``, ``MeshSDF``)
            or any torch-differentiable callable (M, 3) -> (M,).
        position: World position of the local origin [m], shape (3,). Torques are about it.
        rotation: Local-to-world rotation: a quaternion (x, y, z, w) shape (4,) (normalized
            inside) or a matrix shape (3, 3).
        linear_velocity: Velocity of the local origin [m/s], shape (3,); default zero.
        angular_velocity: World-frame angular velocity [rad/s], shape (3,); default zero.
    """

    sdf: Callable[[torch.Tensor], torch.Tensor]
    position: torch.Tensor
    rotation: torch.Tensor = field(default_factory=lambda: torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    linear_velocity: torch.Tensor | None = None
    angular_velocity: torch.Tensor | None = None

    @classmethod
    def sphere(cls, radius: TensorLike, position: torch.Tensor, **kw) -> "RigidObject":
        """A ball of ``radius`` [m] centred on ``position``."""
        return cls(Sphere(_f64(radius)), position, **kw)

    @classmethod
    def box(cls, half_extents: TensorLike, position: torch.Tensor, **kw) -> "RigidObject":
        """A box of ``half_extents`` [m] (3,) centred on ``position``."""
        return cls(Box(_f64(half_extents)), position, **kw)

    @classmethod
    def plane(cls, position: torch.Tensor, **kw) -> "RigidObject":
        """The half-space ``z_local <= 0`` (solid below the local xy plane through ``position``)."""
        return cls(HalfSpace((0.0, 0.0, 1.0), 0.0), position, **kw)

    def rotation_matrix(self) -> torch.Tensor:
        """Local-to-world rotation matrix, shape (3, 3)."""
        r = self.rotation
        return quat_to_matrix(r) if r.shape == (4,) else r


@dataclass
class ContactParams:
    """Penalty contact parameters; tensors may require grad. Each is a scalar or a (C,) tensor.

    Attributes:
        k_n: Normal stiffness per node [N/m] (see module docstring for area weighting), >= 0.
        k_d: Hunt-Crossley damping [N s/m^2] (force ``k_d d max(-v_n, 0)``), >= 0.
        k_t: Viscous tangential (stick) coefficient [N s/m], >= 0.
        mu: Coulomb friction coefficient [-], >= 0.
        eps_v: Slip-velocity regularization [m/s], > 0.
        penetration_width: Softplus width of the penetration ramp [m]; 0 = hard ``max(-phi, 0)``.
        damping_width: Softplus width of the approach-rate ramp [m/s]; 0 = hard max.
        friction_exponent: ``p`` of the smooth min ``(a^-p + b^-p)^(-1/p)``; None = hard min.
    """

    k_n: TensorLike = 1.0e3
    k_d: TensorLike = 0.0
    k_t: TensorLike = 0.0
    mu: TensorLike = 0.0
    eps_v: TensorLike = 1.0e-4
    penetration_width: float = 0.0
    damping_width: float = 0.0
    friction_exponent: float | None = None


class ContactResult(NamedTuple):
    """Output of :func:`contact_forces`.

    Attributes:
        node_forces: Forces on all gel nodes [N], shape (N, 3) (zero off the contact set).
        object_force: Total force on the object [N], shape (3,).
        object_torque: Torque on the object about its position [N m], shape (3,).
        penetration: Penetration ``d`` of each contact node [m], shape (C,), >= 0.
        normal: Unit outward object normal at each contact node, shape (C, 3).
        normal_force_total: Sum of the normal force magnitudes on the nodes [N], scalar.
        shear_force_total: Magnitude of the summed tangential forces on the nodes [N], scalar.
    """

    node_forces: torch.Tensor
    object_force: torch.Tensor
    object_torque: torch.Tensor
    penetration: torch.Tensor
    normal: torch.Tensor
    normal_force_total: torch.Tensor
    shear_force_total: torch.Tensor


def softplus_ramp(z: torch.Tensor, width: float) -> torch.Tensor:
    """``max(z, 0)``, or ``width * softplus(z / width)`` (smooth, > 0) when ``width > 0``."""
    if width > 0:
        return width * F.softplus(z / width)
    return torch.clamp_min(z, 0.0)


def smooth_min(a: torch.Tensor, b: torch.Tensor, p: float | None) -> torch.Tensor:
    """``min(a, b)`` for a, b >= 0, or the p-norm soft min ``(a^-p + b^-p)^(-1/p) <= min``."""
    lo = torch.minimum(a, b)
    if p is None:
        return lo
    hi = torch.maximum(a, b)
    # Written as lo * (1 + (lo/hi)^p)^(-1/p): no overflow, and 0 (not NaN) when both vanish.
    safe_hi = torch.where(hi > 0, hi, torch.ones_like(hi))
    r = torch.where(hi > 0, lo / safe_hi, torch.zeros_like(lo))
    return lo * (1.0 + r ** p) ** (-1.0 / p)


def _check_param(name: str, value: TensorLike, c: int, ref: torch.Tensor, positive: bool = False) -> torch.Tensor:
    t = _as_tensor(name, value)
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Expected '{name}' of dtype float32 or float64, got {t.dtype}")
    if t.shape not in ((), (1,), (c,)):
        raise ValueError(f"Expected '{name}' to be a scalar or of shape ({c},), got shape {tuple(t.shape)}")
    vals = t.detach()
    if not torch.isfinite(vals).all():
        raise ValueError(f"Expected '{name}' to be finite")
    if positive and (vals <= 0).any():
        raise ValueError(f"Expected '{name}' > 0, got min {float(vals.min())}")
    if (vals < 0).any():
        raise ValueError(f"Expected '{name}' >= 0 (negative {name} would pull bodies together), "
                         f"got min {float(vals.min())}")
    return t.to(device=ref.device, dtype=ref.dtype)


def _check_width(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected '{name}' to be a finite number >= 0, got {value!r}")
    return float(value)


def _check_object(obj: Any, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(obj, RigidObject):
        raise TypeError(f"Expected 'obj' to be a RigidObject, got {type(obj).__name__}")
    if not callable(obj.sdf):
        raise TypeError("Expected 'obj.sdf' to be callable (M, 3) -> (M,)")
    pos = check_tensor("obj.position", obj.position, shape=(3,))
    rot = check_tensor("obj.rotation", obj.rotation)
    if rot.shape not in ((4,), (3, 3)):
        raise ValueError(f"Expected 'obj.rotation' of shape (4,) (quaternion x, y, z, w) or (3, 3), "
                         f"got {tuple(rot.shape)}")
    if rot.shape == (4,) and float(rot.detach().norm()) == 0.0:
        raise ValueError("Expected 'obj.rotation' quaternion to be non-zero")
    vel = torch.zeros(3) if obj.linear_velocity is None else obj.linear_velocity
    omg = torch.zeros(3) if obj.angular_velocity is None else obj.angular_velocity
    check_tensor("obj.linear_velocity", vel, shape=(3,))
    check_tensor("obj.angular_velocity", omg, shape=(3,))
    f = dict(device=ref.device, dtype=ref.dtype)
    return pos.to(**f), obj.rotation_matrix().to(**f), vel.to(**f), omg.to(**f)


def _check_inputs(x: Any, v: Any, nodes: Any) -> None:
    check_tensor("x", x, shape=(None, 3))
    check_tensor("v", v, shape=(x.shape[0], 3))
    if v.dtype != x.dtype or v.device != x.device:
        raise TypeError(f"Expected 'v' with the dtype/device of 'x' ({x.dtype}, {x.device}), got {v.dtype}, {v.device}")
    if not isinstance(nodes, torch.Tensor) or nodes.dtype != torch.int64 or nodes.dim() != 1:
        raise TypeError("Expected 'nodes' to be a 1-D int64 tensor of node indices")
    if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= x.shape[0]):
        raise ValueError(f"Expected 'nodes' in [0, {x.shape[0]}), got range "
                         f"[{int(nodes.min())}, {int(nodes.max())}]")


def _signed_distance(obj: RigidObject, xc: torch.Tensor, pos: torch.Tensor, rot: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distance (C,) and unit world normal (C, 3) at world points ``xc``."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        p = (xc - pos) @ rot  # = R^T (x - p) row-wise: world -> local
        leaf = not p.requires_grad
        if leaf:
            p = p.detach().requires_grad_(True)
        phi = obj.sdf(p)
        # create_graph only when the caller differentiates: the force depends on the normal, so
        # its Jacobian (and the pose gradient) needs the SDF's second derivatives. Not for a
        # MeshSDF: it holds the closest point fixed, so its autograd Hessian is
        # (I - n n^T) / |x - c| instead of the true 0 on a face (the closest point slides with x).
        # Its local normal is taken as constant instead: exact in face regions, missing only
        # the curvature term at edges/vertices and the normal's dependence on the vertices.
        mesh = isinstance(obj.sdf, MeshSDF)
        (g,) = torch.autograd.grad(phi.sum(), p, create_graph=outer and not mesh, retain_graph=outer)
    # Keep the graph only if something upstream (points, pose, SDF parameters) needs it; the
    # artificial leaf made above for the normal alone must not leak requires_grad.
    sdf_params = isinstance(obj.sdf, torch.nn.Module) and any(q.requires_grad for q in obj.sdf.parameters())
    if not outer or (leaf and not sdf_params):
        phi = phi.detach()
    g = g.detach() if (not outer or mesh or (leaf and not sdf_params)) else g
    g = g @ rot.transpose(0, 1)  # local -> world
    n = g / torch.sqrt((g * g).sum(-1, keepdim=True)).clamp_min(1e-30)
    return phi, n


def contact_forces(x: torch.Tensor, v: torch.Tensor, nodes: torch.Tensor, obj: RigidObject,
                   params: ContactParams) -> ContactResult:
    """Penalty contact forces between gel nodes and a rigid object (law in the module docstring).

    Args:
        x: Node positions [m], shape (N, 3), float32/float64 (world frame).
        v: Node velocities [m/s], shape (N, 3).
        nodes: Contact node indices, int64 shape (C,), each in [0, N).
        obj: The rigid object (SDF, pose, velocity).
        params: Contact parameters.

    Returns:
        :class:`ContactResult`. The object force and torque are exactly minus the sum and the
        moment (about ``obj.position``) of the node forces, each node force acting at its node.

    Raises:
        TypeError, ValueError: Bad inputs; the message names the argument.
    """
    _check_inputs(x, v, nodes)
    if not isinstance(params, ContactParams):
        raise TypeError(f"Expected 'params' to be a ContactParams, got {type(params).__name__}")
    pos, rot, v_lin, omega = _check_object(obj, x)
    c = nodes.shape[0]
    k_n = _check_param("k_n", params.k_n, c, x)
    k_d = _check_param("k_d", params.k_d, c, x)
    k_t = _check_param("k_t", params.k_t, c, x)
    mu = _check_param("mu", params.mu, c, x)
    eps_v = _check_param("eps_v", params.eps_v, c, x, positive=True)
    w_pen = _check_width("penetration_width", params.penetration_width)
    w_damp = _check_width("damping_width", params.damping_width)
    p_fric = params.friction_exponent
    if p_fric is not None and (isinstance(p_fric, bool) or not isinstance(p_fric, (int, float))
                               or not math.isfinite(p_fric) or p_fric < 1):
        raise ValueError(f"Expected 'friction_exponent' to be None or a number >= 1, got {p_fric!r}")

    col = lambda t: t.reshape(-1, 1) if t.dim() else t  # noqa: E731 - broadcast (C,) params over xyz
    xc, vc = x[nodes], v[nodes]
    phi, n = _signed_distance(obj, xc, pos, rot)
    d = softplus_ramp(-phi, w_pen)

    r = xc - pos
    v_rel = vc - (v_lin + torch.linalg.cross(omega.expand_as(r), r, dim=-1))
    v_n = (v_rel * n).sum(-1)
    approach = softplus_ramp(-v_n, w_damp)
    fn_mag = k_n * d + k_d * d * approach  # (C,) >= 0
    f_normal = col(fn_mag) * n

    v_t = v_rel - v_n.unsqueeze(-1) * n
    s = torch.sqrt((v_t * v_t).sum(-1) + eps_v * eps_v)
    ft_mag = smooth_min(k_t * s, mu * fn_mag, p_fric)
    f_tangent = -col(ft_mag / s) * v_t

    f = f_normal + f_tangent
    node_forces = torch.zeros_like(x).index_add(0, nodes, f.to(x.dtype))
    object_force = -f.sum(0)
    object_torque = -torch.linalg.cross(r, f, dim=-1).sum(0)
    return ContactResult(node_forces, object_force, object_torque, d, n, fn_mag.sum(),
                         torch.linalg.vector_norm(f_tangent.sum(0)))


def penalty_energy(x: torch.Tensor, nodes: torch.Tensor, obj: RigidObject, k_n: TensorLike) -> torch.Tensor:
    """Elastic penalty energy ``sum_i k_n,i d_i^2 / 2`` [J] of the hard ramp (``d = max(-phi, 0)``).

    The normal force of :func:`contact_forces` (``k_d = 0``, hard ramp) is ``-dE/dx``.

    Args:
        x: Node positions [m], shape (N, 3).
        nodes: Contact node indices, int64 shape (C,).
        obj: The rigid object.
        k_n: Per-node stiffness [N/m], scalar or (C,).

    Returns:
        Scalar energy [J].
    """
    _check_inputs(x, x, nodes)
    pos, rot, _, _ = _check_object(obj, x)
    k = _check_param("k_n", k_n, nodes.shape[0], x)
    phi = obj.sdf((x[nodes] - pos) @ rot)
    d = torch.clamp_min(-phi, 0.0)
    return 0.5 * (k * d * d).sum()
