"""Running a ``constitutive_learning`` scene: the truth, training with teacher forcing, the law
file, the evaluation and its pictures; registered as ``constitutive_learning``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.problem import BaseProblem, solve
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import save_law
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask
from diffworld.tasks.constitutive.training import (build_law, build_setup, ground_truth, lambda_at, rollout_mse,
                                                   teacher_forced_loss, truth_young)

__all__ = ["LawProblem", "run_constitutive_learning"]


class LawProblem(BaseProblem):
    """Fit the law's weights to the truth: one teacher-forced rollout per iteration; the elastic
    and plastic weights are two parameter groups with their own learning-rate factors."""

    stage = "law"

    def __init__(self, task: ConstitutiveLearningTask, model: mpm.Model, truth: list[mpm.State], law, lr: float,
                 iterations: int) -> None:
        self.task, self.model, self.truth, self.law = task, model, truth, law
        self.lr, self.iterations = lr, iterations

    def params(self):
        groups = []
        for key, factor in (("elastic", self.task.law.elastic_lr), ("plastic", self.task.law.plastic_lr)):
            part = getattr(self.law, key)
            ps = {f"{key}.{n}": p for n, p in (part.named_parameters() if isinstance(part, torch.nn.Module) else [])
                  if p.requires_grad}
            if ps:
                groups.append({"params": ps, "lr": self.lr * factor})
        return groups

    def loss_fn(self, iteration: int):
        tf = self.task.teacher_forcing
        lam = lambda_at(iteration, self.iterations, tf.start, tf.end)
        loss = teacher_forced_loss(self.model, self.truth, lam, self.task.window)
        return loss, {"lambda": torch.tensor(float(lam))}


def _plot(out_dir: Path, frames: np.ndarray, curves: dict[str, np.ndarray], truth: np.ndarray,
          learned: dict[str, np.ndarray]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.engine.files import atomic_path

    files = {}
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    for name, c in curves.items():
        ax.semilogy(frames[1:], np.maximum(c[1:], 1e-16), label=name)
    ax.set_xlabel("frame")
    ax.set_ylabel("position MSE [m^2]")
    ax.legend()
    with atomic_path(out_dir / "mse.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    files["mse"] = "mse.png"
    fig, axes = plt.subplots(1, len(learned), figsize=(3.4 * len(learned), 3.4), constrained_layout=True,
                             squeeze=False)
    for a, (name, x) in zip(axes[0], learned.items()):
        a.scatter(truth[:, 0], truth[:, 2], s=4, color="0.6", label="truth")
        a.scatter(x[:, 0], x[:, 2], s=4, color="C0", label=name)
        a.set_xlim(0, 1)
        a.set_ylim(0, 1)
        a.set_aspect("equal")
        a.set_title(f"last frame: {name}")
        a.legend(loc="upper right", fontsize=7)
    with atomic_path(out_dir / "final_frame.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    files["final_frame"] = "final_frame.png"
    return files


def run_constitutive_learning(scene_cfg, task: ConstitutiveLearningTask, runtime, out_dir: Path, *,
                              resume: bool = False, progress: bool = True, optimize: bool = True) -> dict:
    """Run a ``constitutive_learning`` scene into ``out_dir``: writes ``law.pt``/``law.json`` (the
    learned law, usable as ``material: {type: neural, path: law.pt}``), ``mse.png``,
    ``final_frame.png``, and returns the metrics (rollout MSE before and after, per NCLaw)."""
    dtype, device = runtime.dtype, runtime.device
    t0 = time.perf_counter()
    truth_model, state = build_setup(task.data, dtype, device)
    truth = ground_truth(truth_model, state, task.data.steps)
    torch.manual_seed(scene_cfg.seed)
    law = build_law(task.law, truth_young(task), dtype, device)
    model = mpm.use_law(truth_model, law, "cube")
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
    every = task.eval_every
    before, curve_before = rollout_mse(model, truth, every)
    metrics: dict = {"particles": truth_model.n_particles, "steps": task.data.steps, "dt": task.data.dt,
                     "truth": task.data.material.name, "elastic": task.law.elastic, "plastic": task.law.plastic,
                     "parameters": sum(p.numel() for p in law.parameters()), "initial_rollout_mse": before}
    if optimize:
        problem = LawProblem(task, model, truth, law, settings.lr, settings.iterations)
        solve(problem, settings, out_dir, resume=resume, progress=progress)
    after, curve_after = rollout_mse(model, truth, every)
    metrics["final_rollout_mse"] = after
    save_law(law, Path(out_dir) / "law.pt")
    with torch.no_grad():
        x_after = mpm.rollout(model, truth[0], task.data.steps, None, window=200).states[-1].x
    frames = np.arange(0, task.data.steps + 1, every)
    if frames[-1] != task.data.steps:
        frames = np.append(frames, task.data.steps)
    files = _plot(Path(out_dir), frames, {"initial law": curve_before.cpu().numpy(),
                                          "learned law": curve_after.cpu().numpy()},
                  truth[-1].x.cpu().numpy(), {"learned": x_after.cpu().numpy()})
    metrics["seconds"] = time.perf_counter() - t0
    metrics["files"] = {"law": "law.pt", **files}
    return metrics


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_constitutive_learning(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("constitutive_learning", ConstitutiveLearningTask, _run)
