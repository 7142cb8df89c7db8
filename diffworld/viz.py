"""Off-screen rendering of meshes and point clouds to PNG, GIF and MP4 files.

Two backends draw the same scene with the same camera, so pictures from either line up:

* ``"pyvista"`` (VTK, smooth Phong shading from angle-weighted vertex normals, 2x supersampling). It
  needs an OpenGL implementation on the machine. The PyPI ``vtk`` wheel bundles none: without a
  display it loads the system's EGL (``libEGL.so.1`` + Mesa, e.g. Debian/Ubuntu ``libegl1
  libegl-mesa0 libgl1-mesa-dri``) or OSMesa (``libosmesa6``). Where neither is installed, VTK does
  not raise a Python error, it *crashes the process* when the first window is rendered.
* ``"matplotlib"`` (pure Python + Agg, always available): the scene is projected with the same
  perspective camera, faces are depth-sorted (painter's algorithm) and drawn as one 2D
  ``PolyCollection`` with Lambert + Blinn shading from per-vertex normals (averaged per face).
  Good for previews and CI; intersecting or interpenetrating transparent surfaces can show
  painter's-order artifacts.

``backend="auto"`` (the default, overridable with the environment variable
``DIFFWORLD_RENDER_BACKEND=pyvista|matplotlib``) chooses pyvista only after a *probe*: a tiny
scene is rendered in a child process once per process, trying the default window, then
``vtkEGLRenderWindow``, then ``vtkOSMesaRenderWindow``. When a headless window class works it is
exported as ``VTK_DEFAULT_OPENGL_WINDOW`` (unless already set) so VTK goes straight to it. If the
probe fails, or pyvista raises while rendering, the matplotlib backend is used and one
``RuntimeWarning`` says why.

Conventions: z is up; ``camera="iso"`` looks from (+1, +1, +1); a camera tuple is
``(azimuth, elevation)`` in degrees (azimuth from +x towards +y in the xy-plane, elevation above
it). The camera frames the bounding sphere of everything drawn (the union of all panels), with a
30 degree vertical field of view, so panels of one picture and frames of one turntable share scale.
Inputs are torch tensors (any device; detached) or numpy arrays. Every function returns the path
it wrote.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from diffworld.render.camera import Camera, orbit_camera

__all__ = [
    "render_backend",
    "render_mesh",
    "render_particles",
    "render_points",
    "render_side_by_side",
    "render_turntable",
]

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences

MESH_COLOR = (0.70, 0.77, 0.87)  # light gray-blue
TARGET_COLOR = (0.93, 0.50, 0.22)  # orange, drawn semi-transparent
POINT_COLOR = (0.17, 0.36, 0.64)
BACKGROUND = (1.0, 1.0, 1.0)
CAMERAS = {
    "iso": (45.0, math.degrees(math.atan(1.0 / math.sqrt(2.0)))),
    "front": (-90.0, 0.0),  # from -y
    "side": (0.0, 0.0),  # from +x
    "top": (-90.0, 90.0),  # from +z, +y up on screen
}
FOV_DEG = 30.0  # vertical field of view
FRAME_MARGIN = 1.06  # bounding sphere radius -> framed radius
TITLE_ROOM = 1.12  # extra margin when a title is drawn
TITLE_TOP_PAD = 0.015  # gap above a title, fraction of the image height
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MOVIE_SUFFIXES = (".gif", ".mp4")
BACKENDS = ("auto", "pyvista", "matplotlib")
_MAX_WINDOW = 8192
SUPERSAMPLE = 2  # pyvista renders at this multiple of the window size, then box-filters down


def _title_px(height: int | float) -> float:
    """Title text height ('Hg' extent) [px] for an image ``height`` pixels tall."""
    return max(10.0, height / 26.0)


# Measured: "Hg" spans 1.25 px per matplotlib point at 100 dpi and 1.94 px per VTK font-size unit
# (vtkTextActor).
_MPL_PT_PER_PX = 1.0 / 1.25
_VTK_SIZE_PER_PX = 1.0 / 1.94


# --- input validation ---------------------------------------------------------------------------

def _to_numpy(name: str, x: Any) -> np.ndarray:
    """torch tensor / numpy array / sequence -> numpy array (detached, on the CPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of diffworld
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if x is None or isinstance(x, (str, bytes, dict)):
        raise TypeError(f"Expected '{name}' to be a torch.Tensor or numpy array, got {type(x).__name__}")
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Expected '{name}' to be a torch.Tensor or numpy array, got {type(x).__name__}") from exc


def _check_points(name: str, x: Any) -> np.ndarray:
    """Points (N, 3) from a tensor or array (any real dtype), checked like every diffworld input."""
    import torch

    from diffworld.engine.bridge import check_tensor

    arr = _to_numpy(name, x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"Expected '{name}' with a real numeric dtype, got {arr.dtype}")
    return check_tensor(name, torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)), shape=(None, 3)).numpy()


def _check_faces(name: str, faces: Any, n_vertices: int, vertices_name: str) -> np.ndarray:
    """Triangles (F, 3) from a tensor or array, checked like every diffworld input."""
    import torch

    from diffworld.engine.bridge import check_faces

    arr = _to_numpy(name, faces)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"Expected '{name}' with an integer dtype, got {arr.dtype}")
    return check_faces(name, torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)), n_vertices,
                       vertices_name).numpy()


