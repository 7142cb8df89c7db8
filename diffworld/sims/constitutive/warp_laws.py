"""The built-in constitutive laws as Warp device functions, generic over float32/float64.

Each law has its elastic Kirchhoff stress ``tau = P F^T`` [Pa] (``*_stress``) and, if plastic, its
return map of a trial deformation gradient (``*_project``). The dispatchers below select a law by
its code (the ``code`` of :data:`diffworld.sims.constitutive.laws.LAWS`), which is what a kernel
with one law per particle calls; they also hold the fused forms the MPM substep uses (stress and
projection from one SVD) and the hand-written adjoints (d/dF and d/d(material parameters)).

Material parameters arrive as Young's modulus ``E`` [Pa] and Poisson's ratio ``nu``, plus the
plastic ones (``yield_stress`` [Pa], ``friction_angle`` [rad], ``theta_c``, ``theta_s``).
"""

from __future__ import annotations

import math
from typing import Any

import warp as wp

from diffworld.sims.constitutive.warp_svd import (ISO_CLAMP, ISO_DRUCKER_PRAGER, ISO_HENCKY_PIOLA, ISO_ROTATION,
                                                  ISO_VON_MISES, clamp_log, cofactor, iso_g, polar_vjp, svd_iso,
                                                  svd_iso_vjp_usv)

__all__ = [
    "FLUID", "COROTATED", "NEO_HOOKEAN", "SNOW", "VON_MISES", "DRUCKER_PRAGER", "RIGID", "EXTERNAL",
    "lame", "lame_vjp", "fluid_stress", "corotated_stress", "neo_hookean_stress", "hencky_stress",
    "fluid_project", "kirchhoff_stress", "kirchhoff_usv", "kirchhoff_vjp", "kirchhoff_vjp_usv", "needs_svd",
    "plastic_iso", "project", "project_usv", "project_vjp_usv", "viscous_stress",
]

# Law codes (one per particle in the MPM). EXTERNAL marks particles whose law is evaluated
# outside Warp (a torch module, diffworld.sims.constitutive.torch_law): every function here gives
# them zero stress, an identity return map and zero adjoints, and the caller fills their rows.
FLUID = wp.constant(0)
COROTATED = wp.constant(1)
NEO_HOOKEAN = wp.constant(2)
SNOW = wp.constant(3)
VON_MISES = wp.constant(4)
DRUCKER_PRAGER = wp.constant(5)
RIGID = wp.constant(6)
EXTERNAL = wp.constant(7)


# ------------------------------------------------------------------------------------------------
# Elasticity
# ------------------------------------------------------------------------------------------------

@wp.func
def zeros33(x: Any):
    """The 3x3 zero matrix of x's scalar type."""
    return wp.identity(n=3, dtype=type(x)) * type(x)(0.0)


@wp.func
def lame(E: Any, nu: Any):
    """Lame parameters (mu, lambda) [Pa] from Young's modulus [Pa] and Poisson's ratio."""
    one = type(E)(1.0)
    mu = E / (type(E)(2.0) * (one + nu))
    lam = E * nu / ((one + nu) * (one - type(E)(2.0) * nu))
    return mu, lam


@wp.func
def lame_vjp(E: Any, nu: Any, g_mu: Any, g_lam: Any):
    """(d/dE, d/dnu) of g_mu mu(E, nu) + g_lam lam(E, nu)."""
    a = type(E)(1.0) + nu
    b = type(E)(1.0) - type(E)(2.0) * nu
    dmu_dE = type(E)(0.5) / a
    dmu_dnu = -E * type(E)(0.5) / (a * a)
    dlam_dE = nu / (a * b)
    dlam_dnu = E * (type(E)(1.0) + type(E)(2.0) * nu * nu) / (a * a * b * b)
    return g_mu * dmu_dE + g_lam * dlam_dE, g_mu * dmu_dnu + g_lam * dlam_dnu


@wp.func
def fluid_stress(F: Any, mu: Any, lam: Any):
    """Weakly compressible fluid, psi = lam/2 (J - 1)^2: tau = lam J (J - 1) I."""
    J = wp.determinant(F)
    return wp.identity(n=3, dtype=type(mu)) * (lam * J * (J - type(mu)(1.0)))


