"""Warp kernel of the explicit rollout's penalty contact against an analytic rigid object.

One launch per step over the contact nodes evaluates the law of
:func:`diffworld.sims.fem.contact.contact_forces` (same formulas, same order of operations) for
the object SDFs whose value and gradient are written out here: :class:`~diffworld.geometry.sdf.Sphere`,
:class:`~diffworld.geometry.sdf.Box`, :class:`~diffworld.geometry.sdf.HalfSpace` and
:class:`~diffworld.geometry.sdf.Waves`. The torch op costs a dozen small launches and an autograd
pass for the normal per step (about 2 ms on the 1,928-node dome, 4x the elastic step); this is one.

Its adjoint is Warp's automatic one (``adjoint=True`` launch): the kernel has no loops, so the
generated reverse pass replays it and differentiates the SDF gradient formulas too, i.e. the
normal's derivatives that the torch op gets from double backward.

Inputs per launch: node positions and velocities (N,), the contact node ids (C,), the object's
18 columns of the control row (position, row-major rotation, linear and angular velocity), the
five contact parameters each expanded to (C,), the SDF kind and its parameters (up to 6 values:
Sphere radius, centre; Box half extents, centre; HalfSpace normal, offset; Waves amplitude,
wavelengths x and y, offset) and the smoothing widths; output: the node forces, added into an
(N,) array.
"""

from __future__ import annotations

from typing import Any

import warp as wp

__all__ = ["KERNELS", "SDF_BOX", "SDF_HALFSPACE", "SDF_SPHERE", "SDF_WAVES", "contact_node_forces"]

SDF_SPHERE = 0
SDF_BOX = 1
SDF_HALFSPACE = 2
SDF_WAVES = 3


@wp.func
def _ramp(z: Any, width: Any):
    """``max(z, 0)``, or ``width softplus(z / width)`` (torch's softplus: linear above 20)."""
    zero = type(z)(0.0)
    out = wp.max(z, zero)
    if width > zero:
        t = z / width
        if t > type(z)(20.0):
            out = z
        else:
            out = width * wp.log(type(z)(1.0) + wp.exp(t))
    return out


@wp.func
def _smooth_min(a: Any, b: Any, p: Any):
    """``min(a, b)`` (p <= 0), or ``lo (1 + (lo/hi)^p)^(-1/p)``."""
    zero = type(a)(0.0)
    lo = wp.min(a, b)
    out = lo
    if p > zero:
        hi = wp.max(a, b)
        r = zero
        if hi > zero:
            r = lo / hi
        out = lo * wp.pow(type(a)(1.0) + wp.pow(r, p), -type(a)(1.0) / p)
    return out


