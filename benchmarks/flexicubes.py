"""Benchmark: diffworld FlexiCubes vs the public PyTorch FlexiCubes (nv-tlabs/FlexiCubes).

Field: signed distance of a sphere r=0.4 on the (n+1)^3 node grid of [-0.5, 0.5]^3, float32, with
random raw weights drawn from one seeded generator (standard normal times 0.5): ``beta``
(n, n, n, 12), ``alpha`` (n, n, n, 8), ``gamma`` (n, n, n) and ``deform`` (n+1, n+1, n+1, 3).
All five tensors are leaves with ``requires_grad=True``, as in an optimization loop.

Both implementations see the same field, weights and node positions:

* ours: ``flexicubes(sdf, bounds, weights=fn, deform=fn, training=)`` with the raw weights and
  offsets stored for a band of cubes around the surface and looked up (``--weights lookup``, the
  default: storage and gradients proportional to the surface), or
  ``flexicubes(sdf, bounds, beta=, alpha=, gamma=, deform=, training=)`` with the dense tensors
  (``--weights dense``: the same inputs as the public implementation, whose dense gradients
  then dominate both peaks);
* public: built as in its ``examples/optimize.py``: ``fc = FlexiCubes(device)``,
  ``x_nx3, cube_fx8 = fc.construct_voxel_grid(n)``, then per call
  ``fc(x_nx3 + k * tanh(deform), sdf, cube_fx8, n, beta_fx12=, alpha_fx8=, gamma_f=, training=)``.
  Its vertex order is ours flattened in C order (its grid is a lexicographic ``unique``) and its
  corner order is ours (x + 2y + 4z), so ``sdf``, ``alpha``, ``gamma`` and ``deform`` are our
  tensors reshaped; ``beta`` is permuted from our edge numbering to its ``cube_edges``. Node
  positions are passed exactly (``lower + ijk * h``; the public grid rounds them to 1e-5, checked
  to be the same points), and the deformation uses our scale ``(0.5 - 1e-8) h`` (the example's
  ``(2 - 1e-8) / (2 n)`` on a grid of width 2 differs by 5e-9 h).

The public grid construction (a ``unique`` over 8 n^3 vertices) is timed separately and shown
in the last columns; the extraction call (deformation included) is the comparable number. Above
``--public-grid-max-res`` (default 128: at 256^3 the ``unique`` needs about 8x its 128^3 peak,
more than this machine has) ``cube_fx8`` is built by index arithmetic instead, checked equal to
``construct_voxel_grid`` on a small grid in the same process.

Without ``--reference`` (or ``$DIFFWORLD_FLEXICUBES_REF``: a folder holding the public
``flexicubes.py`` and ``tables.py``; never part of this repository) the baseline is our own
marching cubes on the same field (no weights; the same numbers in both modes).

Measured for each resolution and mode, after a warm-up on an 8^3 grid that loads/compiles
everything (in every child process):

* peak memory, for each implementation in its own fresh child process: the resident-set
  high-water mark (``VmHWM``) is reset to the current RSS through ``/proc/self/clear_refs``
  (after freed heap pages are handed back with ``malloc_trim``) right before the first
  full-size forward+backward and read after it: the extra resident memory of one call, inputs
  and imports excluded. Without the reset (old kernels) the growth of ``ru_maxrss`` over the
  RSS before the call is reported (its high-water mark may predate the call: then the number is
  a lower bound, marked ``~``). With ``--device cuda`` the torch allocator's peak over the
  memory allocated before the call is reported as well. glibc's malloc keeps freed heap
  memory for reuse (its mmap threshold rises to the largest block freed, up to 32 MiB, so
  mid-sized tensors come from the heap and their pages stay resident after they are freed):
  for an implementation made of many mid-sized tensors the default RSS peak is about twice the
  memory it holds at once (ours at 256^3: about 380 MB against 183 MB held). ``--malloc tight``
  runs the memory children with ``MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=131072`` (both
  implementations), so that the RSS peak is the memory held; the same settings cost ours about
  40 % more time (fresh pages for every temporary), so the timing child keeps the defaults;
* times, in one more child that runs both implementations in alternation (so both see the same
  load on a shared machine): forward = one extraction call; forward+backward = the call, the
  loss ``vertices.square().sum() + l_dev.mean()`` (marching cubes: without ``l_dev``) and
  ``loss.backward()``. On CPU the clock is the process's CPU time (user + sys): everything runs
  on one thread, so it equals the wall time on an idle machine, and other processes on a shared
  machine do not inflate it (wall times are in the ``--json`` output); on CUDA, synchronized
  wall time. The best of up to ``--repeat`` rounds is reported (at least one round; no new
  round after ``--budget`` seconds; medians are in the ``--json`` output);
* sanity (public baseline, both modes): vertex and face counts, surface area and enclosed volume
  of both meshes must agree.

The parent polls each child's RSS and kills it above ``--max-rss-gb``; children that run past
``--timeout`` or are killed are reported as such. Torch runs with 1 intra-op thread (2-core
machine: more threads oversubscribe), Warp CPU kernels are single-threaded.

Targets (CPU, from the issue): at least 5x faster than the public implementation at 128^3
(forward and forward+backward), at most a tenth of its peak memory at 256^3.

Usage::

    python benchmarks/flexicubes.py [--quick] [--sizes 64 128 256] [--modes training eval]
        [--reference DIR] [--device cpu|cuda] [--repeat 5] [--budget 60] [--timeout 1200]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import importlib.util
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from bench_env import cpu_name, warp_version

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIB = 1024.0 * 1024.0
SPEEDUP_TARGET, SPEEDUP_RES = 5.0, 128  # ours at least 5x faster than public at 128^3 (CPU)
MEMORY_TARGET, MEMORY_RES = 0.1, 256  # ours at most 1/10 of public's peak at 256^3 (CPU)
BOUNDS = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
RADIUS = 0.4
WEIGHT_SCALE = 0.5  # raw weights ~ N(0, 0.5^2): normalized weights mostly in [0.5, 1.5]
RESULT_TAG = "BENCH_RESULT "
CLOCK_NOTE = {True: "process CPU time (user + sys; single-threaded work, so = wall time when idle; "
                    "not inflated by other processes on this shared machine)",
              False: "wall time, CUDA synchronized"}


# --- measurement helpers (also used by benchmarks/gshell.py) -------------------------------------

def _status_kib() -> dict[str, int]:
    text = pathlib.Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without it, memory freed earlier in the process (input generation, warm-up, the public grid
    construction) stays resident, and a later call that reuses it shows no RSS growth at all.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may keep freed pages (peak underestimated)
        pass


class PeakRSS:
    """Extra resident memory of a block [bytes]: high-water mark during it minus RSS before it."""

    def __enter__(self) -> "PeakRSS":
        release_free_memory()
        self.exact = True
        self._base = _status_kib()["VmRSS"]
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        except OSError:
            # ru_maxrss is the process's lifetime peak: it may predate the block (lower bound).
            self.exact = False
        return self

    def read(self) -> float:
        """Extra peak so far [bytes] (the block may continue)."""
        hwm = _status_kib()["VmHWM"] if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, hwm - self._base) * 1024.0

    def __exit__(self, *exc) -> None:
        self.bytes = self.read()


def sync(device) -> None:
    """Wait for queued GPU work, so timings and memory readings cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sphere_sdf(n: int, device, radius: float = RADIUS):
    """Signed distance of a sphere on the (n+1)^3 node grid of [-0.5, 0.5]^3, float32, C order."""
    import torch

    ax = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    return ((x * x + y * y + z * z).sqrt() - radius).to(torch.float32).to(device)


