"""Reconstruction: fit a differentiable isosurface (grid, neural, FlexiCubes, G-Shell) to points or a mesh."""

from diffworld.tasks.reconstruction import task

__all__ = ["task"]
