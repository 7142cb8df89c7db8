"""Re-mesh the regions of a tet mesh where a construction left flat or inverted tets.

:mod:`diffworld.geometry.flexicubes_tets` fans each inside node's cell; where the surface folds
within a cell or two (a smooth field at a coarse grid), the fans of a few nodes can overlap the
surface near them, and no placement of those nodes makes every tet positive (the kernels of
their stars are empty). This module takes the tets around the trouble, grows the region ring by
ring until its boundary is an embedded surface (no two boundary triangles cross), and fills it
again with a constrained tetrahedralization that keeps every boundary triangle (TetGen, switches
``-pY``: no Steiner point on the boundary). The rest of the mesh and the surface are untouched,
so the result is conforming and its volume is unchanged. When the region grows to a whole inside
component and TetGen still refuses it, the extracted surface itself intersects, and no tet mesh
with that boundary exists.

TetGen comes with the optional extra ``diffworld[tets]`` (the ``tetgen`` package: TetGen is
AGPL-3.0, so it is not a core dependency of this Apache-2.0 project). Without it
:func:`remesh_bad_regions` reports that it could not run. TetGen runs in a child process
(:mod:`diffworld.geometry.tetgen_worker`): its refusal of a crossing surface corrupts the heap
of the process it runs in.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RemeshResult", "remesh_bad_regions", "tetgen_available"]

# Rings of tets added around the trouble before giving up (each adds the stars of the interior
# vertices on the region's boundary; two rings sufficed on every smooth random field tried).
MAX_RINGS = 12


def tetgen_available() -> bool:
    """Whether the optional TetGen wrapper (``pip install 'diffworld[tets]'``) is installed."""
    try:
        import tetgen  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RemeshResult:
    """What :func:`remesh_bad_regions` did.

    Attributes:
        tets: (T', 4) int64 the new tets: ids below ``P`` are the input positions, ids ``P + s``
            the Steiner points.
        steiner: (S, 3) float64 positions of the points TetGen added inside the regions.
        steiner_anchors: list of S int64 arrays, the boundary vertices of each Steiner point's
            region (a caller keeps the points differentiable by moving each with the mean of its
            anchors).
        fixed: Whether every tet is now above the floor.
        reason: Why not, when ``fixed`` is False (empty otherwise). Where no fill above the
            floor exists, a fill whose tets are all positive (some flat) is still returned.
        region_tets: Number of input tets that were replaced (0: ``tets`` unchanged).
    """

    tets: np.ndarray
    steiner: np.ndarray
    steiner_anchors: list
    fixed: bool
    reason: str
    region_tets: int


def _volumes6(pos: np.ndarray, tets: np.ndarray) -> np.ndarray:
    p = pos[tets]
    return np.linalg.det(p[:, 1:] - p[:, :1])


def _boundary(tets: np.ndarray) -> np.ndarray:
    """Faces (B, 3) of ``tets`` that no second tet of the set shares, oriented outwards."""
    faces = np.concatenate([tets[:, [1, 2, 3]], tets[:, [0, 3, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 1]]])
    _, inv, cnt = np.unique(np.sort(faces, 1), axis=0, return_inverse=True, return_counts=True)
    return faces[cnt[inv.reshape(-1)] == 1]


_WORKER = Path(__file__).with_name("tetgen_worker.py")


def _rings(tets: np.ndarray, drop: np.ndarray, first_free: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The candidate regions: the stars of ``drop``, grown by the stars of the interior vertices
    on their boundary until the boundary is surface only. Each is (region mask (T,) bool, boundary
    vertex ids (n,), boundary faces (m, 3) in local ids)."""
    out = []
    for _ in range(MAX_RINGS):
        region = np.isin(tets, drop).any(1)
        bnd = _boundary(tets[region])
        used = np.unique(bnd)
        out.append((region, used, np.searchsorted(used, bnd)))
        grown = np.union1d(drop, used[used >= first_free])
        if grown.size == drop.size:
            break
        drop = grown
    return out


def _run_tetgen(pos: np.ndarray, rings: list, floor: float) -> tuple[str, int, np.ndarray, np.ndarray, bool]:
    """Fill the rings in order in worker processes. Returns (outcome, k, nodes, elems,
    refused_last): outcome "fixed" (ring k filled above the floor), "flat" (ring k filled with
    positive tets, some flat) or "none"; refused_last tells whether TetGen refused the last ring."""
    request = {"floor": floor, "n_regions": len(rings)}
    for k, (_, used, faces) in enumerate(rings):
        request[f"points_{k}"], request[f"faces_{k}"] = pos[used], faces
    flat, refused_last, start = None, False, 0
    with tempfile.TemporaryDirectory(prefix="diffworld-tetgen-") as tmp:
        folder = Path(tmp)
        while start < len(rings):
            np.savez(folder / "request.npz", start=start, **request)
            proc = subprocess.run([sys.executable, str(_WORKER), "request.npz"], cwd=folder, capture_output=True)
            if (folder / "flat.npz").exists():
                with np.load(folder / "flat.npz") as f:
                    flat = (int(f["k"]), f["nodes"], f["elems"])
            if (folder / "fixed.npz").exists():
                with np.load(folder / "fixed.npz") as f:
                    return "fixed", int(f["k"]), f["nodes"], f["elems"], False
            if proc.returncode == 0:  # every remaining ring tried
                refused = folder / "refused"
                refused_last |= refused.exists() and str(len(rings) - 1) in refused.read_text().split()
                break
            if not (folder / "progress").exists():  # it failed before trying anything
                raise RuntimeError(f"diffworld.geometry.tetgen_worker failed (exit {proc.returncode}): "
                                   f"{proc.stderr.decode(errors='replace')[-2000:]}")
            # Refused (exit 3), or crashed after TetGen's refusal: either way ring `tried` failed.
            tried = int((folder / "progress").read_text())
            refused_last = tried == len(rings) - 1
            (folder / "progress").unlink(missing_ok=True)
            start = tried + 1
    if flat is not None:
        return "flat", flat[0], flat[1], flat[2], refused_last
    return "none", -1, np.zeros((0, 3)), np.zeros((0, 4), dtype=np.int64), refused_last


def remesh_bad_regions(pos: np.ndarray, tets: np.ndarray, first_free: int, floor: float) -> RemeshResult:
    """Replace the tets around every tet of 6 x volume at most ``floor`` by a constrained fill.

    Args:
        pos: (P, 3) float64 vertex positions.
        tets: (T, 4) int64 tets, positive orientation intended.
        first_free: Vertices below this id (the surface) are kept; the others (interior
            vertices) may be dropped from a region and replaced.
        floor: 6 x volume at or below which a tet is flat [m^3].

    Returns:
        :class:`RemeshResult`. Vertices a region no longer uses stay in ``pos`` unused.
    """
    unchanged = RemeshResult(tets, np.zeros((0, 3)), [], False, "", 0)
    bad = _volumes6(pos, tets) <= floor
    if not bad.any():
        unchanged.fixed = True
        return unchanged
    if not tetgen_available():
        unchanged.reason = "TetGen is not installed (pip install 'diffworld[tets]')"
        return unchanged
    drop = np.unique(tets[bad])
    drop = drop[drop >= first_free]
    if drop.size == 0:
        unchanged.reason = "a flat tet has only surface vertices"
        return unchanged
    rings = _rings(tets, drop, first_free)
    outcome, k, nodes, elems, refused_last = _run_tetgen(pos, rings, floor)
    if outcome == "none":
        surface_only = not (rings[-1][1] >= first_free).any()
        unchanged.reason = ("the extracted surface intersects itself there" if refused_last and surface_only else
                            f"no embedded region within {MAX_RINGS} rings")
        return unchanged
    region, used = rings[k][0], rings[k][1]
    ids = np.concatenate([used, pos.shape[0] + np.arange(nodes.shape[0] - used.shape[0])])
    steiner = nodes[used.shape[0]:]
    reason = "" if outcome == "fixed" else \
        "the surface there has creases or gaps thinner than the flat-tet floor (an unresolved feature)"
    return RemeshResult(np.concatenate([tets[~region], ids[elems]]), steiner, [used] * steiner.shape[0],
                        outcome == "fixed", reason, int(region.sum()))
