"""Engine layer: runtime, torch<->Warp bridge, optimization driver, scenes, I/O, rendering, CLI."""

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
    "Runtime",
    "get_runtime",
    "init_warp",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
    "warp_device",
]
