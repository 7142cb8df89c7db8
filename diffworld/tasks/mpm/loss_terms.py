"""Loss terms of the ``mpm`` task, one registry entry each (:data:`LOSS_TERMS`): the scene
section (a pydantic model whose ``type`` names the term) and the evaluator that prepares its
target once and scores recorded states.

A new term is one model, one :class:`LossTerm` subclass and one ``LOSS_TERMS.register`` line;
the scene format's ``losses`` list is the union of what is registered.

Final-state terms (``com``, ``region``, ``shape``, ``density``, ``chamfer``, ``mixing``,
``pattern``) read the last recorded state (the state at the current horizon);
``target_trajectory`` reads every recorded state up to it; ``python`` terms get all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional

import numpy as np
import torch
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from diffworld.engine.config.registry import Registry
from diffworld.engine.config.schema import StrictModel, scene_file
from diffworld.tasks.mpm.shapes import ShapeConfig, Vec3

if TYPE_CHECKING:
    from diffworld.tasks.mpm.build import MPMScene

__all__ = [
    "ChamferLossConfig", "ComLossConfig", "DensityLossConfig", "LOSS_TERMS", "LossTerm", "MixingLossConfig",
    "PatternLossConfig", "PythonLossConfig", "RegionLossConfig", "ShapeLossConfig", "StatesView",
    "TargetTrajectoryLossConfig", "term_names",
]


# ------------------------------------------------------------------------------------------------
# Scene sections
# ------------------------------------------------------------------------------------------------

class _LossTerm(StrictModel):
    weight: float = Field(1.0, ge=0, description="Weight of the term in the total loss.")


class ComLossConfig(_LossTerm):
    """Squared distance of a body's centre of mass to a target [m^2] (final state)."""

    type: Literal["com"]
    body: str
    target: Vec3 = Field(..., description="Target centre of mass [m].")
    axes: list[Literal["x", "y", "z"]] = Field(["x", "y", "z"], min_length=1,
                                               description="Axes that count (e.g. [x, y]: horizontal distance).")


class RegionLossConfig(_LossTerm):
    """One minus the soft fraction of a body inside a box (final state), in [0, 1]."""

    type: Literal["region"]
    body: str
    lower: Vec3 = Field(..., description="Box lower corner [m].")
    upper: Vec3 = Field(..., description="Box upper corner [m].")


