"""The ``reconstruction`` scene task: fit a differentiable isosurface to a target shape.

Registered in :data:`diffworld.app.scenes.TASKS` on import. A run writes to its output folder:
``scene.yaml`` (resolved), ``log.csv``, ``loss.png``, ``metrics.json``, ``result.ply``,
``render.png`` (result beside target) and ``checkpoints/`` (``--resume`` continues from them);
G-Shell runs also write ``template.ply`` (the watertight template the result was cut from).

Representations: ``grid`` (marching cubes), ``neural`` (DeepMesh gradient), ``flexicubes``
(node values + per-cube weights + node offsets) and ``gshell`` (FlexiCubes template + manifold
SDF, for open surfaces). ``metrics.json`` holds the result's distances to the reference, its
topology and boundary, and baselines from the true field on the final grid where there is one:
marching cubes (closed targets), FlexiCubes with default weights (flexicubes/gshell on closed
targets), G-Shell on the open shape's own template and manifold SDF (open registry shapes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import Field, PositiveInt, create_model, field_validator, model_validator

from diffworld.engine.config.registry import TASKS, Registry
from diffworld.engine.config.schema import StrictModel, scene_file
from diffworld.geometry.reconstruction import (
    FlexiCubesGrid,
    GShellGrid,
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
    shape: str = Field(..., description="Name in the shape registry: genus2, cad_part, sphere, torus (closed), "
                                        "open_cup (an open surface: representation gshell).")
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


class FlexiCubesRepresentationConfig(GridRepresentationConfig):
    """An SDF grid extracted with FlexiCubes, refined coarse to fine like ``grid``.

    Optimized: the node values (at ``optimizer.lr`` cells per step, like ``grid``), the raw
    per-cube weights beta (12), alpha (8), gamma (1) and the raw node offsets. At a refinement
    the field is interpolated and the weights and offsets start again from zero (they are per
    cube / per node of the coarser grid). Mesh terms use FlexiCubes' training mode (4 triangles
    per quad); ``result.ply`` is the eval-mode mesh (2 triangles per quad, split chosen by gamma).
    """

    type: Literal["flexicubes"]
    learn_weights: bool = Field(True, description="Optimize the per-cube weights beta, alpha, gamma.")
    learn_deform: bool = Field(True, description="Optimize the node offsets (at most half a cell).")
    weights_lr: float = Field(0.01, gt=0, description="Learning rate of the raw weights [raw units per step] (the "
                                                     "FlexiCubes reference: 0.01 over 1000 steps; the shipped scenes "
                                                     "use 0.1 over 60 steps per stage).")
    deform_lr: float = Field(0.01, gt=0, description="Learning rate of the raw node offsets [raw units per step].")


class GShellRepresentationConfig(FlexiCubesRepresentationConfig):
    """G-Shell on FlexiCubes: a template SDF grid and a manifold-SDF grid; the result is the part
    of the template where msdf > 0 (an open surface when the target is open)."""

    type: Literal["gshell"]
    msdf_init: float = Field(1.0, description="Initial msdf everywhere [cells] (> 0: keep the whole template).")
    msdf_eps: float = Field(1.0, gt=0, description="Margin of the msdf regularizers [cells].")
    msdf_radius: float = Field(1.0, gt=0, description="Template vertices within this distance of a target "
                                                      "point are supervised [cells].")
    msdf_tangential: Optional[float] = Field(0.5, gt=0, description="With target normals, a supervised vertex "
                                             "must also be within this distance of its nearest point's normal line "
                                             "[cells] (not past the edge of an open target); None: distance only.")


RepresentationConfig = Annotated[Union[GridRepresentationConfig, NeuralRepresentationConfig,
                                       FlexiCubesRepresentationConfig, GShellRepresentationConfig],
                                 Field(discriminator="type")]


# Generated from LossWeights (one definition of every weight: default, bounds, description), plus
# the one setting that only the staged scene runner has.
WeightsConfig = create_model(
    "WeightsConfig",
    __base__=StrictModel,
    __doc__="Loss weights (diffworld.geometry.reconstruction.LossWeights).",
    chamfer_final_stage_only=(bool, Field(True, description="Apply Chamfer and mesh_normal only at the finest grid "
                                                            "stage.")),
    **{name: (f.annotation, f) for name, f in LossWeights.__pydantic_fields__.items()},
)


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

    @model_validator(mode="after")
    def _combinations(self):
        rep, w = self.representation.type, self.weights
        for key, allowed in (("dev", FLEXIBLE), ("sdf_sign", FLEXIBLE), ("weight_norm", FLEXIBLE),
                             ("msdf_negative", ("gshell",)), ("msdf_positive", ("gshell",))):
            if getattr(w, key) and rep not in allowed:
                raise ValueError(f"weights.{key}: expected 0 with representation.type {rep!r} (it regularizes "
                                 f"representation.type {' or '.join(map(repr, allowed))}), got {getattr(w, key)}")
        if w.sdf_sign_final is not None and not w.sdf_sign:
            raise ValueError(f"weights.sdf_sign_final: expected it only with weights.sdf_sign > 0 (the start of "
                             f"the decay), got sdf_sign_final={w.sdf_sign_final} and sdf_sign=0")
        if self.target.type == "shape" and self.target.shape in OPEN_SHAPES:
            if rep != "gshell":
                raise ValueError(f"representation.type: expected 'gshell' for the open target shape "
                                 f"{self.target.shape!r} (the other representations make closed surfaces), "
                                 f"got {rep!r}")
            if w.sign and w.sign_band is None:
                raise ValueError(f"weights.sign_band: expected a band in cells with weights.sign > 0 and the "
                                 f"open target shape {self.target.shape!r} (far from an open surface the side of "
                                 f"its nearest point means nothing), got None")
        return self


# --- shape registry -----------------------------------------------------------------------------

SHAPES = Registry("shape")


FLEXIBLE = ("flexicubes", "gshell")  # representations extracted with FlexiCubes
OPEN_SHAPES = ("open_cup",)  # registry shapes that are open surfaces (shapes.OpenSurface)


def _register_shapes() -> None:
    from diffworld.geometry import sdf, shapes

    SHAPES.register("genus2", StrictModel, shapes.genus2_shape)
    SHAPES.register("cad_part", StrictModel, shapes.cad_part)
    SHAPES.register("sphere", StrictModel, lambda: sdf.Sphere(0.35))
    SHAPES.register("torus", StrictModel, lambda: sdf.Torus(0.28, 0.1))
    SHAPES.register("open_cup", StrictModel, shapes.open_cup)


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
        from diffworld.geometry import io
        from diffworld.geometry import shapes
        from diffworld.geometry.sampling import estimate_normals, sample_surface

        gen = torch.Generator().manual_seed(seed)
        self.sdf = None
        self.mesh = None
        self.open = None  # a shapes.OpenSurface for open registry shapes
        if cfg.type == "shape" and isinstance(built := SHAPES.builder(cfg.shape)(), shapes.OpenSurface):
            self.open = built
            self.mesh = built.mesh()
            pts, nrm = built.sample(cfg.n_points, seed=seed, dtype=torch.float64)
            self.eval_points, self.eval_normals = built.sample(n_eval, seed=seed + 1, dtype=torch.float64)
        elif cfg.type == "shape":
            self.sdf = built
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
        if self.open is not None:
            return None  # no SDF: see baseline_gshell
        if self.sdf is not None:
            from diffworld.geometry.sdf import sample_grid

            return sample_grid(self.sdf, grid, dtype=dtype)
        if self.mesh is not None:
            from diffworld.geometry.mesh_sdf import mesh_to_sdf

            return mesh_to_sdf(self.mesh[0].float(), self.mesh[1], grid, sign="winding", dtype=dtype)
        return None


    def baseline_gshell(self, resolution: int, bounds, dtype):
        """G-Shell on the open target's own template SDF and manifold SDF on the final grid (eval
        mode, default weights): what the representation gives with the true fields."""
        if self.open is None:
            return None
        from diffworld.geometry.grid import Grid
        from diffworld.geometry.gshell import gshell_flexicubes
        from diffworld.geometry.sdf import sample_grid

        grid = Grid.make(resolution, bounds)
        with torch.no_grad():
            sdf = sample_grid(self.open.template_sdf(), grid, dtype=dtype)
            msdf = self.open.manifold_sdf(grid.nodes(dtype=dtype).reshape(-1, 3)).reshape(grid.shape)
            return gshell_flexicubes(sdf, msdf, bounds)


def _boundary_loops(edges: torch.Tensor) -> tuple[int, bool]:
    """Number of loops of a set of boundary edges (B, 2), and whether they chain into simple loops.

    Simple: every boundary vertex starts exactly one boundary edge and ends exactly one (no
    pinched vertex where two loops touch).
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges.shape[0] == 0:
        return 0, True
    e = edges.detach().cpu().numpy()
    used, inv = np.unique(e.reshape(-1), return_inverse=True)
    inv = inv.reshape(-1, 2)
    starts, ends = np.bincount(inv[:, 0], minlength=used.size), np.bincount(inv[:, 1], minlength=used.size)
    simple = bool((starts == 1).all() and (ends == 1).all())
    graph = coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(used.size, used.size))
    return int(connected_components(graph, directed=False)[0]), simple


