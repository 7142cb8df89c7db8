"""Neural constitutive laws (NCLaw, Ma et al., ICML 2023) as torch laws of the MPM.

A neural law is a :class:`~diffworld.sims.constitutive.torch_law.TorchLaw` made of two parts,
either of which may be a network or an analytic law:

* elasticity ``F -> tau`` (Kirchhoff stress [Pa]), and
* plasticity ``F_trial -> F`` (the return map after each substep's G2P).

The reference architecture (:class:`InvariantElasticity`, :class:`InvariantPlasticity`):

* inputs, invariant under ``F -> Q F``: ``sigma - 1`` (the 3 singular values), ``vec(F^T F - I)``
  (9) and ``det F - 1`` (1): 13 numbers, each divided by a fixed scale (the normalisation,
  default 1);
* a bias-free MLP 13 -> 64 -> 64 -> 9 with GELU, Xavier-uniform weights;
* elasticity: ``N = MLP(x)`` as 3 x 3, ``S = (N + N^T) / 2``, ``P = R S``, ``tau = P F^T`` with
  ``R = U V^T`` the rotation of ``F = U Sigma V^T`` (U, V proper rotations; ``sigma_3`` takes the
  sign of ``det F``);
* plasticity: ``F' = F + alpha R sym(MLP(x))``, ``alpha = 1e-3``.

Hence ``tau(Q F) = Q tau(F) Q^T`` and ``F'(Q F) = Q F'(F)`` for every rotation Q, and at ``F = I``
every input is 0, so the bias-free MLP (GELU(0) = 0) gives ``tau(I) = 0`` and ``F'(I) = I``
exactly. The ablation (:class:`PlainElasticity`, :class:`PlainPlasticity`) feeds ``vec(F - I)``
to the same MLP and reads ``P`` (or the plastic correction) directly: not equivariant.

The decomposition has a hand-written adjoint (:func:`rotation_and_singular_values`): the SVD's
autograd divides by ``sigma_i - sigma_j`` and is NaN wherever singular values repeat (F = I, every
particle at the start), while ``R`` and ``sigma`` only need ``sigma_i + sigma_j`` (the polar
decomposition's Sylvester equation), finite away from inversion.

The invariant parts run as ``Warp kernel -> torch MLP -> Warp kernel``: the invariants (with the
SVD) and the head (``R sym(N) F^T`` or ``F + alpha R sym(N)``) are one kernel each way
(:mod:`~diffworld.sims.constitutive.kernels_neural`), the matrix products stay in torch. The test
suite checks them against the same law composed of torch ops, values and gradients.

A law is saved as a file pair (:func:`save_law`, :func:`load_law`): ``NAME.pt`` (the torch state
dict) and ``NAME.json`` (the architecture and normalisation), so a scene can name it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from diffworld.sims.constitutive.torch_law import BuiltinTorchLaw, TorchLaw

__all__ = [
    "ELASTIC_KINDS",
    "PLASTIC_KINDS",
    "InvariantElasticity",
    "InvariantPlasticity",
    "NeuralLaw",
    "PlainElasticity",
    "PlainPlasticity",
    "invariants",
    "load_law",
    "rotation_and_singular_values",
    "save_law",
]

N_INVARIANTS = 13
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------- decomposition


class _PolarSVD(torch.autograd.Function):
    """(R, sigma) of F = U diag(sigma) V^T with U, V proper rotations, R = U V^T."""

    @staticmethod
    def forward(ctx, F):
        from diffworld.sims.constitutive.kernels_neural import signed_svd

        shape = F.shape
        U, s, V = signed_svd(F.reshape(-1, 3, 3))  # a Warp kernel (float64 inside)
        U, s, V = U.reshape(shape), s.reshape(*shape[:-2], 3), V.reshape(shape)
        # where F^T F = I holds exactly in floating point (F = I, an exact permutation or
        # reflection), sigma is +-1 exactly: the iterative SVD lands an ulp off, and the law would
        # not be exactly stress-free at F = I
        eye = torch.eye(3, dtype=F.dtype, device=F.device)
        exact = ((F.transpose(-1, -2) @ F - eye) == 0).all(-1).all(-1)
        s = torch.where(exact[..., None], torch.sign(s), s)
        R = U @ V.transpose(-1, -2)
        ctx.save_for_backward(U, s, V)
        return R, s

    @staticmethod
    def backward(ctx, gR, gs):
        U, s, V = ctx.saved_tensors
        # dP = U^T dF V: d sigma_i = dP_ii; dR = U A V^T, A_ij = (dP_ij - dP_ji) / (s_i + s_j)
        G = torch.zeros_like(U)
        if gs is not None:
            G = G + torch.diag_embed(gs)
        if gR is not None:
            M = U.transpose(-1, -2) @ gR @ V
            denom = s[..., :, None] + s[..., None, :]
            # s_i + s_j -> 0 only under (near) inversion; keep the sign, bound the magnitude
            tiny = torch.finfo(s.dtype).eps ** 0.5
            denom = torch.where(denom.abs() < tiny, torch.where(denom < 0, -tiny, tiny), denom)
            K = (M - M.transpose(-1, -2)) / denom
            K = K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))  # zero diagonal
            G = G + K
        return U @ G @ V.transpose(-1, -2)


def rotation_and_singular_values(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation ``R = U V^T`` (..., 3, 3) and singular values ``sigma`` (..., 3), descending
    in magnitude, ``sigma_3 < 0`` where ``det F < 0``, of deformation gradients F (..., 3, 3).

    Differentiable with a hand-written adjoint that is finite where singular values repeat
    (see the module docstring); ``sigma`` is not differentiable where two of them cross (it is
    sorted), like every function of ordered singular values.
    """
    return _PolarSVD.apply(F)


