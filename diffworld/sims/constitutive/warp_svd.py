"""Isotropic matrix functions of the SVD as Warp device functions, generic over float32/float64.

Every constitutive law evaluates its SVD-based parts through :func:`svd_iso`:
``svd_iso(F, kind, p0, p1) = U diag(g(sigma)) V^T`` for ``F = U diag(sigma) V^T``, where ``g`` is
one of a few isotropic functions of the singular values (:func:`iso_g`): the polar rotation
(``g = 1``), the first Piola stress of StVK with Hencky strain, the snow clamp, and the von Mises
and Drucker-Prager return maps on Hencky strain. Its adjoint is hand-written: Warp's ``svd3``
adjoint divides by ``s_i^2 - s_j^2`` and explodes near ``F = I``; ours uses the divided
differences ``(g_i - g_j)/(s_i - s_j)`` (replaced by their limit when singular values meet) and
``(g_i + g_j)/(s_i + s_j)``, both bounded.

Functions are generic (``typing.Any`` arguments, constants written ``type(x)(c)``): a kernel of
either precision instantiates them, so the MPM kernels and the FEM share one definition. Warp
accepts custom adjoints only on concrete signatures, so :func:`svd_iso` is two thin overloads
(float32, float64) over the generic :func:`svd_iso_value`, each with its ``func_grad``.
"""

from __future__ import annotations

from typing import Any

import warp as wp

__all__ = [
    "ISO_ROTATION", "ISO_HENCKY_PIOLA", "ISO_CLAMP", "ISO_VON_MISES", "ISO_DRUCKER_PRAGER", "LOG_CLAMP",
    "clamp_log", "cofactor", "iso_g", "polar_rotation", "polar_vjp", "svd_iso", "svd_iso_value",
    "svd_iso_vjp", "svd_iso_vjp_usv",
]

LOG_CLAMP = 0.05  # singular values are clamped to at least this before taking logs

# The isotropic functions g(sigma) of iso_g, by code.
ISO_ROTATION = wp.constant(0)  # polar rotation R = U V^T: g = 1
ISO_HENCKY_PIOLA = wp.constant(1)  # first Piola stress of StVK-Hencky; p0 = mu, p1 = lambda
ISO_CLAMP = wp.constant(2)  # clamp singular values to [p0, p1] (snow)
ISO_VON_MISES = wp.constant(3)  # return map onto the deviatoric radius p0 = tau_y / (2 mu)
ISO_DRUCKER_PRAGER = wp.constant(4)  # return map; p0 = alpha, p1 = (3 lam + 2 mu) / (2 mu)


@wp.func
def iso_tol(x: wp.float32):
    """Relative distance of singular values below which a divided difference takes its limit."""
    return wp.float32(1.0e-4)


@wp.func
def iso_tol(x: wp.float64):  # noqa: F811 - the float64 overload
    return wp.float64(1.0e-7)


@wp.func
def polar_tol(x: wp.float32):
    """Squared step at which the polar Newton iteration stops (its error is then ~step^2)."""
    return wp.float32(1.0e-8)


@wp.func
def polar_tol(x: wp.float64):  # noqa: F811 - the float64 overload
    return wp.float64(1.0e-18)


@wp.func
def clamp_log(s: Any):
    """log of a singular value clamped from below at LOG_CLAMP, and its derivative (0 where clamped)."""
    if s < type(s)(LOG_CLAMP):
        return wp.log(type(s)(LOG_CLAMP)), type(s)(0.0)
    return wp.log(s), type(s)(1.0) / s


