"""Differentiable rope rollouts: the engine's checkpointed rollout over the XPBD step.

Gradients reach the initial state (x, v), the pinned particles' trajectory (the control), the
linear density (through the masses, computed by torch), the stretch and bending compliances,
damping, gravity and the table's contact parameters. A window's forward keeps only its input
state; its backward recomputes the window with a tape per step and replays the tapes in reverse.
The state (x, v) is all a step reads (the XPBD multipliers restart from zero every step), so the
numbers do not depend on the window.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffworld.engine.rollout import checkpointed_rollout
from diffworld.sims.cable.model import Control, Model, State
from diffworld.sims.cable.solver import GROUND_PARAMS, RopeStepper

__all__ = ["PARAMS", "Rollout", "RopeSimulator", "SimulationError", "check_ground_dt", "rollout", "rope_params"]

# Parameters a rollout takes by name (``params=``); the step's ``mass`` comes from ``linear_density``.
PARAMS = ("linear_density", "stretch_compliance", "bend_compliance", "damping", "gravity",
          "ground_k_n", "ground_k_d", "ground_k_t", "ground_mu", "ground_eps_v")


class SimulationError(RuntimeError):
    """A rollout produced NaN/Inf."""


class Rollout(NamedTuple):
    """Result of :func:`rollout`.

    Attributes:
        states: Recorded states: the initial one, then every ``record_every`` steps and the final.
        steps: Step index of each recorded state.
    """

    states: list[State]
    steps: list[int]

    @property
    def final(self) -> State:
        return self.states[-1]

    def positions(self) -> torch.Tensor:
        """Recorded positions [m], (R, N, 3)."""
        return torch.stack([s.x for s in self.states])


class RopeSimulator:
    """The rope :class:`RopeStepper` as an :class:`~diffworld.engine.rollout.Simulator`: state (x, v)."""

    def __init__(self, stepper: RopeStepper) -> None:
        self.stepper = stepper

    def step(self, state, params, control, index: int, keep: bool):
        x1, v1, saved = self.stepper.step(state[0], state[1], params, control, keep)
        return (x1, v1), saved

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        return self.stepper.step_adjoint(saved, params, adj_out[0], adj_out[1], adj_params, adj_control)


def _scalar(name: str, t, model: Model) -> torch.Tensor:
    t = torch.as_tensor(t, device=model.device).to(model.dtype)
    if t.numel() != 1:
        raise ValueError(f"rollout: expected params[{name!r}] a scalar, got shape {tuple(t.shape)}")
    return t.reshape(())


def rope_params(model: Model, params: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The step parameters (:data:`~diffworld.sims.cable.solver.STEP_PARAMS`, then the table's) of
    ``model`` with the overrides ``params`` (names in :data:`PARAMS`), checked; differentiable.

    Raises:
        ValueError: Unknown names, wrong shapes, out-of-range values (messages name ``params[...]``).
    """
    merged = {"linear_density": model.linear_density, "stretch_compliance": model.stretch_compliance,
              "bend_compliance": model.bend_compliance, "damping": model.damping, "gravity": model.gravity}
    if model.ground is not None:
        gp = model.ground.params
        for name in GROUND_PARAMS:
            merged["ground_" + name] = getattr(gp, name)
    for name, t in (params or {}).items():
        if name not in PARAMS:
            raise ValueError(f"rollout: unknown parameter {name!r}; expected one of {list(PARAMS)}")
        if name.startswith("ground_") and model.ground is None:
            raise ValueError(f"rollout: params[{name!r}] given but the model has no ground")
        merged[name] = t
    n = model.n_particles
    out = {}
    for name, want in (("linear_density", (n - 1,)), ("stretch_compliance", (n - 1,)),
                       ("bend_compliance", (n - 2,))):
        t = torch.as_tensor(merged[name], device=model.device).to(model.dtype)
        t = t.expand(want) if t.dim() == 0 else t
        if tuple(t.shape) != want:
            raise ValueError(f"rollout: expected params[{name!r}] a scalar or of shape {want}, got {tuple(t.shape)}")
        d = t.detach()
        ok = (d > 0) if name == "linear_density" else (d >= 0)
        if d.numel() and not bool((torch.isfinite(d) & ok).all()):
            bound = "> 0" if name == "linear_density" else ">= 0"
            raise ValueError(f"rollout: params[{name!r}] must be finite and {bound}")
        out[name] = t
    if model.bending == "angle" and n > 2 and bool((out["bend_compliance"].detach() <= 0).any()):
        raise ValueError("rollout: params['bend_compliance'] must be > 0 for angle bending")
    damping = _scalar("damping", merged["damping"], model)
    if not (math.isfinite(float(damping.detach())) and float(damping.detach()) >= 0):
        raise ValueError(f"rollout: params['damping'] must be finite and >= 0 [1/s], got {float(damping):g}")
    g = torch.as_tensor(merged["gravity"], device=model.device).to(model.dtype)
    if tuple(g.shape) != (3,) or not bool(torch.isfinite(g.detach()).all()):
        raise ValueError(f"rollout: expected params['gravity'] 3 finite numbers, got shape {tuple(g.shape)}")
    plist = [model.masses(out["linear_density"]), out["stretch_compliance"], out["bend_compliance"],
             damping.reshape(1), g]
    if model.ground is not None:
        for name in GROUND_PARAMS:
            t = _scalar("ground_" + name, merged["ground_" + name], model)
            v = float(t.detach())
            if not math.isfinite(v) or v < 0 or (name == "eps_v" and v <= 0):
                raise ValueError(f"rollout: params['ground_{name}'] must be finite and "
                                 f"{'> 0' if name == 'eps_v' else '>= 0'}, got {v:g}")
            plist.append(t)
    return [t.contiguous() for t in plist]


