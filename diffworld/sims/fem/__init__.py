"""Tetrahedral linear-element FEM solids (issue 15): the rest mesh, materials, and (next) the
Model/State/Control solver with explicit and implicit integrators.

Quick start::

    from diffworld.sims import fem

    mesh = fem.TetMesh.box((0, 0, 0), (0.1, 0.02, 0.02), (20, 4, 4))  # [m]
    clamped = mesh.nodes_in_box((0, 0, 0), (0, 0.02, 0.02))
    masses = mesh.lumped_masses(1100.0)  # [kg]
    P = fem.device_first_piola("stable_neo_hookean", F, E, nu)  # [Pa], differentiable

(``diffworld.sims.fem.TetMesh`` is the FEM solid's rest mesh; ``diffworld.geometry.tet_mesh.TetMesh``
is the geometry container FlexiCubes returns, accepted by ``TetMesh.from_flexicubes``.)
"""

from diffworld.sims.fem.materials import (FEM_MATERIALS, FemMaterial, PiolaVJP, check_parameters, device_energy,
                                          device_first_piola, device_first_piola_diff, device_first_piola_vjp,
                                          fem_material, material_code, stable_neo_hookean_E_nu, young_poisson)
from diffworld.sims.fem.mesh import TetMesh

__all__ = [
    "FEM_MATERIALS",
    "FemMaterial",
    "PiolaVJP",
    "TetMesh",
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