@wp.func
def iso_g(kind: int, s: Any, p0: Any, p1: Any):
    """g(sigma), dg/dsigma (3x3), dg/dp0, dg/dp1 of the isotropic function ``kind`` (ISO_*)."""
    one = type(s)(type(p0)(1.0), type(p0)(1.0), type(p0)(1.0))
    zero = type(p0)(0.0)
    g = one
    J = wp.identity(n=3, dtype=type(p0)) * zero
    d0 = one * zero
    d1 = one * zero
    if kind == ISO_ROTATION:
        pass
    elif kind == ISO_HENCKY_PIOLA:  # g_i = (2 mu eps_i + lam tr eps) / s_i
        e0, q0 = clamp_log(s[0])
        e1, q1 = clamp_log(s[1])
        e2, q2 = clamp_log(s[2])
        eps = type(s)(e0, e1, e2)
        deps = type(s)(q0, q1, q2)
        tr = e0 + e1 + e2
        for i in range(3):
            num = type(p0)(2.0) * p0 * eps[i] + p1 * tr
            g[i] = num / s[i]
            d0[i] = type(p0)(2.0) * eps[i] / s[i]
            d1[i] = tr / s[i]
            for k in range(3):
                dnum = p1 * deps[k]
                if i == k:
                    dnum = dnum + type(p0)(2.0) * p0 * deps[k]
                    J[i, k] = dnum / s[i] - num / (s[i] * s[i])
                else:
                    J[i, k] = dnum / s[i]
    elif kind == ISO_CLAMP:
        for i in range(3):
            if s[i] < p0:
                g[i] = p0
                d0[i] = type(p0)(1.0)
            elif s[i] > p1:
                g[i] = p1
                d1[i] = type(p0)(1.0)
            else:
                g[i] = s[i]
                J[i, i] = type(p0)(1.0)
    else:  # return mappings on Hencky strain: ISO_VON_MISES, ISO_DRUCKER_PRAGER
        e0, q0 = clamp_log(s[0])
        e1, q1 = clamp_log(s[1])
        e2, q2 = clamp_log(s[2])
        eps = type(s)(e0, e1, e2)
        dlog = type(s)(q0, q1, q2)
        tr = e0 + e1 + e2
        dev = eps - one * (tr / type(p0)(3.0))
        ndev = wp.length(dev)
        # dE = d eps_new / d eps; by default eps_new = eps (no projection)
        dE = wp.identity(n=3, dtype=type(p0))
        enew = eps
        if kind == ISO_VON_MISES:
            if ndev > p0:
                nhat = dev / ndev
                enew = one * (tr / type(p0)(3.0)) + nhat * p0
                P = wp.identity(n=3, dtype=type(p0)) - wp.outer(one, one) / type(p0)(3.0)
                dE = wp.outer(one, one) / type(p0)(3.0) + (P - wp.outer(nhat, nhat)) * (p0 / ndev)
                d0 = nhat
        else:
            if tr >= zero:
                enew = one * zero
                dE = dE * zero
            else:
                dgam = ndev + p1 * tr * p0
                if dgam > zero and ndev > zero:
                    nhat = dev / ndev
                    P = wp.identity(n=3, dtype=type(p0)) - wp.outer(one, one) / type(p0)(3.0)
                    enew = one * (tr / type(p0)(3.0)) - nhat * (p1 * p0 * tr)
                    dE = wp.outer(one, one) / type(p0)(3.0) - (
                        wp.outer(nhat, one) + (P - wp.outer(nhat, nhat)) * (tr / ndev)) * (p1 * p0)
                    d0 = -nhat * (p1 * tr)
                    d1 = -nhat * (p0 * tr)
        for i in range(3):
            g[i] = wp.exp(enew[i])
            d0[i] = g[i] * d0[i]
            d1[i] = g[i] * d1[i]
            for k in range(3):
                J[i, k] = g[i] * dE[i, k] * dlog[k]
    return g, J, d0, d1


