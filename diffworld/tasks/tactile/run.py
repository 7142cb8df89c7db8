"""Running a ``tactile`` scene: optimization of the objective, metrics and outputs; registered as ``tactile``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.problem import solve
from diffworld.tasks.tactile.build import build_scene
from diffworld.tasks.tactile.config import TactileTask
from diffworld.tasks.tactile.objectives import PROBLEMS, SystemIdentificationProblem, sysid_task
from diffworld.tasks.tactile.outputs import write_outputs

__all__ = ["run_tactile"]


def run_tactile(scene_cfg, task: TactileTask, runtime, out_dir: Path, *, resume: bool = False, progress: bool = True,
                optimize: bool = True) -> dict:
    """Run a ``tactile`` scene into ``out_dir`` (through :func:`diffworld.engine.run.run_scene`, which
    seeds, restores torch's threads and writes the returned metrics to metrics.json)."""
    bounds = None
    if task.objective.type == "system_identification":
        task, bounds = sysid_task(task)  # a dt stable for every value the fit may reach
    scene = build_scene(task, runtime.dtype, runtime.device)
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
    metrics: dict = {"nodes": scene.model.n_nodes, "tets": scene.model.n_tets, "dt": scene.dt,
                     "sensors": len(getattr(scene, "models", [scene.model])),
                     "particles": scene.mpm_model.n_particles if hasattr(scene, "mpm_model") else 0,
                     "substeps": scene.substeps, "steps": task.steps, "integrator": task.integrator}
    t0 = time.perf_counter()
    kind = PROBLEMS[task.objective.type]
    problem = (kind(scene, task.objective, seed=scene_cfg.seed, bounds=bounds) if kind is SystemIdentificationProblem
               else kind(scene, task.objective))
    with torch.no_grad():
        before, total, terms = problem.evaluate()
        control_before = problem.control()
    metrics.update(problem.metrics("initial", total, terms, before))
    if optimize:
        solve(problem, settings, out_dir, resume=resume, progress=progress)
    with torch.no_grad():
        after, total, terms = problem.evaluate()
        control_after = problem.control()
    metrics.update(problem.metrics("final", total, terms, after))
    problem.write(out_dir)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["files"] = write_outputs(scene, before, after, out_dir, control_before, control_after)
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_tactile(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("tactile", TactileTask, _run)
