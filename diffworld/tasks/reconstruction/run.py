"""Running a ``reconstruction`` scene: staged optimization, metrics and outputs; registered as ``reconstruction``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.geometry.reconstruction import (
    FlexiCubesGrid,
    GShellGrid,
    GridSDF,
    LossWeights,
    NeuralSDFRepresentation,
    ReconstructionTarget,
    reconstruction_losses,
)
from diffworld.tasks.reconstruction.config import FLEXIBLE, ReconstructionTask
from diffworld.tasks.reconstruction.evaluation import result_metrics
from diffworld.tasks.reconstruction.reference import Reference

__all__ = ["run_reconstruction"]


def _cells(value: float | None, cell: float) -> float | None:
    return None if value is None else value * cell


def run_reconstruction(scene, task: ReconstructionTask, runtime, out_dir: Path, *, resume: bool = False,
                       progress: bool = True, optimize: bool = True) -> dict:
    """Run a reconstruction scene into ``out_dir`` (through :func:`diffworld.engine.run.run_scene`,
    which seeds and writes the returned metrics to metrics.json)."""
    from diffworld.engine.driver import optimize as run_optimizer
    from diffworld.geometry.sdf import Sphere

    dtype, device = runtime.dtype, runtime.device
    gen = torch.Generator().manual_seed(scene.seed)
    ref = Reference(task.target, task.bounds, scene.seed, task.evaluation.n_points, dtype)
    target = ReconstructionTarget(ref.target.points.to(device), None if ref.target.normals is None
                                  else ref.target.normals.to(device), ref.target.oriented)
    w = task.weights
    weights = LossWeights(**{f.name: getattr(w, f.name) for f in dataclasses.fields(LossWeights)})
    init = Sphere(task.representation.init_radius).to(dtype)

    rep_cfg = task.representation
    staged = rep_cfg.type in ("grid", *FLEXIBLE)
    if staged:
        stages = [(f"{rep_cfg.type}{r}", r) for r in rep_cfg.resolutions]
        rep = GridSDF.from_field(init, rep_cfg.resolutions[0], task.bounds, dtype, device)
        if rep_cfg.type in FLEXIBLE:
            opts = {"learn_weights": rep_cfg.learn_weights, "learn_deform": rep_cfg.learn_deform}
            if rep_cfg.type == "gshell":
                h = rep.cell
                rep = GShellGrid(rep.values, torch.full_like(rep.values, rep_cfg.msdf_init * h), task.bounds,
                                 msdf_eps=rep_cfg.msdf_eps * h, msdf_radius=rep_cfg.msdf_radius * h,
                                 msdf_tangential=_cells(rep_cfg.msdf_tangential, h), **opts)
            else:
                rep = FlexiCubesGrid(rep.values, task.bounds, **opts)
    else:
        from diffworld.geometry.neural_sdf import NeuralSDF

        net = NeuralSDF(width=rep_cfg.width, depth=rep_cfg.depth, n_frequencies=rep_cfg.n_frequencies,
                        radius=rep_cfg.init_radius, seed=scene.seed).to(device=device, dtype=dtype)
        rep = NeuralSDFRepresentation(net, rep_cfg.resolution, task.bounds, dtype, device)
        stages = [("neural", rep_cfg.resolution)]

    t0 = time.perf_counter()
    history = []
    for i, (stage, res) in enumerate(stages):
        if staged and i > 0:
            rep = rep.upsampled(res)
            if rep_cfg.type == "gshell":
                # msdf margins and supervision radius are in cells of the current grid.
                rep.msdf_eps, rep.msdf_radius = rep_cfg.msdf_eps * rep.cell, rep_cfg.msdf_radius * rep.cell
                rep.msdf_tangential = _cells(rep_cfg.msdf_tangential, rep.cell)
        if not optimize:
            break
        stage_weights = weights
        if w.chamfer_final_stage_only and i < len(stages) - 1:
            stage_weights = dataclasses.replace(weights, chamfer=0.0, mesh_normal=0.0)
        # Grid learning rates are in cells per step, so every resolution moves alike.
        lr = scene.optimizer.lr
        scale = 1.0
        if staged:
            scale = rep_cfg.final_lr_scale if i == len(stages) - 1 else 1.0
            lr *= rep.cell * scale
        settings = scene.optimizer.settings(seed=scene.seed, lr=lr)
        params = rep.parameters()
        if rep_cfg.type in FLEXIBLE:
            params = rep.parameter_groups(lr, rep_cfg.weights_lr * scale, rep_cfg.deform_lr * scale)
        n_it = max(settings.iterations, 1)
        result = run_optimizer(params,
                               lambda it: reconstruction_losses(rep, target, stage_weights, task.samples, gen,
                                                                progress=it / n_it),
                               settings, out_dir, stage=stage, resume=resume, progress=progress,
                               projection=getattr(rep, "project", None))
        history.extend(result.history)
    fit_seconds = time.perf_counter() - t0

    with torch.no_grad():
        mesh = rep.extract()
    metrics = {"result": result_metrics(mesh.vertices, mesh.faces, ref, task.evaluation, scene.seed),
               "fit_seconds": fit_seconds, "iterations": len(history)}
    final_res = stages[-1][1]
    base_values = ref.baseline_sdf_values(final_res, task.bounds, torch.float64)
    if base_values is not None:
        from diffworld.geometry.marching_cubes import marching_cubes

        base = marching_cubes(base_values, task.bounds)
        metrics["baseline_marching_cubes_true_sdf"] = result_metrics(base.vertices, base.faces, ref, task.evaluation,
                                                               scene.seed)
        if rep_cfg.type in FLEXIBLE:
            from diffworld.geometry.flexicubes import flexicubes

            try:
                base = flexicubes(base_values, task.bounds)
            except ValueError as exc:  # a true surface that leaves the grid: no closed FlexiCubes mesh
                metrics["baseline_flexicubes_true_sdf"] = {"error": str(exc)}
            else:
                metrics["baseline_flexicubes_true_sdf"] = result_metrics(base.vertices, base.faces, ref, task.evaluation,
                                                                   scene.seed)
    if ref.open is not None:
        metrics["target_boundary_length"] = ref.open.boundary_length()
        base = ref.baseline_gshell(final_res, task.bounds, torch.float64)
        metrics["baseline_gshell_true_fields"] = result_metrics(base.vertices, base.faces, ref, task.evaluation,
                                                          scene.seed)
    if scene.output.save_mesh and mesh.faces.shape[0]:
        from diffworld.geometry.io import save_mesh

        save_mesh(out_dir / "result.ply", mesh.vertices.detach().cpu(), mesh.faces.cpu())
        if rep_cfg.type == "gshell":  # the watertight template the open surface was cut from
            save_mesh(out_dir / "template.ply", mesh.template.vertices.detach().cpu(), mesh.template.faces.cpu())
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

        render_turntable(out_dir / "turntable.gif", mesh.vertices.detach().cpu(), mesh.faces.cpu())
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_reconstruction(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("reconstruction", ReconstructionTask, _run)
