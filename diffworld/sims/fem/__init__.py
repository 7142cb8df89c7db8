"""Tetrahedral linear-element FEM solids (issue 15): the rest mesh, materials, and the
Model/State/Control solver with the explicit (symplectic Euler) and implicit (backward Euler,
Newton/CG; ``rollout(..., integrator="implicit")``) integrators, differentiable end to end through
checkpoint windows.

Quick start::

    from diffworld.sims import fem

    mesh = fem.TetMesh.box((0, 0, 0), (0.1, 0.02, 0.02), (20, 4, 4))  # [m]
    clamped = mesh.nodes_in_box((0, 0, 0), (0, 0.02, 0.02))
    model = fem.build_model(mesh, E=1e5, nu=0.3, density=1100.0, kinematic=clamped, damping=5.0)
    dt = fem.stable_dt(model).dt  # [s]
    out = fem.rollout(model, model.rest_state(), dt, n_steps=1000, window=50)  # 0.5 s on 1 CPU core

``fem.device_first_piola("stable_neo_hookean", F, E, nu)`` gives the first Piola stress [Pa] of
F (N, 3, 3), differentiable in F, E and nu.

(``diffworld.sims.fem.TetMesh`` is the FEM solid's rest mesh; ``diffworld.geometry.tet_mesh.TetMesh``
is the geometry container FlexiCubes returns, accepted by ``TetMesh.from_flexicubes``.)
"""

from diffworld.sims.fem.implicit import ImplicitStepper, NewtonStats
from diffworld.sims.fem.contact import ContactParams, ContactResult, RigidObject, contact_forces, penalty_energy
from diffworld.sims.fem.materials import (FEM_MATERIALS, FemMaterial, PiolaVJP, check_parameters, device_energy,
                                          device_first_piola, device_first_piola_diff, device_first_piola_vjp,
                                          fem_material, material_code, stable_neo_hookean_E_nu, young_poisson)
from diffworld.sims.fem.mesh import TetMesh
from diffworld.sims.fem.model import Control, Energy, Model, State, build_model, rotation_matrix
from diffworld.sims.fem.rollout import Contact, PARAMS, Rollout, SimulationError, check_state, rollout, step
from diffworld.sims.fem.solver import CFL, StabilityLimit, Stepper, check_dt, stable_dt

__all__ = [
    "Contact",
    "ContactParams",
    "ContactResult",
    "RigidObject",
    "contact_forces",
    "penalty_energy",
    "CFL",
    "Control",
    "Energy",
    "FEM_MATERIALS",
    "FemMaterial",
    "ImplicitStepper",
    "Model",
    "NewtonStats",
    "PARAMS",
    "PiolaVJP",
    "Rollout",
    "SimulationError",
    "StabilityLimit",
    "State",
    "Stepper",
    "TetMesh",
    "build_model",
    "check_dt",
    "check_parameters",
    "check_state",
    "device_energy",
    "device_first_piola",
    "device_first_piola_diff",
    "device_first_piola_vjp",
    "fem_material",
    "material_code",
    "rollout",
    "rotation_matrix",
    "stable_dt",
    "stable_neo_hookean_E_nu",
    "step",
    "young_poisson",
]
