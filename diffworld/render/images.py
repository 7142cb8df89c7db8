"""Image targets and image losses for reconstruction: coverage masks, depth maps and normal maps
of calibrated views, rendered from a mesh or read from files.

:func:`render_views` renders a mesh into what a target holds: the antialiased coverage (its
gradient moves silhouettes), the depth and the world-space normals (gradients inside the
triangles). :func:`image_losses` compares the two: mask L1, depth L2 where both see the surface
(in units of ``depth_scale``), and ``1 - cos`` of the normals there.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from diffworld.render.antialias import antialias, edge_topology
from diffworld.render.camera import Views
from diffworld.render.raster import Fragments, face_normals, rasterize

__all__ = ["ImageTarget", "RenderedImages", "image_losses", "load_image_target", "render_views", "target_from_mesh"]


class ImageTarget(NamedTuple):
    """Images of the object in calibrated views.

    Attributes:
        views: The cameras (V views of H x W pixels).
        mask: Coverage in [0, 1] (V, H, W).
        depth: Camera-space z [m] (V, H, W), meaningful where ``mask > 0.5``; or None.
        normal: World-space unit normals (V, H, W, 3) where ``mask > 0.5``; or None.
    """

    views: Views
    mask: torch.Tensor
    depth: Optional[torch.Tensor] = None
    normal: Optional[torch.Tensor] = None


class RenderedImages(NamedTuple):
    """:func:`render_views` output: ``mask`` (V, H, W) antialiased coverage, ``depth`` (V, H, W)
    [m], ``normal`` (V, H, W, 3), and the fragments."""

    mask: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    fragments: Fragments


def render_views(vertices: torch.Tensor, faces: torch.Tensor, views: Views, topology=None) -> RenderedImages:
    """Render a mesh (vertices (N, 3) [m], faces (F, 3)) into ``views``; differentiable w.r.t.
    the vertices (silhouettes through the mask's antialiasing)."""
    fr = rasterize(vertices, faces, views)
    if faces.shape[0]:
        mask = antialias(fr.mask[..., None], fr, vertices, faces, views,
                         topology if topology is not None else edge_topology(faces))[..., 0]
    else:
        mask = fr.mask + vertices.sum() * 0.0  # nothing to see, but still on the graph
    return RenderedImages(mask, fr.depth, face_normals(vertices, faces, fr), fr)


def image_losses(rendered: RenderedImages, target: ImageTarget, depth_scale: float = 1.0,
                 two_sided: bool = False, depth_truncation: float | None = None) -> dict[str, torch.Tensor]:
    """Unweighted image terms: ``mask`` (mean |m - m*| over all pixels), and where the target has
    them, ``depth`` (mean ((z - z*) / depth_scale)^2) and ``normal`` (mean 1 - cos(n, n*)) over
    the pixels both the render and the target see.

    ``two_sided``: normals of an open surface have no outside; compare them up to sign
    (1 - |cos|), since a view may see either side of the sheet and the target's and the
    result's windings need not agree.

    ``depth_truncation`` (in units of ``depth_scale``): the depth term is the mean of
    ``min(r, t)^2``, so a pixel whose render and target see different layers (a rim one pixel
    off, the far wall behind it) adds a bounded constant and no gradient, instead of dominating
    the mean with a push along its ray."""
    terms = {"mask": (rendered.mask - target.mask.to(rendered.mask)).abs().mean()}
    both = (rendered.fragments.face >= 0) & (target.mask > 0.5)
    zero = rendered.depth.sum() * 0.0
    if target.depth is not None:
        d = (rendered.depth - target.depth.to(rendered.depth))[both] / depth_scale
        if depth_truncation is not None:
            d = d.abs().clamp_max(float(depth_truncation))
        terms["depth"] = (d ** 2).mean() if d.numel() else zero
    if target.normal is not None:
        cos = (rendered.normal * target.normal.to(rendered.normal)).sum(-1)[both]
        if two_sided:
            cos = cos.abs()
        terms["normal"] = (1.0 - cos).mean() if cos.numel() else zero
    return terms


def target_from_mesh(vertices: torch.Tensor, faces: torch.Tensor, views: Views) -> ImageTarget:
    """The synthetic target of a mesh: its antialiased mask, depth and normals in ``views``."""
    with torch.no_grad():
        r = render_views(vertices, faces, views)
        return ImageTarget(views, r.mask, r.depth, r.normal)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable image is the same answer
        raise ValueError(f"{path}: cannot read as an image ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_image_target(transforms: str | Path, dtype: torch.dtype = torch.float32) -> ImageTarget:
    """Read a target from a ``transforms.json`` (see :mod:`~diffworld.render.transforms`) and its
    images.

    Each frame's ``file_path`` image gives the mask: its alpha channel (RGBA), else the image
    itself (grey or RGB, > 50 % is inside). Optional per-frame ``depth_file_path`` (.npy, (H, W)
    camera-space z [m], 0 outside) and ``normal_file_path`` (.npy, (H, W, 3) world-space unit
    normals); either must be given for every frame or for none.

    Raises:
        ValueError: The camera file's errors; an unreadable image; images of another size or with
            an unexpected number of channels than the cameras say; NaN or infinite depth or
            normals; an object outside every view (the mask empty everywhere).
    """
    import json

    from diffworld.render.transforms import read_transforms

    tpath = Path(transforms)
    frames = json.loads(tpath.read_text())["frames"] if tpath.is_file() else None
    first = _read_image(tpath.parent / frames[0]["file_path"]) if frames else None
    if first is None:
        views, files = read_transforms(tpath, dtype=dtype)  # raises with the file's own problem
    else:
        views, files = read_transforms(tpath, first.shape[1], first.shape[0], dtype=dtype)
    H, W = views.height, views.width
    masks, depths, normals = [], [], []
    for k, f in enumerate(files):
        img = _read_image(Path(f))
        if img.shape[:2] != (H, W):
            raise ValueError(f"{f}: {img.shape[1]} x {img.shape[0]} pixels, the cameras say {W} x {H} "
                             f"(frames[{k}])")
        if img.ndim == 2:
            m = img.astype(np.float64)
        elif img.ndim == 3 and img.shape[2] in (3, 4):
            m = img[..., 3].astype(np.float64) if img.shape[2] == 4 else img[..., :3].astype(np.float64).mean(-1)
        elif img.ndim == 3 and img.shape[2] in (1, 2):
            m = img[..., -1].astype(np.float64) if img.shape[2] == 2 else img[..., 0].astype(np.float64)
        else:
            raise ValueError(f"{f}: expected a grey, grey+alpha, RGB or RGBA image, got shape {img.shape}")
        top = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else max(1.0, float(m.max()))
        masks.append(m / top)
        fr = frames[k]
        for key, store, tail in (("depth_file_path", depths, ()), ("normal_file_path", normals, (3,))):
            if key not in fr:
                continue
            p = tpath.parent / fr[key]
            try:
                a = np.load(p, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{p}: cannot read as .npy ({type(exc).__name__}: {str(exc)[:200]}) "
                                 f"(frames[{k}].{key})") from None
            if a.shape != (H, W, *tail):
                raise ValueError(f"{p}: shape {a.shape}, expected {(H, W, *tail)} (frames[{k}].{key})")
            if not np.isfinite(a).all():
                raise ValueError(f"{p}: has NaN or infinite values (frames[{k}].{key}); mark pixels without a "
                                 f"surface by the mask, with 0 there")
            store.append(a)
    for name, store in (("depth_file_path", depths), ("normal_file_path", normals)):
        if store and len(store) != len(files):
            raise ValueError(f"{tpath}: {name} is given for {len(store)} of {len(files)} frames; give it for "
                             f"every frame or for none")
    mask = torch.tensor(np.stack(masks), dtype=dtype)
    if not bool((mask > 0.5).any()):
        raise ValueError(f"{tpath}: every mask is empty: the object is outside every view")
    t = lambda s: torch.tensor(np.stack(s), dtype=dtype) if s else None  # noqa: E731
    return ImageTarget(views, mask, t(depths), t(normals))
