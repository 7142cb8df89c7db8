"""Shared test set-up: Warp initialized once (with diffworld's one kernel cache,
``diffworld.engine.runtime.kernel_cache_dir``), off-screen plots, one torch thread (2-core CI)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")

from diffworld.engine.runtime import init_warp  # noqa: E402

init_warp()
