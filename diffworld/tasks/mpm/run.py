"""Running an ``mpm`` scene: optimization of the objective, metrics and outputs; registered as ``mpm``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.problem import solve
from diffworld.tasks.mpm.build import MPMScene
from diffworld.tasks.mpm.config import MPMTask
from diffworld.tasks.mpm.objectives import PROBLEMS
from diffworld.tasks.mpm.outputs import write_outputs

__all__ = ["run_mpm"]


def run_mpm(scene_cfg, task: MPMTask, runtime, out_dir: Path, *, resume: bool = False, progress: bool = True,
            optimize: bool = True) -> dict:
    """Run an ``mpm`` scene into ``out_dir`` (through :func:`diffworld.engine.run.run_scene`, which
    seeds, restores torch's threads and writes the returned metrics to metrics.json)."""
    scene = MPMScene(task, runtime.dtype, runtime.device, scene_cfg.seed)
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
    metrics: dict = {"particles": scene.model.n_particles, "dt": scene.model.dt, "substeps": scene.n_substeps,
                     "grid": list(scene.model.grid.shape)}
    t0 = time.perf_counter()
    problem = PROBLEMS[task.objective.type](scene, task.objective)
    with torch.no_grad():
        before, total, terms = problem.evaluate()
        control_before = problem.control()
    metrics.update(problem.metrics("initial", total, terms))
    if optimize:
        solve(problem, settings, out_dir, resume=resume, progress=progress)
    with torch.no_grad():
        control = problem.control()
        after, total, terms = problem.evaluate()
    metrics.update(problem.metrics("final", total, terms))
    metrics.update(problem.write(before, after, out_dir))
    metrics["seconds"] = time.perf_counter() - t0
    metrics["liquid_surface"] = write_outputs(scene, before, after, out_dir, task, control, control_before)
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_mpm(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("mpm", MPMTask, _run)
