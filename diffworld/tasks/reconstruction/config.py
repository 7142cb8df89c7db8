"""The ``reconstruction`` task's scene section: target, representation, weights, evaluation, and the
registry of procedural target shapes."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, PositiveInt, create_model, field_validator, model_validator

from diffworld.engine.config.registry import Registry
from diffworld.engine.config.schema import StrictModel, scene_file
from diffworld.geometry.reconstruction import LossWeights
from diffworld.tasks.assets import readable_asset
from diffworld.tasks.reconstruction.representations import (REPRESENTATIONS, FlexiCubesRepresentationConfig,
                                                             GridRepresentationConfig, GShellRepresentationConfig,
                                                             NeuralRepresentationConfig)

__all__ = [
    "EvaluationConfig",
    "FLEXIBLE",
    "FlexiCubesRepresentationConfig",
    "ImageWeights",
    "ImagesTarget",
    "GShellRepresentationConfig",
    "GridRepresentationConfig",
    "MeshTarget",
    "NeuralRepresentationConfig",
    "OPEN_SHAPES",
    "PointsTarget",
    "ReconstructionTask",
    "RepresentationConfig",
    "SHAPES",
    "ShapeTarget",
    "TargetConfig",
    "Vec3",
    "WeightsConfig",
]


Vec3 = tuple[float, float, float]


class ShapeTarget(StrictModel):
    """A procedural shape shipped with diffworld (exact SDF known: exact metrics)."""

    type: Literal["shape"]
    shape: str = Field(..., description="Name in the shape registry: genus2, cad_part, sphere, torus (closed), "
                                        "open_cup (an open surface: representation gshell).")
    n_points: PositiveInt = Field(50000, le=10**8, description="Target points sampled on the surface.")
    noise: float = Field(0.0, ge=0, description="Gaussian noise on the target points [m].")
    normals: bool = Field(True, description="Give the reconstruction the (oriented) normals.")

    @field_validator("shape")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SHAPES.names():
            raise ValueError(f"unknown shape {v!r}; expected one of {SHAPES.names()}")
        return v


class MeshTarget(StrictModel):
    """A mesh file (obj/ply/stl/off/glb), sampled for target points."""

    type: Literal["mesh"]
    path: str = Field(..., description="Mesh file; relative to the scene file's folder.")
    n_points: PositiveInt = Field(50000, le=10**8)
    noise: float = Field(0.0, ge=0)
    normals: bool = True
    normalize: bool = Field(True, description="Scale and centre the mesh into the grid bounds (90 %).")

    _path = field_validator("path")(scene_file)
    _readable = field_validator("path")(readable_asset("mesh"))


class PointsTarget(StrictModel):
    """A point cloud file (ply/xyz/npz), with or without normals."""

    type: Literal["points"]
    path: str = Field(..., description="Point-cloud file; relative to the scene file's folder.")
    normals: bool = Field(True, description="Use the file's normals when it has them (else PCA estimates).")
    normalize: bool = True

    _path = field_validator("path")(scene_file)
    _readable = field_validator("path")(readable_asset("points"))


ImageSource = Annotated[Union[ShapeTarget, MeshTarget], Field(discriminator="type")]


class ImagesTarget(StrictModel):
    """Calibrated images of the object: rendered from a shape or mesh into orbiting views
    (``source``: synthetic, with exact metrics), or read from a folder (``path``: a
    transforms.json, masks from the images' alpha, optional depth and normal .npy files per
    frame; see :func:`diffworld.render.images.load_image_target`)."""

    type: Literal["images"]
    source: Optional[ImageSource] = Field(None, description="A shape or mesh target to render into the views.")
    path: Optional[str] = Field(None, description="transforms.json of a folder of images; relative to the scene file.")
    reference: Optional[str] = Field(None, description="With 'path': a mesh file of the object for the metrics "
                                                       "(in the cameras' frame).")
    views: int = Field(16, ge=1, le=1024, description="Views orbiting the object (with 'source').")
    width: int = Field(128, ge=8, le=4096, description="Image width [pixels] (with 'source').")
    height: int = Field(128, ge=8, le=4096, description="Image height [pixels] (with 'source').")
    fov_deg: float = Field(40.0, gt=1, lt=170, description="Vertical field of view [degrees] (with 'source').")
    elevations: list[float] = Field([30.0, -20.0], min_length=1, description="View elevations [degrees], cycled.")
    channels: list[Literal["mask", "depth", "normal"]] = Field(["mask", "depth", "normal"], min_length=1,
                                                               description="What the target images hold.")
    observed_points: bool = Field(False, description="Also lift the depth maps to a target point cloud (with "
                                                     "the normal maps' normals, taken as outward), so that the "
                                                     "point terms in 'weights' apply as for a point target. "
                                                     "Needs depth.")

    _path = field_validator("path")(lambda v, info: None if v is None else scene_file(v, info))
    _reference = field_validator("reference")(lambda v, info: None if v is None else scene_file(v, info))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.source is None) == (self.path is None):
            raise ValueError("expected exactly one of 'source' (render a shape or mesh) and 'path' (a transforms.json)")
        if self.reference is not None and self.path is None:
            raise ValueError("'reference' goes with 'path' (a synthetic 'source' is its own reference)")
        if "mask" not in self.channels:
            raise ValueError(f"channels: the mask is always used, got {self.channels}")
        if self.observed_points and "depth" not in self.channels:
            raise ValueError(f"observed_points: the points come from the depth maps; expected 'depth' among the "
                             f"channels, got {self.channels}")
        return self


TargetConfig = Annotated[Union[ShapeTarget, MeshTarget, PointsTarget, ImagesTarget], Field(discriminator="type")]


class ImageWeights(StrictModel):
    """Weights of the image terms (image targets only): mask L1, depth L2 in cells^2 where the
    render and the target both see the surface, 1 - cos of the normals there, and space carving."""

    mask: float = Field(1.0, ge=0, le=1e6)
    depth: float = Field(1.0, ge=0, le=1e6)
    normal: float = Field(0.5, ge=0, le=1e6)
    depth_truncation: Optional[float] = Field(None, gt=0, le=1e6, description="Depth residuals are clamped at "
                                              "this many cells (no gradient beyond): a pixel where the render and "
                                              "the target see different layers, e.g. at an open rim, then cannot "
                                              "dominate the depth term. None: plain L2.")
    carve: float = Field(0.0, ge=0, le=1e6, description="Space carving: field points a view sees on an empty "
                                                        "target pixel must be outside (squared cells). Needed "
                                                        "when few views leave the surface room to grow past the "
                                                        "images' borders.")
    msdf: float = Field(1.0, ge=0, le=1e6, description="Representation gshell: the msdf regularizers from the "
                                                       "images (template vertices in observed free space "
                                                       "pushed to msdf <= -msdf_eps, those within msdf_radius "
                                                       "of the observed depth to >= +msdf_eps). Needs depth maps.")


# --- representations (one registry entry each: representations.REPRESENTATIONS) ------------------

RepresentationConfig = REPRESENTATIONS.union()


# Generated from LossWeights (one definition of every weight: default, bounds, description), plus
# the one setting that only the staged scene runner has.
WeightsConfig = create_model(
    "WeightsConfig",
    __base__=StrictModel,
    __doc__="Loss weights (diffworld.geometry.reconstruction.LossWeights).",
    chamfer_final_stage_only=(bool, Field(True, description="Apply Chamfer and mesh_normal only at the finest grid "
                                                            "stage.")),
    **{name: (f.annotation, f) for name, f in LossWeights.__pydantic_fields__.items()},
)


class EvaluationConfig(StrictModel):
    """How the result is measured."""

    n_points: PositiveInt = Field(200000, le=10**8, description="Points sampled on result and reference; the "
                                  "distances are measured from at most 10000 of them a side (a seeded subset, "
                                  "queried_pred/queried_gt in metrics.json) to all points of the other side.")
    threshold: float = Field(0.01, gt=0, description="F-score distance threshold [m].")


class ReconstructionTask(StrictModel):
    """Fit a differentiable isosurface to a target."""

    type: Literal["reconstruction"]
    target: TargetConfig
    representation: RepresentationConfig
    bounds: tuple[Vec3, Vec3] = Field(((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)), description="Grid box [m].")
    weights: WeightsConfig = WeightsConfig()
    samples: PositiveInt = Field(10000, le=10**8, description="Points per iteration on the mesh and from the target.")
    evaluation: EvaluationConfig = EvaluationConfig()
    image_weights: ImageWeights = ImageWeights()

    @model_validator(mode="after")
    def _bounds(self):
        lo, hi = self.bounds
        if any(a >= b for a, b in zip(lo, hi)):
            raise ValueError(f"bounds: lower must be < upper on every axis, got {self.bounds}")
        return self

    @model_validator(mode="after")
    def _combinations(self):
        rep, w = self.representation.type, self.weights
        for key, allowed in (("dev", FLEXIBLE), ("sdf_sign", FLEXIBLE), ("weight_norm", FLEXIBLE),
                             ("msdf_negative", ("gshell",)), ("msdf_positive", ("gshell",))):
            if getattr(w, key) and rep not in allowed:
                raise ValueError(f"weights.{key}: expected 0 with representation.type {rep!r} (it regularizes "
                                 f"representation.type {' or '.join(map(repr, allowed))}), got {getattr(w, key)}")
        if w.sdf_sign_final is not None and not w.sdf_sign:
            raise ValueError(f"weights.sdf_sign_final: expected it only with weights.sdf_sign > 0 (the start of "
                             f"the decay), got sdf_sign_final={w.sdf_sign_final} and sdf_sign=0")
        if self.target.type == "images" and not self.target.observed_points:
            # a point term set to anything but its default is a mistake; at their defaults they
            # are ignored (a run's saved scene.yaml writes every default out)
            fields = type(w).model_fields
            explicit = sorted(k for k in POINT_TERMS if k in w.model_fields_set and getattr(w, k)
                              and getattr(w, k) != fields[k].default)
            if explicit:
                raise ValueError(f"weights.{explicit[0]}: an image target without observed_points has no target "
                                 f"points; the point terms "
                                 f"{list(POINT_TERMS)} do not apply (the image terms are image_weights), got "
                                 f"{ {k: getattr(w, k) for k in explicit} }")
        if self.target.type == "images" and rep == "gshell" and self.image_weights.msdf \
                and "depth" not in self.target.channels:
            raise ValueError(f"target.channels: representation gshell learns where to cut its template from "
                             f"depth maps (a mask alone cannot tell an opening from a lid inside the silhouette); "
                             f"expected 'depth' among the channels, got {self.target.channels}")
        shape_target = self.target.source if self.target.type == "images" else self.target
        if shape_target is not None and shape_target.type == "shape" and shape_target.shape in OPEN_SHAPES:
            if rep != "gshell":
                raise ValueError(f"representation.type: expected 'gshell' for the open target shape "
                                 f"{shape_target.shape!r} (the other representations make closed surfaces), "
                                 f"got {rep!r}")
            if self.target.type == "images" and not self.target.observed_points:
                return self
            if w.sign and w.sign_band is None:
                raise ValueError(f"weights.sign_band: expected a band in cells with weights.sign > 0 and the "
                                 f"open target shape {shape_target.shape!r} (far from an open surface the side of "
                                 f"its nearest point means nothing), got None")
        return self


# --- shape registry -----------------------------------------------------------------------------

SHAPES = Registry("shape")


# representations extracted with FlexiCubes
FLEXIBLE = tuple(n for n in REPRESENTATIONS.names() if REPRESENTATIONS.builder(n).flexicubes)
OPEN_SHAPES = ("open_cup",)  # registry shapes that are open surfaces (shapes.OpenSurface)
# loss terms that need target points (not applicable to image targets)
POINT_TERMS = ("surface", "normal", "sign", "chamfer", "mesh_normal", "msdf_negative", "msdf_positive")


def _register_shapes() -> None:
    from diffworld.geometry import sdf, shapes

    SHAPES.register("genus2", StrictModel, shapes.genus2_shape)
    SHAPES.register("cad_part", StrictModel, shapes.cad_part)
    SHAPES.register("sphere", StrictModel, lambda: sdf.Sphere(0.35))
    SHAPES.register("torus", StrictModel, lambda: sdf.Torus(0.28, 0.1))
    SHAPES.register("open_cup", StrictModel, shapes.open_cup)


_register_shapes()
