"""NCLaw's training set-up on the project's MPM: the ground truth, the learned law's model, the
teacher-forced loss and the rollout metric (torch ops; the law's weights get gradients through
:func:`diffworld.sims.mpm.rollout`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import ELASTIC_KINDS, PLASTIC_KINDS, NeuralLaw, load_law
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask, DataConfig, LawConfig

__all__ = ["build_law", "build_setup", "ground_truth", "lambda_at", "load_trajectory", "rollout_mse", "save_trajectory",
           "teacher_forced_loss", "truth_young"]


def build_setup(data: DataConfig, dtype: torch.dtype, device) -> tuple[mpm.Model, mpm.State]:
    """The body (the cube, or ``data.shape``) in the unit box with the truth material, and its
    initial state (velocity plus spin about the body's centre of mass)."""
    grid = mpm.GridSpec.make((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), data.resolution)
    lo, hi = grid.inner_box()
    if data.shape is None:
        h = 0.5 * data.size
        if 0.5 - h < lo[0] or 0.5 + h > hi[0]:
            raise ValueError(f"data.size: the cube ({data.size:g} m) reaches into the walls ({grid.bound} cells of "
                             f"{grid.dx:g} m); use a smaller cube or a finer grid")
        sdf = Box((h, h, h), (0.5, 0.5, 0.5))
    else:
        sdf = data.shape.build()
    body = mpm.Body(sdf, data.material.build(), data.velocity, "cube", ppc=data.ppc)
    try:
        model, state = mpm.build_model(grid, [body], dt=data.dt, gravity=data.gravity, wall="slip", dtype=dtype,
                                       device=device)
    except ValueError as exc:
        raise ValueError(f"data.shape: {exc}") from None
    x = state.x
    lo_t, hi_t = x.new_tensor(lo), x.new_tensor(hi)
    if data.shape is not None and bool(((x < lo_t) | (x > hi_t)).any()):
        raise ValueError(f"data.shape: the body reaches into the walls ({grid.bound} cells of {grid.dx:g} m): its "
                         f"particles span {[round(float(v), 4) for v in x.min(0).values]} to "
                         f"{[round(float(v), 4) for v in x.max(0).values]}, the free box is {list(lo)} to {list(hi)}")
    omega = torch.tensor(data.spin, dtype=dtype, device=device)
    v = state.v + torch.linalg.cross(omega.expand_as(x), x - x.mean(0))
    limit = mpm.stable_dt(model, cfl=1.0)
    if data.dt > limit:
        raise ValueError(f"data.dt: {data.dt:g} s is above the stability limit {limit:.3g} s of the truth material "
                         f"at this grid")
    return model, mpm.State(x, v, state.C, state.F)


def ground_truth(model: mpm.Model, state: mpm.State, steps: int) -> list[mpm.State]:
    """Every frame (steps + 1 states, the first the initial one) of the truth, without gradients."""
    with torch.no_grad():
        return mpm.rollout(model, state, steps, None, window=max(1, min(steps, 200)), record_every=1).states


TRAJECTORY_KEYS = {"x": (3,), "v": (3,), "C": (3, 3), "F": (3, 3)}


def save_trajectory(states: list[mpm.State], path: str | Path) -> Path:
    """Write frames as ``path`` (.npz): ``x``, ``v`` (T+1, N, 3), ``C``, ``F`` (T+1, N, 3, 3),
    float64 (what ``data.trajectory`` reads)."""
    from diffworld.engine.files import atomic_write

    arrays = {k: torch.stack([getattr(s, k) for s in states]).detach().cpu().double().numpy() for k in TRAJECTORY_KEYS}
    p = Path(path)
    atomic_write(p, lambda f: np.savez_compressed(f, **arrays))
    return p


def load_trajectory(path: str | Path, steps: int, n_particles: int, dtype: torch.dtype, device) -> list[mpm.State]:
    """Read recorded motion for training: ``steps + 1`` frames of ``n_particles`` particles.

    Raises:
        ValueError: An unreadable file, a missing array, arrays of the wrong shape or length (the
            file, the key, what was expected and what was found), non-finite values.
    """
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same answer
        raise ValueError(f"data.trajectory: cannot read {p} as .npz ({type(exc).__name__}: {str(exc)[:200]})") from None
    frames = []
    for key, tail in TRAJECTORY_KEYS.items():
        if key not in arrays:
            raise ValueError(f"data.trajectory: {p} has no array {key!r} (expected x, v, C, F; found "
                             f"{sorted(arrays)})")
        a = arrays[key]
        want = (steps + 1, n_particles, *tail)
        if a.ndim != len(want) or tuple(a.shape[2:]) != tail:
            raise ValueError(f"data.trajectory: {p}: {key!r} has shape {tuple(a.shape)}; expected {want} (frames, "
                             f"particles, ...)")
        if a.shape[0] != steps + 1:
            raise ValueError(f"data.trajectory: {p}: {key!r} has {a.shape[0]} frames; data.steps is {steps}, so "
                             f"{steps + 1} are needed (the first is the start)")
        if a.shape[1] != n_particles:
            raise ValueError(f"data.trajectory: {p}: {key!r} has {a.shape[1]} particles; the set-up (shape, "
                             f"resolution, ppc) makes {n_particles}")
        if not np.isfinite(a).all():
            raise ValueError(f"data.trajectory: {p}: {key!r} has non-finite values")
        frames.append(torch.as_tensor(a, dtype=dtype, device=device))
    x, v, C, F = frames
    return [mpm.State(x[t], v[t], C[t], F[t]) for t in range(steps + 1)]


def build_law(cfg: LawConfig, young: float, dtype: torch.dtype, device) -> NeuralLaw:
    """The law to learn, freshly initialised (seeded by the caller) or from ``cfg.init``."""
    if cfg.init is not None:
        law = load_law(cfg.init, dtype, device)
    else:
        scale = cfg.output_scale or young
        kw = dict(width=cfg.width, depth=cfg.depth)
        el, pl = cfg.part("elastic"), cfg.part("plastic")
        elastic = ELASTIC_KINDS[el](output_scale=scale, **kw) if el in ELASTIC_KINDS else el
        plastic = (None if pl == "none" else PLASTIC_KINDS[pl](alpha=cfg.alpha, **kw) if pl in PLASTIC_KINDS else pl)
        law = NeuralLaw(elastic, plastic).to(dtype=dtype, device=device)
        if el in ELASTIC_KINDS:
            # start stress-free: random weights at the truth's stress scale are a material with
            # negative stiffness in some directions, and the first rollout blows up
            with torch.no_grad():
                law.elastic.mlp.layers[-1].weight.zero_()
    law.requires_grad_(True)
    return law


def lambda_at(iteration: int, iterations: int, start: int, end: int) -> int:
    """Teacher-forcing interval at ``iteration`` of ``iterations``: cosine from ``start`` to ``end``."""
    if iterations <= 1:
        return start
    f = 0.5 * (1.0 - math.cos(math.pi * min(iteration, iterations - 1) / (iterations - 1)))
    return int(round(start + (end - start) * f))


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x - y) ** 2).mean()


