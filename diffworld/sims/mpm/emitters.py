"""Emitters: particles released from a parked pool over time (a pouring spout, a dispenser).

An emitter is a round nozzle that releases a jet of one material at a given speed between a
start and a stop time. Its particles exist from the first substep, *parked*: they take no part in
the transfers and do not move, until their activation substep. Activation times are fixed when
the model is built, so a backward pass that recomputes a window activates exactly the same
particles (determinism, contract 7).

At its activation substep a particle is placed at the nozzle: layer ``k`` of the jet leaves at
``t_k = start + k h / speed`` (``h`` the particle spacing ``dx / ppc^(1/3)``), on a lattice of the
nozzle disk, pushed ``speed (s dt - t_k)`` downstream for the rounding of ``t_k`` to a substep.
A nozzle attached to a collider moves with it: its centre and direction are in the collider's
frame, and the placement (position and velocity, rigid motion of the collider included) is a
differentiable function of the control, so a pouring motion can be optimized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from diffworld.sims.mpm.materials import Material
from diffworld.sims.common.quaternion import quat_rotate

__all__ = ["Emitter", "EmitterParticles", "emitter_particles", "place_emitted"]


@dataclass
class Emitter:
    """A round nozzle releasing a jet of particles.

    Attributes:
        material: Material of the jet.
        center: Nozzle exit centre [m] (world frame, or the collider's frame when attached).
        direction: Jet direction (normalized here), same frame as ``center``.
        radius: Nozzle radius [m].
        speed: Jet speed along ``direction`` [m/s].
        start: Time the jet starts [s].
        stop: Time the jet stops [s].
        ppc: Particles per grid cell of the jet.
        collider: Name of the collider carrying the nozzle, or None for a fixed nozzle.
        name: Label (losses and renders select particles by it, like bodies).
    """

    material: Material
    center: tuple[float, float, float]
    direction: tuple[float, float, float] = (0.0, 0.0, -1.0)
    radius: float = 0.02
    speed: float = 0.5
    start: float = 0.0
    stop: float = 0.1
    ppc: int = 8
    collider: str | None = None
    name: str = "emitter"

    def validate(self, index: int) -> None:
        where = f"emitters[{index}] ('{self.name}')"
        if not (self.radius > 0 and self.speed > 0 and self.ppc >= 1):
            raise ValueError(f"{where}: radius, speed and ppc expected > 0, got {self.radius}, {self.speed}, "
                             f"{self.ppc}")
        if not (0 <= self.start < self.stop):
            raise ValueError(f"{where}: expected 0 <= start < stop [s], got start={self.start}, stop={self.stop}")
        if math.sqrt(sum(d * d for d in self.direction)) < 1e-12:
            raise ValueError(f"{where}: direction expected non-zero, got {self.direction}")


class EmitterParticles(NamedTuple):
    """Emitted particles of a model (indices into the model's particles).

    Attributes:
        index: Particle indices, int64 (E,).
        step: Activation substep of each, int64 (E,).
        local_x: Position at activation, in the nozzle's frame (world if fixed) [m], (E, 3).
        local_v: Velocity at activation, same frame [m/s], (E, 3).
        collider: Collider carrying each particle's nozzle, or -1, int64 (E,).
    """

    index: torch.Tensor
    step: torch.Tensor
    local_x: torch.Tensor
    local_v: torch.Tensor
    collider: torch.Tensor


def _frame(direction: Sequence[float]) -> torch.Tensor:
    """Orthonormal (u, w, d) with d along ``direction``, rows, float64 (3, 3)."""
    d = torch.tensor(direction, dtype=torch.float64)
    d = d / d.norm()
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    if abs(float(d[0])) > 0.9:
        a = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    u = torch.linalg.cross(d, a)
    u = u / u.norm()
    w = torch.linalg.cross(d, u)
    return torch.stack([u, w, d])


def emitter_particles(e: Emitter, dx: float, dt: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Activation substeps and placements of one emitter's particles.

    Args:
        e: The emitter.
        dx: Grid cell size [m].
        dt: Substep [s].

    Returns:
        (step (E,) int64, local_x (E, 3), local_v (E, 3), particle volume [m^3]), float64.
    """
    h = dx / e.ppc ** (1.0 / 3.0)
    n_r = max(int(math.floor(e.radius / h)), 0)
    g = torch.arange(-n_r, n_r + 1, dtype=torch.float64) * h
    uu, ww = torch.meshgrid(g, g, indexing="ij")
    disk = torch.stack([uu.reshape(-1), ww.reshape(-1)], 1)
    disk = disk[(disk ** 2).sum(1) <= e.radius ** 2 + 1e-12]
    n_layers = int(math.floor((e.stop - e.start) * e.speed / h)) + 1
    t_k = e.start + torch.arange(n_layers, dtype=torch.float64) * h / e.speed
    step = torch.ceil(t_k / dt - 1e-9).to(torch.int64)
    lead = e.speed * (step.double() * dt - t_k)  # how far the layer has travelled at activation [m]
    R = _frame(e.direction)
    centre = torch.tensor(e.center, dtype=torch.float64)
    lateral = disk @ R[:2]  # (D, 3)
    x = centre + lateral[None, :, :] + (lead[:, None] * R[2])[:, None, :]
    v = (e.speed * R[2]).expand(n_layers, disk.shape[0], 3)
    steps = step[:, None].expand(n_layers, disk.shape[0])
    return steps.reshape(-1), x.reshape(-1, 3), v.reshape(-1, 3).contiguous(), h ** 3


def place_emitted(local_x: torch.Tensor, local_v: torch.Tensor, collider_state: torch.Tensor | None):
    """World position and velocity at activation of particles whose nozzle rides a collider.

    Args:
        local_x: Positions in the collider frame [m], (K, 3).
        local_v: Velocities in the collider frame [m/s], (K, 3).
        collider_state: The collider's state rows, (K, 13): position, quaternion x y z w, linear
            and angular velocity (world); None for fixed nozzles (returns the inputs).

    Returns:
        (x, v) in the world frame, (K, 3) each; differentiable w.r.t. ``collider_state``.
    """
    if collider_state is None:
        return local_x, local_v
    pos, q = collider_state[:, :3], collider_state[:, 3:7]
    q = q / q.norm(dim=1, keepdim=True)
    lin, ang = collider_state[:, 7:10], collider_state[:, 10:13]
    r = quat_rotate(q, local_x)
    return pos + r, lin + torch.linalg.cross(ang, r, dim=-1) + quat_rotate(q, local_v)