class _Invariants(torch.autograd.Function):
    """(x, R): the scaled invariants (n, 13) and rotation of F (n, 3, 3), one Warp kernel each
    way (:mod:`~diffworld.sims.constitutive.kernels_neural`)."""

    @staticmethod
    def forward(ctx, F, inv_scale):
        from diffworld.sims.constitutive.kernels_neural import invariants_forward

        x, R, saved = invariants_forward(F, inv_scale)
        ctx.save_for_backward(F, inv_scale, *saved)
        return x, R

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, gR):
        from diffworld.sims.constitutive.kernels_neural import invariants_adjoint

        F, inv_scale, U, s, V = ctx.saved_tensors
        return invariants_adjoint(F, inv_scale, (U, s, V), gx, gR), None


class _Head(torch.autograd.Function):
    """A network output N (n, 9) made a stress ``c R sym(N) F^T`` (mode 0) or a plastic update
    ``F + c R sym(N)`` (mode 1); one Warp kernel each way."""

    @staticmethod
    def forward(ctx, F, R, N, coef, mode):
        from diffworld.sims.constitutive.kernels_neural import head_forward

        ctx.save_for_backward(F, R, N)
        ctx.coef, ctx.mode = coef, mode
        return head_forward(F, R, N, coef, mode)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from diffworld.sims.constitutive.kernels_neural import head_adjoint

        F, R, N = ctx.saved_tensors
        gF, gR, gN = head_adjoint(F, R, N, ctx.coef, ctx.mode, g)
        return gF, gR, gN.to(N.dtype), None, None


def _scaled_invariants(F: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / input_scale (n, 13), R (n, 3, 3)) of F (n, 3, 3)."""
    return _Invariants.apply(F, 1.0 / input_scale.to(F))


def invariants(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NCLaw's 13 rotation-invariant inputs of F (..., 3, 3) and its rotation R.

    Differentiable (one Warp kernel each way; the rotation's adjoint is the polar decomposition's
    closed form, as in :func:`rotation_and_singular_values`).

    Returns:
        (x (..., 13): ``sigma - 1``, ``vec(F^T F - I)``, ``det F - 1``; R (..., 3, 3)).
    """
    batch = F.shape[:-2]
    x, R = _scaled_invariants(F.reshape(-1, 3, 3), torch.ones(N_INVARIANTS, dtype=F.dtype, device=F.device))
    return x.reshape(*batch, N_INVARIANTS), R.reshape(*batch, 3, 3)