def _is_mesh_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(hasattr(e, "shape") for e in x)


def _check_camera(camera: Any) -> tuple[float, float]:
    if isinstance(camera, str):
        if camera not in CAMERAS:
            raise ValueError(f"Unknown 'camera' {camera!r}: expected one of {sorted(CAMERAS)} "
                             "or (azimuth, elevation) in degrees")
        return CAMERAS[camera]
    try:
        az, el = (float(c) for c in camera)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected 'camera' as one of {sorted(CAMERAS)} or (azimuth, elevation) in degrees, got {camera!r}"
        ) from None
    if not (math.isfinite(az) and math.isfinite(el)) or abs(el) > 90.0:
        raise ValueError(f"Expected 'camera' (azimuth, elevation) finite with |elevation| <= 90 degrees, "
                         f"got {camera!r}")
    return az, el


def _check_window(window_size: Any, name: str = "window_size") -> tuple[int, int]:
    try:
        w, h = window_size
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (w, h))
    except (TypeError, ValueError):
        ok = False
    if not ok or not (16 <= w <= _MAX_WINDOW and 16 <= h <= _MAX_WINDOW):
        raise ValueError(f"Expected '{name}' as (width, height) integers in [16, {_MAX_WINDOW}] pixels, "
                         f"got {window_size!r}")
    return int(w), int(h)


def _check_color(color: Any, name: str = "color") -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    try:
        return tuple(float(c) for c in to_rgb(color))
    except (TypeError, ValueError):
        raise ValueError(f"Expected '{name}' as a color name, hex string or RGB tuple in [0, 1], "
                         f"got {color!r}") from None


def _check_positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected '{name}' to be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"Expected '{name}' to be a positive number, got {value!r}")
    return v


def _check_opacity(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"Expected '{name}' in (0, 1], got {value!r}")
    return v


def _check_path(path: Any, suffixes: Sequence[str]) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected 'path' to be a str or os.PathLike, got {type(path).__name__}")
    p = pathlib.Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"Expected 'path' ending in one of {list(suffixes)}, got {str(p)!r}")
    return p


def _check_title(title: Any, name: str) -> str | None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"Expected '{name}' to be a str or None, got {type(title).__name__}")
    return title


# --- scene description --------------------------------------------------------------------------

@dataclass
class _Layer:
    """One drawable: a triangle mesh (faces given) or a point cloud (faces None)."""

    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray | None  # (F, 3) int64
    color: tuple[float, float, float]
    opacity: float = 1.0
    point_rgb: np.ndarray | None = None  # (N, 3) float in [0, 1], per-point colors (per-vertex for meshes)
    point_size: float = 5.0

    @property
    def empty(self) -> bool:
        return self.vertices.shape[0] == 0 or (self.faces is not None and self.faces.shape[0] == 0)


@dataclass
class _View:
    layers: list[_Layer] = field(default_factory=list)
    title: str | None = None


def _mesh_layer(name: str, mesh: Any, color, opacity: float = 1.0) -> _Layer:
    v = _check_points(f"{name}[0]", mesh[0])
    f = _check_faces(f"{name}[1]", mesh[1], v.shape[0], f"{name}[0]")
    return _Layer(v, f, color, opacity)


def _surface_layer(name: str, surface: Any, opacity: float) -> _Layer:
    """A ``(vertices, faces, colors)`` triple: colors (3,) for the mesh or (V, 3) per vertex."""
    if not (isinstance(surface, (tuple, list)) and len(surface) == 3):
        raise ValueError(f"Expected '{name}' as (vertices, faces, colors), got {type(surface).__name__}")
    v = _check_points(f"{name}[0]", surface[0])
    f = _check_faces(f"{name}[1]", surface[1], v.shape[0], f"{name}[0]")
    c = _to_numpy(f"{name}[2]", surface[2]).astype(np.float64)
    if c.shape == (3,):
        return _Layer(v, f, _check_color(tuple(c), f"{name}[2]"), opacity)
    if c.shape != (v.shape[0], 3) or not (np.isfinite(c).all() and (c.size == 0 or (c.min() >= 0 and c.max() <= 1))):
        raise ValueError(f"Expected '{name}[2]' of shape (3,) or ({v.shape[0]}, 3) with values in [0, 1], "
                         f"got shape {tuple(c.shape)}")
    return _Layer(v, f, MESH_COLOR, opacity, point_rgb=c)


def _geometry_layer(name: str, geometry: Any, mesh_color, point_color, opacity: float, point_size: float) -> _Layer:
    """A (vertices, faces) pair or an (N, 3) point array."""
    if _is_mesh_pair(geometry):
        return _mesh_layer(name, geometry, mesh_color, opacity)
    return _Layer(_check_points(name, geometry), None, point_color, opacity, point_size=point_size)


