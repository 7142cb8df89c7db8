"""Warp kernels of the neural laws: the signed SVD of a batch of deformation gradients (the
decomposition :func:`diffworld.sims.constitutive.neural.rotation_and_singular_values` takes
forward; its adjoint is torch arithmetic on the factors). ``torch.linalg.svd`` of 3 x 3 batches
runs LAPACK per matrix and was 42 % of a neural MPM step at 1,000 particles on this CPU."""

from __future__ import annotations

from typing import Any

import torch
import warp as wp

__all__ = ["signed_svd"]


@wp.kernel
def _signed_svd(F: wp.array(dtype=Any), U_out: wp.array(dtype=Any), s_out: wp.array(dtype=Any),
                V_out: wp.array(dtype=Any)):
    i = wp.tid()
    A = F[i]
    U = type(A)()
    V = type(A)()
    s = s_out[i]
    wp.svd3(A, U, s, V)
    one = type(A[0, 0])(1.0)
    # proper rotations: flip the last column of U (V) and the sign of s_2 where det < 0
    if wp.determinant(U) < type(one)(0.0):
        U = U @ wp.diag(type(s)(one, one, -one))
        s = type(s)(s[0], s[1], -s[2])
    if wp.determinant(V) < type(one)(0.0):
        V = V @ wp.diag(type(s)(one, one, -one))
        s = type(s)(s[0], s[1], -s[2])
    U_out[i] = U
    s_out[i] = s
    V_out[i] = V


_KERNELS: dict[torch.dtype, Any] = {}
for _t, _s in ((torch.float32, wp.float32), (torch.float64, wp.float64)):
    _m = wp.array(dtype=wp.types.matrix((3, 3), _s))
    _v = wp.array(dtype=wp.types.vector(3, _s))
    _KERNELS[_t] = (wp.overload(_signed_svd, [_m, _m, _v, _m]), wp.types.matrix((3, 3), _s), wp.types.vector(3, _s))


def signed_svd(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F = U diag(s) V^T`` for F (n, 3, 3) float32/float64 on the CPU or a CUDA device, with U, V
    proper rotations, ``|s|`` descending and ``s_2 < 0`` where ``det F < 0``; computed in float64,
    returned in F's dtype (not differentiable; see ``neural``)."""
    from diffworld.engine.runtime import init_warp

    init_warp()
    # always in float64: Warp's float32 svd3 reconstructs F only to ~1e-2 (measured on I + 0.5 N(0, 1))
    kernel, m33, v3 = _KERNELS[torch.float64]
    out_dtype = F.dtype
    F = F.detach().to(torch.float64).contiguous()
    n = F.shape[0]
    U, V = torch.empty_like(F), torch.empty_like(F)
    s = torch.empty((n, 3), dtype=F.dtype, device=F.device)
    if n:
        dev = "cpu" if F.device.type == "cpu" else f"cuda:{F.device.index or 0}"
        wp.launch(kernel, n, [wp.from_torch(F, dtype=m33)],
                  [wp.from_torch(U, dtype=m33), wp.from_torch(s, dtype=v3), wp.from_torch(V, dtype=m33)],
                  device=dev)
    return U.to(out_dtype), s.to(out_dtype), V.to(out_dtype)