@wp.func
def corotated_stress(F: Any, mu: Any, lam: Any):
    """Fixed corotated (Stomakhin et al. 2012): tau = 2 mu (F - R) F^T + lam J (J - 1) I."""
    J = wp.determinant(F)
    R = svd_iso(F, ISO_ROTATION, type(mu)(0.0), type(mu)(0.0))
    return (F - R) * wp.transpose(F) * (type(mu)(2.0) * mu) + wp.identity(n=3, dtype=type(mu)) * (
        lam * J * (J - type(mu)(1.0)))


@wp.func
def neo_hookean_stress(F: Any, mu: Any, lam: Any):
    """Compressible Neo-Hookean: tau = mu (F F^T - I) + lam log(J) I."""
    J = wp.determinant(F)
    I = wp.identity(n=3, dtype=type(mu))
    return (F * wp.transpose(F) - I) * mu + I * (lam * wp.log(J))


@wp.func
def hencky_stress(F: Any, mu: Any, lam: Any):
    """StVK with Hencky strain eps = log(sigma) (plasticine, sand): tau = P F^T,
    P = U diag((2 mu eps + lam tr eps) / sigma) V^T."""
    P = svd_iso(F, ISO_HENCKY_PIOLA, mu, lam)
    return P * wp.transpose(F)


@wp.func
def kirchhoff_stress(law: int, F: Any, E: Any, nu: Any):
    """Elastic Kirchhoff stress tau = P F^T [Pa] of law ``law``."""
    mu, lam = lame(E, nu)
    tau = zeros33(E)
    if law == FLUID:
        tau = fluid_stress(F, mu, lam)
    elif law == COROTATED or law == SNOW:  # snow: fixed corotated on the elastic part
        tau = corotated_stress(F, mu, lam)
    elif law == NEO_HOOKEAN:
        tau = neo_hookean_stress(F, mu, lam)
    elif law == VON_MISES or law == DRUCKER_PRAGER:
        tau = hencky_stress(F, mu, lam)
    # RIGID: no stress (the rigid projection after G2P keeps F = I); EXTERNAL: filled by the caller.
    return tau


@wp.func
def viscous_stress(C: Any, F: Any, eta: Any):
    """Newtonian viscous Kirchhoff stress J 2 eta dev(sym(grad v)); grad v ~ C (APIC)."""
    D = (C + wp.transpose(C)) * type(eta)(0.5)
    tr = D[0, 0] + D[1, 1] + D[2, 2]
    dev = D - wp.identity(n=3, dtype=type(eta)) * (tr / type(eta)(3.0))
    return dev * (type(eta)(2.0) * eta * wp.determinant(F))


# ------------------------------------------------------------------------------------------------
# Plasticity (return maps)
# ------------------------------------------------------------------------------------------------

@wp.func
def fluid_project(F: Any):
    """Fluids keep no shear memory: F <- J^(1/3) I."""
    J = wp.determinant(F)
    return wp.identity(n=3, dtype=type(J)) * wp.pow(J, type(J)(1.0) / type(J)(3.0))


@wp.func
def plastic_iso(law: int, E: Any, nu: Any, yield_stress: Any, friction_angle: Any, theta_c: Any, theta_s: Any):
    """The isotropic function (kind, p0, p1) of :func:`~diffworld.sims.constitutive.warp_svd.iso_g`
    whose SVD form is the return map of the plastic law ``law`` (SNOW, VON_MISES, DRUCKER_PRAGER)."""
    kind = int(ISO_CLAMP)  # snow: clamp singular values to [1 - theta_c, 1 + theta_s]
    p0 = type(E)(1.0) - theta_c
    p1 = type(E)(1.0) + theta_s
    if law == VON_MISES:  # radius tau_y / (2 mu) of the deviatoric yield surface
        mu, lam = lame(E, nu)
        kind = ISO_VON_MISES
        p0 = yield_stress / (type(E)(2.0) * mu)
        p1 = type(E)(0.0)
    elif law == DRUCKER_PRAGER:  # Klar et al. 2016: alpha and (3 lam + 2 mu) / (2 mu)
        sphi = wp.sin(friction_angle)
        kind = ISO_DRUCKER_PRAGER
        p0 = type(E)(math.sqrt(2.0 / 3.0)) * type(E)(2.0) * sphi / (type(E)(3.0) - sphi)
        p1 = (type(E)(1.0) + nu) / (type(E)(1.0) - type(E)(2.0) * nu)
    return kind, p0, p1


