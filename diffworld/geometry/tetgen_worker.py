"""Run TetGen on candidate regions in a separate process (used by :mod:`tet_remesh`).

TetGen refuses a surface whose triangles cross by throwing from deep inside, and its error path
corrupts the heap (``free(): invalid next size`` a little later): in the caller's process that
would abort Python at some unrelated point. So TetGen only ever runs here, in a child process
that exits after its first refusal. The script imports nothing from diffworld (a child starts
in about 0.15 s instead of the seconds torch and Warp take).

Protocol: ``python tetgen_worker.py REQUEST``, run in a scratch directory (TetGen also writes
the faces it skips there, ``tetgen-tmpfile_skipped.*``). REQUEST is a ``.npz`` with ``floor``
(6 x volume at or below which a tet is flat), ``start`` and ``n_regions``, and for each
candidate region ``k`` (tried in order from ``start``) ``points_k`` (n, 3) float64 and
``faces_k`` (m, 3) int64, a closed surface. Each region is filled plainly, then with quality
Steiner points inside. Each fill runs in a forked child (where the OS has fork), so the worker
survives refusals; without fork it exits with code 3 at the first one. Before each region the
worker writes its number to ``progress``, so a refusal (exit code 3, or a crash) names it
(refusals it survives are appended to ``refused``); a fill whose tets are positive but not all above
the floor goes to ``flat.npz``; the first fill above the floor to ``fixed.npz``. Arrays:
``k``, ``nodes`` (input points first, in order), ``elems``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

REFUSED = 3
# Second try where the plain fill has flat tets: points added inside the region (never on its
# boundary, TetGen's -Y) until no tet has a dihedral angle under 5 degrees.
_QUALITY = {"quality": True, "minratio": 2.0, "mindihedral": 5.0, "steinerleft": 10000}
_PLAIN = {"quality": False}


def _volumes6(pos: np.ndarray, tets: np.ndarray) -> np.ndarray:
    p = pos[tets]
    return np.linalg.det(p[:, 1:] - p[:, :1])


def _fill(points: np.ndarray, faces: np.ndarray, options: dict) -> tuple[np.ndarray, np.ndarray]:
    import tetgen

    out = tetgen.TetGen(points, faces.astype(np.int32)).tetrahedralize(
        plc=True, nobisect=True, quiet=True, nowarning=True, **options)
    return np.asarray(out[0], dtype=np.float64), np.asarray(out[1], dtype=np.int64)


def _attempt(points: np.ndarray, faces: np.ndarray, options: dict) -> tuple[np.ndarray, np.ndarray]:
    """One fill, in a forked child where the OS has fork (a refusal then costs only the child,
    and this worker goes on to the next region without a new start). Raises RuntimeError when
    TetGen refuses the surface."""
    if not hasattr(os, "fork"):
        return _fill(points, faces, options)
    if os.path.exists("attempt.npz"):
        os.remove("attempt.npz")
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        try:
            nodes, elems = _fill(points, faces, options)
            np.savez("attempt.npz", nodes=nodes, elems=elems)
            code = 0
        except BaseException:
            code = REFUSED
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        with np.load("attempt.npz") as f:
            return f["nodes"], f["elems"]
    raise RuntimeError("TetGen refused the region")


def main(request: str) -> int:
    req = np.load(request)
    floor = float(req["floor"])
    start = int(req["start"])
    n = int(req["n_regions"])
    for k in range(start, n):
        with open("progress", "w") as f:
            f.write(str(k))
        points, faces = req[f"points_{k}"], req[f"faces_{k}"]
        # The fill must tile the region: the boundary's enclosed volume (6 x, outward faces).
        target = float(np.einsum("ij,ij->i", points[faces[:, 0]],
                                 np.cross(points[faces[:, 1]], points[faces[:, 2]])).sum())
        for options in (_PLAIN, _QUALITY):
            try:
                nodes, elems = _attempt(points, faces, options)
            except RuntimeError:
                if not hasattr(os, "fork"):
                    return REFUSED  # nothing more in this process: TetGen's refusal corrupts the heap
                with open("refused", "a") as f:
                    f.write(f"{k}\n")
                break  # a refused surface stays refused with quality options: next region
            # TetGen keeps the input points first, in order; check rather than assume.
            if nodes.shape[0] < points.shape[0] or not np.array_equal(nodes[: points.shape[0]], points):
                continue
            vol = _volumes6(nodes, elems)
            if abs(vol.sum() - target) > 1e-9 * abs(target) + 1e-3 * floor or not (vol > 0).all():
                continue
            if (vol > floor).all():
                np.savez("fixed.npz", k=k, nodes=nodes, elems=elems)
                return 0
            np.savez("flat.npz", k=k, nodes=nodes, elems=elems)  # positive: better than nothing
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