@wp.func
def cofactor(F: Any):
    """d det(F) / dF (the cofactor matrix, J F^-T), well defined for singular F."""
    return type(F)(F[1, 1] * F[2, 2] - F[1, 2] * F[2, 1], F[1, 2] * F[2, 0] - F[1, 0] * F[2, 2],
                   F[1, 0] * F[2, 1] - F[1, 1] * F[2, 0],
                   F[0, 2] * F[2, 1] - F[0, 1] * F[2, 2], F[0, 0] * F[2, 2] - F[0, 2] * F[2, 0],
                   F[0, 1] * F[2, 0] - F[0, 0] * F[2, 1],
                   F[0, 1] * F[1, 2] - F[0, 2] * F[1, 1], F[0, 2] * F[1, 0] - F[0, 0] * F[1, 2],
                   F[0, 0] * F[1, 1] - F[0, 1] * F[1, 0])


@wp.func
def polar_rotation(F: Any):
    """Rotation R of the polar decomposition F = R S (det F > 0), by Higham's Newton iteration
    R <- (g R + R^-T / g) / 2 with Frobenius-norm scaling g: about 3x cheaper than Warp's svd3,
    and converged to rounding (quadratic convergence; 3 or 4 iterations near F = I)."""
    R = F
    it = int(0)
    d = type(F[0, 0])(1.0)
    tol = polar_tol(d)
    while it < 20 and d > tol:
        Rit = cofactor(R) / wp.determinant(R)
        g = wp.sqrt(wp.sqrt(wp.ddot(Rit, Rit) / wp.ddot(R, R)))
        Rn = (R * g + Rit / g) * type(d)(0.5)
        d = wp.ddot(Rn - R, Rn - R)
        R = Rn
        it += 1
    return R


@wp.func
def svd_iso_value(F: Any, kind: int, p0: Any, p1: Any):
    """U diag(g(sigma)) V^T for F = U diag(sigma) V^T (generic; kernels call :func:`svd_iso`)."""
    if kind == ISO_ROTATION and wp.determinant(F) > type(p0)(1.0e-2):
        # The rotation alone: a Newton iteration instead of the SVD (same value to rounding;
        # the adjoint still uses the SVD).
        return polar_rotation(F)
    U = F * type(p0)(0.0)
    s = type(p0)(0.0) * wp.vector(type(p0)(1.0), type(p0)(1.0), type(p0)(1.0))
    V = F * type(p0)(0.0)
    wp.svd3(F, U, s, V)
    g, J, d0, d1 = iso_g(kind, s, p0, p1)
    return U * wp.diag(g) * wp.transpose(V)


@wp.func
def divided_differences(gi: Any, gj: Any, si: Any, sj: Any, Jii: Any, Jij: Any):
    """(g_i - g_j)/(s_i - s_j), or its limit J_ii - J_ij when s_i ~ s_j; and (g_i + g_j)/(s_i + s_j)."""
    scale = wp.max(wp.abs(si) + wp.abs(sj), type(si)(1.0e-12))
    a = Jii - Jij
    if wp.abs(si - sj) > iso_tol(si) * scale:
        a = (gi - gj) / (si - sj)
    den = si + sj
    if wp.abs(den) < type(si)(1.0e-12):
        den = type(si)(1.0e-12)
    return a, (gi + gj) / den


@wp.func
def svd_iso_vjp_usv(U: Any, s: Any, V: Any, kind: int, p0: Any, p1: Any, adj_ret: Any):
    """Vector-Jacobian product of :func:`svd_iso` at F = U diag(s) V^T: (d/dF, d/dp0, d/dp1) of
    <adj_ret, svd_iso>, and the value svd_iso(F, kind, p0, p1) itself."""
    g, J, d0, d1 = iso_g(kind, s, p0, p1)
    M = wp.transpose(U) * adj_ret * V
    diag = type(s)(M[0, 0], M[1, 1], M[2, 2])
    K = M * type(p0)(0.0)
    sbar = wp.transpose(J) * diag
    for i in range(3):
        K[i, i] = sbar[i]
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = divided_differences(g[i], g[j], s[i], s[j], J[i, i], J[i, j])
            sym = (M[i, j] + M[j, i]) * type(p0)(0.5)
            skw = (M[i, j] - M[j, i]) * type(p0)(0.5)
            K[i, j] = a * sym + b * skw
            K[j, i] = a * sym - b * skw
    return U * K * wp.transpose(V), wp.dot(d0, diag), wp.dot(d1, diag), U * wp.diag(g) * wp.transpose(V)


