"""Differentiable simulators, one package each: `mpm` (MLS-MPM: fluids, elastic, plastic and
granular matter, rigid bodies, kinematic colliders, emitters). FEM, tactile and NCLaw come next."""

__all__: list[str] = []
