"""Hyperelastic materials of the FEM solid: per-element laws, torch references, device launches.

A law maps the deformation gradient ``F`` of an element (shape (N, 3, 3)) and its Young's modulus
``E`` [Pa] and Poisson's ratio ``nu`` (shape (N,)) to the energy density ``psi`` [J/m^3] and the
first Piola stress ``P = dpsi/dF`` [Pa]. Every law is differentiable in ``F``, ``E`` and ``nu``;
``E`` and ``nu`` enter through the Lame parameters of
:func:`diffworld.sims.constitutive.lame` (``mu = E / (2 (1 + nu))``,
``lam = E nu / ((1 + nu) (1 - 2 nu))``). All laws are zero-energy and stress-free at ``F = I``
and have the same small-strain response: ``P ~ 2 mu eps + lam tr(eps) I``.

=======================  =========================================================================
``stable_neo_hookean``   Smith, de Goes, Kim 2018 (DiffTactile's gel law); inversion safe (no
                         ``log J``). ``E``, ``nu`` are the small-strain moduli: the paper's energy
                         constants are ``mu_s = 4/3 mu``, ``lam_s = lam + 5/6 mu`` (its section
                         3.4). A model written with raw constants (DiffTactile's
                         ``mu = 1294.01, lambda = 9201.11``) converts with
                         :func:`stable_neo_hookean_E_nu`.
``fixed_corotated``      Stomakhin et al. 2012, ``mu |F - R|^2 + lam/2 (J - 1)^2`` (R: polar
                         rotation with the sign fix, so also defined for inverted F).
``linear``               small strain, ``mu eps:eps + lam/2 tr(eps)^2``, ``eps = sym(F) - I``
                         (not rotation invariant).
=======================  =========================================================================

The torch references (:class:`FemMaterial` methods) are written with ``torch.linalg`` and
explicit polynomials (``det``, cofactor), so autograd of the energy gives the stress also at and
through ``J = 0``. The Warp device functions and kernels are in
:mod:`diffworld.sims.fem.kernels_materials`; the ``device_*`` functions here launch them on torch
tensors (tests, inspection; :func:`device_first_piola` is a differentiable op whose backward is
the hand-written VJP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from diffworld.sims.constitutive.laws import lame
from diffworld.sims.fem import kernels_materials as K

__all__ = [
    "FEM_MATERIALS",
    "FemMaterial",
    "PiolaVJP",
    "check_parameters",
    "device_energy",
    "device_first_piola",
    "device_first_piola_diff",
    "device_first_piola_vjp",
    "fem_material",
    "material_code",
    "stable_neo_hookean_E_nu",
    "young_poisson",
]

LawFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def check_parameters(E, nu) -> None:
    """Reject Young's moduli and Poisson's ratios outside their physical range.

    Args:
        E: Young's modulus [Pa], a number or a tensor (one value per element).
        nu: Poisson's ratio, a number or a tensor.

    Raises:
        ValueError: ``E <= 0`` or ``nu`` outside (-1, 0.5), or a non-finite value; the message
            names the parameter, the first bad value and (for tensors) its element.
    """
    for name, value, ok, want in (("E", E, lambda v: v > 0, "> 0"),
                                  ("nu", nu, lambda v: (v > -1) & (v < 0.5), "in (-1, 0.5)")):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"{name} expected a number or a tensor, got {type(value).__name__}")
        # numbers in float64: a float32 tensor would report 0.7 as 0.699999988
        t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
        bad = ~(torch.isfinite(t) & ok(t))
        if bool(bad.any()):
            idx = torch.nonzero(bad.reshape(-1))[0].item()
            where = f" (element {idx})" if t.dim() > 0 else ""
            raise ValueError(f"{name} expected a finite number {want}, got {t.reshape(-1)[idx].item()!r}{where}")


def young_poisson(mu: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Young's modulus [Pa] and Poisson's ratio from the Lame parameters [Pa] (inverse of lame)."""
    return mu * (3 * lam + 2 * mu) / (lam + mu), lam / (2 * (lam + mu))


def stable_neo_hookean_E_nu(mu_s, lam_s) -> tuple[torch.Tensor, torch.Tensor]:
    """``E`` [Pa] and ``nu`` whose stable Neo-Hookean energy has the raw constants (mu_s, lam_s).

    Smith et al.'s energy with raw constants has small-strain moduli mu = 3/4 mu_s,
    lam = lam_s - 5/8 mu_s; diffworld's parameters are those. DiffTactile's gel
    (mu_s = 1294.01, lam_s = 9201.11 [its units]) is E ~ 2811, nu ~ 0.448.

    Args:
        mu_s, lam_s: The constants of psi = mu_s/2 (I_C - 3) + lam_s/2 (J - alpha)^2 - ... [Pa].

    Returns:
        (E, nu) as tensors of the inputs' shape.
    """
    mu_s, lam_s = (v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
                   for v in (mu_s, lam_s))
    return young_poisson(0.75 * mu_s, lam_s - 0.625 * mu_s)


