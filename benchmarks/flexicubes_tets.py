"""Benchmark: FlexiCubes tetrahedral output, its validity, shape quality and time.

For each shape and resolution, ``flexicubes(..., output="tetrahedra")`` runs twice in the same
process: with the final sliver pass (the default) and without it (the baseline, the pass turned
off through its threshold), so the table shows what the pass buys and what it costs.

Columns:

* validity of the default output (:func:`diffworld.geometry.tet_mesh.tet_report`): inverted tets,
  interior faces not shared by exactly 2 tets with opposite orientations, whether the boundary is
  the surface mesh, the smallest volume in cubed cells, and |sum of tet volumes - surface volume|;
* quality (:func:`diffworld.geometry.tet_mesh.tet_quality`), baseline -> default: the smallest mean
  ratio (1 is a regular tet, 0 a flat one), the share of tets under 0.1 and the smallest dihedral
  angle;
* time of each run [s, wall clock, one torch thread] and their ratio.

Shapes on the node grid of [-0.5, 0.5]^3: sphere r = 0.4, torus (0.25, 0.1), box
(0.3, 0.2, 0.25), an off-centre wavy ellipsoid ("blob": no grid symmetry) and the CAD part
(:func:`diffworld.geometry.shapes.cad_part`: sharp edges, a hole, a slot).

Usage::

    python benchmarks/flexicubes_tets.py [--sizes 32 64] [--shapes sphere torus box blob cad]
        [--training] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import platform
import sys
import time
import warnings

from bench_env import cpu_name, warp_version

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ("sphere", "torus", "box", "blob", "cad")


def field(name: str, res: int):
    """Node values (res+1)^3 float64 of a shape on [-0.5, 0.5]^3 (negative inside)."""
    import torch

    from diffworld.geometry.grid import Grid
    from diffworld.geometry.sdf import Box, Sphere, Torus, sample_grid
    from diffworld.geometry.shapes import cad_part

    grid = Grid.make(res)
    if name == "blob":
        def blob(p):
            c = torch.tensor([0.03, -0.02, 0.05], dtype=p.dtype)
            k = torch.tensor([1.0, 1.3, 0.8], dtype=p.dtype)
            return ((p - c) * k).norm(dim=-1) - 0.33 + 0.03 * torch.sin(9 * p[:, 0]) * torch.cos(7 * p[:, 1])
        sdf = blob
    else:
        sdf = {"sphere": lambda: Sphere(0.4), "torus": lambda: Torus(0.25, 0.1),
               "box": lambda: Box((0.3, 0.2, 0.25)), "cad": cad_part}[name]().double()
    with torch.no_grad():
        return sample_grid(sdf, grid, dtype=torch.float64)


def run_one(values, training: bool, sliver_pass: bool) -> dict:
    """Extract the tets of ``values`` once and measure them."""
    from diffworld.geometry.flexicubes import flexicubes
    from diffworld.geometry.mesh_ops import mesh_volume
    from diffworld.geometry.tet_mesh import tet_quality, tet_report

    tets_module = importlib.import_module("diffworld.geometry.flexicubes_tets")
    saved = tets_module._SLIVER
    tets_module._SLIVER = saved if sliver_pass else -2.0  # no mean ratio is below -2: pass off
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = flexicubes(values, training=training, output="tetrahedra")
        seconds = time.perf_counter() - t0
    finally:
        tets_module._SLIVER = saved
    res = values.shape[0] - 1
    r = tet_report(m.vertices, m.tets, m.faces)
    q = tet_quality(m.vertices, m.tets)
    return {
        "tets": r.n_tets, "inverted": r.n_inverted, "bad_faces": r.n_bad_interior_faces,
        "boundary_is_surface": bool(r.boundary_is_surface), "min_volume_h3": r.min_volume * res ** 3,
        "volume_error": abs(r.volume - float(mesh_volume(m.vertices, m.faces))),
        "min_mean_ratio": r.min_mean_ratio, "share_under_0.1": float((q.mean_ratio < 0.1).double().mean()),
        "min_dihedral_deg": r.min_dihedral_deg, "max_dihedral_deg": r.max_dihedral_deg,
        "seconds": seconds, "warned": bool(caught), "median_mean_ratio": float(q.mean_ratio.median()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], metavar="N", help="cells per axis")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--training", action="store_true", help="4-triangle training split (default: eval)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    print("FlexiCubes tetrahedra: validity, shape quality and time (baseline = no sliver pass)")
    print("=" * 84)
    print(f"machine : {cpu_name()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, warp {warp_version()}; one torch thread, float64, "
          f"{'training' if args.training else 'eval'} split")
    print("quality : mean ratio (1 regular, 0 flat), share of tets under 0.1, smallest dihedral angle; "
          "baseline -> default\n")
    head = (f"{'shape':6} {'res':>4} {'tets':>8} | {'inv':>3} {'bad':>3} {'bdry':>4} {'minvol/h3':>9} {'|dV|':>7} | "
            f"{'min mean ratio':>15} {'share < 0.1 %':>15} {'min dihedral':>14} | {'base s':>6} {'s':>6} {'x':>5}")
    print(head)
    print("-" * len(head))
    rows = []
    for shape in args.shapes:
        for res in args.sizes:
            values = field(shape, res)
            base = run_one(values, args.training, sliver_pass=False)
            new = run_one(values, args.training, sliver_pass=True)
            rows.append({"shape": shape, "res": res, "baseline": base, "default": new})
            print(f"{shape:6} {res:>4} {new['tets']:>8} | {new['inverted']:>3} {new['bad_faces']:>3} "
                  f"{'yes' if new['boundary_is_surface'] else 'NO':>4} {new['min_volume_h3']:9.2e} "
                  f"{new['volume_error']:7.0e} | {base['min_mean_ratio']:6.3f} -> {new['min_mean_ratio']:5.3f} "
                  f"{100 * base['share_under_0.1']:6.3f} -> {100 * new['share_under_0.1']:5.3f} "
                  f"{base['min_dihedral_deg']:5.2f} -> {new['min_dihedral_deg']:5.2f} | "
                  f"{base['seconds']:6.2f} {new['seconds']:6.2f} {new['seconds'] / base['seconds']:5.2f}"
                  + ("  (flat tets warned)" if new["warned"] else ""), flush=True)
    print("\ninv = inverted tets, bad = interior faces not shared by 2 opposite tets, bdry = boundary equals the "
          "surface, |dV| = |sum of tet volumes - surface volume| [m^3]; x = default time / baseline time")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
