"""The signed SVD of 3 x 3 matrices in float64 by cyclic Jacobi rotations, as Warp device
functions: what the neural laws' kernels (:mod:`~diffworld.sims.constitutive.kernels_neural`)
build their invariants and rotations on.

``F = U diag(s) V^T`` with U, V proper rotations, ``|s|`` descending and ``s_2 < 0`` where
``det F < 0``. V diagonalises F^T F by Jacobi rotations (:func:`jacobi_from`, from any orthogonal
start; :func:`jacobi_pair_from` runs two matrices' sweeps interleaved), then :func:`svd_finish`
sorts, fixes the signs and builds U from F V. Warp's float32 ``svd3`` reconstructs F only to
~1e-3, and its float64 one is three times slower than this on the CPU.

The sweeps stop at float64 round-off for float64 F and at off-diagonals of 1e-9 of the diagonal
for float32 F (:func:`sweep_tolerance`).
"""

from __future__ import annotations

from typing import Any

import torch
import warp as wp

__all__ = ["TIGHT", "converged", "exact_orthogonal", "jacobi_from", "jacobi_pair", "jacobi_pair_from", "sign_or_one",
           "svd_finish", "svd_signed", "sweep_tolerance"]

# Jacobi stopping tolerance (off-diagonal^2 / diagonal^2 of V^T F^T F V) to float64 round-off
TIGHT = wp.constant(wp.float64(1.0e-34))


def sweep_tolerance(dtype: torch.dtype) -> float:
    """The Jacobi stopping tolerance for deformation gradients of ``dtype``: float64 round-off for
    float64; for float32, off-diagonal entries below 1e-9 of the diagonal (eigenvalues then carry
    a relative error of ~1e-18, rotations ~1e-9 / relative gap: below float32's round-off in
    what the law returns, x and R). Jacobi converges quadratically, so this saves the last sweep
    (about one in three) that float64 round-off would take."""
    return 1.0e-34 if dtype == torch.float64 else 1.0e-18


@wp.func
def _jacobi01(A: wp.mat33d, V: wp.mat33d):
    """One Jacobi rotation of the symmetric A zeroing ``A[0, 1]`` (Numerical Recipes' stable
    form), accumulated into V's columns. One function per index pair: with constant indices
    the SVD runs ~5% faster than with the pair as arguments (the same arithmetic)."""
    apq = A[0, 1]
    if apq == wp.float64(0.0):
        return A, V
    theta = (A[1, 1] - A[0, 0]) / (wp.float64(2.0) * apq)
    t = wp.float64(1.0) / (wp.abs(theta) + wp.sqrt(theta * theta + wp.float64(1.0)))
    if theta < wp.float64(0.0):
        t = -t
    c = wp.float64(1.0) / wp.sqrt(t * t + wp.float64(1.0))
    s = t * c
    arp = A[2, 0]
    arq = A[2, 1]
    A[0, 0] = A[0, 0] - t * apq
    A[1, 1] = A[1, 1] + t * apq
    A[0, 1] = wp.float64(0.0)
    A[1, 0] = wp.float64(0.0)
    A[2, 0] = c * arp - s * arq
    A[0, 2] = A[2, 0]
    A[2, 1] = s * arp + c * arq
    A[1, 2] = A[2, 1]
    for k in range(3):
        vkp = V[k, 0]
        vkq = V[k, 1]
        V[k, 0] = c * vkp - s * vkq
        V[k, 1] = s * vkp + c * vkq
    return A, V


@wp.func
def _jacobi02(A: wp.mat33d, V: wp.mat33d):
    """One Jacobi rotation of the symmetric A zeroing ``A[0, 2]`` (Numerical Recipes' stable
    form), accumulated into V's columns. One function per index pair: with constant indices
    the SVD runs ~5% faster than with the pair as arguments (the same arithmetic)."""
    apq = A[0, 2]
    if apq == wp.float64(0.0):
        return A, V
    theta = (A[2, 2] - A[0, 0]) / (wp.float64(2.0) * apq)
    t = wp.float64(1.0) / (wp.abs(theta) + wp.sqrt(theta * theta + wp.float64(1.0)))
    if theta < wp.float64(0.0):
        t = -t
    c = wp.float64(1.0) / wp.sqrt(t * t + wp.float64(1.0))
    s = t * c
    arp = A[1, 0]
    arq = A[1, 2]
    A[0, 0] = A[0, 0] - t * apq
    A[2, 2] = A[2, 2] + t * apq
    A[0, 2] = wp.float64(0.0)
    A[2, 0] = wp.float64(0.0)
    A[1, 0] = c * arp - s * arq
    A[0, 1] = A[1, 0]
    A[1, 2] = s * arp + c * arq
    A[2, 1] = A[1, 2]
    for k in range(3):
        vkp = V[k, 0]
        vkq = V[k, 2]
        V[k, 0] = c * vkp - s * vkq
        V[k, 2] = s * vkp + c * vkq
    return A, V