@wp.func
def needs_svd(law: int):
    """Whether the fused forms read the SVD of F (the laws whose return map is an SVD form)."""
    return law == SNOW or law == VON_MISES or law == DRUCKER_PRAGER


@wp.func
def project(law: int, F: Any, E: Any, nu: Any, yield_stress: Any, friction_angle: Any, theta_c: Any, theta_s: Any):
    """Plastic projection of a trial deformation gradient (identity for elastic laws)."""
    Fn = F
    if law == FLUID:
        Fn = fluid_project(F)
    elif needs_svd(law):
        kind, p0, p1 = plastic_iso(law, E, nu, yield_stress, friction_angle, theta_c, theta_s)
        Fn = svd_iso(F, kind, p0, p1)
    return Fn


# ------------------------------------------------------------------------------------------------
# Fused forms (one SVD for the return map and the stress after it) and hand-written adjoints
# ------------------------------------------------------------------------------------------------

@wp.func
def kirchhoff_vjp_usv(law: int, F: Any, U: Any, s: Any, V: Any, E: Any, nu: Any, G: Any):
    """(d/dF, d/dE, d/dnu) of <G, kirchhoff_stress(law, F, E, nu)>, given the SVD
    F = U diag(s) V^T (read by SNOW, VON_MISES, DRUCKER_PRAGER only)."""
    mu, lam = lame(E, nu)
    J = wp.determinant(F)
    trG = G[0, 0] + G[1, 1] + G[2, 2]
    zero = type(E)(0.0)
    gF = zeros33(E)
    g_mu = zero
    g_lam = zero
    g_J = zero
    if law == FLUID or law == COROTATED or law == SNOW:  # lam J (J - 1) I
        g_lam = trG * J * (J - type(E)(1.0))
        g_J = trG * lam * (type(E)(2.0) * J - type(E)(1.0))
    if law == COROTATED or law == SNOW:  # + 2 mu (F - R) F^T
        H = G * (type(E)(2.0) * mu)
        gR = zeros33(E)
        R = zeros33(E)
        if law == COROTATED:  # no SVD: Newton polar rotation and its closed-form adjoint
            gR, R = polar_vjp(F, -H * F)
        else:
            gR, u0, u1, R = svd_iso_vjp_usv(U, s, V, ISO_ROTATION, zero, zero, -H * F)
        S = (F - R) * wp.transpose(F)
        gF = H * F + wp.transpose(H) * (F - R) + gR
        g_mu = type(E)(2.0) * wp.ddot(G, S)
    elif law == NEO_HOOKEAN:  # mu (F F^T - I) + lam log(J) I
        B = F * wp.transpose(F)
        gF = (G + wp.transpose(G)) * F * mu
        g_mu = wp.ddot(G, B) - trG
        g_lam = trG * wp.log(J)
        g_J = trG * lam / J
    elif law == VON_MISES or law == DRUCKER_PRAGER:  # P(F) F^T, P = U diag(g(sigma)) V^T
        gP, gm, gl, P = svd_iso_vjp_usv(U, s, V, ISO_HENCKY_PIOLA, mu, lam, G * F)
        gF = gP + wp.transpose(G) * P
        g_mu = gm
        g_lam = gl
    gF = gF + cofactor(F) * g_J
    gE, gnu = lame_vjp(E, nu, g_mu, g_lam)
    return gF, gE, gnu


@wp.func
def kirchhoff_vjp(law: int, F: Any, E: Any, nu: Any, G: Any):
    """:func:`kirchhoff_vjp_usv` with the SVD of F computed here (where the law needs it)."""
    U = wp.identity(n=3, dtype=type(E))
    s = wp.vector(type(E)(1.0), type(E)(1.0), type(E)(1.0))
    V = wp.identity(n=3, dtype=type(E))
    if needs_svd(law):
        wp.svd3(F, U, s, V)
    gF, gE, gnu = kirchhoff_vjp_usv(law, F, U, s, V, E, nu, G)
    return gF, gE, gnu


