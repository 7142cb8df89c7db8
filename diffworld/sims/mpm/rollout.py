"""Differentiable rollouts with checkpoint windows (docs/architecture.md, contract 5).

A rollout of T substeps is a chain of torch ops, one per *window* of at most K substeps. A window's
forward keeps nothing but its input state (the checkpoint); its backward recomputes the window
keeping every intermediate, then runs the substep adjoints in reverse. Memory is O(T/K) particle
states plus one window's intermediates; compute is about two forwards and one backward.

Losses may read any recorded state. Recording does not cut windows: a window returns the states
recorded inside it as extra outputs, and its backward adds their incoming gradients to the
adjoint at the substep where each was recorded, so the window setting alone sets the memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffworld.sims.mpm.kernels import COLLIDER_STATE
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


def _run_window(stepper: Stepper, state: State, params, control: torch.Tensor, first: int, keep: bool,
                record: tuple[int, ...] = (), tau: torch.Tensor | None = None):
    """Run the substeps of one window, carrying the elastic stress from substep to substep (one SVD
    each; ``tau`` is the stress at ``state.F`` when the previous window computed it, else None).

    Returns the final state, the stress at its F, every substep's intermediates when ``keep``, and
    the states after the substeps at the window offsets ``record`` (1 = after the first substep).
    """
    has_col = control.shape[1] > 0
    kept, recorded = [], []
    for s in range(control.shape[0]):
        state, saved = stepper.substep(state, params, control[s] if has_col else None, keep=keep, step=first + s,
                                       tau=tau)
        tau = stepper.last_tau
        if keep:
            kept.append(saved)
        if s + 1 in record:
            recorded.append(state)
    return state, tau, kept, recorded


class _Window(torch.autograd.Function):
    """One checkpoint window.

    Inputs: the state (x, v, C, F) and the stress at its F (``tau``, None for a rollout's first
    window: computed from F). Outputs: the final state's (x, v, C, F), the stress at its F (the
    next window's ``tau``: carrying it keeps the numbers independent of where windows end), then
    the (x, v, C, F) of each state recorded inside the window, in order.
    """

    @staticmethod
    def forward(ctx, stepper: Stepper, first: int, keep_last: bool, record: tuple[int, ...], control: torch.Tensor,
                tau, x, v, C, F, *params):
        # keep_last: this is the rollout's last window and a backward pass will follow: keep its
        # intermediates now instead of recomputing them (the backward peak holds one window's
        # intermediates anyway, so the peak does not grow).
        with torch.no_grad():
            state, tau_out, kept, recorded = _run_window(stepper, State(x, v, C, F), params, control, first,
                                                         keep_last, record, tau)
        if kept:
            # The caller gets the last substep's C' as output C and may modify it in place, and
            # recorded states alias kept intermediates: hand out copies.
            kept[-1] = kept[-1]._replace(C_out=kept[-1].C_out.clone())
            recorded = [r.clone() for r in recorded]
        ctx.stepper, ctx.first, ctx.record, ctx.kept = stepper, first, record, kept or None
        ctx.has_tau = tau is not None
        ctx.save_for_backward(control, tau, x, v, C, F, *params)
        return (*state, tau_out) + tuple(t for r in recorded for t in r)

    @staticmethod
    def backward(ctx, *grads):
        control, tau, x, v, C, F, *params = ctx.saved_tensors
        stepper: Stepper = ctx.stepper
        has_col = control.shape[1] > 0
        saved = ctx.kept
        ctx.kept = None
        # Incoming gradients of the states recorded inside the window, by window offset.
        inside = {off: grads[5 + 4 * i: 9 + 4 * i] for i, off in enumerate(ctx.record)}
        with torch.no_grad():
            if saved is None:  # recompute the window, keeping every intermediate
                _, _, saved, _ = _run_window(stepper, State(x, v, C, F), params, control, ctx.first, True,
                                             tau=tau if ctx.has_tau else None)
            adj = State(*(torch.zeros_like(t) if g is None else g for t, g in zip((x, v, C, F), grads[:4])))
            adj_params = [torch.zeros_like(p) for p in params]
            adj_control = torch.zeros_like(control)
            adj_tau = grads[4]  # from the next window, which read this window's final stress
            F0 = saved[0].F
            for s in range(len(saved) - 1, -1, -1):
                if s + 1 in inside:  # the state after substep s was recorded: its loss gradient joins here
                    adj = State(*(a if g is None else a + g for a, g in zip(adj, inside[s + 1])))
                adj, adj_tau = stepper.substep_adjoint(saved[s], params, adj, adj_params,
                                                       adj_control[s] if has_col else None, adj_tau)
                saved[s] = None  # free this substep's intermediates as soon as they are used
            if not ctx.has_tau:  # the window's first stress was computed from its input F
                stepper.stress_adjoint(F0, params, adj_tau, adj.F, adj_params)
                adj_tau = None
        ctx.stepper = None
        return (None, None, None, None, adj_control, adj_tau, *adj, *adj_params)


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
    plist = [merged[name].to(dtype).contiguous() for name in PARTICLE_PARAMS]
    stepper = stepper or Stepper(model)
    record = record_every or n_substeps or 1
    states, steps = [state], [0]
    s = 0
    tau = None  # the elastic stress at the current F, carried between windows
    tensors = [control, *state, *plist]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    while s < n_substeps:
        n = min(window, n_substeps - s)
        # record points strictly inside this window come back as extra outputs
        inside = tuple(r - s for r in range((s // record + 1) * record, s + n, record))
        last = keep_last_window and grad and s + n == n_substeps
        out = _Window.apply(stepper, start_substep + s, last, inside, control[s:s + n], tau,
                            *(t.contiguous() for t in state), *plist)
        state, tau = State(*out[:4]), out[4]
        first_new = len(states)
        for i, off in enumerate(inside):
            states.append(State(*out[5 + 4 * i: 9 + 4 * i]))
            steps.append(s + off)
        s += n
        if s % record == 0 or s == n_substeps:
            states.append(state)
            steps.append(s)
        if check:  # in order, so the message names the first bad recorded state
            for st, k in zip(states[first_new:], steps[first_new:]):
                check_state(model, st, start_substep + k)
    return Rollout(states, steps)
