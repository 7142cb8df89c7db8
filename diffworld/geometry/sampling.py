"""Surface sampling of triangle meshes and normal estimation for point clouds.

:func:`sample_surface` draws points uniformly by area: a face is chosen with probability
proportional to its (detached) area, then a point uniformly inside it with the square-root
barycentric map ``(1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2)``. The face choice and the
barycentric coordinates are constants of the draw, so the points are linear in the vertices and
gradients flow to them (the re-weighting of faces by area is not differentiated, as in every
reparameterized surface sampler).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from diffworld.engine.bridge import check_tensor
from diffworld.geometry.mesh_ops import _face_cross, _safe_normalize, check_mesh

__all__ = ["SurfaceSamples", "estimate_normals", "sample_surface"]

# torch.multinomial accepts at most 2**24 categories; larger meshes use an inverse-CDF draw.
_MULTINOMIAL_MAX_CATEGORIES = 2**24


class SurfaceSamples(NamedTuple):
    """Points drawn on a mesh surface.

    Attributes:
        points: [m], shape (n, 3), dtype of the vertices; differentiable w.r.t. the vertices.
        normals: Unit face normals at the points, shape (n, 3); differentiable.
        face_index: int64 index of the face each point lies on, shape (n,).
    """

    points: torch.Tensor
    normals: torch.Tensor
    face_index: torch.Tensor


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"Expected '{name}' to be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"Expected '{name}' >= 0, got {n}")
    return int(n)


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, n: int,
                   generator: torch.Generator | None = None) -> SurfaceSamples:
    """Sample ``n`` points uniformly by area on a triangle mesh.

    Args:
        vertices: [m], shape (V, 3), float32 or float64; gradients flow to it.
        faces: Integer vertex indices, shape (F, 3).
        n: Number of points, >= 0.
        generator: Torch generator for reproducible draws (the global RNG of the device of
            ``vertices`` when ``None``). The draws are made on the generator's device and moved
            to the vertices', so a CPU generator gives every device the same random numbers (the
            chosen faces can still differ where the face areas round differently on another device).

    Returns:
        :class:`SurfaceSamples`. A mesh without faces or without area (every face degenerate)
        has no surface to sample: it gives (0, 3), (0, 3) and (0,) tensors, whatever ``n``;
        ``points`` and ``normals`` are still attached to the graph of ``vertices``.

    Raises:
        TypeError, ValueError: Bad mesh (see :func:`diffworld.geometry.mesh_ops.check_mesh`)
            or bad ``n``.
    """
    vertices, faces = check_mesh(vertices, faces)
    n = _check_count("n", n)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected 'generator' to be a torch.Generator or None, got {type(generator).__name__}")
    dev, dtype = vertices.device, vertices.dtype

    with torch.no_grad():
        weights = 0.5 * torch.linalg.vector_norm(_face_cross(vertices.detach(), faces), dim=-1)
        total = float(weights.sum()) if weights.numel() else 0.0
    if n == 0 or not total > 0.0:
        idx = torch.zeros(0, dtype=torch.int64, device=dev)
        tri = vertices[faces[idx]]  # (0, 3, 3), attached to the graph
        empty = tri.sum(dim=1)
        return SurfaceSamples(empty, empty.clone(), idx)

    draw = generator.device if generator is not None else dev
    weights = weights.to(draw)
    if weights.numel() <= _MULTINOMIAL_MAX_CATEGORIES:
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        cdf = torch.cumsum(weights.double(), 0)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=draw) * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp_max(weights.numel() - 1)
    idx = idx.to(dev)
    r = torch.rand((n, 2), generator=generator, dtype=dtype, device=draw).to(dev)
    s = torch.sqrt(r[:, 0:1])
    bary = torch.cat((1.0 - s, s * (1.0 - r[:, 1:2]), s * r[:, 1:2]), dim=1)  # (n, 3)

    tri = vertices[faces[idx]]  # (n, 3, 3)
    points = (bary.unsqueeze(-1) * tri).sum(dim=1)
    normals = _safe_normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1))
    return SurfaceSamples(points, normals, idx)


def estimate_normals(points: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Unoriented normals of a point cloud by PCA of each point's ``k`` nearest neighbours.

    The normal is the eigenvector of the smallest eigenvalue of the neighbourhood covariance
    (the point itself included). Its sign is arbitrary: compare with orientation-insensitive
    measures (``|n . m|``). Not differentiable (the result is detached).

    Args:
        points: [m], shape (N, 3), float32 or float64.
        k: Neighbourhood size, >= 3 (clamped to N when N is smaller).

    Returns:
        Unit normals, shape (N, 3), dtype and device of ``points``. N < 3 gives zero normals.

    Raises:
        TypeError, ValueError: Bad ``points`` or ``k``.
    """
    from scipy.spatial import cKDTree

    check_tensor("points", points, shape=(None, 3))
    k = _check_count("k", k)
    if k < 3:
        raise ValueError(f"Expected 'k' >= 3 (a plane needs 3 points), got {k}")
    n = points.shape[0]
    if n < 3:
        return torch.zeros_like(points).detach()
    x = points.detach().cpu().numpy().astype(np.float64)
    k = min(k, n)
    _, nbr = cKDTree(x, balanced_tree=False).query(x, k=k, workers=-1)
    nb = x[nbr]  # (N, k, 3)
    centered = nb - nb.mean(axis=1, keepdims=True)
    cov = np.matmul(centered.transpose(0, 2, 1), centered)  # (N, 3, 3)
    _, vecs = np.linalg.eigh(cov)
    normals = vecs[:, :, 0]
    return torch.from_numpy(normals).to(device=points.device, dtype=points.dtype)
