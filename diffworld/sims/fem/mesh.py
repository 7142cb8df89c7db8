"""The tetrahedral mesh of an FEM solid: rest shape, validation, and the rest quantities linear
elements need.

A tet ``(a, b, c, d)`` is positively oriented when ``det(b - a, c - a, d - a) > 0`` (the
convention of :mod:`diffworld.geometry.tet_mesh`); every :class:`TetMesh` holds only positive
tets, so the rest volumes and ``Dm_inv`` are computed once and trusted by the solver.

The rest shape is a constant of the simulation: the vertices are detached at construction
(gradients with respect to the rest shape, e.g. from FlexiCubes' inputs, are a later addition).
Material parameters are not part of the mesh; :meth:`TetMesh.lumped_masses` is differentiable in
the density.

Example::

    mesh = TetMesh.box((0, 0, 0), (0.1, 0.02, 0.02), (20, 4, 4))          # a cantilever [m]
    fixed = mesh.nodes_in_box((0, 0, 0), (0, 0.02, 0.02))                 # clamped end
    masses = mesh.lumped_masses(torch.tensor(1100.0, requires_grad=True))  # [kg]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from diffworld.geometry.tet_mesh import boundary_faces, save_tet_mesh

__all__ = ["TetMesh"]

# Local corner pairs of the 6 edges of a tet, in the column order of ``TetMesh.edge_lengths``.
EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))

# A tet whose |volume| is at most this times its mean edge length cubed is degenerate (flat): a
# regular tet has V / l^3 = 0.118, so this only catches tets with no usable volume, whose inverse
# rest matrix would be meaningless.
DEGENERATE_RATIO = 1e-12

_MAX_LISTED = 5  # elements named in one error message
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _kuhn_corners() -> np.ndarray:
    """The 6 tets (6, 4) of a unit cube's corners (corner index ``4 i + 2 j + k`` for offset
    ``(i, j, k)``) around the diagonal 0 -> 7, all positively oriented.

    Each tet walks from corner 0 to corner 7 along the axes in one order (a permutation); every
    cube face is then cut by its own diagonal from its lowest to its highest corner, the same cut
    the neighbouring cube makes, so the split of a grid of cubes is conforming.
    """
    tets = []
    for perm in itertools.permutations(range(3)):
        offset, path = np.zeros(3, dtype=np.int64), [0]
        for axis in perm:
            offset[axis] = 1
            path.append(int(4 * offset[0] + 2 * offset[1] + offset[2]))
        # The edge matrix of a path is a permutation matrix with the axes in order perm: its
        # determinant is the permutation's sign, so odd permutations are swapped back to positive.
        inversions = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3))
        if inversions % 2:
            path[1], path[2] = path[2], path[1]
        tets.append(path)
    return np.asarray(tets, dtype=np.int64)


def _rest_quantities(vertices: torch.Tensor, tets: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Dm`` (T, 3, 3) (columns x1-x0, x2-x0, x3-x0) [m], signed ``volume`` (T,) [m^3] and
    ``edge_lengths`` (T, 6) [m], computed in float64 whatever the vertices' dtype."""
    p = vertices.to(torch.float64)[tets]  # (T, 4, 3)
    Dm = (p[:, 1:] - p[:, :1]).transpose(1, 2)
    i, j = torch.tensor(EDGES, device=tets.device).unbind(1)
    return {"Dm": Dm, "volume": torch.linalg.det(Dm) / 6, "edge_lengths": (p[:, j] - p[:, i]).norm(dim=-1)}


def _listed(ids: torch.Tensor, values: torch.Tensor | None = None, unit: str = "") -> str:
    """``"3 (-1.2e-06 m^3), 8 (...) and 4 more"``: the first few element ids, with values."""
    ids_l = ids[:_MAX_LISTED].tolist()
    if values is None:
        parts = [str(i) for i in ids_l]
    else:
        parts = [f"{i} ({v:.3g}{unit})" for i, v in zip(ids_l, values[:_MAX_LISTED].tolist())]
    more = f" and {ids.numel() - _MAX_LISTED} more" if ids.numel() > _MAX_LISTED else ""
    return ", ".join(parts) + more


