"""Constitutive laws as objects: the parameters each reads, by name, and its torch reference.

A law maps a deformation gradient ``F`` (shape (N, 3, 3)) and per-particle parameters to the
elastic Kirchhoff stress ``tau = P F^T`` [Pa] and, if it is plastic, returns a trial ``F`` to the
admissible set (the return map, applied after every substep's G2P). The built-in laws are
:class:`Law` entries of :data:`LAWS`; each has

* ``code``: the integer a Warp kernel dispatches on (:mod:`.warp_laws`, where its device functions
  and hand-written adjoints live, shared by every simulator);
* ``parameters``: the material parameters it reads, by name (keys of the ``params`` dicts below);
* ``energy``, ``stress``, ``project``: torch references, written with ``torch.linalg`` (tests
  compare the device functions with them; :class:`~.torch_law.BuiltinTorchLaw` runs them in a
  simulation). Units: ``E``, ``yield_stress`` [Pa]; ``friction_angle`` [rad]; the rest unitless.

A law written in torch (a network, NCLaw) plugs into the same seam through
:class:`~.torch_law.TorchLaw`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from diffworld.sims.constitutive import warp_laws
from diffworld.sims.constitutive.warp_svd import LOG_CLAMP

__all__ = ["LAWS", "Law", "law", "lame"]

Params = Mapping[str, torch.Tensor]


def lame(E: torch.Tensor, nu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lame parameters (mu, lambda) [Pa] from Young's modulus [Pa] and Poisson's ratio."""
    return E / (2 * (1 + nu)), E * nu / ((1 + nu) * (1 - 2 * nu))


def _eye(F: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=F.dtype, device=F.device).expand_as(F)


