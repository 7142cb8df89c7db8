"""Runtime: device choice, dtype, lazy Warp initialization, kernel cache, torch threads.

Warp is initialized once, on first use, never at import: importing diffworld stays cheap and
never touches a GPU. The kernel cache lives where ``WARP_CACHE_PATH`` (or
``DIFFWORLD_WARP_CACHE``) points, so compiled kernels survive between runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = [
    "Runtime",
    "get_runtime",
    "init_warp",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
    "warp_device",
]

_LOCK = threading.Lock()
_WARP_READY = False

# On small machines torch's intra-op pool fights Warp's CPU kernels (and itself): one torch
# thread was measured up to 90x faster under load on 2 cores.
SMALL_MACHINE_CORES = 4


def init_warp(cache_path: str | None = None, quiet: bool = True):
    """Initialize Warp once and return the module.

    Args:
        cache_path: Kernel cache folder. Defaults to ``$DIFFWORLD_WARP_CACHE``, then
            ``$WARP_CACHE_PATH``, then Warp's own default.
        quiet: Silence Warp's start-up banner and per-module build messages.

    Returns:
        The imported ``warp`` module, initialized.
    """
    global _WARP_READY
    import warp as wp

    if _WARP_READY:
        return wp
    with _LOCK:
        if _WARP_READY:
            return wp
        path = cache_path or os.environ.get("DIFFWORLD_WARP_CACHE") or os.environ.get("WARP_CACHE_PATH")
        if path:
            os.makedirs(path, exist_ok=True)
            wp.config.kernel_cache_dir = path
        if quiet:
            wp.config.log_level = wp.LOG_WARNING
        wp.init()
        _configure_torch_threads()
        _WARP_READY = True
    return wp


def _configure_torch_threads() -> None:
    cores = os.cpu_count() or 1
    if cores <= SMALL_MACHINE_CORES and "DIFFWORLD_TORCH_THREADS" not in os.environ:
        torch.set_num_threads(1)
    elif "DIFFWORLD_TORCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["DIFFWORLD_TORCH_THREADS"]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count.

    Args:
        n: Number of threads inside the block.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cuda_available_to_warp() -> bool:
    wp = init_warp()
    return wp.is_cuda_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device spec into a torch device that Warp can run on.

    Args:
        spec: ``"auto"`` (first CUDA device if Warp sees one, else CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``, or a ``torch.device``.

    Returns:
        The torch device.

    Raises:
        ValueError: If the spec is not understood or names a CUDA device that is not there.
    """
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda:0") if _cuda_available_to_warp() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {spec!r}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {spec!r}")
    wp = init_warp()
    index = dev.index or 0
    if not wp.is_cuda_available() or index >= wp.get_cuda_device_count():
        raise ValueError(
            f"device: {spec!r} requested but Warp sees {wp.get_cuda_device_count()} CUDA device(s); "
            "use 'cpu' or 'auto'"
        )
    return torch.device("cuda", index)


def warp_device(device: torch.device | str) -> str:
    """Warp's name for a torch device (``"cpu"`` or ``"cuda:N"``)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    return f"cuda:{dev.index or 0}"


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"float64"`` (or a torch dtype) into a torch dtype.

    Raises:
        ValueError: For anything but float32 or float64.
    """
    table = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64}
    try:
        return table[spec]
    except (KeyError, TypeError):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {spec!r}") from None


@dataclass(frozen=True)
class Runtime:
    """What a run executes on.

    Attributes:
        device: Torch device holding every public tensor.
        dtype: Floating-point dtype of geometry and state (float32 default, float64 for checks).
    """

    device: torch.device
    dtype: torch.dtype

    @property
    def warp_device(self) -> str:
        return warp_device(self.device)


def get_runtime(device: str | torch.device | None = "auto", dtype: str | torch.dtype = "float32") -> Runtime:
    """Build a :class:`Runtime`, initializing Warp if needed."""
    init_warp()
    return Runtime(device=resolve_device(device), dtype=resolve_dtype(dtype))
