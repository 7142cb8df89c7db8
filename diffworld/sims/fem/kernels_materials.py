"""FEM hyperelastic materials as Warp device functions and kernels, generic over float32/float64.

Each law gives, for a deformation gradient ``F`` (3x3) and the Lame parameters ``mu``, ``lam``
[Pa] of the element's Young's modulus and Poisson's ratio (:func:`warp_laws.lame`):

* the energy density ``psi(F)`` [J/m^3] (:func:`energy`), zero at rest;
* the first Piola stress ``P = dpsi/dF`` [Pa] (:func:`first_piola`, with a hand-written adjoint
  registered for Warp's automatic differentiation);
* its differential ``dP = dP/dF : dF`` (:func:`first_piola_diff`), what an implicit Newton/CG
  solve applies to a search direction; exact for every law, hence indefinite where the energy is
  not convex (strong compression, inversion): no definiteness fix is applied here, a Newton
  solver needs its own (line search, or projection of the element Hessian);
* its vector-Jacobian product (:func:`first_piola_vjp`): ``(d/dF, d/dmu, d/dlam) <G, P>``.

Two facts keep the adjoints small. ``P`` is linear in ``(mu, lam)``: ``P = mu A(F) + lam B(F)``,
so ``d<G, P>/dmu = <G, A>`` and ``d<G, P>/dlam = <G, B>``. And ``dP/dF`` is the Hessian of
``psi``, a symmetric linear map, so the VJP in ``F`` is the differential applied to ``G``:
``d<G, P>/dF = dP(F, G)``; one function serves the Newton solve and the adjoint.

Laws (codes: the ``code`` of :data:`diffworld.sims.fem.materials.FEM_MATERIALS`):

* ``STABLE_NEO_HOOKEAN`` (Smith, de Goes, Kim 2018, "Stable Neo-Hookean Flesh Simulation", their
  final energy with the Lame reparametrization of their section 3.4): with ``mu_s = 4/3 mu``,
  ``lam_s = lam + 5/6 mu`` and ``alpha = 1 + 3 mu_s / (4 lam_s)``,
  ``psi = mu_s/2 (I_C - 3) + lam_s/2 (J - alpha)^2 - mu_s/2 log(I_C + 1) - c``, ``I_C = |F|^2``,
  ``P = mu_s (1 - 1/(I_C + 1)) F + lam_s (J - alpha) cof(F)``. The reparametrization makes its
  small-strain response equal to :data:`LINEAR` with the same ``E``, ``nu``. The constant ``c``
  makes ``psi(I) = 0``; written without it, ``psi = mu_s/2 (I_C - 3) + lam_s/2 (J - 1)^2
  - mu (J - 1) - mu_s/2 log((I_C + 1)/4)``: no division, no ``log(J)``, finite and smooth for
  inverted ``F`` (``J <= 0``).
* ``FIXED_COROTATED`` (Stomakhin et al. 2012): ``psi = mu |F - R|^2 + lam/2 (J - 1)^2``,
  ``P = 2 mu (F - R) + lam (J - 1) cof(F)``, ``R`` the rotation of the polar decomposition with the
  sign fix (``R = U V^T`` of the rotation-variant SVD, so ``det R = 1`` also for ``J <= 0``). Its
  differential needs ``dR``: with ``F = R S``, ``dR = R [w]_x``, ``(tr(S) I - S) w =
  ax(R^T dF - dF^T R)`` (bounded while singular values do not sum to zero; for inverted ``F``
  with ``s_i + s_j -> 0`` it grows like the true derivative, ``1/(s_i + s_j)``).
* ``LINEAR`` (small strain): ``psi = mu eps:eps + lam/2 tr(eps)^2``, ``eps = sym(F) - I``,
  ``P = 2 mu eps + lam tr(eps) I`` (not rotation invariant: small rotations only).

Kernels (one Warp module, both precisions declared as overloads: one compile, one cache entry);
per element ``e``: ``law[e]`` (int32 code), ``F[e]``, ``E[e]`` [Pa], ``nu[e]``. Lame parameters are
computed inside the kernels so that gradients reach ``E`` and ``nu``:

    energy_kernel       law, F, E, nu          -> psi
    first_piola_kernel  law, F, E, nu          -> P        (its Warp adjoint is the hand-written VJP)
    dP_kernel           law, F, dF, E, nu      -> dP
    vjp_kernel          law, F, E, nu, G       -> dF, dmu, dlam, dE, dnu of <G, P>
"""

