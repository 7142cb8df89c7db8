"""Triangle-mesh quantities in torch (differentiable) and a topology report (numpy).

Meshes are ``vertices`` [m], shape (V, 3), float32 or float64, and ``faces``, shape (F, 3),
integer vertex indices. A face ``(a, b, c)`` is counter-clockwise seen from the side its normal
``(b - a) x (c - a)`` points to; for a closed mesh whose normals point outward (what
:func:`diffworld.geometry.marching_cubes.marching_cubes` produces) :func:`mesh_volume` is positive.

The differentiable functions are plain torch expressions, so gradients flow to ``vertices`` in
either dtype; degenerate (zero-area) faces get a zero normal with a zero gradient, never NaN.
:func:`mesh_report` is a vectorized, non-differentiable check of a mesh's topology (watertight,
edge-manifold, orientation, Euler characteristic, genus) that runs in well under a second on
meshes with hundreds of thousands of faces.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from diffworld.engine.bridge import check_faces, check_tensor

__all__ = [
    "MeshReport",
    "check_mesh",
    "face_areas",
    "face_normals",
    "mesh_area",
    "mesh_report",
    "mesh_volume",
    "vertex_normals",
]



def check_mesh(vertices: Any, faces: Any, *, vertices_name: str = "vertices",
               faces_name: str = "faces") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a triangle mesh at the Python boundary.

    Args:
        vertices: [m], shape (V, 3), float32 or float64, finite.
        faces: Integer vertex indices, shape (F, 3), each in ``[0, V)``; same device as ``vertices``.
        vertices_name: Name of the vertex argument in error messages.
        faces_name: Name of the face argument in error messages.

    Returns:
        ``(vertices, faces)`` with ``faces`` as int64 (a copy only when it was another integer type).

    Raises:
        TypeError: A non-tensor, a non-float ``vertices`` or a non-integer ``faces``.
        ValueError: Wrong shapes, non-finite vertices, indices out of range, or different devices.
    """
    check_tensor(vertices_name, vertices, shape=(None, 3))
    if isinstance(faces, torch.Tensor) and faces.device != vertices.device:
        raise ValueError(f"Expected '{faces_name}' on the device of '{vertices_name}' ({vertices.device}), "
                         f"got {faces.device}")
    faces = check_faces(faces_name, faces, vertices.shape[0], vertices_name)
    return vertices, faces


