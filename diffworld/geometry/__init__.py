"""Geometry: grids, SDFs, differentiable isosurfaces, metrics and reconstruction."""

from diffworld.geometry.flexicubes import FlexiCubesMesh, flexicubes, sdf_sign_loss
from diffworld.geometry.grid import Grid, trilinear
from diffworld.geometry.marching_cubes import IsoSurface, marching_cubes, marching_cubes_field

__all__ = ["FlexiCubesMesh", "Grid", "IsoSurface", "flexicubes", "marching_cubes", "marching_cubes_field",
           "sdf_sign_loss", "trilinear"]
