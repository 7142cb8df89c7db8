"""Running a ``constitutive_learning`` scene: the truth, training with teacher forcing, the law
file, the evaluation and its pictures; registered as ``constitutive_learning``."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.problem import BaseProblem, solve
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import save_law
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask, EvaluationCase
from diffworld.tasks.constitutive.training import (build_law, build_setup, ground_truth, lambda_at, load_trajectory,
                                                   rollout_mse, save_trajectory, teacher_forced_loss, truth_young)

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
    if task.data.trajectory is not None:
        truth = load_trajectory(task.data.trajectory, task.data.steps, truth_model.n_particles, dtype, device)
    else:
        truth = ground_truth(truth_model, state, task.data.steps)
        save_trajectory(truth, Path(out_dir) / "truth.npz")
    torch.manual_seed(scene_cfg.seed)
    law = build_law(task.law, truth_young(task), dtype, device)
    model = mpm.use_law(truth_model, law, "cube")
    settings = scene_cfg.optimizer.settings(seed=scene_cfg.seed)
    every = task.eval_every
    before, curve_before = rollout_mse(model, truth, every)
    metrics: dict = {"particles": truth_model.n_particles, "steps": task.data.steps, "dt": task.data.dt,
                     "truth": task.data.material.name, "elastic": task.law.part("elastic"),
                     "plastic": task.law.part("plastic"),
                     "parameters": sum(p.numel() for p in law.parameters()), "initial_rollout_mse": before}
    initial = copy.deepcopy(law).requires_grad_(False)
    if optimize:
        problem = LawProblem(task, model, truth, law, settings.lr, settings.iterations)
        solve(problem, settings, out_dir, resume=resume, progress=progress)
    after, curve_after = rollout_mse(model, truth, every)
    metrics["final_rollout_mse"] = after
    save_law(law, Path(out_dir) / "law.pt")
    cases = {}
    for case in task.evaluate:
        cases[case.name] = evaluate_case(task, case, {"learned": law, "initial": initial}, dtype, device)
        metrics[f"eval_{case.name}_mse"] = cases[case.name]["learned"]
        metrics[f"eval_{case.name}_initial_mse"] = cases[case.name]["initial"]
    if cases:
        metrics["evaluation"] = {name: {k: v for k, v in c.items() if k != "curves"} for name, c in cases.items()}
    with torch.no_grad():
        x_after = mpm.rollout(model, truth[0], task.data.steps, None, window=200).states[-1].x
    frames = np.arange(0, task.data.steps + 1, every)
    if frames[-1] != task.data.steps:
        frames = np.append(frames, task.data.steps)
    files = _plot(Path(out_dir), frames, {"initial law": curve_before.cpu().numpy(),
                                          "learned law": curve_after.cpu().numpy()},
                  truth[-1].x.cpu().numpy(), {"learned": x_after.cpu().numpy()})
    if cases:
        files["evaluation"] = _plot_cases(Path(out_dir), cases)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["files"] = {"law": "law.pt", **files}
    if task.data.trajectory is None:
        metrics["files"]["truth"] = "truth.npz"
    return metrics


def evaluate_case(task: ConstitutiveLearningTask, case: EvaluationCase, laws: dict[str, torch.nn.Module], dtype,
                  device) -> dict:
    """Score ``laws`` (name -> law) on one evaluation trajectory: the truth simulated with the
    truth material in the case's set-up, each law's free rollout from the same start, NCLaw's
    metric. A law whose rollout fails (non-finite stresses) scores ``inf``, with the reason.

    Returns:
        {law name: mean MSE [m^2], "particles", "steps", "curves": {law name: per-frame MSE},
        "errors": {law name: message} where one failed}.
    """
    data = case.data(task.data)
    truth_model, state = build_setup(data, dtype, device)
    truth = ground_truth(truth_model, state, data.steps)
    out: dict = {"particles": truth_model.n_particles, "steps": data.steps, "curves": {}, "errors": {}}
    for name, law in laws.items():
        try:
            mse, curve = rollout_mse(mpm.use_law(truth_model, law, "cube"), truth, task.eval_every)
        except ValueError as exc:  # the seam's check: a law that produced non-finite values
            out[name], out["errors"][name] = float("inf"), str(exc)[:300]
            continue
        out[name] = mse if math.isfinite(mse) else float("inf")
        out["curves"][name] = curve.cpu().numpy()
    if not out["errors"]:
        del out["errors"]
    return out


def _plot_cases(out_dir: Path, cases: dict[str, dict]) -> str:
    """One panel per evaluation case: the position MSE over its frames, per law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.engine.files import atomic_path

    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.0), constrained_layout=True, squeeze=False)
    for a, (name, c) in zip(axes[0], cases.items()):
        for law, curve in c["curves"].items():
            a.semilogy(np.maximum(curve[1:], 1e-16), label=law)
        a.set_title(f"{name} ({c['steps']} steps)", fontsize=9)
        a.set_xlabel("scored frame")
        a.legend(fontsize=7)
    axes[0][0].set_ylabel("position MSE [m^2]")
    with atomic_path(out_dir / "evaluation.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return "evaluation.png"


def _run(scene, runtime, out_dir: Path, **kwargs) -> dict:
    return run_constitutive_learning(scene, scene.task, runtime, out_dir, **kwargs)


TASKS.register("constitutive_learning", ConstitutiveLearningTask, _run)