def teacher_forced_loss(model: mpm.Model, truth: list[mpm.State], lam: int, window: int) -> torch.Tensor:
    """``1e4`` x the mean over steps of the position MSE, the state reset to the truth every
    ``lam`` steps (each segment a differentiable rollout from the truth's state)."""
    steps = len(truth) - 1
    total, count = truth[0].x.new_zeros(()), 0
    for t0 in range(0, steps, lam):
        n = min(lam, steps - t0)
        out = mpm.rollout(model, truth[t0], n, None, window=min(window, n), record_every=1)
        for k, s in enumerate(out.states[1:], start=1):
            total = total + _mse(s.x, truth[t0 + k].x)
            count += 1
    return 1e4 * total / count


def rollout_mse(model: mpm.Model, truth: list[mpm.State], every: int, steps: int | None = None
                ) -> tuple[float, torch.Tensor]:
    """NCLaw's metric: the free rollout (no resets) from the truth's start, the position MSE at
    every ``every``-th frame; returns (its mean, the per-frame values (F,))."""
    steps = len(truth) - 1 if steps is None else steps
    with torch.no_grad():
        out = mpm.rollout(model, truth[0], steps, None, window=max(1, min(steps, 200)), record_every=every)
        frames = out.substeps
        mse = torch.stack([_mse(s.x, truth[f].x) for s, f in zip(out.states, frames)])
    return float(mse[1:].mean()), mse


def truth_young(task: ConstitutiveLearningTask) -> float:
    """The truth material's Young's modulus [Pa] (the default stress scale of an elastic network)."""
    return float(task.data.material.build().E)