def _point_colors(colors: Any, n: int, cmap: str) -> np.ndarray | None:
    if colors is None:
        return None
    arr = _to_numpy("colors", colors)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"Expected 'colors' with a numeric dtype, got {arr.dtype}")
    if arr.shape == (n,):
        import matplotlib

        s = arr.astype(np.float64)
        if not np.isfinite(s).all():
            raise ValueError("'colors' contains non-finite scalar values")
        lo, hi = (float(s.min()), float(s.max())) if n else (0.0, 1.0)
        t = (s - lo) / (hi - lo) if hi > lo else np.full_like(s, 0.5)
        try:
            cm = matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"Unknown 'cmap' {cmap!r}: expected a matplotlib colormap name") from None
        return cm(t)[:, :3]
    if arr.shape == (n, 3):
        rgb = arr.astype(np.float64) / (255.0 if arr.dtype.kind in "iu" and arr.dtype != np.bool_ else 1.0)
        if n and not (np.isfinite(rgb).all() and rgb.min() >= 0.0 and rgb.max() <= 1.0):
            raise ValueError("Expected 'colors' RGB values in [0, 1] (float) or [0, 255] (integer)")
        return rgb
    raise ValueError(f"Expected 'colors' of shape ({n},) (scalars) or ({n}, 3) (RGB) for {n} points, "
                     f"got {tuple(arr.shape)}")


def _frame(views: Sequence[_View]) -> tuple[np.ndarray, float]:
    """Framing sphere of everything drawn: centered on the union bounds, reaching the farthest vertex.

    View-independent, so panels and turntable frames share one scale.
    """
    arrays = [l.vertices for v in views for l in v.layers if l.vertices.shape[0]]
    if not arrays:
        return np.zeros(3), 0.5
    lo = np.min([a.min(0) for a in arrays], axis=0)
    hi = np.max([a.max(0) for a in arrays], axis=0)
    center = 0.5 * (lo + hi)
    radius = max(float(np.sqrt(((a - center) ** 2).sum(1).max())) for a in arrays)
    return center, (radius if radius > 0 else max(1e-3, 1e-3 * float(np.abs(center).max())))


def _camera(center: np.ndarray, radius: float, azimuth: float, elevation: float, aspect: float,
            margin: float = FRAME_MARGIN) -> Camera:
    """Perspective camera at (azimuth, elevation) framing the sphere (center, radius) in a viewport w/h=aspect."""
    return orbit_camera(center, radius, azimuth, elevation, aspect, margin, FOV_DEG)


# --- backend selection --------------------------------------------------------------------------

_PROBE_SCRIPT = r"""
import sys
import numpy as np
import pyvista as pv
pl = pv.Plotter(off_screen=True, window_size=(64, 48))
pl.add_mesh(pv.Sphere(), color="red")
img = pl.screenshot(return_img=True)
name = type(pl.ren_win).__name__
pl.close()
ok = img is not None and tuple(img.shape[:2]) == (48, 64) and float(np.asarray(img).std()) > 1.0
print("DIFFWORLD_RENDER_PROBE", name, ok)
sys.exit(0 if ok else 3)
"""

_PROBE_LOCK = threading.Lock()
_PROBE: dict[str, Any] = {}  # {"ok": bool, "reason": str, "window": str | None}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str, stacklevel: int) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _probe_pyvista() -> dict[str, Any]:
    """Render a tiny scene in child processes (VTK may crash without OpenGL); cached per process."""
    with _PROBE_LOCK:
        if _PROBE:
            return _PROBE
        if importlib.util.find_spec("pyvista") is None or importlib.util.find_spec("vtkmodules") is None:
            _PROBE.update(ok=False, reason="pyvista/vtk is not installed", window=None)
            return _PROBE
        user_choice = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
        if user_choice:
            candidates = [user_choice]
        elif sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            candidates = ["vtkEGLRenderWindow", "vtkOSMesaRenderWindow"]
        else:
            candidates = [None, "vtkEGLRenderWindow", "vtkOSMesaRenderWindow"]
        reasons: list[str] = []
        last_message = ""
        for cand in candidates:
            env = dict(os.environ)
            if cand:
                env["VTK_DEFAULT_OPENGL_WINDOW"] = cand
            label = cand or "default window"
            try:
                res = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], env=env, capture_output=True,
                                     text=True, timeout=180)
            except (OSError, subprocess.TimeoutExpired) as exc:
                reasons.append(f"{label}: {type(exc).__name__}")
                continue
            if res.returncode == 0:
                _PROBE.update(ok=True, reason="", window=cand)
                if cand and not user_choice:
                    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = cand
                return _PROBE
            why = f"crashed with signal {-res.returncode}" if res.returncode < 0 else f"exit code {res.returncode}"
            reasons.append(f"{label} {why}")
            last = [_strip_ansi(ln) for ln in (res.stderr or "").splitlines() if ln.strip()]
            last_message = last[-1][-200:] if last else last_message
        if last_message:
            reasons.append(f"last message: {last_message}")
        _PROBE.update(ok=False, reason="; ".join(reasons), window=None)
        return _PROBE


def _strip_ansi(s: str) -> str:
    import re

    s = re.sub(r"\x1b\[[0-9;]*m", "", s).strip()
    return s.split("| ", 1)[-1].strip() if "WARN|" in s or "ERR|" in s else s


def render_backend(backend: str = "auto") -> str:
    """The backend a render call with ``backend`` would use on this machine.

    Args:
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"``. ``"auto"`` honours
            ``$DIFFWORLD_RENDER_BACKEND`` and otherwise probes pyvista off-screen rendering once
            per process (in a child process, a second or two).

    Returns:
        ``"pyvista"`` or ``"matplotlib"``.

    Raises:
        ValueError: Unknown ``backend`` (or ``$DIFFWORLD_RENDER_BACKEND``).
        RuntimeError: ``backend="pyvista"`` was asked for but cannot render here.
    """
    return _resolve_backend(backend, stacklevel=3)


