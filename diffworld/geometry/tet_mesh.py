"""Tetrahedral meshes: signed volumes, element quality, a validity report, and files FEM tools read (VTK).

A tet ``(a, b, c, d)`` is positively oriented when ``det(b - a, c - a, d - a) > 0``; its faces,
oriented outwards, are ``(b, c, d)``, ``(a, d, c)``, ``(a, b, d)`` and ``(a, c, b)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["TetMesh", "TetQuality", "TetReport", "boundary_faces", "load_tet_mesh", "save_tet_mesh", "tet_quality",
           "tet_report", "tet_volumes"]

_FACES = ((1, 2, 3), (0, 3, 2), (0, 1, 3), (0, 2, 1))


def tet_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    """Signed volumes (T,) [m^3] of tets (T, 4) over vertices (V, 3); differentiable."""
    p = vertices[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6


# For each of the 6 edges (i, j): the two other corners (k, l); the edge is shared by the faces
# opposite k and opposite l.
_EDGE_OPPOSITE = ((2, 3), (1, 3), (1, 2), (0, 3), (0, 2), (0, 1))  # edges 01, 02, 03, 12, 13, 23


def edge_mean_ratio(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ratio (see :class:`TetQuality`) of tets given by their edge vectors from corner 0.

    Args:
        edges: (T, 3, 3) ``p1 - p0, p2 - p0, p3 - p0`` [m].

    Returns:
        ``(mean_ratio, det)``: both (T,); ``det`` is 6 x the signed volume [m^3].
    """
    det = torch.linalg.det(edges)
    e0, e1, e2 = edges.unbind(1)
    sum_l2 = edges.square().sum((1, 2)) + (e1 - e0).square().sum(1) + (e2 - e0).square().sum(1) + (e2 - e1).square().sum(1)
    # 12 (3 |V|)^(2/3) / sum l^2 with V = det / 6
    ratio = 12 * torch.sign(det) * (det.abs() / 2).pow(2 / 3) / sum_l2.clamp_min(torch.finfo(edges.dtype).tiny)
    return ratio, det


class TetQuality(NamedTuple):
    """Per-tet shape measures (see :func:`tet_quality`); all (T,).

    Attributes:
        mean_ratio: ``12 (3 |V|)^(2/3) / sum of squared edge lengths``, signed like the volume: 1
            for a regular tet, 0 for a flat one, negative for an inverted one. Scale-invariant.
        min_dihedral: Smallest of the 6 interior dihedral angles [rad].
        max_dihedral: Largest of them [rad].
    """

    mean_ratio: torch.Tensor
    min_dihedral: torch.Tensor
    max_dihedral: torch.Tensor


def tet_quality(vertices: torch.Tensor, tets: torch.Tensor) -> TetQuality:
    """Shape quality of each tet, differentiable in the vertices (away from flat tets).

    FEM cares about both measures: the mean ratio (Liu and Joe 1994) bounds the conditioning of a
    linear element's stiffness, and dihedral angles near 0 or 180 degrees (slivers, caps) make
    its gradients large. A regular tet has mean ratio 1 and all dihedral angles arccos(1/3)
    (70.53 degrees).

    Args:
        vertices: (V, 3) [m].
        tets: (T, 4) int64, positively oriented (see the module).

    Returns:
        :class:`TetQuality`.
    """
    p = vertices[tets]  # (T, 4, 3)
    mean_ratio, _ = edge_mean_ratio(p[:, 1:] - p[:, :1])
    # Outward normals of the faces opposite each corner; interior dihedral angle at an edge is
    # pi minus the angle between the outward normals of its two faces.
    normals = torch.stack([torch.linalg.cross(p[:, b] - p[:, a], p[:, c] - p[:, a]) for a, b, c in _FACES], 1)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    k, m = torch.tensor(_EDGE_OPPOSITE, device=tets.device).unbind(1)
    cos = -(normals[:, k] * normals[:, m]).sum(-1)  # (T, 6)
    # acos' is infinite at +-1: clamp just inside so that degenerate tets keep finite gradients
    angles = torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    return TetQuality(mean_ratio, angles.min(1).values, angles.max(1).values)


