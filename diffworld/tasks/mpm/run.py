"""Running an ``mpm`` scene: optimization of the objective, metrics and outputs; registered as ``mpm``."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.config.registry import TASKS
from diffworld.tasks.mpm.build import MPMScene
from diffworld.tasks.mpm.config import MPMTask
from diffworld.tasks.mpm.objectives import TrajectoryProblem
from diffworld.tasks.mpm.outputs import write_outputs, write_patterns

__all__ = ["run_mpm"]


_LOG_PARAMS = ("E", "viscosity", "yield_stress", "density")


def run_mpm(scene_cfg, task: MPMTask, runtime, out_dir: Path, *, resume: bool = False, progress: bool = True,
            optimize: bool = True) -> dict:
    """Run an ``mpm`` scene into ``out_dir`` (through :func:`diffworld.engine.run.run_scene`, which
    seeds, restores torch's threads and writes the returned metrics to metrics.json)."""
    from diffworld.engine.driver import optimize as run_optimizer

    scene = MPMScene(task, runtime.dtype, runtime.device, scene_cfg.seed)
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
    obj = task.objective
    metrics: dict = {"particles": scene.model.n_particles, "dt": scene.model.dt, "substeps": scene.n_substeps,
                     "grid": list(scene.model.grid.shape)}
    t0 = time.perf_counter()

    if obj.type == "system_identification":
        mask = scene.mask(obj.body)
        dtype = scene.model.dtype

        def body_params(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in values.items():
                base = scene.model.params[k].detach()
                val = torch.exp(v) if k in _LOG_PARAMS else (torch.deg2rad(v) if k == "friction_angle" else v)
                out[k] = torch.where(mask, val.to(dtype), base)
            return out

        def optimizer_values(values: dict[str, float], grad: bool = False) -> dict[str, torch.Tensor]:
            """Parameter values as the optimizer sees them (moduli in log space)."""
            return {k: torch.tensor(math.log(v) if k in _LOG_PARAMS else v, dtype=torch.float64, requires_grad=grad)
                    for k, v in values.items()}

        control = scene.control({})
        with torch.no_grad():
            observed = [s.x.detach() for s in scene.simulate(control, body_params(optimizer_values(obj.truth))).states]
        raw = optimizer_values(obj.initial, grad=True)
        bounds = {"nu": (-0.9, 0.45), "friction_angle": (1.0, 60.0)}

        def error(states) -> torch.Tensor:
            err = sum(((s.x - o) ** 2).sum(1).mean() for s, o in zip(states[1:], observed[1:])) / (len(states) - 1)
            return err / scene.grid.dx ** 2

        def loss_fn(_it):
            return error(scene.simulate(control, body_params(raw)).states), {}

        def project():
            for k, (lo, hi) in bounds.items():
                if k in raw:
                    raw[k].clamp_(lo, hi)

        def current() -> dict[str, float]:
            return {k: float(torch.exp(v.detach())) if k in _LOG_PARAMS else float(v.detach()) for k, v in raw.items()}

        metrics["initial"] = current()
        with torch.no_grad():
            before = scene.simulate(control, body_params(raw))
            metrics["initial_loss"] = float(error(before.states))
        if optimize:
            run_optimizer(raw, loss_fn, settings, out_dir, stage="sysid", resume=resume, progress=progress,
                          projection=project)
        found = current()
        metrics["recovered"] = found
        metrics["truth"] = dict(obj.truth)
        metrics["relative_error"] = {k: abs(found[k] - obj.truth[k]) / abs(obj.truth[k]) for k in found}
        with torch.no_grad():
            after = scene.simulate(control, body_params(raw))
            metrics["final_loss"] = float(error(after.states))
    else:
        problem = TrajectoryProblem(scene, obj)
        vel = problem.velocities
        with torch.no_grad():
            before, l0, terms0 = problem.evaluate()
            control_before = problem.control()
        metrics["initial_loss"] = float(l0)
        metrics["initial_terms"] = {k: float(v) for k, v in terms0.items()}
        if optimize:
            if resume:
                problem.replay(out_dir / "checkpoints" / "trajectory.pt")
            run_optimizer(problem.params(), problem.loss_fn, settings, out_dir, stage="trajectory", resume=resume,
                          progress=progress, projection=problem.project, callback=problem.callback)
        if problem.schedule is not None:
            metrics["horizon_schedule"] = list(problem.schedule.history)
            metrics["final_horizon"] = problem.horizon
        with torch.no_grad():
            control = problem.control()
            after, l1, terms1 = problem.evaluate()
        metrics["final_loss"] = float(l1)
        metrics["final_terms"] = {k: float(v) for k, v in terms1.items()}
        metrics["pattern_images"] = write_patterns(problem.losses, before, after, out_dir)
        np.save(out_dir / "velocities.npy", {n: v.detach().numpy() for n, v in vel.items()}, allow_pickle=True)
    metrics["seconds"] = time.perf_counter() - t0
    if obj.type == "system_identification":
        control_before = control
    metrics["liquid_surface"] = write_outputs(scene, before, after, out_dir, task, control, control_before)
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_mpm(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("mpm", MPMTask, _run)
