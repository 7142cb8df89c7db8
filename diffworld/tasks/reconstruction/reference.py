"""The reference of a reconstruction: target points (and normals) and what the result is measured against."""

from __future__ import annotations


import torch

from diffworld.geometry.reconstruction import (
    ReconstructionTarget,
)
from diffworld.tasks.reconstruction.config import SHAPES

__all__ = ["Reference", "normalize_points"]


def normalize_points(points: torch.Tensor, bounds) -> torch.Tensor:
    """Centre ``points`` in ``bounds`` and scale them uniformly to fill 90 % of its shortest side."""
    lo = torch.tensor(bounds[0], dtype=points.dtype)
    hi = torch.tensor(bounds[1], dtype=points.dtype)
    pmin, pmax = points.min(0).values, points.max(0).values
    scale = 0.9 * float(((hi - lo) / (pmax - pmin).clamp_min(1e-12)).min())
    centre_src, centre_dst = (pmin + pmax) / 2, (lo + hi) / 2
    return (points - centre_src) * scale + centre_dst


class Reference:
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
                v = normalize_points(v, bounds)
            self.mesh = (v, f)
            s = sample_surface(v, f, cfg.n_points, generator=gen)
            pts, nrm = s.points.detach(), s.normals.detach()
            e = sample_surface(v, f, n_eval, generator=gen)
            self.eval_points, self.eval_normals = e.points.detach(), e.normals.detach()
        else:
            loaded = io.load_points(cfg.path)
            pts, nrm = loaded.points.double(), loaded.normals
            if cfg.normalize:
                pts = normalize_points(pts, bounds)
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
