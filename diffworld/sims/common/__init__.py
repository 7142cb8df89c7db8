"""What the simulators share: kinematic colliders (shape, contact parameters, motion as torch ops)
and quaternions. MPM uses them today; the FEM will too."""

from diffworld.sims.common.colliders import COLLIDER_STATE, SHAPES, Collider

__all__ = ["COLLIDER_STATE", "Collider", "SHAPES"]
