"""Analytic signed distance fields as torch modules: primitives, CSG, transforms, grid sampling.

Every field is a :class:`SDF` (a ``torch.nn.Module``) mapping points [m] of shape (N, 3) to
values [m] of shape (N,), negative inside. Values are differentiable in the points and in the
shape parameters, which are stored as tensors (never Python floats):

* a Python number, a sequence, or a tensor that does not require grad becomes an
  ``nn.Parameter`` (optimizable; freeze with ``requires_grad_(False)``);
* an ``nn.Parameter`` is registered as given (shared with the caller);
* a tensor that requires grad but is not a parameter (the output of another computation, or a
  leaf used in a functional gradient check) is kept by reference as a buffer, so gradients flow
  back to where it came from.

Parameters are cast to the dtype and device of the query points inside ``forward`` (a no-op when
they already match), so a float32 shape can be queried with float64 points; for float64 gradient
checks build the shape from float64 tensors or call ``.double()``.

Exactness: the primitives return exact Euclidean distances (|grad| = 1 away from the medial axis)
both inside and outside. :class:`Union` is exact outside and a bound inside; :class:`Intersection`
and :class:`Difference` are bounds (|value| <= true distance, same zero set and sign);
:class:`SmoothUnion` is a bound near the blend; :class:`Transform` with a uniform scale keeps
whatever exactness its child has.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Union as _TUnion

import torch

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.grid import Grid

__all__ = [
    "SDF",
    "SDFValueGrad",
    "Sphere",
    "Box",
    "RoundedBox",
    "Torus",
    "Capsule",
    "Cylinder",
    "Cone",
    "HalfSpace",
    "Waves",
    "Union",
    "Intersection",
    "Difference",
    "SmoothUnion",
    "Transform",
    "axis_angle_to_matrix",
    "sample_grid",
]

TensorLike = _TUnion[float, Sequence[float], torch.Tensor]


class SDFValueGrad(NamedTuple):
    """Field values and their spatial gradient.

    Attributes:
        values: [m], shape (N,).
        gradients: [-] (unit length for exact SDFs), shape (N, 3).
    """

    values: torch.Tensor
    gradients: torch.Tensor


# --------------------------------------------------------------------------------------------
# parameter handling
# --------------------------------------------------------------------------------------------

def _to_tensor(name: str, value, shape: tuple[int, ...]) -> torch.Tensor:
    """``value`` as a float tensor of ``shape`` (graph kept for tensors), validated."""
    if isinstance(value, bool):
        raise TypeError(f"Expected '{name}' to be a number or tensor of shape {shape}, got bool")
    if isinstance(value, torch.Tensor):
        t = value
        if not t.is_floating_point():
            if t.requires_grad:  # pragma: no cover - integer tensors cannot require grad
                raise TypeError(f"Expected '{name}' to be a float tensor, got {t.dtype}")
            t = t.to(torch.get_default_dtype())
    else:
        try:
            t = torch.tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"Expected '{name}' to be a number, a sequence of numbers or a tensor of shape {shape}, "
                f"got {type(value).__name__}"
            ) from None
    if tuple(t.shape) != shape:
        want = "()" if shape == () else str(shape)
        raise ValueError(f"Expected '{name}' of shape {want}, got {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"'{name}' must be finite, got {t.detach().cpu().tolist()}")
    return t


def _register(module: torch.nn.Module, name: str, value, shape: tuple[int, ...] = (), *,
              positive: bool = False, nonnegative: bool = False, trainable: bool = True,
              label: str | None = None) -> None:
    """Store a shape parameter on ``module`` as an nn.Parameter or a graph-connected buffer.

    Args:
        module: Owner.
        name: Attribute name.
        value: Number, sequence, tensor or nn.Parameter.
        shape: Required shape.
        positive: Require every entry > 0.
        nonnegative: Require every entry >= 0.
        trainable: Turn plain values into ``nn.Parameter`` (else a buffer).
        label: Name used in error messages (defaults to ``name``).
    """
    label = label or name
    t = _to_tensor(label, value, shape)
    d = t.detach()
    if positive and not bool((d > 0).all()):
        raise ValueError(f"Expected '{label}' > 0, got {d.cpu().tolist()}")
    if nonnegative and not bool((d >= 0).all()):
        raise ValueError(f"Expected '{label}' >= 0, got {d.cpu().tolist()}")
    if isinstance(value, torch.nn.Parameter) and t is value:
        module.register_parameter(name, value)
    elif t.requires_grad:
        module.register_buffer(name, t, persistent=True)
    elif trainable:
        module.register_parameter(name, torch.nn.Parameter(t.detach().clone()))
    else:
        module.register_buffer(name, t.detach().clone(), persistent=True)


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Parameter ``t`` in the dtype/device of points ``p`` (differentiable, no-op if equal)."""
    return t.to(dtype=p.dtype, device=p.device)


