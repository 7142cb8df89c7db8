"""G-Shell (Liu et al. 2024): open surfaces cut from a watertight template by a manifold SDF.

A watertight template comes from ``sdf`` (FlexiCubes or marching tets); a second node field ``msdf`` (the
manifold SDF, nu) is carried to the template vertices with the weights of the positions. The
open surface is the part of the template where ``msdf > 0``: triangles with three positive
corners are kept, three non-positive ones dropped, and mixed ones cut at ``msdf = 0`` by linear
interpolation along their edges. A cut vertex is made once per template edge and shared by the
two triangles of that edge (welded by construction: the boundary is a closed polyline, not a
soup), and vertices no triangle uses are dropped. Gradients reach ``msdf`` (and ``sdf``) through
the cut vertices' positions.

Training regularizers (:func:`msdf_regularizers`): a fit supervises the surface only where the
target is (points, or pixels in views); elsewhere nothing tells msdf to cut the template, so the
unsupervised template vertices are pushed to ``msdf <= -eps`` (dropped) and the supervised ones
to ``msdf >= +eps`` (kept, which opens the boundary wherever the target goes on).
:func:`msdf_supervision` marks the supervised vertices for a point target.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from diffworld.geometry.flexicubes import FlexiCubesMesh, flexicubes
from diffworld.geometry.marching_tets import MarchingTetsMesh, marching_tets

__all__ = ["GShellMesh", "MSDFRegularizers", "cut_open_surface", "gshell_flexicubes", "gshell_marching_tets",
           "msdf_regularizers", "msdf_supervision"]


class GShellMesh(NamedTuple):
    """An open surface and the watertight template it was cut from.

    Attributes:
        vertices: (V, 3) [m] of the open surface.
        faces: (F, 3) int64, oriented like the template.
        boundary_edges: (B, 2) int64 vertex pairs of the boundary, each traversed in the
            direction of its face (the boundary loops run consistently).
        template: The watertight template (``attributes`` holds msdf at its vertices).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    boundary_edges: torch.Tensor
    template: FlexiCubesMesh | MarchingTetsMesh | None


