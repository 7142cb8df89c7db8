"""Signed distance to a triangle mesh: on grid nodes (:func:`mesh_to_sdf`) and at any points
(:class:`MeshSDF`), with Warp BVH queries.

A Warp kernel finds, per point, the closest face, the barycentric coordinates of the closest
point and the sign; the distance ``sign * |x - closest point|`` is then formed in torch in the
requested dtype. The closest face comes from a float32 BVH search; for float64 queries it is
refined in float64 (every face within the float32 distance plus a margin is projected exactly in
float64), so float64 results are float64-accurate and central differences are clean. Float32
queries skip the refinement (about half the cost); their distances carry a few float32 ulps of
face-selection noise. Consequences:

* values are differentiable w.r.t. the query points (gradient ``sign * (x - c) / |x - c|``, the
  closest-point direction) and w.r.t. the mesh vertices (the closest point moves with its face);
  both are exact wherever the closest feature is unique (envelope theorem: the barycentrics are
  held fixed);
* float64 output carries float64 distances; the winding-number sign is evaluated in float32
  (it only matters within ~1e-7 of the surface).

Sign modes:

* ``"winding"``: generalized winding number (fast dipole approximation) thresholded at 0.5;
  robust on open, slightly broken or self-intersecting meshes.
* ``"normal"``: sign of ``(x - c) . n`` with ``n`` the angle-weighted pseudo-normal (Baerentzen &
  Aanaes) of the closest feature (face, edge or vertex, told apart by the barycentrics of the
  closest point ``c``); faster, exact on watertight, consistently oriented (outward), manifold
  meshes, wrong near holes. Computed here in torch rather than with Warp's
  ``mesh_query_point_sign_normal``, which blends the normals of every face within a tolerance
  of the minimum distance and so flips the sign at points nearly equidistant from many faces
  (the center of a sphere).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from diffworld.engine.bridge import launch, on_torch_stream, to_warp
from diffworld.engine.runtime import init_warp
from diffworld.geometry.grid import Grid
from diffworld.geometry.sdf import SDF, _register, sample_grid

__all__ = ["MeshSDF", "SIGN_MODES", "check_mesh", "closest_points", "mesh_to_sdf"]

SIGN_MODES = ("winding", "normal")

# Warp skips faces with |n| / (|e0|^2 + |e1|^2 + |e2|^2) below this (slivers).
_SLIVER_RATIO = 1.0e-6
# Margin of the float64 refinement sphere, relative to the mesh's coordinate scale: covers the
# float32 rounding (~6e-8 relative) of points and vertices many times over.
_REFINE_MARGIN = 1.0e-6


def _check_sign(sign: Any) -> int:
    if sign not in SIGN_MODES:
        raise ValueError(f"Expected 'sign' to be one of {SIGN_MODES}, got {sign!r}")
    return SIGN_MODES.index(sign)


def _check_max_distance(max_distance: Any) -> float | None:
    if max_distance is None:
        return None
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, float)) \
            or not math.isfinite(max_distance) or max_distance <= 0:
        raise ValueError(f"Expected 'max_distance' to be None or a finite number > 0, got {max_distance!r}")
    return float(max_distance)


def check_mesh(vertices: Any, faces: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a triangle mesh at the Python boundary.

    Args:
        vertices: [m], shape (V, 3), float32/float64, finite, V >= 3.
        faces: Integer vertex indices, shape (F, 3), F >= 1, every index in [0, V).

    Returns:
        ``(vertices, faces)`` with faces as int64 on the vertices' device.

    Raises:
        TypeError: Not tensors, or wrong dtypes.
        ValueError: Wrong shapes, empty mesh, non-finite vertices, indices out of range, or only
            degenerate faces.
    """
    from diffworld.geometry.mesh_ops import check_mesh as check_triangles

    vertices, faces = check_triangles(vertices, faces)
    if vertices.shape[0] < 3:
        raise ValueError(f"Expected 'vertices' with at least 3 vertices (a non-empty mesh), got shape "
                         f"{tuple(vertices.shape)}")
    if faces.shape[0] == 0:
        raise ValueError("Expected 'faces' with at least one triangle, got shape (0, 3) (empty mesh)")
    v = vertices.detach()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    normal = torch.linalg.vector_norm(torch.cross(b - a, c - a, dim=-1), dim=-1)
    scale = ((b - a) ** 2).sum(-1) + ((c - a) ** 2).sum(-1) + ((c - b) ** 2).sum(-1)
    if not bool((normal > _SLIVER_RATIO * scale).any()):
        raise ValueError(f"'faces': all {faces.shape[0]} triangles are degenerate (zero area)")
    return vertices, faces


