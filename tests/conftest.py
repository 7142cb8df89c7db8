"""Shared test set-up: a project-local Warp kernel cache and one torch thread (2-core CI)."""

import os
import pathlib

os.environ.setdefault("WARP_CACHE_PATH", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "warp"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")

from diffworld.engine.runtime import init_warp  # noqa: E402

init_warp()
