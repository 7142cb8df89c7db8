"""The run skeleton every task uses: :func:`run_scene`.

A task registers a runner in :data:`diffworld.engine.config.TASKS`; the runner builds its problem,
optimizes it with :func:`diffworld.engine.driver.optimize` and returns its metrics. What every
run shares is here: the output folder, the seed, torch's thread setting restored afterwards, and
``metrics.json`` written atomically (a crash never leaves half a file).

A fresh (not resumed) optimization into a folder that holds an earlier run first removes that run's log,
loss plot and checkpoints (:data:`PREVIOUS_RUN_FILES`): the driver keeps the log rows of stages it
does not run, so another scene's stages would otherwise stay in the new run's log and plot, and a
later ``--resume`` could pick up another run's finished stage. (The command line asks for
``--overwrite`` before it lets that happen.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.files import atomic_write
from diffworld.engine.runtime import Runtime

__all__ = ["PREVIOUS_RUN_FILES", "previous_run_files", "run_scene"]

#: What a run leaves in its folder that the next fresh run must not mix with its own (globs).
PREVIOUS_RUN_FILES = ("log.csv", "log.jsonl", "loss.png", "checkpoints/*.pt")


def previous_run_files(out_dir: str | Path) -> list[Path]:
    """The files of :data:`PREVIOUS_RUN_FILES` present in ``out_dir`` (sorted)."""
    out_dir = Path(out_dir)
    return sorted(f for pattern in PREVIOUS_RUN_FILES for f in out_dir.glob(pattern) if f.is_file())


def run_scene(scene: Any, runtime: Runtime, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
              optimize: bool = True) -> dict:
    """Run a validated scene with its task's registered runner.

    Args:
        scene: A validated scene (``diffworld.app.scenes.load_scene``).
        runtime: Device and dtype.
        out_dir: Output folder (created).
        resume: Continue from the checkpoints in ``out_dir``; otherwise an optimization first removes
            an earlier run's log, loss plot and checkpoints there (see the module docstring).
        progress: Show progress.
        optimize: False evaluates the scene as written (no optimization).

    Returns:
        The metrics, also written to ``out_dir/metrics.json``.
    """
    runner = TASKS.builder(scene.task.type)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if optimize and not resume:
        for f in previous_run_files(out_dir):
            f.unlink()
    torch.manual_seed(scene.seed)
    threads = torch.get_num_threads()
    try:
        metrics = runner(scene, runtime, out_dir, resume=resume, progress=progress, optimize=optimize)
    finally:
        torch.set_num_threads(threads)
    text = json.dumps(metrics, indent=2).encode()
    atomic_write(out_dir / "metrics.json", lambda f: f.write(text))
    return metrics
