"""Representations of the ``reconstruction`` task, one registry entry each (:data:`REPRESENTATIONS`):
the scene section (a pydantic model whose ``type`` names it) and the entry that builds the
representation, refines it between stages, sets its optimizer parameters, and adds its own
baselines and files.

A new representation is one model, one :class:`Representation` subclass and one
``REPRESENTATIONS.register`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field, PositiveInt, field_validator

from diffworld.engine.config.registry import Registry
from diffworld.engine.config.schema import StrictModel

__all__ = [
    "FlexiCubesRepresentationConfig", "GShellRepresentationConfig", "GridRepresentationConfig",
    "NeuralRepresentationConfig", "REPRESENTATIONS", "Representation", "TetsRepresentationConfig",
]


class GridRepresentationConfig(StrictModel):
    """An SDF grid refined coarse to fine (one optimizer stage per resolution)."""

    type: Literal["grid"]
    resolutions: list[PositiveInt] = Field([16, 32, 64], min_length=1, max_length=16,
                                           description="Cells per axis per stage (at most 512).")
    init_radius: float = Field(0.35, gt=0, description="Radius of the initial sphere [m].")
    final_lr_scale: float = Field(1.0, gt=0, description="Learning-rate factor of the finest stage.")

    @field_validator("resolutions")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"resolutions must increase, got {v}")
        if v[0] < 4 or v[-1] > 512:
            raise ValueError(f"resolutions must be in [4, 512], got {v}")
        return v


class TetsRepresentationConfig(GridRepresentationConfig):
    """An SDF grid like ``grid``, extracted with marching tetrahedra (6 tets per cube) instead of
    marching cubes."""

    type: Literal["tets"]


class NeuralRepresentationConfig(StrictModel):
    """A neural SDF (MLP), extracted with the DeepMesh gradient."""

    type: Literal["neural"]
    resolution: PositiveInt = Field(48, le=512, description="Extraction grid resolution.")
    width: PositiveInt = Field(64, le=4096, description="Hidden layer width.")
    depth: PositiveInt = Field(4, le=64, description="Hidden layers.")
    n_frequencies: int = Field(4, ge=0, le=16, description="Fourier feature octaves (0: plain coordinates).")
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


# ------------------------------------------------------------------------------------------------
# Entries
# ------------------------------------------------------------------------------------------------

def _cells(value: float | None, cell: float) -> float | None:
    return None if value is None else value * cell


class Representation:
    """How the task runs one representation type (subclasses: one per ``type``).

    Args:
        cfg: The scene's ``representation`` section.
        bounds: The grid box ((3,), (3,)) [m].
        seed: The scene's seed.
        dtype, device: Of the representation's tensors.

    Attributes:
        flexicubes: Whether it is extracted with FlexiCubes (the FlexiCubes regularizers apply).
    """

    flexicubes = False

    def __init__(self, cfg, bounds, seed: int, dtype: torch.dtype, device) -> None:
        self.cfg, self.bounds, self.seed, self.dtype, self.device = cfg, bounds, seed, dtype, device

    def stages(self) -> list[tuple[str, int]]:
        """(stage name, grid resolution) of each optimizer stage."""
        raise NotImplementedError

    def initial(self, init: Callable[[torch.Tensor], torch.Tensor]):
        """The representation at the first stage, starting from the SDF ``init``."""
        raise NotImplementedError

    def refined(self, rep, resolution: int):
        """The representation carried to the next stage's resolution."""
        return rep.upsampled(resolution)

    def optimizer(self, rep, lr: float, final: bool) -> tuple[float, Any]:
        """(learning rate, parameters or groups) of a stage, given the scene's ``optimizer.lr``."""
        return lr, rep.parameters()

    def baselines(self, values: torch.Tensor, evaluate: Callable[[torch.Tensor, torch.Tensor], dict]) -> dict:
        """Extra baseline metrics on the true SDF ``values`` at the final resolution, by name."""
        return {}

    def save(self, mesh, out_dir: Path) -> None:
        """Extra files of the result (beyond result.ply)."""


class GridEntry(Representation):
    """An SDF grid, coarse to fine; learning rates in cells per step, so every resolution moves alike."""

    def stages(self):
        return [(f"{self.cfg.type}{r}", r) for r in self.cfg.resolutions]

    def initial(self, init):
        from diffworld.geometry.reconstruction import GridSDF

        return GridSDF.from_field(init, self.cfg.resolutions[0], self.bounds, self.dtype, self.device)

    def _scale(self, final: bool) -> float:
        return self.cfg.final_lr_scale if final else 1.0

    def optimizer(self, rep, lr, final):
        return lr * (rep.cell * self._scale(final)), rep.parameters()