# ------------------------------------------------------------------------------------------------
# Torch references in terms of (F (N, 3, 3), mu (N,), lam (N,))
# ------------------------------------------------------------------------------------------------

def _det(F: torch.Tensor) -> torch.Tensor:
    """det F as a polynomial (autograd is exact also for singular F)."""
    return (F[..., 0, :] * torch.linalg.cross(F[..., 1, :], F[..., 2, :])).sum(-1)


def _cof(F: torch.Tensor) -> torch.Tensor:
    """Cofactor matrix d det(F)/dF: row i is f_j x f_k of F's rows, (i, j, k) cyclic."""
    f0, f1, f2 = F[..., 0, :], F[..., 1, :], F[..., 2, :]
    return torch.stack([torch.linalg.cross(f1, f2), torch.linalg.cross(f2, f0), torch.linalg.cross(f0, f1)], -2)


def _det_minus_one(F: torch.Tensor) -> torch.Tensor:
    """det(F) - 1 = tr H + I2(H) + det H, H = F - I: no cancellation near rest."""
    H = F - torch.eye(3, dtype=F.dtype, device=F.device)
    d = H.diagonal(0, -2, -1)
    i2 = (d[..., 0] * d[..., 1] + d[..., 0] * d[..., 2] + d[..., 1] * d[..., 2]
          - H[..., 0, 1] * H[..., 1, 0] - H[..., 0, 2] * H[..., 2, 0] - H[..., 1, 2] * H[..., 2, 1])
    return d.sum(-1) + i2 + _det(H)


def _ic_minus_three(F: torch.Tensor) -> torch.Tensor:
    """tr(F^T F) - 3 = |H|^2 + 2 tr H, H = F - I."""
    H = F - torch.eye(3, dtype=F.dtype, device=F.device)
    return (H * H).sum((-1, -2)) + 2 * H.diagonal(0, -2, -1).sum(-1)


def _signed_svd(F: torch.Tensor):
    """SVD with the sign fix: U, V rotations, the smallest singular value negative when J < 0."""
    U, s, Vh = torch.linalg.svd(F)
    d = (torch.linalg.det(U) * torch.linalg.det(Vh)).detach()  # +-1: det(U V^T)
    fix = torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1)
    return U * fix[..., None, :], s * fix, Vh


def _col(x: torch.Tensor) -> torch.Tensor:
    return x[..., None, None]


def _snh_constants(mu, lam):
    return 4.0 / 3.0 * mu, lam + 5.0 / 6.0 * mu


def _snh_energy(F, mu, lam):
    # Smith et al.'s energy minus its rest value: lam_s/2 (J - alpha)^2 expanded, no division;
    # I_C - 3 and J - 1 from F - I so that the first-order terms cancel without rounding loss.
    ms, ls = _snh_constants(mu, lam)
    x = _ic_minus_three(F)
    Jm1 = _det_minus_one(F)
    return 0.5 * ms * (x - torch.log1p(x / 4)) + 0.5 * ls * Jm1 ** 2 - mu * Jm1


def _snh_piola(F, mu, lam):
    ms, ls = _snh_constants(mu, lam)
    Ic = (F * F).sum((-1, -2))
    # lam_s (J - alpha) = lam_s (J - 1) - 3/4 mu_s = lam_s (J - 1) - mu
    return _col(ms * (1 - 1 / (Ic + 1))) * F + _col(ls * _det_minus_one(F) - mu) * _cof(F)


def _corotated_energy(F, mu, lam):
    _, s, _ = _signed_svd(F)  # |F - R|^2 = sum (s_i - 1)^2 with signed singular values
    return mu * ((s - 1) ** 2).sum(-1) + 0.5 * lam * _det_minus_one(F) ** 2


def _corotated_piola(F, mu, lam):
    U, _, Vh = _signed_svd(F)
    return _col(2 * mu) * (F - U @ Vh) + _col(lam * _det_minus_one(F)) * _cof(F)


def _small_strain(F):
    eye = torch.eye(3, dtype=F.dtype, device=F.device)
    return 0.5 * (F + F.transpose(-1, -2)) - eye, eye


def _linear_energy(F, mu, lam):
    eps, _ = _small_strain(F)
    return mu * (eps * eps).sum((-1, -2)) + 0.5 * lam * eps.diagonal(0, -2, -1).sum(-1) ** 2


def _linear_piola(F, mu, lam):
    eps, eye = _small_strain(F)
    return _col(2 * mu) * eps + _col(lam * eps.diagonal(0, -2, -1).sum(-1)) * eye


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------