def _boundary_edges(faces: torch.Tensor) -> torch.Tensor:
    """Directed edges (B, 2) used by exactly one face (in that face's direction)."""
    a = faces.reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    n = int(faces.max()) + 1 if faces.numel() else 1
    _, inv, counts = torch.unique(lo * n + hi, return_inverse=True, return_counts=True)
    one = counts[inv] == 1
    return torch.stack([a[one], b[one]], 1)


def _metrics(vertices, faces, ref: _Reference, cfg: EvaluationConfig, seed: int) -> dict:
    """Distances to the reference, topology, and the boundary (edges with one face: their count,
    loops and length [m]; 0 for a closed mesh; for an open registry shape also the distance to
    its true boundary [m])."""
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
               edge_manifold=bool(rep.edge_manifold), consistently_oriented=bool(rep.consistently_oriented),
               genus=None if rep.genus is None else float(rep.genus),
               components=int(rep.n_components), euler_characteristic=int(rep.euler_characteristic))
    b = _boundary_edges(faces)
    loops, simple = _boundary_loops(b)
    v = vertices.detach().double()
    out.update(boundary_edges=int(b.shape[0]), boundary_loops=loops, boundary_simple=simple,
               boundary_length=float((v[b[:, 0]] - v[b[:, 1]]).norm(dim=1).sum()))
    if ref.open is not None:
        # Symmetric mean distance [m] between the mesh boundary (its vertices) and the target's
        # boundary (dense points): where the cut is, not only how long it is.
        from scipy.spatial import cKDTree

        rim = ref.open.boundary_points(20000).numpy()
        if b.shape[0]:
            bv = v[b.reshape(-1).unique()].numpy()
            d_br = cKDTree(rim).query(bv, k=1)[0]
            d_rb = cKDTree(bv).query(rim, k=1)[0]
            out.update(boundary_chamfer_l1=0.5 * float(d_br.mean() + d_rb.mean()),
                       boundary_hausdorff=float(max(d_br.max(), d_rb.max())))
        else:
            out.update(boundary_chamfer_l1=None, boundary_hausdorff=None)
    return out