def _length(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis; gradient 0 (not NaN) at the origin."""
    return torch.linalg.vector_norm(v, dim=-1)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite (zero) gradient at 0."""
    return torch.sqrt(torch.clamp_min(x, torch.finfo(x.dtype).tiny))


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of an axis-angle vector (Rodrigues), differentiable everywhere.

    Args:
        axis_angle: Rotation axis times angle [rad], shape (..., 3).

    Returns:
        Rotation matrices, shape (..., 3, 3).
    """
    w = axis_angle
    theta = _length(w)
    a = torch.sinc(theta / math.pi)  # sin(t) / t, smooth at 0
    b = 0.5 * torch.sinc(theta / (2.0 * math.pi)) ** 2  # (1 - cos t) / t^2 = 2 sin^2(t/2) / t^2
    zero = torch.zeros_like(w[..., 0])
    k = torch.stack([
        torch.stack([zero, -w[..., 2], w[..., 1]], -1),
        torch.stack([w[..., 2], zero, -w[..., 0]], -1),
        torch.stack([-w[..., 1], w[..., 0], zero], -1),
    ], -2)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------

class SDF(torch.nn.Module):
    """Base class of signed distance fields.

    Subclasses implement :meth:`_eval` on validated points. ``forward`` validates the points once
    at the boundary; composites call their children's ``_eval`` directly.

    Operators: ``a | b`` (union), ``a & b`` (intersection), ``a - b`` (difference).
    """

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance at points.

        Args:
            points: Query points [m], shape (N, 3), float32 or float64.

        Returns:
            Signed distances [m], shape (N,), dtype of ``points``, negative inside.

        Raises:
            TypeError: ``points`` is not a float tensor.
            ValueError: ``points`` is not of shape (N, 3).
        """
        check_tensor("points", points, shape=(None, 3), finite=False)
        return self._eval(points)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_and_grad(self, points: torch.Tensor, create_graph: bool = False) -> SDFValueGrad:
        """Values and spatial gradients via autograd.

        Args:
            points: Query points [m], shape (N, 3).
            create_graph: Keep the graph of the gradient (for losses on normals / eikonal terms).

        Returns:
            :class:`SDFValueGrad` with values (N,) and gradients (N, 3).
        """
        check_tensor("points", points, shape=(None, 3), finite=False)
        with torch.enable_grad():
            x = points if (points.requires_grad and create_graph) else points.detach().requires_grad_(True)
            f = self._eval(x)
            (g,) = torch.autograd.grad(f.sum(), x, create_graph=create_graph)
        return SDFValueGrad(f if create_graph else f.detach(), g)

    # -- composition helpers -----------------------------------------------------------------
    def union(self, *others: "SDF") -> "Union":
        """Union with other fields."""
        return Union(self, *others)

    def intersection(self, *others: "SDF") -> "Intersection":
        """Intersection with other fields."""
        return Intersection(self, *others)

    def difference(self, other: "SDF") -> "Difference":
        """``self`` minus ``other``."""
        return Difference(self, other)

    def smooth_union(self, other: "SDF", k: TensorLike) -> "SmoothUnion":
        """Polynomial smooth union with blend width ``k`` [m]."""
        return SmoothUnion(self, other, k)

    def transformed(self, translation: TensorLike | None = None, rotation: TensorLike | None = None,
                    scale: TensorLike | None = None) -> "Transform":
        """This field moved by ``x -> scale * R x + translation`` (see :class:`Transform`)."""
        return Transform(self, translation=translation, rotation=rotation, scale=scale)

    def __or__(self, other: "SDF") -> "Union":
        return Union(self, other)

    def __and__(self, other: "SDF") -> "Intersection":
        return Intersection(self, other)

    def __sub__(self, other: "SDF") -> "Difference":
        return Difference(self, other)


# --------------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------------

class Sphere(SDF):
    """Ball: ``|x - center| - radius``.

    Args:
        radius: [m], > 0.
        center: [m], shape (3,).
    """

    def __init__(self, radius: TensorLike = 0.3, center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "radius", radius, positive=True)
        _register(self, "center", center, (3,))

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        return _length(p - _like(self.center, p)) - _like(self.radius, p)


class Box(SDF):
    """Axis-aligned box (exact distance inside and outside).

    Args:
        half_extents: Half side lengths [m], shape (3,), each > 0.
        center: [m], shape (3,).
    """

    def __init__(self, half_extents: TensorLike = (0.25, 0.25, 0.25), center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "half_extents", half_extents, (3,), positive=True)
        _register(self, "center", center, (3,))

    @staticmethod
    def _box(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        d = q.abs() - h
        outside = _length(torch.clamp_min(d, 0.0))
        inside = torch.clamp_max(d.amax(dim=-1), 0.0)
        return outside + inside

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        return self._box(p - _like(self.center, p), _like(self.half_extents, p))


class RoundedBox(SDF):
    """Axis-aligned box with rounded edges and corners (exact).

    The outer size is ``2 * half_extents``; edges are rounded with ``radius``.

    Args:
        half_extents: Outer half side lengths [m], shape (3,), each > 0.
        radius: Rounding radius [m], 0 <= radius <= min(half_extents).
        center: [m], shape (3,).
    """

    def __init__(self, half_extents: TensorLike = (0.25, 0.25, 0.25), radius: TensorLike = 0.05,
                 center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "half_extents", half_extents, (3,), positive=True)
        _register(self, "radius", radius, nonnegative=True)
        _register(self, "center", center, (3,))
        r, h = float(self.radius.detach()), self.half_extents.detach()
        if r > float(h.min()):
            raise ValueError(f"Expected 'radius' <= min(half_extents) = {float(h.min()):g}, got {r:g}")

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        r = _like(self.radius, p)
        return Box._box(p - _like(self.center, p), _like(self.half_extents, p) - r) - r


class Torus(SDF):
    """Torus around the z axis (ring in the xy-plane); exact.

    Args:
        major_radius: Distance from the center to the tube's center line [m], > 0.
        minor_radius: Tube radius [m], > 0 (< major_radius for a ring torus of genus 1).
        center: [m], shape (3,).
    """

    def __init__(self, major_radius: TensorLike = 0.25, minor_radius: TensorLike = 0.1,
                 center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "major_radius", major_radius, positive=True)
        _register(self, "minor_radius", minor_radius, positive=True)
        _register(self, "center", center, (3,))

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        q = p - _like(self.center, p)
        rho = _length(q[:, :2]) - _like(self.major_radius, p)
        return _length(torch.stack([rho, q[:, 2]], -1)) - _like(self.minor_radius, p)


class Capsule(SDF):
    """Segment ``a``-``b`` swept by a ball (exact). ``a == b`` gives a sphere.

    Args:
        a: First end point [m], shape (3,).
        b: Second end point [m], shape (3,).
        radius: [m], > 0.
    """

    def __init__(self, a: TensorLike = (0.0, 0.0, -0.2), b: TensorLike = (0.0, 0.0, 0.2), radius: TensorLike = 0.1):
        super().__init__()
        _register(self, "a", a, (3,))
        _register(self, "b", b, (3,))
        _register(self, "radius", radius, positive=True)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        a, b = _like(self.a, p), _like(self.b, p)
        pa, ba = p - a, b - a
        denom = torch.clamp_min((ba * ba).sum(), torch.finfo(p.dtype).tiny)
        t = torch.clamp((pa * ba).sum(-1) / denom, 0.0, 1.0)
        return _length(pa - t[:, None] * ba) - _like(self.radius, p)


class Cylinder(SDF):
    """Capped cylinder with axis z (exact).

    Args:
        radius: [m], > 0.
        half_height: Half length along z [m], > 0.
        center: [m], shape (3,).
    """

    def __init__(self, radius: TensorLike = 0.2, half_height: TensorLike = 0.2, center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "radius", radius, positive=True)
        _register(self, "half_height", half_height, positive=True)
        _register(self, "center", center, (3,))

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        q = p - _like(self.center, p)
        d = torch.stack([_length(q[:, :2]) - _like(self.radius, p), q[:, 2].abs() - _like(self.half_height, p)], -1)
        return torch.clamp_max(d.amax(-1), 0.0) + _length(torch.clamp_min(d, 0.0))


class Cone(SDF):
    """Solid cone with axis z (exact): base disk of ``radius`` at ``center.z - height / 2``,
    apex at ``center.z + height / 2``.

    Computed in the meridian half-plane (rho = distance to the axis, z) as the distance to the
    triangle's two surface edges (base and slant), signed by an inside test. Distances to edge
    interiors are projections on the edge normals, so the gradient stays the unit outward normal
    exactly on the surface (a squared-distance form loses it to rounding there).

    Args:
        radius: Base radius [m], > 0.
        height: Base-to-apex height [m], > 0.
        center: Mid-height point of the axis [m], shape (3,).
    """

    def __init__(self, radius: TensorLike = 0.2, height: TensorLike = 0.4, center: TensorLike = (0.0, 0.0, 0.0)):
        super().__init__()
        _register(self, "radius", radius, positive=True)
        _register(self, "height", height, positive=True)
        _register(self, "center", center, (3,))

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        q = p - _like(self.center, p)
        r, h = _like(self.radius, p), 0.5 * _like(self.height, p)
        rho, z = _length(q[:, :2]), q[:, 2]
        # Relative to the base rim (r, -h).
        wx, wz = rho - r, z + h
        rim = _length(torch.stack([wx, wz], -1))
        apex = _length(torch.stack([rho, z - h], -1))
        # Slant edge (r, -h) -> (0, h): direction e = (-r, 2h), outward unit normal n = (2h, r) / |e|.
        ex, ez = -r, 2.0 * h
        length = torch.sqrt(ex * ex + ez * ez)
        t = (wx * ex + wz * ez) / (length * length)
        across = (wx * ez - wz * ex) / length  # signed distance to the slant line, > 0 outside
        below = -wz  # signed distance to the base plane, > 0 outside
        # Inside (a triangle whose feet of perpendiculars stay on the edges): max of the two
        # signed line distances. Outside: distance to the nearer edge. Ties at 0 take the outward
        # branch so that points exactly on the surface keep the outward unit gradient.
        d_base = torch.where(rho <= r, torch.where(below >= 0.0, below, -below), rim)
        d_slant = torch.where(t <= 0.0, rim, torch.where(t >= 1.0, apex, torch.where(across >= 0.0, across, -across)))
        inside = (z > -h) & (rho * (2.0 * h) < r * (h - z))
        return torch.where(inside, torch.maximum(below, across), torch.minimum(d_base, d_slant))


class HalfSpace(SDF):
    """Half-space ``{x : n . x <= offset}`` with unit normal ``n`` pointing outside (exact).

    Args:
        normal: Outward normal [-], shape (3,), non-zero (normalized inside).
        offset: Signed distance of the plane from the origin along the normal [m].
    """

    def __init__(self, normal: TensorLike = (0.0, 0.0, 1.0), offset: TensorLike = 0.0):
        super().__init__()
        _register(self, "normal", normal, (3,))
        if float(self.normal.detach().norm()) == 0.0:
            raise ValueError("Expected 'normal' to be non-zero, got (0, 0, 0)")
        _register(self, "offset", offset)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        n = _like(self.normal, p)
        return p @ (n / _length(n)) - _like(self.offset, p)


class Waves(SDF):
    """Wavy ground (a bumpy rigid surface): solid below ``z = offset + h(x, y)`` with
    ``h = amplitude cos(2 pi x / wavelength_x) cos(2 pi y / wavelength_y)`` (a wavelength of 0
    means flat along that axis).

    The value ``(z - offset - h) / sqrt(1 + |grad h|^2)`` is the first-order distance: exact on
    the surface (zero) and in its tangent plane, with an error of order ``amplitude k^2 d^2``
    (``k = 2 pi / wavelength``) at distance ``d``; its gradient is the exact unit normal on the
    surface. Smooth everywhere (analytic second derivatives for contact Jacobians).

    Args:
        amplitude: [m], >= 0.
        wavelength: (x, y) wavelengths [m], each >= 0 (0: flat along that axis).
        offset: Mean height of the surface [m].
    """

    def __init__(self, amplitude: TensorLike = 1e-3, wavelength: TensorLike = (1e-2, 0.0), offset: TensorLike = 0.0):
        super().__init__()
        _register(self, "amplitude", amplitude, nonnegative=True)
        _register(self, "wavelength", wavelength, (2,), nonnegative=True)
        _register(self, "offset", offset)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        lam = _like(self.wavelength, p)
        # k = 2 pi / wavelength, 0 for a flat axis
        k = torch.where(lam > 0, 2 * math.pi / torch.where(lam > 0, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        a = _like(self.amplitude, p)
        cx, cy = torch.cos(k[0] * p[:, 0]), torch.cos(k[1] * p[:, 1])
        h = a * cx * cy
        hx = -a * k[0] * torch.sin(k[0] * p[:, 0]) * cy
        hy = -a * k[1] * cx * torch.sin(k[1] * p[:, 1])
        return (p[:, 2] - _like(self.offset, p) - h) / torch.sqrt(1 + hx * hx + hy * hy)


# --------------------------------------------------------------------------------------------
# CSG
# --------------------------------------------------------------------------------------------

def _check_children(name: str, children: Sequence, minimum: int) -> list[SDF]:
    if len(children) < minimum:
        raise ValueError(f"Expected at least {minimum} SDF children in '{name}', got {len(children)}")
    for i, c in enumerate(children):
        if not isinstance(c, SDF):
            raise TypeError(f"Expected '{name}[{i}]' to be an SDF module, got {type(c).__name__}")
    return list(children)


class _NaryCSG(SDF):
    """Shared body of Union and Intersection: a reduction over the children's values."""

    _reduce = staticmethod(torch.amin)

    def __init__(self, *children: SDF):
        super().__init__()
        self.parts = torch.nn.ModuleList(_check_children("children", children, 1))

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        vals = [c._eval(p) for c in self.parts]
        return vals[0] if len(vals) == 1 else self._reduce(torch.stack(vals, 0), 0)


class Union(_NaryCSG):
    """Union: minimum of the children (exact outside, a bound inside).

    Args:
        *children: One or more :class:`SDF` (stored in ``parts``).
    """

    _reduce = staticmethod(torch.amin)


class Intersection(_NaryCSG):
    """Intersection: maximum of the children (a bound; exact where one child is closest).

    Args:
        *children: One or more :class:`SDF` (stored in ``parts``).
    """

    _reduce = staticmethod(torch.amax)


class Difference(SDF):
    """``a`` minus ``b``: ``max(a, -b)`` (a bound).

    Args:
        a: Field to cut from.
        b: Field removed.
    """

    def __init__(self, a: SDF, b: SDF):
        super().__init__()
        self.a, self.b = _check_children("(a, b)", (a, b), 2)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.a._eval(p), -self.b._eval(p))


class SmoothUnion(SDF):
    """Polynomial smooth minimum of two fields.

    ``h = clamp(1/2 + (b - a) / (2k), 0, 1)``, value ``= lerp(b, a, h) - k h (1 - h)``: equals
    ``min(a, b)`` where ``|a - b| >= k`` and adds at most ``k / 4`` of material in the blend.

    Args:
        a: First field.
        b: Second field.
        k: Blend width [m], > 0.
    """

    def __init__(self, a: SDF, b: SDF, k: TensorLike = 0.05):
        super().__init__()
        self.a, self.b = _check_children("(a, b)", (a, b), 2)
        _register(self, "k", k, positive=True)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        fa, fb = self.a._eval(p), self.b._eval(p)
        k = _like(self.k, p)
        h = torch.clamp(0.5 + 0.5 * (fb - fa) / k, 0.0, 1.0)
        return fb + h * (fa - fb) - k * h * (1.0 - h)


class Transform(SDF):
    """Child field placed by the similarity ``x_world = scale * R @ x_local + translation``.

    ``f(x) = scale * child(R^T (x - translation) / scale)``: a uniform scale keeps distances
    exact. The rotation is either an axis-angle vector (3,) [rad] (stored as is, mapped with
    Rodrigues inside ``forward`` so it stays a free optimization variable) or a rotation
    matrix (3, 3) (orthonormal, det +1).

    Args:
        child: Field in local coordinates.
        translation: [m], shape (3,); default zero.
        rotation: Axis-angle (3,) or matrix (3, 3); default identity (axis-angle zero).
        scale: Uniform scale [-], > 0; default 1.
    """

    def __init__(self, child: SDF, translation: TensorLike | None = None, rotation: TensorLike | None = None,
                 scale: TensorLike | None = None):
        super().__init__()
        (self.child,) = _check_children("child", (child,), 1)
        _register(self, "translation", (0.0, 0.0, 0.0) if translation is None else translation, (3,))
        _register(self, "scale", 1.0 if scale is None else scale, positive=True)
        if rotation is None:
            rotation = (0.0, 0.0, 0.0)
        shape = _shape_of(rotation)
        if shape == (3, 3):
            _register(self, "rotation", rotation, (3, 3), label="rotation")
            m = self.rotation.detach().double()
            err = float((m.T @ m - torch.eye(3, dtype=torch.float64)).abs().max())
            tol = 1e-4 if self.rotation.dtype == torch.float32 else 1e-5
            if err > tol or float(torch.linalg.det(m)) <= 0:
                raise ValueError(f"Expected 'rotation' matrix orthonormal with det +1 (|R^T R - I| <= {tol:g}), "
                                 f"got |R^T R - I| = {err:.3g}, det = {float(torch.linalg.det(m)):.6g}")
            self._matrix = True
        elif shape == (3,):
            _register(self, "rotation", rotation, (3,), label="rotation")
            self._matrix = False
        else:
            raise ValueError(f"Expected 'rotation' as an axis-angle (3,) or a matrix (3, 3), got shape {shape} "
                             f"({type(rotation).__name__})")

    def rotation_matrix(self) -> torch.Tensor:
        """Current rotation matrix R, shape (3, 3), differentiable in the stored rotation."""
        return self.rotation if self._matrix else axis_angle_to_matrix(self.rotation)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        rot = _like(self.rotation_matrix(), p)
        s = _like(self.scale, p)
        local = ((p - _like(self.translation, p)) @ rot) / s
        return s * self.child._eval(local)


def _shape_of(x) -> tuple[int, ...] | None:
    """Shape of a tensor or numeric (nested) sequence; None if it is neither."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    try:
        return tuple(torch.tensor(x, dtype=torch.float64).shape)
    except (TypeError, ValueError, RuntimeError):
        return None


# --------------------------------------------------------------------------------------------
# grid sampling
# --------------------------------------------------------------------------------------------

def sample_grid(field: Callable[[torch.Tensor], torch.Tensor], grid: Grid, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, chunk: int = 262144) -> torch.Tensor:
    """Evaluate a field on the nodes of a grid, in chunks.

    Node (i, j, k) is at ``Grid.nodes()[i, j, k]``. Autograd follows the field if grad mode is on
    (wrap the call in ``torch.no_grad()`` to sample without a graph).

    Args:
        field: Callable mapping points [m] of shape (M, 3) to values of shape (M,) or (M, 1).
        grid: Node grid.
        device: Device of the nodes and result.
        dtype: float32 or float64.
        chunk: Points per field call (bounds peak memory), >= 1.

    Returns:
        Node values, shape (nx+1, ny+1, nz+1).

    Raises:
        TypeError: ``field`` not callable, ``grid`` not a Grid, bad dtype.
        ValueError: Bad chunk, or the field returned a wrong shape.
    """
    if not callable(field):
        raise TypeError(f"Expected 'field' to be callable (points (N, 3) -> values (N,)), got {type(field).__name__}")
    if not isinstance(grid, Grid):
        raise TypeError(f"Expected 'grid' to be a diffworld Grid, got {type(grid).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Expected 'dtype' float32 or float64, got {dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Expected 'chunk' to be a positive int, got {chunk!r}")
    axes = [torch.linspace(lo, hi, r + 1, dtype=torch.float64).to(device=device, dtype=dtype)
            for lo, hi, r in zip(grid.lower, grid.upper, grid.resolution)]
    n0, n1, n2 = grid.shape
    total = n0 * n1 * n2
    out = []
    for start in range(0, total, chunk):
        idx = torch.arange(start, min(start + chunk, total), device=device)
        i, j, k = idx // (n1 * n2), (idx // n2) % n1, idx % n2
        pts = torch.stack([axes[0][i], axes[1][j], axes[2][k]], -1)
        v = field(pts)
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"Expected 'field' to return a tensor, got {type(v).__name__}")
        if v.dim() == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if tuple(v.shape) != (pts.shape[0],):
            raise ValueError(f"Expected 'field' to return shape ({pts.shape[0]},) or ({pts.shape[0]}, 1), "
                             f"got {tuple(v.shape)}")
        out.append(v)
    return torch.cat(out).reshape(grid.shape)
