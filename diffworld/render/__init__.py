"""Rendering: cameras now; the differentiable rasterizer (image losses) comes here next."""

from diffworld.render.camera import Camera, orbit_camera

__all__ = ["Camera", "orbit_camera"]
