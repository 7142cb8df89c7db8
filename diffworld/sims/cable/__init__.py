"""A differentiable XPBD rope (issue 15: cables): a chain of particles with stretch and bending
constraints solved by coloured Gauss-Seidel on Warp kernels, gravity, damping, an optional table
with penalty contact and regularized Coulomb friction, and pinned particles driven by the control;
differentiable end to end through checkpoint windows (docs/cable.md).

Quick start::

    from diffworld.sims import cable

    pts = cable.rope_points((0, 0, 0.3), (0.3, 0, 0.3), 16)  # [m]
    model = cable.build_rope(pts, linear_density=0.02, radius=2e-3, bend_compliance=0.5,
                             pinned=[0], damping=0.5, dtype=torch.float64)
    out = cable.rollout(model, model.rest_state(), dt=2e-3, n_steps=500, window=50)
"""

from diffworld.sims.cable.model import (BENDING, Control, Energy, Ground, Model, State, bend_compliance_from_EI,
                                        build_rope, rope_points)
from diffworld.sims.cable.rollout import (PARAMS, Rollout, RopeSimulator, SimulationError, check_ground_dt,
                                          rollout, rope_params)
from diffworld.sims.cable.solver import GROUND_PARAMS, STEP_PARAMS, RopeStepper

__all__ = [
    "BENDING",
    "Control",
    "Energy",
    "GROUND_PARAMS",
    "Ground",
    "Model",
    "PARAMS",
    "Rollout",
    "RopeSimulator",
    "RopeStepper",
    "STEP_PARAMS",
    "SimulationError",
    "State",
    "bend_compliance_from_EI",
    "build_rope",
    "check_ground_dt",
    "rollout",
    "rope_params",
    "rope_points",
]
