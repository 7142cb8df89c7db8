"""The ``mpm`` scene task: bodies, emitters, colliders and an objective, optimized through the simulator.

Emitters release particles over time (a pitcher, a dispenser; their nozzle may ride a
collider); losses and renders select them by name like bodies and count only the released ones.

Objectives:

* ``system_identification``: an observed trajectory is simulated with the ``truth`` parameters of
  one body; the parameters start from ``initial`` and are fitted to the observations (positions
  at every control step). Moduli are optimized in log space; bounds are enforced by projection.
* ``trajectory``: the velocities (linear and angular, per control step) of the ``controlled``
  colliders are optimized for a weighted sum of loss terms (:mod:`diffworld.sims.mpm.losses`):
  ``com`` (centre of mass of a body vs a target), ``region`` (fraction of a body inside a box,
  soft), ``shape`` (particles inside a target shape and covering it), ``density`` (PlasticineLab
  shape matching: grid mass vs a target shape, plus the distance outside it), ``chamfer`` (final
  particles vs points filling a target shape), ``target_trajectory`` (positions at every control
  step vs an .npz file), ``mixing`` (intensity of segregation of two bodies on the grid) and
  ``pattern`` (a body seen from above vs a target image: latte art) and ``python`` (a user
  function ``fn(states, info) -> scalar tensor``).
  Aids (FluidLab): action clipping (``max_speed``, ``max_angular_speed``), gradient clipping
  (``optimizer.clip_grad_norm``), ``freeze_steps`` (the first actions are not optimized), ``dofs``
  (only some velocity components are optimized), a ``workspace`` box for a collider's position,
  an initial guess from keyframes, and a ``horizon`` that starts short and grows when progress
  stalls (only the horizon is simulated).

A run writes ``trajectory.npz`` (positions per control step, body ids, collider states),
``before.png``/``after.png`` (particles coloured by body, liquids as a surface mesh, colliders as
meshes), ``rollout.gif``, ``metrics.json``, and the driver's ``log.csv``, ``loss.png`` and
checkpoints.

Rooms: :mod:`.config` (the scene section), :mod:`.build` (model, bodies, colliders, motion),
:mod:`.objectives` (loss terms, horizon, the trajectory problem), :mod:`.outputs` (files and
pictures), :mod:`.run` (the run, registered as ``mpm``).
"""

from diffworld.tasks.mpm import run
from diffworld.tasks.mpm.config import MPMTask
from diffworld.tasks.mpm.objectives import HorizonSchedule, TrajectoryProblem
from diffworld.tasks.mpm.run import run_mpm


__all__ = ["HorizonSchedule", "MPMTask", "TrajectoryProblem", "run", "run_mpm"]