from __future__ import annotations

from typing import Any

import warp as wp

from diffworld.sims.constitutive.warp_laws import lame, lame_vjp, zeros33
from diffworld.sims.constitutive.warp_svd import ISO_ROTATION, cofactor, polar_vjp, svd_iso

__all__ = [
    "STABLE_NEO_HOOKEAN", "FIXED_COROTATED", "LINEAR",
    "cofactor_diff", "det_minus_one", "energy", "first_piola", "first_piola_diff", "first_piola_diff_parts", "first_piola_parts",
    "first_piola_value", "first_piola_vjp", "ic_minus_three", "log1p", "rotation", "stable_neo_hookean_lame",
    "energy_kernel", "first_piola_kernel", "dP_kernel", "vjp_kernel",
]

STABLE_NEO_HOOKEAN = wp.constant(0)
FIXED_COROTATED = wp.constant(1)
LINEAR = wp.constant(2)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

@wp.func
def cross_rows(A: Any, B: Any, i: int, j: int):
    """Row i of A crossed with row j of B (a 3-vector)."""
    a = wp.vector(A[i, 0], A[i, 1], A[i, 2])
    b = wp.vector(B[j, 0], B[j, 1], B[j, 2])
    return wp.cross(a, b)


@wp.func
def cofactor_diff(F: Any, dF: Any):
    """Differential of the cofactor matrix, d cof(F)[dF] (the Hessian of det F applied to dF).

    Row i of cof(F) is f_j x f_k for the rows f of F, (i, j, k) cyclic, so its differential is
    df_j x f_k + f_j x df_k: exact, and free of the cancellation of differencing cof(F +- dF).
    """
    r0 = cross_rows(dF, F, 1, 2) + cross_rows(F, dF, 1, 2)
    r1 = cross_rows(dF, F, 2, 0) + cross_rows(F, dF, 2, 0)
    r2 = cross_rows(dF, F, 0, 1) + cross_rows(F, dF, 0, 1)
    return type(F)(r0[0], r0[1], r0[2], r1[0], r1[1], r1[2], r2[0], r2[1], r2[2])


@wp.func
def trace3(A: Any):
    return A[0, 0] + A[1, 1] + A[2, 2]


@wp.func
def det_minus_one(F: Any):
    """det(F) - 1 as tr H + I2(H) + det H with H = F - I: near rest its terms are small, so it
    keeps full relative accuracy where det(F) - 1 would lose it to cancellation."""
    H = F - wp.identity(n=3, dtype=type(F[0, 0]))
    i2 = (H[0, 0] * H[1, 1] - H[0, 1] * H[1, 0] + H[0, 0] * H[2, 2] - H[0, 2] * H[2, 0]
          + H[1, 1] * H[2, 2] - H[1, 2] * H[2, 1])
    return trace3(H) + i2 + wp.determinant(H)


@wp.func
def ic_minus_three(F: Any):
    """tr(F^T F) - 3 as |H|^2 + 2 tr H, H = F - I (accurate near rest, like det_minus_one)."""
    H = F - wp.identity(n=3, dtype=type(F[0, 0]))
    return wp.ddot(H, H) + type(F[0, 0])(2.0) * trace3(H)


