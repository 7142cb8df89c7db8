"""Materials of the MPM solver: names, default parameters, and torch references of every law.

A material is a constitutive law (:data:`diffworld.sims.constitutive.LAWS`: Warp device
functions and torch references) plus its parameters.
Parameters live per particle as device arrays so that each one can take a gradient:

=================  ==========================================================================
``E`` [Pa]         Young's modulus (fluids: sets the bulk stiffness ``lambda``)
``nu`` [-]         Poisson's ratio, in (-1, 0.5)
``density``        [kg/m^3]
``viscosity``      dynamic viscosity eta [Pa s] of a Newtonian stress ``2 eta dev(sym(grad v))``
``yield_stress``   von Mises yield stress tau_y [Pa] (plasticine)
``friction_angle`` Drucker-Prager friction angle [deg] (sand)
``theta_c``        snow: compression limit of singular values (1 - theta_c)
``theta_s``        snow: stretch limit of singular values (1 + theta_s)
=================  ==========================================================================

The torch functions here look a law up by name and run its references (energy densities, whose
F-derivative is the first Piola stress, stresses and return maps, written with ``torch.linalg``);
``device_stress`` and ``device_projection`` run the Warp device laws as differentiable torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from diffworld.sims.constitutive.laws import LAWS, lame
from diffworld.sims.constitutive.laws import law as law_of

__all__ = [
    "MATERIALS",
    "PARAMETERS",
    "Material",
    "device_projection",
    "device_stress",
    "energy_density",
    "kirchhoff_stress",
    "lame",
    "material",
    "plastic_projection",
]

PARAMETERS = ("E", "nu", "density", "viscosity", "yield_stress", "friction_angle", "theta_c", "theta_s")

# The one definition of each parameter: unit and meaning, and its physical range (a test and its
# wording). Material.validate and the scene format's material section both use it.
PARAMETER_DOCS = {
    "E": "Young's modulus [Pa].",
    "nu": "Poisson's ratio.",
    "density": "[kg/m^3].",
    "viscosity": "Dynamic viscosity [Pa s].",
    "yield_stress": "von Mises yield stress [Pa].",
    "friction_angle": "Drucker-Prager friction angle [deg].",
    "theta_c": "Snow: critical compression (fraction).",
    "theta_s": "Snow: critical stretch (fraction).",
}
PARAMETER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "E": (lambda v: v > 0, "> 0"),
    "nu": (lambda v: -1 < v < 0.5, "in (-1, 0.5)"),
    "density": (lambda v: v > 0, "> 0"),
    "viscosity": (lambda v: v >= 0, ">= 0"),
    "yield_stress": (lambda v: v > 0, "> 0"),
    "friction_angle": (lambda v: 0 <= v < 90, "in [0, 90) degrees"),
    "theta_c": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "theta_s": (lambda v: v >= 0, ">= 0"),
}


def parameter_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the material parameter ``name`` (None: nothing)."""
    ok, want = PARAMETER_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        return f"expected a finite number {want}, got {value!r}"
    return None


# name -> (law, default parameters). Defaults follow FluidLab/NCLaw, rescaled to SI units.
MATERIALS: dict[str, tuple[str, dict[str, float]]] = {
    "water": ("fluid", dict(E=1.0e5, nu=0.3, density=1000.0, viscosity=0.0)),
    "viscous": ("fluid", dict(E=1.0e5, nu=0.3, density=1000.0, viscosity=10.0)),
    "elastic": ("corotated", dict(E=1.0e5, nu=0.2, density=1000.0)),
    "jelly": ("corotated", dict(E=1.0e5, nu=0.2, density=1000.0)),
    "neo_hookean": ("neo_hookean", dict(E=1.0e5, nu=0.3, density=1000.0)),
    "snow": ("snow", dict(E=1.4e5, nu=0.2, density=400.0, theta_c=2.5e-2, theta_s=7.5e-3)),
    "plasticine": ("von_mises", dict(E=3.0e5, nu=0.25, density=1000.0, yield_stress=5.0e3)),
    "sand": ("drucker_prager", dict(E=1.0e6, nu=0.2, density=1600.0, friction_angle=25.0)),
    # Rigid: particles moved as one rigid body (shape matching after every substep); E and nu only
    # set the time-step limit of the contact response, so they are kept soft.
    "rigid": ("rigid", dict(E=1.0e4, nu=0.3, density=500.0)),
}