# Below this many columns, a product's result is computed as its transpose: ``A @ B`` as
# ``(B^T A^T)^T``. With a thousand rows and 9 or 13 columns, BLAS (MKL) runs the transposed form
# about twice as fast (measured on a 2-core AMD EPYC, MKL 2024.2: 1000 x 64 times 64 x 9, 51 ->
# 25 us; 64 x 1000 times 1000 x 13, 65 -> 29 us); at 64 columns both forms cost the same.
_NARROW = 16


def _mm(A: torch.Tensor, B: torch.Tensor, flat: bool = True) -> torch.Tensor:
    """``A @ B`` (2-d) in the faster of the two operand orders (see :data:`_NARROW`); contiguous
    with ``flat``, else a narrow result may come as the transpose of a contiguous matrix (copying
    a thousand such rows costs about as much as the product: the substep stage's kernels read it
    in place, through its strides)."""
    if B.shape[1] < _NARROW:
        out = torch.mm(B.t(), A.t()).t()
        return out.contiguous() if flat else out
    return torch.mm(A, B)


def _mlp_forward(weights, x: torch.Tensor, keep: bool = True, flat: bool = True):
    """The bias-free GELU MLP ``x (n, k) -> y (n, m)`` with weights ``W_0 .. W_L``; with ``keep``
    also what :func:`_mlp_backward` needs (each layer's input and pre-activation); y is contiguous
    with ``flat``, else possibly a transposed view (:func:`_mm`)."""
    a, saved = x, []
    last = len(weights) - 1
    for k, W in enumerate(weights):
        h = _mm(a, W.t(), flat or k < last)
        if k < last:
            if keep:
                saved += [a, h]
            a = torch.nn.functional.gelu(h)
        elif keep:
            saved.append(a)
    return h, saved


def _mlp_backward(weights, saved, g: torch.Tensor, need_x: bool, need_w, flat: bool = True) -> tuple:
    """(d loss / dx or None, [d loss / dW_k or None]) of :func:`_mlp_forward` from d loss / dy;
    ``need_w``: which weights' gradients to compute; d loss / dx is contiguous with ``flat``, else
    possibly a transposed view (:func:`_mm`)."""
    L = len(weights)
    gw = [None] * L
    gx = None
    g = g.contiguous()
    for k in range(L - 1, -1, -1):
        a = saved[2 * k]  # the layer's input
        if need_w[k]:
            gw[k] = _mm(g.t(), a)
        if k == 0:
            if need_x:
                gx = _mm(g, weights[0], flat)
            break
        g = torch.ops.aten.gelu_backward(_mm(g, weights[k]), saved[2 * k - 1])
    return gx, gw


class _BiasFreeMLP(torch.autograd.Function):
    """The bias-free GELU MLP as one op with a hand-written backward: the same matrix products
    and ``gelu_backward`` as autograd's, without its per-node overhead (the MLP runs twice per
    MPM substep on a thousand rows, where that overhead is a third of the backward)."""

    @staticmethod
    def forward(ctx, x, *weights):
        h, saved = _mlp_forward(weights, x)
        ctx.save_for_backward(*weights, *saved)
        ctx.n_layers = len(weights)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        L = ctx.n_layers
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw = _mlp_backward(tensors[:L], tensors[L:], g, need[0], need[1:])
        return (gx, *gw)


