"""Running a ``reconstruction`` scene: staged optimization, metrics and outputs; registered as ``reconstruction``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.driver import status
from diffworld.engine.problem import BaseProblem, solve
from diffworld.geometry.reconstruction import LossWeights, ReconstructionTarget, reconstruction_losses
from diffworld.tasks.reconstruction.config import POINT_TERMS, ReconstructionTask
from diffworld.tasks.reconstruction.representations import REPRESENTATIONS
from diffworld.tasks.reconstruction.evaluation import result_metrics
from diffworld.tasks.reconstruction.reference import Reference

__all__ = ["ReconstructionStage", "run_reconstruction"]


class ReconstructionStage(BaseProblem):
    """One optimizer stage of a reconstruction: the representation's parameters and the loss terms
    (:func:`~diffworld.geometry.reconstruction.reconstruction_losses`) at this stage's weights.

    Args:
        stage: The stage name.
        rep: The representation.
        params: Its parameters or parameter groups for this stage.
        target: Target points and normals.
        weights: Loss weights of this stage.
        n_samples: Points sampled per iteration.
        generator: The run's sampling generator (carried across stages).
        iterations: Iterations of the stage (for the schedule of the sdf_sign weight).
    """

    def __init__(self, stage: str, rep, params, target, weights: LossWeights, n_samples: int,
                 generator: torch.Generator, iterations: int, mesh_terms=None) -> None:
        self.stage, self.rep, self._params = stage, rep, params
        self.target, self.weights, self.n_samples, self.generator = target, weights, n_samples, generator
        self.iterations = max(iterations, 1)
        self.mesh_terms = mesh_terms

    def params(self):
        return self._params

    def loss_fn(self, iteration: int):
        return reconstruction_losses(self.rep, self.target, self.weights, self.n_samples, self.generator,
                                     progress=iteration / self.iterations,
                                     mesh_terms=None if self.mesh_terms is None else self.mesh_terms(self.rep))

    def state_dict(self) -> dict:
        # the sampling generator advances every iteration: a resumed stage must continue from here
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def project(self) -> None:
        project = getattr(self.rep, "project", None)
        if project is not None:
            project()


def run_reconstruction(scene, task: ReconstructionTask, runtime, out_dir: Path, *, resume: bool = False,
                       progress: bool = True, optimize: bool = True) -> dict:
    """Run a reconstruction scene into ``out_dir`` (through :func:`diffworld.engine.run.run_scene`,
    which seeds and writes the returned metrics to metrics.json)."""
    from diffworld.geometry.sdf import Sphere

    dtype, device = runtime.dtype, runtime.device
    gen = torch.Generator().manual_seed(scene.seed)
    w = task.weights
    weights = LossWeights(**{f.name: getattr(w, f.name) for f in dataclasses.fields(LossWeights)})
    images = mesh_terms = None
    if task.target.type == "images":
        from diffworld.tasks.reconstruction.images import image_reference, image_terms

        ref, images = image_reference(task, scene.seed, dtype, device)
        if task.target.observed_points:
            from diffworld.tasks.reconstruction.images import observed_points

            pts, nrm = observed_points(images, seed=scene.seed)
            target = ReconstructionTarget(pts, nrm, nrm is not None)
        else:
            target = ReconstructionTarget(torch.zeros((0, 3), dtype=dtype, device=device), None, True)
            weights = dataclasses.replace(weights, **{k: 0.0 for k in POINT_TERMS})
        mesh_terms = image_terms(images, task.image_weights)
    else:
        ref = Reference(task.target, task.bounds, scene.seed, task.evaluation.n_points, dtype)
        target = ReconstructionTarget(ref.target.points.to(device), None if ref.target.normals is None
                                      else ref.target.normals.to(device), ref.target.oriented)
    init = Sphere(task.representation.init_radius).to(dtype)

    entry = REPRESENTATIONS.builder(task.representation.type)(task.representation, task.bounds, scene.seed, dtype,
                                                              device)
    stages = entry.stages()
    rep = entry.initial(init)
    t0 = time.perf_counter()
    history = []
    for i, (stage, res) in enumerate(stages):
        if i > 0:
            rep = entry.refined(rep, res)
        if not optimize:
            break
        final = i == len(stages) - 1
        stage_weights = weights
        if w.chamfer_final_stage_only and not final:
            stage_weights = dataclasses.replace(weights, chamfer=0.0, mesh_normal=0.0)
        lr, params = entry.optimizer(rep, scene.optimizer.lr, final)
        settings = scene.optimizer.settings(seed=scene.seed, lr=lr)
        problem = ReconstructionStage(stage, rep, params, target, stage_weights, task.samples, gen,
                                      settings.iterations, mesh_terms)
        result = solve(problem, settings, out_dir, resume=resume, progress=progress)
        history.extend(result.history)
    fit_seconds = time.perf_counter() - t0

    with torch.no_grad():
        mesh = rep.extract()
    # Metrics and renders take seconds with no iterations to show: say what is running.
    with status("computing metrics", progress):
        metrics = {"fit_seconds": fit_seconds, "iterations": len(history)}
        if ref is not None:
            metrics["result"] = result_metrics(mesh.vertices, mesh.faces, ref, task.evaluation, scene.seed)
            metrics.update(_baseline_metrics(entry, ref, task, stages[-1][1], scene.seed))
        if images is not None:
            from diffworld.tasks.reconstruction.images import image_metrics, save_view_grid

            metrics["images"] = image_metrics(mesh.vertices.detach(), mesh.faces, images,
                                              two_sided=hasattr(mesh, "template"))
            save_view_grid(out_dir / "views.png", mesh.vertices.detach(), mesh.faces, images)
    if scene.output.save_mesh and mesh.faces.shape[0]:
        from diffworld.geometry.io import save_mesh

        save_mesh(out_dir / "result.ply", mesh.vertices.detach().cpu(), mesh.faces.cpu())
        entry.save(mesh, out_dir)
    with status("rendering", progress and (scene.output.render or scene.output.turntable)):
        if ref is not None:
            _render(scene, task, ref, mesh, out_dir)
        elif scene.output.turntable and mesh.faces.shape[0]:
            from diffworld.viz import render_turntable

            render_turntable(out_dir / scene.output.turntable_name(), mesh.vertices.detach().cpu(), mesh.faces.cpu())
    return metrics


def _baseline_metrics(entry, ref: Reference, task: ReconstructionTask, final_res: int, seed: int) -> dict:
    """Metrics of what the representations give on the true fields at the final resolution."""
    metrics: dict = {}
    base_values = ref.baseline_sdf_values(final_res, task.bounds, torch.float64)
    if base_values is not None:
        from diffworld.geometry.marching_cubes import marching_cubes

        base = marching_cubes(base_values, task.bounds)
        metrics["baseline_marching_cubes_true_sdf"] = result_metrics(base.vertices, base.faces, ref, task.evaluation,
                                                                     seed)
        metrics.update(entry.baselines(base_values, lambda v, f: result_metrics(v, f, ref, task.evaluation, seed)))
    if ref.open is not None:
        metrics["target_boundary_length"] = ref.open.boundary_length()
        base = ref.baseline_gshell(final_res, task.bounds, torch.float64)
        metrics["baseline_gshell_true_fields"] = result_metrics(base.vertices, base.faces, ref, task.evaluation,
                                                                seed)
    return metrics


def _render(scene, task: ReconstructionTask, ref: Reference, mesh, out_dir: Path) -> None:
    """render.png (result beside the target) and the turntable (.gif or .mp4), as the scene's output section
    asks."""
    if scene.output.render and mesh.faces.shape[0]:
        from diffworld.viz import render_side_by_side

        right = ref.mesh if ref.mesh is not None else ref.eval_points[:20000]
        if ref.sdf is not None:
            from diffworld.geometry.grid import Grid
            from diffworld.geometry.marching_cubes import marching_cubes
            from diffworld.geometry.sdf import sample_grid

            tm = marching_cubes(sample_grid(ref.sdf, Grid.make(128, task.bounds)), task.bounds)
            right = (tm.vertices, tm.faces)
        render_side_by_side(out_dir / "render.png", (mesh.vertices.detach().cpu(), mesh.faces.cpu()), right,
                            titles=("result", "target"))
    if scene.output.turntable and mesh.faces.shape[0]:
        from diffworld.viz import render_turntable

        render_turntable(out_dir / scene.output.turntable_name(), mesh.vertices.detach().cpu(), mesh.faces.cpu())


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_reconstruction(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("reconstruction", ReconstructionTask, _run)