@dataclass
class Material:
    """One material: a named law and its parameters.

    Attributes:
        name: A key of :data:`MATERIALS` (water, viscous, elastic, jelly, neo_hookean, snow,
            plasticine, sand, rigid).
        E, nu, density, viscosity, yield_stress, friction_angle, theta_c, theta_s: see the module
            docstring; ``None`` takes the material's default.
    """

    name: str
    E: float | None = None
    nu: float | None = None
    density: float | None = None
    viscosity: float | None = None
    yield_stress: float | None = None
    friction_angle: float | None = None
    theta_c: float | None = None
    theta_s: float | None = None
    law: str = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in MATERIALS:
            raise ValueError(f"material: unknown name {self.name!r}; expected one of {sorted(MATERIALS)}")
        law, defaults = MATERIALS[self.name]
        self.law = law
        base = dict(E=1.0e5, nu=0.3, density=1000.0, viscosity=0.0, yield_stress=1.0e30, friction_angle=30.0,
                    theta_c=2.5e-2, theta_s=7.5e-3)
        base.update(defaults)
        for f in fields(self):
            if f.name in PARAMETERS and getattr(self, f.name) is None:
                setattr(self, f.name, base[f.name])
        self.validate()

    def validate(self) -> None:
        """Range checks with messages that name the parameter.

        Raises:
            ValueError: A parameter outside its physical range.
        """
        for name in PARAMETERS:
            problem = parameter_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"material '{self.name}': {name} {problem}")

    @property
    def law_id(self) -> int:
        """The law's Warp dispatch code."""
        return LAWS[self.law].code

    def parameters(self) -> dict[str, float]:
        """Per-particle parameter values, with friction_angle converted to radians."""
        out = {p: float(getattr(self, p)) for p in PARAMETERS}
        out["friction_angle"] = math.radians(out["friction_angle"])
        return out


def material(name: str, **params: float) -> Material:
    """Shorthand for :class:`Material`."""
    return Material(name, **params)


# ------------------------------------------------------------------------------------------------
# Torch references by law name (batched over a leading dimension; F has shape (N, 3, 3)); each
# delegates to the law object (diffworld.sims.constitutive.laws.LAWS)
# ------------------------------------------------------------------------------------------------

def energy_density(law: str, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Elastic energy density psi(F) [J/m^3] of a law, shape (N,). Its F-derivative is P."""
    return law_of(law).energy(F, dict(E=E, nu=nu))


def kirchhoff_stress(law: str, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Closed-form Kirchhoff stress tau = P F^T [Pa] of a law, shape (N, 3, 3)."""
    return law_of(law).stress(F, dict(E=E, nu=nu))


def plastic_projection(law: str, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor, yield_stress: torch.Tensor,
                       friction_angle: torch.Tensor, theta_c: torch.Tensor, theta_s: torch.Tensor) -> torch.Tensor:
    """Return mapping of a trial deformation gradient (angles in radians), shape (N, 3, 3)."""
    return law_of(law).project(F, dict(E=E, nu=nu, yield_stress=yield_stress, friction_angle=friction_angle,
                                       theta_c=theta_c, theta_s=theta_s))


# ------------------------------------------------------------------------------------------------
# The device laws as torch ops (inspection, tests): forward and adjoint launch the Warp kernels
# ------------------------------------------------------------------------------------------------

def _law_ids(law: str, n: int, device) -> torch.Tensor:
    return torch.full((n,), law_of(law).code, dtype=torch.int32, device=device)


class _KernelOp(torch.autograd.Function):
    """y = kernel(F, *params) for the per-particle kernels ``stress_eval`` and ``plasticity``."""

    @staticmethod
    def forward(ctx, name: str, law: torch.Tensor, F: torch.Tensor, *params: torch.Tensor):
        from diffworld.engine.bridge import launch, to_warp

        k = _kernels(F.dtype)
        F = F.contiguous()
        params = tuple(p.contiguous() for p in params)
        out = torch.empty_like(F)
        ins = [to_warp(F, k["mat33"]), to_warp(law), *(to_warp(p) for p in params)]
        launch(k[name], F.shape[0], ins, F.device, outputs=[to_warp(out, k["mat33"])])
        ctx.name, ctx.law = name, law
        ctx.save_for_backward(F, *params)
        return out

    @staticmethod
    def backward(ctx, g):
        from diffworld.engine.bridge import launch, to_warp

        F, *params = ctx.saved_tensors
        k = _kernels(F.dtype)
        gF = torch.zeros_like(F)
        gp = [torch.zeros_like(p) for p in params]
        ins = [to_warp(F, k["mat33"]), to_warp(ctx.law), *(to_warp(p) for p in params)]
        launch(k[ctx.name], F.shape[0], ins, F.device, outputs=[to_warp(torch.empty_like(F), k["mat33"])],
               adjoint=True, adj_inputs=[to_warp(gF, k["mat33"]), None, *(to_warp(p) for p in gp)],
               adj_outputs=[to_warp(g.contiguous(), k["mat33"])])
        return (None, None, gF, *gp)


def _kernels(dtype: torch.dtype) -> dict:
    from diffworld.sims.mpm.kernels import build

    return build("float64" if dtype == torch.float64 else "float32")


def device_stress(law: str, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Kirchhoff stress of the Warp device law, differentiable (shape (N, 3, 3))."""
    return _KernelOp.apply("stress_eval", _law_ids(law, F.shape[0], F.device), F, E, nu)


def device_projection(law: str, F: torch.Tensor, E: torch.Tensor, nu: torch.Tensor, yield_stress: torch.Tensor,
                      friction_angle: torch.Tensor, theta_c: torch.Tensor, theta_s: torch.Tensor) -> torch.Tensor:
    """Plastic projection of the Warp device law, differentiable (shape (N, 3, 3))."""
    return _KernelOp.apply("plasticity", _law_ids(law, F.shape[0], F.device), F, E, nu, yield_stress,
                           friction_angle, theta_c, theta_s)
