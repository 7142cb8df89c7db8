"""Model / State / Control of the XPBD rope (docs/architecture.md, contract 4; docs/cable.md).

* :class:`Model`: a chain of N particles (spheres of ``radius``) joined by N - 1 segments, with
  the rest lengths, the per-segment ``linear_density`` [kg/m] (particle masses are derived from it
  by :meth:`Model.masses`, so its gradient flows), stretch and bending compliances, mass
  proportional ``damping`` [1/s], ``gravity`` [m/s^2], the pinned (kinematic) particles, an
  optional table (:class:`Ground`) and the number of constraint iterations.
* :class:`State`: particle positions ``x`` and velocities ``v``.
* :class:`Control`: per step, the positions of the pinned particles at the end of the step.

Bending (``Model.bending``):

* ``"angle"`` (default): at every interior particle the vector constraint
  ``C = t_b - t_a`` between the unit tangents of its two segments. Its energy
  ``|C|^2 / (2 alpha) = (1 - cos theta) / alpha ~ theta^2 / (2 alpha)`` is the discrete elastic-rod
  bending energy ``EI theta^2 / (2 l)`` for ``alpha = l / EI`` (:func:`bend_compliance_from_EI`):
  linear in the curvature, so a nearly straight rope resists bending. Rest shape: straight.
* ``"distance"`` (DiffTactile's): a distance constraint between particles i and i+2 at their rest
  distance. Cheap, but ``|x_{i+2} - x_i| ~ 2 l (1 - theta^2 / 8)`` makes its energy quartic in the
  bend angle: no bending stiffness at all near straight, so a hanging or lying rope sags as if
  bending were off for small curvatures. Kept for parity with the reference.
* ``"none"``.

The angle form is the default because its stiffness has the units and the small-angle behaviour
of a beam; the distance form is there to reproduce the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from diffworld.sims.fem.contact import ContactParams

__all__ = ["BENDING", "Control", "Energy", "Ground", "Model", "State", "bend_compliance_from_EI", "build_rope",
           "rope_points"]

BENDING = ("angle", "distance", "none")


class State(NamedTuple):
    """Particle state at one instant (N particles).

    Attributes:
        x: positions [m], shape (N, 3).
        v: velocities [m/s], shape (N, 3).
    """

    x: torch.Tensor
    v: torch.Tensor

    def detach(self) -> "State":
        return State(self.x.detach(), self.v.detach())

    def clone(self) -> "State":
        return State(self.x.clone(), self.v.clone())


class Energy(NamedTuple):
    """Energies of a state [J] (0-d tensors, differentiable).

    Attributes:
        kinetic: ``1/2 sum m |v|^2``.
        stretch: ``sum C_j^2 / (2 alpha_j)`` over segments with compliance > 0 (0 for rigid ones).
        bending: the same over the bending constraints.
        gravity: ``-sum m g . x``.
    """

    kinetic: torch.Tensor
    stretch: torch.Tensor
    bending: torch.Tensor
    gravity: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.kinetic + self.stretch + self.bending + self.gravity


@dataclass
class Ground:
    """A table: the plane ``z = height`` [m], solid below, touched by the particles' spheres.

    Penalty contact with the law of :func:`diffworld.sims.fem.contact.contact_forces` (normal
    force ``k_n d + k_d d max(-v_n, 0)`` on the penetration ``d = radius - (z - height)``,
    regularized Coulomb friction capped at ``mu`` times it); its forces are evaluated at the start
    of each step and held over it, so the step must resolve them: ``k_n dt^2 / m < 4`` and
    ``k_t dt / m < 2`` for the lightest particle (checked by the rollout).

    Attributes:
        height: [m].
        params: ``k_n`` [N/m], ``k_d`` [N s/m^2], ``k_t`` [N s/m], ``mu``, ``eps_v`` [m/s] (numbers
            or 0-d tensors that may require gradients) and the smoothing widths.
    """

    height: float = 0.0
    params: ContactParams = field(default_factory=ContactParams)


@dataclass
class Model:
    """Everything a rope rollout keeps fixed. Build with :func:`build_rope`.

    Attributes:
        rest_positions: Particle positions at rest [m], (N, 3) (the default initial state).
        rest_length: Segment rest lengths [m], (N - 1,).
        linear_density: Mass per length of each segment [kg/m], (N - 1,).
        stretch_compliance: [m/N] per segment, (N - 1,) (0: inextensible).
        bending: ``"angle"``, ``"distance"`` or ``"none"`` (module docstring).
        bend_rest: Rest distance |X_{i+2} - X_i| [m] of the distance bending constraints, (N - 2,).
        bend_compliance: Per joint (N - 2,): [1/(N m)] for ``angle`` (``l / EI``), [m/N] for
            ``distance``.
        damping: Mass-proportional damping [1/s], 0-d.
        gravity: [m/s^2], (3,).
        radius: Particle (rope) radius [m], for contact.
        pinned: Ids of the kinematic particles, int64 (P,), sorted and unique.
        ground: The table, or None.
        iterations: Constraint iterations per step (each one pass over every colour).
    """

    rest_positions: torch.Tensor
    rest_length: torch.Tensor
    linear_density: torch.Tensor
    stretch_compliance: torch.Tensor
    bending: str
    bend_rest: torch.Tensor
    bend_compliance: torch.Tensor
    damping: torch.Tensor
    gravity: torch.Tensor
    radius: float
    pinned: torch.Tensor
    ground: Ground | None
    iterations: int

    @property
    def n_particles(self) -> int:
        return int(self.rest_positions.shape[0])

    @property
    def n_segments(self) -> int:
        return self.n_particles - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.rest_positions.dtype

    @property
    def device(self) -> torch.device:
        return self.rest_positions.device

    @property
    def control_width(self) -> int:
        """Floats per step of the packed control: 3 per pinned particle."""
        return 3 * int(self.pinned.numel())

    def rest_state(self) -> State:
        """Particles at their rest positions, at rest."""
        x = self.rest_positions.clone()
        return State(x, torch.zeros_like(x))

    def masses(self, linear_density: torch.Tensor | None = None) -> torch.Tensor:
        """Particle masses [kg], (N,): half of each adjacent segment's ``density * rest length``.
        Differentiable in ``linear_density`` (default the model's)."""
        rho = self.linear_density if linear_density is None else linear_density
        rho = torch.as_tensor(rho, dtype=self.dtype, device=self.device).expand(self.n_segments)
        half = 0.5 * rho * self.rest_length
        m = torch.zeros(self.n_particles, dtype=half.dtype, device=self.device)
        return m.index_add(0, torch.arange(self.n_segments, device=self.device), half).index_add(
            0, torch.arange(1, self.n_particles, device=self.device), half)

    def energy(self, state: State, params: dict[str, torch.Tensor] | None = None) -> Energy:
        """Kinetic, constraint (stretch, bending) and gravitational energy of ``state`` [J].

        Args:
            state: The state.
            params: Overrides by name, as for the rollout (``linear_density``,
                ``stretch_compliance``, ``bend_compliance``, ``gravity``).
        """
        p = {k: getattr(self, k) for k in ("linear_density", "stretch_compliance", "bend_compliance", "gravity")}
        p.update({k: v for k, v in (params or {}).items() if k in p})
        m = self.masses(p["linear_density"])
        x, v = state
        kinetic = 0.5 * (m * (v * v).sum(1)).sum()

        def quadratic(C2: torch.Tensor, alpha) -> torch.Tensor:
            a = torch.as_tensor(alpha, dtype=self.dtype, device=self.device).expand(C2.shape[0])
            soft = a > 0
            return (C2[soft] / (2 * a[soft])).sum() if bool(soft.any()) else C2.sum() * 0

        e = x[1:] - x[:-1]
        L = e.norm(dim=1)
        stretch = quadratic((L - self.rest_length) ** 2, p["stretch_compliance"])
        if self.bending == "angle" and self.n_particles > 2:
            t = e / L[:, None]
            bending = quadratic(((t[1:] - t[:-1]) ** 2).sum(1), p["bend_compliance"])
        elif self.bending == "distance" and self.n_particles > 2:
            bending = quadratic(((x[2:] - x[:-2]).norm(dim=1) - self.bend_rest) ** 2, p["bend_compliance"])
        else:
            bending = kinetic * 0
        gravity = -(m[:, None] * x * p["gravity"]).sum()
        return Energy(kinetic, stretch, bending, gravity)


def bend_compliance_from_EI(EI: float | torch.Tensor, segment_length: float | torch.Tensor):
    """Angle-bending compliance ``l / EI`` [1/(N m)] of a rope of bending stiffness ``EI`` [N m^2]
    discretized with segments of length ``l`` [m] (module docstring)."""
    return segment_length / EI


def rope_points(start: Sequence[float], end: Sequence[float], n_particles: int,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n_particles`` equally spaced points from ``start`` to ``end`` [m], (N, 3)."""
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 2:
        raise ValueError(f"rope_points: expected 'n_particles' an integer >= 2, got {n_particles!r}")
    a, b = torch.tensor(start, dtype=dtype), torch.tensor(end, dtype=dtype)
    if a.shape != (3,) or b.shape != (3,):
        raise ValueError(f"rope_points: expected 'start' and 'end' 3 numbers [m], got {start!r}, {end!r}")
    s = torch.linspace(0, 1, n_particles, dtype=dtype)[:, None]
    return a + s * (b - a)


def _per(name: str, value, n: int, dtype, device, what: str, positive: bool = False) -> torch.Tensor:
    """A number or (n,) tensor as an (n,) tensor (a tensor keeps its graph); finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"build_rope: expected '{name}' a number or a tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if tuple(t.shape) != (n,):
        raise ValueError(f"build_rope: expected '{name}' a number or of shape ({n},) ({what}), got {tuple(t.shape)}")
    t = t.to(device=device, dtype=dtype)
    d = t.detach()
    if n and not (bool(torch.isfinite(d).all()) and bool((d > 0).all() if positive else (d >= 0).all())):
        raise ValueError(f"build_rope: '{name}' must be finite and {'> 0' if positive else '>= 0'}, got min "
                         f"{float(d.min()):g}")
    return t


def build_rope(points: torch.Tensor, *, linear_density: float | torch.Tensor, radius: float,
               stretch_compliance: float | torch.Tensor = 0.0, bend_compliance: float | torch.Tensor = 1.0,
               bending: str = "angle", pinned: Sequence[int] | torch.Tensor | None = None,
               gravity: Sequence[float] | torch.Tensor = (0.0, 0.0, -9.81), damping: float = 0.0,
               ground: Ground | None = None, iterations: int = 10, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Model:
    """Assemble a rope from its rest particle positions.

    Args:
        points: Rest positions [m], (N, 3), N >= 2 (e.g. :func:`rope_points`).
        linear_density: [kg/m] > 0, a number or per segment (N - 1,).
        radius: Rope radius [m] > 0 (contact spheres).
        stretch_compliance: [m/N] >= 0, a number or (N - 1,); 0 = inextensible.
        bend_compliance: >= 0, a number or (N - 2,): [1/(N m)] for ``angle`` bending
            (:func:`bend_compliance_from_EI`), [m/N] for ``distance``.
        bending: ``"angle"`` (default), ``"distance"`` or ``"none"`` (module docstring).
        pinned: Ids (or an (N,) bool mask) of kinematic particles, driven by the control.
        gravity: [m/s^2], 3 numbers.
        damping: Mass-proportional damping [1/s] >= 0.
        ground: A table (:class:`Ground`), or None.
        iterations: Constraint iterations per step (>= 1).
        dtype: float32 or float64.
        device: Torch device (default the points').

    Raises:
        TypeError, ValueError: Bad arguments (the message names the argument).
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"build_rope: expected dtype float32 or float64, got {dtype}")
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"build_rope: expected 'points' a tensor of shape (N, 3), got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 3 or points.shape[0] < 2:
        raise ValueError(f"build_rope: expected 'points' of shape (N, 3) with N >= 2, got {tuple(points.shape)}")
    device = torch.device(device) if device is not None else points.device
    X = points.detach().to(device=device, dtype=dtype).contiguous()
    if not bool(torch.isfinite(X).all()):
        raise ValueError("build_rope: 'points' has non-finite values")
    n = X.shape[0]
    rest = (X[1:] - X[:-1]).norm(dim=1)
    if bool((rest <= 0).any()):
        j = int((rest <= 0).nonzero()[0])
        raise ValueError(f"build_rope: 'points' {j} and {j + 1} coincide (zero-length segment)")
    if bending not in BENDING:
        raise ValueError(f"build_rope: expected 'bending' one of {BENDING}, got {bending!r}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"build_rope: expected 'radius' a positive length [m], got {radius!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"build_rope: expected 'iterations' an integer >= 1, got {iterations!r}")
    rho = _per("linear_density", linear_density, n - 1, dtype, device, "one per segment", positive=True)
    sc = _per("stretch_compliance", stretch_compliance, n - 1, dtype, device, "one per segment")
    bc = _per("bend_compliance", bend_compliance, n - 2, dtype, device, "one per interior particle")
    if bending == "angle" and n > 2 and bool((bc.detach() <= 0).any()):
        # the angle constraint's 3x3 system is singular along the tangent without compliance
        raise ValueError("build_rope: angle bending needs 'bend_compliance' > 0 (use a small value for a stiff rope)")
    damp = torch.as_tensor(damping, device=device).to(dtype)
    if damp.dim() != 0 or not math.isfinite(float(damp.detach())) or float(damp.detach()) < 0:
        raise ValueError(f"build_rope: expected 'damping' a finite number >= 0 [1/s], got {damping!r}")
    g = torch.as_tensor(gravity, device=device).to(dtype)
    if tuple(g.shape) != (3,) or not bool(torch.isfinite(g.detach()).all()):
        raise ValueError(f"build_rope: expected 'gravity' 3 finite numbers [m/s^2], got {gravity!r}")
    if pinned is None:
        pin = torch.zeros(0, dtype=torch.int64, device=device)
    else:
        t = torch.as_tensor(pinned, device=device)
        if t.dtype == torch.bool:
            if tuple(t.shape) != (n,):
                raise ValueError(f"build_rope: a mask 'pinned' must have shape ({n},), got {tuple(t.shape)}")
            t = t.nonzero()[:, 0]
        if t.dtype.is_floating_point or t.dim() != 1:
            raise ValueError(f"build_rope: expected 'pinned' 1-d integer particle ids, got {t.dtype} "
                             f"{tuple(t.shape)}")
        t = t.to(torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"build_rope: 'pinned' ids must lie in [0, {n}), got [{int(t.min())}, {int(t.max())}]")
        pin = torch.unique(t)
        if pin.numel() != t.numel():
            raise ValueError("build_rope: 'pinned' lists a particle twice")
    if ground is not None and not isinstance(ground, Ground):
        raise TypeError(f"build_rope: expected 'ground' a cable.Ground, got {type(ground).__name__}")
    bend_rest = (X[2:] - X[:-2]).norm(dim=1)
    return Model(rest_positions=X, rest_length=rest, linear_density=rho, stretch_compliance=sc, bending=bending,
                 bend_rest=bend_rest, bend_compliance=bc, damping=damp, gravity=g, radius=float(radius),
                 pinned=pin, ground=ground, iterations=iterations)


class Control(NamedTuple):
    """Per-step targets of the pinned particles.

    Attributes:
        positions: Where each pinned particle is at the end of each step [m], (S, P, 3) (pinned
            ids in sorted order). Differentiable. None: held at their rest positions.
    """

    positions: torch.Tensor | None = None

    @property
    def n_steps(self) -> int | None:
        return None if self.positions is None else int(self.positions.shape[0])

    def rows(self, model: Model, n_steps: int) -> torch.Tensor:
        """The packed control (S, 3 P).

        Raises:
            ValueError: Wrong shape or non-finite values.
        """
        p = int(model.pinned.numel())
        if self.positions is None:
            return model.rest_positions[model.pinned].reshape(1, 3 * p).expand(n_steps, 3 * p).contiguous()
        t = self.positions
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Control: expected 'positions' a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (n_steps, p, 3):
            raise ValueError(f"Control: expected 'positions' of shape ({n_steps}, {p}, 3) (steps, pinned, xyz), "
                             f"got {tuple(t.shape)}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError("Control: 'positions' has non-finite values")
        return t.to(device=model.device, dtype=model.dtype).reshape(n_steps, 3 * p)