def node_positions(n: int, device):
    """Exact node positions lower + ijk * h, shape (n+1, n+1, n+1, 3), float32."""
    import torch

    ax = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).to(torch.float32).to(device)


def measure_memory(forward: Callable, loss_of: Callable, device) -> dict:
    """Extra peak memory of one forward+backward (the first at full size in this process).

    Args:
        forward: () -> output of one extraction call.
        loss_of: output -> scalar tensor.
        device: torch device the work runs on.

    Returns:
        dict with peak_fwd_bytes (after the forward), peak_bytes (forward+backward), peak_exact,
        gpu_peak_bytes (CUDA: the torch allocator's peak over what was allocated before; else
        None) and ``output`` (for counts and checks).
    """
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    sync(device)
    with PeakRSS() as mem:
        out = forward()
        sync(device)
        peak_fwd = mem.read()
        loss_of(out).backward()
        sync(device)
    gpu_peak = torch.cuda.max_memory_allocated(device) - gpu_base if cuda else None
    return dict(peak_fwd_bytes=peak_fwd, peak_bytes=mem.bytes, peak_exact=mem.exact, gpu_peak_bytes=gpu_peak,
                output=out)


def measure_times(cases: dict, device, repeat: int, budget: float) -> dict:
    """Forward and forward+backward times of several implementations, run in alternation.

    On a shared machine, wall times taken minutes apart in different processes can differ by 2x.
    So: the implementations run in alternation (A B, then B A, ...) in one process, and on CPU
    the reported time is the process's CPU time (user + sys, all threads): with torch and Warp
    single-threaded it equals the wall time on an idle machine, and other processes do not add
    to it. Each implementation's minimum is reported; medians and wall times go to the JSON.

    Args:
        cases: name -> (forward, loss_of, leaves); ``leaves`` get ``.grad = None`` after each run.
        device: torch device the work runs on (CUDA: wall time, synchronized).
        repeat: Most rounds (one run of every case each); at least one round always runs.
        budget: No new round starts after this many seconds [s] (wall).

    Returns:
        name -> dict(fwd_s, fwdbwd_s, fwd_median_s, fwdbwd_median_s, fwd_wall_s, fwdbwd_wall_s,
        clock, runs).
    """
    import torch

    cpu = torch.device(device).type == "cpu"
    clock = time.process_time if cpu else time.perf_counter
    samples = {name: dict(fwd=[], total=[], fwd_wall=[], total_wall=[]) for name in cases}
    order = list(cases)
    start = time.perf_counter()
    rounds = 0
    while rounds < max(1, repeat) and (rounds == 0 or time.perf_counter() - start < budget):
        for name in order:
            forward, loss_of, leaves = cases[name]
            sync(device)
            c0, w0 = clock(), time.perf_counter()
            out = forward()
            sync(device)
            c1, w1 = clock(), time.perf_counter()
            loss_of(out).backward()
            sync(device)
            c2, w2 = clock(), time.perf_counter()
            del out
            for t in leaves:
                t.grad = None
            for key, value in (("fwd", c1 - c0), ("total", c2 - c0), ("fwd_wall", w1 - w0), ("total_wall", w2 - w0)):
                samples[name][key].append(value)
        order.reverse()
        rounds += 1
    return {name: dict(fwd_s=min(t["fwd"]), fwdbwd_s=min(t["total"]), fwd_median_s=statistics.median(t["fwd"]),
                       fwdbwd_median_s=statistics.median(t["total"]), fwd_wall_s=min(t["fwd_wall"]),
                       fwdbwd_wall_s=min(t["total_wall"]), clock="cpu" if cpu else "wall", runs=rounds)
            for name, t in samples.items()}