@wp.func
def _jacobi12(A: wp.mat33d, V: wp.mat33d):
    """One Jacobi rotation of the symmetric A zeroing ``A[1, 2]`` (Numerical Recipes' stable
    form), accumulated into V's columns. One function per index pair: with constant indices
    the SVD runs ~5% faster than with the pair as arguments (the same arithmetic)."""
    apq = A[1, 2]
    if apq == wp.float64(0.0):
        return A, V
    theta = (A[2, 2] - A[1, 1]) / (wp.float64(2.0) * apq)
    t = wp.float64(1.0) / (wp.abs(theta) + wp.sqrt(theta * theta + wp.float64(1.0)))
    if theta < wp.float64(0.0):
        t = -t
    c = wp.float64(1.0) / wp.sqrt(t * t + wp.float64(1.0))
    s = t * c
    arp = A[0, 1]
    arq = A[0, 2]
    A[1, 1] = A[1, 1] - t * apq
    A[2, 2] = A[2, 2] + t * apq
    A[1, 2] = wp.float64(0.0)
    A[2, 1] = wp.float64(0.0)
    A[0, 1] = c * arp - s * arq
    A[1, 0] = A[0, 1]
    A[0, 2] = s * arp + c * arq
    A[2, 0] = A[0, 2]
    for k in range(3):
        vkp = V[k, 1]
        vkq = V[k, 2]
        V[k, 1] = c * vkp - s * vkq
        V[k, 2] = s * vkp + c * vkq
    return A, V


@wp.func
def _swap_columns(V: wp.mat33d, a: int, b: int):
    for k in range(3):
        t = V[k, a]
        V[k, a] = V[k, b]
        V[k, b] = t
    return V


@wp.func
def _unit_orthogonal(u: wp.vec3d):
    """A unit vector orthogonal to the unit vector u."""
    e = wp.vec3d(wp.float64(1.0), wp.float64(0.0), wp.float64(0.0))
    if wp.abs(u[0]) > wp.float64(0.5):
        e = wp.vec3d(wp.float64(0.0), wp.float64(1.0), wp.float64(0.0))
    w = e - wp.dot(e, u) * u
    return w / wp.length(w)


@wp.func
def svd_signed(F: wp.mat33d):
    """F = U diag(s) V^T with U, V proper rotations, s_0 >= s_1 >= |s_2|, s_2 taking the sign
    of det F.

    V diagonalises F^T F by cyclic Jacobi rotations (to round-off, at most 12 sweeps; 3-5 in
    practice); U's columns come from F V (normalised, Gram-Schmidt, a cross product), so that
    ``s_2 = u_2 . F v_2`` carries det F's sign. Warp's ``svd3`` takes about three times as long
    on the CPU (measured: 1.1 us vs ~0.3 us per matrix, float64)."""
    A, V = jacobi_from(wp.transpose(F) @ F, wp.identity(3, dtype=wp.float64), TIGHT)
    return svd_finish(F, A, V)


@wp.func
def jacobi_from(A: wp.mat33d, V: wp.mat33d, tol: wp.float64):
    """Cyclic Jacobi sweeps of the symmetric A = V^T F^T F V (V orthogonal: the start) until
    :func:`converged`; returns (A diagonal to ``tol``, V)."""
    for sweep in range(12):
        if converged(A, tol):
            break
        A, V = _jacobi01(A, V)
        A, V = _jacobi02(A, V)
        A, V = _jacobi12(A, V)
    return A, V


@wp.func
def converged(A: wp.mat33d, tol: wp.float64):
    """The Jacobi stopping test: off-diagonal negligible, ``sum_offdiag A^2 <= tol sum_diag A^2``
    (:data:`TIGHT`: to float64 round-off; see :func:`sweep_tolerance`)."""
    off = A[0, 1] * A[0, 1] + A[0, 2] * A[0, 2] + A[1, 2] * A[1, 2]
    diag = A[0, 0] * A[0, 0] + A[1, 1] * A[1, 1] + A[2, 2] * A[2, 2]
    return off <= tol * diag


