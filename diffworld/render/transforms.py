"""NeRF-style ``transforms.json`` camera files, read into and written from :class:`Views`.

The format (as instant-ngp and nerfstudio write it): a JSON object with ``frames``, a list of
``{"file_path": ..., "transform_matrix": 4 x 4 camera-to-world}`` in **OpenGL camera axes**
(x right, y up, the camera looking along -z), and the intrinsics either at the top level or per
frame: ``camera_angle_x`` [rad] (square pixels, centred principal point) or ``fl_x``, ``fl_y``
[pixels] with optional ``cx``, ``cy``; the image size ``w``, ``h`` (needed with
``camera_angle_x`` unless the caller gives it). :func:`read_transforms` converts to the OpenCV
axes of :class:`Views` (y and z flipped); :func:`write_transforms` converts back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from diffworld.render.camera import Views

__all__ = ["read_transforms", "write_transforms"]

# OpenGL camera axes -> OpenCV camera axes: flip y and z
_FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def read_transforms(path: str | Path, width: Optional[int] = None, height: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Views, list[str]]:
    """Read a ``transforms.json``.

    Args:
        path: The file.
        width, height: The image size when the file does not give ``w``/``h`` (e.g. read off the
            images); a size in the file must agree.

    Returns:
        (the views, each frame's image path resolved against the file's folder).

    Raises:
        ValueError: Unreadable JSON, a missing or malformed field (the frame and key named),
            frames of different image sizes.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise ValueError(f"{p}: expected an object with a non-empty 'frames' list")
    c2w, fx, fy, cx, cy, files = [], [], [], [], [], []
    size = None
    for i, fr in enumerate(data["frames"]):
        where = f"{p}: frames[{i}]"
        if not isinstance(fr, dict):
            raise ValueError(f"{where}: expected an object, got {type(fr).__name__}")
        get = lambda k: fr.get(k, data.get(k))  # noqa: E731 - per frame, else the file's
        if "file_path" not in fr or not isinstance(fr["file_path"], str):
            raise ValueError(f"{where}.file_path: missing (the image of this frame)")
        m = fr.get("transform_matrix")
        try:
            M = torch.tensor(m, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{where}.transform_matrix: expected a 4 x 4 list of numbers, got {m!r}"[:300]) from None
        if tuple(M.shape) != (4, 4) or not bool(torch.isfinite(M).all()):
            raise ValueError(f"{where}.transform_matrix: expected a finite 4 x 4 matrix, got shape {tuple(M.shape)}")
        w = get("w") if get("w") is not None else width
        h = get("h") if get("h") is not None else height
        if w is None or h is None:
            raise ValueError(f"{where}: no image size (give 'w' and 'h' in the file, or width/height)")
        w, h = int(_number(f"{where}.w", w)), int(_number(f"{where}.h", h))
        if (width is not None and w != width) or (height is not None and h != height):
            raise ValueError(f"{where}: the file says {w} x {h} pixels, the images are "
                             f"{width if width is not None else w} x {height if height is not None else h}")
        if size is not None and (w, h) != size:
            raise ValueError(f"{where}: image size {w} x {h} differs from frame 0's {size[0]} x {size[1]}")
        size = (w, h)
        if get("fl_x") is not None:
            f_x = _number(f"{where}.fl_x", get("fl_x"))
            f_y = _number(f"{where}.fl_y", get("fl_y")) if get("fl_y") is not None else f_x
        elif get("camera_angle_x") is not None:
            ax = _number(f"{where}.camera_angle_x", get("camera_angle_x"))
            if not 0 < ax < math.pi:
                raise ValueError(f"{where}.camera_angle_x: expected an angle in (0, pi) [rad], got {ax}")
            f_x = f_y = 0.5 * w / math.tan(0.5 * ax)
        else:
            raise ValueError(f"{where}: no intrinsics (expected 'camera_angle_x' or 'fl_x' in the frame or the file)")
        c2w.append(M @ _FLIP)
        fx.append(f_x)
        fy.append(f_y)
        cx.append(_number(f"{where}.cx", get("cx")) if get("cx") is not None else w / 2)
        cy.append(_number(f"{where}.cy", get("cy")) if get("cy") is not None else h / 2)
        files.append(str(p.parent / fr["file_path"]))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    try:
        views = Views(torch.stack(c2w), t(fx), t(fy), t(cx), t(cy), size[0], size[1])
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
    return views.to(dtype=dtype), files


def write_transforms(views: Views, path: str | Path, files: list[str]) -> Path:
    """Write ``views`` (and each view's image path, relative to the file) as a ``transforms.json``
    with per-frame ``fl_x``, ``fl_y``, ``cx``, ``cy`` and the image size."""
    from diffworld.engine.files import atomic_write

    if len(files) != len(views):
        raise ValueError(f"write_transforms: files: expected {len(views)} paths (one per view), got {len(files)}")
    frames = []
    for k in range(len(views)):
        M = views.cam_to_world[k].detach().to(torch.float64).cpu() @ _FLIP
        frames.append({"file_path": files[k], "transform_matrix": M.tolist(), "fl_x": float(views.fx[k]),
                       "fl_y": float(views.fy[k]), "cx": float(views.cx[k]), "cy": float(views.cy[k])})
    text = json.dumps({"w": views.width, "h": views.height, "frames": frames}, indent=1)
    p = Path(path)
    atomic_write(p, lambda f: f.write(text.encode()))
    return p
