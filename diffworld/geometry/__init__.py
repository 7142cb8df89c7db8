"""Geometry: grids, SDFs, differentiable isosurfaces, metrics and reconstruction."""

from diffworld.geometry.flexicubes import FlexiCubesMesh, flexicubes, sdf_sign_loss
from diffworld.geometry.grid import Grid, trilinear
from diffworld.geometry.gshell import (GShellMesh, gshell_flexicubes, gshell_marching_tets, msdf_regularizers,
                                       msdf_supervision)
from diffworld.geometry.marching_cubes import IsoSurface, marching_cubes, marching_cubes_field
from diffworld.geometry.marching_tets import MarchingTetsMesh, marching_tets
from diffworld.geometry.tet_mesh import (TetMesh, TetQuality, TetReport, load_tet_mesh, save_tet_mesh, tet_quality, tet_report,
                                        tet_volumes)

__all__ = ["FlexiCubesMesh", "GShellMesh", "Grid", "IsoSurface", "MarchingTetsMesh", "TetMesh", "TetQuality", "TetReport", "flexicubes",
           "gshell_flexicubes", "gshell_marching_tets", "load_tet_mesh", "marching_cubes", "marching_cubes_field",
           "marching_tets", "msdf_regularizers", "msdf_supervision", "save_tet_mesh", "sdf_sign_loss",
           "tet_quality", "tet_report", "tet_volumes", "trilinear"]