def _cells(value: float | None, cell: float) -> float | None:
    return None if value is None else value * cell


def run_reconstruction(scene, task: ReconstructionTask, runtime, out_dir: Path, *, resume: bool = False,
                       progress: bool = True, optimize: bool = True) -> dict:
    """Run a reconstruction scene; returns the metrics dictionary written to metrics.json."""
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
    metrics = {"result": _metrics(mesh.vertices, mesh.faces, ref, task.evaluation, scene.seed),
               "fit_seconds": fit_seconds, "iterations": len(history)}
    final_res = stages[-1][1]
    base_values = ref.baseline_sdf_values(final_res, task.bounds, torch.float64)
    if base_values is not None:
        from diffworld.geometry.marching_cubes import marching_cubes

        base = marching_cubes(base_values, task.bounds)
        metrics["baseline_marching_cubes_true_sdf"] = _metrics(base.vertices, base.faces, ref, task.evaluation,
                                                               scene.seed)
        if rep_cfg.type in FLEXIBLE:
            from diffworld.geometry.flexicubes import flexicubes

            try:
                base = flexicubes(base_values, task.bounds)
            except ValueError as exc:  # a true surface that leaves the grid: no closed FlexiCubes mesh
                metrics["baseline_flexicubes_true_sdf"] = {"error": str(exc)}
            else:
                metrics["baseline_flexicubes_true_sdf"] = _metrics(base.vertices, base.faces, ref, task.evaluation,
                                                                   scene.seed)
    if ref.open is not None:
        metrics["target_boundary_length"] = ref.open.boundary_length()
        base = ref.baseline_gshell(final_res, task.bounds, torch.float64)
        metrics["baseline_gshell_true_fields"] = _metrics(base.vertices, base.faces, ref, task.evaluation,
                                                          scene.seed)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
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