def merge_results(memory: dict, times: dict, name: str) -> dict:
    """One implementation's row: its memory child's result plus its times from the timing child."""
    if "error" in memory:
        return memory
    if "error" in times or name not in times:
        return dict(memory, error=times.get("error", "not timed"))
    return {**memory, **times[name]}


def mesh_stats(vertices, faces) -> dict:
    """Counts, surface area and enclosed volume (float64) of a triangle mesh."""
    v = vertices.detach().double()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    cross = (b - a).cross(c - a, dim=1)
    return dict(vertices=int(v.shape[0]), faces=int(faces.shape[0]), area=float(cross.norm(dim=1).sum() / 2),
                volume=float((a * b.cross(c, dim=1)).sum() / 6))


def run_child(script: pathlib.Path, job: dict, timeout: float, max_rss_bytes: float) -> dict:
    """Run ``script --worker job`` in a fresh process; its result dict, or a dict with ``error``.

    The child's RSS is polled so that a run heading for the machine's limit is stopped here (and
    reported) instead of taking the machine down.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if job.get("task") == "memory" and job.get("malloc") == "tight":
        env.update(MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(script), "--worker", json.dumps(job)],
                                stdout=out, stderr=err, text=True, env=env)
        start, error, max_seen = time.monotonic(), None, 0
        while proc.poll() is None:
            try:
                rss = int(re.search(r"^VmRSS:\s+(\d+)", pathlib.Path(f"/proc/{proc.pid}/status").read_text(),
                                    re.M).group(1)) * 1024
                max_seen = max(max_seen, rss)
            except (OSError, AttributeError):
                rss = 0
            if rss > max_rss_bytes:
                error = f"killed: RSS > {max_rss_bytes / 2**30:.1f} GiB"
            elif time.monotonic() - start > timeout:
                error = f"timeout > {timeout:.0f} s"
            if error:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if error:
        return dict(error=error, max_rss_bytes=max_seen)
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    print(f"child {job} failed (exit {proc.returncode}):\n{stderr[-3000:]}", file=sys.stderr)
    return dict(error=f"failed: {tail[0][:80]}")


def machine_lines(device: str) -> list[str]:
    """Machine, library versions and threads, for the table header."""
    import torch

    mem = pathlib.Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) / 2**20
    lines = [f"machine : {cpu_name()}, {os.cpu_count()} logical cores, {total:.0f} GiB RAM, "
             f"{platform.system()} {platform.release()}",
             f"versions: python {platform.python_version()}, torch {torch.__version__}, warp {warp_version()}",
             "threads : torch intra-op 1 (set in every child), Warp CPU kernels 1"]
    if device.startswith("cuda"):
        lines.append(f"device  : {device} ({torch.cuda.get_device_name(torch.device(device))})")
    return lines


def add_child_arguments(parser: argparse.ArgumentParser, *, budget: float, timeout: float) -> None:
    """The options of the benchmarks that measure in child processes (this one and gshell.py):
    sizes, device, timing budget, child limits, JSON output and the hidden ``--worker``."""
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                        help="cells per axis (default 64 128 256; --quick: 64 128)")
    parser.add_argument("--quick", action="store_true", help="only 64^3 and 128^3")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda[:N]'")
    parser.add_argument("--repeat", type=int, default=5, help="most timed runs per measurement")
    parser.add_argument("--budget", type=float, default=budget, help="no new timed run after this many seconds")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per child process")
    parser.add_argument("--max-rss-gb", type=float, default=default_max_rss_gb(), help="kill a child above this RSS")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def checked_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: int, why: str = "") -> list[int]:
    """The sizes to run (``--sizes``, else the ``--quick`` or full default), each at least
    ``minimum``; also rejects a ``--device`` this machine does not have (through ``parser.error``)."""
    sizes = args.sizes or ([64, 128] if args.quick else [64, 128, 256])
    if any(n < minimum for n in sizes):
        parser.error(f"--sizes must be >= {minimum}{why}, got {sizes}")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            parser.error(f"--device {args.device!r}: expected 'cpu', or 'cuda[:N]' on a machine with CUDA")
    return sizes


def default_max_rss_gb() -> float:
    """90 % of the memory available now (the machine may be shared): a child above it is stopped
    before the OOM killer acts."""
    mem = pathlib.Path("/proc/meminfo").read_text()
    return 0.9 * int(re.search(r"MemAvailable:\s+(\d+)", mem).group(1)) / 2**20


def timing_cells(res: dict) -> str:
    """One implementation's forward s, forward+backward s and peak MiB columns (``~``: a lower
    bound), or its error, then the column separator."""
    if "error" in res:
        return f"{res['error'][:30]:>30} | "
    approx = "" if res["peak_exact"] else "~"
    return f"{res['fwd_s']:10.3f} {res['fwdbwd_s']:10.3f} {approx + format(res['peak_bytes'] / MIB, '.0f'):>8} | "


def fmt(value, spec: str, width: int) -> str:
    """``value`` formatted, or ``-`` right-aligned when missing."""
    text = format(value, spec) if isinstance(value, (int, float)) and value == value else "-"
    return text.rjust(width)


# --- child: the three implementations -----------------------------------------------------------

def random_weights(n: int, seed: int) -> dict:
    """Raw FlexiCubes weights in our layout, from one CPU generator (same numbers on any device)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = dict(beta=(n, n, n, 12), alpha=(n, n, n, 8), gamma=(n, n, n), deform=(n + 1, n + 1, n + 1, 3))
    return {k: torch.randn(s, generator=g) * WEIGHT_SCALE for k, s in shapes.items()}


