"""Benchmark: MPM against experiments, at full resolution (``diffworld.sims.mpm.validation``).

Two tables, float32 on the CPU, each row one run (the numbers in docs/mpm.md come from them):

1. Dam break, Martin & Moyce (1952), a = 2.25 in, column 2a tall, as a slab 2 cells deep.
   Columns: cells across a; Young's modulus E of the water [Pa] (fluid law: only lambda
   matters; sound speed 7.6 m/s at 1e5, 24 m/s at 1e6); the gate (none: instantaneous release,
   else a plate lifted at that speed [m/s]); the lead Z_sim / Z_data - 1 over T in
   [0.84, 1.63] (min .. max); the time offset that fits best (T >= 0.8); mean and max |error|
   with the data's clock shifted by 0.25; the front speed dZ/dT over T in [1.63, 3.11] against
   the data's (1.353); Z at T = 0.41 (data 1.11); seconds.
2. Planar sand column collapse, aspect h0 / L0 = 0.5, h0 = 0.1 m, friction angle 25 deg,
   E = 1e5 Pa: runout (L - L0) / L0 of the leading particle and where the deposit is 5 %, 10 %,
   20 % of h0 thick; the slope of the deposit between 0.8 h0 and 0.2 h0 [deg]; the kinetic energy
   at the end over its peak; seconds. Rows: cells across h0; floor (friction: Coulomb mu =
   tan 25 deg; sticky; slip); CFL; particles per cell; E.

Default runtime on a 2-core CPU: about 30 minutes (``--quick``: about 4, up to 20 cells).
Usage::

    python benchmarks/mpm_validation.py [--quick] [--only dam|collapse]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("WARP_CACHE_PATH", str(ROOT / ".cache" / "warp"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffworld.sims.mpm import validation as V  # noqa: E402


def dam_table(quick: bool) -> None:
    rows = [(10, 1e5, None), (20, 1e5, None), (20, 1e6, None), (20, 4e6, None)]
    rows += [(20, 1e5, v) for v in (4.0, 2.0, 1.0, 0.5)]
    if not quick:
        rows += [(40, 1e5, None), (40, 1e6, None)]
    print("Dam break (Martin & Moyce 1952, a = 2.25 in, n^2 = 2); data front speed over T in [1.63, 3.11]: "
          f"{V.data_front_speed():.3f}")
    print("| cells | E [Pa] | gate [m/s] | lead, T in [0.84, 1.63] | best offset | shifted 0.25: mean / max |err| "
          "| front speed (vs data) | Z(0.41) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cells, E, gate in rows:
        r = V.dam_break(cells, E=E, gate_speed=gate)
        lead = r.errors(T_min=0.84)[:4]  # T = 0.84, 1.19, 1.43, 1.63
        e = abs(r.errors(0.25, T_min=0.84))
        speed = r.front_speed()
        print(f"| {cells} | {E:.0e} | {'-' if gate is None else gate} | {lead.min():+.1%} .. {lead.max():+.1%} "
              f"| {r.best_shift():.3f} | {e.mean():.1%} / {e.max():.1%} | {speed:.3f} "
              f"({speed / V.data_front_speed() - 1:+.1%}) | {r.front(0.41):.3f} | {r.seconds:.0f} |", flush=True)
    ideal = V.ideal_initial_acceleration(0.05715, 2 * 0.05715)
    print(f"\nInitial centre-of-mass acceleration (E = 4e6 Pa, mean over T in [0.1, 0.25]); potential flow "
          f"{ideal / 9.81:.4f} g")
    for cells in (10, 20) if quick else (10, 20, 40):
        r = V.dam_break(cells, E=4.0e6, T_end=0.25, every=0.005)
        print(f"  {cells} cells: {r.acceleration(0.1, 0.25) / 9.81:.4f} g", flush=True)


def collapse_table(quick: bool) -> None:
    rows = [dict(cells=n) for n in (10, 15, 20)] + [dict(cells=20, floor="sticky"), dict(cells=20, cfl=0.1),
                                                      dict(cells=20, ppc=27), dict(cells=20, E=1e6)]
    if not quick:
        rows.insert(3, dict(cells=30))
    rows.append(dict(cells=10, floor="slip"))
    print("\nPlanar sand column collapse, aspect 0.5 (Lube et al. 2005: (L - L0) / L0 = 1.2 a = 0.6)")
    print("| cells | floor | CFL | ppc | E [Pa] | leading particle | h >= 5 % | h >= 10 % | h >= 20 % | slope [deg] "
          "| KE end / peak | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kw in rows:
        kw = dict(dict(floor="friction", cfl=0.3, ppc=8, E=1e5), **kw)
        r = V.column_collapse(**kw)
        x8 = max((x for x, h in r.profile if h >= 0.8), default=float("nan"))
        x2 = max((x for x, h in r.profile if h >= 0.2), default=float("nan"))
        slope = math.degrees(math.atan(0.6 * 0.5 / (x2 - x8))) if x2 > x8 else float("nan")
        print(f"| {kw['cells']} | {kw['floor']} | {kw['cfl']} | {kw['ppc']} | {kw['E']:.0e} | {r.runout:.3f} "
              f"| {r.runout_at(0.05):.3f} | {r.runout_at(0.1):.3f} | {r.runout_at(0.2):.3f} | {slope:.1f} "
              f"| {r.kinetic[-1] / r.kinetic.max():.1e} | {r.seconds:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="up to 20 cells")
    ap.add_argument("--only", choices=("dam", "collapse"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # torch's threads fight Warp's on a small CPU
    if args.only != "collapse":
        dam_table(args.quick)
    if args.only != "dam":
        collapse_table(args.quick)


if __name__ == "__main__":
    main()