class ShapeLossConfig(_LossTerm):
    """Particles inside a target shape and covering it [m^2] (final state)."""

    type: Literal["shape"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")


class DensityLossConfig(_LossTerm):
    """PlasticineLab shape matching (final state): grid mass vs a target filled with the body's mass.

    ``density_weight * sum|m - t| / sum t`` (L1; L2 with ``norm: l2``) plus ``sdf_weight`` times
    the mass-weighted distance outside the target in cells (see
    :func:`diffworld.sims.mpm.losses.shape_matching_loss`).
    """

    type: Literal["density"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")
    density_weight: float = Field(1.0, ge=0, description="Weight of the grid-mass difference (dimensionless).")
    sdf_weight: float = Field(1.0, ge=0, description="Weight of the distance outside the target [cells].")
    norm: Literal["l1", "l2"] = Field("l1", description="Norm of the grid-mass difference.")
    ppc: Optional[int] = Field(None, ge=1, description="Target sample points per cell; default: the body's ppc.")


class TargetTrajectoryLossConfig(_LossTerm):
    """Mean squared distance [m^2] of a body's particles to target positions at every control step."""

    type: Literal["target_trajectory"]
    body: str
    path: str = Field(..., description="A .npz file, relative to the scene file, holding the targets.")
    key: str = Field("x", description="Array of the .npz: shape (steps, N, 3) [m], row k = after control step k+1, "
                                      "particles in the body's order.")

    _path = field_validator("path")(scene_file)

    _targets: Optional[np.ndarray] = PrivateAttr(None)  # the array, read once at validation

    @model_validator(mode="after")
    def _array(self):
        self._targets = _npz_array(self.path, self.key)
        shape = self._targets.shape
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"{self.path}: array {self.key!r} has shape {shape}; expected (steps, N, 3)")
        return self


def _npz_array(path: str, key: str) -> np.ndarray:
    """Array ``key`` of an .npz file (ValueError naming the file and key otherwise)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive
        raise ValueError(f"{path}: not an .npz archive (np.savez writes one); the file starts with {magic!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (np.savez), got a single array")
    with data:
        if key not in data.files:
            raise ValueError(f"{path}: no array {key!r} (key); the file holds {sorted(data.files)}")
        return data[key]


class ChamferLossConfig(_LossTerm):
    """Chamfer distance [m^2] between a body's particles (final state) and points filling a target shape."""

    type: Literal["chamfer"]
    body: str
    shape: ShapeConfig = Field(..., description="Target shape.")
    ppc: Optional[int] = Field(None, ge=1, description="Target points per cell; default: the body's ppc.")


class MixingLossConfig(_LossTerm):
    """How unmixed two bodies are (final state), from their grid masses: 1 segregated ... 0 mixed.

    See :func:`diffworld.sims.mpm.losses.mixing_loss` (``l2``: Danckwerts' intensity of
    segregation; ``l1``: its absolute-value form).
    """

    type: Literal["mixing"]
    bodies: tuple[str, str] = Field(..., description="The two bodies (A, B) to mix.")
    target: Optional[float] = Field(None, gt=0, lt=1, description="Target mass fraction of A per node; default: "
                                                                   "A's share of the two bodies' mass.")
    norm: Literal["l1", "l2"] = Field("l2", description="l2: intensity of segregation; l1: mean |fraction - target|.")

    @field_validator("bodies")
    @classmethod
    def _distinct(cls, v: tuple[str, str]) -> tuple[str, str]:
        if v[0] == v[1]:
            raise ValueError(f"expected two different bodies, got {list(v)}")
        return v


class PatternLossConfig(_LossTerm):
    """A body seen from above vs a target image (latte art), final state.

    The body's mass, projected along z, as a fraction per grid column vs the image laid on the
    rectangle ``lower..upper`` (top row at ``upper[1]``): ``density_weight * sum|p - t|`` (0 to 2)
    plus ``distance_weight`` times the mean distance of the mass from the pattern [cells] (see
    :func:`diffworld.sims.mpm.losses.pattern_loss`).
    """

    type: Literal["pattern"]
    body: str
    image: str = Field(..., description="Image file (PNG...), relative to the scene file; bright = pattern.")
    lower: tuple[float, float] = Field(..., description="Lower corner (x, y) of the image on the xy plane [m].")
    upper: tuple[float, float] = Field(..., description="Upper corner (x, y) [m].")
    density_weight: float = Field(1.0, ge=0, description="Weight of the L1 difference of the fractions.")
    distance_weight: float = Field(1.0, ge=0, description="Weight of the distance from the pattern [cells].")

    _image = field_validator("image")(scene_file)
    _pixels: Optional[np.ndarray] = PrivateAttr(None)  # the image, read once at validation

    @model_validator(mode="after")
    def _check(self):
        if not (self.lower[0] < self.upper[0] and self.lower[1] < self.upper[1]):
            raise ValueError(f"expected lower < upper in x and y, got lower={list(self.lower)}, "
                             f"upper={list(self.upper)}")
        self._pixels = _read_image(self.image)
        return self


def _read_image(path: str) -> np.ndarray:
    """Pixels of an image file (ValueError naming the file otherwise)."""
    import imageio.v3 as iio

    try:
        return np.asarray(iio.imread(path))
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


class PythonLossConfig(_LossTerm):
    """A user-written torch loss: ``fn(states, info) -> scalar tensor``.

    ``states``: recorded states (index 0 initial, then one per control step up to the horizon);
    ``info``: :class:`diffworld.sims.mpm.losses.SceneInfo` (masks, masses, grid, actions, options).
    """

    type: Literal["python"]
    function: str = Field(..., description="'package.module:callable' (importable) or 'file.py:callable' "
                                           "(relative to the scene file); imported, never evaluated.")
    body: Optional[str] = Field(None, description="Passed to the function as info.body.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the function as info.options.")

    @field_validator("function")
    @classmethod
    def _importable(cls, v: str, info: ValidationInfo) -> str:
        from diffworld.sims.mpm.losses import load_callable

        base = (info.context or {}).get("scene_dir")
        if isinstance(v, str) and v.count(":") == 1 and v.split(":")[0].endswith(".py"):
            file, attr = v.split(":")
            p = Path(file)
            if not p.is_absolute() and base is not None:
                v = f"{Path(base) / p}:{attr}"
        load_callable(v, base)
        return v


# ------------------------------------------------------------------------------------------------
# Evaluators
# ------------------------------------------------------------------------------------------------

class StatesView(NamedTuple):
    """What a term scores: the recorded states and the per-body masks at the current horizon.

    Attributes:
        states: Recorded states (index 0 initial, then one per control step up to the horizon).
        masks: Body name -> bool (N,) of its particles (emitted ones from their release on).
        actions: The optimized per-step collider velocities by collider name (python terms).
    """

    states: list
    masks: dict[str, torch.Tensor]
    actions: dict[str, torch.Tensor]

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1].x

    @property
    def horizon(self) -> int:
        return len(self.states) - 1