class TetsEntry(GridEntry):
    """A marching-tets grid: the grid's stages and learning rates."""

    def initial(self, init):
        from diffworld.geometry.reconstruction import MarchingTetsGrid

        return MarchingTetsGrid(super().initial(init).values, self.bounds)


class FlexiCubesEntry(GridEntry):
    """A FlexiCubes grid: node values, per-cube weights and node offsets, each with its learning rate."""

    flexicubes = True

    def _options(self) -> dict:
        return {"learn_weights": self.cfg.learn_weights, "learn_deform": self.cfg.learn_deform}

    def initial(self, init):
        from diffworld.geometry.reconstruction import FlexiCubesGrid

        return FlexiCubesGrid(super().initial(init).values, self.bounds, **self._options())

    def optimizer(self, rep, lr, final):
        lr, _ = super().optimizer(rep, lr, final)
        scale = self._scale(final)
        return lr, rep.parameter_groups(lr, self.cfg.weights_lr * scale, self.cfg.deform_lr * scale)

    def baselines(self, values, evaluate):
        from diffworld.geometry.flexicubes import flexicubes

        try:
            base = flexicubes(values, self.bounds)
        except ValueError as exc:  # a true surface that leaves the grid: no closed FlexiCubes mesh
            return {"baseline_flexicubes_true_sdf": {"error": str(exc)}}
        return {"baseline_flexicubes_true_sdf": evaluate(base.vertices, base.faces)}


class GShellEntry(FlexiCubesEntry):
    """G-Shell: a template FlexiCubes grid and a manifold-SDF grid; margins in cells of the current grid."""

    def initial(self, init):
        from diffworld.geometry.reconstruction import GridSDF, GShellGrid

        cfg = self.cfg
        rep = GridSDF.from_field(init, cfg.resolutions[0], self.bounds, self.dtype, self.device)
        h = rep.cell
        return GShellGrid(rep.values, torch.full_like(rep.values, cfg.msdf_init * h), self.bounds,
                          msdf_eps=cfg.msdf_eps * h, msdf_radius=cfg.msdf_radius * h,
                          msdf_tangential=_cells(cfg.msdf_tangential, h), **self._options())

    def refined(self, rep, resolution):
        rep = rep.upsampled(resolution)
        cfg = self.cfg
        rep.msdf_eps, rep.msdf_radius = cfg.msdf_eps * rep.cell, cfg.msdf_radius * rep.cell
        rep.msdf_tangential = _cells(cfg.msdf_tangential, rep.cell)
        return rep

    def save(self, mesh, out_dir):
        from diffworld.geometry.io import save_mesh

        # the watertight template the open surface was cut from
        save_mesh(out_dir / "template.ply", mesh.template.vertices.detach().cpu(), mesh.template.faces.cpu())


class NeuralEntry(Representation):
    """A neural SDF, one stage at its extraction resolution."""

    def stages(self):
        return [("neural", self.cfg.resolution)]

    def initial(self, init):
        from diffworld.geometry.neural_sdf import NeuralSDF
        from diffworld.geometry.reconstruction import NeuralSDFRepresentation

        cfg = self.cfg
        net = NeuralSDF(width=cfg.width, depth=cfg.depth, n_frequencies=cfg.n_frequencies, radius=cfg.init_radius,
                        seed=self.seed).to(device=self.device, dtype=self.dtype)
        return NeuralSDFRepresentation(net, cfg.resolution, self.bounds, self.dtype, self.device)

    def refined(self, rep, resolution):
        raise RuntimeError("a neural representation has one stage")


REPRESENTATIONS = Registry("representation")
for _name, _model, _entry in (("grid", GridRepresentationConfig, GridEntry),
                              ("tets", TetsRepresentationConfig, TetsEntry),
                              ("neural", NeuralRepresentationConfig, NeuralEntry),
                              ("flexicubes", FlexiCubesRepresentationConfig, FlexiCubesEntry),
                              ("gshell", GShellRepresentationConfig, GShellEntry)):
    REPRESENTATIONS.register(_name, _model, _entry)