class _WarpMesh:
    """A Warp mesh built from float32 copies of the vertices; refit when the vertices change."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, device: torch.device, winding: bool):
        wp = init_warp()
        self.source, self.version = vertices, vertices._version
        self.points64 = vertices.detach().to(device=device, dtype=torch.float64).contiguous()
        self.points = self.points64.to(torch.float32)
        self.indices = faces.to(device=device, dtype=torch.int32).reshape(-1).contiguous()
        with on_torch_stream(device):  # the BVH build reads what torch just wrote
            self.mesh = wp.Mesh(points=to_warp(self.points, dtype=wp.vec3), indices=to_warp(self.indices),
                                support_winding_number=winding)
        self.margin = self._margin()

    def _margin(self) -> float:
        return _REFINE_MARGIN * (float(self.points64.abs().max()) + 1e-30)

    def sync(self, vertices: torch.Tensor) -> None:
        """Refit if ``vertices`` is another tensor or was modified in place since the build."""
        if self.source is vertices and self.version == vertices._version:
            return
        self.points64.copy_(vertices.detach())
        self.points.copy_(self.points64)
        with on_torch_stream(self.points.device):
            self.mesh.refit()
        self.margin = self._margin()
        self.source, self.version = vertices, vertices._version


def _closest(mesh: _WarpMesh, points: torch.Tensor, max_distance: float | None, mode: int):
    """(face int64 (M,), float64 barycentric weights (M, 3), sign (M,) float32) of every point.

    Float64 ``points`` get the float64 refinement of the closest face (see kernels_sdf).

    ``check_mesh`` guarantees a non-sliver face, so every (unbounded) query finds one. In normal
    mode the returned sign is +1 (signed later by :func:`_pseudo_normal_sign`).
    """
    from diffworld.geometry import kernels_sdf as kernels

    wp = init_warp()
    dev = points.device
    m = points.shape[0]
    p64 = points.detach().to(torch.float64).contiguous()
    face = torch.empty(m, dtype=torch.int32, device=dev)
    weights = torch.empty((m, 3), dtype=torch.float64, device=dev)
    sign = torch.empty(m, dtype=torch.float32, device=dev)
    bound = kernels.UNBOUNDED if max_distance is None else max_distance
    kernel_mode = kernels.SIGN_WINDING if mode == 0 else kernels.SIGN_NONE
    scale = mesh.margin + _REFINE_MARGIN * (float(p64.abs().max()) if m else 0.0)
    launch(kernels.closest_face_kernel, m,
           [mesh.mesh.id, to_warp(mesh.points64, dtype=wp.vec3d), to_warp(mesh.indices),
            to_warp(p64, dtype=wp.vec3d), float(bound), float(scale), int(kernel_mode),
            int(points.dtype == torch.float64), to_warp(face), to_warp(weights, dtype=wp.vec3d), to_warp(sign)], dev)
    return face.long(), weights, sign


def closest_points(vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The closest point of a triangle mesh (open or closed) to each query point (BVH search).

    Args:
        vertices: (V, 3) [m]. faces: (F, 3) int. points: (M, 3) [m].

    Returns:
        (face (M,) int64, barycentric weights (M, 3) float64) of the closest points; float64
        queries get the float64 refinement of the closest face.
    """
    vertices, faces = check_mesh(vertices, faces)
    mesh = _WarpMesh(vertices, faces, points.device, winding=False)
    face, weights, _ = _closest(mesh, points, None, mode=1)
    return face, weights


