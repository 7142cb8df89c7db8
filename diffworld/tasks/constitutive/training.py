"""NCLaw's training set-up on the project's MPM: the ground truth, the learned law's model, the
teacher-forced loss and the rollout metric (torch ops; the law's weights get gradients through
:func:`diffworld.sims.mpm.rollout`)."""

from __future__ import annotations

import math

import torch

from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import ELASTIC_KINDS, PLASTIC_KINDS, NeuralLaw, load_law
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask, DataConfig, LawConfig

__all__ = ["build_law", "build_setup", "ground_truth", "lambda_at", "rollout_mse", "teacher_forced_loss",
           "truth_young"]


def build_setup(data: DataConfig, dtype: torch.dtype, device) -> tuple[mpm.Model, mpm.State]:
    """The cube in the unit box with the truth material, and its initial state (velocity plus spin
    about the cube's centre)."""
    grid = mpm.GridSpec.make((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), data.resolution)
    h = 0.5 * data.size
    lo, hi = grid.inner_box()
    if 0.5 - h < lo[0] or 0.5 + h > hi[0]:
        raise ValueError(f"data.size: the cube ({data.size:g} m) reaches into the walls ({grid.bound} cells of "
                         f"{grid.dx:g} m); use a smaller cube or a finer grid")
    body = mpm.Body(Box((h, h, h), (0.5, 0.5, 0.5)), data.material.build(), data.velocity, "cube", ppc=data.ppc)
    model, state = mpm.build_model(grid, [body], dt=data.dt, gravity=data.gravity, wall="slip", dtype=dtype,
                                   device=device)
    omega = torch.tensor(data.spin, dtype=dtype, device=device)
    x = state.x
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


def build_law(cfg: LawConfig, young: float, dtype: torch.dtype, device) -> NeuralLaw:
    """The law to learn, freshly initialised (seeded by the caller) or from ``cfg.init``."""
    if cfg.init is not None:
        law = load_law(cfg.init, dtype, device)
    else:
        scale = cfg.output_scale or young
        kw = dict(width=cfg.width, depth=cfg.depth)
        elastic = (ELASTIC_KINDS[cfg.elastic](output_scale=scale, **kw) if cfg.elastic in ELASTIC_KINDS
                   else cfg.elastic)
        plastic = (None if cfg.plastic == "none" else
                   PLASTIC_KINDS[cfg.plastic](alpha=cfg.alpha, **kw) if cfg.plastic in PLASTIC_KINDS else cfg.plastic)
        law = NeuralLaw(elastic, plastic).to(dtype=dtype, device=device)
        if cfg.elastic in ELASTIC_KINDS:
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