def _mlp(mlp: "_MLP", x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a 2-d x, through :class:`_BiasFreeMLP` (same numbers as ``mlp.forward``
    up to the round-off of the matrix products' order)."""
    return _BiasFreeMLP.apply(x, *(layer.weight for layer in mlp.layers))


def _sym(A: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A + A.transpose(-1, -2))


# ---------------------------------------------------------------------------------- networks


class _MLP(torch.nn.Module):
    """Bias-free MLP with GELU (NCLaw's): zero in, zero out."""

    def __init__(self, n_in: int, width: int, depth: int, n_out: int) -> None:
        super().__init__()
        sizes = [n_in] + [width] * depth + [n_out]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            torch.nn.init.xavier_uniform_(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


class _Part(torch.nn.Module):
    """A network part of a neural law: its architecture as a JSON-able dict."""

    kind = ""

    def __init__(self, width: int = 64, depth: int = 2, input_scale: Optional[list[float]] = None) -> None:
        super().__init__()
        n_in = self.n_inputs
        scale = torch.ones(n_in) if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float64)
        if scale.shape != (n_in,) or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{type(self).__name__}: input_scale: expected {n_in} finite numbers > 0, got "
                             f"{list(scale.reshape(-1).tolist())}")
        if not (isinstance(width, int) and width >= 1 and isinstance(depth, int) and depth >= 1):
            raise ValueError(f"{type(self).__name__}: expected width and depth integers >= 1, got {width!r}, {depth!r}")
        self.width, self.depth = width, depth
        self.register_buffer("input_scale", scale.to(torch.get_default_dtype()))
        self.mlp = _MLP(n_in, width, depth, 9)

    n_inputs = N_INVARIANTS

    def config(self) -> dict:
        return {"kind": self.kind, "width": self.width, "depth": self.depth,
                "input_scale": [float(v) for v in self.input_scale.tolist()]}

    def _inverse_scale(self, F: torch.Tensor) -> torch.Tensor:
        """``1 / input_scale`` in F's dtype and device, kept until the buffer changes (its version,
        dtype or device): the law's substep stage needs it twice per substep."""
        scale = self.input_scale
        key = (scale.data_ptr(), scale._version, F.dtype, F.device)
        cached = self.__dict__.get("_inverse_scale_cache")
        if cached is None or cached[0] != key:
            cached = (key, (1.0 / scale.to(F)).contiguous())
            self.__dict__["_inverse_scale_cache"] = cached
        return cached[1]

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x / self.input_scale.to(x)).reshape(*x.shape[:-1], 3, 3)


class _ElasticPart(_Part):
    """An elastic part: its network's output times ``output_scale`` [Pa] is the stress, so that
    weights of order one give stresses of the material's order (e.g. its Young's modulus)."""

    def __init__(self, output_scale: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        if not (isinstance(output_scale, (int, float)) and math.isfinite(output_scale) and output_scale > 0):
            raise ValueError(f"{type(self).__name__}: output_scale: expected a finite number > 0 [Pa], got "
                             f"{output_scale!r}")
        self.output_scale = float(output_scale)

    def config(self) -> dict:
        return {**super().config(), "output_scale": self.output_scale}


class InvariantElasticity(_ElasticPart):
    """NCLaw's elasticity: ``tau = output_scale R sym(MLP(x)) F^T`` with the invariants x of F."""

    kind = "invariant"

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        F2 = F.reshape(-1, 3, 3)
        x, R = _scaled_invariants(F2, self.input_scale)
        return _Head.apply(F2, R, _mlp(self.mlp, x), self.output_scale, 0).reshape(F.shape)


class InvariantPlasticity(_Part):
    """NCLaw's plasticity: ``F' = F + alpha R sym(MLP(x))``."""

    kind = "invariant"

    def __init__(self, alpha: float = 1e-3, **kw) -> None:
        super().__init__(**kw)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{type(self).__name__}: alpha: expected a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha}

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        F2 = F.reshape(-1, 3, 3)
        x, R = _scaled_invariants(F2, self.input_scale)
        return _Head.apply(F2, R, _mlp(self.mlp, x), self.alpha, 1).reshape(F.shape)