@wp.func
def log1p(y: Any):
    """log(1 + y), accurate for small y (Goldberg's trick: Warp has no log1p)."""
    u = type(y)(1.0) + y
    r = y
    if u != type(y)(1.0):
        r = wp.log(u) * y / (u - type(y)(1.0))
    return r


@wp.func
def stable_neo_hookean_lame(mu: Any, lam: Any):
    """The constants (mu_s, lam_s) of Smith et al.'s energy that give Lame (mu, lam) at small
    strain: mu_s = 4/3 mu, lam_s = lam + 5/6 mu (their section 3.4)."""
    # Typed divisions: a literal quotient like 4.0 / 3.0 is evaluated in float32 by Warp.
    return mu * type(mu)(4.0) / type(mu)(3.0), lam + mu * type(mu)(5.0) / type(mu)(6.0)


@wp.func
def rotation(F: Any):
    """Polar rotation of F with the sign fix (det R = 1, also for inverted F)."""
    return svd_iso(F, ISO_ROTATION, type(F[0, 0])(0.0), type(F[0, 0])(0.0))


# ------------------------------------------------------------------------------------------------
# Energies psi(F) [J/m^3]
# ------------------------------------------------------------------------------------------------

@wp.func
def energy(law: int, F: Any, mu: Any, lam: Any):
    """Energy density psi(F) [J/m^3] of law ``law`` (zero at F = I)."""
    half = type(mu)(0.5)
    Jm1 = det_minus_one(F)
    psi = type(mu)(0.0)
    if law == STABLE_NEO_HOOKEAN:
        # first-order terms cancel at rest: (I_C - 3) and (J - 1) come from F - I, log from log1p
        ms, ls = stable_neo_hookean_lame(mu, lam)
        x = ic_minus_three(F)
        psi = ms * half * (x - log1p(x / type(mu)(4.0))) + ls * half * Jm1 * Jm1 - mu * Jm1
    elif law == FIXED_COROTATED:
        D = F - rotation(F)
        psi = mu * wp.ddot(D, D) + lam * half * Jm1 * Jm1
    elif law == LINEAR:
        eps = (F + wp.transpose(F)) * type(mu)(0.5) - wp.identity(n=3, dtype=type(mu))
        tr = trace3(eps)
        psi = mu * wp.ddot(eps, eps) + lam * type(mu)(0.5) * tr * tr
    return psi


# ------------------------------------------------------------------------------------------------
# First Piola stress P = mu A(F) + lam B(F) [Pa]
# ------------------------------------------------------------------------------------------------

@wp.func
def first_piola_parts(law: int, F: Any):
    """(A, B) with P = mu A(F) + lam B(F): every law's stress is linear in its Lame parameters."""
    one = type(F[0, 0])(1.0)
    A = zeros33(one)
    B = zeros33(one)
    if law == STABLE_NEO_HOOKEAN:
        # mu_s (1 - 1/(Ic + 1)) F + (lam_s (J - 1) - mu) cof, with mu_s = 4/3 mu, lam_s = lam + 5/6 mu
        C = cofactor(F)
        Jm1 = det_minus_one(F)
        A = F * (type(one)(4.0) / type(one)(3.0) * (one - one / (wp.ddot(F, F) + one))) + C * (
            type(one)(5.0) / type(one)(6.0) * Jm1 - one)
        B = C * Jm1
    elif law == FIXED_COROTATED:
        A = (F - rotation(F)) * type(one)(2.0)
        B = cofactor(F) * det_minus_one(F)
    elif law == LINEAR:
        I = wp.identity(n=3, dtype=type(one))
        eps = (F + wp.transpose(F)) * type(one)(0.5) - I
        A = eps * type(one)(2.0)
        B = I * trace3(eps)
    return A, B


@wp.func
def first_piola_value(law: int, F: Any, mu: Any, lam: Any):
    """First Piola stress P(F) [Pa] (generic; kernels call :func:`first_piola`)."""
    A, B = first_piola_parts(law, F)
    return A * mu + B * lam


