"""Image targets of the ``reconstruction`` task: the target images (rendered from the reference
shape or read from a folder), the image loss terms on the extracted mesh, the image metrics and
the per-view picture."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffworld.render.camera import Views, orbit_views
from diffworld.render.images import ImageTarget, image_losses, load_image_target, render_views, target_from_mesh

__all__ = ["ObservedMaps", "carve_term", "image_metrics", "image_reference", "image_terms", "msdf_image_terms",
           "observed_maps", "observed_points", "observed_space", "reference_mesh", "save_view_grid", "views_around"]


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

    # what does not change between iterations: the images' maps, the free grid nodes per shape
    free_nodes: dict = {"nodes": {}}

    def for_rep(rep):
        def terms(mesh):
            open_surface = hasattr(mesh, "template")  # G-Shell: the cut part of a template
            r = render_views(mesh.vertices, mesh.faces, images.views)
            out = image_losses(r, images, depth_scale=float(rep.cell), two_sided=open_surface,
                               depth_truncation=weights.depth_truncation)
            result = {f"image_{k}": (getattr(weights, k), v) for k, v in out.items() if getattr(weights, k)}
            if weights.carve:
                result["image_carve"] = (weights.carve, carve_term(rep, images))
            if open_surface and weights.msdf:
                if "maps" not in free_nodes:
                    free_nodes["maps"] = observed_maps(images)
                reg = msdf_image_terms(mesh, images, rep.msdf_radius, rep.msdf_eps, rep, free_nodes["nodes"],
                                       free_nodes["maps"])
                result["msdf_negative"] = (weights.msdf, reg.negative)
                result["msdf_positive"] = (weights.msdf, reg.positive)
            return result

        return terms

    return for_rep


def _pixels(points: torch.Tensor, images: ImageTarget):
    """Where each view images each point: (z (V, N) camera depth, seen (V, N) in front and inside
    the image, and the indices (view, row, column) of its pixel, clamped into the image)."""
    v = images.views
    uvz = v.project(points.detach().to(images.mask.dtype))  # (V, N, 3)
    u, w, z = uvz[..., 0], uvz[..., 1], uvz[..., 2]
    seen = (z > 0) & (u >= 0) & (u < v.width) & (w >= 0) & (w < v.height)
    px = u.clamp(0, v.width - 1).long()
    py = w.clamp(0, v.height - 1).long()
    k = torch.arange(len(v), device=points.device)[:, None].expand_as(px)
    return z, seen, k, py, px


def _seen_on_background(points: torch.Tensor, images: ImageTarget) -> torch.Tensor:
    """(N,) True where some view sees the point (in front, inside the image) on a pixel whose
    target mask is < 0.5."""
    with torch.no_grad():
        _, seen, k, py, px = _pixels(points, images)
        return (seen & (images.mask[k, py, px] < 0.5)).any(0)


class ObservedMaps(NamedTuple):
    """Per-pixel maps of an image target that :func:`observed_space` reads, (V, H, W) each
    (``whole``: (V,)); they depend on the images only, so a caller computes them once."""

    fg: torch.Tensor  # bool: target mask > 0.5
    to_fg: torch.Tensor  # distance [px] to the nearest foreground pixel centre
    all_fg: torch.Tensor  # bool: the whole 3x3 block is foreground
    near: torch.Tensor  # nearest foreground depth in the 3x3 block [m] (inf: none)
    far: torch.Tensor  # farthest foreground depth in the 3x3 block [m] (-inf: none)
    whole: torch.Tensor  # bool per view: the mask does not touch the image border


def observed_maps(images: ImageTarget) -> ObservedMaps:
    """The maps of :class:`ObservedMaps` (needs depth maps)."""
    if images.depth is None:
        raise ValueError("images: telling observed surface from free space needs depth maps (channels "
                         "'depth'), got a target with masks only")
    import torch.nn.functional as nnf
    from scipy.ndimage import distance_transform_edt

    with torch.no_grad():
        mask = images.mask[:, None]
        fg = (mask > 0.5)[:, 0]
        depth = images.depth
        inf = torch.tensor(float("inf"), dtype=depth.dtype, device=depth.device)
        to_fg = torch.from_numpy(np.stack([distance_transform_edt(~m) for m in fg.cpu().numpy()])).to(
            depth.device, depth.dtype)
        all_fg = -nnf.max_pool2d(-mask, 3, 1, 1)[:, 0] > 0.5
        near = -nnf.max_pool2d(-torch.where(fg, depth, inf)[:, None], 3, 1, 1)[:, 0]
        far = nnf.max_pool2d(torch.where(fg, depth, -inf)[:, None], 3, 1, 1)[:, 0]
        edge = torch.cat([fg[:, 0, :], fg[:, -1, :], fg[:, :, 0], fg[:, :, -1]], 1)
        return ObservedMaps(fg, to_fg, all_fg, near, far, ~edge.any(1))


def observed_space(points: torch.Tensor, images: ImageTarget, margin: float, maps: ObservedMaps | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the target images say about points: (free, surface), each (N,) bool.

    ``free``: some view sees the point on background, or in front of the observed surface, or
    no view images it at all:

    * on background: no foreground pixel within the margin's footprint in the image, plus 1.5
      pixels, of its projection (a point within the margin of the surface may project that far
      past the silhouette); or outside the frame of a view whose mask does not touch the image
      border, so that it holds the whole object (the visual hull's assumption, checked per view);
    * in front: every pixel of the 3x3 block around its projection is foreground and the point
      is nearer than their nearest depth by more than ``margin`` plus the block's depth range
      (at grazing angles one pixel spans a wide range of depths);
    * outside every frame: whatever is there, no view observed it as a surface.

    ``surface``: not free, and some view sees it within ``margin`` of the depth range of the
    foreground pixels of its block. Points hidden behind the surface in every view that images
    them are neither.

    Args:
        points: World points [m], shape (N, 3) (read detached).
        images: Target with masks and depth maps (depth is required: a mask alone cannot tell
            an opening from a lid inside the silhouette).
        margin: Depth tolerance [m], > 0 (about a cell).
        maps: :func:`observed_maps` of ``images`` (computed here when None).

    Raises:
        ValueError: The target has no depth maps.
    """
    m = observed_maps(images) if maps is None else maps
    v = images.views
    with torch.no_grad():
        z, seen, k, py, px = _pixels(points, images)
        reach = margin * torch.maximum(v.fx, v.fy)[:, None] / z.clamp_min(1e-9) + 1.5
        background = (seen & (m.to_fg[k, py, px] > reach)) | ((z > 0) & ~seen & m.whole[:, None])
        lo, hi = m.near[k, py, px], m.far[k, py, px]
        in_front = seen & m.all_fg[k, py, px] & (z < lo - margin - (hi - lo))
        free = (background | in_front).any(0) | ~seen.any(0)
        on = seen & m.fg[k, py, px] & (z >= lo - margin) & (z <= hi + margin)
        return free, on.any(0) & ~free


