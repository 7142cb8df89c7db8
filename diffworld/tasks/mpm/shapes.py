"""Shapes of the ``mpm`` scene format: the ``ShapeConfig`` section (primitives, meshes, CSG) that
bodies, emitters and loss terms use."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, PositiveFloat, ValidationInfo, field_validator, model_validator

from diffworld.engine.config.schema import StrictModel, scene_file
from diffworld.tasks.assets import readable_asset

__all__ = ["ShapeConfig", "Vec3", "resolve_optional"]

Vec3 = tuple[float, float, float]


def resolve_optional(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    """An optional path resolved against the scene file's folder."""
    return None if value is None else scene_file(value, info)


class ShapeConfig(StrictModel):
    """A solid region: analytic primitive, a watertight mesh file, or CSG of other shapes.

    CSG: ``union`` and ``intersection`` of ``children`` (two or more), ``difference`` of the
    first child minus the others.
    """

    type: Literal["box", "sphere", "cylinder", "capsule", "mesh", "union", "intersection", "difference"]
    center: Vec3 = Field((0.5, 0.5, 0.5), description="Centre [m].")
    half_extents: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field((0.1, 0.1, 0.1),
                                                                             description="Box half extents [m].")
    radius: float = Field(0.1, gt=0, description="Sphere/cylinder/capsule radius [m].")
    half_height: float = Field(0.1, gt=0, description="Cylinder half height / capsule half segment [m] (z axis).")
    path: Optional[str] = Field(None, description="Mesh file (watertight), relative to the scene file.")
    scale: float = Field(1.0, gt=0, description="Mesh scale.")
    children: list["ShapeConfig"] = Field(default_factory=list, description="Operands of union, intersection, "
                                                                             "difference (two or more).")

    _path = field_validator("path")(resolve_optional)
    _readable = field_validator("path")(readable_asset("mesh"))

    @model_validator(mode="after")
    def _mesh_path(self):
        if self.type == "mesh" and self.path is None:
            raise ValueError("type 'mesh' needs 'path'")
        csg = self.type in ("union", "intersection", "difference")
        if csg and len(self.children) < 2:
            raise ValueError(f"type {self.type!r} needs two or more 'children', got {len(self.children)}")
        if not csg and self.children:
            raise ValueError(f"'children' belong to union, intersection or difference, not to type {self.type!r}")
        return self

    def build(self):
        """The SDF of the shape."""
        from diffworld.geometry import sdf

        if self.type in ("union", "intersection"):
            parts = [c.build() for c in self.children]
            return sdf.Union(*parts) if self.type == "union" else sdf.Intersection(*parts)
        if self.type == "difference":
            first, *rest = [c.build() for c in self.children]
            return sdf.Difference(first, rest[0] if len(rest) == 1 else sdf.Union(*rest))
        c = self.center
        if self.type == "box":
            return sdf.Box(self.half_extents, c)
        if self.type == "sphere":
            return sdf.Sphere(self.radius, c)
        if self.type == "cylinder":
            return sdf.Cylinder(self.radius, self.half_height, c)
        if self.type == "capsule":
            a = (c[0], c[1], c[2] - self.half_height)
            b = (c[0], c[1], c[2] + self.half_height)
            return sdf.Capsule(a, b, self.radius)
        from diffworld.geometry.io import load_mesh
        from diffworld.geometry.mesh_ops import mesh_report
        from diffworld.geometry.mesh_sdf import MeshSDF

        m = load_mesh(self.path)
        if not mesh_report(m.vertices, m.faces).watertight:
            raise ValueError(f"{self.path}: a filled body needs a watertight mesh (this one has open edges)")
        v = m.vertices.double()
        v = (v - (v.min(0).values + v.max(0).values) / 2) * self.scale + torch.tensor(c, dtype=torch.float64)
        return MeshSDF(v, m.faces)