def cut_open_surface(vertices: torch.Tensor, faces: torch.Tensor, nu: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the part of a triangle mesh where ``nu > 0``, cutting triangles at ``nu = 0``.

    Args:
        vertices: (V, 3) [m].
        faces: (F, 3) int64.
        nu: (V,) values at the vertices.

    Returns:
        (vertices (V', 3), faces (F', 3), boundary edges (B, 2)); differentiable w.r.t.
        ``vertices`` and ``nu``.
    """
    if nu.shape != vertices.shape[:1]:
        raise ValueError(f"'nu': expected shape ({vertices.shape[0]},), got {tuple(nu.shape)}")
    dev = vertices.device
    pos = (nu > 0).detach()
    fp = pos[faces]  # (F, 3)
    n_pos = fp.sum(1)
    # Template edges of the mixed faces, one cut vertex per undirected edge.
    mixed = (n_pos == 1) | (n_pos == 2)
    fm = faces[mixed]
    e0 = fm.reshape(-1)
    e1 = fm[:, [1, 2, 0]].reshape(-1)
    crossing = pos[e0] != pos[e1]
    lo, hi = torch.minimum(e0, e1)[crossing], torch.maximum(e0, e1)[crossing]
    n_v = vertices.shape[0]
    keys, inv = torch.unique(lo * n_v + hi, return_inverse=True)
    a, b = keys // n_v, keys % n_v
    na, nb = nu[a], nu[b]
    t = (na / (na - nb))[:, None]
    cut_x = vertices[a] + t * (vertices[b] - vertices[a])
    # cut id per (mixed face, local edge k = edge from corner k to corner k+1)
    cut_id = torch.full((fm.shape[0] * 3,), -1, dtype=torch.int64, device=dev)
    cut_id[crossing] = n_v + inv
    cut_id = cut_id.reshape(-1, 3)
    all_x = torch.cat([vertices, cut_x])

    out = [faces[n_pos == 3]]
    boundary = []
    fpm = fp[mixed]
    # Rotate each mixed face so that its odd corner (the lone positive one for n_pos == 1, the lone
    # non-positive one for n_pos == 2) comes first; orientation is kept by a cyclic shift.
    lone = torch.where(fpm.sum(1, keepdim=True) == 1, fpm, ~fpm).to(torch.int64).argmax(1)
    r = (lone[:, None] + torch.arange(3, device=dev)[None]) % 3
    f = torch.gather(fm, 1, r)
    c = torch.gather(cut_id, 1, r)  # c[:, 0]: edge (0, 1), c[:, 2]: edge (2, 0)
    one = fpm.sum(1) == 1
    # One positive corner p: triangle (p, cut01, cut20); the boundary runs cut01 -> cut20.
    out.append(torch.stack([f[one, 0], c[one, 0], c[one, 2]], 1))
    boundary.append(torch.stack([c[one, 0], c[one, 2]], 1))
    # Two positive corners (1, 2): quad (cut01, 1, 2, cut20) -> 2 triangles; boundary cut20 -> cut01.
    two = ~one
    out.append(torch.stack([c[two, 0], f[two, 1], f[two, 2]], 1))
    out.append(torch.stack([c[two, 0], f[two, 2], c[two, 2]], 1))
    boundary.append(torch.stack([c[two, 2], c[two, 0]], 1))
    new_faces = torch.cat(out)
    edges = torch.cat(boundary)
    # Drop vertices no face uses, renumber.
    used = torch.zeros(all_x.shape[0], dtype=torch.bool, device=dev)
    used[new_faces.reshape(-1)] = True
    remap = torch.cumsum(used.to(torch.int64), 0) - 1
    return all_x[used], remap[new_faces], remap[edges]


def _check_msdf(sdf: torch.Tensor, msdf: torch.Tensor) -> None:
    if tuple(msdf.shape) != tuple(sdf.shape):
        raise ValueError(f"'msdf': expected the shape of 'sdf' {tuple(sdf.shape)}, got {tuple(msdf.shape)}")


def _cut(template: FlexiCubesMesh | MarchingTetsMesh) -> GShellMesh:
    """The open part of a template whose ``attributes[:, 0]`` holds msdf."""
    v, f, b = cut_open_surface(template.vertices, template.faces, template.attributes[:, 0])
    return GShellMesh(v, f, b, template)


def gshell_flexicubes(sdf: torch.Tensor, msdf: torch.Tensor,
                      bounds: Sequence[Sequence[float]] = ((-0.5,) * 3, (0.5,) * 3), **kwargs) -> GShellMesh:
    """G-Shell on the FlexiCubes template: the open surface where ``msdf > 0``.

    Args:
        sdf: Node values of the template (nx+1, ny+1, nz+1), negative inside.
        msdf: Manifold SDF at the nodes, same shape; the surface is kept where it is positive.
        bounds: Node grid box [m].
        **kwargs: FlexiCubes options (``beta``, ``alpha``, ``gamma``, ``deform``, ``training``).

    Returns:
        :class:`GShellMesh`.
    """
    _check_msdf(sdf, msdf)
    return _cut(flexicubes(sdf, bounds, attributes=msdf, **kwargs))


def gshell_marching_tets(sdf: torch.Tensor, msdf: torch.Tensor,
                         bounds: Sequence[Sequence[float]] = ((-0.5,) * 3, (0.5,) * 3)) -> GShellMesh:
    """G-Shell on the marching-tets (DMTet) template: the open surface where ``msdf > 0``.

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), negative inside.
        msdf: Manifold SDF at the nodes, same shape.
        bounds: Node grid box [m].

    Returns:
        :class:`GShellMesh`.
    """
    _check_msdf(sdf, msdf)
    return _cut(marching_tets(sdf, bounds, attributes=msdf))


class MSDFRegularizers(NamedTuple):
    """The two G-Shell msdf regularizers, dimensionless 0-d tensors attached to the graph of nu.

    Attributes:
        negative: Mean over the unsupervised (or the named) vertices of ``relu(nu + eps)^2 / eps^2`` (0 when
            there are none): pushes their msdf down to ``-eps`` and no further.
        positive: Mean over the supervised vertices of ``relu(eps - nu)^2 / eps^2`` (0 when
            there are none): pushes their msdf up to ``+eps`` and no further.
    """

    negative: torch.Tensor
    positive: torch.Tensor


def msdf_supervision(vertices: torch.Tensor, target_points: torch.Tensor, radius: float, *,
                     target_normals: torch.Tensor | None = None, tangential: float | None = None,
                     tree=None) -> torch.Tensor:
    """Which template vertices a point target supervises.

    A vertex ``v`` is supervised when its nearest target point ``q`` is within ``radius``; with
    ``target_normals`` and ``tangential``, also when ``v - q`` stays within ``tangential`` of
    the normal line through ``q`` (``|(v - q) - ((v - q) . n) n| <= tangential``). The second test
    is what marks the template past the edge of an open target: a vertex beyond the boundary,
    along the surface, is near the boundary points but off to the side of all of them.

    Args:
        vertices: Template vertices [m], shape (V, 3) (read detached).
        target_points: Target surface points [m], shape (M, 3), M >= 1.
        radius: Supervision distance [m], > 0 (about a cell: the template passes within a cell
            of the target wherever the fit is converged).
        target_normals: Unit normals of the target points (M, 3) (orientation does not matter),
            or None.
        tangential: Largest offset across the normal [m], > 0 (about the target's point spacing
            or half a cell, whichever is larger), or None (distance test only).
        tree: Optional ``scipy.spatial.cKDTree`` of ``target_points`` (reused across iterations).

    Returns:
        (V,) bool on the device of ``vertices``.

    Raises:
        ValueError: Bad shapes, an empty target, or a radius or tangential tolerance not > 0.
    """
    from scipy.spatial import cKDTree

    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"'vertices': expected shape (V, 3), got {tuple(vertices.shape)}")
    if target_points.dim() != 2 or target_points.shape[1] != 3 or target_points.shape[0] == 0:
        raise ValueError(f"'target_points': expected shape (M, 3) with M >= 1, got {tuple(target_points.shape)}")
    if not float(radius) > 0:
        raise ValueError(f"'radius': expected a distance > 0 [m], got {radius!r}")
    if tangential is not None and not float(tangential) > 0:
        raise ValueError(f"'tangential': expected a distance > 0 [m] or None, got {tangential!r}")
    if target_normals is not None and tuple(target_normals.shape) != tuple(target_points.shape):
        raise ValueError(f"'target_normals': expected shape {tuple(target_points.shape)}, "
                         f"got {tuple(target_normals.shape)}")
    if vertices.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=vertices.device)
    if tree is None:
        tree = cKDTree(target_points.detach().cpu().numpy())
    d, i = tree.query(vertices.detach().cpu().numpy(), k=1, distance_upper_bound=float(radius))
    near = torch.from_numpy(d <= float(radius))
    if tangential is not None and target_normals is not None and bool(near.any()):
        idx = torch.from_numpy(i[near.numpy()]).to(target_points.device)
        off = (vertices.detach()[near.to(vertices.device)] - target_points[idx]).to(target_normals.dtype)
        n = target_normals[idx]
        across = (off - (off * n).sum(-1, keepdim=True) * n).norm(dim=-1)
        near[near.clone()] = (across <= float(tangential)).cpu()
    return near.to(vertices.device)


def msdf_regularizers(nu: torch.Tensor, supervised: torch.Tensor, eps: float,
                      negative: torch.Tensor | None = None) -> MSDFRegularizers:
    """G-Shell's msdf regularizers on the template vertices.

    Unsupervised template vertices (no target near them; or those ``negative`` names, when
    given) are pushed to ``nu <= -eps`` so that the template is cut away where nothing asks for
    a surface; supervised ones to ``nu >= +eps``
    so that the surface is kept, and its boundary pushed outwards, wherever the target is.
    One-sided (hinge) penalties: past the margin msdf is left to the other terms (it is a
    distance along the surface and may grow beyond ``eps``); squared, so that the push fades
    as the margin is reached. Normalized by ``eps^2``, so a vertex at ``nu = 0`` costs 1.

    Args:
        nu: msdf at the template vertices [m], shape (V,) (e.g. ``template.attributes[:, 0]``);
            differentiable.
        supervised: (V,) bool, e.g. from :func:`msdf_supervision`.
        eps: Margin [m], > 0 (about a cell).
        negative: Optional (V,) bool, the vertices to push down (default ``~supervised``). Image
            targets know three kinds of vertex: on the observed surface, in observed free space,
            and hidden from every view; the hidden ones are left alone. A vertex in both masks
            is pushed both ways; callers keep them disjoint.

    Returns:
        :class:`MSDFRegularizers`.

    Raises:
        ValueError: Mismatched shapes or ``eps`` not > 0.
    """
    if nu.dim() != 1:
        raise ValueError(f"'nu': expected shape (V,), got {tuple(nu.shape)}")
    if supervised.shape != nu.shape or supervised.dtype != torch.bool:
        raise ValueError(f"'supervised': expected a bool tensor of shape {tuple(nu.shape)}, "
                         f"got {supervised.dtype} {tuple(supervised.shape)}")
    if negative is None:
        negative = ~supervised
    elif negative.shape != nu.shape or negative.dtype != torch.bool:
        raise ValueError(f"'negative': expected a bool tensor of shape {tuple(nu.shape)}, "
                         f"got {negative.dtype} {tuple(negative.shape)}")
    if not float(eps) > 0:
        raise ValueError(f"'eps': expected a margin > 0 [m], got {eps!r}")
    eps = float(eps)
    zero = nu.sum() * 0.0

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if x.numel() else zero

    negative = mean(torch.relu(nu[negative] + eps).pow(2)) / eps ** 2
    positive = mean(torch.relu(eps - nu[supervised]).pow(2)) / eps ** 2
    return MSDFRegularizers(negative, positive)