def _corners(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tri = vertices[faces]  # (F, 3, 3); an empty index keeps the graph
    return tri[:, 0], tri[:, 1], tri[:, 2]


def _face_cross(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """``(b - a) x (c - a)`` per face, shape (F, 3): twice the area times the unit normal."""
    a, b, c = _corners(vertices, faces)
    return torch.cross(b - a, c - a, dim=-1)


def _safe_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit length; zero rows stay zero with a zero gradient."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    positive = norm > 0
    return torch.where(positive, x / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(x))


def face_areas(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Triangle areas.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; differentiable.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        Areas [m^2], shape (F,), dtype of ``vertices``.

    Raises:
        TypeError, ValueError: See :func:`check_mesh`.
    """
    vertices, faces = check_mesh(vertices, faces)
    return 0.5 * torch.linalg.vector_norm(_face_cross(vertices, faces), dim=-1)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit face normals ``normalize((b - a) x (c - a))``.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; differentiable.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        Unit normals, shape (F, 3); zero vectors for degenerate faces.

    Raises:
        TypeError, ValueError: See :func:`check_mesh`.
    """
    vertices, faces = check_mesh(vertices, faces)
    return _safe_normalize(_face_cross(vertices, faces))


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals: the normalized sum of the incident faces' area vectors.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; differentiable.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        Unit normals, shape (V, 3); zero vectors at vertices no (non-degenerate) face uses.

    Raises:
        TypeError, ValueError: See :func:`check_mesh`.
    """
    vertices, faces = check_mesh(vertices, faces)
    cross = _face_cross(vertices, faces)  # |cross| = 2 * area, so this is area weighting
    acc = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    return _safe_normalize(acc)


def mesh_area(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Total surface area.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; differentiable.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        Area [m^2], a 0-d tensor (0 for an empty mesh, still attached to the graph).
    """
    return face_areas(vertices, faces).sum()


def mesh_volume(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Signed enclosed volume by the divergence theorem, ``sum_f a . (b x c) / 6``.

    Exact for a closed mesh (and then independent of the origin); positive when the faces are
    oriented with outward normals, negative for inward ones. For an open mesh it is the signed
    volume of the cone from the origin over the surface.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; differentiable.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        Volume [m^3], a 0-d tensor.
    """
    vertices, faces = check_mesh(vertices, faces)
    a, b, c = _corners(vertices, faces)
    return (a * torch.cross(b, c, dim=-1)).sum() / 6.0


class MeshReport(NamedTuple):
    """Topology and hygiene of a triangle mesh.

    Edges are undirected vertex pairs used by at least one face (pairs ``(a, a)`` from faces with
    repeated indices are not edges). Counts and the Euler characteristic use the *referenced*
    vertices only: isolated vertices are reported in ``n_unreferenced_vertices`` and are not
    components.

    Attributes:
        n_vertices: V, all vertices including unreferenced ones.
        n_faces: F.
        n_edges: Number of distinct undirected edges E.
        euler_characteristic: ``V_referenced - E + F``.
        n_components: Connected components of the faces (faces sharing a vertex are connected).
        watertight: At least one face and every edge shared by exactly 2 faces.
        edge_manifold: No edge shared by more than 2 faces.
        consistently_oriented: Edge-manifold and every edge shared by 2 faces is traversed once in
            each direction (boundary edges are allowed).
        genus: ``(2 * n_components - euler_characteristic) / 2`` (the sum of the components'
            genera) when the mesh is watertight and consistently oriented, else ``None``.
        n_unreferenced_vertices: Vertices no face uses.
        n_degenerate_faces: Faces with a repeated vertex index or an area at most
            ``1e-12 * diagonal^2`` (``diagonal`` of the referenced vertices' bounding box).
    """

    n_vertices: int
    n_faces: int
    n_edges: int
    euler_characteristic: int
    n_components: int
    watertight: bool
    edge_manifold: bool
    consistently_oriented: bool
    genus: int | None
    n_unreferenced_vertices: int
    n_degenerate_faces: int

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serializable)."""
        return dict(self._asdict())


DEGENERATE_REL_AREA = 1e-12


def mesh_report(vertices: torch.Tensor, faces: torch.Tensor) -> MeshReport:
    """Topology report of a triangle mesh (not differentiable).

    Vectorized numpy: one sort of the 3F edge keys and one sparse connected-components pass
    (about 0.2 s for 400k faces on one core).

    Args:
        vertices: [m], shape (V, 3), float32 or float64.
        faces: Integer vertex indices, shape (F, 3).

    Returns:
        :class:`MeshReport`.

    Raises:
        TypeError, ValueError: See :func:`check_mesh`.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vertices, faces = check_mesh(vertices, faces)
    v = vertices.detach().cpu().numpy()
    f = faces.detach().cpu().numpy()
    n_v, n_f = int(v.shape[0]), int(f.shape[0])

    referenced = np.zeros(n_v, dtype=bool)
    referenced[f.reshape(-1)] = True
    n_ref = int(referenced.sum())

    # Directed half-edges a->b of every face, self-loops (a == b) dropped.
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    keep = a != b
    a, b = a[keep], b[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keys = lo.astype(np.int64) * np.int64(max(n_v, 1)) + hi
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    n_e = int(uniq.size)
    forward = np.bincount(inverse, weights=(a < b), minlength=n_e) if n_e else np.zeros(0)

    edge_manifold = bool((counts <= 2).all())
    watertight = n_f > 0 and bool((counts == 2).all())
    interior = counts == 2
    consistently_oriented = edge_manifold and bool((forward[interior] == 1).all())

    if n_ref:
        graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n_v, n_v))
        _, labels = connected_components(graph, directed=False)
        n_components = int(np.unique(labels[referenced]).size)
    else:
        n_components = 0

    euler = n_ref - n_e + n_f
    genus = None
    if watertight and consistently_oriented and (2 * n_components - euler) % 2 == 0:
        genus = (2 * n_components - euler) // 2

    repeated = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 2] == f[:, 0])
    if n_f:
        tri = v[f].astype(np.float64)
        area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        used = v[referenced].astype(np.float64)
        diag = float(np.linalg.norm(used.max(axis=0) - used.min(axis=0)))
        tiny = 0.5 * area2 <= DEGENERATE_REL_AREA * diag * diag
        n_degenerate = int((repeated | tiny).sum())
    else:
        n_degenerate = 0

    return MeshReport(
        n_vertices=n_v,
        n_faces=n_f,
        n_edges=n_e,
        euler_characteristic=int(euler),
        n_components=n_components,
        watertight=watertight,
        edge_manifold=edge_manifold,
        consistently_oriented=consistently_oriented,
        genus=genus,
        n_unreferenced_vertices=n_v - n_ref,
        n_degenerate_faces=n_degenerate,
    )