# ------------------------------------------------------------------------------------------------
# Differential dP = dP/dF : dF and the vector-Jacobian product
# ------------------------------------------------------------------------------------------------

@wp.func
def first_piola_diff_parts(law: int, F: Any, dF: Any, mu: Any, lam: Any):
    """dP/dF : dF [Pa] and the parts (A, B) of P = mu A + lam B, sharing the polar rotation."""
    one = type(mu)(1.0)
    dP = zeros33(mu)
    A = zeros33(mu)
    B = zeros33(mu)
    if law == STABLE_NEO_HOOKEAN:
        ms, ls = stable_neo_hookean_lame(mu, lam)
        C = cofactor(F)
        Jm1 = det_minus_one(F)
        q = one / (wp.ddot(F, F) + one)
        dP = (dF * (ms * (one - q)) + F * (type(mu)(2.0) * ms * q * q * wp.ddot(F, dF))
              + C * (ls * wp.ddot(C, dF)) + cofactor_diff(F, dF) * (ls * Jm1 - mu))
        A = F * (type(mu)(4.0) / type(mu)(3.0) * (one - q)) + C * (type(mu)(5.0) / type(mu)(6.0) * Jm1 - one)
        B = C * Jm1
    elif law == FIXED_COROTATED:
        # dR[dF]: the adjoint of the polar rotation is its differential (dR/dF is the Hessian of
        # the sum of signed singular values, so symmetric); polar_vjp falls back to the SVD for
        # nearly singular or inverted F, and returns R as well.
        dR, R = polar_vjp(F, dF)
        C = cofactor(F)
        Jm1 = det_minus_one(F)
        dP = (dF - dR) * (type(mu)(2.0) * mu) + C * (lam * wp.ddot(C, dF)) + cofactor_diff(F, dF) * (lam * Jm1)
        A = (F - R) * type(mu)(2.0)
        B = C * Jm1
    elif law == LINEAR:
        I = wp.identity(n=3, dtype=type(mu))
        eps = (F + wp.transpose(F)) * type(mu)(0.5) - I
        dP = (dF + wp.transpose(dF)) * mu + I * (lam * trace3(dF))
        A = eps * type(mu)(2.0)
        B = I * trace3(eps)
    return dP, A, B


@wp.func
def first_piola_diff(law: int, F: Any, dF: Any, mu: Any, lam: Any):
    """dP/dF : dF [Pa]: exact, the Hessian of psi applied to dF (a symmetric map of dF)."""
    dP, A, B = first_piola_diff_parts(law, F, dF, mu, lam)
    return dP


@wp.func
def first_piola_vjp(law: int, F: Any, mu: Any, lam: Any, G: Any):
    """(d/dF, d/dmu, d/dlam) of <G, P(F, mu, lam)>: dP(F, G) by the symmetry of the Hessian, and
    <G, A>, <G, B> of the parts P = mu A + lam B."""
    dP, A, B = first_piola_diff_parts(law, F, G, mu, lam)
    return dP, wp.ddot(G, A), wp.ddot(G, B)


_m33f = wp.types.matrix((3, 3), wp.float32)
_m33d = wp.types.matrix((3, 3), wp.float64)


@wp.func
def first_piola(law: int, F: _m33f, mu: wp.float32, lam: wp.float32):
    """:func:`first_piola_value` with the hand-written adjoint (float32 overload)."""
    return first_piola_value(law, F, mu, lam)


@wp.func
def first_piola(law: int, F: _m33d, mu: wp.float64, lam: wp.float64):  # noqa: F811 - the float64 overload
    """:func:`first_piola_value` with the hand-written adjoint (float64 overload)."""
    return first_piola_value(law, F, mu, lam)