def _as_tensor(name: str, value: Any, prefix: str) -> torch.Tensor:
    """A tensor from a tensor, numpy array or nested sequence, with the argument named on failure."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{prefix}: expected '{name}' to be a tensor or array, got {type(value).__name__}") from err


def _check_vertices(vertices: torch.Tensor, prefix: str) -> torch.Tensor:
    """(N, 3) finite real vertices as a detached, contiguous float64 tensor."""
    if vertices.dtype == torch.bool or vertices.is_complex():
        raise TypeError(f"{prefix}: expected 'vertices' of a real dtype (float64 preferred), got {vertices.dtype}")
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{prefix}: expected 'vertices' of shape (N, 3), got {tuple(vertices.shape)}")
    if vertices.shape[0] < 4:
        raise ValueError(f"{prefix}: expected at least 4 'vertices', got {vertices.shape[0]}")
    vertices = vertices.detach().to(torch.float64).contiguous()
    bad = (~torch.isfinite(vertices)).any(1).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{prefix}: 'vertices' has {bad.numel()} non-finite row(s) (NaN or Inf): vertices[{i}] = "
                         f"{vertices[i].tolist()} (rows {_listed(bad)})")
    return vertices


def _check_tets(tets: torch.Tensor, n_vertices: int, prefix: str) -> torch.Tensor:
    """(T, 4) int64 tets with indices in range and four distinct corners each."""
    if tets.dtype not in _INT_DTYPES:
        raise TypeError(f"{prefix}: expected 'tets' of an integer dtype (int64 preferred), got {tets.dtype}")
    if tets.dim() != 2 or tets.shape[1] != 4:
        raise ValueError(f"{prefix}: expected 'tets' of shape (T, 4), got {tuple(tets.shape)}")
    if tets.shape[0] == 0:
        raise ValueError(f"{prefix}: 'tets' is empty; an FEM solid needs at least one tet")
    tets = tets.to(torch.int64).contiguous()
    out = ((tets < 0) | (tets >= n_vertices)).any(1).nonzero().flatten()
    if out.numel():
        e = int(out[0])
        row = tets[e].tolist()
        index = next(v for v in row if v < 0 or v >= n_vertices)
        raise ValueError(f"{prefix}: tets[{e}] = {row} has index {index} outside [0, {n_vertices}) for "
                         f"{n_vertices} 'vertices' ({out.numel()} such tet(s): {_listed(out)})")
    key = tets.sort(1).values
    repeated = (key[:, 1:] == key[:, :-1]).any(1).nonzero().flatten()
    if repeated.numel():
        e = int(repeated[0])
        raise ValueError(f"{prefix}: tets[{e}] = {tets[e].tolist()} repeats a vertex ({repeated.numel()} such "
                         f"tet(s): {_listed(repeated)})")
    return tets


def _degenerate(volume: torch.Tensor, edge_lengths: torch.Tensor) -> torch.Tensor:
    """Ids of the tets whose |volume| is at most ``DEGENERATE_RATIO`` x their mean edge length cubed."""
    # <= so that a tet whose four corners coincide (volume 0, edges 0) counts as degenerate
    return (volume.abs() <= DEGENERATE_RATIO * edge_lengths.mean(1).pow(3)).nonzero().flatten()


def _check_volumes(volume: torch.Tensor, edge_lengths: torch.Tensor, prefix: str) -> None:
    """Reject degenerate tets, then inverted ones (a flip cannot fix a flat tet)."""
    flat = _degenerate(volume, edge_lengths)
    if flat.numel():
        raise ValueError(f"{prefix}: {flat.numel()} degenerate tet(s) (|volume| <= {DEGENERATE_RATIO:g} x mean edge "
                         f"length^3): tets {_listed(flat, volume[flat], ' m^3')}; remove or re-mesh them")
    inverted = (volume < 0).nonzero().flatten()
    if inverted.numel():
        raise ValueError(f"{prefix}: {inverted.numel()} inverted tet(s) (negative volume): tets "
                         f"{_listed(inverted, volume[inverted], ' m^3')}; pass orient=True to flip them")


@dataclass(frozen=True, eq=False, repr=False)
class TetMesh:
    """Tetrahedral mesh of an FEM solid at rest, validated, with its rest quantities cached.

    Build it with :meth:`from_arrays`, :meth:`from_flexicubes`, :meth:`load` or :meth:`box`;
    calling ``TetMesh(vertices, tets)`` directly validates the same way (without ``orient``).

    Attributes:
        vertices: Rest positions [m], shape (N, 3), float64 (float32 after ``to``); detached:
            the rest shape is a constant of the simulation.
        tets: Vertex indices, shape (T, 4), int64, positively oriented. Vertices no tet uses are
            allowed (e.g. a file's geometry points) and counted in ``repr``; they get zero mass.
        name: What the mesh came from (a file path, ``"box"``...), used in error messages.
        Dm_inv: Inverse rest edge matrices, shape (T, 3, 3) [1/m]; ``Dm`` has columns
            ``x1 - x0, x2 - x0, x3 - x0``, so the deformation gradient is ``Ds @ Dm_inv``.
        rest_volume: Rest volume of each tet, shape (T,) [m^3], positive.
        edge_lengths: Rest length of each tet's 6 edges (01, 02, 03, 12, 13, 23), shape (T, 6) [m].
    """

    vertices: torch.Tensor
    tets: torch.Tensor
    name: str = "mesh"
    Dm_inv: torch.Tensor = field(init=False)
    rest_volume: torch.Tensor = field(init=False)
    edge_lengths: torch.Tensor = field(init=False)
    _cache: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        prefix = f"TetMesh {self.name!r}"
        vertices = _check_vertices(_as_tensor("vertices", self.vertices, prefix), prefix)
        tets = _check_tets(_as_tensor("tets", self.tets, prefix), vertices.shape[0], prefix).to(vertices.device)
        rest = _rest_quantities(vertices, tets)
        _check_volumes(rest["volume"], rest["edge_lengths"], prefix)
        self._set(vertices=vertices, tets=tets, Dm_inv=torch.linalg.inv(rest["Dm"]), rest_volume=rest["volume"],
                  edge_lengths=rest["edge_lengths"])

    def _set(self, **values: Any) -> None:
        # The dataclass is frozen for users; construction fills its derived fields once.
        for key, value in values.items():
            object.__setattr__(self, key, value)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(cls, vertices: Any, tets: Any, *, name: str = "mesh", orient: bool = False) -> "TetMesh":
        """Validate and wrap vertex and tet arrays.

        Args:
            vertices: Rest positions [m], shape (N, 3): a tensor, numpy array or nested
                sequence of real numbers (stored as float64, detached).
            tets: Vertex indices, shape (T, 4), of an integer dtype.
            name: Name used in error messages (e.g. the file the arrays came from).
            orient: Flip inverted tets (negative volume) by swapping two corners instead of
                raising. Degenerate (flat) tets are rejected either way.

        Returns:
            The mesh.

        Raises:
            TypeError: ``vertices`` not real or ``tets`` not integer.
            ValueError: Wrong shapes, no tets, non-finite vertices, an index out of range, a tet
                repeating a vertex, degenerate tets, or (without ``orient``) inverted tets; the
                message names the offending element ids and values.
        """
        prefix = f"TetMesh {name!r}"
        if orient:
            v = _check_vertices(_as_tensor("vertices", vertices, prefix), prefix)
            t = _check_tets(_as_tensor("tets", tets, prefix), v.shape[0], prefix).to(v.device)
            rest = _rest_quantities(v, t)
            _check_volumes(rest["volume"].abs(), rest["edge_lengths"], prefix)  # degenerate only
            flip = rest["volume"] < 0
            # Swapping corners 1 and 2 negates the edge matrix's determinant.
            vertices, tets = v, torch.where(flip[:, None], t[:, [0, 2, 1, 3]], t)
        return cls(vertices, tets, name)

    @classmethod
    def from_flexicubes(cls, mesh: Any, *, name: str = "flexicubes") -> "TetMesh":
        """The tets of ``flexicubes(..., output="tetrahedra")``, as they come.

        The vertices are detached: the FEM rest shape is a constant here, so gradients do not
        flow back into the FlexiCubes inputs through it (a later issue connects shape gradients).

        Args:
            mesh: A :class:`~diffworld.geometry.flexicubes.FlexiCubesMesh` with ``tets`` (or
                any object with ``vertices`` (N, 3) and ``tets`` (T, 4)).
            name: Name used in error messages.

        Raises:
            TypeError: ``mesh`` has no tets (extracted with ``output="triangles"``).
            ValueError: Empty or invalid tets (see :meth:`from_arrays`).
        """
        tets = getattr(mesh, "tets", None)
        if tets is None or not hasattr(mesh, "vertices"):
            raise TypeError(f"TetMesh {name!r}: expected a FlexiCubesMesh with tets; extract it with "
                            f"flexicubes(..., output='tetrahedra') (got {type(mesh).__name__} without 'tets')")
        vertices = mesh.vertices.detach() if isinstance(mesh.vertices, torch.Tensor) else mesh.vertices
        return cls.from_arrays(vertices, tets, name=name)

    @classmethod
    def load(cls, path: str | Path, *, orient: bool = False) -> "TetMesh":
        """Read the tetrahedra of a ``.vtu``/``.vtk`` (pyvista) or ``.msh`` (Gmsh, meshio) file.

        Other cells (boundary triangles, lines, points of a Gmsh file) are ignored; all the file's
        points are kept so that node numbers match the file (unused ones are counted in ``repr``).

        Args:
            path: The file; its suffix picks the reader.
            orient: Flip inverted tets instead of raising (see :meth:`from_arrays`).

        Raises:
            FileNotFoundError: No such file.
            ValueError: An unsupported suffix, an unreadable file, no linear tetrahedra, or invalid
                tets; every message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TetMesh.load: no such file {str(path)!r}")
        readers = {".vtu": _read_vtk, ".vtk": _read_vtk, ".msh": _read_msh}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"TetMesh.load: {str(path)!r} has suffix {path.suffix!r}; expected one of "
                             f"{sorted(readers)}")
        points, tets, other = reader(path)
        if tets is None:
            hint = ("quadratic tets are not supported, export linear ones (Gmsh: -order 1)"
                    if {"tetra10", "QUADRATIC_TETRA"} & set(other) else "the file holds no volume mesh")
            raise ValueError(f"TetMesh.load: {str(path)!r} holds no linear tetrahedra (cells: {other}); {hint}")
        return cls.from_arrays(points, tets, name=str(path), orient=orient)

    @classmethod
    def box(cls, lower: Sequence[float], upper: Sequence[float], res: int | Sequence[int]) -> "TetMesh":
        """A structured conforming mesh of a box: ``nx x ny x nz`` cells, each split into 6 tets
        around its diagonal from the lowest to the highest corner (Kuhn / Freudenthal split).

        Vertex ``(i, j, k)`` of the grid has index ``(i (ny + 1) + j) (nz + 1) + k``; the 6
        tets of cell ``(i, j, k)`` are rows ``6 ((i ny + j) nz + k)`` on.

        Args:
            lower: (3,) lowest corner [m].
            upper: (3,) highest corner [m], above ``lower`` on every axis.
            res: Cells per axis, an int or (3,) ints >= 1.

        Returns:
            The mesh, float64, ``6 nx ny nz`` tets, all of volume ``hx hy hz / 6``.

        Raises:
            ValueError: Bad corners or resolution.
        """
        lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        if lo.shape != (3,) or hi.shape != (3,) or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError(f"TetMesh.box: expected finite 'lower' and 'upper' of 3 numbers, got {lower}, {upper}")
        if (hi <= lo).any():
            a = int(np.argmax(hi <= lo))
            raise ValueError(f"TetMesh.box: 'upper' must exceed 'lower' on every axis; on {'xyz'[a]} got "
                             f"lower {lo[a]:g}, upper {hi[a]:g}")
        n = np.broadcast_to(np.asarray(res), (3,)) if np.ndim(res) == 0 else np.asarray(res)
        if n.shape != (3,) or not np.issubdtype(n.dtype, np.integer) or (n < 1).any():
            raise ValueError(f"TetMesh.box: expected 'res' an int or 3 ints >= 1, got {res}")
        nx, ny, nz = (int(k) for k in n)
        # linspace puts the last node exactly on ``upper``, so nodes_in_box finds the faces exactly
        axes = [np.linspace(lo[a], hi[a], int(n[a]) + 1) for a in range(3)]
        vertices = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        i, j, k = (g.reshape(-1) for g in np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"))
        corner = np.array([[(a * (ny + 1) + b) * (nz + 1) + c for a in (0, 1) for b in (0, 1) for c in (0, 1)]])
        base = ((i * (ny + 1) + j) * (nz + 1) + k)[:, None]
        cells = base + corner  # (C, 8) vertex ids of each cell's corners, corner index 4a + 2b + c
        tets = cells[:, _kuhn_corners()].reshape(-1, 4)
        return cls(torch.from_numpy(vertices), torch.from_numpy(tets), "box")

    # ------------------------------------------------------------------ derived quantities

    @property
    def n_vertices(self) -> int:
        """Number of vertices N (used or not)."""
        return int(self.vertices.shape[0])

    @property
    def n_tets(self) -> int:
        """Number of tets T."""
        return int(self.tets.shape[0])

    def volume(self) -> float:
        """Total rest volume [m^3]."""
        return float(self.rest_volume.sum())

    def min_edge(self) -> float:
        """Shortest rest edge of the mesh [m] (the length scale of the explicit CFL limit)."""
        return float(self.edge_lengths.min())

    def surface_faces(self) -> torch.Tensor:
        """Boundary triangles (F, 3) int64: the faces used by exactly one tet, ordered so that
        ``(b - a) x (c - a)`` points out of the solid. Cached."""
        if "surface_faces" not in self._cache:
            self._cache["surface_faces"] = boundary_faces(self.tets)
        return self._cache["surface_faces"]

    def surface_nodes(self) -> torch.Tensor:
        """Sorted ids (S,) int64 of the vertices on the boundary triangles. Cached."""
        if "surface_nodes" not in self._cache:
            self._cache["surface_nodes"] = torch.unique(self.surface_faces())
        return self._cache["surface_nodes"]

    def unused_vertices(self) -> torch.Tensor:
        """Sorted ids (K,) int64 of the vertices no tet uses."""
        used = torch.zeros(self.n_vertices, dtype=torch.bool, device=self.tets.device)
        used[self.tets.reshape(-1)] = True
        return (~used).nonzero().flatten()

    def lumped_masses(self, density: float | torch.Tensor) -> torch.Tensor:
        """Lumped nodal masses: each tet's mass ``density x rest volume`` split equally to its 4
        corners. Differentiable in ``density``.

        Args:
            density: [kg/m^3], a positive number, a 0-d tensor or a per-tet tensor (T,).

        Returns:
            (N,) [kg] in the mesh's dtype; vertices no tet uses get 0.

        Raises:
            TypeError: ``density`` not a real number or tensor.
            ValueError: Wrong shape, non-finite or non-positive values (the message names the
                first elements).
        """
        prefix = f"TetMesh {self.name!r}: lumped_masses"
        if isinstance(density, bool) or not isinstance(density, (int, float, torch.Tensor)):
            raise TypeError(f"{prefix}: expected 'density' a number or tensor [kg/m^3], got {type(density).__name__}")
        rho = torch.as_tensor(density, device=self.vertices.device)
        if rho.dtype == torch.bool or rho.is_complex():
            raise TypeError(f"{prefix}: expected 'density' of a real dtype, got {rho.dtype}")
        if rho.dim() not in (0, 1) or (rho.dim() == 1 and rho.shape[0] != self.n_tets):
            raise ValueError(f"{prefix}: expected 'density' a scalar or of shape ({self.n_tets},) (one per tet), "
                             f"got {tuple(rho.shape)}")
        rho = rho.to(device=self.vertices.device, dtype=self.vertices.dtype)  # a differentiable cast
        values = rho.detach().expand(self.n_tets)
        bad = (~(torch.isfinite(values) & (values > 0))).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"{prefix}: 'density' must be finite and > 0; tets {_listed(bad, values[bad], ' kg/m^3')}")
        quarter = (rho * self.rest_volume / 4).expand(self.n_tets)
        masses = torch.zeros(self.n_vertices, dtype=quarter.dtype, device=quarter.device)
        return masses.index_add(0, self.tets.reshape(-1), quarter.repeat_interleave(4))

    # ------------------------------------------------------------------ node sets

    def nodes_where(self, predicate: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """Ids of the vertices a predicate of rest positions selects (for Dirichlet sets).

        Args:
            predicate: ``fn(positions (N, 3) [m]) -> (N,) bool`` (tensor or numpy array).

        Returns:
            Sorted ids (K,) int64 (possibly empty).

        Raises:
            TypeError: The predicate returned something that is not boolean.
            ValueError: It returned the wrong shape.
        """
        mask = predicate(self.vertices)
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"TetMesh {self.name!r}: nodes_where: expected 'predicate' to return a bool tensor of "
                            f"shape ({self.n_vertices},), got {what}")
        if tuple(mask.shape) != (self.n_vertices,):
            raise ValueError(f"TetMesh {self.name!r}: nodes_where: expected 'predicate' to return shape "
                             f"({self.n_vertices},), got {tuple(mask.shape)}")
        return mask.to(self.vertices.device).nonzero().flatten()

    def nodes_in_box(self, lower: Sequence[float], upper: Sequence[float], *, tol: float | None = None) -> torch.Tensor:
        """Ids of the vertices inside an axis-aligned box, bounds included.

        Args:
            lower: (3,) [m].
            upper: (3,) [m], at least ``lower`` on every axis (equal: a plane or line of nodes).
            tol: Slack added on every side [m]; default 1e-9 x the mesh's bounding-box diagonal,
                so that nodes meant to lie on a face are found despite rounding.

        Returns:
            Sorted ids (K,) int64 (possibly empty).

        Raises:
            ValueError: Bounds not 3 finite numbers each, or ``upper < lower``.
        """
        lo = torch.as_tensor(np.asarray(lower, dtype=np.float64)).to(self.vertices)
        hi = torch.as_tensor(np.asarray(upper, dtype=np.float64)).to(self.vertices)
        if lo.shape != (3,) or hi.shape != (3,) or not bool(torch.isfinite(torch.cat([lo, hi])).all()):
            raise ValueError(f"TetMesh {self.name!r}: nodes_in_box: expected 'lower' and 'upper' of 3 finite numbers, "
                             f"got {lower}, {upper}")
        if bool((hi < lo).any()):
            raise ValueError(f"TetMesh {self.name!r}: nodes_in_box: 'upper' {list(upper)} is below 'lower' "
                             f"{list(lower)} on some axis")
        if tol is None:
            extent = self.vertices.max(0).values - self.vertices.min(0).values
            tol = 1e-9 * float(extent.norm())
        inside = ((self.vertices >= lo - tol) & (self.vertices <= hi + tol)).all(1)
        return inside.nonzero().flatten()

    # ------------------------------------------------------------------ conversion and files

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "TetMesh":
        """A copy in another float dtype and/or on another device.

        The rest quantities are recomputed in float64 from the converted vertices, then cast, so
        ``Dm_inv`` stays the inverse of the stored rest shape's edge matrices.

        Args:
            dtype: ``torch.float32`` or ``torch.float64`` (None: keep).
            device: Target device (None: keep).

        Raises:
            TypeError: Another dtype.
        """
        dtype = dtype or self.vertices.dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"TetMesh {self.name!r}: to: expected dtype float32 or float64, got {dtype}")
        device = torch.device(device) if device is not None else self.vertices.device
        out = object.__new__(TetMesh)
        vertices, tets = self.vertices.to(device=device, dtype=dtype), self.tets.to(device)
        rest = _rest_quantities(vertices, tets)
        out._set(vertices=vertices, tets=tets, name=self.name, Dm_inv=torch.linalg.inv(rest["Dm"]).to(dtype),
                 rest_volume=rest["volume"].to(dtype), edge_lengths=rest["edge_lengths"].to(dtype), _cache={})
        return out

    def save(self, path: str | Path, **cell_data: torch.Tensor) -> Path:
        """Write the mesh: ``.vtu``/``.vtk`` (:func:`~diffworld.geometry.tet_mesh.save_tet_mesh`) or
        ``.msh`` (Gmsh 4.1 through meshio).

        Args:
            path: Output file; its suffix picks the format.
            **cell_data: Optional per-tet arrays (T, ...) stored by name.

        Returns:
            The path written.
        """
        path = Path(path)
        if path.suffix.lower() != ".msh":
            return save_tet_mesh(path, self.vertices, self.tets, **cell_data)
        import meshio

        data = {k: [v.detach().cpu().numpy()] for k, v in cell_data.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        meshio.write(str(path), meshio.Mesh(self.vertices.detach().cpu().numpy(),
                                            [("tetra", self.tets.cpu().numpy())], cell_data=data), file_format="gmsh")
        return path

    def __repr__(self) -> str:
        unused = int(self.unused_vertices().numel())
        return (f"TetMesh({self.name!r}: {self.n_vertices} vertices ({unused} unused), {self.n_tets} tets, "
                f"volume {self.volume():.6g} m^3, min edge {self.min_edge():.3g} m, {self.vertices.dtype}, "
                f"{self.vertices.device})")


def _read_vtk(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Points, linear tets (or None) and the names of the other cell types of a VTK file."""
    import pyvista as pv

    try:
        grid = pv.read(str(path))
        if not isinstance(grid, pv.UnstructuredGrid):
            grid = grid.cast_to_unstructured_grid()
    except Exception as err:  # VTK raises many types for a bad file; name the file in one
        raise ValueError(f"TetMesh.load: could not read {str(path)!r}: {err}") from err
    cells = grid.cells_dict
    tets = cells.get(pv.CellType.TETRA, cells.get(int(pv.CellType.TETRA)))
    other = [pv.CellType(int(c)).name for c in cells if int(c) != int(pv.CellType.TETRA)]
    return np.asarray(grid.points, dtype=np.float64), None if tets is None else np.asarray(tets, np.int64), other


def _read_msh(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Points, linear tets (or None) and the names of the other cell types of a Gmsh file."""
    import meshio

    try:
        # meshio.gmsh.read, not meshio.read: the latter prints and calls sys.exit on a bad file
        mesh = meshio.gmsh.read(str(path))
    except Exception as err:  # meshio raises ReadError, ValueError, KeyError... for bad files
        raise ValueError(f"TetMesh.load: could not read {str(path)!r} as a Gmsh file: "
                         f"{err or type(err).__name__}") from err
    blocks = [np.asarray(c.data, dtype=np.int64) for c in mesh.cells if c.type == "tetra"]
    other = sorted({c.type for c in mesh.cells if c.type != "tetra"})
    return np.asarray(mesh.points, dtype=np.float64), np.concatenate(blocks) if blocks else None, other