@wp.func
def jacobi_pair(F0: wp.mat33d, F1: wp.mat33d, tol: wp.float64):
    """The Jacobi sweeps of :func:`svd_signed` for two matrices at once from V = I (see
    :func:`jacobi_pair_from`). Returns (A0, V0, A1, V1)."""
    return jacobi_pair_from(wp.transpose(F0) @ F0, wp.identity(3, dtype=wp.float64),
                             wp.transpose(F1) @ F1, wp.identity(3, dtype=wp.float64), tol)


@wp.func
def jacobi_pair_from(A0: wp.mat33d, V0: wp.mat33d, A1: wp.mat33d, V1: wp.mat33d, tol: wp.float64):
    """Jacobi sweeps of two symmetric matrices at once, rotation by rotation in turn, each from
    its start (A = V^T F^T F V with V orthogonal): each one's arithmetic (and result) is exactly
    that of its own sweeps, and the CPU overlaps the two chains of divisions and square roots
    (one matrix's chain leaves it mostly idle). Returns (A0, V0, A1, V1)."""
    done0 = bool(False)
    done1 = bool(False)
    for sweep in range(12):
        if not done0:
            done0 = converged(A0, tol)
        if not done1:
            done1 = converged(A1, tol)
        if done0 and done1:
            break
        if not done0:
            A0, V0 = _jacobi01(A0, V0)
        if not done1:
            A1, V1 = _jacobi01(A1, V1)
        if not done0:
            A0, V0 = _jacobi02(A0, V0)
        if not done1:
            A1, V1 = _jacobi02(A1, V1)
        if not done0:
            A0, V0 = _jacobi12(A0, V0)
        if not done1:
            A1, V1 = _jacobi12(A1, V1)
    return A0, V0, A1, V1


@wp.func
def svd_finish(F: wp.mat33d, A: wp.mat33d, V: wp.mat33d):
    """:func:`svd_signed` after the sweeps (A = V^T F^T F V diagonal to round-off)."""
    # eigenvalues of F^T F descending, V's columns with them
    l0 = A[0, 0]
    l1 = A[1, 1]
    l2 = A[2, 2]
    if l0 < l1:
        V = _swap_columns(V, 0, 1)
        t = l0
        l0 = l1
        l1 = t
    if l0 < l2:
        V = _swap_columns(V, 0, 2)
        t = l0
        l0 = l2
        l2 = t
    if l1 < l2:
        V = _swap_columns(V, 1, 2)
    if wp.determinant(V) < wp.float64(0.0):
        for k in range(3):
            V[k, 2] = -V[k, 2]
    B = F @ V
    b0 = wp.vec3d(B[0, 0], B[1, 0], B[2, 0])
    b1 = wp.vec3d(B[0, 1], B[1, 1], B[2, 1])
    b2 = wp.vec3d(B[0, 2], B[1, 2], B[2, 2])
    s0 = wp.length(b0)
    u0 = wp.vec3d(wp.float64(1.0), wp.float64(0.0), wp.float64(0.0))
    if s0 > wp.float64(0.0):
        u0 = b0 / s0
    w1 = b1 - wp.dot(b1, u0) * u0
    s1 = wp.length(w1)
    u1 = _unit_orthogonal(u0)
    if s1 > wp.float64(1.0e-300):
        u1 = w1 / s1
    s1 = wp.dot(b1, u1)
    u2 = wp.cross(u0, u1)
    s2 = wp.dot(b2, u2)
    U = wp.mat33d(u0[0], u1[0], u2[0], u0[1], u1[1], u2[1], u0[2], u1[2], u2[2])
    return U, wp.vec3d(s0, s1, s2), V


@wp.func
def sign_or_one(x: wp.float64):
    """-1 for x < 0, else 1 (also at 0: a sign to multiply by)."""
    if x < wp.float64(0.0):
        return wp.float64(-1.0)
    return wp.float64(1.0)


@wp.func
def exact_orthogonal(F: Any):
    """True where F^T F = I holds exactly in F's own precision (F = I, a permutation or a
    reflection): sigma is then +-1 exactly, which the iterative SVD misses by an ulp, and a
    law would not be exactly stress-free at F = I."""
    C = wp.transpose(F) @ F
    ok = True
    for a in range(3):
        for b in range(3):
            target = type(F[0, 0])(0.0)
            if a == b:
                target = type(F[0, 0])(1.0)
            if C[a, b] != target:
                ok = False
    return ok
