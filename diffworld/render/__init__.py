"""Rendering: cameras (:mod:`~diffworld.render.camera`) and rasterization of triangle meshes,
differentiable inside triangles (:mod:`~diffworld.render.raster`)."""

from diffworld.render.camera import Camera, Views, orbit_camera, orbit_views
from diffworld.render.raster import Fragments, face_normals, interpolate, rasterize

__all__ = ["Camera", "Fragments", "Views", "face_normals", "interpolate", "orbit_camera", "orbit_views", "rasterize"]
