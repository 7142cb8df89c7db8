"""Runtime: device choice, dtype, lazy Warp initialization, kernel cache, torch threads.

Warp is initialized once, on first use, never at import: importing diffworld stays cheap and
never touches a GPU. Compiled kernels are kept in one cache, whatever starts diffworld (the
command line, ``make``, the tests, the benchmarks): :func:`kernel_cache_dir`, by default the user
cache folder ``~/.cache/diffworld/warp`` on Linux (``$DIFFWORLD_WARP_CACHE`` or
``$WARP_CACHE_PATH`` move it; CMake's ``ctest`` points it into the build tree, which a colcon
build keeps to itself); Warp keeps a sub-folder per Warp version inside.

On a machine without an NVIDIA driver, Warp's native library prints "Could not find or load the
NVIDIA CUDA driver" at start-up. That is the expected state of a CPU machine, so the message is
not shown; a CUDA device requested there is refused with it (:func:`resolve_device`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = [
    "Runtime",
    "cuda_unavailable_reason",
    "get_runtime",
    "init_warp",
    "kernel_cache_dir",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
    "warp_device",
]

_LOCK = threading.Lock()
_WARP_READY = False

# What Warp's native start-up prints (to file descriptor 2, from C) when there is no CUDA driver.
_NO_DRIVER = "Could not find or load the NVIDIA CUDA driver"
_cuda_note: str | None = None  # that message when it was printed, for the error of a CUDA request

# On small machines torch's intra-op pool fights Warp's CPU kernels (and itself): one torch
# thread was measured up to 90x faster under load on 2 cores.
SMALL_MACHINE_CORES = 4


def kernel_cache_dir() -> str:
    """The folder of diffworld's Warp kernel cache (Warp adds a sub-folder per Warp version).

    Returns:
        ``$DIFFWORLD_WARP_CACHE`` if set, else ``$WARP_CACHE_PATH`` if set, else diffworld's user
        cache folder plus ``warp`` (platformdirs: ``~/.cache/diffworld/warp`` on Linux, honouring
        ``$XDG_CACHE_HOME``; ``~/Library/Caches/diffworld/warp`` on macOS).
    """
    from platformdirs import user_cache_dir

    return (os.environ.get("DIFFWORLD_WARP_CACHE") or os.environ.get("WARP_CACHE_PATH")
            or os.path.join(user_cache_dir("diffworld", appauthor=False), "warp"))


def init_warp(cache_path: str | None = None, quiet: bool = True):
    """Initialize Warp once and return the module.

    Args:
        cache_path: Kernel cache folder. Defaults to :func:`kernel_cache_dir`.
        quiet: Silence Warp's start-up banner and per-module build messages.

    Returns:
        The imported ``warp`` module, initialized.
    """
    global _WARP_READY, _cuda_note
    import warp as wp

    if _WARP_READY:
        return wp
    with _LOCK:
        if _WARP_READY:
            return wp
        path = cache_path or kernel_cache_dir()
        os.makedirs(path, exist_ok=True)
        wp.config.kernel_cache_dir = path
        if quiet:
            wp.config.log_level = wp.LOG_WARNING
        with _native_stderr_without(_NO_DRIVER) as dropped:
            wp.init()
        _cuda_note = dropped[0] if dropped else None
        _configure_torch_threads()
        _WARP_READY = True
    return wp


@contextlib.contextmanager
def _native_stderr_without(text: str) -> Iterator[list[str]]:
    """Hide the lines containing ``text`` that the block writes to file descriptor 2.

    Native code writes to the descriptor, not to ``sys.stderr``, so the descriptor is pointed at a
    temporary file for the block; every other line is then written to ``sys.stderr``, in order
    (also when the block raises). Yields the list that receives the hidden lines. Where there is
    no descriptor 2 to redirect, nothing is hidden.
    """
    dropped: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield dropped
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield dropped
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if text in line:
                    dropped.append(line.strip())
                elif sys.stderr is not None:
                    sys.stderr.write(line)
            if sys.stderr is not None:
                sys.stderr.flush()


def cuda_unavailable_reason() -> str | None:
    """Why Warp has no CUDA device, when it said so at start-up (the CUDA driver could not be
    loaded); ``None`` otherwise (Warp initialized on first call)."""
    init_warp()
    return _cuda_note


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
        reason = " (Warp could not find or load the NVIDIA CUDA driver)" if _cuda_note else ""
        raise ValueError(
            f"device: {spec!r} requested but Warp sees {wp.get_cuda_device_count()} CUDA device(s){reason}; "
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