def _resolve_backend(backend: str, stacklevel: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown 'backend' {backend!r}: expected one of {list(BACKENDS)}")
    explicit = backend != "auto"
    if backend == "auto":
        env = os.environ.get("DIFFWORLD_RENDER_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"Unknown DIFFWORLD_RENDER_BACKEND={env!r}: expected one of {list(BACKENDS)}")
        backend, explicit = env, env != "auto"
    if backend == "matplotlib":
        return "matplotlib"
    probe = _probe_pyvista()
    if probe["ok"]:
        return "pyvista"
    if explicit:
        raise RuntimeError("pyvista off-screen rendering is not available on this machine: "
                           f"{probe['reason'].rstrip('.')}. "
                           "Install an OpenGL implementation (EGL or OSMesa) or use backend='matplotlib'.")
    _warn_once("probe", "pyvista off-screen rendering is not available on this machine "
                        f"({probe['reason']}); rendering with the matplotlib fallback", stacklevel)
    return "matplotlib"


def _render(views: list[_View], window: tuple[int, int], azimuth: float, elevation: float,
            frame_azimuths: Sequence[float], backend: str,
            framing: tuple[np.ndarray, float] | None = None) -> list[np.ndarray]:
    """Render every frame (azimuth offsets) of the views side by side -> list of (H, W, 3) uint8.

    ``framing`` (centre, radius) fixes the camera (an animation keeps one framing for all frames).
    """
    chosen = _resolve_backend(backend, stacklevel=4)
    center, radius = framing if framing is not None else _frame(views)
    aspect = (window[0] / len(views)) / window[1]
    margin = FRAME_MARGIN * (TITLE_ROOM if any(v.title for v in views) else 1.0)
    cams = [_camera(center, radius, azimuth + d, elevation, aspect, margin) for d in frame_azimuths]
    if chosen == "pyvista":
        try:
            return _render_pyvista(views, window, cams)
        except Exception as exc:  # noqa: BLE001 - any VTK/pyvista failure falls back
            if backend == "pyvista" or os.environ.get("DIFFWORLD_RENDER_BACKEND", "").lower() == "pyvista":
                raise
            _warn_once(f"pv-{type(exc).__name__}", f"pyvista rendering failed ({type(exc).__name__}: {exc}); "
                                                   "rendering with the matplotlib fallback", 3)
    return _render_matplotlib(views, window, cams)


def _fix_size(img: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Crop/pad (with white) to exactly (H, W, 3) uint8."""
    w, h = window
    img = np.ascontiguousarray(np.asarray(img)[..., :3]).astype(np.uint8)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    hh, ww = min(h, img.shape[0]), min(w, img.shape[1])
    out[:hh, :ww] = img[:hh, :ww]
    return out


# --- pyvista backend ----------------------------------------------------------------------------

def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Angle-weighted vertex normals, unit length (zero where undefined).

    Angle weights are the most accurate of the usual choices on marching-cubes meshes, whose
    sliver triangles skew area-weighted normals (median error on a 48^3 torus: 0.9 vs 2.3 deg).
    """
    n = np.zeros_like(v)
    if len(f) == 0:
        return n
    edge = [v[f[:, (k + 1) % 3]] - v[f[:, k]] for k in range(3)]  # edge k leaves corner k
    fn = np.cross(edge[0], -edge[2])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-300)
    length = [np.linalg.norm(e, axis=1) for e in edge]
    for k in range(3):
        a, b = edge[k], -edge[(k + 2) % 3]
        cos = (a * b).sum(1) / np.maximum(length[k] * length[(k + 2) % 3], 1e-300)
        w = np.arccos(np.clip(cos, -1.0, 1.0))
        for c in range(3):
            n[:, c] += np.bincount(f[:, k], weights=w * fn[:, c], minlength=len(v))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)


def _render_pyvista(views: list[_View], window: tuple[int, int], cams: list[Camera]) -> list[np.ndarray]:
    import pyvista as pv

    w, h = window
    # Own supersampling: VTK's SSAA pass shrinks points (sized in pixels) and MSAA drops them here.
    k = SUPERSAMPLE if max(w, h) * SUPERSAMPLE <= _MAX_WINDOW else 1
    pl = pv.Plotter(off_screen=True, window_size=[k * w, k * h], shape=(1, len(views)), border=False)
    try:
        for i, view in enumerate(views):
            pl.subplot(0, i)
            pl.set_background(BACKGROUND)
            for layer in view.layers:
                if layer.empty:
                    continue
                if layer.faces is not None:
                    f = layer.faces
                    poly = pv.PolyData(layer.vertices, np.column_stack([np.full(len(f), 3, np.int64), f]).ravel())
                    poly.point_data["Normals"] = _vertex_normals(layer.vertices, f)
                    poly.point_data.active_normals_name = "Normals"
                    paint: dict[str, Any] = dict(color=layer.color)
                    if layer.point_rgb is not None:
                        paint = dict(scalars=np.round(layer.point_rgb * 255).astype(np.uint8), rgb=True)
                    actor = pl.add_mesh(poly, opacity=layer.opacity, smooth_shading=False,
                                        ambient=0.12, diffuse=0.85, specular=0.25, specular_power=30.0,
                                        show_scalar_bar=False, reset_camera=False, **paint)
                    actor.prop.interpolation = "phong"
                    actor.prop.backface_culling = False
                else:
                    kwargs: dict[str, Any] = dict(point_size=k * layer.point_size, render_points_as_spheres=True,
                                                  opacity=layer.opacity, show_scalar_bar=False, reset_camera=False,
                                                  ambient=0.2, diffuse=0.8, specular=0.2)
                    if layer.point_rgb is not None:
                        kwargs.update(scalars=np.round(layer.point_rgb * 255).astype(np.uint8), rgb=True)
                    else:
                        kwargs.update(color=layer.color)
                    pl.add_points(layer.vertices, **kwargs)
            if view.title:
                text = pl.add_text(view.title, position=(k * w / len(views) / 2, k * h * (1 - TITLE_TOP_PAD)),
                                   font_size=max(4, int(round(k * _title_px(h) * _VTK_SIZE_PER_PX))), color="black")
                text.GetTextProperty().SetJustificationToCentered()
                text.GetTextProperty().SetVerticalJustificationToTop()
        # No depth peeling: with Mesa's EGL (llvmpipe) it drops every translucent actor; VTK's
        # default order-independent blending is right for these scenes.
        frames = []
        for cam in cams:
            for i in range(len(views)):
                pl.subplot(0, i)
                pl.camera.position = tuple(cam.eye)
                pl.camera.focal_point = tuple(cam.center)
                pl.camera.up = tuple(cam.up)
                pl.camera.view_angle = FOV_DEG
                pl.renderer.reset_camera_clipping_range()
            img = pl.screenshot(return_img=True, window_size=[k * w, k * h])
            if img is None or np.asarray(img).shape[:2] != (k * h, k * w):
                raise RuntimeError(f"pyvista returned an image of shape {None if img is None else np.shape(img)}")
            img = np.asarray(img)[..., :3].astype(np.float32).reshape(h, k, w, k, 3).mean((1, 3))
            frames.append(_fix_size(np.round(img), window))
        return frames
    finally:
        pl.close()


# --- matplotlib backend -------------------------------------------------------------------------

_OCTAGON = np.stack([np.cos(np.arange(8) * np.pi / 4 + np.pi / 8), np.sin(np.arange(8) * np.pi / 4 + np.pi / 8)], -1)


def _shade(normals: np.ndarray, to_eye: np.ndarray, cam: Camera, base: np.ndarray) -> np.ndarray:
    """Two-sided Lambert + Blinn-Phong from a key and a fill light fixed to the camera -> RGB."""
    n = normals * np.where((normals * to_eye).sum(-1, keepdims=True) < 0, -1.0, 1.0)
    view = -cam.forward
    key = view + 0.45 * cam.up - 0.35 * cam.right
    key /= np.linalg.norm(key)
    fill = view - 0.4 * cam.up + 0.6 * cam.right
    fill /= np.linalg.norm(fill)
    half = key + view
    half /= np.linalg.norm(half)
    diffuse = 0.68 * np.clip(n @ key, 0, None) + 0.2 * np.clip(n @ fill, 0, None)
    spec = 0.15 * np.clip(n @ half, 0, None) ** 32
    base = base[None] if base.ndim == 1 else base  # one color, or one per vertex
    return np.clip(base * (0.2 + diffuse)[:, None] + spec[:, None], 0.0, 1.0)


def _project(cam: Camera, x: np.ndarray, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """World points -> viewport pixels (x right, y up) and camera depth."""
    rel = x - cam.eye
    depth = rel @ cam.forward
    focal = (height / 2) / math.tan(math.radians(FOV_DEG) / 2)
    safe = np.maximum(depth, 1e-9)
    px = width / 2 + focal * (rel @ cam.right) / safe
    py = height / 2 + focal * (rel @ cam.up) / safe
    return np.stack([px, py], -1), depth


def _draw_view_matplotlib(ax, view: _View, cam: Camera, width: float, height: float, dpi: float) -> None:
    from matplotlib.collections import PolyCollection

    polys, depths, rgba, lws = [], [], [], []
    n_corners = 8 if any(l.faces is None and not l.empty for l in view.layers) else 3
    for layer in view.layers:
        if layer.empty:
            continue
        xy, depth = _project(cam, layer.vertices, width, height)
        if layer.faces is not None:
            f = layer.faces
            to_eye = cam.eye[None] - layer.vertices
            to_eye /= np.maximum(np.linalg.norm(to_eye, axis=1, keepdims=True), 1e-12)
            base = layer.point_rgb if layer.point_rgb is not None else np.asarray(layer.color)
            vcol = _shade(_vertex_normals(layer.vertices, f), to_eye, cam, base)
            tri = xy[f]  # (F, 3, 2)
            if n_corners > 3:
                tri = np.concatenate([tri, np.repeat(tri[:, 2:3], n_corners - 3, axis=1)], axis=1)
            polys.append(tri)
            depths.append(depth[f].mean(1))
            rgba.append(np.concatenate([vcol[f].mean(1), np.full((len(f), 1), layer.opacity)], 1))
            # Opaque faces get a hairline edge in their own color to close anti-aliasing cracks.
            lws.append(np.full(len(f), 0.6 * 72.0 / dpi if layer.opacity >= 1.0 else 0.0))
        else:
            radius = layer.point_size / 2
            polys.append(xy[:, None, :] + radius * _OCTAGON[None])
            depths.append(depth)
            base = layer.point_rgb if layer.point_rgb is not None else np.tile(layer.color, (len(xy), 1))
            rgba.append(np.concatenate([base, np.full((len(xy), 1), layer.opacity)], 1))
            lws.append(np.full(len(xy), 0.0))
    if polys:
        order = np.argsort(-np.concatenate(depths), kind="stable")  # far to near
        faces_rgba = np.concatenate(rgba)[order]
        coll = PolyCollection(np.concatenate(polys)[order], facecolors=faces_rgba, edgecolors=faces_rgba,
                              linewidths=np.concatenate(lws)[order], antialiaseds=True)
        ax.add_collection(coll)
    if view.title:
        ax.text(0.5, 1 - TITLE_TOP_PAD, view.title, transform=ax.transAxes, ha="center", va="top",
                fontsize=_title_px(height) * _MPL_PT_PER_PX * 100.0 / dpi, color="black")


def _render_matplotlib(views: list[_View], window: tuple[int, int], cams: list[Camera]) -> list[np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = window
    dpi = 100.0
    frames = []
    n = len(views)
    for cam in cams:
        fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor=BACKGROUND)
        canvas = FigureCanvasAgg(fig)
        for i, view in enumerate(views):
            ax = fig.add_axes((i / n, 0.0, 1.0 / n, 1.0))
            ax.set_xlim(0, w / n)
            ax.set_ylim(0, h)
            ax.set_axis_off()
            ax.set_facecolor(BACKGROUND)
            _draw_view_matplotlib(ax, view, cam, w / n, h, dpi)
        canvas.draw()
        frames.append(_fix_size(np.asarray(canvas.buffer_rgba()), window))
    return frames


# --- writing ------------------------------------------------------------------------------------

def _write_image(path: pathlib.Path, img: np.ndarray) -> pathlib.Path:
    import imageio.v3 as iio

    from diffworld.engine.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # whole or not at all
        iio.imwrite(tmp, img)
    return path


def _write_movie(path: pathlib.Path, frames: list[np.ndarray], fps: float) -> pathlib.Path:
    import imageio.v3 as iio

    from diffworld.engine.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        import imageio.v2 as iio2

        # yuv420p needs even sizes: pad with one white row/column where needed.
        h, w = frames[0].shape[:2]
        padded = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255) for f in frames]
        with atomic_path(path) as tmp, iio2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                                       quality=8, macro_block_size=1, pixelformat="yuv420p") as writer:
            for frame in padded:
                writer.append_data(frame)
        return path
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