class _PseudoNormals(NamedTuple):
    """Angle-weighted pseudo-normals (not normalized; only their direction is used)."""

    face: torch.Tensor  # (F, 3) unit face normals
    edge: torch.Tensor  # (E, 3) sum of the adjacent faces' unit normals
    vertex: torch.Tensor  # (V, 3) incident unit normals weighted by the corner angle
    face_edges: torch.Tensor  # (F, 3) edge id of the edge opposite each corner


@torch.no_grad()
def _pseudo_normals(vertices: torch.Tensor, faces: torch.Tensor) -> _PseudoNormals:
    v = vertices.detach()
    corners = [v[faces[:, k]] for k in range(3)]
    n = torch.cross(corners[1] - corners[0], corners[2] - corners[0], dim=-1)
    nf = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    vn = torch.zeros_like(v)
    for k in range(3):
        e1 = corners[(k + 1) % 3] - corners[k]
        e2 = corners[(k + 2) % 3] - corners[k]
        angle = torch.atan2(torch.linalg.vector_norm(torch.cross(e1, e2, dim=-1), dim=-1), (e1 * e2).sum(-1))
        vn.index_add_(0, faces[:, k], angle[:, None] * nf)
    # Edge opposite corner k: (k+1, k+2).
    a = torch.stack([faces[:, 1], faces[:, 2], faces[:, 0]], 1)
    b = torch.stack([faces[:, 2], faces[:, 0], faces[:, 1]], 1)
    key = torch.minimum(a, b) * v.shape[0] + torch.maximum(a, b)
    unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    en = torch.zeros((unique.numel(), 3), dtype=v.dtype, device=v.device)
    en.index_add_(0, inverse, nf.repeat_interleave(3, dim=0))
    return _PseudoNormals(nf, en, vn, inverse.view(-1, 3))


def _pseudo_normal_sign(normals: _PseudoNormals, faces: torch.Tensor, face: torch.Tensor, weights: torch.Tensor,
                        offset: torch.Tensor) -> torch.Tensor:
    """-1 where ``offset = x - c`` points against the pseudo-normal of the closest feature, else +1.

    The feature is told apart by the exact zeros of the barycentric ``weights`` (M, 3): three
    non-zero = face, two = the edge opposite the zero corner, one = the corner.
    """
    nonzero = (weights > 0).sum(-1)
    k_min, k_max = weights.argmin(-1), weights.argmax(-1)
    n_face = normals.face[face]
    n_edge = normals.edge[normals.face_edges[face, k_min]]
    n_vertex = normals.vertex[faces[face, k_max]]
    n = torch.where((nonzero == 3)[:, None], n_face, torch.where((nonzero == 2)[:, None], n_edge, n_vertex))
    return torch.where((offset * n).sum(-1) < 0.0, -1.0, 1.0).to(offset.dtype)


