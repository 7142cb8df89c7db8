"""Objectives of the ``mpm`` task: loss terms, the growing horizon, and the trajectory problem."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.problem import BaseProblem
from diffworld.tasks.mpm.build import MPMScene
from diffworld.tasks.mpm.config import DOFS, SystemIdentificationConfig, TrajectoryConfig
from diffworld.tasks.mpm.loss_terms import LOSS_TERMS, StatesView, term_names

__all__ = ["HorizonSchedule", "LossTerms", "PROBLEMS", "SystemIdentificationProblem", "TrajectoryProblem"]


class LossTerms:
    """The loss terms of a ``trajectory`` objective (:data:`~diffworld.tasks.mpm.loss_terms.LOSS_TERMS`
    entries), with their targets prepared once, and their weighted total."""

    def __init__(self, scene: MPMScene, terms) -> None:
        self.scene, self.terms, self.names = scene, list(terms), term_names(terms)
        self.mass = scene.masses()
        self.masks = {name: scene.mask(name) for name in scene.body_index}
        self.prepared = [LOSS_TERMS.builder(t.type)(scene, t, f"task.objective.losses[{i}]")
                         for i, t in enumerate(self.terms)]

    def __call__(self, states, actions: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms (detached) of the recorded ``states``."""
        scene = self.scene
        horizon = len(states) - 1
        # Emitted particles count from their release on (parked ones sit at the nozzle).
        masks = self.masks
        if scene.model.emitted is not None:
            active = scene.model.released_mask(horizon * scene.task.substeps)
            masks = {k: m & active for k, m in masks.items()}
        view = StatesView(states, masks, dict(actions or {}))
        out: dict[str, torch.Tensor] = {}
        total = view.final.new_zeros(())
        for term, name, evaluate in zip(self.terms, self.names, self.prepared):
            value = evaluate(view)
            out[name] = value.detach()
            total = total + term.weight * value.to(total.dtype)
        return total, out


