"""Engine layer: runtime, torch<->Warp bridge, optimization driver, scenes, I/O, rendering, CLI."""

from diffworld.engine.driver import NonFiniteError, OptimizeResult, OptimizerSettings, optimize
from diffworld.engine.runtime import (
    Runtime,
    get_runtime,
    init_warp,
    resolve_device,
    resolve_dtype,
    torch_threads,
    warp_device,
)

__all__ = [
    "NonFiniteError",
    "OptimizeResult",
    "OptimizerSettings",
    "optimize",
    "Runtime",
    "get_runtime",
    "init_warp",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
    "warp_device",
]
