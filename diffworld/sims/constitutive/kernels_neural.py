"""Warp kernels of the neural laws: everything of NCLaw's law that is per particle and not a
matrix product, with hand-written adjoints.

A neural law's evaluation is ``invariants -> MLP -> head``: the MLP's batched matrix products
stay in torch (BLAS beats a per-particle loop by far), and the two per-particle stages around it
are one Warp kernel each, forward and adjoint:

* :func:`invariants_forward` / :func:`invariants_adjoint`: the signed SVD of F (float64, by
  Jacobi rotations of F^T F: :mod:`~diffworld.sims.constitutive.jacobi_svd`), the rotation
  ``R = U V^T`` and the 13
  scaled invariants ``(sigma - 1, vec(F^T F - I), det F - 1) / scale``. The adjoint is the polar
  decomposition's closed form (denominators ``sigma_i + sigma_j``, finite where singular values
  repeat), from the factors the forward kept.
* :func:`head_forward` / :func:`head_adjoint`: the network output N (9 per particle) made a
  stress ``tau = c R sym(N) F^T`` or a plastic update ``F' = F + c R sym(N)``.
* :func:`stage_mid_forward` / :func:`stage_mid_adjoint`: the middle of a substep's stage (return
  map, then the stress at its result) in one kernel each way: the plastic update, then the
  invariants of F' with the Jacobi sweeps started from the return map's V (F' is within
  ``alpha |N|`` of F: about a third fewer rotations than from V = I).

The Jacobi sweeps stop at float64 round-off for float64 F and at off-diagonals of 1e-9 of the
diagonal for float32 F (:func:`~diffworld.sims.constitutive.jacobi_svd.sweep_tolerance`): past
that a sweep changes nothing float32 holds.

In torch the same arithmetic is some thirty small ops per evaluation, each costing more than the
kernel that replaces them at a thousand particles (measured in ``benchmarks/nclaw.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import warp as wp

from diffworld.sims.constitutive.jacobi_svd import (exact_orthogonal, jacobi_from, jacobi_pair, jacobi_pair_from,
                                                    sign_or_one, svd_finish, svd_signed, sweep_tolerance)

__all__ = ["head_adjoint", "head_forward", "invariants_adjoint", "invariants_forward", "signed_svd",
           "stage_mid_adjoint", "stage_mid_forward", "sweep_tolerance"]

N_INVARIANTS = 13
HEAD_STRESS, HEAD_PLASTIC = 0, 1


@wp.kernel
def _signed_svd(F: wp.array(dtype=Any), U_out: wp.array(dtype=Any), s_out: wp.array(dtype=Any),
                V_out: wp.array(dtype=Any)):
    i = wp.tid()
    U, s, V = svd_signed(wp.mat33d(F[i]))
    U_out[i] = type(F[i])(U)
    s_out[i] = type(s_out[i])(s)
    V_out[i] = type(F[i])(V)


@wp.func
def _invariants_store(i: int, Fi: Any, U: wp.mat33d, s: wp.vec3d, V: wp.mat33d, inv_scale: wp.array(dtype=Any),
                      x: wp.array2d(dtype=Any), R: wp.array(dtype=Any), U_out: wp.array(dtype=wp.mat33d),
                      s_out: wp.array(dtype=wp.vec3d), V_out: wp.array(dtype=wp.mat33d)):
    """Row i of :func:`invariants_forward`'s outputs from F_i's signed SVD."""
    if exact_orthogonal(Fi):
        s = wp.vec3d(sign_or_one(s[0]), sign_or_one(s[1]), sign_or_one(s[2]))
    U_out[i] = U
    s_out[i] = s
    V_out[i] = V
    R[i] = type(Fi)(U @ wp.transpose(V))
    C = wp.transpose(Fi) @ Fi  # in F's precision, as the torch reference computes it
    one = type(Fi[0, 0])(1.0)
    for a in range(3):
        x[i, a] = (type(one)(s[a]) - one) * inv_scale[a]
        for b in range(3):
            c = C[a, b]
            if a == b:
                c = c - one
            x[i, 3 + 3 * a + b] = c * inv_scale[3 + 3 * a + b]
    x[i, 12] = (type(one)(s[0] * s[1] * s[2]) - one) * inv_scale[12]


@wp.kernel
def _invariants_fwd(F: wp.array(dtype=Any), inv_scale: wp.array(dtype=Any), x: wp.array2d(dtype=Any),
                    R: wp.array(dtype=Any), U_out: wp.array(dtype=wp.mat33d), s_out: wp.array(dtype=wp.vec3d),
                    V_out: wp.array(dtype=wp.mat33d), tol: wp.float64, half: int, n: int):
    # rows i and i + half (when there is one) per thread, their SVD sweeps interleaved
    # (:func:`jacobi_pair_from`; each row's numbers are those of its own sweeps)
    i = wp.tid()
    j = i + half
    Fi = F[i]
    if j < n:
        Fj = F[j]
        A0, V0, A1, V1 = jacobi_pair(wp.mat33d(Fi), wp.mat33d(Fj), tol)
        U, s, V = svd_finish(wp.mat33d(Fi), A0, V0)
        _invariants_store(i, Fi, U, s, V, inv_scale, x, R, U_out, s_out, V_out)
        Uj, sj, Vj = svd_finish(wp.mat33d(Fj), A1, V1)
        _invariants_store(j, Fj, Uj, sj, Vj, inv_scale, x, R, U_out, s_out, V_out)
    else:
        A, V = jacobi_from(wp.transpose(wp.mat33d(Fi)) @ wp.mat33d(Fi), wp.identity(3, dtype=wp.float64), tol)
        U, s, V = svd_finish(wp.mat33d(Fi), A, V)
        _invariants_store(i, Fi, U, s, V, inv_scale, x, R, U_out, s_out, V_out)


@wp.func
def _sym_row(N: wp.array2d(dtype=Any), i: int, S: Any):
    """``sym(N_i)``: row i of N (9 values, row-major 3 x 3) symmetrised into S (its type's zero)."""
    half = type(N[i, 0])(0.5)
    for a in range(3):
        for b in range(3):
            S[a, b] = half * (N[i, 3 * a + b] + N[i, 3 * b + a])
    return S


@wp.func
def _store_sym_row(gN: wp.array2d(dtype=Any), i: int, gS: Any):
    """The adjoint of :func:`_sym_row`: row i of gN from d loss / dS."""
    half = type(gS[0, 0])(0.5)
    for a in range(3):
        for b in range(3):
            gN[i, 3 * a + b] = half * (gS[a, b] + gS[b, a])


@wp.func
def _plastic_update(F: wp.array(dtype=Any), R: wp.array(dtype=Any), N: wp.array2d(dtype=Any), coef: Any, i: int):
    """Row i of :func:`head_forward` in mode :data:`HEAD_PLASTIC`: ``F + c R sym(N)``."""
    Fi = F[i]
    S = _sym_row(N, i, type(Fi)())
    return Fi + coef * (R[i] @ S)


@wp.kernel
def _stage_mid_fwd(F: wp.array(dtype=Any), R: wp.array(dtype=Any), N: wp.array2d(dtype=Any), coef: Any,
                   V_start: wp.array(dtype=wp.mat33d), inv_scale: wp.array(dtype=Any), tol: wp.float64, half: int,
                   n: int, F_new: wp.array(dtype=Any), x: wp.array2d(dtype=Any), R_new: wp.array(dtype=Any),
                   U_out: wp.array(dtype=wp.mat33d), s_out: wp.array(dtype=wp.vec3d),
                   V_out: wp.array(dtype=wp.mat33d)):
    # the plastic update F' = F + c R sym(N) (head_forward, mode 1), then invariants_forward of F'
    # with its Jacobi sweeps started from F's V (F' - F is small: c ~ 1e-3, so V^T F'^T F' V is
    # nearly diagonal and the sweeps converge in fewer rotations; the result is the SVD of F' to
    # the same tolerance, from a different start: it differs from a cold start by round-off)
    i = wp.tid()
    j = i + half
    Fi = _plastic_update(F, R, N, coef, i)
    F_new[i] = Fi
    Vi = V_start[i]
    Ai = wp.transpose(Vi) @ (wp.transpose(wp.mat33d(Fi)) @ wp.mat33d(Fi)) @ Vi
    if j < n:
        Fj = _plastic_update(F, R, N, coef, j)
        F_new[j] = Fj
        Vj = V_start[j]
        Aj = wp.transpose(Vj) @ (wp.transpose(wp.mat33d(Fj)) @ wp.mat33d(Fj)) @ Vj
        A0, V0, A1, V1 = jacobi_pair_from(Ai, Vi, Aj, Vj, tol)
        U, s, V = svd_finish(wp.mat33d(Fi), A0, V0)
        _invariants_store(i, Fi, U, s, V, inv_scale, x, R_new, U_out, s_out, V_out)
        Uj, sj, Vj2 = svd_finish(wp.mat33d(Fj), A1, V1)
        _invariants_store(j, Fj, Uj, sj, Vj2, inv_scale, x, R_new, U_out, s_out, V_out)
    else:
        A, V = jacobi_from(Ai, Vi, tol)
        U, s, V = svd_finish(wp.mat33d(Fi), A, V)
        _invariants_store(i, Fi, U, s, V, inv_scale, x, R_new, U_out, s_out, V_out)


@wp.func
def _invariants_adj_row(i: int, F: wp.array(dtype=Any), inv_scale: wp.array(dtype=Any),
                        U_in: wp.array(dtype=wp.mat33d), s_in: wp.array(dtype=wp.vec3d),
                        V_in: wp.array(dtype=wp.mat33d), gx: wp.array2d(dtype=Any), gR: wp.array(dtype=Any),
                        tiny: wp.float64):
    """Row i of :func:`invariants_adjoint` (float64)."""
    Fi = wp.mat33d(F[i])
    U = U_in[i]
    s = s_in[i]
    V = V_in[i]
    # d sigma (the first three inputs and det F = s0 s1 s2), dC (the next nine)
    gJ = wp.float64(gx[i, 12]) * wp.float64(inv_scale[12])
    gs = wp.vec3d(wp.float64(gx[i, 0]) * wp.float64(inv_scale[0]) + gJ * s[1] * s[2],
                  wp.float64(gx[i, 1]) * wp.float64(inv_scale[1]) + gJ * s[0] * s[2],
                  wp.float64(gx[i, 2]) * wp.float64(inv_scale[2]) + gJ * s[0] * s[1])
    gC = wp.mat33d()
    for a in range(3):
        for b in range(3):
            gC[a, b] = wp.float64(gx[i, 3 + 3 * a + b]) * wp.float64(inv_scale[3 + 3 * a + b])
    out = Fi @ (gC + wp.transpose(gC))
    # the SVD: dP = U^T dF V; d sigma_i = dP_ii; dR = U A V^T, A_ij = (dP_ij - dP_ji) / (s_i + s_j)
    M = wp.transpose(U) @ wp.mat33d(gR[i]) @ V
    G = wp.diag(gs)
    for a in range(3):
        for b in range(3):
            if a != b:
                d = s[a] + s[b]
                if wp.abs(d) < tiny:  # s_i + s_j -> 0 only under (near) inversion: keep the sign
                    d = tiny * sign_or_one(d)
                G[a, b] = G[a, b] + (M[a, b] - M[b, a]) / d
    return out + U @ G @ wp.transpose(V)


@wp.kernel
def _invariants_adj(F: wp.array(dtype=Any), inv_scale: wp.array(dtype=Any), U_in: wp.array(dtype=wp.mat33d),
                    s_in: wp.array(dtype=wp.vec3d), V_in: wp.array(dtype=wp.mat33d), gx: wp.array2d(dtype=Any),
                    gR: wp.array(dtype=Any), tiny: wp.float64, gF: wp.array(dtype=Any)):
    i = wp.tid()
    gF[i] = type(F[i])(_invariants_adj_row(i, F, inv_scale, U_in, s_in, V_in, gx, gR, tiny))


@wp.kernel
def _stage_mid_adj(F_new: wp.array(dtype=Any), inv_scale: wp.array(dtype=Any), U_in: wp.array(dtype=wp.mat33d),
                   s_in: wp.array(dtype=wp.vec3d), V_in: wp.array(dtype=wp.mat33d), gx: wp.array2d(dtype=Any),
                   gR: wp.array(dtype=Any), tiny: wp.float64, g_head: wp.array(dtype=Any),
                   g_in: wp.array(dtype=Any), R: wp.array(dtype=Any), N: wp.array2d(dtype=Any), coef: Any,
                   g_F_new: wp.array(dtype=Any), gR_plastic: wp.array(dtype=Any), gN_plastic: wp.array2d(dtype=Any)):
    # adjoint of _stage_mid_fwd: d loss / dF' = its direct adjoint g_in + the stress head's g_head
    # + invariants_adjoint(F'); then head_adjoint of the plastic update (mode 1) with it
    i = wp.tid()
    Fn = F_new[i]
    g = g_in[i] + (g_head[i] + type(Fn)(_invariants_adj_row(i, F_new, inv_scale, U_in, s_in, V_in, gx, gR, tiny)))
    g_F_new[i] = g
    S = _sym_row(N, i, type(Fn)())
    gR_plastic[i] = coef * (g @ S)
    gS = coef * (wp.transpose(R[i]) @ g)
    _store_sym_row(gN_plastic, i, gS)


@wp.kernel
def _head_fwd(F: wp.array(dtype=Any), R: wp.array(dtype=Any), N: wp.array2d(dtype=Any), coef: Any, mode: int,
              out: wp.array(dtype=Any)):
    i = wp.tid()
    Fi = F[i]
    S = _sym_row(N, i, type(Fi)())
    if mode == 0:
        out[i] = coef * (R[i] @ S @ wp.transpose(Fi))
    else:
        out[i] = Fi + coef * (R[i] @ S)


@wp.kernel
def _head_adj(F: wp.array(dtype=Any), R: wp.array(dtype=Any), N: wp.array2d(dtype=Any), coef: Any, mode: int,
              g: wp.array(dtype=Any), gF: wp.array(dtype=Any), gR: wp.array(dtype=Any), gN: wp.array2d(dtype=Any)):
    i = wp.tid()
    Fi = F[i]
    Ri = R[i]
    gi = g[i]
    S = _sym_row(N, i, type(Fi)())
    if mode == 0:  # tau = c R S F^T
        gR[i] = coef * (gi @ Fi @ S)
        gS = coef * (wp.transpose(Ri) @ gi @ Fi)
        gF[i] = coef * (wp.transpose(gi) @ Ri @ S)
    else:  # F' = F + c R S
        gR[i] = coef * (gi @ S)
        gS = coef * (wp.transpose(Ri) @ gi)
        gF[i] = gi
    _store_sym_row(gN, i, gS)


def _types(s):
    return wp.types.matrix((3, 3), s), wp.types.vector(3, s)


_K: dict[torch.dtype, dict[str, Any]] = {}
for _t, _s in ((torch.float32, wp.float32), (torch.float64, wp.float64)):
    _m33, _v3 = _types(_s)
    _am, _av, _as, _a2 = wp.array(dtype=_m33), wp.array(dtype=_v3), wp.array(dtype=_s), wp.array2d(dtype=_s)
    _a64m, _a64v = wp.array(dtype=wp.mat33d), wp.array(dtype=wp.vec3d)
    _K[_t] = {
        "m33": _m33, "v3": _v3, "s": _s,
        "svd": wp.overload(_signed_svd, [_am, _am, _av, _am]),
        "inv_fwd": wp.overload(_invariants_fwd, [_am, _as, _a2, _am, _a64m, _a64v, _a64m, wp.float64, wp.int32,
                                                 wp.int32]),
        "mid_fwd": wp.overload(_stage_mid_fwd, [_am, _am, _a2, _s, _a64m, _as, wp.float64, wp.int32, wp.int32, _am,
                                                _a2, _am, _a64m, _a64v, _a64m]),
        "mid_adj": wp.overload(_stage_mid_adj, [_am, _as, _a64m, _a64v, _a64m, _a2, _am, wp.float64, _am, _am, _am,
                                                _a2, _s, _am, _am, _a2]),
        "inv_adj": wp.overload(_invariants_adj, [_am, _as, _a64m, _a64v, _a64m, _a2, _am, wp.float64, _am]),
        "head_fwd": wp.overload(_head_fwd, [_am, _am, _a2, _s, wp.int32, _am]),
        "head_adj": wp.overload(_head_adj, [_am, _am, _a2, _s, wp.int32, _am, _am, _am, _a2]),
    }

# The adjoints' bound on |sigma_i + sigma_j| (sqrt of the dtype's epsilon). Scalars go to the
# launches as Python numbers, the same objects each call: a replayed launch then skips setting
# them again (a new Warp scalar object costs a ~5 us re-pack per launch).
_TINY = {dt: float(torch.finfo(dt).eps ** 0.5) for dt in (torch.float32, torch.float64)}


def _view(t: torch.Tensor, dtype, shape: tuple[int, ...]):
    from diffworld.engine.bridge import arg_view

    return arg_view(t, dtype, shape)


def _launch(kernel, n: int, args: list, device: torch.device) -> None:
    from diffworld.engine.bridge import launch

    launch(kernel, n, args, device, replay=True)  # (the kernels are wp.overload-concrete)


def _check(F: torch.Tensor) -> dict[str, Any]:
    from diffworld.engine.runtime import init_warp

    init_warp()
    if F.dtype not in _K:
        raise ValueError(f"neural law kernels: expected float32 or float64 deformation gradients, got {F.dtype}")
    return _K[F.dtype]


def _m(k, t):
    return _view(t, k["m33"], t.shape[:1])


def _rows(k, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int], what: str):
    """(the kernels' 2-d scalar argument for ``t``, the tensor it views: keep it alive until the
    launch), read through ``t``'s strides: the MLP's narrow outputs (N (n, 9), d loss / dx (n, 13))
    arrive as transposed views (``neural._mm``), which a copy would cost as much as the product."""
    from diffworld.engine.bridge import strided_arg_view

    t = t.detach().to(dtype)
    if tuple(t.shape) != shape:
        raise ValueError(f"neural law kernels: expected {what} of shape {shape}, got {tuple(t.shape)}")
    return strided_arg_view(t, k["s"]), t


