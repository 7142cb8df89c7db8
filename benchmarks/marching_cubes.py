"""Benchmark: diffworld marching cubes (forward + backward) vs scikit-image ``measure.marching_cubes``.

For each field (sphere r=0.4, torus R=0.3 r=0.1, signed distances on [-0.5, 0.5]^3) and grid size,
in float32:

* ours forward: ``marching_cubes(sdf)`` with ``sdf.requires_grad_()`` (the graph is built, as in
  an optimization loop); median of ``--repeat`` runs after one warm-up;
* ours backward: ``loss = (vertices * W).sum()`` with fixed random weights ``W``; only
  ``loss.backward()`` is timed (a fresh forward before each run);
* scikit-image forward: ``measure.marching_cubes(volume, level=0.0)`` (``method="lewiner"``, the
  default) on the same numpy array, median of ``--repeat`` runs after one warm-up;
* vertex and face counts of both;
* peak memory: every (field, size, method) runs in a fresh child process; the resident-set
  high-water mark (``VmHWM``) is reset to the current RSS right before the measured call through
  ``/proc/self/clear_refs`` (Linux >= 4.0) and read after it, so the number is the extra resident
  memory of one call (input grid and imports excluded). Where the reset is not possible the
  child's imports and input are built first and the growth of ``VmHWM`` is reported (a lower
  bound). On CUDA the torch allocator's peak is reported too.

Targets (CPU): forward no slower than 1.5x scikit-image at 128^3 and 256^3; backward no slower
than forward. Threads are left at the libraries' defaults and printed (diffworld sets torch to 1
intra-op thread on machines with <= 4 cores; Warp's CPU kernels and scikit-image's Lewiner code
are single-threaded).

Usage::

    python benchmarks/marching_cubes.py [--sizes 64 128 256] [--repeat 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

from bench_env import cpu_name, warp_version

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = ("sphere", "torus")
FWD_TARGET = 1.5  # ours / scikit-image, forward, CPU
FWD_TARGET_MIN_SIZE = 128
MIB = 1024.0 * 1024.0


# --- child process ------------------------------------------------------------------------------

def _status_kib() -> dict[str, int]:
    text = pathlib.Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


class PeakRSS:
    """Extra resident memory of a block [bytes]: high-water mark after minus RSS before."""

    def __init__(self) -> None:
        self.can_reset = True
        self.bytes = float("nan")

    def __enter__(self) -> "PeakRSS":
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._base = _status_kib()["VmRSS"]
        except OSError:
            self.can_reset = False
            self._base = _status_kib()["VmHWM"]
        return self

    def read(self) -> float:
        """Extra peak so far [bytes] (the block may continue)."""
        return max(0, _status_kib()["VmHWM"] - self._base) * 1024.0

    def __exit__(self, *exc) -> None:
        self.bytes = self.read()


def make_field(name: str, n: int):
    """Signed distance on the (n+1)^3 node grid of [-0.5, 0.5]^3, float32, built slice by slice
    (no large temporaries, so the memory baseline is the grid itself)."""
    import numpy as np

    ax = np.linspace(-0.5, 0.5, n + 1)
    y, z = np.meshgrid(ax, ax, indexing="ij")
    out = np.empty((n + 1,) * 3, dtype=np.float32)
    for i, x in enumerate(ax):
        if name == "sphere":
            out[i] = np.sqrt(x * x + y * y + z * z) - 0.4
        elif name == "torus":
            q = np.sqrt(x * x + y * y) - 0.3
            out[i] = np.sqrt(q * q + z * z) - 0.1
        else:
            raise ValueError(f"unknown field {name!r}")
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(field: str, n: int, repeat: int, device_name: str) -> dict:
    import torch

    from diffworld.engine.runtime import init_warp
    from diffworld.geometry.marching_cubes import marching_cubes

    init_warp()
    device = torch.device(device_name)
    # Warm-up on a tiny grid: loads (or compiles) the float32 kernels before anything is measured.
    tiny = torch.from_numpy(make_field(field, 8)).to(device).requires_grad_()
    marching_cubes(tiny).vertices.sum().backward()
    _sync(device)

    sdf = torch.from_numpy(make_field(field, n)).to(device).requires_grad_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    with PeakRSS() as mem:
        mesh = marching_cubes(sdf)
        _sync(device)
        peak_fwd = mem.read()
        # (the weights, 12 bytes per vertex, are counted in the forward+backward peak)
        weights = torch.randn(mesh.vertices.shape, generator=torch.Generator().manual_seed(0),
                              dtype=mesh.vertices.dtype).to(device)
        (mesh.vertices * weights).sum().backward()
        _sync(device)
    gpu_peak = (torch.cuda.max_memory_allocated(device) - gpu_base) if device.type == "cuda" else None
    n_vert, n_face = int(mesh.vertices.shape[0]), int(mesh.faces.shape[0])
    del mesh
    sdf.grad = None

    fwd, bwd = [], []
    for rep in range(repeat + 1):  # first of each is the warm-up
        _sync(device)
        t0 = time.perf_counter()
        mesh = marching_cubes(sdf)
        _sync(device)
        fwd.append(time.perf_counter() - t0)
        loss = (mesh.vertices * weights).sum()
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        _sync(device)
        bwd.append(time.perf_counter() - t0)
        sdf.grad = None
        del mesh, loss
    return dict(fwd_s=statistics.median(fwd[1:]), bwd_s=statistics.median(bwd[1:]), vertices=n_vert, faces=n_face,
                peak_fwd_bytes=peak_fwd, peak_bwd_bytes=mem.bytes, hwm_reset=mem.can_reset, gpu_peak_bytes=gpu_peak,
                torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads())


def run_skimage(field: str, n: int, repeat: int) -> dict:
    from skimage import measure

    measure.marching_cubes(make_field(field, 8), level=0.0)  # warm-up (imports, dispatch)
    volume = make_field(field, n)
    with PeakRSS() as mem:
        verts, faces, _, _ = measure.marching_cubes(volume, level=0.0)
    n_vert, n_face = int(verts.shape[0]), int(faces.shape[0])
    del verts, faces
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        measure.marching_cubes(volume, level=0.0)
        times.append(time.perf_counter() - t0)
    return dict(fwd_s=statistics.median(times[1:]), vertices=n_vert, faces=n_face, peak_fwd_bytes=mem.bytes,
                hwm_reset=mem.can_reset)


def worker(spec: str) -> None:
    job = json.loads(spec)
    if job["method"] == "ours":
        result = run_ours(job["field"], job["size"], job["repeat"], job["device"])
    else:
        result = run_skimage(job["field"], job["size"], job["repeat"])
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# --- parent -------------------------------------------------------------------------------------

def run_child(job: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(job)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    for line in res.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"benchmark child {job} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")


def environment_lines(device: str, threads: dict) -> list[str]:
    import numpy as np
    import skimage
    import torch

    env_threads = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "DIFFWORLD_TORCH_THREADS") if k in os.environ)
    lines = [
        f"machine : {cpu_name()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, warp {warp_version()}, "
        f"scikit-image {skimage.__version__}, numpy {np.__version__}",
        f"device  : {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else ""),
        f"threads : torch intra-op {threads.get('torch_threads')} / inter-op {threads.get('torch_interop_threads')} "
        "(library defaults after diffworld start-up), Warp CPU kernels and scikit-image: 1"
        + (f"; env {env_threads}" if env_threads else ""),
    ]
    return lines


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def fmt_mib(b) -> str:
    return "      -" if b is None or b != b else f"{b / MIB:7.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], metavar="N",
                        help="grid resolutions (cells per axis; the grid has N+1 nodes per axis)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (after 1 warm-up)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda[:N]' for diffworld")
    parser.add_argument("--fields", nargs="+", default=list(FIELDS), choices=FIELDS)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any row fails its target")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if any(n < 2 for n in args.sizes):
        parser.error(f"--sizes must be >= 2, got {args.sizes}")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            parser.error(f"--device {args.device!r}: expected 'cpu', or 'cuda[:N]' on a machine with CUDA")

    rows = []
    for field in args.fields:
        for n in args.sizes:
            job = dict(field=field, size=n, repeat=args.repeat, device=args.device)
            ours = run_child(dict(job, method="ours"), args.timeout)
            sk = run_child(dict(job, method="skimage"), args.timeout)
            rows.append(dict(field=field, size=n, ours=ours, skimage=sk))
            print(f"  measured {field} {n}^3", file=sys.stderr, flush=True)

    cpu = args.device == "cpu"
    title = (f"Marching cubes, float32, {args.device}: diffworld vs scikit-image (lewiner); "
             f"times are medians of {args.repeat} runs after 1 warm-up")
    print(title)
    print("=" * len(title))
    for line in environment_lines(args.device, rows[0]["ours"] if rows else {}):
        print(line)
    print(f"targets : forward <= {FWD_TARGET}x scikit-image at >= {FWD_TARGET_MIN_SIZE}^3 on CPU; "
          "backward <= forward")
    reset = all(r["ours"]["hwm_reset"] and r["skimage"]["hwm_reset"] for r in rows)
    print("memory  : extra peak RSS of one call in a fresh process [MiB] "
          + ("(VmHWM reset via /proc/self/clear_refs)" if reset else "(VmHWM growth; lower bound: reset unavailable)"))
    print()
    header = (f"{'field':<7} {'grid':>5} | {'fwd ms':>9} {'bwd ms':>9} {'skimage':>9} | {'fwd/sk':>6} {'bwd/fwd':>7} |"
              f" {'V ours':>8} {'V sk':>8} {'F ours':>8} {'F sk':>8} | {'mem fwd':>7} {'fwd+bwd':>7} {'mem sk':>7} |"
              f" {'fwd tgt':>7} {'bwd tgt':>7} | result")
    if not cpu:
        header += "  (GPU peak MiB)"
    print(header)
    print("-" * len(header))
    failed = False
    for r in rows:
        o, s = r["ours"], r["skimage"]
        ratio = o["fwd_s"] / s["fwd_s"]
        bwd_ratio = o["bwd_s"] / o["fwd_s"]
        fwd_applies = cpu and r["size"] >= FWD_TARGET_MIN_SIZE
        fwd_ok = ratio <= FWD_TARGET if fwd_applies else None
        bwd_ok = bwd_ratio <= 1.0
        ok = bwd_ok and fwd_ok is not False
        failed |= not ok
        tag = lambda v: "n/a" if v is None else ("PASS" if v else "FAIL")  # noqa: E731
        line = (f"{r['field']:<7} {str(r['size']) + '^3':>5} | {fmt_ms(o['fwd_s'])} {fmt_ms(o['bwd_s'])} "
                f"{fmt_ms(s['fwd_s'])} | {ratio:6.2f} {bwd_ratio:7.2f} | {o['vertices']:8d} {s['vertices']:8d} "
                f"{o['faces']:8d} {s['faces']:8d} | {fmt_mib(o['peak_fwd_bytes'])} {fmt_mib(o['peak_bwd_bytes'])} "
                f"{fmt_mib(s['peak_fwd_bytes'])} | {tag(fwd_ok):>7} {tag(bwd_ok):>7} | {'PASS' if ok else 'FAIL'}")
        if not cpu:
            line += f"  ({fmt_mib(o['gpu_peak_bytes']).strip()})"
        print(line)
    print()
    print("fwd/sk = ours forward / scikit-image forward; bwd/fwd = ours backward / ours forward; V, F = vertex and "
          "face counts;")
    print("mem fwd / fwd+bwd = ours (forward; forward then backward), mem sk = scikit-image forward.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=args.device, repeat=args.repeat, rows=rows), indent=2))
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
