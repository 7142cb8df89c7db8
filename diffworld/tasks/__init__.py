"""Task types: what a scene's ``task:`` section can ask for, one package each.

A task package holds its scene config, how it builds the problem, its objectives and its outputs,
and registers itself in :data:`diffworld.engine.config.TASKS` when imported. The libraries below
(geometry, sims, engine) never import a task. Importing this package registers the built-in ones;
other packages add theirs through the ``diffworld.tasks`` entry-point group.
"""

from diffworld.tasks import constitutive, mpm, reconstruction, tactile

__all__ = ["constitutive", "mpm", "reconstruction", "tactile"]