@wp.func_grad(first_piola)
def _first_piola_grad_f32(law: int, F: _m33f, mu: wp.float32, lam: wp.float32, adj_ret: _m33f):
    gF, gmu, glam = first_piola_vjp(law, F, mu, lam, adj_ret)
    wp.adjoint[F] += gF
    wp.adjoint[mu] += gmu
    wp.adjoint[lam] += glam


@wp.func_grad(first_piola)
def _first_piola_grad_f64(law: int, F: _m33d, mu: wp.float64, lam: wp.float64, adj_ret: _m33d):
    gF, gmu, glam = first_piola_vjp(law, F, mu, lam, adj_ret)
    wp.adjoint[F] += gF
    wp.adjoint[mu] += gmu
    wp.adjoint[lam] += glam


# ------------------------------------------------------------------------------------------------
# Kernels (per element); both precisions are declared below
# ------------------------------------------------------------------------------------------------

@wp.kernel(enable_backward=False)
def energy_kernel(law: wp.array(dtype=wp.int32), F: wp.array(dtype=Any), E: wp.array(dtype=Any),
                  nu: wp.array(dtype=Any), psi: wp.array(dtype=Any)):
    """psi[e] = energy(law[e], F[e], lame(E[e], nu[e])) [J/m^3]."""
    e = wp.tid()
    mu, lam = lame(E[e], nu[e])
    psi[e] = energy(law[e], F[e], mu, lam)


@wp.kernel
def first_piola_kernel(law: wp.array(dtype=wp.int32), F: wp.array(dtype=Any), E: wp.array(dtype=Any),
                       nu: wp.array(dtype=Any), P: wp.array(dtype=Any)):
    """P[e] = first_piola(law[e], F[e], lame(E[e], nu[e])) [Pa]; its adjoint launch uses the
    hand-written VJP."""
    e = wp.tid()
    mu, lam = lame(E[e], nu[e])
    P[e] = first_piola(law[e], F[e], mu, lam)


@wp.kernel(enable_backward=False)
def dP_kernel(law: wp.array(dtype=wp.int32), F: wp.array(dtype=Any), dF: wp.array(dtype=Any),
              E: wp.array(dtype=Any), nu: wp.array(dtype=Any), dP: wp.array(dtype=Any)):
    """dP[e] = dP/dF(F[e]) : dF[e] [Pa]."""
    e = wp.tid()
    mu, lam = lame(E[e], nu[e])
    dP[e] = first_piola_diff(law[e], F[e], dF[e], mu, lam)


@wp.kernel(enable_backward=False)
def vjp_kernel(law: wp.array(dtype=wp.int32), F: wp.array(dtype=Any), E: wp.array(dtype=Any),
               nu: wp.array(dtype=Any), G: wp.array(dtype=Any), gF: wp.array(dtype=Any), gmu: wp.array(dtype=Any),
               glam: wp.array(dtype=Any), gE: wp.array(dtype=Any), gnu: wp.array(dtype=Any)):
    """Gradients of <G[e], P[e]> w.r.t. F[e], mu[e], lam[e] and (through lame) E[e], nu[e]."""
    e = wp.tid()
    mu, lam = lame(E[e], nu[e])
    a, b, c = first_piola_vjp(law[e], F[e], mu, lam, G[e])
    gF[e] = a
    gmu[e] = b
    glam[e] = c
    dE, dnu = lame_vjp(E[e], nu[e], b, c)
    gE[e] = dE
    gnu[e] = dnu


for _s, _m in ((wp.float32, _m33f), (wp.float64, _m33d)):
    _a = wp.array(dtype=_s)
    _am = wp.array(dtype=_m)
    _law = wp.array(dtype=wp.int32)
    wp.overload(energy_kernel, [_law, _am, _a, _a, _a])
    wp.overload(first_piola_kernel, [_law, _am, _a, _a, _am])
    wp.overload(dP_kernel, [_law, _am, _am, _a, _a, _am])
    wp.overload(vjp_kernel, [_law, _am, _a, _a, _am, _am, _a, _a, _a, _a])