class MeshSDF(SDF):
    """Signed distance to a triangle mesh at arbitrary points.

    Negative inside (faces counter-clockwise seen from outside, as :func:`marching_cubes`
    writes them). The Warp BVH is built on first use per device and refit when the vertices
    change (another tensor, or modified in place, e.g. by an optimizer step).

    Args:
        vertices: [m], shape (V, 3). Stored as a buffer (not trainable) unless given as an
            ``nn.Parameter`` or a tensor that requires grad (then gradients reach it).
        faces: Integer vertex indices, shape (F, 3).
        sign: ``"winding"`` (robust, default) or ``"normal"`` (watertight meshes).
        max_distance: If set, values are clamped to [-max_distance, max_distance] [m] (a
            truncated SDF) and the closest-face search is bounded by it; far points still get
            their sign (by an unbounded query).

    Raises:
        TypeError, ValueError: Invalid mesh (see :func:`check_mesh`), sign or max_distance.
    """

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, sign: str = "winding",
                 max_distance: float | None = None):
        super().__init__()
        vertices, faces = check_mesh(vertices, faces)
        self.mode = _check_sign(sign)
        self.sign = sign
        self.max_distance = _check_max_distance(max_distance)
        _register(self, "vertices", vertices, (vertices.shape[0], 3), trainable=False)
        self.register_buffer("faces", faces.clone(), persistent=True)
        self._meshes: dict[str, _WarpMesh] = {}
        self._normals: dict[tuple[str, torch.dtype], tuple[torch.Tensor, int, _PseudoNormals]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_meshes"] = {}  # Warp handles are not copyable; rebuilt on use
        state["_normals"] = {}
        return state

    def _pseudo_normals(self, device: torch.device, dtype: torch.dtype) -> _PseudoNormals:
        key = (str(device), dtype)
        v = self.vertices
        cached = self._normals.get(key)
        if cached is None or cached[0] is not v or cached[1] != v._version:
            normals = _pseudo_normals(v.detach().to(device=device, dtype=dtype), self.faces.to(device))
            cached = (v, v._version, normals)
            self._normals[key] = cached
        return cached[2]

    def _warp_mesh(self, device: torch.device) -> _WarpMesh:
        key = str(device)
        entry = self._meshes.get(key)
        faces = self.faces.to(device)
        if entry is None or entry.indices.numel() != faces.numel() or entry.points.shape != self.vertices.shape:
            entry = _WarpMesh(self.vertices, faces, device, winding=self.mode == 0)
            self._meshes[key] = entry
        else:
            entry.sync(self.vertices)
        return entry

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[0] == 0:
            return (p.sum(-1) * 0.0) + (self.vertices.to(p).sum() * 0.0)
        mesh = self._warp_mesh(p.device)
        face, weights, sign = _closest(mesh, p, self.max_distance, self.mode)
        verts = self.vertices.to(dtype=p.dtype, device=p.device)
        faces = self.faces.to(p.device)
        tri = faces[face]
        w = weights.to(p.dtype)
        closest = (w[:, 0:1] * verts[tri[:, 0]] + w[:, 1:2] * verts[tri[:, 1]] + w[:, 2:3] * verts[tri[:, 2]])
        offset = p - closest
        if self.mode == 0:
            s = sign.to(p.dtype)
        else:
            s = _pseudo_normal_sign(self._pseudo_normals(p.device, p.dtype), faces, face, w, offset.detach())
        d = s * torch.linalg.vector_norm(offset, dim=-1)
        if self.max_distance is not None:
            d = torch.clamp(d, -self.max_distance, self.max_distance)
        return d

    def extra_repr(self) -> str:
        return (f"vertices={tuple(self.vertices.shape)}, faces={tuple(self.faces.shape)}, sign={self.sign!r}, "
                f"max_distance={self.max_distance}")


def mesh_to_sdf(vertices: torch.Tensor, faces: torch.Tensor, grid: Grid, sign: str = "winding",
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                max_distance: float | None = None, chunk: int = 262144) -> torch.Tensor:
    """Signed distance from a triangle mesh to every node of a grid.

    Args:
        vertices: [m], shape (V, 3), float32/float64, finite. If it requires grad, the result
            is differentiable w.r.t. it.
        faces: Integer vertex indices, shape (F, 3), counter-clockwise seen from outside.
        grid: Node grid (node (i, j, k) at ``grid.nodes()[i, j, k]``).
        sign: ``"winding"`` (robust to holes and defects) or ``"normal"`` (fast, watertight).
        device: Device of the query and result; default the device of ``vertices``.
        dtype: float32 or float64 result.
        max_distance: Optional truncation [m]: values clamped to [-max_distance, max_distance].
        chunk: Nodes per query batch (bounds peak memory).

    Returns:
        Signed distances [m], shape (nx+1, ny+1, nz+1), negative inside.

    Raises:
        TypeError: Wrong types (vertices, faces, grid, dtype).
        ValueError: Wrong shapes, empty mesh, non-finite vertices, indices out of range, bad
            sign / max_distance / chunk.
    """
    if not isinstance(grid, Grid):
        raise TypeError(f"Expected 'grid' to be a diffworld Grid, got {type(grid).__name__}")
    field = MeshSDF(vertices, faces, sign=sign, max_distance=max_distance)
    dev = vertices.device if device is None else torch.device(device)
    return sample_grid(field, grid, device=dev, dtype=dtype, chunk=chunk)