# --- public API ---------------------------------------------------------------------------------

def render_mesh(path: PathLike, vertices: ArrayLike, faces: ArrayLike, *, target: Any = None,
                color: Any = MESH_COLOR, target_color: Any = TARGET_COLOR, target_opacity: float = 0.35,
                window_size: tuple[int, int] = (800, 600), camera: str | tuple[float, float] = "iso",
                title: str | None = None, point_size: float = 5.0, backend: str = "auto") -> pathlib.Path:
    """Render a triangle mesh, optionally with a semi-transparent target overlaid, to an image.

    Args:
        path: Output file, ``.png`` (or ``.jpg``); parent folders are created.
        vertices: [m], shape (V, 3), torch tensor or numpy array.
        faces: Integer vertex indices, shape (F, 3), values in [0, V).
        target: Overlay drawn with ``target_color`` at ``target_opacity``: a ``(vertices, faces)``
            pair (a mesh) or points of shape (N, 3). ``None`` draws nothing.
        color: Mesh color (name, hex or RGB in [0, 1]); light gray-blue by default.
        target_color: Overlay color.
        target_opacity: Overlay opacity in (0, 1].
        window_size: Image size (width, height) [px].
        camera: ``"iso"``, ``"front"``, ``"side"``, ``"top"`` or (azimuth, elevation) [deg].
        title: Text drawn at the top center.
        point_size: Diameter of target points [px].
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"`` (see the module docstring).

    Returns:
        The path written.

    Raises:
        ValueError: Bad shapes, face indices out of range, unknown camera, bad sizes or colors.
        TypeError: Inputs that are not arrays/tensors, or faces that are not integers.
    """
    out = _check_path(path, IMAGE_SUFFIXES)
    layers = [_mesh_layer_named(vertices, faces, _check_color(color))]
    if target is not None:
        layers.append(_geometry_layer("target", target, _check_color(target_color, "target_color"),
                                      _check_color(target_color, "target_color"),
                                      _check_opacity(target_opacity, "target_opacity"),
                                      _check_positive("point_size", point_size)))
    window = _check_window(window_size)
    az, el = _check_camera(camera)
    view = _View(layers, _check_title(title, "title"))
    return _write_image(out, _render([view], window, az, el, [0.0], backend)[0])


