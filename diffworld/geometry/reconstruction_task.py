"""The ``reconstruction`` scene task: fit a differentiable isosurface to a target shape.

Registered in :data:`diffworld.engine.scene.TASKS` on import. A run writes to its output folder:
``scene.yaml`` (resolved), ``log.csv``, ``loss.png``, ``metrics.json``, ``result.ply``,
``render.png`` (result beside target) and ``checkpoints/`` (``--resume`` continues from them).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from diffworld.engine.scene.registry import TASKS, Registry
from diffworld.engine.scene.schema import StrictModel, scene_file
from diffworld.geometry.reconstruction import (
    GridSDF,
    LossWeights,
    NeuralSDFRepresentation,
    ReconstructionTarget,
    reconstruction_losses,
)

__all__ = ["ReconstructionTask", "SHAPES", "run_reconstruction"]

Vec3 = tuple[float, float, float]


# --- targets ------------------------------------------------------------------------------------

class ShapeTarget(StrictModel):
    """A procedural shape shipped with diffworld (exact SDF known: exact metrics)."""

    type: Literal["shape"]
    shape: str = Field(..., description="Name in the shape registry: genus2, cad_part, sphere, torus.")
    n_points: PositiveInt = Field(50000, description="Target points sampled on the surface.")
    noise: float = Field(0.0, ge=0, description="Gaussian noise on the target points [m].")
    normals: bool = Field(True, description="Give the reconstruction the (oriented) normals.")

    @field_validator("shape")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SHAPES.names():
            raise ValueError(f"unknown shape {v!r}; expected one of {SHAPES.names()}")
        return v


class MeshTarget(StrictModel):
    """A mesh file (obj/ply/stl/off/glb), sampled for target points."""

    type: Literal["mesh"]
    path: str = Field(..., description="Mesh file; relative to the scene file's folder.")
    n_points: PositiveInt = 50000
    noise: float = Field(0.0, ge=0)
    normals: bool = True
    normalize: bool = Field(True, description="Scale and centre the mesh into the grid bounds (90 %).")

    _path = field_validator("path")(scene_file)


class PointsTarget(StrictModel):
    """A point cloud file (ply/xyz/npz), with or without normals."""

    type: Literal["points"]
    path: str = Field(..., description="Point-cloud file; relative to the scene file's folder.")
    normals: bool = Field(True, description="Use the file's normals when it has them (else PCA estimates).")
    normalize: bool = True

    _path = field_validator("path")(scene_file)


TargetConfig = Annotated[Union[ShapeTarget, MeshTarget, PointsTarget], Field(discriminator="type")]


# --- representations ----------------------------------------------------------------------------

class GridRepresentationConfig(StrictModel):
    """An SDF grid refined coarse to fine (one optimizer stage per resolution)."""

    type: Literal["grid"]
    resolutions: list[PositiveInt] = Field([16, 32, 64], min_length=1, description="Cells per axis per stage.")
    init_radius: float = Field(0.35, gt=0, description="Radius of the initial sphere [m].")
    final_lr_scale: float = Field(1.0, gt=0, description="Learning-rate factor of the finest stage.")

    @field_validator("resolutions")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"resolutions must increase, got {v}")
        if v[0] < 4:
            raise ValueError(f"resolutions must be >= 4, got {v}")
        return v


class NeuralRepresentationConfig(StrictModel):
    """A neural SDF (MLP), extracted with the DeepMesh gradient."""

    type: Literal["neural"]
    resolution: PositiveInt = Field(48, description="Extraction grid resolution.")
    width: PositiveInt = Field(64, description="Hidden layer width.")
    depth: PositiveInt = Field(4, description="Hidden layers.")
    n_frequencies: int = Field(4, ge=0, description="Fourier feature octaves (0: plain coordinates).")
    init_radius: float = Field(0.35, gt=0)


RepresentationConfig = Annotated[Union[GridRepresentationConfig, NeuralRepresentationConfig],
                                 Field(discriminator="type")]


class WeightsConfig(StrictModel):
    """Loss weights (see diffworld.geometry.reconstruction)."""

    chamfer: float = Field(0.0, ge=0, description="Mesh-sample Chamfer (squared cells).")
    chamfer_final_stage_only: bool = Field(True, description="Apply Chamfer only at the finest grid stage.")
    surface: float = Field(1.0, ge=0, description="Field at target points (squared cells).")
    normal: float = Field(1.0, ge=0, description="1 - cos(field gradient, target normal).")
    eikonal: float = Field(1.0, ge=0, description="(|grad s| - 1)^2.")
    smoothness: float = Field(0.0, ge=0, description="Squared Laplacian (grids).")
    sign: float = Field(1.0, ge=0, description="Side of the nearest oriented target point, beyond one cell.")


class EvaluationConfig(StrictModel):
    """How the result is measured."""

    n_points: PositiveInt = Field(200000, description="Points sampled on result and reference.")
    threshold: float = Field(0.01, gt=0, description="F-score distance threshold [m].")


class ReconstructionTask(StrictModel):
    """Fit a differentiable isosurface to a target."""

    type: Literal["reconstruction"]
    target: TargetConfig
    representation: RepresentationConfig
    bounds: tuple[Vec3, Vec3] = Field(((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)), description="Grid box [m].")
    weights: WeightsConfig = WeightsConfig()
    samples: PositiveInt = Field(10000, description="Points per iteration on the mesh and from the target.")
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _bounds(self):
        lo, hi = self.bounds
        if any(a >= b for a, b in zip(lo, hi)):
            raise ValueError(f"bounds: lower must be < upper on every axis, got {self.bounds}")
        return self


# --- shape registry -----------------------------------------------------------------------------

SHAPES = Registry("shape")


def _register_shapes() -> None:
    from diffworld.geometry import sdf, shapes

    SHAPES.register("genus2", StrictModel, shapes.genus2_shape)
    SHAPES.register("cad_part", StrictModel, shapes.cad_part)
    SHAPES.register("sphere", StrictModel, lambda: sdf.Sphere(0.35))
    SHAPES.register("torus", StrictModel, lambda: sdf.Torus(0.28, 0.1))


_register_shapes()


# --- running ------------------------------------------------------------------------------------

def _normalize(points: torch.Tensor, bounds) -> torch.Tensor:
    """Centre ``points`` in ``bounds`` and scale them uniformly to fill 90 % of its shortest side."""
    lo = torch.tensor(bounds[0], dtype=points.dtype)
    hi = torch.tensor(bounds[1], dtype=points.dtype)
    pmin, pmax = points.min(0).values, points.max(0).values
    scale = 0.9 * float(((hi - lo) / (pmax - pmin).clamp_min(1e-12)).min())
    centre_src, centre_dst = (pmin + pmax) / 2, (lo + hi) / 2
    return (points - centre_src) * scale + centre_dst


class _Reference:
    """Target points for the loss, and dense reference points/normals for the metrics."""

    def __init__(self, cfg, bounds, seed: int, n_eval: int, dtype) -> None:
        from diffworld.engine import io
        from diffworld.geometry import shapes
        from diffworld.geometry.sampling import estimate_normals, sample_surface

        gen = torch.Generator().manual_seed(seed)
        self.sdf = None
        self.mesh = None
        if cfg.type == "shape":
            self.sdf = SHAPES.builder(cfg.shape)()
            pts, nrm = shapes.surface_points(self.sdf, cfg.n_points, bounds, seed=seed)
            self.eval_points, self.eval_normals = shapes.surface_points(self.sdf, n_eval, bounds, seed=seed + 1)
        elif cfg.type == "mesh":
            loaded = io.load_mesh(cfg.path)
            v, f = loaded.vertices.double(), loaded.faces
            if cfg.normalize:
                v = _normalize(v, bounds)
            self.mesh = (v, f)
            s = sample_surface(v, f, cfg.n_points, generator=gen)
            pts, nrm = s.points.detach(), s.normals.detach()
            e = sample_surface(v, f, n_eval, generator=gen)
            self.eval_points, self.eval_normals = e.points.detach(), e.normals.detach()
        else:
            loaded = io.load_points(cfg.path)
            pts, nrm = loaded.points.double(), loaded.normals
            if cfg.normalize:
                pts = _normalize(pts, bounds)
            self.eval_points, self.eval_normals = pts, nrm
        if cfg.type != "points" and cfg.noise > 0:
            pts = pts + cfg.noise * torch.randn(pts.shape, generator=gen, dtype=pts.dtype)
        oriented = True
        if not cfg.normals:
            nrm = None
        elif nrm is None:
            nrm, oriented = estimate_normals(pts), False
            self.eval_normals = nrm if cfg.type == "points" else self.eval_normals
        self.target = ReconstructionTarget(pts.to(dtype), None if nrm is None else nrm.to(dtype), oriented)

    def baseline_sdf_values(self, resolution: int, bounds, dtype) -> torch.Tensor | None:
        """The true SDF of the target on the final grid (for the marching-cubes baseline)."""
        from diffworld.geometry.grid import Grid

        grid = Grid.make(resolution, bounds)
        if self.sdf is not None:
            from diffworld.geometry.sdf import sample_grid

            return sample_grid(self.sdf, grid, dtype=dtype)
        if self.mesh is not None:
            from diffworld.geometry.mesh_sdf import mesh_to_sdf

            return mesh_to_sdf(self.mesh[0].float(), self.mesh[1], grid, sign="winding", dtype=dtype)
        return None


def _metrics(vertices, faces, ref: _Reference, cfg: EvaluationConfig, seed: int) -> dict:
    from diffworld.geometry.mesh_ops import mesh_report
    from diffworld.geometry.metrics import mesh_to_points_metrics

    if faces.shape[0] == 0:
        return {"empty": True}
    m = mesh_to_points_metrics(vertices.detach().double(), faces, ref.eval_points.double(),
                               None if ref.eval_normals is None else ref.eval_normals.double(),
                               n_points=cfg.n_points, threshold=cfg.threshold, seed=seed)
    rep = mesh_report(vertices.detach(), faces)
    out = m.as_dict()
    out.update(vertices=int(vertices.shape[0]), faces=int(faces.shape[0]), watertight=bool(rep.watertight),
               edge_manifold=bool(rep.edge_manifold), genus=None if rep.genus is None else float(rep.genus),
               components=int(rep.n_components), euler_characteristic=int(rep.euler_characteristic))
    return out


def run_reconstruction(scene, task: ReconstructionTask, runtime, out_dir: Path, *, resume: bool = False,
                       progress: bool = True, optimize: bool = True) -> dict:
    """Run a reconstruction scene; returns the metrics dictionary written to metrics.json."""
    from diffworld.engine.driver import OptimizerSettings
    from diffworld.engine.driver import optimize as run_optimizer
    from diffworld.geometry.sdf import Sphere

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, device = runtime.dtype, runtime.device
    torch.manual_seed(scene.seed)
    gen = torch.Generator().manual_seed(scene.seed)
    ref = _Reference(task.target, task.bounds, scene.seed, task.evaluation.n_points, dtype)
    target = ReconstructionTarget(ref.target.points.to(device), None if ref.target.normals is None
                                  else ref.target.normals.to(device), ref.target.oriented)
    w = task.weights
    weights = LossWeights(w.chamfer, w.surface, w.normal, w.eikonal, w.smoothness, w.sign)
    base_settings = scene.optimizer.model_dump()
    init = Sphere(task.representation.init_radius).to(dtype)

    rep_cfg = task.representation
    if rep_cfg.type == "grid":
        stages = [(f"grid{r}", r) for r in rep_cfg.resolutions]
        rep = GridSDF.from_field(init, rep_cfg.resolutions[0], task.bounds, dtype, device)
    else:
        from diffworld.geometry.neural_sdf import NeuralSDF

        net = NeuralSDF(width=rep_cfg.width, depth=rep_cfg.depth, n_frequencies=rep_cfg.n_frequencies,
                        radius=rep_cfg.init_radius, seed=scene.seed).to(device=device, dtype=dtype)
        rep = NeuralSDFRepresentation(net, rep_cfg.resolution, task.bounds, dtype, device)
        stages = [("neural", rep_cfg.resolution)]

    t0 = time.perf_counter()
    history = []
    for i, (stage, res) in enumerate(stages):
        if rep_cfg.type == "grid" and i > 0:
            rep = rep.upsampled(res)
        if not optimize:
            break
        stage_weights = weights
        if w.chamfer_final_stage_only and i < len(stages) - 1:
            stage_weights = dataclasses.replace(weights, chamfer=0.0)
        # Grid learning rates are in cells per step, so every resolution moves alike.
        lr = base_settings["lr"]
        if rep_cfg.type == "grid":
            lr *= rep.cell * (rep_cfg.final_lr_scale if i == len(stages) - 1 else 1.0)
        settings = OptimizerSettings(**{**base_settings, "lr": lr, "seed": scene.seed})
        result = run_optimizer(rep.parameters(),
                               lambda it: reconstruction_losses(rep, target, stage_weights, task.samples, gen),
                               settings, out_dir, stage=stage, resume=resume, progress=progress)
        history.extend(result.history)
    fit_seconds = time.perf_counter() - t0

    with torch.no_grad():
        mesh = rep.extract()
    metrics = {"result": _metrics(mesh.vertices, mesh.faces, ref, task.evaluation, scene.seed),
               "fit_seconds": fit_seconds, "iterations": len(history)}
    final_res = stages[-1][1]
    base_values = ref.baseline_sdf_values(final_res, task.bounds, torch.float64)
    if base_values is not None:
        from diffworld.geometry.marching_cubes import marching_cubes

        base = marching_cubes(base_values, task.bounds)
        metrics["baseline_marching_cubes_true_sdf"] = _metrics(base.vertices, base.faces, ref, task.evaluation,
                                                               scene.seed)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if scene.output.save_mesh and mesh.faces.shape[0]:
        from diffworld.engine.io import save_mesh

        save_mesh(out_dir / "result.ply", mesh.vertices.detach().cpu(), mesh.faces.cpu())
    if scene.output.render and mesh.faces.shape[0]:
        from diffworld.engine.render import render_side_by_side

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
        from diffworld.engine.render import render_turntable

        render_turntable(out_dir / "turntable.gif", mesh.vertices.detach().cpu(), mesh.faces.cpu())
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_reconstruction(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("reconstruction", ReconstructionTask, _run)