def fc_loss(out):
    vertices, _, l_dev = out
    return vertices.square().sum() + l_dev.mean()


def setup_ours(n: int, training: bool, device, seed: int, weights: str = "lookup"):
    """(forward, leaves) for diffworld FlexiCubes.

    ``weights="dense"``: the five dense leaves, as the public implementation takes them.
    ``weights="lookup"``: the raw weights and offsets are stored only for a band of cubes around
    the surface (every cube with a corner within 1.5 cells of it; its nodes for the offsets), in
    tables with one row per stored cube or node, read through ``flexicubes(weights=fn,
    deform=fn)``; the stored values are the dense ones at those cubes and nodes, so the mesh is
    the same. That is how an optimization keeps weight storage and gradients proportional to the
    surface (unknown cubes read raw 0).
    """
    import torch

    from diffworld.geometry.flexicubes import flexicubes

    sdf = sphere_sdf(n, device).requires_grad_()
    dense = {k: v.to(device) for k, v in random_weights(n, seed).items()}
    if weights == "dense":
        w = {k: v.requires_grad_() for k, v in dense.items()}

        def forward():
            m = flexicubes(sdf, BOUNDS, beta=w["beta"], alpha=w["alpha"], gamma=w["gamma"], deform=w["deform"],
                           training=training)
            return m.vertices, m.faces, m.l_dev

        return forward, [sdf, *w.values()]

    near = sdf.detach().abs() < 1.5 / n  # nodes within 1.5 cells of the sphere (h = 1/n)
    band = near[:-1, :-1, :-1].clone()
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                band |= near[dx:n + dx, dy:n + dy, dz:n + dz]
    cube_keys = torch.nonzero(band)  # (K, 3), row-major: linear ids sorted
    node_band = torch.zeros_like(near)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                node_band[dx:n + dx, dy:n + dy, dz:n + dz] |= band
    node_keys = torch.nonzero(node_band)
    m1 = n + 1
    cube_lin = (cube_keys[:, 0] * n + cube_keys[:, 1]) * n + cube_keys[:, 2]
    node_lin = (node_keys[:, 0] * m1 + node_keys[:, 1]) * m1 + node_keys[:, 2]
    at = tuple(cube_keys.unbind(1))
    tables = [dense[k][at].requires_grad_() for k in ("beta", "alpha", "gamma")]  # (K, 12), (K, 8), (K,)
    offsets = dense["deform"][tuple(node_keys.unbind(1))].requires_grad_()  # (K_nodes, 3)
    del dense

    def lookup(keys, table, lin):
        row = torch.searchsorted(keys, lin).clamp_max(keys.shape[0] - 1)
        found = keys[row] == lin
        return table[row] * found.view(-1, *([1] * (table.dim() - 1)))  # rows not stored: raw 0

    def cube_weights(cubes):
        lin = (cubes[:, 0] * n + cubes[:, 1]) * n + cubes[:, 2]
        return tuple(lookup(cube_lin, t, lin) for t in tables)

    def node_offsets(nodes):
        return lookup(node_lin, offsets, (nodes[:, 0] * m1 + nodes[:, 1]) * m1 + nodes[:, 2])

    def forward():
        m = flexicubes(sdf, BOUNDS, weights=cube_weights, deform=node_offsets, training=training)
        return m.vertices, m.faces, m.l_dev

    return forward, [sdf, *tables, offsets]


