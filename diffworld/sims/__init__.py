"""Differentiable simulators, one package each: `mpm` (MLS-MPM: fluids, elastic, plastic and
granular matter, rigid bodies, kinematic colliders, emitters). Shared rooms: `common` (colliders,
quaternions) and `constitutive` (laws as objects: Warp device functions, torch references, and
the TorchLaw seam for networks). FEM, tactile and NCLaw come next."""

__all__: list[str] = []
