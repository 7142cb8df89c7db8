"""Benchmark: FlexiCubes' volume scan, torch (dense passes) vs Warp kernels (pack, count, emit).

The scan is what FlexiCubes does over the whole volume before its surface-sized work: inside
mask, closed-boundary check, cube cases, surface cubes (``torch.nonzero``) and the sign-changing
grid edges along each axis. Compared:

* torch: :func:`diffworld.geometry.kernels_flexicubes.surface_scan_torch` (the code of
  ``flexicubes()``: ``sdf < 0``, ``check_closed_boundary``, ``cube_cases``, 4 ``nonzero``);
* warp: :func:`diffworld.geometry.kernels_flexicubes.surface_scan` (same outputs, checked equal
  before timing).

Fields: signed distances on the (n+1)^3 node grid of [-0.5, 0.5]^3: sphere r=0.4, torus R=0.3
r=0.1 (sparse surfaces, the FlexiCubes use case) and ``noise`` (uniform random values in
[-1, 1] with positive boundary nodes: a surface in almost every cube, the worst case for the
emit pass). Median of ``--repeat`` rounds (torch and warp alternate, so load on a shared machine
hits both alike) after a warm-up that loads (or compiles) the kernels. Torch runs with the
thread count diffworld sets (1 on machines with <= 4 cores; printed); Warp's CPU kernels are
single-threaded.

Usage::

    python benchmarks/flexicubes_scan.py [--sizes 64 128 256] [--fields sphere torus noise]
        [--repeat 5] [--device cpu|cuda] [--dtype float32|float64]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def make_field(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Node values (n+1)^3 on [-0.5, 0.5]^3, negative inside, positive on the boundary nodes."""
    ax = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    if name == "sphere":
        s = (x * x + y * y + z * z).sqrt() - 0.4
    elif name == "torus":
        q = (x * x + y * y).sqrt() - 0.3
        s = (q * q + z * z).sqrt() - 0.1
    elif name == "noise":
        g = torch.Generator().manual_seed(0)
        s = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1
        s[0], s[-1], s[:, 0], s[:, -1], s[:, :, 0], s[:, :, -1] = 1, 1, 1, 1, 1, 1
    else:
        raise ValueError(f"unknown field {name!r}")
    return s.to(device=device, dtype=dtype).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns, repeat: int, device: torch.device) -> list[float]:
    """Median wall time [s] of each ``fn()`` over ``repeat`` rounds, after one untimed round.

    The functions alternate within each round, so load on a shared machine hits both alike.
    """
    times = [[] for _ in fns]
    for r in range(repeat + 1):
        for fn, ts in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def same(a, b) -> bool:
    return (torch.equal(a.cubes, b.cubes) and torch.equal(a.case, b.case)
            and all(torch.equal(x, y) for x, y in zip(a.cut_starts, b.cut_starts)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="cells per axis")
    ap.add_argument("--fields", nargs="+", default=["sphere", "torus", "noise"],
                    choices=["sphere", "torus", "noise"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])

    args = ap.parse_args(argv)

    from diffworld.engine.runtime import init_warp, resolve_device
    from diffworld.geometry import kernels_flexicubes as K

    wp = init_warp()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    K.warm_up(device)
    warm = time.perf_counter() - t0

    print(f"FlexiCubes volume scan, {args.dtype}, device {device}, warp {wp.__version__}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; kernel load/compile {warm:.2f} s; median of {args.repeat}")
    head = (f"{'field':<7} {'res':>5} {'cubes M':>9} {'cut edges':>10} {'torch [ms]':>11} {'warp [ms]':>10} "
            f"{'torch/warp':>11}")
    print(head)
    print("-" * len(head))
    for name in args.fields:
        for n in args.sizes:
            sdf = make_field(name, n, dtype, device)
            ref = K.surface_scan_torch(sdf)
            out = K.surface_scan(sdf)
            if not same(ref, out):
                print(f"MISMATCH {name} {n}: warp scan differs from torch", file=sys.stderr)
                return 1
            t_torch, t_warp = time_pair([functools.partial(K.surface_scan_torch, sdf),
                                         functools.partial(K.surface_scan, sdf)], args.repeat, device)
            q = sum(c.shape[0] for c in out.cut_starts)
            print(f"{name:<7} {n:>5} {out.cubes.shape[0]:>9} {q:>10} {t_torch * 1e3:>11.1f} {t_warp * 1e3:>10.1f} "
                  f"{t_torch / t_warp:>10.1f}x")
            del sdf, ref, out
    return 0


if __name__ == "__main__":
    sys.exit(main())
