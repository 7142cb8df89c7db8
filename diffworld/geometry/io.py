"""Mesh and point-cloud files (trimesh underneath, torch tensors outside).

Meshes: ``.obj``, ``.ply``, ``.stl``, ``.off``, ``.glb``. Loading keeps the file's vertex order
(no merging, no reordering), with two exceptions: STL stores every triangle with its own corners,
so exactly coincident corners are welded, in order of first use, into an indexed mesh; and
trimesh's OBJ reader drops vertices no face uses (unreferenced vertices survive PLY, OFF and GLB
round trips only). A GLB/glTF scene (or an OBJ with
several objects) is flattened: every triangle-mesh node is transformed to world coordinates and
the meshes are concatenated; non-mesh geometry (paths, point clouds) is skipped.

Point clouds: ``.ply`` (vertex ``x y z`` and, when present, ``nx ny nz``), ``.xyz`` (whitespace-
or comma-separated text with 3 or 6 columns per line, ``#`` comments), ``.npz`` (array
``points`` (N, 3) and optional ``normals`` (N, 3)).

Loaded tensors are float32 (positions [m]) and int64 (faces). Files with no geometry are
errors, and empty geometry is not written: the I/O layer deals in non-empty meshes and clouds.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from diffworld.engine.bridge import check_tensor
from diffworld.engine.files import atomic_path

__all__ = [
    "LoadedMesh",
    "LoadedPoints",
    "MESH_FORMATS",
    "POINT_FORMATS",
    "load_mesh",
    "load_points",
    "save_mesh",
    "save_points",
]

MESH_FORMATS: tuple[str, ...] = (".obj", ".ply", ".stl", ".off", ".glb")
POINT_FORMATS: tuple[str, ...] = (".ply", ".xyz", ".npz")

PathLike = str | os.PathLike


class LoadedMesh(NamedTuple):
    """A triangle mesh read from a file.

    Attributes:
        vertices: [m], shape (V, 3), float32.
        faces: int64 vertex indices, shape (F, 3), F >= 1.
    """

    vertices: torch.Tensor
    faces: torch.Tensor


class LoadedPoints(NamedTuple):
    """A point cloud read from a file.

    Attributes:
        points: [m], shape (N, 3), float32, N >= 1.
        normals: Shape (N, 3), float32, as stored (not renormalized), or ``None`` if the file has none.
    """

    points: torch.Tensor
    normals: torch.Tensor | None


# --- helpers --------------------------------------------------------------------------------------

def _path(path: Any, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected '{name}' to be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _suffix(path: Path, supported: tuple[str, ...], what: str) -> str:
    ext = path.suffix.lower()
    if ext not in supported:
        raise ValueError(f"Unsupported {what} file extension {ext or '(none)'!r} for '{path}'; "
                         f"supported: {', '.join(supported)}")
    return ext


def _existing_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"No such file: '{path}'")
    if not path.is_file():
        raise ValueError(f"'{path}' is not a regular file")
    if path.stat().st_size == 0:
        raise ValueError(f"Cannot read '{path}': the file is empty")


def _finite_vertices(path: Path, v: np.ndarray, what: str = "vertices") -> None:
    if v.size and not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise ValueError(f"Cannot read '{path}': {bad} {what} have non-finite coordinates")


def _check_faces_in_range(path: Path, faces: np.ndarray, n_vertices: int) -> None:
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise ValueError(f"Cannot read '{path}': face indices must lie in [0, {n_vertices}) for "
                         f"{n_vertices} vertices, got indices in [{int(faces.min())}, {int(faces.max())}]")


def _to_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Expected 'device' as a torch device spec ('cpu', 'cuda:0'), got {device!r}") from None


# --- meshes ---------------------------------------------------------------------------------------

def _trimesh_load(path: Path, ext: str):
    import trimesh

    try:
        return trimesh.load(str(path), file_type=ext[1:], process=False)
    except Exception as exc:  # trimesh raises many types (ValueError, IndexError, KeyError...)
        raise ValueError(f"Cannot read '{path}' as {ext[1:].upper()}: {type(exc).__name__}: {exc}") from exc


def _flatten(path: Path, loaded) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) of every triangle mesh in a Trimesh or Scene, in world coordinates."""
    import trimesh

    if isinstance(loaded, trimesh.Trimesh):
        parts = [(np.asarray(loaded.vertices), np.asarray(loaded.faces))]
    elif isinstance(loaded, trimesh.Scene):
        parts = []
        for node in loaded.graph.nodes_geometry:
            transform, geom_name = loaded.graph[node]
            geom = loaded.geometry.get(geom_name)
            if not isinstance(geom, trimesh.Trimesh):
                continue
            matrix = np.asarray(transform, dtype=np.float64)
            v = np.asarray(geom.vertices, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
            f = np.asarray(geom.faces)
            if np.linalg.det(matrix[:3, :3]) < 0:  # a mirroring node: keep the faces outward
                f = f[:, ::-1]
            parts.append((v, f))
    else:
        parts = []
    parts = [(v.reshape(-1, 3), f.reshape(-1, 3)) for v, f in parts if len(f)]
    for v, f in parts:  # per part, before offsets could hide a bad index in the next part's range
        _check_faces_in_range(path, f, v.shape[0])
    if not parts:
        kind = type(loaded).__name__
        raise ValueError(f"Cannot read '{path}': no triangle faces found (got a {kind} without faces; "
                         "a point cloud is read with load_points)")
    vertices, faces, offset = [], [], 0
    for v, f in parts:
        vertices.append(v)
        faces.append(f.astype(np.int64) + offset)
        offset += v.shape[0]
    return np.concatenate(vertices), np.concatenate(faces)


def _weld_exact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge bit-identical vertices, numbering them in order of first use by the faces."""
    used = vertices[faces.reshape(-1)]
    _, first, inverse = np.unique(used, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique rows sorted by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return used[first[order]], rank[inverse.reshape(-1)].reshape(-1, 3)


def load_mesh(path: PathLike, *, device: torch.device | str = "cpu") -> LoadedMesh:
    """Read a triangle mesh.

    Args:
        path: File with one of the extensions in :data:`MESH_FORMATS` (case-insensitive).
        device: Device of the returned tensors.

    Returns:
        :class:`LoadedMesh` (float32 vertices, int64 faces). Polygons are triangulated by trimesh.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported extension, empty or unreadable file, no faces, non-finite
            vertices, or face indices out of range.
    """
    p = _path(path)
    ext = _suffix(p, MESH_FORMATS, "mesh")
    dev = _to_device(device)
    _existing_file(p)
    vertices, faces = _flatten(p, _trimesh_load(p, ext))
    _finite_vertices(p, vertices)
    if ext == ".stl":
        vertices, faces = _weld_exact(vertices, faces)
    v = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)).to(dev)
    f = torch.from_numpy(np.ascontiguousarray(faces, dtype=np.int64)).to(dev)
    return LoadedMesh(v, f)


def save_mesh(path: PathLike, vertices: torch.Tensor, faces: torch.Tensor) -> None:
    """Write a triangle mesh; the format follows the extension.

    PLY is written binary, STL binary, GLB as a one-node scene; these store float32 coordinates.
    OBJ and OFF are text with enough digits to round-trip the input dtype exactly.

    Args:
        path: Destination with one of the extensions in :data:`MESH_FORMATS`; the folder must exist.
        vertices: [m], shape (V, 3), float32 or float64, V >= 1.
        faces: Integer vertex indices in ``[0, V)``, shape (F, 3), F >= 1.

    Raises:
        TypeError: Non-tensor or wrong dtypes.
        ValueError: Unsupported extension, bad shapes, empty mesh, indices out of range.
    """
    import trimesh

    from diffworld.geometry.mesh_ops import check_mesh

    p = _path(path)
    ext = _suffix(p, MESH_FORMATS, "mesh")
    vertices, faces = check_mesh(vertices, faces)
    if faces.shape[0] == 0:
        raise ValueError(f"Nothing to save to '{p}': 'faces' is empty (shape {tuple(faces.shape)})")
    v = vertices.detach().cpu().numpy().astype(np.float64)
    f = faces.detach().cpu().numpy()
    with atomic_path(p) as tmp:  # whole or not at all
        if ext in (".obj", ".off"):
            _write_text_mesh(tmp, ext, v, f, digits=9 if vertices.dtype == torch.float32 else 17)
        else:
            trimesh.Trimesh(vertices=v, faces=f, process=False, validate=False).export(str(tmp), file_type=ext[1:])


def _write_text_mesh(path: Path, ext: str, v: np.ndarray, f: np.ndarray, digits: int) -> None:
    """OBJ/OFF with ``digits`` significant digits (9 round-trips float32 exactly, 17 float64)."""
    with open(path, "w") as fh:
        if ext == ".obj":
            fh.write("# written by diffworld\n")
            np.savetxt(fh, v, fmt=f"v %.{digits}g %.{digits}g %.{digits}g")
            np.savetxt(fh, f + 1, fmt="f %d %d %d")
        else:
            fh.write(f"OFF\n{v.shape[0]} {f.shape[0]} 0\n")
            np.savetxt(fh, v, fmt=f"%.{digits}g")
            np.savetxt(fh, f, fmt="3 %d %d %d")


# --- point clouds ---------------------------------------------------------------------------------

_NORMAL_NAMES = (("nx", "ny", "nz"), ("normal_x", "normal_y", "normal_z"))


def _read_ply_points(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    loaded = _trimesh_load(path, ".ply")
    raw = getattr(loaded, "metadata", {}).get("_ply_raw")
    vertex = raw.get("vertex") if isinstance(raw, dict) else None
    data = vertex.get("data") if isinstance(vertex, dict) else None
    # trimesh keeps binary vertex data as one structured array, ASCII data as a dict of columns.
    if isinstance(data, np.ndarray) and data.dtype.names is not None:
        columns = {name: data[name] for name in data.dtype.names}
    elif isinstance(data, dict):
        columns = dict(data)
    else:
        raise ValueError(f"Cannot read '{path}': no 'vertex' element with x, y, z properties")
    if not {"x", "y", "z"} <= set(columns):
        raise ValueError(f"Cannot read '{path}': the 'vertex' element lacks x, y, z (has {sorted(columns)})")

    def stack(names: tuple[str, ...]) -> np.ndarray:
        return np.stack([np.asarray(columns[c], dtype=np.float64).reshape(-1) for c in names], axis=1)

    points = stack(("x", "y", "z"))
    normals = next((stack(triple) for triple in _NORMAL_NAMES if set(triple) <= set(columns)), None)
    return points, normals


def _read_xyz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ValueError(f"Cannot read '{path}' as XYZ text: not UTF-8 text ({exc.reason})") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (3, 6):
            raise ValueError(f"Cannot read '{path}': line {lineno} has {len(fields)} columns, expected 3 "
                             "(x y z) or 6 (x y z nx ny nz)")
        if rows and len(fields) != len(rows[0]):
            raise ValueError(f"Cannot read '{path}': line {lineno} has {len(fields)} columns, but earlier "
                             f"lines have {len(rows[0])}")
        try:
            rows.append([float(x) for x in fields])
        except ValueError:
            raise ValueError(f"Cannot read '{path}': line {lineno} holds a non-number: {line!r}") from None
    if not rows:
        raise ValueError(f"Cannot read '{path}': no points (only blank or comment lines)")
    arr = np.asarray(rows, dtype=np.float64)
    return arr[:, :3], (arr[:, 3:] if arr.shape[1] == 6 else None)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        loaded = np.load(str(path), allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"Cannot read '{path}' as NPZ: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"Cannot read '{path}' as NPZ: it holds a single .npy array, not named arrays")
    with loaded as z:
        keys = list(z.keys())
        if "points" not in keys:
            raise ValueError(f"Cannot read '{path}': no array 'points' (arrays found: {keys})")
        try:
            points = np.asarray(z["points"])
            normals = np.asarray(z["normals"]) if "normals" in keys else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ValueError(f"Cannot read '{path}' as NPZ: {type(exc).__name__}: {exc}") from exc
    for key, arr in (("points", points), ("normals", normals)):
        if arr is None:
            continue
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"Cannot read '{path}': expected '{key}' of shape (N, 3), got {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"Cannot read '{path}': expected numeric '{key}', got dtype {arr.dtype}")
    if normals is not None and normals.shape != points.shape:
        raise ValueError(f"Cannot read '{path}': 'normals' shape {normals.shape} does not match "
                         f"'points' shape {points.shape}")
    return points.astype(np.float64), (None if normals is None else normals.astype(np.float64))


def load_points(path: PathLike, *, device: torch.device | str = "cpu") -> LoadedPoints:
    """Read a point cloud (with normals when the file has them).

    Args:
        path: File with one of the extensions in :data:`POINT_FORMATS` (case-insensitive). A PLY
            mesh is read as its vertices.
        device: Device of the returned tensors.

    Returns:
        :class:`LoadedPoints` (float32).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported extension, empty or unreadable file, no points, wrong columns or
            shapes, non-finite values.
    """
    p = _path(path)
    ext = _suffix(p, POINT_FORMATS, "point-cloud")
    dev = _to_device(device)
    _existing_file(p)
    reader = {".ply": _read_ply_points, ".xyz": _read_xyz, ".npz": _read_npz}[ext]
    points, normals = reader(p)
    if points.shape[0] == 0:
        raise ValueError(f"Cannot read '{p}': the file holds no points")
    _finite_vertices(p, points, "points")
    if normals is not None:
        _finite_vertices(p, normals, "normals")

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)

    return LoadedPoints(tensor(points), None if normals is None else tensor(normals))


def _write_ply_points(path: Path, points: np.ndarray, normals: np.ndarray | None) -> None:
    fields = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals is not None else [])
    data = points if normals is None else np.concatenate([points, normals], axis=1)
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", "comment written by diffworld",
         f"element vertex {data.shape[0]}"]
        + [f"property float {name}" for name in fields]
        + ["end_header"]
    ) + "\n"
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(np.ascontiguousarray(data, dtype="<f4").tobytes())


def save_points(path: PathLike, points: torch.Tensor, normals: torch.Tensor | None = None) -> None:
    """Write a point cloud (and normals); the format follows the extension.

    PLY is binary little-endian float32 (``x y z [nx ny nz]``); XYZ is text with enough digits
    to round-trip float32 exactly (float64 inputs: 17 digits); NPZ keeps the input dtype.

    Args:
        path: Destination with one of the extensions in :data:`POINT_FORMATS`; the folder must exist.
        points: [m], shape (N, 3), float32 or float64, N >= 1, finite.
        normals: Shape (N, 3) or ``None``.

    Raises:
        TypeError: Non-tensor or wrong dtypes.
        ValueError: Unsupported extension, bad shapes, no points.
    """
    p = _path(path)
    ext = _suffix(p, POINT_FORMATS, "point-cloud")
    check_tensor("points", points, shape=(None, 3))
    if points.shape[0] == 0:
        raise ValueError(f"Nothing to save to '{p}': 'points' is empty (shape {tuple(points.shape)})")
    if normals is not None:
        check_tensor("normals", normals, shape=(points.shape[0], 3))
    pts = points.detach().cpu().numpy()
    nrm = None if normals is None else normals.detach().cpu().numpy()
    if ext == ".ply":
        _write_ply_points(p, pts, nrm)
    elif ext == ".xyz":
        digits = 9 if pts.dtype == np.float32 and (nrm is None or nrm.dtype == np.float32) else 17
        data = pts.astype(np.float64) if nrm is None else np.concatenate([pts, nrm], axis=1).astype(np.float64)
        np.savetxt(str(p), data, fmt=f"%.{digits}g")
    else:
        arrays = {"points": pts} if nrm is None else {"points": pts, "normals": nrm}
        with open(p, "wb") as fh:  # an open handle keeps numpy from appending '.npz' to the name
            np.savez(fh, **arrays)