class TetReport(NamedTuple):
    """Validity of a tet mesh (see :func:`tet_report`).

    Attributes:
        n_tets: Number of tets.
        n_inverted: Tets with signed volume <= 0.
        min_volume: Smallest signed volume [m^3].
        volume: Sum of signed volumes [m^3].
        n_boundary_faces: Faces used by exactly one tet.
        n_bad_interior_faces: Faces used by two tets with the same orientation, or by more than two.
        boundary_is_surface: Whether the boundary faces, oriented, are exactly the given surface
            triangles (None when no surface was given).
        n_unreferenced_vertices: Vertices no tet uses.
        min_mean_ratio: Smallest mean ratio (see :class:`TetQuality`; 1 regular, <= 0 flat or
            inverted); 0 for an empty mesh.
        min_dihedral_deg: Smallest dihedral angle of any tet [deg].
        max_dihedral_deg: Largest dihedral angle of any tet [deg].
    """

    n_tets: int
    n_inverted: int
    min_volume: float
    volume: float
    n_boundary_faces: int
    n_bad_interior_faces: int
    boundary_is_surface: bool | None
    n_unreferenced_vertices: int
    min_mean_ratio: float = 0.0
    min_dihedral_deg: float = 0.0
    max_dihedral_deg: float = 0.0

    @property
    def valid(self) -> bool:
        """Positively oriented, conforming, and bounded by the surface (when one was given)."""
        return (self.n_inverted == 0 and self.n_bad_interior_faces == 0 and self.n_unreferenced_vertices == 0
                and self.boundary_is_surface is not False)