def _check_inputs(F: torch.Tensor, E, nu) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(F, torch.Tensor) or F.dim() != 3 or tuple(F.shape[1:]) != (3, 3):
        raise ValueError(f"Expected 'F' of shape (N, 3, 3), got {tuple(getattr(F, 'shape', ()))}")
    check_parameters(E, nu)
    n = F.shape[0]
    out = []
    for name, v in (("E", E), ("nu", nu)):
        v = torch.as_tensor(v, dtype=F.dtype, device=F.device)
        if v.dim() == 0:
            v = v.expand(n)
        if tuple(v.shape) != (n,):
            raise ValueError(f"Expected '{name}' of shape ({n},) (one value per element of F), got {tuple(v.shape)}")
        out.append(v)
    return out[0], out[1]


@dataclass(frozen=True)
class FemMaterial:
    """A hyperelastic law of the FEM solid.

    Attributes:
        name: Its key in :data:`FEM_MATERIALS`.
        code: The Warp dispatch code (``kernels_materials`` constants; the elements' ``law`` array).
        energy_lame: Torch reference ``psi(F, mu, lam)`` [J/m^3], shapes (N, 3, 3), (N,), (N,) -> (N,).
        first_piola_lame: Torch reference ``P(F, mu, lam)`` [Pa] -> (N, 3, 3).
        rotation_invariant: Whether ``P(Q F) = Q P(F)`` for rotations Q (``linear``: no).
        doc: One line for the docs.
    """

    name: str
    code: int
    energy_lame: LawFn
    first_piola_lame: LawFn
    rotation_invariant: bool
    doc: str

    def energy(self, F: torch.Tensor, E: torch.Tensor | float, nu: torch.Tensor | float) -> torch.Tensor:
        """Energy density psi(F) [J/m^3], shape (N,), zero at F = I.

        Args:
            F: Deformation gradients, shape (N, 3, 3).
            E: Young's modulus [Pa], shape (N,) or a number.
            nu: Poisson's ratio, shape (N,) or a number, in (-1, 0.5).
        """
        E, nu = _check_inputs(F, E, nu)
        return self.energy_lame(F, *lame(E, nu))

    def first_piola(self, F: torch.Tensor, E: torch.Tensor | float, nu: torch.Tensor | float) -> torch.Tensor:
        """First Piola stress P = dpsi/dF [Pa], shape (N, 3, 3) (arguments as :meth:`energy`)."""
        E, nu = _check_inputs(F, E, nu)
        return self.first_piola_lame(F, *lame(E, nu))


FEM_MATERIALS: dict[str, FemMaterial] = {m.name: m for m in (
    FemMaterial("stable_neo_hookean", int(K.STABLE_NEO_HOOKEAN), _snh_energy, _snh_piola, True,
                "stable Neo-Hookean (Smith et al. 2018), inversion safe; E, nu are its small-strain moduli"),
    FemMaterial("fixed_corotated", int(K.FIXED_COROTATED), _corotated_energy, _corotated_piola, True,
                "fixed corotated elasticity (Stomakhin et al. 2012)"),
    FemMaterial("linear", int(K.LINEAR), _linear_energy, _linear_piola, False,
                "linear (small-strain) elasticity; not rotation invariant"),
)}


def fem_material(name: str) -> FemMaterial:
    """The FEM material ``name``.

    Raises:
        ValueError: An unknown name (the message lists the known ones).
    """
    if not isinstance(name, str) or name not in FEM_MATERIALS:
        raise ValueError(f"FEM material: unknown name {name!r}; expected one of {list(FEM_MATERIALS)}")
    return FEM_MATERIALS[name]


def material_code(name: str) -> int:
    """The Warp dispatch code of the FEM material ``name`` (ValueError listing the names if unknown)."""
    return fem_material(name).code


# ------------------------------------------------------------------------------------------------
# The device laws on torch tensors
# ------------------------------------------------------------------------------------------------

class PiolaVJP(NamedTuple):
    """Gradients of <G, P(F, E, nu)> per element: F (N, 3, 3); mu, lam, E, nu (N,)."""

    F: torch.Tensor
    mu: torch.Tensor
    lam: torch.Tensor
    E: torch.Tensor
    nu: torch.Tensor


def _codes(law: str | torch.Tensor, n: int, device) -> torch.Tensor:
    """Per-element law codes (int32, shape (n,)) from a name or a code tensor."""
    if isinstance(law, str):
        return torch.full((n,), material_code(law), dtype=torch.int32, device=device)
    if not isinstance(law, torch.Tensor) or tuple(law.shape) != (n,):
        raise ValueError(f"Expected 'law' to be a material name or a code tensor of shape ({n},), got {law!r}")
    known = torch.tensor([m.code for m in FEM_MATERIALS.values()], device=law.device)
    if not bool(torch.isin(law, known).all()):
        raise ValueError(f"law codes: expected values in {known.tolist()} ({list(FEM_MATERIALS)})")
    return law.to(device=device, dtype=torch.int32).contiguous()