class PlainElasticity(_ElasticPart):
    """The ablation: ``P = output_scale MLP(vec(F - I))``, ``tau = P F^T`` (zero at F = I, not
    equivariant)."""

    kind = "plain"
    n_inputs = 9

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(3, dtype=F.dtype, device=F.device)
        return self.output_scale * (self._net((F - eye).reshape(*F.shape[:-2], 9)) @ F.transpose(-1, -2))


class PlainPlasticity(_Part):
    """The ablation: ``F' = F + alpha MLP(vec(F - I))``."""

    kind = "plain"
    n_inputs = 9

    def __init__(self, alpha: float = 1e-3, **kw) -> None:
        super().__init__(**kw)
        self.alpha = float(alpha)

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha}

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(3, dtype=F.dtype, device=F.device)
        return F + self.alpha * self._net((F - eye).reshape(*F.shape[:-2], 9))


ELASTIC_KINDS = {"invariant": InvariantElasticity, "plain": PlainElasticity}
PLASTIC_KINDS = {"invariant": InvariantPlasticity, "plain": PlainPlasticity}


# ---------------------------------------------------------------------------------- the law


class NeuralLaw(TorchLaw):
    """A constitutive law whose elasticity and/or plasticity are networks.

    Args:
        elastic: A network part (:class:`InvariantElasticity`, :class:`PlainElasticity`) or the
            name of a built-in law (e.g. ``"fixed_corotated"``: its stress from the particles'
            ``E``, ``nu``).
        plastic: A network part (:class:`InvariantPlasticity`, :class:`PlainPlasticity`), the name
            of a built-in law whose return map is used (e.g. ``"von_mises"``), or None (elastic).
    """

    def __init__(self, elastic: torch.nn.Module | str, plastic: torch.nn.Module | str | None = None) -> None:
        super().__init__()
        self.elastic = BuiltinTorchLaw(elastic) if isinstance(elastic, str) else elastic
        self.plastic = BuiltinTorchLaw(plastic) if isinstance(plastic, str) else plastic
        names: list[str] = []
        for part in (self.elastic, self.plastic):
            if isinstance(part, BuiltinTorchLaw):
                names += [n for n in part.material_parameters if n not in names]
        self.material_parameters = tuple(names)

    def stress(self, F: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(self.elastic, BuiltinTorchLaw):
            return self.elastic.stress(F, params)
        return self.elastic(F)

    def project(self, F: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.plastic is None:
            return F
        if isinstance(self.plastic, BuiltinTorchLaw):
            return self.plastic.project(F, params)
        return self.plastic(F)

    # -- the substep stage without autograd (used by the MPM solver) ------------------------------

    def _stage_parts(self):
        """(plastic, elastic) where both are the plain invariant networks (not subclasses that
        change ``forward``, nor their MLPs and layers) and no forward hook is registered on a
        module whose ``forward`` the stage replaces, else None."""
        p, e = self.plastic, self.elastic
        if not (isinstance(p, InvariantPlasticity) and type(p).forward is InvariantPlasticity.forward
                and isinstance(e, InvariantElasticity) and type(e).forward is InvariantElasticity.forward
                and type(p.mlp).forward is _MLP.forward and type(e.mlp).forward is _MLP.forward):
            return None
        nn = torch.nn.modules.module
        if nn._global_forward_hooks or nn._global_forward_pre_hooks:
            return None
        # the modules the autograd path calls, listed (self.modules() recurses: ~10 us a substep);
        # the stage's MLP is bias-free Linear layers with GELU between them
        for m in (self, p, e, p.mlp, e.mlp):
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        for layer in (*p.mlp.layers, *e.mlp.layers):
            if (type(layer) is not torch.nn.Linear or layer.bias is not None or layer._forward_hooks
                    or layer._forward_pre_hooks):
                return None
        return p, e

    def substep_stage(self, F: torch.Tensor, keep: bool):
        """``forward(F, {})`` (the return map, then the stress there) for F (n, 3, 3) without
        autograd: the kernels and matrix products of the autograd path, with the plastic update
        and the elastic invariants in one kernel (:func:`~.kernels_neural.stage_mid_forward`,
        whose SVD starts from the return map's: the numbers differ from the autograd path's by
        round-off).

        Returns ``(F', tau, saved)`` (``saved``: what :meth:`substep_stage_adjoint` needs, None
        without ``keep``), or None where this law has no such path (the caller then uses autograd).
        """
        from diffworld.sims.constitutive.kernels_neural import (HEAD_STRESS, head_forward, invariants_forward,
                                                                stage_mid_forward)

        parts = self._stage_parts()
        if parts is None or F.dim() != 3:
            return None
        p, e = parts
        F = F.detach()
        with torch.no_grad():
            w_p = [layer.weight for layer in p.mlp.layers]
            w_e = [layer.weight for layer in e.mlp.layers]
            inv_p, inv_e = p._inverse_scale(F), e._inverse_scale(F)
            x_p, R_p, usv_p = invariants_forward(F, inv_p)
            N_p, mlp_p = _mlp_forward(w_p, x_p, keep, flat=False)
            F_new, x_e, R_e, usv_e = stage_mid_forward(F, R_p, N_p, p.alpha, usv_p[2], inv_e)
            N_e, mlp_e = _mlp_forward(w_e, x_e, keep, flat=False)
            tau = head_forward(F_new, R_e, N_e, e.output_scale, HEAD_STRESS)
        saved = None
        if keep:
            saved = (F, inv_p, usv_p, R_p, N_p, w_p, mlp_p, p.alpha,
                     F_new, inv_e, usv_e, R_e, N_e, w_e, mlp_e, e.output_scale)
        return F_new, tau, saved

    def substep_stage_adjoint(self, saved, g_F_new: torch.Tensor | None, g_tau: torch.Tensor,
                              params: Sequence[torch.Tensor] | None = None):
        """Adjoint of :meth:`substep_stage` (``saved`` its last output) from d loss / dF' and
        d loss / d tau: returns (d loss / dF, the gradients of ``params`` in order, None for those
        that do not require one); ``params``: ``list(self.parameters())`` (None: computed here;
        the solver passes the list it already holds)."""
        from diffworld.sims.constitutive.kernels_neural import (HEAD_STRESS, head_adjoint, invariants_adjoint,
                                                                stage_mid_adjoint)

        F, inv_p, usv_p, R_p, N_p, w_p, mlp_p, alpha, F_new, inv_e, usv_e, R_e, N_e, w_e, mlp_e, coef_e = saved
        with torch.no_grad():
            gF_head, gR_e, gN_e = head_adjoint(F_new, R_e, N_e, coef_e, HEAD_STRESS, g_tau)
            gx_e, gw_e = _mlp_backward(w_e, mlp_e, gN_e.to(N_e.dtype), True, [w.requires_grad for w in w_e],
                                       flat=False)
            if g_F_new is None:
                g_F_new = torch.zeros_like(F_new)
            g_mid, gR_p, gN_p = stage_mid_adjoint(F_new, inv_e, usv_e, gx_e, gR_e, gF_head, g_F_new, R_p, N_p,
                                                  alpha)
            gx_p, gw_p = _mlp_backward(w_p, mlp_p, gN_p.to(N_p.dtype), True, [w.requires_grad for w in w_p],
                                       flat=False)
            g_F = g_mid + invariants_adjoint(F, inv_p, usv_p, gx_p, gR_p)
        grads = {id(w): g for w, g in zip(w_p + w_e, gw_p + gw_e) if g is not None}
        return g_F, [grads.get(id(q)) for q in (self.parameters() if params is None else params)]

    def config(self) -> dict:
        """The architecture (what :func:`load_law` needs besides the weights)."""

        def part(p):
            if p is None:
                return None
            if isinstance(p, BuiltinTorchLaw):
                return {"kind": "builtin", "law": p.law.name}
            return p.config()

        return {"format": "diffworld.neural_law", "version": FORMAT_VERSION, "elastic": part(self.elastic),
                "plastic": part(self.plastic)}


def _part_from_config(cfg, kinds: dict, where: str):
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"{where}: expected a mapping with 'kind', got {cfg!r}")
    kind = cfg["kind"]
    if kind == "builtin":
        return cfg.get("law")
    if kind not in kinds:
        raise ValueError(f"{where}.kind: expected one of {sorted([*kinds, 'builtin'])}, got {kind!r}")
    kw = {k: cfg[k] for k in ("width", "depth", "input_scale", "alpha", "output_scale") if k in cfg}
    if "alpha" in kw and kinds is ELASTIC_KINDS:
        raise ValueError(f"{where}: 'alpha' is for a plastic part")
    if "output_scale" in kw and kinds is PLASTIC_KINDS:
        raise ValueError(f"{where}: 'output_scale' is for an elastic part")
    unknown = sorted(set(cfg) - {"kind", "width", "depth", "input_scale", "alpha", "output_scale"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    return kinds[kind](**kw)


def law_from_config(cfg: dict, where: str = "law") -> NeuralLaw:
    """A freshly initialised :class:`NeuralLaw` of the architecture ``cfg`` (:meth:`NeuralLaw.config`)."""
    if not isinstance(cfg, dict) or cfg.get("format") != "diffworld.neural_law":
        raise ValueError(f"{where}: not a diffworld neural law description (expected 'format': "
                         f"'diffworld.neural_law')")
    if cfg.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}: version {cfg.get('version')!r}; this diffworld reads version {FORMAT_VERSION}")
    elastic = _part_from_config(cfg.get("elastic"), ELASTIC_KINDS, f"{where}.elastic")
    if elastic is None:
        raise ValueError(f"{where}.elastic: required")
    return NeuralLaw(elastic, _part_from_config(cfg.get("plastic"), PLASTIC_KINDS, f"{where}.plastic"))


def save_law(law: NeuralLaw, path: str | Path) -> Path:
    """Write ``law`` as ``path`` (``.pt``: the state dict, float64) and its ``.json`` sibling
    (the architecture). Returns the ``.pt`` path."""
    from diffworld.engine.files import atomic_write

    p = Path(path).with_suffix(".pt")
    state = {k: v.detach().to("cpu", torch.float64) for k, v in law.state_dict().items()}
    atomic_write(p, lambda f: torch.save(state, f))
    text = json.dumps(law.config(), indent=2)
    atomic_write(p.with_suffix(".json"), lambda f: f.write(text.encode()))
    return p


def load_law(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> NeuralLaw:
    """Read a law written by :func:`save_law` (``path``: the ``.pt`` file or its ``.json``).

    Raises:
        ValueError: A missing file, a description that is not a neural law's, or weights of
            another architecture (the mismatching tensor and both shapes named).
    """
    p = Path(path)
    pt, js = p.with_suffix(".pt"), p.with_suffix(".json")
    for f in (pt, js):
        if not f.is_file():
            raise ValueError(f"{f}: no such file (a neural law is a .pt state dict beside a .json description)")
    try:
        cfg = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{js}: not JSON ({exc})") from None
    law = law_from_config(cfg, where=str(js))
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same answer
        raise ValueError(f"{pt}: cannot read the weights ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{pt}: expected a state dict, got {type(state).__name__}")
    own = law.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{pt}: weights of another architecture than {js.name} describes: missing {missing}, "
                         f"unexpected {extra}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{pt}: {k} has shape {tuple(state[k].shape)}, the architecture in {js.name} needs "
                             f"{tuple(v.shape)}")
        if not bool(torch.isfinite(state[k]).all()):
            raise ValueError(f"{pt}: {k} has non-finite values")
    law.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return law.to(dtype=dtype, device=device)
