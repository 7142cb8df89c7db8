"""Constitutive laws shared by the simulators (MPM now, FEM next).

* :mod:`.laws`: the built-in laws as objects (:data:`LAWS`): parameters by name, torch references.
* :mod:`.warp_laws`, :mod:`.warp_svd`: their Warp device functions and hand-written adjoints,
  generic over float32/float64, importable by any kernel module.
* :mod:`.torch_law`: :class:`TorchLaw`, the seam for laws written in torch (networks).
* :mod:`.neural`: neural constitutive laws (NCLaw's architecture and its ablation), their
  rotation/stretch decomposition with a finite adjoint, and their files.
"""

from diffworld.sims.constitutive.laws import EXTERNAL, LAWS, Law, lame, law
from diffworld.sims.constitutive.neural import NeuralLaw, load_law, save_law
from diffworld.sims.constitutive.torch_law import BuiltinTorchLaw, TorchLaw

__all__ = ["EXTERNAL", "LAWS", "BuiltinTorchLaw", "Law", "NeuralLaw", "TorchLaw", "lame", "law", "load_law",
           "save_law"]
