"""Warp kernels of the XPBD rope (one module: one compile, one kernel-cache entry).

One step of a chain of N particles (S = N - 1 segments, N - 2 bending joints) is::

    inverse_mass   per particle   mass, pinned slot                    -> w (0 for pinned)
    predict        per particle   x, v, w, f, gravity, damping, target -> x*  (pinned: x* = target)
    K times:
      stretch_color (colour 0, 1)     x, w, rest, alpha, lambda -> x', lambda'
      bend_*_color  (2 or 3 colours)  x, w, (rest,) alpha, lambda -> x', lambda'
    finish         per particle   x (step start), x*  -> x', v' = (x' - x) / dt

Constraints are solved by *coloured Gauss-Seidel*: the constraints of one colour share no
particle, so a colour is one parallel pass and the passes run one after the other. Stretch
constraint j joins (j, j+1): colour j mod 2. Distance bending j joins (j, j+2): colour
(j // 2) mod 2. Angle bending at the interior particle i joins (i-1, i, i+1): colour i mod 3.

Every pass is *particle parallel*: thread p finds the one constraint of the colour that moves p
(if any), evaluates it and writes p's new position; the thread of the constraint's first particle
(or its centre, for the angle) also writes its new multiplier, every other thread copies its
constraint's old multiplier. So each output entry is written exactly once, every pass reads one
array and writes fresh ones, and Warp's automatic adjoints (replayed from a tape) are exact:
nothing a recorded kernel read is ever overwritten (docs/architecture.md, contract 3).

XPBD update of a scalar constraint C with compliance alpha [m/N] (Macklin et al. 2016)::

    alpha~ = alpha / dt^2,  dlambda = (-C - alpha~ lambda) / (sum_k w_k |grad_k C|^2 + alpha~),
    x_k += w_k grad_k C dlambda

and of the vector angle constraint ``C = t_b - t_a`` (unit tangents of the two segments at a
joint; zero when straight) the same with the 3x3 matrix ``sum_k w_k J_k J_k^T + alpha~ I``.
"""

from __future__ import annotations

from typing import Any

import warp as wp

__all__ = ["KERNELS"]


@wp.func
def segment(x: wp.array(dtype=Any), j: int):
    """Unit tangent and length of the segment (j, j+1)."""
    d = x[j + 1] - x[j]
    L = wp.length(d)
    return d / L, L


@wp.kernel
def inverse_mass(mass: wp.array(dtype=Any), slot: wp.array(dtype=wp.int32), w: wp.array(dtype=Any)):
    """w = 1 / m for free particles, 0 for pinned (kinematic) ones and massless ones."""
    i = wp.tid()
    m = mass[i]
    zero = m * type(m)(0.0)
    if slot[i] >= 0 or m <= zero:
        w[i] = zero
    else:
        w[i] = type(m)(1.0) / m


@wp.kernel
def predict(x: wp.array(dtype=Any), v: wp.array(dtype=Any), w: wp.array(dtype=Any), f: wp.array(dtype=Any),
            slot: wp.array(dtype=wp.int32), target: wp.array(dtype=Any), gravity: wp.array(dtype=Any),
            damping: wp.array(dtype=Any), dt: Any, x_pred: wp.array(dtype=Any)):
    """Symplectic prediction ``x* = x + dt (v / (1 + damping dt) + dt (w f + g))``; pinned particles
    jump to their target. Damping is mass proportional and taken implicitly on the velocity carried
    over (it never limits dt); the step's loads are not damped, so a rope at rest under a static
    load settles where the constraints balance the full load."""
    i = wp.tid()
    k = slot[i]
    if k >= 0:
        x_pred[i] = target[k]
    else:
        vn = v[i] / (type(dt)(1.0) + damping[0] * dt) + (f[i] * w[i] + gravity[0]) * dt
        x_pred[i] = x[i] + vn * dt