class HorizonSchedule:
    """A loss horizon (in control steps) that grows when the loss stops improving (FluidLab).

    Feed the loss of every iteration to :meth:`update`; it returns the horizon of the next one.
    The losses are compared only at the same horizon: after ``patience + 1`` iterations at a
    horizon, if ``(L[i - patience] - L[i]) / |L[i - patience]| < tolerance`` the horizon grows by
    ``grow`` steps (at most ``total``) and the comparison restarts.

    Args:
        initial: First horizon (>= 1; clipped to ``total``).
        grow: Steps added at a stall (>= 1).
        patience: Iterations over which the improvement is measured (>= 1).
        tolerance: Relative improvement below which the horizon grows (>= 0).
        total: Largest horizon (the task's control steps).

    Attributes:
        horizon: The horizon of the next iteration.
        history: The horizon used at each iteration fed so far.
    """

    def __init__(self, initial: int, grow: int, patience: int, tolerance: float, total: int) -> None:
        for name, v in (("initial", initial), ("grow", grow), ("patience", patience), ("total", total)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HorizonSchedule.{name}: expected an int >= 1, got {v!r}")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"HorizonSchedule.tolerance: expected a finite number >= 0, got {tolerance!r}")
        self.grow, self.patience, self.tolerance, self.total = grow, patience, float(tolerance), total
        self.horizon = min(initial, total)
        self.history: list[int] = []
        self._losses: list[float] = []

    def update(self, loss: float) -> int:
        """Record the loss of the iteration just run (at :attr:`horizon`); return the next horizon."""
        self.history.append(self.horizon)
        self._losses.append(float(loss))
        if self.horizon < self.total and len(self._losses) > self.patience:
            ref, cur = self._losses[-1 - self.patience], self._losses[-1]
            if (ref - cur) / max(abs(ref), 1e-30) < self.tolerance:
                self.horizon = min(self.horizon + self.grow, self.total)
                self._losses = []
        return self.horizon


class TrajectoryProblem(BaseProblem):
    """The optimization problem of a ``trajectory`` objective: parameters, loss, projection, horizon.

    Parameters are the per-control-step velocities of the controlled colliders, float64 leaves of
    shape (steps, 6) (linear [m/s], angular [rad/s]). Aids:

    * action clipping (``max_speed``, ``max_angular_speed``): :meth:`project` after every step,
      and once on the initial guess;
    * ``freeze_steps``: the first K rows get a zero gradient (a hook, so gradient clipping does
      not see them) and :meth:`project` restores their initial value;
    * ``dofs``: the velocity components of a collider that are not listed get a zero gradient
      (the same hook) and keep their initial value; action clipping then scales only the
      optimized components (the fixed ones are never changed after the initial clipping);
    * ``workspace``: after clipping, each step's free linear components are scaled down where
      the collider would leave its box (:meth:`_keep_in_workspace`), once on the initial guess
      too;
    * ``horizon``: :meth:`loss_fn` simulates and scores only the first :attr:`horizon` steps;
      :meth:`callback` (the driver's per-iteration callback) grows it (:class:`HorizonSchedule`).
    Gradient clipping is the driver's (``optimizer.clip_grad_norm`` / ``clip_grad_value``).
    """

    stage = "trajectory"

    def __init__(self, scene: MPMScene, obj: TrajectoryConfig) -> None:
        task = scene.task
        self.scene, self.obj = scene, obj
        self.losses = LossTerms(scene, obj.losses)
        cfgs = {c.name: c for c in task.colliders}
        start = {n: scene.initial_motion(cfgs[n]) for n in obj.controlled}
        self.velocities = {n: start[n][2].clone().requires_grad_() for n in obj.controlled}
        # 1 where a velocity component is optimized (objective.dofs; default all six).
        self.free = {n: torch.tensor([c in obj.dofs.get(n, DOFS) for c in DOFS], dtype=torch.bool)
                     for n in obj.controlled}
        k = obj.freeze_steps
        for n, v in self.velocities.items():
            if k or not bool(self.free[n].all()):
                keep = self.free[n].to(torch.float64).expand(task.steps, 6).clone()
                keep[:k] = 0.0
                v.register_hook(lambda g, keep=keep: g * keep)
        self.start = {n: start[n][0] for n in obj.controlled}  # start positions [m]
        self.step_time = task.substeps * scene.model.dt  # [s] per control step
        with torch.no_grad():
            self._clip()
            self._keep_in_workspace()
        self.initial = {n: v.detach().clone() for n, v in self.velocities.items()}
        h = obj.horizon
        self.schedule = HorizonSchedule(h.initial, h.grow, h.patience, h.tolerance, task.steps) if h else None

    @property
    def horizon(self) -> int:
        """Control steps simulated and scored by :meth:`loss_fn` now."""
        return self.schedule.horizon if self.schedule is not None else self.scene.task.steps

    def params(self) -> dict[str, torch.Tensor]:
        """The optimized tensors by log name (``velocity_<collider>``)."""
        return {f"velocity_{n}": v for n, v in self.velocities.items()}

    def control(self) -> torch.Tensor | None:
        return self.scene.control({n: v.to(self.scene.model.dtype) for n, v in self.velocities.items()})

    def evaluate(self, steps: int | None = None):
        """(rollout, total loss, terms) over the first ``steps`` control steps (default: all)."""
        out = self.scene.simulate(self.control(), steps=steps)
        total, terms = self.losses(out.states, self.velocities)
        return out, total, terms

    def loss_fn(self, _iteration: int) -> tuple[torch.Tensor, dict]:
        """The driver's loss function: the loss at the current horizon (logged as term ``horizon``)."""
        _, total, terms = self.evaluate(self.horizon)
        if self.schedule is not None:
            terms = {**terms, "horizon": float(self.horizon)}
        return total, terms

    def _clip(self, free: dict[str, torch.Tensor] | None = None) -> None:
        """Scale each row's linear and angular velocity down to the speed bounds.

        With ``free`` (a bool mask (6,) per collider) only the free components are scaled, by the
        largest factor in [0, 1] that brings the whole vector within the bound (the fixed part is
        within it already: it kept its initially clipped value).
        """
        obj = self.obj
        for n, v in self.velocities.items():
            for part, bound in ((slice(0, 3), obj.max_speed), (slice(3, 6), obj.max_angular_speed)):
                u = v[:, part]
                m = free[n][part].to(u.dtype) if free is not None else torch.ones(3, dtype=u.dtype)
                p, f = u * m, u * (1 - m)
                pp, fp, ff = (p * p).sum(1), (f * p).sum(1), (f * f).sum(1)
                # largest s with |f + s p| <= bound: the positive root of pp s^2 + 2 fp s + ff - bound^2
                disc = (fp * fp - pp * (ff - bound * bound)).clamp_min(0.0)
                s = ((torch.sqrt(disc) - fp) / pp.clamp_min(1e-24)).clamp(0.0, 1.0)
                s = torch.where((ff + 2 * fp + pp) > bound * bound, s, torch.ones_like(s))
                u.copy_(f + s[:, None] * p)

    def _keep_in_workspace(self, free: dict[str, torch.Tensor] | None = None) -> None:
        """Scale down linear velocities step by step so that the position stays in the workspace box.

        The position after step k is ``p_k = p_{k-1} + v_k * step_time``; where it would leave the
        box, the free components of ``v_k`` (all three without ``free``) are scaled by the largest
        factor in [0, 1] that keeps it inside. Frozen rows are left as they are.
        """
        k0 = self.obj.freeze_steps if free is not None else 0
        for n, box in self.obj.workspace.items():
            v = self.velocities[n]
            lo = torch.tensor(box.lower, dtype=v.dtype)
            hi = torch.tensor(box.upper, dtype=v.dtype)
            m = free[n][:3].to(v.dtype) if free is not None else torch.ones(3, dtype=v.dtype)
            p = self.start[n].to(v.dtype)
            for k in range(v.shape[0]):
                step = v[k, :3] * self.step_time
                if k >= k0:
                    fixed, moving = step * (1 - m), step * m
                    base = p + fixed
                    # largest s in [0, 1] with lo <= base + s * moving <= hi on every axis
                    room = torch.where(moving > 0, (hi - base) / moving.clamp_min(1e-30),
                                       torch.where(moving < 0, (lo - base) / moving.clamp_max(-1e-30),
                                                   torch.full_like(base, math.inf)))
                    s = float(room.clamp(0.0, 1.0).min())
                    if s < 1.0:
                        v[k, :3] = (fixed + s * moving) / self.step_time
                        step = v[k, :3] * self.step_time
                p = p + step

    def project(self) -> None:
        """Fixed components (``dofs``) back to their initial values, action clipping of the free ones,
        the workspace, then the frozen rows back to their initial values (under no_grad)."""
        for n, v in self.velocities.items():
            if not bool(self.free[n].all()):
                v.copy_(torch.where(self.free[n], v, self.initial[n]))
        self._clip(self.free)
        self._keep_in_workspace(self.free)
        k = self.obj.freeze_steps
        if k:
            for n, v in self.velocities.items():
                v[:k] = self.initial[n][:k]

    def metrics(self, phase: str, total: torch.Tensor, terms: dict) -> dict:
        """Metrics of the evaluation before (``initial``) or after (``final``) the optimization."""
        out: dict = {}
        if phase == "final" and self.schedule is not None:
            out["horizon_schedule"] = list(self.schedule.history)
            out["final_horizon"] = self.horizon
        out[f"{phase}_loss"] = float(total)
        out[f"{phase}_terms"] = {k: float(v) for k, v in terms.items()}
        return out

    def write(self, before, after, out_dir: Path) -> dict:
        """Files of the result: the optimized velocities, and the pattern images of pattern terms."""
        from diffworld.tasks.mpm.outputs import write_patterns

        images = write_patterns(self.losses, before, after, out_dir)
        np.save(out_dir / "velocities.npy", {n: v.detach().numpy() for n, v in self.velocities.items()},
                allow_pickle=True)
        return {"pattern_images": images}

    def callback(self, _iteration: int, row: dict) -> None:
        """Feed the iteration's loss to the horizon schedule."""
        if self.schedule is not None:
            self.schedule.update(row["loss"])

    def replay(self, checkpoint: Path) -> None:
        """Rebuild the horizon schedule from a driver checkpoint's history (for ``--resume``)."""
        if self.schedule is None or not checkpoint.is_file():
            return
        try:
            history = torch.load(checkpoint, map_location="cpu", weights_only=True)["history"]
        except Exception:  # noqa: BLE001 - the driver reports unreadable checkpoints itself
            return
        for row in history:
            self.schedule.update(row["loss"])


# Material parameters optimized in log space (moduli, densities), and the bounds of the others.
_LOG_PARAMS = ("E", "viscosity", "yield_stress", "density")
_BOUNDS = {"nu": (-0.9, 0.45), "friction_angle": (1.0, 60.0)}


class SystemIdentificationProblem(BaseProblem):
    """The problem of a ``system_identification`` objective: recover material parameters of one
    body from its motion.

    The observed motion is simulated with ``truth``; the loss is the mean squared particle
    distance to it over every control step, in cells^2. The optimizer sees moduli and densities
    in log space, the friction angle in degrees, ``nu`` and the angle clamped to physical bounds.
    """

    stage = "sysid"

    def __init__(self, scene: MPMScene, obj: SystemIdentificationConfig) -> None:
        self.scene, self.obj = scene, obj
        self.mask = scene.mask(obj.body)
        self._control = scene.control({})
        with torch.no_grad():
            truth = self._body_params(self._optimizer_values(obj.truth))
            self.observed = [s.x.detach() for s in scene.simulate(self._control, truth).states]
        self.raw = self._optimizer_values(obj.initial, grad=True)

    def _body_params(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-particle parameters: the body's from the optimizer's values, the others' unchanged."""
        out = {}
        for k, v in values.items():
            base = self.scene.model.params[k].detach()
            val = torch.exp(v) if k in _LOG_PARAMS else (torch.deg2rad(v) if k == "friction_angle" else v)
            out[k] = torch.where(self.mask, val.to(self.scene.model.dtype), base)
        return out

    @staticmethod
    def _optimizer_values(values: dict[str, float], grad: bool = False) -> dict[str, torch.Tensor]:
        """Parameter values as the optimizer sees them (moduli in log space)."""
        return {k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v, dtype=torch.float64, requires_grad=grad)
                for k, v in values.items()}

    def _error(self, states) -> torch.Tensor:
        err = sum(((s.x - o) ** 2).sum(1).mean() for s, o in zip(states[1:], self.observed[1:])) / (len(states) - 1)
        return err / self.scene.grid.dx ** 2

    def current(self) -> dict[str, float]:
        """The parameter values now, in scene units."""
        return {k: float(torch.exp(v.detach())) if k in _LOG_PARAMS else float(v.detach()) for k, v in self.raw.items()}

    def params(self) -> dict[str, torch.Tensor]:
        return self.raw

    def control(self) -> torch.Tensor | None:
        return self._control

    def evaluate(self):
        """(rollout, loss, terms) with the current parameters."""
        out = self.scene.simulate(self._control, self._body_params(self.raw))
        return out, self._error(out.states), {}

    def loss_fn(self, _iteration: int):
        return self._error(self.scene.simulate(self._control, self._body_params(self.raw)).states), {}

    def project(self) -> None:
        for k, (lo, hi) in _BOUNDS.items():
            if k in self.raw:
                self.raw[k].clamp_(lo, hi)

    def metrics(self, phase: str, total: torch.Tensor, terms: dict) -> dict:
        """Metrics before (``initial``: the start values) or after (``final``: recovered vs truth)."""
        if phase == "initial":
            return {"initial": self.current(), "initial_loss": float(total)}
        found, truth = self.current(), dict(self.obj.truth)
        return {"recovered": found, "truth": truth,
                "relative_error": {k: abs(found[k] - truth[k]) / abs(truth[k]) for k in found},
                "final_loss": float(total)}

    def write(self, before, after, out_dir: Path) -> dict:
        return {}


# objective type -> its problem
PROBLEMS = {"trajectory": TrajectoryProblem, "system_identification": SystemIdentificationProblem}