def setup_marching_cubes(n: int, device):
    """(forward, leaves) for diffworld marching cubes (the baseline without a reference)."""
    from diffworld.geometry.marching_cubes import marching_cubes

    sdf = sphere_sdf(n, device).requires_grad_()

    def forward():
        m = marching_cubes(sdf, BOUNDS)
        return m.vertices, m.faces, m.vertices.new_zeros((1,))  # no L_dev

    return forward, [sdf]


@functools.lru_cache(maxsize=None)
def load_public_flexicubes(ref_dir: str):
    """The public ``FlexiCubes`` class from ``ref_dir`` (loaded by path: this script is also
    named flexicubes.py, and its folder comes first on sys.path)."""
    sys.path.insert(0, ref_dir)  # for its `from tables import *`
    try:
        spec = importlib.util.spec_from_file_location("public_flexicubes", os.path.join(ref_dir, "flexicubes.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ref_dir)
    return module.FlexiCubes


def cube_corner_nodes(n: int, device):
    """``cube_fx8`` by index arithmetic: cubes in row-major order, corner c at node
    (i + (c & 1), j + (c >> 1 & 1), k + (c >> 2)), nodes numbered in C order."""
    import torch

    m = n + 1
    i, j, k = torch.meshgrid(*(torch.arange(n, device=device),) * 3, indexing="ij")
    base = ((i * m + j) * m + k).reshape(-1, 1)
    c = torch.arange(8, device=device)
    return base + (c & 1) * m * m + ((c >> 1) & 1) * m + (c >> 2)


def public_grid(fc, n: int, device, build: bool) -> tuple:
    """(cube_fx8, info): the public ``construct_voxel_grid`` (timed, its peak memory measured) or,
    when ``build`` is False, the same table by index arithmetic (checked on a small grid)."""
    import torch

    if not build:
        _, cubes_small = fc.construct_voxel_grid(6)
        if not torch.equal(cubes_small.long(), cube_corner_nodes(6, device)):
            raise RuntimeError("index-arithmetic cube_fx8 differs from construct_voxel_grid")
        return cube_corner_nodes(n, device), dict(grid="arithmetic")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        x_nx3, cube_fx8 = fc.construct_voxel_grid(n)
        sync(device)
        grid_s = time.perf_counter() - t0
    # Its vertices must be our nodes in C order (up to its 1e-5 rounding), else the mapping is wrong.
    err = float((x_nx3 - node_positions(n, device).reshape(-1, 3)).abs().max())
    if err > 1e-5:
        raise RuntimeError(f"public grid vertices are not our nodes in C order (max diff {err})")
    return cube_fx8, dict(grid="public", grid_s=grid_s, grid_peak_bytes=mem.bytes)


def setup_public(FlexiCubes, n: int, training: bool, device, seed: int, build_grid: bool):
    """(forward, leaves, grid info) for the public FlexiCubes on our field and weights."""
    import torch

    from diffworld.geometry.mc_tables import EDGE_CORNERS

    fc = FlexiCubes(device=str(device))
    cube_fx8, info = public_grid(fc, n, device, build_grid)
    # beta: its edge e is cube_edges[e] (a corner pair); ours numbers the same pairs differently.
    ours = {frozenset(map(int, e)): i for i, e in enumerate(EDGE_CORNERS)}
    perm = [ours[frozenset(map(int, e))] for e in fc.cube_edges.reshape(12, 2).tolist()]
    w = random_weights(n, seed)
    beta = w.pop("beta").reshape(-1, 12)[:, perm].contiguous().to(device).requires_grad_()
    alpha = w.pop("alpha").reshape(-1, 8).to(device).requires_grad_()
    gamma = w.pop("gamma").reshape(-1).to(device).requires_grad_()
    deform = w.pop("deform").reshape(-1, 3).to(device).requires_grad_()
    sdf = sphere_sdf(n, device).reshape(-1).requires_grad_()
    x_nx3 = node_positions(n, device).reshape(-1, 3)
    scale = (0.5 - 1e-8) / n  # our deformation scale (0.5 - 1e-8) h, h = 1/n

    def forward():
        # The deformation is part of the call, as in its examples/optimize.py training loop.
        x = x_nx3 + scale * torch.tanh(deform)
        return fc(x, sdf, cube_fx8, n, beta_fx12=beta, alpha_fx8=alpha, gamma_f=gamma, training=training)

    return forward, [sdf, beta, alpha, gamma, deform], info


def make_case(impl: str, n: int, job: dict, device, for_memory: bool):
    """(forward, leaves, info) of one implementation on the n^3 benchmark field."""
    training = job["mode"] == "training"
    if impl == "ours":
        return (*setup_ours(n, training, device, job["seed"], job["weights"]), {})
    if impl == "marching_cubes":
        return (*setup_marching_cubes(n, device), {})
    # The public grid construction is run (and measured) in the memory child only; the timing
    # child builds the same cube_fx8 by index arithmetic (it is not part of the timed call).
    build = for_memory and n <= job["public_grid_max_res"]
    return setup_public(load_public_flexicubes(job["reference"]), n, training, device, job["seed"], build)


def worker(job: dict) -> dict:
    """``task == "memory"``: peak memory and mesh of ``impl``; ``"timing"``: times of ``impls``."""
    import torch

    torch.set_num_threads(1)
    device = torch.device(job["device"])
    impls = [job["impl"]] if job["task"] == "memory" else job["impls"]
    if "ours" in impls:
        from diffworld.engine.runtime import init_warp

        init_warp()
    # Warm-up on a tiny grid: imports, Warp kernel loading, torch dispatch caches.
    for impl in impls:
        forward, _, _ = make_case(impl, 8, job, device, for_memory=False)
        fc_loss(forward()).backward()
        sync(device)
    del forward
    if job["task"] == "timing":
        cases = {impl: make_case(impl, job["size"], job, device, for_memory=False) for impl in impls}
        return measure_times({k: (f, fc_loss, leaves) for k, (f, leaves, _) in cases.items()}, device,
                             job["repeat"], job["budget"])
    forward, leaves, info = make_case(job["impl"], job["size"], job, device, for_memory=True)
    result = measure_memory(forward, fc_loss, device)
    vertices, faces, l_dev = result.pop("output")
    result.update(mesh_stats(vertices, faces), l_dev_mean=float(l_dev.detach().double().mean()), **info)
    return result


# --- parent -------------------------------------------------------------------------------------

def leaf_gradient_bytes(n: int) -> int:
    """Bytes of the float32 gradients of sdf, beta, alpha, gamma (per cube) and deform at n^3."""
    return 4 * ((n + 1) ** 3 * (1 + 3) + n**3 * (12 + 8 + 1))


def check_agreement(ours: dict, ref: dict) -> str:
    """Sanity check: same counts, area and volume (relative 1e-4)."""
    if "error" in ours or "error" in ref:
        return "-"
    same = ours["vertices"] == ref["vertices"] and ours["faces"] == ref["faces"]
    close = all(abs(ours[k] - ref[k]) <= 1e-4 * abs(ref[k]) for k in ("area", "volume"))
    return "ok" if same and close else "DIFF"


def print_table(rows: list[dict], args, reference: str | None) -> bool:
    """Print the results; True when every applicable target passes."""
    base = "public FlexiCubes (nv-tlabs, PyTorch)" if reference else "diffworld marching cubes (no reference given)"
    title = f"FlexiCubes, sphere r=0.4, float32, {args.device}: diffworld ({args.weights} weights) vs {base}"
    print(title)
    print("=" * len(title))
    for line in machine_lines(args.device):
        print(line)
    if reference:
        print(f"baseline: {reference}")
    print(f"timing  : best of up to {args.repeat} forward+backward rounds, implementations alternating in one process "
          f"(no new round after {args.budget:.0f} s); loss = vertices.square().sum() + l_dev.mean()")
    print("clock   : " + CLOCK_NOTE[args.device == "cpu"])
    print("memory  : peak RSS growth of the first forward+backward in a fresh process [MiB], inputs excluded; "
          + ("glibc malloc defaults (freed heap memory is kept for reuse)" if args.malloc == "default" else
             "glibc malloc tight (MALLOC_TRIM_THRESHOLD_=0, MALLOC_MMAP_THRESHOLD_=128 KiB: RSS = memory held)"))
    if reference and args.device == "cpu":
        print(f"targets : speedup >= {SPEEDUP_TARGET:g}x (fwd and fwd+bwd) at {SPEEDUP_RES}^3; "
              f"memory ratio <= {MEMORY_TARGET:g} at {MEMORY_RES}^3")
    print()
    ref = "ref" if reference else "mc"
    gpu = args.device.startswith("cuda")
    head = (f"{'res':>5} {'mode':<8} | {'ours fwd s':>10} {'fwd+bwd s':>10} {'peak MB':>8} | "
            f"{ref + ' fwd s':>10} {'fwd+bwd s':>10} {'peak MB':>8} | {'speedup':>7} {'fwd+bwd':>7} {'mem':>6} | "
            f"{'V ours':>7} {'F ours':>7} {'V ' + ref:>7} {'F ' + ref:>7} {'check':>5}")
    if reference:
        head += f" | {'grid s':>7} {'grid MB':>8}"
    if gpu:
        head += f" | {'GPU ours':>8} {'GPU ' + ref:>8}"
    head += " | target"
    print(head)
    print("-" * len(head))
    all_ok, notes = True, []
    for r in rows:
        o, b = r["ours"], r["ref"]
        sp_f = b["fwd_s"] / o["fwd_s"] if "error" not in o and "error" not in b else None
        sp_t = b["fwdbwd_s"] / o["fwdbwd_s"] if sp_f is not None else None
        mem = o["peak_bytes"] / b["peak_bytes"] if sp_f is not None and b["peak_bytes"] > 0 else None
        check = check_agreement(o, b) if reference else ""
        line = f"{str(r['size']) + '^3':>5} {r['mode']:<8} | "
        for res in (o, b):
            line += timing_cells(res)
            if "error" in res:
                notes.append(f"{r['size']}^3 {r['mode']} {'ours' if res is o else ref}: {res['error']}")
        line += f"{fmt(sp_f, '.2f', 7)} {fmt(sp_t, '.2f', 7)} {fmt(mem, '.3f', 6)} | "
        line += " ".join(fmt(res.get(k), "d", 7) for res in (o, b) for k in ("vertices", "faces"))
        line += f" {check:>5}"
        if reference:
            grid = b.get("grid")
            gs = fmt(b.get("grid_s"), ".1f", 7) if grid == "public" else f"{'arith' if grid else '-':>7}"
            gm = fmt(b.get("grid_peak_bytes", float("nan")) / MIB, ".0f", 8)
            line += f" | {gs} {gm}"
        if gpu:
            line += " | " + " ".join(fmt((res.get("gpu_peak_bytes") or float("nan")) / MIB, ".0f", 8) for res in (o, b))
        verdict = "n/a"
        if reference and args.device == "cpu" and r["size"] in (SPEEDUP_RES, MEMORY_RES):
            ok = True
            if r["size"] == SPEEDUP_RES:
                ok &= sp_f is not None and min(sp_f, sp_t) >= SPEEDUP_TARGET
            if r["size"] == MEMORY_RES:
                # A baseline that could not finish is not a pass: the ratio is unknown.
                ok &= mem is not None and mem <= MEMORY_TARGET
            verdict = "PASS" if ok else "FAIL"
            all_ok &= ok
        if check == "DIFF":
            all_ok = False
        print(line + f" | {verdict}")
    print()
    print(f"speedup = {ref} time / ours (forward; forward+backward); mem = ours peak / {ref} peak; "
          "peak = forward+backward; ~ = lower bound (no VmHWM reset).")
    # The gradients of the dense leaves (sdf, 21 weights per cube, deformation) are allocated by
    # autograd whatever the implementation: a floor under both peaks that no sparsity removes.
    if reference:
        floors = ", ".join(f"{n}^3 {leaf_gradient_bytes(n) / MIB:.0f} MB" for n in sorted({r['size'] for r in rows}))
        print(f"leaf gradients (dense float32 sdf, beta, alpha, gamma, deform): {floors}; in the public peak, "
              f"and in ours with --weights dense (ours now: --weights {args.weights}).")
        print("check = same vertex and face counts, area and volume within 1e-4; grid s / grid MB = the "
              "public construct_voxel_grid (not in its times); arith = cube_fx8 by index arithmetic (its "
              "construction would not fit in memory).")
    for note in notes:
        print("note: " + note)
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_child_arguments(parser, budget=60.0, timeout=1200.0)
    parser.add_argument("--modes", nargs="+", default=["training", "eval"], choices=["training", "eval"])
    parser.add_argument("--reference", default=os.environ.get("DIFFWORLD_FLEXICUBES_REF"),
                        help="folder with the public flexicubes.py + tables.py (default $DIFFWORLD_FLEXICUBES_REF); "
                             "without it the baseline is diffworld marching cubes")
    parser.add_argument("--public-grid-max-res", type=int, default=128,
                        help="largest n for which the public construct_voxel_grid is run (above: index arithmetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc", default="default", choices=["default", "tight"],
                        help="glibc malloc in the memory children: 'default', or 'tight' (MALLOC_TRIM_THRESHOLD_=0, "
                             "MALLOC_MMAP_THRESHOLD_=128 KiB: freed memory goes back to the system, so the RSS peak "
                             "is the memory an implementation holds rather than what glibc keeps after frees)")
    parser.add_argument("--weights", default="lookup", choices=["lookup", "dense"],
                        help="how ours gets its raw weights and offsets: tables over a band of cubes around the "
                             "surface through weights=/deform= functions (default), or the dense tensors")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target or check fails")
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    sizes = checked_sizes(parser, args, 2)
    reference = args.reference
    if reference:
        reference = str(pathlib.Path(reference).resolve())
        missing = [f for f in ("flexicubes.py", "tables.py") if not (pathlib.Path(reference) / f).is_file()]
        if missing:
            parser.error(f"--reference {reference}: missing {', '.join(missing)}")

    script = pathlib.Path(__file__).resolve()
    rows = []
    for n in sizes:
        for mode in args.modes:
            job = dict(size=n, mode=mode, device=args.device, repeat=args.repeat, budget=args.budget,
                       seed=args.seed, weights=args.weights, malloc=args.malloc, reference=reference,
                       public_grid_max_res=args.public_grid_max_res)
            run = lambda extra: run_child(script, dict(job, **extra), args.timeout,  # noqa: E731
                                          args.max_rss_gb * 2**30)
            base = "public" if reference else "marching_cubes"
            memory = {impl: run(dict(task="memory", impl=impl)) for impl in ("ours", base)}
            # Times: one child running the implementations whose memory run succeeded, alternately.
            timed = [impl for impl in ("ours", base) if "error" not in memory[impl]]
            times = run(dict(task="timing", impls=timed)) if timed else {}
            rows.append(dict(size=n, mode=mode, ours=merge_results(memory["ours"], times, "ours"),
                             ref=merge_results(memory[base], times, base)))
            print(f"  measured {n}^3 {mode}", file=sys.stderr, flush=True)
    ok = print_table(rows, args, reference)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=args.device, reference=reference, rows=rows), indent=2))
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