@wp.func
def svd_iso_vjp(F: Any, kind: int, p0: Any, p1: Any, adj_ret: Any):
    """:func:`svd_iso_vjp_usv` with the SVD of F computed here."""
    U = F * type(p0)(0.0)
    s = type(p0)(0.0) * wp.vector(type(p0)(1.0), type(p0)(1.0), type(p0)(1.0))
    V = F * type(p0)(0.0)
    wp.svd3(F, U, s, V)
    gF, g0, g1, val = svd_iso_vjp_usv(U, s, V, kind, p0, p1, adj_ret)
    return gF, g0, g1, val


@wp.func
def polar_vjp(F: Any, G: Any):
    """Adjoint of the polar rotation R(F) for det F > 0 without an SVD, and R itself.

    With F = R S: R^T dF - dF^T R = [(tr(S) 1 - S) w]_x for dR = R [w]_x, so
    <G, dR> = <R [y]_x, dF> with y = (tr(S) 1 - S)^-1 ax(R^T G), ax(A) = (A21 - A12, ...)
    (eigenvalues of tr(S) 1 - S are s_i + s_j > 0: bounded). Falls back to the SVD for
    nearly singular or inverted F, like svd_iso.
    """
    zero = type(F[0, 0])(0.0)
    if wp.determinant(F) > type(zero)(1.0e-2):
        R = polar_rotation(F)
        S = wp.transpose(R) * F
        S = (S + wp.transpose(S)) * type(zero)(0.5)
        T = wp.identity(n=3, dtype=type(zero)) * (S[0, 0] + S[1, 1] + S[2, 2]) - S
        M = wp.transpose(R) * G
        b = wp.vector(M[2, 1] - M[1, 2], M[0, 2] - M[2, 0], M[1, 0] - M[0, 1])
        y = wp.inverse(T) * b
        Y = type(F)(zero, -y[2], y[1], y[2], zero, -y[0], -y[1], y[0], zero)
        return R * Y, R
    gF, g0, g1, R = svd_iso_vjp(F, ISO_ROTATION, zero, zero, G)
    return gF, R


_m33f = wp.types.matrix((3, 3), wp.float32)
_m33d = wp.types.matrix((3, 3), wp.float64)


@wp.func
def svd_iso(F: _m33f, kind: int, p0: wp.float32, p1: wp.float32):
    """:func:`svd_iso_value` with the hand-written adjoint (float32 overload)."""
    return svd_iso_value(F, kind, p0, p1)


@wp.func
def svd_iso(F: _m33d, kind: int, p0: wp.float64, p1: wp.float64):  # noqa: F811 - the float64 overload
    """:func:`svd_iso_value` with the hand-written adjoint (float64 overload)."""
    return svd_iso_value(F, kind, p0, p1)


@wp.func_grad(svd_iso)
def _svd_iso_grad_f32(F: _m33f, kind: int, p0: wp.float32, p1: wp.float32, adj_ret: _m33f):
    gF, g0, g1, val = svd_iso_vjp(F, kind, p0, p1, adj_ret)
    wp.adjoint[F] += gF
    wp.adjoint[p0] += g0
    wp.adjoint[p1] += g1


@wp.func_grad(svd_iso)
def _svd_iso_grad_f64(F: _m33d, kind: int, p0: wp.float64, p1: wp.float64, adj_ret: _m33d):
    gF, g0, g1, val = svd_iso_vjp(F, kind, p0, p1, adj_ret)
    wp.adjoint[F] += gF
    wp.adjoint[p0] += g0
    wp.adjoint[p1] += g1