@wp.func
def stretch_dlambda(x: wp.array(dtype=Any), w: wp.array(dtype=Any), rest: wp.array(dtype=Any),
                    alpha: wp.array(dtype=Any), lam: wp.array(dtype=Any), j: int, dt: Any):
    """Multiplier increment and unit direction of stretch constraint j: C = |x_{j+1} - x_j| - l_j."""
    n, L = segment(x, j)
    at = alpha[j] / (dt * dt)
    denom = w[j] + w[j + 1] + at
    dl = dt * type(dt)(0.0)
    if denom > dl:
        dl = (-(L - rest[j]) - at * lam[j]) / denom
    return dl, n


@wp.kernel
def stretch_color(x: wp.array(dtype=Any), w: wp.array(dtype=Any), rest: wp.array(dtype=Any),
                  alpha: wp.array(dtype=Any), lam: wp.array(dtype=Any), color: int, dt: Any,
                  x_out: wp.array(dtype=Any), lam_out: wp.array(dtype=Any)):
    """One colour of stretch constraints (j mod 2 == color), particle parallel."""
    p = wp.tid()
    n_seg = rest.shape[0]
    j = p - 1
    if p % 2 == color:
        j = p
    xp = x[p]
    if j >= 0 and j < n_seg:
        dl, n = stretch_dlambda(x, w, rest, alpha, lam, j, dt)
        if p == j:  # grad_a C = -n
            xp = xp - n * (w[p] * dl)
        else:
            xp = xp + n * (w[p] * dl)
    x_out[p] = xp
    if p < n_seg:  # thread p owns multiplier p
        if p % 2 == color:
            dl, n = stretch_dlambda(x, w, rest, alpha, lam, p, dt)
            lam_out[p] = lam[p] + dl
        else:
            lam_out[p] = lam[p]


@wp.func
def bend_distance_dlambda(x: wp.array(dtype=Any), w: wp.array(dtype=Any), rest: wp.array(dtype=Any),
                          alpha: wp.array(dtype=Any), lam: wp.array(dtype=Any), j: int, dt: Any):
    """Distance bending constraint j: C = |x_{j+2} - x_j| - r_j."""
    d = x[j + 2] - x[j]
    L = wp.length(d)
    n = d / L
    at = alpha[j] / (dt * dt)
    denom = w[j] + w[j + 2] + at
    dl = dt * type(dt)(0.0)
    if denom > dl:
        dl = (-(L - rest[j]) - at * lam[j]) / denom
    return dl, n


