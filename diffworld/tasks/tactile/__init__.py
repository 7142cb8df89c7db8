"""The ``tactile`` scene task (issue 15): a vision-based tactile sensor (a GelSight-type dome, a
flat pad, or a parallel-jaw gripper with two pads; FEM) touching a rigid object or MPM bodies
(coupled two-way in every step), optimized through the simulator.

Objectives:

* ``trajectory``: the sensor's per-control-step velocity (the listed ``dofs``) is optimized for
  loss terms on the tactile readings: ``force`` (track a target normal or shear force in the
  sensor frame, e.g. surface following: slide over a bumpy surface at a constant pressing
  force), ``smoothness`` (velocity changes between control steps), and with MPM bodies ``slip``
  (shear over the friction cone), ``com`` (a body's centre of mass) and ``deformation`` (a
  body's final shape vs its initial one): grasp and lift without slip or crushing.
* ``system_identification``: recover the gel's E, nu and the contact's k_n, k_d, k_t, mu from
  the force and marker time series of the scene's probe motion (press and slide); the data come
  from a finer sensor mesh with 2 % noise, so the model is not the data's own.

Contact parameters are per unit surface area (pressure laws), so they mean the same on every
mesh. A run writes ``forces.png`` (normal and shear force, before/after, targets),
``before.png``/``after.png`` and ``rollout.gif`` (a side view of the gel and the object beside the
optical tactile image), ``readings.npz``, ``velocities.npy`` or ``observations.npz``,
``metrics.json`` and the driver's ``log.csv``, ``loss.png`` and checkpoints.

Rooms: :mod:`.config` (the scene section), :mod:`.build` (sensor model, rigid object, motion,
simulation, readings), :mod:`.build_mpm` (sensors or gripper with MPM bodies), :mod:`.objectives` (problems), :mod:`.outputs` (files and pictures),
:mod:`.run` (the run, registered as ``tactile``).
"""

from diffworld.tasks.tactile import run
from diffworld.tasks.tactile.build import Readings, TactileScene
from diffworld.tasks.tactile.config import TactileTask
from diffworld.tasks.tactile.objectives import SystemIdentificationProblem, TrajectoryProblem
from diffworld.tasks.tactile.run import run_tactile

__all__ = ["Readings", "SystemIdentificationProblem", "TactileScene", "TactileTask", "TrajectoryProblem", "run",
           "run_tactile"]