def signed_svd(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F = U diag(s) V^T`` for F (n, 3, 3) float32/float64 on the CPU or a CUDA device, with U, V
    proper rotations, ``|s|`` descending and ``s_2 < 0`` where ``det F < 0``; computed in float64,
    returned in F's dtype (not differentiable; see ``neural``)."""
    k = _check(F)
    F = F.detach().contiguous()
    n = F.shape[0]
    U, V = torch.empty_like(F), torch.empty_like(F)
    s = torch.empty((n, 3), dtype=F.dtype, device=F.device)
    _launch(k["svd"], n, [_m(k, F), _m(k, U), _view(s, k["v3"], (n,)), _m(k, V)], F.device)
    return U, s, V


def invariants_forward(F: torch.Tensor, inv_scale: torch.Tensor):
    """NCLaw's scaled invariants of F (n, 3, 3) and its rotation.

    Args:
        F: Deformation gradients (n, 3, 3), float32 or float64.
        inv_scale: (13,) the reciprocal normalisation of each input, F's dtype and device.

    Returns:
        (x (n, 13), R (n, 3, 3), saved): ``saved`` (the float64 factors U, s, V) is what
        :func:`invariants_adjoint` needs.
    """
    k = _check(F)
    F = F.detach().contiguous()
    n = F.shape[0]
    x = torch.empty((n, N_INVARIANTS), dtype=F.dtype, device=F.device)
    R = torch.empty_like(F)
    U = torch.empty((n, 3, 3), dtype=torch.float64, device=F.device)
    V = torch.empty_like(U)
    s = torch.empty((n, 3), dtype=torch.float64, device=F.device)
    inv_scale = inv_scale.detach().to(F.dtype).contiguous()
    half = n - n // 2  # two rows per thread (see _invariants_fwd)
    _launch(k["inv_fwd"], half, [_m(k, F), _view(inv_scale, k["s"], (N_INVARIANTS,)),
                                 _view(x, k["s"], (n, N_INVARIANTS)), _m(k, R), _view(U, wp.mat33d, (n,)),
                                 _view(s, wp.vec3d, (n,)), _view(V, wp.mat33d, (n,)), sweep_tolerance(F.dtype),
                                 half, n], F.device)
    return x, R, (U, s, V)


def stage_mid_forward(F: torch.Tensor, R: torch.Tensor, N: torch.Tensor, coef: float, V_start: torch.Tensor,
                      inv_scale: torch.Tensor):
    """``head_forward(F, R, N, coef, HEAD_PLASTIC)`` and :func:`invariants_forward` of its result in
    one kernel: the middle of a neural law's substep stage (return map, then the stress there).

    Args:
        F: Trial deformation gradients (n, 3, 3), float32 or float64.
        R: Their rotations (n, 3, 3) and N (n, 9) the plastic network's output.
        coef: The plastic step alpha.
        V_start: (n, 3, 3) float64, F's right singular vectors (:func:`invariants_forward`'s
            ``saved[2]``): the Jacobi sweeps of F' start there (F' is close to F).
        inv_scale: (13,) the elastic network's reciprocal input normalisation.

    Returns:
        (F' (n, 3, 3), x (n, 13), R' (n, 3, 3), saved): as :func:`invariants_forward` for F'.
    """
    k = _check(F)
    F, R = F.detach().contiguous(), R.detach().contiguous()
    V_start = V_start.detach().contiguous()
    n = F.shape[0]
    N_arg, N = _rows(k, N, F.dtype, (n, 9), "N")
    F_new, R_new = torch.empty_like(F), torch.empty_like(F)
    x = torch.empty((n, N_INVARIANTS), dtype=F.dtype, device=F.device)
    U = torch.empty((n, 3, 3), dtype=torch.float64, device=F.device)
    V = torch.empty_like(U)
    s = torch.empty((n, 3), dtype=torch.float64, device=F.device)
    inv_scale = inv_scale.detach().to(F.dtype).contiguous()
    half = n - n // 2
    _launch(k["mid_fwd"], half, [_m(k, F), _m(k, R), N_arg, float(coef),
                                 _view(V_start, wp.mat33d, (n,)),
                                 _view(inv_scale, k["s"], (N_INVARIANTS,)), sweep_tolerance(F.dtype), half, n,
                                 _m(k, F_new), _view(x, k["s"], (n, N_INVARIANTS)), _m(k, R_new),
                                 _view(U, wp.mat33d, (n,)), _view(s, wp.vec3d, (n,)), _view(V, wp.mat33d, (n,))],
            F.device)
    return F_new, x, R_new, (U, s, V)


def stage_mid_adjoint(F_new: torch.Tensor, inv_scale: torch.Tensor, saved, gx: torch.Tensor, gR: torch.Tensor,
                      g_head: torch.Tensor, g_in: torch.Tensor, R: torch.Tensor, N: torch.Tensor, coef: float):
    """Adjoint of :func:`stage_mid_forward`, fused with what surrounds it in a substep stage's
    adjoint: d loss / dF' is ``g_in`` (its direct adjoint) + ``g_head`` (the stress head's
    d loss / dF') + :func:`invariants_adjoint` of F' from ``gx``, ``gR``; returned with the plastic
    update's (:func:`head_adjoint`, mode :data:`HEAD_PLASTIC`) d loss / dR and d loss / dN:
    ``(g_F_new (n, 3, 3), gR (n, 3, 3), gN (n, 9))``; d loss / dF of the update is ``g_F_new``."""
    k = _check(F_new)
    n = F_new.shape[0]
    U, s, V = saved
    inv_scale = inv_scale.detach().to(F_new.dtype).contiguous()
    # (kept in locals: a wp view does not hold its tensor alive)
    dt = F_new.dtype
    F_new, R = F_new.detach().contiguous(), R.detach().contiguous()
    N_arg, N = _rows(k, N, dt, (n, 9), "N")
    gx_arg, gx = _rows(k, gx, dt, (n, N_INVARIANTS), "d loss / dx")
    gR, g_head, g_in = (t.to(dt).contiguous() for t in (gR, g_head, g_in))
    g_F, g_R = torch.empty_like(F_new), torch.empty_like(F_new)
    g_N = torch.empty((n, 9), dtype=dt, device=F_new.device)
    tiny = _TINY[F_new.dtype]
    _launch(k["mid_adj"], n, [_m(k, F_new), _view(inv_scale, k["s"], (N_INVARIANTS,)),
                              _view(U, wp.mat33d, (n,)), _view(s, wp.vec3d, (n,)), _view(V, wp.mat33d, (n,)),
                              gx_arg, _m(k, gR), tiny, _m(k, g_head),
                              _m(k, g_in), _m(k, R), N_arg, float(coef), _m(k, g_F),
                              _m(k, g_R), _view(g_N, k["s"], (n, 9))], F_new.device)
    return g_F, g_R, g_N


def invariants_adjoint(F: torch.Tensor, inv_scale: torch.Tensor, saved, gx: torch.Tensor | None,
                       gR: torch.Tensor | None) -> torch.Tensor:
    """d loss / dF (n, 3, 3) from d loss / dx (n, 13) and d loss / dR (n, 3, 3) (None: zero)."""
    k = _check(F)
    F = F.detach().contiguous()
    n = F.shape[0]
    U, s, V = saved
    gx_arg, gx = _rows(k, torch.zeros((n, N_INVARIANTS), dtype=F.dtype, device=F.device) if gx is None else gx,
                       F.dtype, (n, N_INVARIANTS), "d loss / dx")
    gR = torch.zeros_like(F) if gR is None else gR.to(F.dtype).contiguous()
    inv_scale = inv_scale.detach().to(F.dtype).contiguous()
    gF = torch.empty_like(F)
    tiny = _TINY[F.dtype]
    _launch(k["inv_adj"], n, [_m(k, F), _view(inv_scale, k["s"], (N_INVARIANTS,)), _view(U, wp.mat33d, (n,)),
                              _view(s, wp.vec3d, (n,)), _view(V, wp.mat33d, (n,)),
                              gx_arg, _m(k, gR), tiny, _m(k, gF)], F.device)
    return gF


def head_forward(F: torch.Tensor, R: torch.Tensor, N: torch.Tensor, coef: float, mode: int) -> torch.Tensor:
    """``c R sym(N) F^T`` (mode :data:`HEAD_STRESS`) or ``F + c R sym(N)`` (:data:`HEAD_PLASTIC`)
    for F, R (n, 3, 3) and N (n, 9) (row-major 3 x 3)."""
    k = _check(F)
    F, R = F.detach().contiguous(), R.detach().contiguous()
    n = F.shape[0]
    N_arg, N = _rows(k, N, F.dtype, (n, 9), "N")
    out = torch.empty_like(F)
    _launch(k["head_fwd"], n, [_m(k, F), _m(k, R), N_arg, float(coef), int(mode), _m(k, out)], F.device)
    return out


def head_adjoint(F: torch.Tensor, R: torch.Tensor, N: torch.Tensor, coef: float, mode: int, g: torch.Tensor):
    """(d loss / dF, d loss / dR, d loss / dN) of :func:`head_forward` from d loss / d out."""
    k = _check(F)
    F, R = F.detach().contiguous(), R.detach().contiguous()
    g = g.to(F.dtype).contiguous()
    n = F.shape[0]
    N_arg, N = _rows(k, N, F.dtype, (n, 9), "N")
    gF, gR = torch.empty_like(F), torch.empty_like(F)
    gN = torch.empty((n, 9), dtype=F.dtype, device=F.device)
    _launch(k["head_adj"], n, [_m(k, F), _m(k, R), N_arg, float(coef), int(mode), _m(k, g),
                               _m(k, gF), _m(k, gR), _view(gN, k["s"], (n, 9))], F.device)
    return gF, gR, gN
