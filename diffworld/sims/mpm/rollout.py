"""MPM rollouts: the engine's checkpointed rollout (:mod:`diffworld.engine.rollout`) over the MPM
substep, with the MPM's checks (NaN/Inf, particles leaving the grid, CFL) and stable time step.

Losses may read any recorded state; recording does not cut the checkpoint windows, and the
numbers do not depend on the window (the elastic stress is carried in the state from substep to
substep, also across windows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffworld.engine.rollout import checkpointed_rollout
from diffworld.sims.common.colliders import COLLIDER_STATE
from diffworld.sims.mpm.materials import lame
from diffworld.sims.mpm.solver import PARTICLE_PARAMS, Model, State, Stepper

__all__ = ["Rollout", "SimulationError", "rollout", "check_state", "stable_dt"]


class SimulationError(RuntimeError):
    """A rollout produced an unusable state (NaN/Inf, particles leaving the domain, CFL breach)."""


class Rollout(NamedTuple):
    """Result of :func:`rollout`.

    Attributes:
        states: Recorded states: index 0 is the initial state, then one every ``record_every``
            substeps (and the final state).
        substeps: Substep index of each recorded state.
    """

    states: list[State]
    substeps: list[int]

    @property
    def final(self) -> State:
        return self.states[-1]

    def positions(self) -> torch.Tensor:
        """Recorded positions, shape (R, N, 3)."""
        return torch.stack([s.x for s in self.states])


class _Substeps:
    """The MPM :class:`Stepper` as an :class:`~diffworld.engine.rollout.Simulator`.

    Its state is (x, v, C, F, tau): tau, the elastic stress at F, is a by-product of each
    substep's plastic projection and is carried into the next substep, also across windows (so the
    numbers do not depend on the window). It is None in a rollout's initial state, and the first
    substep computes it from F.
    """

    def __init__(self, stepper: Stepper) -> None:
        self.stepper = stepper

    def step(self, state, params, control, index: int, keep: bool):
        x, v, C, F, tau = state
        out, tau_out, saved = self.stepper.substep(State(x, v, C, F), params, control, keep=keep, step=index,
                                                   tau=tau)
        return (*out, tau_out), (saved, tau is None)

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        saved, stress_computed = saved
        adj = State(*(torch.zeros_like(t) if g is None else g
                      for t, g in zip((saved.x, saved.v, saved.C, saved.F), adj_out[:4])))
        adj, adj_tau = self.stepper.substep_adjoint(saved, params, adj, adj_params, adj_control, adj_out[4])
        if stress_computed:  # this substep computed its input stress from its input F
            self.stepper.stress_adjoint(saved.F, params, adj_tau, adj.F, adj_params)
            adj_tau = None
        return (*adj, adj_tau)


def stable_dt(model: Model, cfl: float = 0.5) -> float:
    """Largest stable substep [s]: ``cfl * dx / max c`` and the viscous limit ``dx^2 rho / (6 eta)``.

    ``c = sqrt((lambda + 2 mu) / rho)`` is the P-wave speed of each particle's material.
    """
    p = model.params
    rho = p["density"].detach()
    mu, lam = lame(p["E"].detach(), p["nu"].detach())
    c = torch.sqrt((lam + 2 * mu) / rho).max()
    # Explicit viscous diffusion in 3D is stable for dt <= dx^2 / (6 nu), nu = eta / rho.
    eta = p["viscosity"].detach()
    visc = (model.grid.dx ** 2 * rho / (6 * eta.clamp_min(1e-30))).min()
    return float(min(cfl * model.grid.dx / float(c), float(visc)))


def check_state(model: Model, state: State, substep: int) -> None:
    """Raise :class:`SimulationError` for NaN/Inf, particles outside the grid, or a CFL breach.

    Args:
        model: The model.
        state: State after ``substep`` substeps.
        substep: Substep index (for the message).
    """
    with torch.no_grad():
        if model.emitted is not None:  # parked particles are not checked
            keep = model.released_mask(substep)
            state = State(*(t[keep] for t in state))
        for name, t in zip(State._fields, state):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                idx = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
                raise SimulationError(f"non-finite {name} of particle {idx} after substep {substep}; "
                                      f"lower dt or check the material parameters")
        # The B-spline stencil of a particle must stay on the grid: one cell from the faces.
        lo = tuple(a + model.grid.dx for a in model.grid.lower)
        hi = tuple(b - model.grid.dx for b in model.grid.upper)
        lo_t = torch.tensor(lo, dtype=state.x.dtype, device=state.x.device)
        hi_t = torch.tensor(hi, dtype=state.x.dtype, device=state.x.device)
        out = (state.x < lo_t) | (state.x > hi_t)
        if bool(out.any()):
            idx = int(out.any(1).nonzero()[0])
            raise SimulationError(f"particle {idx} left the domain after substep {substep} "
                                  f"(x = {state.x[idx].tolist()}, domain interior {lo}..{hi})")
        vmax = float(state.v.norm(dim=1).max()) if state.v.shape[0] else 0.0
        if vmax * model.dt > model.grid.dx:
            raise SimulationError(
                f"CFL breached after substep {substep}: a particle moves {vmax * model.dt / model.grid.dx:.2f} cells "
                f"per substep (|v| = {vmax:.3g} m/s, dt = {model.dt:.3g} s, dx = {model.grid.dx:.3g} m); the "
                f"transfer assumes less than 1. Lower dt to at most {model.grid.dx / vmax:.3g} s or slow the effectors")


def rollout(model: Model, state: State, n_substeps: int, control: torch.Tensor | None = None, *,
            window: int = 16, record_every: int | None = None, params: dict[str, torch.Tensor] | None = None,
            stepper: Stepper | None = None, check: bool = True, start_substep: int = 0,
            keep_last_window: bool = True) -> Rollout:
    """Simulate ``n_substeps`` substeps, differentiably.

    Args:
        model: The model.
        state: Initial state (its tensors may require gradients).
        n_substeps: Number of substeps.
        control: Collider states per substep, shape (n_substeps, n_colliders, 13); required when
            the model has colliders. Differentiable.
        window: Substeps per checkpoint window (memory vs recompute trade-off): the forward keeps
            one state per window, the backward one window's intermediates. Independent of
            ``record_every``, and the numbers do not depend on it (the stress at the end of a
            window is carried into the next, not recomputed).
        record_every: Record the state every this many substeps (default: only the final state).
            Recorded states are differentiable outputs; recording does not end a window.
        params: Per-particle parameters overriding ``model.params`` (e.g. tensors that require
            gradients); missing names fall back to the model's.
        stepper: A :class:`Stepper` to reuse (kernels and collider buffers are prepared once).
        check: Check every recorded state (:func:`check_state`).
        start_substep: Index of the first substep (emitters release particles by it), for a
            rollout that continues another.
        keep_last_window: When gradients are needed, keep the last window's intermediates from
            the forward pass instead of recomputing them in backward (same numbers; saves one
            window of recompute; the memory peak, one window's intermediates, is unchanged).

    Returns:
        A :class:`Rollout`.

    Raises:
        ValueError: Wrong control shape or arguments.
        SimulationError: NaN/Inf, particles leaving the domain, or a CFL breach.
    """
    if n_substeps < 0 or window < 1:
        raise ValueError(f"rollout: expected n_substeps >= 0 and window >= 1, got {n_substeps}, {window}")
    n_col = len(model.colliders)
    dtype, device = model.dtype, model.device
    if n_col:
        if control is None or tuple(control.shape) != (n_substeps, n_col, COLLIDER_STATE):
            got = None if control is None else tuple(control.shape)
            raise ValueError(f"control: expected shape ({n_substeps}, {n_col}, {COLLIDER_STATE}) (substeps, colliders, "
                             f"state), got {got}")
        control = control.to(dtype)
    else:
        control = torch.zeros((n_substeps, 0, COLLIDER_STATE), dtype=dtype, device=device)
    merged = dict(model.params)
    for name, t in (params or {}).items():
        if name not in PARTICLE_PARAMS:
            raise ValueError(f"params: unknown parameter {name!r}; expected one of {list(PARTICLE_PARAMS)}")
        merged[name] = t.expand(model.n_particles) if t.dim() == 0 else t
    stepper = stepper or Stepper(model)
    # the torch laws' parameters ride along as rollout parameters: that is how they get gradients
    plist = [merged[name].to(dtype).contiguous() for name in PARTICLE_PARAMS] + stepper.law_parameters()

    def check_recorded(st, k: int) -> None:
        check_state(model, State(*st[:4]), k)

    traj = checkpointed_rollout(_Substeps(stepper), (*state, None), n_substeps, control, plist, window=window,
                                record_every=record_every, keep_last_window=keep_last_window,
                                first_index=start_substep, check=check_recorded if check else None)
    states, steps = [state] + [State(*st[:4]) for st in traj.states[1:]], traj.steps
    return Rollout(states, steps)
