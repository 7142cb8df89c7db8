"""Couplings between simulators in one differentiable step (issue 15): FEM gels with MPM bodies
(forces into the MPM grid, :mod:`.fem_mpm`) and with XPBD cables (:mod:`.fem_cable`). Each coupled
simulator is an :class:`~diffworld.engine.rollout.Simulator` whose state concatenates its parts'
states, so checkpoint windows and float64 gradient checks work as for one system.

The modules are imported on demand (``from diffworld.sims.coupling import fem_mpm``): each
compiles its own Warp kernels.
"""