@wp.kernel
def bend_distance_color(x: wp.array(dtype=Any), w: wp.array(dtype=Any), rest: wp.array(dtype=Any),
                        alpha: wp.array(dtype=Any), lam: wp.array(dtype=Any), color: int, dt: Any,
                        x_out: wp.array(dtype=Any), lam_out: wp.array(dtype=Any)):
    """One colour ((j // 2) mod 2 == color) of the (i, i+2) distance bending constraints."""
    p = wp.tid()
    n_b = rest.shape[0]
    j = p - 2
    if (p // 2) % 2 == color:
        j = p
    xp = x[p]
    if j >= 0 and j < n_b:
        dl, n = bend_distance_dlambda(x, w, rest, alpha, lam, j, dt)
        if p == j:
            xp = xp - n * (w[p] * dl)
        else:
            xp = xp + n * (w[p] * dl)
    x_out[p] = xp
    if p < n_b:
        if (p // 2) % 2 == color:
            dl, n = bend_distance_dlambda(x, w, rest, alpha, lam, p, dt)
            lam_out[p] = lam[p] + dl
        else:
            lam_out[p] = lam[p]


@wp.func
def projector(t: Any, L: Any):
    """(I - t t^T) / L: the derivative of a unit tangent t = e / |e| w.r.t. e (|e| = L)."""
    one = type(L)(1.0)
    return (wp.diag(wp.vector(one, one, one)) - wp.outer(t, t)) / L


@wp.func
def bend_angle_dlambda(x: wp.array(dtype=Any), w: wp.array(dtype=Any), alpha: wp.array(dtype=Any),
                       lam: wp.array(dtype=Any), i: int, dt: Any):
    """Angle bending at interior particle i: C = t_b - t_a (3-vector), t_a, t_b the unit tangents of
    segments (i-1, i) and (i, i+1). Returns the multiplier increment and the Jacobians
    J_{i-1} = P_a, J_{i+1} = P_b, J_i = -(P_a + P_b) (symmetric 3x3)."""
    ta, la = segment(x, i - 1)
    tb, lb = segment(x, i)
    Pa = projector(ta, la)
    Pb = projector(tb, lb)
    Pc = -(Pa + Pb)
    at = alpha[i - 1] / (dt * dt)
    A = Pa @ Pa * w[i - 1] + Pc @ Pc * w[i] + Pb @ Pb * w[i + 1] + wp.diag(wp.vector(at, at, at))
    rhs = -(tb - ta) - lam[i - 1] * at
    dl = wp.inverse(A) @ rhs
    return dl, Pa, Pb, Pc


@wp.kernel
def bend_angle_color(x: wp.array(dtype=Any), w: wp.array(dtype=Any), alpha: wp.array(dtype=Any),
                     lam: wp.array(dtype=Any), color: int, dt: Any,
                     x_out: wp.array(dtype=Any), lam_out: wp.array(dtype=Any)):
    """One colour (i mod 3 == color) of the angle bending constraints, particle parallel.
    Multiplier k belongs to the joint at particle k + 1."""
    p = wp.tid()
    n = x.shape[0]
    # the joint of this colour touching p is the one of p - 1, p, p + 1 congruent to color mod 3
    i = p - 1 + ((color - (p - 1)) % 3 + 3) % 3
    xp = x[p]
    if i >= 1 and i <= n - 2:
        dl, Pa, Pb, Pc = bend_angle_dlambda(x, w, alpha, lam, i, dt)
        if p == i - 1:
            xp = xp + Pa @ dl * w[p]
        elif p == i:
            xp = xp + Pc @ dl * w[p]
        else:
            xp = xp + Pb @ dl * w[p]
    x_out[p] = xp
    if p >= 1 and p <= n - 2:
        if p % 3 == color:
            dl, Pa, Pb, Pc = bend_angle_dlambda(x, w, alpha, lam, p, dt)
            lam_out[p - 1] = lam[p - 1] + dl
        else:
            lam_out[p - 1] = lam[p - 1]


@wp.kernel
def finish(x: wp.array(dtype=Any), x_new: wp.array(dtype=Any), dt: Any, x_out: wp.array(dtype=Any),
           v_out: wp.array(dtype=Any)):
    """x' = x_new, v' = (x_new - x) / dt (pinned particles included: they moved to their target)."""
    i = wp.tid()
    xn = x_new[i]
    x_out[i] = xn
    v_out[i] = (xn - x[i]) / dt


# The concrete overloads by precision (launching them skips the per-launch type inference).
KERNELS: dict[str, dict[str, Any]] = {}
for _name, _s in (("float32", wp.float32), ("float64", wp.float64)):
    _v = wp.types.vector(3, _s)
    _a, _av, _i = wp.array(dtype=_s), wp.array(dtype=_v), wp.array(dtype=wp.int32)
    KERNELS[_name] = {
        "inverse_mass": wp.overload(inverse_mass, [_a, _i, _a]),
        "predict": wp.overload(predict, [_av, _av, _a, _av, _i, _av, _av, _a, _s, _av]),
        "stretch_color": wp.overload(stretch_color, [_av, _a, _a, _a, _a, int, _s, _av, _a]),
        "bend_distance_color": wp.overload(bend_distance_color, [_av, _a, _a, _a, _a, int, _s, _av, _a]),
        "bend_angle_color": wp.overload(bend_angle_color, [_av, _a, _a, _av, int, _s, _av, _av]),
        "finish": wp.overload(finish, [_av, _av, _s, _av, _av]),
    }