def observed_points(images: ImageTarget, max_points: int = 100000, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The surface the depth maps observed, as a point target: every foreground pixel whose 3x3
    block is all foreground (silhouette pixels mix surface and background) lifted to its depth
    along its ray, with the normal map's normal there; a seeded subset of at most ``max_points``.

    Returns:
        (points (P, 3) [m], unit normals (P, 3) or None without normal maps).

    Raises:
        ValueError: The target has no depth maps, or no pixel qualifies.
    """
    if images.depth is None:
        raise ValueError("images: the observed surface points need depth maps (channels 'depth'), got a target "
                         "with masks only")
    import torch.nn.functional as nnf

    with torch.no_grad():
        inner = (-nnf.max_pool2d(-images.mask[:, None], 3, 1, 1)[:, 0] > 0.5) & (images.depth > 0)
        d = images.views.ray_directions()
        pts = (images.views.eyes[:, None, None, :] + images.depth[..., None] * d)[inner]
        nrm = None
        if images.normal is not None:
            nrm = torch.nn.functional.normalize(images.normal[inner], dim=-1)
            good = nrm.norm(dim=-1) > 0.5  # a zero normal in a file: drop the pixel
            pts, nrm = pts[good], nrm[good]
        if pts.shape[0] == 0:
            raise ValueError("images: no foreground pixel with depth away from the silhouettes")
        if pts.shape[0] > max_points:
            keep = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
            pts = pts[keep.to(pts.device)]
            nrm = None if nrm is None else nrm[keep.to(pts.device)]
    return pts, nrm


def msdf_image_terms(mesh, images: ImageTarget, margin: float, eps: float, rep=None, cache: dict | None = None,
                     maps: ObservedMaps | None = None):
    """G-Shell's msdf regularizers from images (:func:`observed_space`,
    :func:`~diffworld.geometry.gshell.msdf_regularizers`): template vertices on the observed
    surface are pushed to msdf >= +eps (kept); those in observed free space, and with ``rep``
    also the grid nodes there, to msdf <= -eps (cut away); hidden ones are left to the other
    terms.

    The nodes matter because the template moves: where it moves into free space that no
    template vertex crossed before (a lid rising in the last stage), the msdf it meets is
    already negative, instead of the initial positive value that the vertex term would need
    many steps to push down. Which nodes are free depends only on the grid and the images:
    ``cache`` (a dict kept by the caller) holds it per grid shape; ``maps``: the images'
    :func:`observed_maps`, computed once by the caller.
    """
    from diffworld.geometry.gshell import msdf_regularizers

    t = mesh.template
    if maps is None:
        maps = observed_maps(images)
    free, surface = observed_space(t.vertices, images, margin, maps)
    nu = t.attributes[:, 0]
    if rep is not None:
        nodes, _ = rep.probe()
        key = tuple(rep.msdf.shape)
        hit = None if cache is None else cache.get(key)
        if hit is None:
            hit = observed_space(nodes, images, margin, maps)[0]
            if cache is not None:
                cache.clear()
                cache[key] = hit
        nu = torch.cat([nu, rep.msdf.reshape(-1)])
        free = torch.cat([free, hit])
        surface = torch.cat([surface, torch.zeros_like(hit)])
    return msdf_regularizers(nu, surface, eps, negative=free)


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


def image_metrics(vertices: torch.Tensor, faces: torch.Tensor, images: ImageTarget, two_sided: bool = False) -> dict:
    """How well the result reproduces the images: mask IoU (at 0.5, mean over views), depth RMSE [m]
    and mean normal angle [degrees] where both see the surface (``two_sided``: up to sign, for
    open surfaces)."""
    with torch.no_grad():
        r = render_views(vertices.to(images.mask.dtype), faces, images.views)
        a, b = r.mask > 0.5, images.mask > 0.5
        iou = ((a & b).sum((1, 2)).double() / (a | b).sum((1, 2)).clamp_min(1).double())
        out = {"mask_iou": float(iou.mean()), "mask_iou_min": float(iou.min())}
        both = (r.fragments.face >= 0) & b
        if images.depth is not None and bool(both.any()):
            out["depth_rmse"] = float(((r.depth - images.depth)[both] ** 2).mean().sqrt())
        if images.normal is not None and bool(both.any()):
            cos = (r.normal * images.normal).sum(-1)[both]
            cos = (cos.abs() if two_sided else cos).clamp(-1, 1)
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

