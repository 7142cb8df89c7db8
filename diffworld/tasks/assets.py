"""Asset files named by scenes: checked at validation by loading them, so that ``validate`` means
the run can read them (a corrupt mesh used to pass validation and fail the run)."""

from __future__ import annotations

from typing import Callable

__all__ = ["readable_asset"]


def readable_asset(kind: str) -> Callable[[str | None], str | None]:
    """An after-validator of a resolved file path: the file must load as ``kind`` (``mesh`` or
    ``points``).

    Use as ``_readable = field_validator("path")(readable_asset("mesh"))`` after the validator that
    resolves the path against the scene's folder.
    """

    def check(value: str | None) -> str | None:
        if value is None:
            return value
        from diffworld.geometry import io

        try:
            (io.load_mesh if kind == "mesh" else io.load_points)(value)
        except Exception as exc:  # noqa: BLE001 - any parser failure of a corrupt file is the same answer
            raise ValueError(f"cannot read the {kind} file {value} ({type(exc).__name__}: {str(exc)[:300]})") from None
        return value

    return check
