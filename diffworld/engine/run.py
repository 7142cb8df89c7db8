"""The run skeleton every task uses: :func:`run_scene`.

A task registers a runner in :data:`diffworld.engine.config.TASKS`; the runner builds its problem,
optimizes it with :func:`diffworld.engine.driver.optimize` and returns its metrics. What every
run shares is here: the output folder, the seed, torch's thread setting restored afterwards, and
``metrics.json`` written atomically (a crash never leaves half a file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffworld.engine.config.registry import TASKS
from diffworld.engine.files import atomic_write
from diffworld.engine.runtime import Runtime

__all__ = ["run_scene"]


def run_scene(scene: Any, runtime: Runtime, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
              optimize: bool = True) -> dict:
    """Run a validated scene with its task's registered runner.

    Args:
        scene: A validated scene (``diffworld.app.scenes.load_scene``).
        runtime: Device and dtype.
        out_dir: Output folder (created).
        resume: Continue from the checkpoints in ``out_dir``.
        progress: Show progress.
        optimize: False evaluates the scene as written (no optimization).

    Returns:
        The metrics, also written to ``out_dir/metrics.json``.
    """
    runner = TASKS.builder(scene.task.type)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(scene.seed)
    threads = torch.get_num_threads()
    try:
        metrics = runner(scene, runtime, out_dir, resume=resume, progress=progress, optimize=optimize)
    finally:
        torch.set_num_threads(threads)
    text = json.dumps(metrics, indent=2).encode()
    atomic_write(out_dir / "metrics.json", lambda f: f.write(text))
    return metrics