def _mesh_layer_named(vertices: ArrayLike, faces: ArrayLike, color) -> _Layer:
    v = _check_points("vertices", vertices)
    return _Layer(v, _check_faces("faces", faces, v.shape[0], "vertices"), color)


def render_side_by_side(path: PathLike, left: tuple[ArrayLike, ArrayLike], right: Any, *,
                        titles: tuple[str | None, str | None] = ("result", "target"), color: Any = MESH_COLOR,
                        point_color: Any = POINT_COLOR, window_size: tuple[int, int] = (1200, 600),
                        camera: str | tuple[float, float] = "iso", point_size: float = 5.0,
                        backend: str = "auto") -> pathlib.Path:
    """Render two panels side by side with one shared camera and scale (e.g. result vs target).

    Args:
        path: Output file, ``.png`` (or ``.jpg``).
        left: ``(vertices (V, 3), faces (F, 3))`` of the left panel.
        right: ``(vertices, faces)`` or points of shape (N, 3) for the right panel.
        titles: Panel titles (either may be ``None``).
        color: Mesh color of both panels.
        point_color: Color of points in the right panel.
        window_size: Size of the whole image (width, height) [px]; each panel gets half the width.
        camera: ``"iso"``, ``"front"``, ``"side"``, ``"top"`` or (azimuth, elevation) [deg].
        point_size: Point diameter [px].
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"``.

    Returns:
        The path written.

    Raises:
        ValueError: Bad shapes, face indices out of range, unknown camera, bad sizes or titles.
    """
    out = _check_path(path, IMAGE_SUFFIXES)
    if not _is_mesh_pair(left):
        raise ValueError("Expected 'left' as a (vertices (V, 3), faces (F, 3)) pair of tensors/arrays, "
                         f"got {type(left).__name__}")
    mesh_color = _check_color(color)
    left_layer = _mesh_layer("left", left, mesh_color)
    right_layer = _geometry_layer("right", right, mesh_color, _check_color(point_color, "point_color"), 1.0,
                                  _check_positive("point_size", point_size))
    if not isinstance(titles, (tuple, list)) or len(titles) != 2:
        raise ValueError(f"Expected 'titles' as a pair (left, right) of str or None, got {titles!r}")
    views = [_View([left_layer], _check_title(titles[0], "titles[0]")),
             _View([right_layer], _check_title(titles[1], "titles[1]"))]
    window = _check_window(window_size)
    az, el = _check_camera(camera)
    return _write_image(out, _render(views, window, az, el, [0.0], backend)[0])


