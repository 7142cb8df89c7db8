"""Regenerate the small procedural assets of the shipped scenes (run from anywhere).

    python scenes/assets/make_assets.py

cad_part.ply: diffworld's procedural CAD-like part (diffworld.geometry.shapes.cad_part), extracted
with marching cubes at 64^3 over [-0.5, 0.5]^3.
"""

from pathlib import Path

from diffworld.engine.io import save_mesh
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.sdf import sample_grid
from diffworld.geometry.shapes import cad_part


def main() -> None:
    here = Path(__file__).resolve().parent
    grid = Grid.make(64)
    mesh = marching_cubes(sample_grid(cad_part(), grid), (grid.lower, grid.upper))
    save_mesh(here / "cad_part.ply", mesh.vertices, mesh.faces)
    print(f"wrote {here / 'cad_part.ply'}: {mesh.vertices.shape[0]} vertices, {mesh.faces.shape[0]} faces")


if __name__ == "__main__":
    main()