def _prepare(law, F, E, nu):
    E, nu = _check_inputs(F, E, nu)
    if F.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Expected 'F' of dtype float32 or float64, got {F.dtype}")
    return _codes(law, F.shape[0], F.device), F.detach().contiguous(), E.detach().contiguous(), nu.detach().contiguous()


def _launch(kernel, F: torch.Tensor, inputs: list, outputs: list) -> None:
    from diffworld.engine.bridge import launch, to_warp

    mat33 = _mat33(F.dtype)
    conv = [to_warp(t.detach(), mat33) if t.dim() == 3 else to_warp(t.detach()) for t in inputs]
    outs = [to_warp(t, mat33) if t.dim() == 3 else to_warp(t) for t in outputs]
    launch(kernel, F.shape[0], conv, F.device, outputs=outs)


def _mat33(dtype: torch.dtype):
    import warp as wp

    return wp.types.matrix((3, 3), wp.float64 if dtype == torch.float64 else wp.float32)


def device_energy(law: str | torch.Tensor, F: torch.Tensor, E, nu) -> torch.Tensor:
    """Energy density [J/m^3] of the Warp device law, shape (N,) (not differentiable).

    Args:
        law: A material name, or per-element codes (int tensor, shape (N,)).
        F: Deformation gradients, shape (N, 3, 3), float32 or float64.
        E: Young's modulus [Pa], shape (N,) or a number.
        nu: Poisson's ratio, shape (N,) or a number.
    """
    codes, F, E, nu = _prepare(law, F, E, nu)
    psi = torch.empty(F.shape[0], dtype=F.dtype, device=F.device)
    _launch(K.energy_kernel, F, [codes, F, E, nu], [psi])
    return psi


def device_first_piola_diff(law: str | torch.Tensor, F: torch.Tensor, dF: torch.Tensor, E, nu) -> torch.Tensor:
    """dP/dF : dF [Pa] of the Warp device law, shape (N, 3, 3) (arguments as :func:`device_energy`;
    ``dF`` of F's shape)."""
    codes, F, E, nu = _prepare(law, F, E, nu)
    if tuple(dF.shape) != tuple(F.shape):
        raise ValueError(f"Expected 'dF' of shape {tuple(F.shape)}, got {tuple(dF.shape)}")
    out = torch.empty_like(F)
    _launch(K.dP_kernel, F, [codes, F, dF.detach().to(F.dtype).contiguous(), E, nu], [out])
    return out


def device_first_piola_vjp(law: str | torch.Tensor, F: torch.Tensor, E, nu, G: torch.Tensor) -> PiolaVJP:
    """Hand-written VJP of the Warp device law: gradients of sum_e <G_e, P_e> (arguments as
    :func:`device_energy`; ``G`` of F's shape)."""
    codes, F, E, nu = _prepare(law, F, E, nu)
    if tuple(G.shape) != tuple(F.shape):
        raise ValueError(f"Expected 'G' of shape {tuple(F.shape)}, got {tuple(G.shape)}")
    gF = torch.empty_like(F)
    g = [torch.empty_like(E) for _ in range(4)]
    _launch(K.vjp_kernel, F, [codes, F, E, nu, G.detach().to(F.dtype).contiguous()], [gF, *g])
    return PiolaVJP(gF, *g)


class _FirstPiola(torch.autograd.Function):
    """P = first_piola_kernel(law, F, E, nu); backward: the hand-written VJP (vjp_kernel)."""

    @staticmethod
    def forward(ctx, codes, F, E, nu):
        P = torch.empty_like(F)
        _launch(K.first_piola_kernel, F, [codes, F, E, nu], [P])
        ctx.save_for_backward(codes, F, E, nu)
        return P

    @staticmethod
    @once_differentiable
    def backward(ctx, G):
        codes, F, E, nu = ctx.saved_tensors
        g = device_first_piola_vjp(codes, F, E, nu, G)
        return None, g.F, g.E, g.nu


def device_first_piola(law: str | torch.Tensor, F: torch.Tensor, E, nu) -> torch.Tensor:
    """First Piola stress [Pa] of the Warp device law, shape (N, 3, 3); differentiable in F, E and
    nu (once) through the hand-written VJP. Arguments as :func:`device_energy`."""
    E, nu = _check_inputs(F, E, nu)
    codes = _codes(law, F.shape[0], F.device)
    return _FirstPiola.apply(codes, F.contiguous(), E.contiguous(), nu.contiguous())