@wp.func
def _sdf_grad(kind: int, q: Any, sp: wp.array(dtype=Any)):
    """(value, local gradient) of the SDF at local point ``q`` (the torch SDFs' formulas)."""
    zero = type(sp[0])(0.0)
    one = type(sp[0])(1.0)
    phi = zero
    g = type(q)(zero, zero, zero)
    if kind == SDF_SPHERE:
        d = q - type(q)(sp[1], sp[2], sp[3])
        ln = wp.length(d)
        phi = ln - sp[0]
        if ln > zero:
            g = d / ln
    elif kind == SDF_BOX:
        c = q - type(q)(sp[3], sp[4], sp[5])
        sg = type(q)(wp.sign(c[0]), wp.sign(c[1]), wp.sign(c[2]))
        if c[0] == zero:
            sg = type(q)(zero, sg[1], sg[2])
        if c[1] == zero:
            sg = type(q)(sg[0], zero, sg[2])
        if c[2] == zero:
            sg = type(q)(sg[0], sg[1], zero)
        d = type(q)(wp.abs(c[0]) - sp[0], wp.abs(c[1]) - sp[1], wp.abs(c[2]) - sp[2])
        o = type(q)(wp.max(d[0], zero), wp.max(d[1], zero), wp.max(d[2], zero))
        lo = wp.length(o)
        m = wp.max(d[0], wp.max(d[1], d[2]))
        phi = lo + wp.min(m, zero)
        if lo > zero:
            g = wp.cw_mul(o / lo, sg)
        elif m < zero:
            if d[0] >= d[1] and d[0] >= d[2]:
                g = type(q)(sg[0], zero, zero)
            elif d[1] >= d[2]:
                g = type(q)(zero, sg[1], zero)
            else:
                g = type(q)(zero, zero, sg[2])
    elif kind == SDF_HALFSPACE:
        nv = type(q)(sp[0], sp[1], sp[2])
        n = nv / wp.length(nv)
        phi = wp.dot(q, n) - sp[3]
        g = n
    else:  # waves: (z - o - h) / sqrt(1 + hx^2 + hy^2), h = a cos(kx x) cos(ky y)
        a = sp[0]
        two_pi = type(sp[0])(6.283185307179586)
        kx = zero
        ky = zero
        if sp[1] > zero:
            kx = two_pi / sp[1]
        if sp[2] > zero:
            ky = two_pi / sp[2]
        cx = wp.cos(kx * q[0])
        sx = wp.sin(kx * q[0])
        cy = wp.cos(ky * q[1])
        sy = wp.sin(ky * q[1])
        h = a * cx * cy
        hx = -a * kx * sx * cy
        hy = -a * ky * cx * sy
        hxx = -a * kx * kx * cx * cy
        hyy = -a * ky * ky * cx * cy
        hxy = a * kx * ky * sx * sy
        S = wp.sqrt(one + hx * hx + hy * hy)
        u = q[2] - sp[3] - h
        phi = u / S
        dSx = (hx * hxx + hy * hxy) / S
        dSy = (hx * hxy + hy * hyy) / S
        g = type(q)(-hx / S - u * dSx / (S * S), -hy / S - u * dSy / (S * S), one / S)
    return phi, g


@wp.kernel
def contact_node_forces(x: wp.array(dtype=Any), v: wp.array(dtype=Any), nodes: wp.array(dtype=wp.int32),
                        obj: wp.array(dtype=Any), k_n: wp.array(dtype=Any), k_d: wp.array(dtype=Any),
                        k_t: wp.array(dtype=Any), mu: wp.array(dtype=Any), eps_v: wp.array(dtype=Any),
                        kind: int, sdf_params: wp.array(dtype=Any), w_pen: Any, w_damp: Any, p_fric: Any,
                        f: wp.array(dtype=Any)):
    """Adds each contact node's penalty force [N] to ``f`` (law: :mod:`diffworld.sims.fem.contact`)."""
    i = wp.tid()
    node = nodes[i]
    xi = x[node]
    vi = v[node]
    pos = type(xi)(obj[0], obj[1], obj[2])
    R = wp.matrix(obj[3], obj[4], obj[5], obj[6], obj[7], obj[8], obj[9], obj[10], obj[11], shape=(3, 3))
    v_lin = type(xi)(obj[12], obj[13], obj[14])
    omega = type(xi)(obj[15], obj[16], obj[17])
    r = xi - pos
    phi, gl = _sdf_grad(kind, wp.transpose(R) @ r, sdf_params)
    g = R @ gl
    n = g / wp.max(wp.length(g), type(w_pen)(1.0e-30))
    d = _ramp(-phi, w_pen)
    v_rel = vi - (v_lin + wp.cross(omega, r))
    v_n = wp.dot(v_rel, n)
    approach = _ramp(-v_n, w_damp)
    fn_mag = k_n[i] * d + k_d[i] * d * approach
    v_t = v_rel - v_n * n
    e = eps_v[i]
    sl = wp.sqrt(wp.dot(v_t, v_t) + e * e)
    ft_mag = _smooth_min(k_t[i] * sl, mu[i] * fn_mag, p_fric)
    wp.atomic_add(f, node, fn_mag * n - (ft_mag / sl) * v_t)


# Concrete overloads by precision (no per-launch type inference).
KERNELS: dict[str, Any] = {}
for _name, _s in (("float32", wp.float32), ("float64", wp.float64)):
    _a = wp.array(dtype=_s)
    _av = wp.array(dtype=wp.types.vector(3, _s))
    KERNELS[_name] = wp.overload(contact_node_forces, [_av, _av, wp.array(dtype=wp.int32), _a, _a, _a, _a, _a, _a,
                                                       int, _a, _s, _s, _s, _av])
