"""Objectives of the ``mpm`` task: loss terms, the growing horizon, and the trajectory problem."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffworld.tasks.mpm.build import MPMScene
from diffworld.tasks.mpm.config import DOFS, TrajectoryConfig

__all__ = ["HorizonSchedule", "LossTerms", "TrajectoryProblem"]


def _term_names(terms) -> list[str]:
    """Log names of the loss terms: ``type_body`` (``python_<callable>``, ``mixing_<a>_<b>``), indexed when not
    unique."""

    def key(t):
        if t.type == "python":
            return t.function.rsplit(":", 1)[1]
        return "_".join(t.bodies) if t.type == "mixing" else t.body

    keys = [(t.type, key(t)) for t in terms]
    return [f"{k[0]}_{k[1]}" if keys.count(k) == 1 else f"{k[0]}_{k[1]}_{i}" for i, k in enumerate(keys)]


class LossTerms:
    """The loss terms of a ``trajectory`` objective, with their targets prepared once.

    Final-state terms (``com``, ``region``, ``shape``, ``density``, ``chamfer``, ``mixing``) read the last
    recorded state (the state at the current horizon); ``target_trajectory`` reads every recorded
    state up to it; ``python`` terms get all of them.
    """

    def __init__(self, scene: MPMScene, terms) -> None:
        from diffworld.sims.mpm import losses

        self.scene, self.terms, self.names = scene, list(terms), _term_names(terms)
        dtype, device, grid = scene.model.dtype, scene.model.device, scene.grid
        self.mass = scene.masses()
        self.masks = {name: scene.mask(name) for name in scene.body_index}
        body_cfg = {b.name: b for b in [*scene.task.bodies, *scene.task.emitters]}  # (ppc)
        self.prepared: list = []
        for i, term in enumerate(self.terms):
            key = f"task.objective.losses[{i}]"
            if term.type == "com":
                prep = torch.tensor(term.target, dtype=dtype, device=device)
            elif term.type == "region":
                prep = (term.lower, term.upper)
            elif term.type == "shape":
                sdf = term.shape.build()
                points = losses.sample_shape(sdf, grid.lower, grid.upper, grid.dx)
                prep = (sdf.to(dtype) if isinstance(sdf, torch.nn.Module) else sdf, points.to(device, dtype))
            elif term.type == "density":
                total = float(self.mass[self.masks[term.body]].double().sum())
                try:
                    prep = losses.target_grids(term.shape.build(), total, grid.lower, grid.dx, grid.shape,
                                          ppc=term.ppc or body_cfg[term.body].ppc, dtype=dtype, device=device)
                except ValueError as exc:
                    raise ValueError(f"{key}.shape: {exc}") from None
            elif term.type == "chamfer":
                ppc = term.ppc or body_cfg[term.body].ppc
                points = losses.sample_shape(term.shape.build(), grid.lower, grid.upper, grid.dx / ppc ** (1.0 / 3.0))
                if points.shape[0] == 0:
                    raise ValueError(f"{key}.shape: the target shape holds no point inside the domain")
                prep = points.to(device, dtype)
            elif term.type == "target_trajectory":
                arr = term._targets
                n = int(self.masks[term.body].sum())
                want = (scene.task.steps, n, 3)
                if tuple(arr.shape) != want:
                    raise ValueError(f"{key}.path: {term.path} holds {term.key!r} of shape {tuple(arr.shape)}; "
                                     f"expected {want}: {scene.task.steps} control steps (task.steps) and the {n} "
                                     f"particles of body {term.body!r}")
                prep = torch.from_numpy(np.ascontiguousarray(arr)).to(device, dtype)
            elif term.type == "mixing":
                prep = None
            elif term.type == "pattern":
                try:
                    prep = losses.pattern_target(term._pixels, term.lower, term.upper, grid.lower, grid.dx,
                                            grid.shape, dtype=dtype, device=device)
                except ValueError as exc:
                    raise ValueError(f"{key}.image: {exc}") from None
            else:
                try:
                    prep = losses.load_callable(term.function)
                except ValueError as exc:
                    raise ValueError(f"{key}.function: {exc}") from None
            self.prepared.append(prep)

    def __call__(self, states, actions: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms (detached) of the recorded ``states``."""
        from diffworld.sims.mpm import losses

        scene, grid = self.scene, self.scene.grid
        horizon = len(states) - 1
        final = states[-1].x
        # Emitted particles count from their release on (parked ones sit at the nozzle).
        masks = self.masks
        if scene.model.emitted is not None:
            active = scene.model.released_mask(horizon * scene.task.substeps)
            masks = {k: m & active for k, m in masks.items()}
        out: dict[str, torch.Tensor] = {}
        total = final.new_zeros(())
        for i, (term, name, prep) in enumerate(zip(self.terms, self.names, self.prepared)):
            body = getattr(term, "body", None)
            mask = masks.get(body) if body is not None else None
            x = final[mask] if mask is not None else final
            if term.type == "com":
                value = losses.com_loss(x, prep, ["xyz".index(a) for a in term.axes])
            elif term.type == "region":
                value = losses.region_loss(x, prep[0], prep[1], grid.dx)
            elif term.type == "shape":
                value = losses.shape_cover_loss(x, prep[0], prep[1])
            elif term.type == "density":
                value = losses.shape_matching_loss(x, self.mass[mask], prep.density, prep.sdf, grid.lower, grid.dx,
                                              density_weight=term.density_weight, sdf_weight=term.sdf_weight,
                                              norm=term.norm).loss
            elif term.type == "chamfer":
                value = losses.chamfer_distance(x, prep)
            elif term.type == "pattern":
                value = losses.pattern_loss(x, self.mass[mask], prep, grid.lower, grid.dx,
                                       density_weight=term.density_weight, distance_weight=term.distance_weight).loss
            elif term.type == "mixing":
                ma, mb = (masks[b] for b in term.bodies)
                value = losses.mixing_loss(final[ma], self.mass[ma], final[mb], self.mass[mb], grid.lower, grid.dx,
                                      grid.shape, target=term.target, norm=term.norm)
            elif term.type == "target_trajectory":
                value = losses.trajectory_loss([s.x[mask] for s in states[1:]], prep[:horizon]) if horizon else \
                    final.sum() * 0.0
            else:
                info = losses.SceneInfo(model=scene.model, masks=masks, mass=self.mass, grid_lower=grid.lower,
                                   dx=grid.dx, grid_shape=grid.shape, dt=scene.model.dt, substeps=scene.task.substeps,
                                   steps=horizon, total_steps=scene.task.steps, actions=dict(actions or {}),
                                   body=term.body, options=dict(term.options))
                value = losses.call_user_loss(prep, states, info, f"task.objective.losses[{i}] ({term.function})")
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


class TrajectoryProblem:
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
