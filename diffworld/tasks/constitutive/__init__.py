"""The ``constitutive_learning`` scene task (issue 16): learn a material's constitutive law from its
motion (NCLaw, Ma et al. 2023) through the differentiable MPM.

The truth is a cube of a built-in material thrown and spun in a box (NCLaw's set-up); the law to
learn is a :class:`~diffworld.sims.constitutive.neural.NeuralLaw` (NCLaw's rotation-equivariant
networks or the plain-MLP ablation, either part possibly analytic). Each iteration is one
teacher-forced rollout (the state reset to the truth every lambda steps, lambda growing on a
cosine schedule), one optimizer step on the weights. A run writes the learned law
(``law.pt``/``law.json``, usable in any MPM scene as ``material: {type: neural, path: ...}``),
``mse.png`` (position MSE per frame before and after), ``final_frame.png``, ``metrics.json``
(NCLaw's metric: the mean position MSE of the free rollout at every 5th frame), and the driver's
log, loss plot and checkpoints.

Rooms: :mod:`.config` (the scene section), :mod:`.training` (truth, law, loss, metric),
:mod:`.run` (the run, registered as ``constitutive_learning``).
"""

from diffworld.tasks.constitutive import run
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask
from diffworld.tasks.constitutive.run import run_constitutive_learning

__all__ = ["ConstitutiveLearningTask", "run", "run_constitutive_learning"]