def render_points(path: PathLike, points: ArrayLike, colors: ArrayLike | None = None, *, point_size: float = 5.0,
                  color: Any = POINT_COLOR, cmap: str = "viridis", window_size: tuple[int, int] = (800, 600),
                  camera: str | tuple[float, float] = "iso", title: str | None = None,
                  backend: str = "auto") -> pathlib.Path:
    """Render a point cloud as shaded dots.

    Args:
        path: Output file, ``.png`` (or ``.jpg``).
        points: [m], shape (N, 3).
        colors: ``None`` (uniform ``color``), scalars of shape (N,) mapped through ``cmap``
            (min..max), or RGB of shape (N, 3) (floats in [0, 1] or integers in [0, 255]).
        point_size: Point diameter [px].
        color: Uniform point color when ``colors`` is ``None``.
        cmap: Matplotlib colormap name for scalar ``colors``.
        window_size: Image size (width, height) [px].
        camera: ``"iso"``, ``"front"``, ``"side"``, ``"top"`` or (azimuth, elevation) [deg].
        title: Text drawn at the top center.
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"``.

    Returns:
        The path written.

    Raises:
        ValueError: Bad shapes (points, colors), unknown camera or colormap, bad sizes.
    """
    out = _check_path(path, IMAGE_SUFFIXES)
    pts = _check_points("points", points)
    layer = _Layer(pts, None, _check_color(color), point_rgb=_point_colors(colors, pts.shape[0], cmap),
                   point_size=_check_positive("point_size", point_size))
    window = _check_window(window_size)
    az, el = _check_camera(camera)
    return _write_image(out, _render([_View([layer], _check_title(title, "title"))], window, az, el, [0.0],
                                     backend)[0])


def render_turntable(path: PathLike, vertices: ArrayLike, faces: ArrayLike, *, n_frames: int = 36, fps: float = 12,
                     color: Any = MESH_COLOR, window_size: tuple[int, int] = (640, 480),
                     camera: str | tuple[float, float] = "iso", title: str | None = None,
                     backend: str = "auto") -> pathlib.Path:
    """Render a full 360 degree turn of the camera around the mesh (about +z) as a GIF or MP4.

    MP4 (H.264, yuv420p) needs the ``imageio-ffmpeg`` package. Without it a ``.gif`` is written
    next to the requested path instead (same stem), a ``RuntimeWarning`` says so, and that path is
    returned. H.264 needs even frame sizes: an odd width or height gets one white pixel of padding.
    In a GIF, identical consecutive frames (a turntable of a shape symmetric about z) are merged by
    the encoder into one longer frame; playback timing is unchanged.

    Args:
        path: Output file, ``.gif`` or ``.mp4``.
        vertices: [m], shape (V, 3).
        faces: Integer vertex indices, shape (F, 3).
        n_frames: Number of frames (>= 1), evenly spaced over 360 degrees.
        fps: Frames per second.
        color: Mesh color.
        window_size: Frame size (width, height) [px].
        camera: Starting view: ``"iso"``, ``"front"``, ``"side"``, ``"top"`` or (azimuth,
            elevation) [deg]; the elevation stays fixed.
        title: Text drawn at the top center of every frame.
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"``.

    Returns:
        The path written (``.gif`` if ``.mp4`` was asked for but cannot be encoded).

    Raises:
        ValueError: Bad shapes, face indices out of range, unknown camera, bad n_frames or fps.
    """
    out = _check_path(path, MOVIE_SUFFIXES)
    layer = _mesh_layer_named(vertices, faces, _check_color(color))
    if not isinstance(n_frames, (int, np.integer)) or isinstance(n_frames, bool) or not 1 <= n_frames <= 3600:
        raise ValueError(f"Expected 'n_frames' as an integer in [1, 3600], got {n_frames!r}")
    fps = _check_positive("fps", fps)
    window = _check_window(window_size)
    az, el = _check_camera(camera)
    if out.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        gif = out.with_suffix(".gif")
        warnings.warn(f"MP4 needs the 'imageio-ffmpeg' package (pip install imageio-ffmpeg); writing {gif} instead",
                      RuntimeWarning, stacklevel=2)
        out = gif
    step = 360.0 / int(n_frames)
    frames = _render([_View([layer], _check_title(title, "title"))], window, az, el,
                     [i * step for i in range(int(n_frames))], backend)
    return _write_movie(out, frames, fps)


