"""Rasterization of triangle meshes into calibrated views, differentiable inside triangles.

:func:`rasterize` finds, for every pixel of every view, the nearest triangle along the ray
through the pixel centre: one Warp kernel casting the rays against a BVH of the mesh
(``wp.Mesh``, rebuilt per call), so the cost grows with pixels x log(triangles), not with their
product. That choice is discrete and carries no gradient. The rest is torch on the hit pixels:
the barycentrics and the depth of the hit are recomputed from the triangle's vertices and the
ray (Moller-Trumbore), so they are differentiable w.r.t. the vertex positions (and the cameras),
and :func:`interpolate` carries any per-vertex attribute to the pixels with those gradients
(perspective-correct by construction: the weights are those of the 3D hit point). This is the
interior gradient of nvdiffrast's ``rasterize`` + ``interpolate``; gradients of the coverage at
silhouette edges (its ``antialias``) are not part of this module yet.

Conventions: :class:`~diffworld.render.camera.Views` (OpenCV axes, pixel centres at +0.5);
``depth`` is the camera-space z of the hit [m], 0 where no triangle is hit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import warp as wp

from diffworld.engine.bridge import check_faces, check_tensor
from diffworld.render.camera import Views

__all__ = ["Fragments", "face_normals", "interpolate", "rasterize"]


class Fragments(NamedTuple):
    """What :func:`rasterize` returns, per view and pixel.

    Attributes:
        face: Index of the triangle seen (V, H, W), int64; -1 where none is.
        bary: Barycentric weights (V, H, W, 3) of the triangle's three vertices at the hit (0 where
            none); differentiable w.r.t. vertices and cameras.
        depth: Camera-space z of the hit (V, H, W) [m], 0 where none; differentiable.
        mask: 1 where a triangle is seen, else 0 (V, H, W), the vertices' dtype; no gradient.
    """

    face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor


@wp.kernel
def _cast(mesh: wp.uint64, eyes: wp.array(dtype=wp.vec3), dirs: wp.array(dtype=wp.vec3), per_view: int,
          face: wp.array(dtype=wp.int32)):
    i = wp.tid()
    q = wp.mesh_query_ray(mesh, eyes[i // per_view], dirs[i], 1.0e30)
    if q.result:
        face[i] = q.face
    else:
        face[i] = -1


def _nearest_faces(vertices: torch.Tensor, faces: torch.Tensor, eyes: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Index of the nearest triangle hit by each ray (-1: none), rays ``eyes[view] + t dirs``
    with ``dirs`` (V, H, W, 3); float32 in the BVH whatever the vertices' dtype."""
    from diffworld.engine.runtime import init_warp, warp_device

    init_warp()
    dev = warp_device(vertices.device)
    V, H, W, _ = dirs.shape
    out = torch.full((V * H * W,), -1, dtype=torch.int32, device=vertices.device)
    if faces.shape[0] == 0 or out.numel() == 0:
        return out.reshape(V, H, W).long()
    pts = wp.from_torch(vertices.detach().to(torch.float32).contiguous(), dtype=wp.vec3)
    idx = wp.from_torch(faces.to(torch.int32).reshape(-1).contiguous(), dtype=wp.int32)
    mesh = wp.Mesh(points=pts, indices=idx)
    d = wp.from_torch(dirs.detach().to(torch.float32).reshape(-1, 3).contiguous(), dtype=wp.vec3)
    e = wp.from_torch(eyes.detach().to(torch.float32).contiguous(), dtype=wp.vec3)
    wp.launch(_cast, V * H * W, [mesh.id, e, d, H * W], [wp.from_torch(out)], device=dev)
    return out.reshape(V, H, W).long()


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, views: Views) -> Fragments:
    """Rasterize a triangle mesh into every view.

    Args:
        vertices: World positions (N, 3) [m], float32 or float64 (may require grad).
        faces: Triangles (F, 3), integer indices into ``vertices``.
        views: The cameras (V views of one size); their tensors may require grad.

    Returns:
        :class:`Fragments` of shape (V, H, W[, 3]).

    Raises:
        ValueError: Malformed vertices or faces (the argument named).
    """
    vertices = check_tensor("vertices", vertices, ndim=2, shape=(None, 3))
    faces = check_faces("faces", faces, vertices.shape[0])
    views = views.to(dtype=vertices.dtype, device=vertices.device)
    dirs = views.ray_directions()  # (V, H, W, 3), camera z = 1
    eyes = views.eyes
    face = _nearest_faces(vertices, faces, eyes, dirs)
    V, H, W = face.shape
    hit = face >= 0
    dt = vertices.dtype
    bary = torch.zeros((V, H, W, 3), dtype=dt, device=vertices.device)
    depth = torch.zeros((V, H, W), dtype=dt, device=vertices.device)
    if bool(hit.any()):
        v_i, h_i, w_i = hit.nonzero(as_tuple=True)
        tri = faces[face[hit]]
        a, b, c = vertices[tri[:, 0]], vertices[tri[:, 1]], vertices[tri[:, 2]]
        o, d = eyes[v_i], dirs[v_i, h_i, w_i]
        # Moller-Trumbore: o + t d = a + u (b - a) + v (c - a)
        e1, e2 = b - a, c - a
        p = torch.linalg.cross(d, e2)
        det = (e1 * p).sum(-1)
        # a ray that hit the triangle in float32 but is parallel to it in this precision
        # (grazing): keep the sign, bound the magnitude
        tiny = torch.finfo(dt).eps * (e1.norm(dim=-1) * e2.norm(dim=-1)).clamp_min(torch.finfo(dt).tiny)
        det = torch.where(det.abs() < tiny, torch.where(det < 0, -tiny, tiny), det)
        s = o - a
        u = (s * p).sum(-1) / det
        q = torch.linalg.cross(s, e1)
        v = (d * q).sum(-1) / det
        t = (e2 * q).sum(-1) / det
        bary = bary.index_put((v_i, h_i, w_i), torch.stack([1.0 - u - v, u, v], -1))
        depth = depth.index_put((v_i, h_i, w_i), t)
    return Fragments(face, bary, depth, hit.to(dt))


def interpolate(attributes: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes (N, C) at every pixel (V, H, W, C): the barycentric blend of the
    seen triangle's vertices, 0 where no triangle is seen; differentiable w.r.t. the attributes
    and (through the barycentrics) the geometry."""
    attributes = check_tensor("attributes", attributes, ndim=2)
    face = fragments.face
    hit = face >= 0
    out = attributes.new_zeros((*face.shape, attributes.shape[1]))
    if not bool(hit.any()):
        return out
    idx = hit.nonzero(as_tuple=True)
    tri = faces.long()[face[hit]]  # (M, 3)
    w = fragments.bary[idx]  # (M, 3)
    vals = (attributes[tri] * w[..., None].to(attributes.dtype)).sum(1)
    return out.index_put(idx, vals)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor, fragments: Fragments) -> torch.Tensor:
    """World-space unit normals (V, H, W, 3) of the triangles seen (right-handed winding: counter-
    clockwise seen from the side the normal points to), 0 where none is; differentiable."""
    faces = faces.long()
    n = torch.linalg.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(vertices.dtype).tiny)
    face = fragments.face
    hit = face >= 0
    out = vertices.new_zeros((*face.shape, 3))
    if not bool(hit.any()):
        return out
    return out.index_put(hit.nonzero(as_tuple=True), n[face[hit]])
