"""Couplings between simulators in one differentiable step (issue 15): FEM gels with MPM bodies
(forces into the MPM grid) and with XPBD cables. Each coupled simulator is an
:class:`~diffworld.engine.rollout.Simulator` whose state concatenates its parts' states, so
checkpoint windows and float64 gradient checks work as for one system.
"""
