"""Machine facts for the headers of the benchmark tables (shared by the scripts in this folder)."""

from __future__ import annotations

import pathlib
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows (often just the ISA)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warp_version() -> str:
    """Installed warp-lang version, ``?`` when it cannot be imported."""
    try:
        import warp

        return warp.config.version
    except Exception:  # noqa: BLE001 - a header must not fail on a broken install
        return "?"
