"""Image targets of the ``reconstruction`` task: the target images (rendered from the reference
shape or read from a folder), the image loss terms on the extracted mesh, the image metrics and
the per-view picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffworld.render.camera import Views, orbit_views
from diffworld.render.images import ImageTarget, image_losses, load_image_target, render_views, target_from_mesh

__all__ = ["carve_term", "image_metrics", "image_reference", "image_terms", "reference_mesh", "save_view_grid", "views_around"]


def reference_mesh(ref, bounds, resolution: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    """A triangle mesh of the reference: its own mesh, or marching cubes of its exact SDF."""
    if ref.mesh is not None:
        return ref.mesh[0].double(), ref.mesh[1]
    from diffworld.geometry.grid import Grid
    from diffworld.geometry.marching_cubes import marching_cubes
    from diffworld.geometry.sdf import sample_grid

    with torch.no_grad():
        m = marching_cubes(sample_grid(ref.sdf, Grid.make(resolution, bounds), dtype=torch.float64), bounds)
    return m.vertices.double(), m.faces


def views_around(vertices: torch.Tensor, n: int, width: int, height: int, fov_deg: float, elevations,
                 dtype) -> Views:
    """``n`` views orbiting the mesh's bounding sphere (centre of its box), framing it."""
    lo, hi = vertices.min(0).values, vertices.max(0).values
    centre = (lo + hi) / 2
    radius = float((vertices - centre).norm(dim=-1).max())
    return orbit_views(centre.tolist(), radius, n, width, height, tuple(elevations), fov_deg, margin=1.05,
                       dtype=dtype)


def image_reference(task, seed: int, dtype, device):
    """(the Reference for the metrics, or None; the ImageTarget) of an ``images`` target."""
    from diffworld.tasks.reconstruction.config import MeshTarget
    from diffworld.tasks.reconstruction.reference import Reference

    cfg = task.target
    if cfg.source is not None:
        ref = Reference(cfg.source, task.bounds, seed, task.evaluation.n_points, dtype)
        v, f = reference_mesh(ref, task.bounds)
        views = views_around(v, cfg.views, cfg.width, cfg.height, cfg.fov_deg, cfg.elevations, torch.float64)
        images = target_from_mesh(v, f, views)
        if not bool((images.mask > 0.5).any()):
            raise ValueError("task.target: the object is outside every view")
    else:
        images = load_image_target(cfg.path, torch.float64)
        ref = None
        if cfg.reference is not None:
            ref = Reference(MeshTarget(type="mesh", path=cfg.reference, normalize=False), task.bounds, seed,
                            task.evaluation.n_points, dtype)
    images = ImageTarget(images.views.to(dtype=dtype, device=device), images.mask.to(dtype=dtype, device=device),
                         None if images.depth is None or "depth" not in cfg.channels
                         else images.depth.to(dtype=dtype, device=device),
                         None if images.normal is None or "normal" not in cfg.channels
                         else images.normal.to(dtype=dtype, device=device))
    return ref, images


def image_terms(images: ImageTarget, weights):
    """``rep -> (vertices, faces) -> {name: (weight, value)}``: the image terms for
    :func:`~diffworld.geometry.reconstruction.reconstruction_losses`, depth in cells of ``rep``."""

    def for_rep(rep):
        def terms(mesh):
            r = render_views(mesh.vertices, mesh.faces, images.views)
            out = image_losses(r, images, depth_scale=float(rep.cell))
            result = {f"image_{k}": (getattr(weights, k), v) for k, v in out.items() if getattr(weights, k)}
            if weights.carve:
                result["image_carve"] = (weights.carve, carve_term(rep, images))
            return result

        return terms

    return for_rep


def _seen_on_background(points: torch.Tensor, images: ImageTarget) -> torch.Tensor:
    """(N,) True where some view sees the point (in front, inside the image) on a pixel whose
    target mask is < 0.5."""
    v = images.views
    with torch.no_grad():
        uvz = v.project(points.detach().to(images.mask.dtype))  # (V, N, 3)
        u, w, z = uvz[..., 0], uvz[..., 1], uvz[..., 2]
        seen = (z > 0) & (u >= 0) & (u < v.width) & (w >= 0) & (w < v.height)
        px = u.clamp(0, v.width - 1).long()
        py = w.clamp(0, v.height - 1).long()
        views = torch.arange(len(v), device=points.device)[:, None].expand_as(px)
        return (seen & (images.mask[views, py, px] < 0.5)).any(0)


def carve_term(rep, images: ImageTarget, margin_cells: float = 0.5) -> torch.Tensor:
    """Space carving: the field's probe points (a grid's nodes, a network's random box points)
    that some view sees on a background pixel of its target mask must be outside, by at least
    ``margin_cells`` cells: mean of ``relu(margin - s)^2`` over them, in squared cells.

    The mask term alone moves only silhouettes that are in the image: a surface that grows past
    every image border (or a blob in front of the object) has none, and nothing pulls it back.
    """
    x, values = rep.probe()
    if values is None:
        values = rep.field(x)
    out = _seen_on_background(x, images)
    h = float(rep.cell)
    if not bool(out.any()):
        return values.sum() * 0.0
    return torch.relu(margin_cells * h - values[out]).pow(2).mean() / h ** 2


def image_metrics(vertices: torch.Tensor, faces: torch.Tensor, images: ImageTarget) -> dict:
    """How well the result reproduces the images: mask IoU (at 0.5, mean over views), depth RMSE [m]
    and mean normal angle [degrees] where both see the surface."""
    with torch.no_grad():
        r = render_views(vertices.to(images.mask.dtype), faces, images.views)
        a, b = r.mask > 0.5, images.mask > 0.5
        iou = ((a & b).sum((1, 2)).double() / (a | b).sum((1, 2)).clamp_min(1).double())
        out = {"mask_iou": float(iou.mean()), "mask_iou_min": float(iou.min())}
        both = (r.fragments.face >= 0) & b
        if images.depth is not None and bool(both.any()):
            out["depth_rmse"] = float(((r.depth - images.depth)[both] ** 2).mean().sqrt())
        if images.normal is not None and bool(both.any()):
            cos = (r.normal * images.normal).sum(-1)[both].clamp(-1, 1)
            out["normal_angle_deg"] = float(torch.rad2deg(torch.acos(cos)).mean())
    return out


def save_view_grid(path: Path, vertices: torch.Tensor, faces: torch.Tensor, images: ImageTarget,
                   max_views: int = 4) -> None:
    """``views.png``: for a few views, the target mask | the result's | their difference, and the
    target's and the result's normals where there are normals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.engine.files import atomic_path

    with torch.no_grad():
        r = render_views(vertices.to(images.mask.dtype), faces, images.views)
    n = min(max_views, len(images.views))
    ks = np.linspace(0, len(images.views) - 1, n).round().astype(int)
    cols = 5 if images.normal is not None else 3
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False, constrained_layout=True)
    for row, k in enumerate(ks):
        tm, rm = images.mask[k].cpu().numpy(), r.mask[k].cpu().numpy()
        panels = [(tm, "target mask", "gray"), (rm, "result mask", "gray"), (np.abs(tm - rm), "|difference|", "magma")]
        if images.normal is not None:
            panels += [(0.5 * (images.normal[k].cpu().numpy() + 1) * tm[..., None], "target normals", None),
                       (0.5 * (r.normal[k].cpu().numpy() + 1) * (rm[..., None] > 0), "result normals", None)]
        for col, (img, title, cmap) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(np.clip(img, 0, 1), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][0].set_ylabel(f"view {k}", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

