"""Geometry: grids, SDFs, differentiable isosurfaces, metrics and reconstruction."""

from diffworld.geometry.grid import Grid, trilinear
from diffworld.geometry.marching_cubes import IsoSurface, marching_cubes, marching_cubes_field

__all__ = ["Grid", "IsoSurface", "marching_cubes", "marching_cubes_field", "trilinear"]
