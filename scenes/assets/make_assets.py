"""Regenerate the small procedural assets of the shipped scenes (run from anywhere).

    python scenes/assets/make_assets.py

cad_part.ply: diffworld's procedural CAD-like part (diffworld.geometry.shapes.cad_part), extracted
with marching cubes at 64^3 over [-0.5, 0.5]^3.
latte_heart.png: the target pattern of scenes/mpm_latte_art.yaml, a white heart on black, 64 x 64,
from the implicit curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0.
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from diffworld.geometry.io import save_mesh
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
    # Heart: pixel (row, col) -> (x, y) in [-1.4, 1.4] x [-1.25, 1.55], row 0 at the top.
    n = 64
    x = np.linspace(-1.4, 1.4, n)[None, :]
    y = np.linspace(1.55, -1.25, n)[:, None]
    heart = ((x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0).astype(np.uint8) * 255
    iio.imwrite(here / "latte_heart.png", heart)
    print(f"wrote {here / 'latte_heart.png'}: {int((heart > 0).sum())} of {n * n} pixels on")


if __name__ == "__main__":
    main()