def _canonical(tris: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted vertex triples and the parity (0/1) of the sort, per oriented triangle."""
    key, order = tris.sort(1)
    parity = ((order[:, 0] > order[:, 1]).long() + (order[:, 0] > order[:, 2]).long()
              + (order[:, 1] > order[:, 2]).long()) % 2
    return key, parity


@torch.no_grad()
def boundary_faces(tets: torch.Tensor) -> torch.Tensor:
    """The faces used by exactly one tet, (F, 3) int64, oriented outwards for positive tets.

    Args:
        tets: (T, 4) int64.
    """
    faces = torch.cat([tets[:, list(f)] for f in _FACES])
    key, _ = _canonical(faces)
    _, inv, count = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    return faces[count[inv] == 1]


@torch.no_grad()
def tet_report(vertices: torch.Tensor, tets: torch.Tensor, surface: torch.Tensor | None = None) -> TetReport:
    """Check a tet mesh: orientation, conformity, and (optionally) its boundary against a surface.

    Args:
        vertices: (V, 3) [m].
        tets: (T, 4) int64.
        surface: (F, 3) int64 outward triangles the boundary should equal, or None.

    Returns:
        :class:`TetReport`.
    """
    vol = tet_volumes(vertices.detach(), tets)
    faces = torch.cat([tets[:, list(f)] for f in _FACES])
    key, parity = _canonical(faces)
    if vertices.shape[0] < (1 << 21):  # one int64 per face: a 1-D unique is far faster
        code = (key[:, 0] << 42) | (key[:, 1] << 21) | key[:, 2]
        code_u, inv, count = torch.unique(code, return_inverse=True, return_counts=True)
        mask = (1 << 21) - 1
        uniq = torch.stack([code_u >> 42, (code_u >> 21) & mask, code_u & mask], 1)
    else:
        uniq, inv, count = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    signed = torch.zeros(uniq.shape[0], dtype=torch.int64, device=tets.device).index_add_(0, inv, 1 - 2 * parity)
    bad_interior = int(((count == 2) & (signed != 0)).sum() + (count > 2).sum())
    boundary = count == 1
    boundary_is_surface = None
    if surface is not None:
        b_key = uniq[boundary]
        b_sign = signed[boundary]
        s_key, s_par = _canonical(surface)
        order = torch.argsort(s_key[:, 0] * (1 << 42) + s_key[:, 1] * (1 << 21) + s_key[:, 2])
        s_key, s_sign = s_key[order], (1 - 2 * s_par)[order]
        border = torch.argsort(b_key[:, 0] * (1 << 42) + b_key[:, 1] * (1 << 21) + b_key[:, 2])
        boundary_is_surface = (b_key.shape[0] == s_key.shape[0]
                               and bool((b_key[border] == s_key).all()) and bool((b_sign[border] == s_sign).all()))
    quality = tet_quality(vertices.detach(), tets) if tets.shape[0] else None
    used = torch.zeros(vertices.shape[0], dtype=torch.bool, device=tets.device)
    used[tets.reshape(-1)] = True
    return TetReport(
        n_tets=int(tets.shape[0]), n_inverted=int((vol <= 0).sum()),
        min_volume=float(vol.min()) if vol.numel() else 0.0, volume=float(vol.sum()),
        n_boundary_faces=int(boundary.sum()), n_bad_interior_faces=bad_interior,
        boundary_is_surface=boundary_is_surface, n_unreferenced_vertices=int((~used).sum()),
        min_mean_ratio=float(quality.mean_ratio.min()) if quality else 0.0,
        min_dihedral_deg=float(quality.min_dihedral.min().rad2deg()) if quality else 0.0,
        max_dihedral_deg=float(quality.max_dihedral.max().rad2deg()) if quality else 0.0)


def save_tet_mesh(path: str | Path, vertices: torch.Tensor, tets: torch.Tensor, **cell_data: torch.Tensor) -> Path:
    """Write a tet mesh as a VTK unstructured grid (``.vtu`` or ``.vtk``), which FEM tools and
    ParaView read (meshio converts it further).

    Args:
        path: Output file; its suffix picks the format.
        vertices: (V, 3) [m].
        tets: (T, 4) int64, positively oriented.
        **cell_data: Optional per-tet arrays (T, ...) stored by name.

    Returns:
        The path written.

    Raises:
        ValueError: An unsupported suffix, or tets that index outside ``vertices``.
    """
    import pyvista as pv

    path = Path(path)
    if path.suffix not in (".vtu", ".vtk"):
        raise ValueError(f"save_tet_mesh: expected a '.vtu' or '.vtk' path, got {str(path)!r}")
    t = tets.detach().cpu().numpy().astype(np.int64)
    v = vertices.detach().cpu().numpy().astype(np.float64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"save_tet_mesh: expected 'tets' of shape (T, 4), got {tuple(t.shape)}")
    if t.size and (t.min() < 0 or t.max() >= v.shape[0]):
        raise ValueError(f"save_tet_mesh: 'tets' index vertices 0..{v.shape[0] - 1}, got {t.min()}..{t.max()}")
    grid = pv.UnstructuredGrid({pv.CellType.TETRA: t}, v)
    for name, value in cell_data.items():
        grid.cell_data[name] = value.detach().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(str(path))
    return path


def load_tet_mesh(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a tet mesh written by :func:`save_tet_mesh`: (V, 3) float64 and (T, 4) int64.

    Raises:
        ValueError: The file holds cells other than tetrahedra.
    """
    import pyvista as pv

    grid = pv.read(str(path))
    cells = grid.cells_dict
    if set(cells) != {pv.CellType.TETRA}:
        raise ValueError(f"load_tet_mesh: {str(path)!r} holds cell types {sorted(int(c) for c in cells)}, "
                         f"expected only tetrahedra ({int(pv.CellType.TETRA)})")
    return (torch.as_tensor(np.asarray(grid.points, dtype=np.float64)),
            torch.as_tensor(np.asarray(cells[pv.CellType.TETRA], dtype=np.int64)))


class TetMesh(NamedTuple):
    """A tetrahedral mesh, as FEM takes it.

    Attributes:
        vertices: (V, 3) [m]; gradients flow through it (e.g. from FlexiCubes' inputs).
        tets: (T, 4) int64, positively oriented (:func:`tet_volumes` > 0 on a valid mesh).
        surface: (F, 3) int64 boundary triangles, oriented outwards, indexing ``vertices``.
    """

    vertices: torch.Tensor
    tets: torch.Tensor
    surface: torch.Tensor

    def volumes(self) -> torch.Tensor:
        """Signed volume of each tet (T,) [m^3]; differentiable."""
        return tet_volumes(self.vertices, self.tets)

    def quality(self) -> TetQuality:
        """Mean ratio and dihedral angles of each tet."""
        return tet_quality(self.vertices, self.tets)

    def report(self) -> TetReport:
        """Validity: orientation, conformity, and whether the boundary is exactly ``surface``."""
        return tet_report(self.vertices, self.tets, self.surface)

    def save(self, path: str | Path, **cell_data: torch.Tensor) -> Path:
        """Write a VTK unstructured grid (:func:`save_tet_mesh`)."""
        return save_tet_mesh(path, self.vertices, self.tets, **cell_data)

    @staticmethod
    def load(path: str | Path) -> "TetMesh":
        """Read a file written by :meth:`save`; the surface is the tets' boundary."""
        vertices, tets = load_tet_mesh(path)
        return TetMesh(vertices, tets, boundary_faces(tets))