def check_ground_dt(model: Model, plist: list[torch.Tensor], dt: float) -> None:
    """Refuse a step that cannot resolve the table's penalty contact (explicit forces): require
    ``k_n dt^2 / m < 4`` and ``k_t dt / m < 2`` for the lightest free particle.

    Raises:
        ValueError: Naming the parameter, its limit for this ``dt`` and the largest stable dt.
    """
    if model.ground is None:
        return
    free = torch.ones(model.n_particles, dtype=torch.bool, device=model.device)
    free[model.pinned] = False
    if not bool(free.any()):
        return
    m = float(plist[0].detach()[free].min())
    k_n, k_t = float(plist[5].detach()), float(plist[7].detach())
    if k_n * dt * dt / m >= 4:
        raise ValueError(f"rollout: ground k_n {k_n:g} N/m is too stiff for dt {dt:g} s with particle mass {m:.3g} kg "
                         f"(need k_n < {4 * m / dt**2:.3g}, or dt < {2 * math.sqrt(m / k_n):.3g} s)")
    if k_t * dt / m >= 2:
        raise ValueError(f"rollout: ground k_t {k_t:g} N s/m is too stiff for dt {dt:g} s with particle mass "
                         f"{m:.3g} kg (need k_t < {2 * m / dt:.3g})")


def check_state(state, step: int, dt: float) -> None:
    """Raise :class:`SimulationError` if ``state`` holds NaN/Inf."""
    with torch.no_grad():
        for name, t in zip(State._fields, state):
            if not bool(torch.isfinite(t).all()):
                i = int((~torch.isfinite(t)).any(1).nonzero()[0])
                raise SimulationError(f"non-finite {name} of rope particle {i} after step {step} "
                                      f"(t = {step * dt:.4g} s); check compliances, contact stiffness and dt")


def _check_initial(model: Model, state) -> State:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"rollout: expected 'state' a cable.State (x, v), got {type(state).__name__}")
    n = model.n_particles
    for name, t in zip(("x", "v"), state):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, 3):
            raise ValueError(f"rollout: expected state.{name} of shape ({n}, 3), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"rollout: state.{name} has non-finite values")
    return State(*(t.to(device=model.device, dtype=model.dtype) for t in state))


def rollout(model: Model, state: State, dt: float, n_steps: int | None = None, control: Control | None = None, *,
            window: int = 32, record_every: int | None = None, params: dict[str, torch.Tensor] | None = None,
            check: bool = True, stepper: RopeStepper | None = None, keep_last_window: bool = True) -> Rollout:
    """Simulate XPBD rope steps, differentiably, in checkpoint windows.

    Args:
        model: The rope.
        state: Initial state (may require gradients).
        dt: Step [s].
        n_steps: Number of steps; default the control's length.
        control: Pinned particles' positions per step (None: held at rest). Differentiable.
        window: Steps per checkpoint window (the numbers do not depend on it).
        record_every: Record the state every this many steps (default only the final one).
        params: Overrides by name (:data:`PARAMS`), e.g. tensors that require gradients.
        check: Stop with :class:`SimulationError` on NaN/Inf in a recorded state.
        stepper: A :class:`RopeStepper` of this model and dt to reuse.
        keep_last_window: Keep the last window's tapes from the forward (same numbers).

    Returns:
        A :class:`Rollout`.

    Raises:
        ValueError: Bad shapes, parameters, step counts, or a ``dt`` too large for the table's
            contact stiffness.
        SimulationError: NaN/Inf.
    """
    if not isinstance(model, Model):
        raise TypeError(f"rollout: expected 'model' a cable.Model, got {type(model).__name__}")
    state = _check_initial(model, state)
    n_ctrl = control.n_steps if control is not None else None
    if n_steps is None:
        if n_ctrl is None:
            raise ValueError("rollout: give 'n_steps' or a control with positions")
        n_steps = n_ctrl
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"rollout: expected n_steps an integer >= 0, got {n_steps!r}")
    if n_ctrl is not None and n_ctrl != n_steps:
        raise ValueError(f"rollout: n_steps {n_steps} but the control has {n_ctrl} steps")
    if window < 1:
        raise ValueError(f"rollout: expected window >= 1, got {window}")
    plist = rope_params(model, params)
    if stepper is None:
        stepper = RopeStepper(model, dt)
    elif stepper.model is not model or stepper.dt_value != float(dt):
        raise ValueError("rollout: 'stepper' was built for another model or dt")
    check_ground_dt(model, plist, stepper.dt_value)
    rows = (control or Control()).rows(model, n_steps)

    def check_recorded(st, k: int) -> None:
        check_state(st, k, dt)

    traj = checkpointed_rollout(RopeSimulator(stepper), tuple(state), n_steps, rows, plist, window=window,
                                record_every=record_every, keep_last_window=keep_last_window,
                                check=check_recorded if check else None)
    return Rollout([state] + [State(*st) for st in traj.states[1:]], traj.steps)
