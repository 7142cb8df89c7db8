"""What an MPM rollout keeps fixed and what it advances: :class:`Model` (the grid, dt, gravity,
walls, colliders, emitters, torch-law bindings and per-particle parameters), :class:`GridSpec`,
:class:`State` (x, v, C, F of every particle at one instant), :class:`ParticleParams` and
:class:`LawBinding`. The solver (:mod:`diffworld.sims.mpm.solver`) runs substeps on them and
re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from diffworld.sims.common.colliders import Collider
from diffworld.sims.constitutive.torch_law import TorchLaw
from diffworld.sims.mpm import kernels
from diffworld.sims.mpm.emitters import EmitterParticles
from diffworld.sims.mpm.materials import PARAMETERS

__all__ = ["GridSpec", "LawBinding", "Model", "PARTICLE_PARAMS", "ParticleParams", "State", "WALL_MODES"]

# Per-particle float parameters: the material's (materials.PARAMETERS) and the rest volume.
PARTICLE_PARAMS = (*PARAMETERS, "volume")


class ParticleParams(NamedTuple):
    """Per-particle parameters by name (tensors (N,)), in :data:`PARTICLE_PARAMS` order: a
    substep takes a sequence that starts with them (then the parameters of its torch laws)."""

    E: torch.Tensor
    nu: torch.Tensor
    density: torch.Tensor
    viscosity: torch.Tensor
    yield_stress: torch.Tensor
    friction_angle: torch.Tensor
    theta_c: torch.Tensor
    theta_s: torch.Tensor
    volume: torch.Tensor


assert ParticleParams._fields == PARTICLE_PARAMS


@dataclass(frozen=True)
class LawBinding:
    """Particles whose constitutive law is a torch module (their law code is ``EXTERNAL``).

    Attributes:
        law: The law.
        index: The particles, int64 tensor (n,) on the model's device.
    """

    law: TorchLaw
    index: torch.Tensor


WALL_MODES = tuple(kernels.WALL)


class State(NamedTuple):
    """Particle state at one instant (N particles).

    Attributes:
        x: positions [m], shape (N, 3).
        v: velocities [m/s], shape (N, 3).
        C: APIC affine velocity field (velocity gradient) [1/s], shape (N, 3, 3).
        F: deformation gradient (after plastic projection), shape (N, 3, 3).
    """

    x: torch.Tensor
    v: torch.Tensor
    C: torch.Tensor
    F: torch.Tensor

    def detach(self) -> "State":
        return State(*(t.detach() for t in self))

    def clone(self) -> "State":
        return State(*(t.clone() for t in self))


@dataclass(frozen=True)
class GridSpec:
    """The background grid.

    Attributes:
        lower: Domain lower corner [m].
        dx: Cell size [m].
        shape: Nodes per axis (gx, gy, gz); node (i, j, k) sits at lower + (i, j, k) dx.
        bound: Wall thickness in nodes (velocities through the domain faces are removed there).
    """

    lower: tuple[float, float, float]
    dx: float
    shape: tuple[int, int, int]
    bound: int = 3

    @staticmethod
    def make(lower: Sequence[float], upper: Sequence[float], resolution: int, bound: int = 3) -> "GridSpec":
        """Grid over the box [lower, upper] with ``resolution`` cells along its longest side."""
        extent = [float(b) - float(a) for a, b in zip(lower, upper)]
        if len(extent) != 3 or min(extent) <= 0:
            raise ValueError(f"domain: expected lower < upper on 3 axes, got lower={lower}, upper={upper}")
        if resolution < 2 * bound + 2:
            raise ValueError(f"resolution: expected at least {2 * bound + 2} cells, got {resolution}")
        dx = max(extent) / resolution
        shape = tuple(int(math.ceil(e / dx - 1e-9)) + 1 for e in extent)
        return GridSpec(tuple(float(a) for a in lower), dx, shape, bound)

    @property
    def upper(self) -> tuple[float, float, float]:
        return tuple(lo + (n - 1) * self.dx for lo, n in zip(self.lower, self.shape))

    def inner_box(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Region where particles may be: the stencil stays inside the grid and off the walls."""
        m = self.bound * self.dx
        return tuple(lo + m for lo in self.lower), tuple(hi - m for hi in self.upper)


@dataclass
class Model:
    """Everything a rollout keeps fixed. Build with :func:`diffworld.sims.mpm.build_model`.

    Attributes:
        grid: The background grid.
        dt: Substep [s].
        gravity: [m/s^2], 3 floats.
        law: Constitutive law id per particle, int32 tensor (N,).
        params: Per-particle parameters (:data:`PARTICLE_PARAMS`), float tensors (N,); replace
            one by a tensor with ``requires_grad`` to optimize it.
        body: Body index per particle, int64 tensor (N,) (for losses and rendering).
        colliders: Kinematic colliders, in the order of the control tensor's second axis.
        wall: Domain wall behaviour: ``slip``, ``sticky`` or ``friction``.
        wall_friction: Coulomb coefficient of ``friction`` walls.
        body_names: Name of each body index (bodies, then emitters).
        emitted: Particles released by emitters (parked until their activation substep), or None.
        torch_laws: Particles whose law is a torch module (:func:`diffworld.sims.mpm.use_law`).
    """

    grid: GridSpec
    dt: float
    gravity: tuple[float, float, float]
    law: torch.Tensor
    params: dict[str, torch.Tensor]
    body: torch.Tensor
    colliders: list[Collider] = field(default_factory=list)
    wall: str = "slip"
    wall_friction: float = 0.0
    body_names: list[str] = field(default_factory=list)
    emitted: EmitterParticles | None = None
    torch_laws: list[LawBinding] = field(default_factory=list)

    @property
    def n_particles(self) -> int:
        return int(self.law.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.params["E"].dtype

    @property
    def device(self) -> torch.device:
        return self.law.device

    def active_mask(self, substep: int) -> torch.Tensor:
        """Particles taking part in substep ``substep`` (emitted ones from their activation on), bool (N,)."""
        mask = torch.ones(self.n_particles, dtype=torch.bool, device=self.device)
        if self.emitted is not None:
            mask[self.emitted.index] = self.emitted.step <= substep
        return mask

    def released_mask(self, n_substeps: int) -> torch.Tensor:
        """Particles live in the state after ``n_substeps`` substeps, bool (N,).

        Those released in substeps ``0 .. n_substeps - 1``, i.e. ``active_mask(n_substeps - 1)``;
        the others are still parked (their positions mean nothing yet).
        """
        return self.active_mask(n_substeps - 1)