def _lame3(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    mu, lam = lame(p["E"], p["nu"])
    return mu[:, None, None], lam[:, None, None]


def _hencky_strain(F: torch.Tensor):
    U, s, Vh = torch.linalg.svd(F)
    return U, s, Vh, torch.log(s.clamp_min(LOG_CLAMP))


# -- energies psi(F) [J/m^3], shape (N,) ----------------------------------------------------------

def _fluid_energy(F, p):
    _, lam = lame(p["E"], p["nu"])
    return 0.5 * lam * (torch.linalg.det(F) - 1) ** 2


def _corotated_energy(F, p):
    mu, lam = lame(p["E"], p["nu"])
    s = torch.linalg.svdvals(F)
    return mu * ((s - 1) ** 2).sum(-1) + 0.5 * lam * (torch.linalg.det(F) - 1) ** 2


def _neo_hookean_energy(F, p):
    mu, lam = lame(p["E"], p["nu"])
    logJ = torch.log(torch.linalg.det(F))
    return 0.5 * mu * ((F * F).sum((-1, -2)) - 3) - mu * logJ + 0.5 * lam * logJ ** 2


def _hencky_energy(F, p):
    mu, lam = lame(p["E"], p["nu"])
    eps = torch.log(torch.linalg.svdvals(F).clamp_min(LOG_CLAMP))
    return mu * (eps ** 2).sum(-1) + 0.5 * lam * eps.sum(-1) ** 2


def _no_energy(F, p):
    return torch.zeros(F.shape[0], dtype=F.dtype, device=F.device)


# -- Kirchhoff stresses tau = P F^T [Pa], shape (N, 3, 3) -----------------------------------------

def _fluid_stress(F, p):
    _, lam = _lame3(p)
    J = torch.linalg.det(F)[:, None, None]
    return lam * J * (J - 1) * _eye(F)


def _corotated_stress(F, p):
    mu, lam = _lame3(p)
    J = torch.linalg.det(F)[:, None, None]
    U, _, Vh = torch.linalg.svd(F)
    return 2 * mu * (F - U @ Vh) @ F.transpose(-1, -2) + lam * J * (J - 1) * _eye(F)


def _neo_hookean_stress(F, p):
    mu, lam = _lame3(p)
    J = torch.linalg.det(F)[:, None, None]
    return mu * (F @ F.transpose(-1, -2) - _eye(F)) + lam * torch.log(J) * _eye(F)


def _hencky_stress(F, p):
    mu, lam = lame(p["E"], p["nu"])
    U, _, _, eps = _hencky_strain(F)
    t = 2 * mu[:, None] * eps + lam[:, None] * eps.sum(-1, keepdim=True)
    return U @ torch.diag_embed(t) @ U.transpose(-1, -2)


def _no_stress(F, p):
    return torch.zeros_like(F)


# -- return maps, shape (N, 3, 3) ------------------------------------------------------------------

def _elastic(F, p):
    return F


def _fluid_project(F, p):
    return torch.linalg.det(F).pow(1 / 3)[:, None, None] * _eye(F)


def _snow_project(F, p):
    U, s, Vh = torch.linalg.svd(F)
    s_new = torch.minimum(torch.maximum(s, (1 - p["theta_c"])[:, None]), (1 + p["theta_s"])[:, None])
    return U @ torch.diag_embed(s_new) @ Vh


def _von_mises_project(F, p):
    U, _, Vh, eps = _hencky_strain(F)
    mu, _ = lame(p["E"], p["nu"])
    tr = eps.sum(-1, keepdim=True)
    dev = eps - tr / 3
    ndev = dev.norm(dim=-1, keepdim=True)
    r = (p["yield_stress"] / (2 * mu))[:, None]
    eps_new = torch.where(ndev > r, tr / 3 + r * dev / ndev.clamp_min(1e-30), eps)
    return U @ torch.diag_embed(torch.exp(eps_new)) @ Vh


def _drucker_prager_project(F, p):
    U, _, Vh, eps = _hencky_strain(F)
    nu = p["nu"]
    tr = eps.sum(-1, keepdim=True)
    dev = eps - tr / 3
    ndev = dev.norm(dim=-1, keepdim=True)
    sphi = torch.sin(p["friction_angle"])
    alpha = (math.sqrt(2 / 3) * 2 * sphi / (3 - sphi))[:, None]
    ratio = ((1 + nu) / (1 - 2 * nu))[:, None]
    dgam = ndev + ratio * tr * alpha
    eps_new = torch.where((dgam > 0) & (ndev > 0), eps - dgam * dev / ndev.clamp_min(1e-30), eps)
    eps_new = torch.where(tr >= 0, torch.zeros_like(eps), eps_new)
    return U @ torch.diag_embed(torch.exp(eps_new)) @ Vh


@dataclass(frozen=True)
class Law:
    """A built-in constitutive law.

    Attributes:
        name: Its key in :data:`LAWS`.
        code: The Warp dispatch code (:mod:`.warp_laws` constants).
        parameters: Material parameters its stress and return map read, by name.
        plastic: Whether it has a return map (else ``project`` is the identity).
        energy: Torch reference ``psi(F, params)`` [J/m^3], shape (N,) (its F-derivative is P).
        stress: Torch reference ``tau(F, params)`` [Pa], shape (N, 3, 3).
        project: Torch reference return map ``F_new(F_trial, params)``, shape (N, 3, 3).
        doc: One line for the docs.
    """

    name: str
    code: int
    parameters: tuple[str, ...]
    plastic: bool
    energy: Callable[[torch.Tensor, Params], torch.Tensor]
    stress: Callable[[torch.Tensor, Params], torch.Tensor]
    project: Callable[[torch.Tensor, Params], torch.Tensor]
    doc: str


_ELASTIC = ("E", "nu")

LAWS: dict[str, Law] = {law.name: law for law in (
    Law("fluid", int(warp_laws.FLUID), _ELASTIC, True, _fluid_energy, _fluid_stress, _fluid_project,
        "weakly compressible fluid, psi = lam/2 (J - 1)^2; the return map forgets shear (F <- J^(1/3) I)"),
    Law("corotated", int(warp_laws.COROTATED), _ELASTIC, False, _corotated_energy, _corotated_stress, _elastic,
        "fixed corotated elasticity (Stomakhin et al. 2012)"),
    Law("neo_hookean", int(warp_laws.NEO_HOOKEAN), _ELASTIC, False, _neo_hookean_energy, _neo_hookean_stress,
        _elastic, "compressible Neo-Hookean elasticity"),
    Law("snow", int(warp_laws.SNOW), ("E", "nu", "theta_c", "theta_s"), True, _corotated_energy, _corotated_stress,
        _snow_project, "fixed corotated with singular values clamped to [1 - theta_c, 1 + theta_s]"),
    Law("von_mises", int(warp_laws.VON_MISES), ("E", "nu", "yield_stress"), True, _hencky_energy, _hencky_stress,
        _von_mises_project, "StVK-Hencky elasticity with a von Mises yield surface (plasticine)"),
    Law("drucker_prager", int(warp_laws.DRUCKER_PRAGER), ("E", "nu", "friction_angle"), True, _hencky_energy,
        _hencky_stress, _drucker_prager_project,
        "StVK-Hencky elasticity with a Drucker-Prager yield surface (sand; Klar et al. 2016)"),
    Law("rigid", int(warp_laws.RIGID), (), False, _no_energy, _no_stress, _elastic,
        "no stress: particles move as one rigid body (shape matching after every substep)"),
)}

# The code of particles whose law is a torch module (TorchLaw), not a built-in.
EXTERNAL = int(warp_laws.EXTERNAL)


def law(name: str) -> Law:
    """The built-in law ``name``.

    Raises:
        ValueError: An unknown name (the message lists the known ones).
    """
    try:
        return LAWS[name]
    except KeyError:
        raise ValueError(f"law: expected one of {list(LAWS)}, got {name!r}") from None
