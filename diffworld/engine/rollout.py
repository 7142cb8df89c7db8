"""Differentiable rollouts of any simulator, with checkpoint windows (docs/architecture.md, contract 5).

A rollout of T steps is a chain of torch ops, one per *window* of at most K steps. A window's
forward keeps nothing but its input state (the checkpoint); its backward recomputes the window
keeping every step's intermediates, then runs the step adjoints in reverse. Memory is O(T/K)
states plus one window's intermediates; compute is about two forwards and one backward.

States recorded along the way (every ``record_every`` steps) are outputs of the window they fall
in: recording does not end a window, and their incoming gradients join the reverse sweep at the
step where they were recorded. So the window setting alone sets the memory, and the numbers do not
depend on it as long as the simulator carries everything it needs in its state.

A simulator plugs in through :class:`Simulator`: a state is a tuple of tensors (an entry may be
None in the initial state when the simulator derives it in its first step, e.g. a stress cached
from the deformation gradient), parameters are a tuple of tensors, and a control is one row per
step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import torch

__all__ = ["Simulator", "Trajectory", "checkpointed_rollout"]

StateTuple = tuple[Optional[torch.Tensor], ...]


class Simulator(Protocol):
    """What :func:`checkpointed_rollout` needs of a simulator.

    ``step`` must never write its input state (contract 4): a window's backward recomputes it
    from the checkpoint.
    """

    def step(self, state: StateTuple, params: Sequence[torch.Tensor], control: torch.Tensor | None, index: int,
             keep: bool) -> tuple[StateTuple, Any]:
        """Advance one step (``index``: its position in the whole rollout); return the new state
        and, when ``keep``, what the adjoint needs."""
        ...

    def step_adjoint(self, saved: Any, params: Sequence[torch.Tensor], adj_out: StateTuple,
                     adj_params: list[torch.Tensor], adj_control: torch.Tensor | None) -> StateTuple:
        """Given d loss / d (output state) (None entries: zero), return d loss / d (input state);
        accumulate into ``adj_params`` (same order as ``params``) and ``adj_control``."""
        ...


class Trajectory(NamedTuple):
    """Result of :func:`checkpointed_rollout`.

    Attributes:
        states: The initial state, then every recorded one (the final state last).
        steps: Step index of each entry of ``states``.
    """

    states: list[StateTuple]
    steps: list[int]


def _run(sim: Simulator, state: StateTuple, params, control: torch.Tensor, first: int, keep: bool,
         record: tuple[int, ...] = ()) -> tuple[StateTuple, list, list[StateTuple]]:
    """The steps of one window: final state, every step's saved intermediates when ``keep``, and
    the states after the steps at window offsets ``record`` (1 = after the first step)."""
    kept, recorded = [], []
    has_control = control.shape[1] > 0
    for s in range(control.shape[0]):
        state, saved = sim.step(state, params, control[s] if has_control else None, first + s, keep)
        if keep:
            kept.append(saved)
        if s + 1 in record:
            recorded.append(state)
    return state, kept, recorded


def _copy(state: StateTuple) -> StateTuple:
    return tuple(None if t is None else t.clone() for t in state)


class _Window(torch.autograd.Function):
    """One checkpoint window. Outputs: the final state, then each state recorded inside it."""

    @staticmethod
    def forward(ctx, sim: Simulator, first: int, keep_last: bool, record: tuple[int, ...], n_state: int,
                control: torch.Tensor, *tensors):
        state, params = tuple(tensors[:n_state]), tuple(tensors[n_state:])
        # keep_last: the rollout's last window, with a backward to follow: keep its intermediates
        # now instead of recomputing them (the backward peak holds one window's anyway).
        with torch.no_grad():
            final, kept, recorded = _run(sim, state, params, control, first, keep_last, record)
        if kept:  # outputs may alias kept intermediates, and the caller may modify them in place
            final, recorded = _copy(final), [_copy(r) for r in recorded]
        ctx.sim, ctx.first, ctx.record, ctx.n_state, ctx.kept = sim, first, record, n_state, kept or None
        ctx.save_for_backward(control, *tensors)
        return tuple(final) + tuple(t for r in recorded for t in r)

    @staticmethod
    def backward(ctx, *grads):
        control, *tensors = ctx.saved_tensors
        n = ctx.n_state
        state, params = tuple(tensors[:n]), tuple(tensors[n:])
        sim: Simulator = ctx.sim
        saved = ctx.kept
        ctx.kept = None
        inside = {off: grads[n * (i + 1): n * (i + 2)] for i, off in enumerate(ctx.record)}
        has_control = control.shape[1] > 0
        with torch.no_grad():
            if saved is None:  # recompute the window from its checkpoint, keeping every step
                _, saved, _ = _run(sim, state, params, control, ctx.first, True)
            adj = tuple(grads[:n])
            adj_params = [torch.zeros_like(p) for p in params]
            adj_control = torch.zeros_like(control)
            for s in range(len(saved) - 1, -1, -1):
                if s + 1 in inside:  # the state after step s was recorded: its gradient joins here
                    adj = tuple(a if g is None else (g if a is None else a + g) for a, g in zip(adj, inside[s + 1]))
                adj = sim.step_adjoint(saved[s], params, adj, adj_params, adj_control[s] if has_control else None)
                saved[s] = None  # free this step's intermediates as soon as they are used
        ctx.sim = None
        return (None, None, None, None, None, adj_control, *adj, *adj_params)


def checkpointed_rollout(sim: Simulator, state: StateTuple, n_steps: int, control: torch.Tensor,
                         params: Sequence[torch.Tensor], *, window: int, record_every: int | None = None,
                         keep_last_window: bool = True, first_index: int = 0,
                         check: Callable[[StateTuple, int], None] | None = None) -> Trajectory:
    """Run ``n_steps`` steps of ``sim`` differentiably, in checkpoint windows of ``window`` steps.

    Args:
        sim: The simulator.
        state: Initial state; tensors may require gradients, entries may be None where the
            simulator derives them.
        n_steps: Number of steps (>= 0).
        control: One row per step, shape (n_steps, ...); (n_steps, 0, ...) for none.
            Differentiable.
        params: Parameters (tensors, may require gradients).
        window: Steps per checkpoint window (>= 1).
        record_every: Record the state every this many steps (None: only the final state).
        keep_last_window: When gradients are needed, keep the last window's intermediates from
            the forward pass instead of recomputing them (same numbers, one window less work).
        first_index: Index of the first step in a longer rollout (passed on to ``sim.step``).
        check: Called with every recorded state and its step index, in order, right after the
            window that produced it (e.g. to stop on NaN).

    Returns:
        :class:`Trajectory`.
    """
    if n_steps < 0 or window < 1:
        raise ValueError(f"rollout: expected n_steps >= 0 and window >= 1, got {n_steps}, {window}")
    record = record_every or n_steps or 1
    n = len(state)
    states, steps = [tuple(state)], [0]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (control, *state, *params))
    s = 0
    while s < n_steps:
        k = min(window, n_steps - s)
        inside = tuple(r - s for r in range((s // record + 1) * record, s + k, record))
        last = keep_last_window and grad and s + k == n_steps
        out = _Window.apply(sim, first_index + s, last, inside, n, control[s:s + k],
                            *(None if t is None else t.contiguous() for t in state), *params)
        state = tuple(out[:n])
        new = len(states)
        for i, off in enumerate(inside):
            states.append(tuple(out[n * (i + 1): n * (i + 2)]))
            steps.append(s + off)
        s += k
        if s % record == 0 or s == n_steps:
            states.append(state)
            steps.append(s)
        if check is not None:
            for st, idx in zip(states[new:], steps[new:]):
                check(st, first_index + idx)
    return Trajectory(states, steps)