def render_particles(path: PathLike, frames: Sequence[tuple[ArrayLike, ArrayLike | None]], *,
                     meshes: Sequence[Sequence[tuple[ArrayLike, ArrayLike]]] | None = None,
                     surfaces: Sequence[Sequence[tuple[ArrayLike, ArrayLike, ArrayLike]]] | None = None,
                     surface_opacity: float = 0.85,
                     bounds: tuple[Sequence[float], Sequence[float]] | None = None, fps: float = 12,
                     point_size: float = 4.0, mesh_color: Any = MESH_COLOR, mesh_opacity: float = 0.45,
                     window_size: tuple[int, int] = (640, 480), camera: str | tuple[float, float] = "iso",
                     titles: Sequence[str | None] | None = None, backend: str = "auto") -> pathlib.Path:
    """Render particle frames (coloured points, plus meshes such as colliders) to a PNG or a movie.

    One camera frames every frame (the ``bounds`` box, else everything drawn), so motion reads
    as motion.

    Args:
        path: ``.png``/``.jpg`` (only the first frame), or ``.gif``/``.mp4`` (every frame).
        frames: Per frame ``(points (N, 3), colors)``; colors as in :func:`render_points`.
        meshes: Per frame a list of ``(vertices, faces)`` drawn semi-transparent (or None).
        surfaces: Per frame a list of ``(vertices, faces, colors)`` drawn in their own colors with
            ``surface_opacity`` (e.g. liquid surfaces; or None). ``colors``: one RGB for the
            mesh, shape (3,), or one per vertex, shape (V, 3); floats in [0, 1].
        surface_opacity: Opacity of the surfaces in (0, 1].
        bounds: Box (lower, upper) [m] that the camera frames.
        fps: Frames per second of a movie.
        point_size: Point diameter [px].
        mesh_color: Color of the meshes.
        mesh_opacity: Opacity of the meshes in (0, 1].
        window_size: Frame size (width, height) [px].
        camera: ``"iso"``, ``"front"``, ``"side"``, ``"top"`` or (azimuth, elevation) [deg].
        titles: Per-frame titles (or None).
        backend: ``"auto"``, ``"pyvista"`` or ``"matplotlib"``.

    Returns:
        The path written.

    Raises:
        ValueError: No frames, bad shapes, unknown camera, bad sizes.
    """
    movie = pathlib.Path(path).suffix.lower() in MOVIE_SUFFIXES
    out = _check_path(path, MOVIE_SUFFIXES if movie else IMAGE_SUFFIXES)
    if not frames:
        raise ValueError("Expected at least one frame in 'frames', got none")
    window = _check_window(window_size)
    az, el = _check_camera(camera)
    mcolor = _check_color(mesh_color, "mesh_color")
    opacity = _check_opacity(mesh_opacity, "mesh_opacity")
    size = _check_positive("point_size", point_size)
    s_opacity = _check_opacity(surface_opacity, "surface_opacity")
    for name, per_frame in (("meshes", meshes), ("surfaces", surfaces)):
        if per_frame is not None and len(per_frame) < (len(frames) if movie else 1):
            raise ValueError(f"Expected '{name}' with one list per frame ({len(frames)}), got {len(per_frame)}")
    views = []
    for i, (pts, colors) in enumerate(frames if movie else frames[:1]):
        p = _check_points(f"frames[{i}][0]", pts)
        layers = [_Layer(p, None, POINT_COLOR, point_rgb=_point_colors(colors, p.shape[0], "viridis"),
                         point_size=size)]
        for j, surf in enumerate((surfaces[i] if surfaces is not None else [])):
            layers.append(_surface_layer(f"surfaces[{i}][{j}]", surf, s_opacity))
        for j, mesh in enumerate((meshes[i] if meshes is not None else [])):
            layers.append(_mesh_layer(f"meshes[{i}][{j}]", mesh, mcolor, opacity))
        title = titles[i] if titles is not None else None
        views.append(_View(layers, _check_title(title, f"titles[{i}]")))
    if bounds is not None:
        lo, hi = np.asarray(bounds[0], dtype=np.float64), np.asarray(bounds[1], dtype=np.float64)
        framing = (0.5 * (lo + hi), float(np.linalg.norm(hi - lo)) / 2)
    else:
        framing = _frame(views)
    images = [_render([v], window, az, el, [0.0], backend, framing)[0] for v in views]
    if not movie:
        return _write_image(out, images[0])
    if out.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        out = out.with_suffix(".gif")
    return _write_movie(out, images, _check_positive("fps", fps))

