"""Files written whole or not at all: a crash or Ctrl-C never leaves half a file behind.

Both helpers write next to the destination (same folder, so the final ``os.replace`` is atomic on
POSIX and Windows) and remove the temporary file on any error.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_path", "atomic_write"]


def _temporary(path: Path) -> Path:
    # keep the suffix: writers pick the format from it (imageio, trimesh)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` (binary) into a temporary file, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path (same folder and suffix) to write; it replaces ``path`` when the block ends
    without an error, and is removed otherwise."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
