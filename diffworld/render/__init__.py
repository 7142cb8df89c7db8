"""Rendering: cameras (:mod:`~diffworld.render.camera`) and rasterization of triangle meshes,
differentiable inside triangles (:mod:`~diffworld.render.raster`) and at silhouettes
(:mod:`~diffworld.render.antialias`)."""

from diffworld.render.camera import Camera, Views, orbit_camera, orbit_views
from diffworld.render.antialias import antialias, edge_topology
from diffworld.render.raster import Fragments, face_normals, interpolate, rasterize

__all__ = ["Camera", "Fragments", "Views", "antialias", "edge_topology", "face_normals", "interpolate", "orbit_camera",
           "orbit_views", "rasterize"]