class LossTerm:
    """A configured term with its target prepared (subclasses: one per ``type``).

    Args:
        scene: The built scene.
        cfg: The term's section.
        key: Its key path in the scene (``task.objective.losses[i]``) for messages.
    """

    def __init__(self, scene: "MPMScene", cfg, key: str) -> None:
        self.scene, self.cfg, self.key = scene, cfg, key
        self.grid = scene.grid
        self.dtype, self.device = scene.model.dtype, scene.model.device

    @staticmethod
    def log_key(cfg) -> str:
        """What tells this term from others of its type in the log (the body by default)."""
        return cfg.body

    def __call__(self, view: StatesView) -> torch.Tensor:
        raise NotImplementedError

    def body_x(self, view: StatesView) -> torch.Tensor:
        """Final positions of the term's body."""
        return view.final[view.masks[self.cfg.body]]

    def body_ppc(self) -> int:
        """The term's ``ppc``, else its body's."""
        cfgs = {b.name: b for b in [*self.scene.task.bodies, *self.scene.task.emitters]}
        return self.cfg.ppc or cfgs[self.cfg.body].ppc


def _losses():
    from diffworld.sims.mpm import losses

    return losses


class ComTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        self.target = torch.tensor(cfg.target, dtype=self.dtype, device=self.device)

    def __call__(self, view):
        return _losses().com_loss(self.body_x(view), self.target, ["xyz".index(a) for a in self.cfg.axes])


class RegionTerm(LossTerm):
    def __call__(self, view):
        return _losses().region_loss(self.body_x(view), self.cfg.lower, self.cfg.upper, self.grid.dx)


class ShapeTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        sdf = cfg.shape.build()
        grid = self.grid
        points = _losses().sample_shape(sdf, grid.lower, grid.upper, grid.dx)
        self.sdf = sdf.to(self.dtype) if isinstance(sdf, torch.nn.Module) else sdf
        self.points = points.to(self.device, self.dtype)

    def __call__(self, view):
        return _losses().shape_cover_loss(self.body_x(view), self.sdf, self.points)


class DensityTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        self.mass = scene.masses()
        total = float(self.mass[scene.mask(cfg.body)].double().sum())
        grid = self.grid
        try:
            self.target = _losses().target_grids(cfg.shape.build(), total, grid.lower, grid.dx, grid.shape,
                                                 ppc=self.body_ppc(), dtype=self.dtype, device=self.device)
        except ValueError as exc:
            raise ValueError(f"{key}.shape: {exc}") from None

    def __call__(self, view):
        mask, c = view.masks[self.cfg.body], self.cfg
        return _losses().shape_matching_loss(view.final[mask], self.mass[mask], self.target.density, self.target.sdf,
                                             self.grid.lower, self.grid.dx, density_weight=c.density_weight,
                                             sdf_weight=c.sdf_weight, norm=c.norm).loss


class ChamferTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        grid = self.grid
        points = _losses().sample_shape(cfg.shape.build(), grid.lower, grid.upper,
                                        grid.dx / self.body_ppc() ** (1.0 / 3.0))
        if points.shape[0] == 0:
            raise ValueError(f"{key}.shape: the target shape holds no point inside the domain")
        self.points = points.to(self.device, self.dtype)

    def __call__(self, view):
        return _losses().chamfer_distance(self.body_x(view), self.points)


class TargetTrajectoryTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        arr = cfg._targets
        n = int(scene.mask(cfg.body).sum())
        want = (scene.task.steps, n, 3)
        if tuple(arr.shape) != want:
            raise ValueError(f"{key}.path: {cfg.path} holds {cfg.key!r} of shape {tuple(arr.shape)}; "
                             f"expected {want}: {scene.task.steps} control steps (task.steps) and the {n} "
                             f"particles of body {cfg.body!r}")
        self.targets = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, self.dtype)

    def __call__(self, view):
        if not view.horizon:
            return view.final.sum() * 0.0
        mask = view.masks[self.cfg.body]
        return _losses().trajectory_loss([s.x[mask] for s in view.states[1:]], self.targets[:view.horizon])


class MixingTerm(LossTerm):
    @staticmethod
    def log_key(cfg) -> str:
        return "_".join(cfg.bodies)

    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        self.mass = scene.masses()

    def __call__(self, view):
        ma, mb = (view.masks[b] for b in self.cfg.bodies)
        grid, final = self.grid, view.final
        return _losses().mixing_loss(final[ma], self.mass[ma], final[mb], self.mass[mb], grid.lower, grid.dx,
                                     grid.shape, target=self.cfg.target, norm=self.cfg.norm)


class PatternTerm(LossTerm):
    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        self.mass = scene.masses()
        grid = self.grid
        try:
            self.target = _losses().pattern_target(cfg._pixels, cfg.lower, cfg.upper, grid.lower, grid.dx,
                                                   grid.shape, dtype=self.dtype, device=self.device)
        except ValueError as exc:
            raise ValueError(f"{key}.image: {exc}") from None

    def __call__(self, view):
        mask, c = view.masks[self.cfg.body], self.cfg
        return _losses().pattern_loss(view.final[mask], self.mass[mask], self.target, self.grid.lower, self.grid.dx,
                                      density_weight=c.density_weight, distance_weight=c.distance_weight).loss


class PythonTerm(LossTerm):
    @staticmethod
    def log_key(cfg) -> str:
        return cfg.function.rsplit(":", 1)[1]

    def __init__(self, scene, cfg, key):
        super().__init__(scene, cfg, key)
        self.mass = scene.masses()
        try:
            self.fn = _losses().load_callable(cfg.function)
        except ValueError as exc:
            raise ValueError(f"{key}.function: {exc}") from None

    def __call__(self, view):
        scene, grid, losses = self.scene, self.grid, _losses()
        info = losses.SceneInfo(model=scene.model, masks=view.masks, mass=self.mass, grid_lower=grid.lower,
                                dx=grid.dx, grid_shape=grid.shape, dt=scene.model.dt, substeps=scene.task.substeps,
                                steps=view.horizon, total_steps=scene.task.steps, actions=dict(view.actions),
                                body=self.cfg.body, options=dict(self.cfg.options))
        return losses.call_user_loss(self.fn, view.states, info, f"{self.key} ({self.cfg.function})")


LOSS_TERMS = Registry("loss term")
for _name, _model, _term in (
        ("com", ComLossConfig, ComTerm),
        ("region", RegionLossConfig, RegionTerm),
        ("shape", ShapeLossConfig, ShapeTerm),
        ("density", DensityLossConfig, DensityTerm),
        ("target_trajectory", TargetTrajectoryLossConfig, TargetTrajectoryTerm),
        ("chamfer", ChamferLossConfig, ChamferTerm),
        ("mixing", MixingLossConfig, MixingTerm),
        ("pattern", PatternLossConfig, PatternTerm),
        ("python", PythonLossConfig, PythonTerm)):
    LOSS_TERMS.register(_name, _model, _term)


def term_names(terms) -> list[str]:
    """Log names of configured terms: ``type_<key>`` (the body; ``python_<callable>``,
    ``mixing_<a>_<b>``), indexed when not unique."""
    keys = [(t.type, LOSS_TERMS.builder(t.type).log_key(t)) for t in terms]
    return [f"{k[0]}_{k[1]}" if keys.count(k) == 1 else f"{k[0]}_{k[1]}_{i}" for i, k in enumerate(keys)]
