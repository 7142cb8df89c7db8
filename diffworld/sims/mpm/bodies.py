"""Bodies: particles filling a shape, and the assembly of a :class:`Model` and its initial state.

A body is a region (any SDF: analytic primitive, CSG, a watertight mesh through
:class:`~diffworld.geometry.mesh_sdf.MeshSDF`) filled with particles of one material:

* ``grid``: ``ppc`` particles per cell on a regular sub-lattice (deterministic);
* ``poisson``: Poisson-disk samples at the same density (``scipy.stats.qmc.PoissonDisk``),
  seeded, so the same scene gives the same particles.

Each particle carries the rest volume ``dx^3 / ppc`` and mass ``density * volume``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from diffworld.sims.mpm.emitters import Emitter, EmitterParticles, emitter_particles
from diffworld.sims.mpm.materials import Material
from diffworld.sims.constitutive.laws import EXTERNAL, LAWS
from diffworld.sims.constitutive.torch_law import TorchLaw
from diffworld.sims.mpm.solver import PARTICLE_PARAMS, WALL_MODES, Collider, GridSpec, LawBinding, Model, State

__all__ = ["Body", "build_model", "fill_shape", "use_law"]


@dataclass
class Body:
    """A region filled with particles of one material.

    Attributes:
        shape: SDF callable, points (M, 3) [m] -> values (M,), negative inside.
        material: The material.
        velocity: Initial velocity [m/s].
        name: Label (losses select bodies by name).
        sampling: ``grid`` or ``poisson``.
        ppc: Particles per grid cell (8 is usual; FluidLab uses about 4).
        bounds: Box (lower, upper) [m] that contains the shape; default: the domain.
    """

    shape: Callable[[torch.Tensor], torch.Tensor]
    material: Material
    velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = "body"
    sampling: str = "grid"
    ppc: int = 8
    bounds: tuple[Sequence[float], Sequence[float]] | None = None


def fill_shape(shape: Callable[[torch.Tensor], torch.Tensor], lower: Sequence[float], upper: Sequence[float],
               spacing: float, sampling: str = "grid", seed: int = 0) -> torch.Tensor:
    """Points inside ``shape`` (sdf < 0) within the box, about one per ``spacing^3``.

    Args:
        shape: SDF callable (float64 points in, values out).
        lower, upper: Box to sample [m].
        spacing: Mean particle spacing [m].
        sampling: ``grid`` (cell-centred lattice) or ``poisson`` (Poisson disk, seeded).
        seed: Seed of the Poisson sampler.

    Returns:
        float64 points, shape (M, 3).
    """
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    ext = hi - lo
    if sampling == "grid":
        axes = [lo[a] + spacing * (np.arange(max(int(math.floor(ext[a] / spacing)), 1)) + 0.5) for a in range(3)]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    elif sampling == "poisson":
        from scipy.stats import qmc

        # Poisson-disk radius giving about the lattice's density (random close packing ~ 0.68 r^-3).
        scale = ext.max()
        radius = 0.88 * spacing / scale
        engine = qmc.PoissonDisk(d=3, radius=radius, seed=seed)
        unit = engine.fill_space()
        pts = lo + unit * scale
        pts = pts[(pts <= hi).all(1)]
    else:
        raise ValueError(f"sampling: expected 'grid' or 'poisson', got {sampling!r}")
    p = torch.from_numpy(pts)
    with torch.no_grad():
        values = torch.cat([shape(c).reshape(-1).double() for c in p.split(262144)]) if len(p) else p[:, 0]
    return p[values < 0]


def build_model(grid: GridSpec, bodies: Sequence[Body], *, dt: float, gravity: Sequence[float] = (0.0, 0.0, -9.81),
                colliders: Sequence[Collider] = (), wall: str = "slip", wall_friction: float = 0.0,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0, emitters: Sequence[Emitter] = ()) -> tuple[Model, State]:
    """Fill the bodies with particles and assemble the model and its initial state.

    Args:
        grid: Background grid.
        bodies: Bodies, filled in order (overlaps are not removed: keep bodies disjoint).
        dt: Substep [s].
        gravity: [m/s^2].
        colliders: Kinematic colliders.
        wall: Domain walls: ``slip``, ``sticky`` or ``friction``.
        wall_friction: Coulomb coefficient for ``friction`` walls.
        dtype: float32 or float64.
        device: Torch device.
        seed: Seed of Poisson sampling.
        emitters: Nozzles releasing particles over time; their particles follow the bodies' and are
            parked until released (see :mod:`diffworld.sims.mpm.emitters`).

    Returns:
        (model, initial state): F = I, C = 0, v = the body velocity.

    Raises:
        ValueError: A body with no particles, particles outside the grid's interior, bad wall.
    """
    if wall not in WALL_MODES:
        raise ValueError(f"wall: expected one of {list(WALL_MODES)}, got {wall!r}")
    if not bodies and not emitters:
        raise ValueError("bodies: expected at least one body or emitter, got none")
    if dt <= 0 or not math.isfinite(dt):
        raise ValueError(f"dt: expected a finite number > 0 [s], got {dt!r}")
    device = torch.device(device)
    lo_in, hi_in = grid.inner_box()
    xs, vs, laws, ids = [], [], [], []
    params: dict[str, list[torch.Tensor]] = {p: [] for p in PARTICLE_PARAMS}
    for b_i, body in enumerate(bodies):
        if body.ppc < 1:
            raise ValueError(f"bodies[{b_i}] ('{body.name}'): ppc expected >= 1, got {body.ppc}")
        spacing = grid.dx / body.ppc ** (1.0 / 3.0)
        blo, bhi = body.bounds if body.bounds is not None else (grid.lower, grid.upper)
        pts = fill_shape(body.shape, blo, bhi, spacing, body.sampling, seed + b_i)
        if pts.shape[0] == 0:
            raise ValueError(f"bodies[{b_i}] ('{body.name}'): the shape holds no particle inside the domain "
                             f"(spacing {spacing:.3g} m); check its position and size")
        outside = ((pts < torch.tensor(lo_in, dtype=pts.dtype)) | (pts > torch.tensor(hi_in, dtype=pts.dtype))).any(1)
        if bool(outside.any()):
            bad = pts[outside][0].tolist()
            raise ValueError(f"bodies[{b_i}] ('{body.name}'): {int(outside.sum())} particles outside the domain "
                             f"interior {lo_in}..{hi_in} (walls are {grid.bound} cells thick), e.g. at {bad}")
        n = pts.shape[0]
        xs.append(pts)
        vs.append(torch.tensor(body.velocity, dtype=torch.float64).expand(n, 3))
        laws.append(torch.full((n,), body.material.law_id, dtype=torch.int32))
        ids.append(torch.full((n,), b_i, dtype=torch.int64))
        values = body.material.parameters()
        values["volume"] = grid.dx ** 3 / body.ppc
        for p in PARTICLE_PARAMS:
            params[p].append(torch.full((n,), values[p], dtype=torch.float64))
    emitted = None
    if emitters:
        names = [c.name for c in colliders]
        e_idx, e_step, e_x, e_v, e_col = [], [], [], [], []
        start = sum(int(p.shape[0]) for p in xs)
        for e_i, em in enumerate(emitters):
            em.validate(e_i)
            if em.collider is not None and em.collider not in names:
                raise ValueError(f"emitters[{e_i}] ('{em.name}'): collider expected one of {names}, got "
                                 f"{em.collider!r}")
            step, lx, lv, volume = emitter_particles(em, grid.dx, dt)
            n = int(step.shape[0])
            if em.collider is None:
                outside = ((lx < torch.tensor(lo_in, dtype=lx.dtype)) | (lx > torch.tensor(hi_in, dtype=lx.dtype))).any(1)
                if bool(outside.any()):
                    raise ValueError(f"emitters[{e_i}] ('{em.name}'): the nozzle releases particles outside the "
                                     f"domain interior {lo_in}..{hi_in}, e.g. at {lx[outside][0].tolist()}")
            col = names.index(em.collider) if em.collider is not None else -1
            e_idx.append(torch.arange(start, start + n))
            e_step.append(step)
            e_x.append(lx)
            e_v.append(lv)
            e_col.append(torch.full((n,), col, dtype=torch.int64))
            start += n
            # Parked where they will be released (fixed nozzles) or at the collider-frame point.
            xs.append(lx)
            vs.append(torch.zeros(n, 3, dtype=torch.float64))
            laws.append(torch.full((n,), em.material.law_id, dtype=torch.int32))
            ids.append(torch.full((n,), len(bodies) + e_i, dtype=torch.int64))
            values = em.material.parameters()
            values["volume"] = volume
            for p in PARTICLE_PARAMS:
                params[p].append(torch.full((n,), values[p], dtype=torch.float64))
        emitted = EmitterParticles(torch.cat(e_idx).to(device), torch.cat(e_step).to(device),
                                   torch.cat(e_x).to(device, dtype), torch.cat(e_v).to(device, dtype),
                                   torch.cat(e_col).to(device))
    x = torch.cat(xs).to(device, dtype)
    n = x.shape[0]
    eye = torch.eye(3, dtype=dtype, device=device).expand(n, 3, 3).contiguous()
    state = State(x, torch.cat(vs).to(device, dtype).contiguous(), torch.zeros((n, 3, 3), dtype=dtype, device=device),
                  eye)
    model = Model(grid=grid, dt=float(dt), gravity=tuple(float(g) for g in gravity),
                  law=torch.cat(laws).to(device), params={p: torch.cat(v).to(device, dtype) for p, v in params.items()},
                  body=torch.cat(ids).to(device), colliders=list(colliders), wall=wall,
                  wall_friction=float(wall_friction),
                  body_names=[b.name for b in bodies] + [e.name for e in emitters], emitted=emitted)
    return model, state


def use_law(model: Model, law: TorchLaw, body: str) -> Model:
    """The model with the particles of ``body`` governed by a torch law instead of their material's.

    The law's stress and return map replace the built-in ones at the same stage of the substep;
    its parameters get gradients through :func:`~diffworld.sims.mpm.rollout` (pass them to the
    optimizer). The particles keep their material's parameters (density, viscosity, and the ones
    the law reads by name).

    Args:
        model: The model (not modified).
        law: The law; its parameters must have the model's dtype and device.
        body: A body name of ``model.body_names``.

    Returns:
        A new :class:`Model`.

    Raises:
        ValueError: Unknown body, a rigid or emitted body, a body already bound, an unknown
            parameter name, or parameters of another dtype/device.
    """
    if not isinstance(law, TorchLaw):
        raise ValueError(f"use_law: law: expected a TorchLaw, got {type(law).__name__}")
    if body not in model.body_names:
        raise ValueError(f"use_law: body: expected one of {model.body_names}, got {body!r}")
    unknown = [p for p in law.material_parameters if p not in PARTICLE_PARAMS]
    if unknown:
        raise ValueError(f"use_law: {type(law).__name__}.material_parameters: unknown {unknown}; "
                         f"expected names from {list(PARTICLE_PARAMS)}")
    for name, p in law.named_parameters():
        if p.dtype != model.dtype or p.device != model.device:
            raise ValueError(f"use_law: parameter {name!r} of {type(law).__name__} is {p.dtype} on {p.device}; "
                             f"the model is {model.dtype} on {model.device} (call law.to(...))")
    mask = model.body == model.body_names.index(body)
    if model.emitted is not None and bool(mask[model.emitted.index].any()):
        raise ValueError(f"use_law: body {body!r} is released by an emitter; torch laws take bodies only")
    codes = set(model.law[mask].tolist())
    if LAWS["rigid"].code in codes:
        raise ValueError(f"use_law: body {body!r} is rigid; a rigid body has no constitutive law")
    if EXTERNAL in codes:
        raise ValueError(f"use_law: body {body!r} already has a torch law")
    index = mask.nonzero()[:, 0].to(model.device)
    codes_new = model.law.clone()
    codes_new[index] = EXTERNAL
    return replace(model, law=codes_new, torch_laws=[*model.torch_laws, LawBinding(law, index)])
