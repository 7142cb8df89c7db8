"""The torch side of the constitutive seam: a law written as a ``torch.nn.Module``.

A simulator evaluates built-in laws in Warp; particles bound to a :class:`TorchLaw` are evaluated
by it instead, in torch, at the same stage of the step (the elastic stress, and the return map
after each substep's G2P). Their adjoints come from torch autograd on the recomputed rows, and
the module's parameters get gradients through the checkpointed rollout like any other parameter
(the simulator passes them to the rollout as parameters). This is the seam a neural constitutive
law (NCLaw) plugs into.

A subclass declares the material parameters it reads, by name, and implements :meth:`stress`
(and :meth:`project` if it is plastic). Both must be pure functions of their inputs and the
module's parameters (a window's backward re-runs them), batched over particles.
"""

from __future__ import annotations

from typing import Mapping

import torch

from diffworld.sims.constitutive.laws import law as builtin_law

__all__ = ["BuiltinTorchLaw", "TorchLaw"]


class TorchLaw(torch.nn.Module):
    """Base class of constitutive laws written in torch.

    Attributes:
        material_parameters: Names of the per-particle material parameters :meth:`stress` and
            :meth:`project` read (e.g. ``("E", "nu")``); they arrive as tensors of shape (n,),
            and get gradients when the simulation's do.
    """

    material_parameters: tuple[str, ...] = ()

    def stress(self, F: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Elastic Kirchhoff stress tau = P F^T [Pa] at deformation gradients F, shape (n, 3, 3)."""
        raise NotImplementedError(f"{type(self).__name__}.stress")

    def project(self, F: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return map of trial deformation gradients F, shape (n, 3, 3); the identity by default."""
        return F

    def forward(self, F: torch.Tensor, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The substep's constitutive stage: the projected F and the elastic stress there."""
        Fn = self.project(F, params)
        return Fn, self.stress(Fn, params)


class BuiltinTorchLaw(TorchLaw):
    """A built-in law (:data:`~diffworld.sims.constitutive.laws.LAWS`) run through the torch seam,
    with its torch references: the same physics as the Warp path, for tests of the seam.

    Its references differentiate through ``torch.linalg.svd``, whose gradient is undefined where
    singular values repeat (F = I, for one): use laws without an SVD (``fluid``, ``neo_hookean``)
    where gradients are wanted.

    Args:
        name: A key of ``LAWS``.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.law = builtin_law(name)
        self.material_parameters = self.law.parameters

    def stress(self, F, params):
        return self.law.stress(F, params)

    def project(self, F, params):
        return self.law.project(F, params)