@wp.func
def project_vjp_usv(law: int, F: Any, U: Any, s: Any, V: Any, E: Any, nu: Any, yield_stress: Any,
                    friction_angle: Any, theta_c: Any, theta_s: Any, G: Any):
    """d/d(F, E, nu, yield_stress, friction_angle, theta_c, theta_s) of <G, project(...)>, given the
    SVD F = U diag(s) V^T (read by SNOW, VON_MISES, DRUCKER_PRAGER)."""
    zero = type(E)(0.0)
    gF = G
    gE = zero
    gnu = zero
    gys = zero
    gfa = zero
    gtc = zero
    gts = zero
    if law == FLUID:
        J = wp.determinant(F)
        trG = G[0, 0] + G[1, 1] + G[2, 2]
        gF = cofactor(F) * (trG * wp.pow(J, type(E)(-2.0) / type(E)(3.0)) / type(E)(3.0))
    elif law == EXTERNAL:
        gF = zeros33(E)
    elif needs_svd(law):
        kind, p0, p1 = plastic_iso(law, E, nu, yield_stress, friction_angle, theta_c, theta_s)
        g0 = zero
        g1 = zero
        val = zeros33(E)
        gF, g0, g1, val = svd_iso_vjp_usv(U, s, V, kind, p0, p1, G)
        # chain rule from (p0, p1) to the material parameters of each law
        if law == SNOW:
            gtc = -g0
            gts = g1
        elif law == VON_MISES:
            mu, lam = lame(E, nu)
            gys = g0 / (type(E)(2.0) * mu)
            gE, gnu = lame_vjp(E, nu, -g0 * yield_stress / (type(E)(2.0) * mu * mu), zero)
        else:
            b = type(E)(1.0) - type(E)(2.0) * nu
            t = type(E)(3.0) - wp.sin(friction_angle)
            gfa = g0 * type(E)(math.sqrt(2.0 / 3.0)) * type(E)(6.0) * wp.cos(friction_angle) / (t * t)
            gnu = g1 * type(E)(3.0) / (b * b)
    return gF, gE, gnu, gys, gfa, gtc, gts


@wp.func
def project_usv(law: int, F: Any, U: Any, s: Any, V: Any, E: Any, nu: Any, yield_stress: Any,
                friction_angle: Any, theta_c: Any, theta_s: Any):
    """:func:`project` given the SVD F = U diag(s) V^T; returns F_new and, for the SVD laws (which
    keep U and V), its singular values (else s)."""
    Fn = F
    sn = s
    if law == FLUID:
        Fn = fluid_project(F)
    elif needs_svd(law):
        kind, p0, p1 = plastic_iso(law, E, nu, yield_stress, friction_angle, theta_c, theta_s)
        g, Jg, d0, d1 = iso_g(kind, s, p0, p1)
        Fn = U * wp.diag(g) * wp.transpose(V)
        sn = g
    return Fn, sn


@wp.func
def kirchhoff_usv(law: int, F: Any, U: Any, s: Any, V: Any, E: Any, nu: Any):
    """:func:`kirchhoff_stress` given the SVD F = U diag(s) V^T (the SVD laws use it)."""
    tau = zeros33(E)
    if law == SNOW:
        mu, lam = lame(E, nu)
        J = wp.determinant(F)
        R = U * wp.transpose(V)
        tau = (F - R) * wp.transpose(F) * (type(E)(2.0) * mu) + wp.identity(n=3, dtype=type(E)) * (
            lam * J * (J - type(E)(1.0)))
    elif law == VON_MISES or law == DRUCKER_PRAGER:
        mu, lam = lame(E, nu)
        e0, q0 = clamp_log(s[0])
        e1, q1 = clamp_log(s[1])
        e2, q2 = clamp_log(s[2])
        tr = e0 + e1 + e2
        t = wp.vector(type(E)(2.0) * mu * e0 + lam * tr, type(E)(2.0) * mu * e1 + lam * tr,
                      type(E)(2.0) * mu * e2 + lam * tr)
        tau = U * wp.diag(t) * wp.transpose(U)
    else:
        tau = kirchhoff_stress(law, F, E, nu)
    return tau
