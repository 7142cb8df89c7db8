"""The ``reconstruction`` scene task: fit a differentiable isosurface to a target shape.

Registered in :data:`diffworld.engine.config.TASKS` on import. A run writes to its output folder:
``scene.yaml`` (resolved), ``log.csv``, ``loss.png``, ``metrics.json``, ``result.ply``,
``render.png`` (result beside target) and ``checkpoints/`` (``--resume`` continues from them);
G-Shell runs also write ``template.ply`` (the watertight template the result was cut from).

Representations: ``grid`` (marching cubes), ``neural`` (DeepMesh gradient), ``flexicubes``
(node values + per-cube weights + node offsets) and ``gshell`` (FlexiCubes template + manifold
SDF, for open surfaces). ``metrics.json`` holds the result's distances to the reference, its
topology and boundary, and baselines from the true field on the final grid where there is one:
marching cubes (closed targets), FlexiCubes with default weights (flexicubes/gshell on closed
targets), G-Shell on the open shape's own template and manifold SDF (open registry shapes).

Rooms: :mod:`.config` (the scene section and the shape registry), :mod:`.reference` (target and
reference), :mod:`.evaluation` (metrics), :mod:`.run` (the staged run, registered as
``reconstruction``).
"""

from diffworld.tasks.reconstruction import run
from diffworld.tasks.reconstruction.config import SHAPES, ReconstructionTask
from diffworld.tasks.reconstruction.run import run_reconstruction

__all__ = ["ReconstructionTask", "SHAPES", "run", "run_reconstruction"]
