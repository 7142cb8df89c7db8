"""Differentiable MLS-MPM: fluids, elastic and plastic solids, colliders, checkpointed rollouts.

Quick start::

    from diffworld.geometry.sdf import Box
    from diffworld.sims import mpm

    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=32)
    model, state = mpm.build_model(grid, [mpm.Body(Box((0.1,) * 3, (0.5, 0.5, 0.3)), mpm.material("jelly"))],
                                   dt=2e-4)
    out = mpm.rollout(model, state, n_substeps=100, window=20)
"""

from diffworld.sims.mpm.bodies import Body, build_model, fill_shape, use_law
from diffworld.sims.mpm.emitters import Emitter
from diffworld.sims.mpm.materials import MATERIALS, Material, material
from diffworld.sims.mpm.rollout import Rollout, SimulationError, check_state, rollout, stable_dt
from diffworld.sims.mpm.solver import PARTICLE_PARAMS, Collider, GridSpec, Model, ParticleParams, State, Stepper

__all__ = [
    "Body",
    "Collider",
    "Emitter",
    "GridSpec",
    "MATERIALS",
    "Material",
    "Model",
    "PARTICLE_PARAMS",
    "ParticleParams",
    "Rollout",
    "SimulationError",
    "State",
    "Stepper",
    "build_model",
    "check_state",
    "fill_shape",
    "material",
    "rollout",
    "stable_dt",
    "use_law",
]
