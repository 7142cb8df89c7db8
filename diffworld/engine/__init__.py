"""The ground: runtime (device, dtype, Warp, threads), torch<->Warp bridge, gradient checks, the
task-agnostic optimization driver and the configuration bases (`config`: strict models, registries).

Imports nothing else from diffworld; everything else builds on it.
"""

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
