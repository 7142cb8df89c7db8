"""Benchmark: diffworld MLS-MPM (forward, forward + backward, memory) vs a Taichi baseline.

Setup: 64 cells on the unit cube (65^3 nodes, walls 3 nodes thick, free slip), float32,
dt = 1e-4 s, gravity -9.8 m/s^2 along z. One cube of particles at 8 per cell (diffworld's
lattice fill), centred in x and y with its bottom at z = 0.1, starting at rest.

Throughput table, for water / jelly (fixed corotated) / plasticine (von Mises) at ~10k and ~100k
particles, in particle-substeps per second (N * substeps / seconds); every measurement follows a
warm-up that loads the kernels:

* ours forward: ``mpm.Stepper.substep`` in a loop under ``torch.no_grad()`` (no autograd),
  median of 3 runs;
* ours forward + backward: ``mpm.rollout(..., window=min(T, 50))`` with ``x0.requires_grad_()``,
  then ``(x_T ** 2).sum().backward()``; the rate counts both; ``bwd/fwd`` is the time of
  ``backward()`` (which recomputes each window's forward but the last, whose intermediates the
  forward kept, then runs the adjoints) over the time of the rollout's forward; the next column
  recomputes every window (``keep_last_window=False``): the ratio of a long horizon;
* Taichi forward: ``benchmarks/mpm_taichi.py``, the same substep in FluidLab's formulation, from
  the very same initial positions, ``ti.init(arch=ti.cpu, cpu_max_num_threads=2)`` (and, in a
  second column, 1 thread: a Warp CPU launch runs on one thread, and ours splits each particle
  launch over ``DIFFWORLD_CPU_THREADS`` threads, default the usable cores); median of 3 runs after a
  compile warm-up;
* ``max |dx|``: largest difference of final positions, ours vs Taichi, in cells (a check that
  both run the same substep).

Memory table (each measurement in a fresh child process, water at ~100k particles): the peak
resident memory added by one differentiable rollout + backward, i.e. the high-water mark
``VmHWM`` (reset through ``/proc/self/clear_refs`` right before the rollout; where that is not
possible, the growth of ``ru_maxrss``) minus the resident memory before it; the model, initial
state and loaded kernels are excluded. Window 50 (checkpoints) vs window = T (one window: no
checkpoints, every substep's intermediates kept at once, ~33 MB per substep at 100k particles).
A 1000-substep unwindowed rollout does not fit in 24 GB, so it is extrapolated (labelled) from
the measured horizons; the windowed 1000-substep run is measured when its predicted time (5x the
measured 200-substep windowed run) is below ``--max-windowed-s`` (240 s), otherwise it is
extrapolated (labelled) from the windowed runs at 50, 100 and 200 substeps. Last, a
2,000-substep rollout of ~50k particles back-propagated with window 50 must stay under 6 GB.

Default runtime on a 2-core CPU: about 13 minutes (``--quick``: about 5, skips the long memory
runs). Usage::

    python benchmarks/mpm.py [--quick] [--device cpu|cuda] [--taichi-threads 2]

(``make bench`` runs this script with ``--quick``.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESOLUTION = 64
DT = 1.0e-4
GRAVITY = (0.0, 0.0, -9.8)
PPC = 8
MATERIALS = (("water", "water"), ("jelly", "fixed corotated"), ("plasticine", "von Mises"))
SIZES = (10_000, 100_000)
WINDOW = 50
MEM_PARTICLES = 100_000
MEM_MATERIAL = "water"
LONG_PARTICLES, LONG_SUBSTEPS, LONG_LIMIT_GB = 50_000, 2000, 6.0
GB = 1024.0 ** 3


def say(*a) -> None:
    print(*a, flush=True)


# --- our simulator ------------------------------------------------------------------------------

def make_block(material: str, n_particles: int, device: str = "cpu"):
    """Model and initial state of one cube holding about ``n_particles`` at 8 per cell."""
    import torch

    from diffworld.geometry.sdf import Box
    from diffworld.sims import mpm

    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=RESOLUTION)
    h = 0.5 * (n_particles * grid.dx ** 3 / PPC) ** (1.0 / 3.0)
    body = mpm.Body(Box((h, h, h), (0.5, 0.5, 0.1 + h)), mpm.material(material), ppc=PPC)
    return mpm.build_model(grid, [body], dt=DT, dtype=torch.float32, gravity=GRAVITY, device=device)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def ours_forward(model, state, n_substeps: int, repeat: int = 3) -> tuple[float, "object"]:
    """Median seconds of ``n_substeps`` no-grad substeps from ``state`` over ``repeat`` runs (after
    a 2-substep warm-up), and the final state."""
    import statistics

    import torch

    from diffworld.sims import mpm

    stepper = mpm.Stepper(model)
    params = [model.params[k].contiguous() for k in mpm.PARTICLE_PARAMS]
    times = []
    with torch.no_grad():
        s, tau = state, None
        for _ in range(2):
            s, tau, _ = stepper.substep(s, params, None, tau=tau)
        for _ in range(max(1, repeat)):
            _sync(model.device)
            t0 = time.perf_counter()
            s, tau = state, None
            for _ in range(n_substeps):
                # The elastic stress is carried from substep to substep, as rollout() does.
                s, tau, _ = stepper.substep(s, params, None, tau=tau)
            _sync(model.device)
            times.append(time.perf_counter() - t0)
    mpm.check_state(model, s, n_substeps)  # raises on NaN/Inf or particles leaving the domain
    return statistics.median(times), s


def ours_forward_backward(model, state, n_substeps: int, window: int,
                          keep_last: bool = True) -> tuple[float, float]:
    """(forward seconds, backward seconds) of a differentiable rollout and ``loss.backward()``;
    ``keep_last=False`` recomputes every window in backward, the last one too (long horizons)."""
    import torch

    from diffworld.sims import mpm

    def once(n: int) -> tuple[float, float]:
        x0 = state.x.clone().requires_grad_()
        _sync(model.device)
        t0 = time.perf_counter()
        out = mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), n, window=min(window, n), check=False,
                          keep_last_window=keep_last)
        loss = (out.final.x ** 2).sum()
        _sync(model.device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(model.device)
        t2 = time.perf_counter()
        mpm.check_state(model, out.final.detach(), n)
        if not bool(torch.isfinite(x0.grad).all()):
            raise mpm.SimulationError(f"non-finite gradient after a {n}-substep rollout")
        return t1 - t0, t2 - t1

    once(2)  # warm-up
    return once(n_substeps)


# --- memory: child processes ----------------------------------------------------------------------

def _status_kib() -> dict[str, int]:
    text = pathlib.Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def child_memory(spec: dict) -> dict:
    """One differentiable rollout + backward; its time and added peak memory (runs in a child)."""
    import torch

    from diffworld.sims import mpm

    device = spec["device"]
    # Warm-up on a tiny block: loads the kernels before anything is measured.
    tiny_model, tiny = make_block(spec["material"], 1000, device)
    x0 = tiny.x.clone().requires_grad_()
    (mpm.rollout(tiny_model, mpm.State(x0, tiny.v, tiny.C, tiny.F), 2, window=2).final.x ** 2).sum().backward()
    del tiny_model, tiny, x0

    model, state = make_block(spec["material"], spec["particles"], device)
    x0 = state.x.clone().requires_grad_()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_base = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        method, base_kib = "VmHWM", _status_kib()["VmRSS"]
    except OSError:
        method, base_kib = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), spec["substeps"], window=spec["window"])
    (out.final.x ** 2).sum().backward()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib()["VmHWM"] if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finite = torch.isfinite(x0.grad)
    absmax = float(x0.grad[finite].abs().max()) if bool(finite.any()) else float("nan")
    gpu = (torch.cuda.max_memory_allocated() - gpu_base) if torch.device(device).type == "cuda" else None
    return dict(particles=model.n_particles, seconds=seconds, peak_bytes=max(0, peak_kib - base_kib) * 1024.0,
                method=method, grad_finite=bool(finite.all()), grad_nonfinite=int((~finite).sum()),
                grad_absmax=absmax, gpu_peak_bytes=gpu)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(error=f"child exited with {proc.returncode}: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report -----------------------------------------------------------------------------------------

def fmt_rate(r: float | None) -> str:
    return "n/a" if r is None else f"{r / 1e3:,.0f}k"


def fmt_gb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / GB:.2f} GB"


def taichi_available() -> tuple[bool, str]:
    try:
        from mpm_taichi import import_taichi

        return True, ".".join(str(v) for v in import_taichi().__version__)
    except Exception as exc:  # ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}"


def throughput_table(args, have_taichi: bool) -> dict:
    import numpy as np

    results = {}
    say("\n## Throughput (particle-substeps / s; grid 64^3 on the unit cube, float32, dt 1e-4)\n")
    say(f"| material | N | substeps | ours fwd | ours fwd+bwd | bwd/fwd | bwd/fwd, every window recomputed "
        f"| Taichi fwd ({args.taichi_threads} thr) "
        f"| ours / Taichi | Taichi fwd (1 thr) | ours / Taichi 1 thr | max dx ours vs Taichi [cells] |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, law in MATERIALS:
        for n_target in args.sizes:
            model, state = make_block(name, n_target, args.device)
            n = model.n_particles
            T = max(20, round(1.0e6 / n_target))  # 100 substeps at 10k particles, 20 at 100k
            t_fwd, final = ours_forward(model, state, T)
            r_fwd = n * T / t_fwd
            tf, tb = ours_forward_backward(model, state, T, WINDOW)
            tf2, tb2 = ours_forward_backward(model, state, T, WINDOW, keep_last=False)
            r_fb = n * T / (tf + tb)
            r_ti = r_ti1 = None
            diff = "n/a"
            if have_taichi:
                from mpm_taichi import taichi_run

                pos = state.x.detach().cpu().numpy()
                s_ti, x_ti = taichi_run(name, pos, T, arch=args.taichi_arch, threads=args.taichi_threads)
                r_ti = n * T / s_ti
                if args.taichi_arch == "cpu" and args.taichi_threads != 1:
                    s_ti1, _ = taichi_run(name, pos, T, arch="cpu", threads=1)
                    r_ti1 = n * T / s_ti1
                elif args.taichi_arch == "cpu":
                    r_ti1 = r_ti
                d = np.abs(final.x.detach().cpu().numpy() - x_ti).max() * RESOLUTION
                diff = f"{d:.1e}"
            ratio = "n/a" if r_ti is None else f"{r_fwd / r_ti:.2f}"
            ratio1 = "n/a" if r_ti1 is None else f"{r_fwd / r_ti1:.2f}"
            say(f"| {name} ({law}) | {n:,} | {T} | {fmt_rate(r_fwd)} | {fmt_rate(r_fb)} | {tb / tf:.1f} | {tb2 / tf2:.1f} "
                f"| {fmt_rate(r_ti)} | {ratio} | {fmt_rate(r_ti1)} | {ratio1} | {diff} |")
            results[(name, n_target)] = dict(n=n, fwd=r_fwd, fwd_bwd=r_fb, taichi=r_ti)
    if not have_taichi:
        say("\nTaichi columns: n/a (taichi is not importable; `pip install taichi==1.7.4` for the baseline).")
    return results


def fit_line(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over t."""
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var
    return my - slope * mt, slope


def memory_table(args, rates: dict) -> None:
    cuda = args.device.startswith("cuda")
    say(f"\n## Memory of a differentiable rollout + backward ({MEM_MATERIAL}, ~{MEM_PARTICLES:,} particles, "
        f"device {args.device}; one child process each)\n")
    say("| substeps T | window | peak RSS increase |" + (" GPU peak |" if cuda else "")
        + " time fwd+bwd [s] | grad finite | note |")
    say("|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---|")

    def row(T, wlabel, peak, gpu, seconds, finite, note) -> None:
        say(f"| {T} | {wlabel} | {peak} |" + (f" {gpu} |" if cuda else "") + f" {seconds} | {finite} | {note} |")

    measured: dict[tuple[int, str], dict] = {}

    def measure(T: int, window: int, note: str) -> None:
        r = run_child(dict(material=MEM_MATERIAL, particles=MEM_PARTICLES, substeps=T, window=window,
                           device=args.device))
        wlabel = "T" if window == T else str(window)
        if "error" in r:
            row(T, wlabel, "failed", "", "", "", r["error"])
            return
        measured[(T, "full" if window == T else "win")] = r
        if T == WINDOW:
            measured[(T, "win")] = r
        row(T, wlabel, fmt_gb(r["peak_bytes"]), fmt_gb(r["gpu_peak_bytes"]), f"{r['seconds']:.1f}",
            r["grad_finite"], f"{note}; N = {r['particles']:,}; {r['method']}")

    for T in (50, 100) if args.quick else (50, 100, 200):
        if T > WINDOW:
            measure(T, WINDOW, f"checkpoints every {WINDOW}")
        measure(T, T, "window = T (no checkpoints)" if T > WINDOW else f"window = T = {WINDOW} (same as window {WINDOW})")

    # The windowed 1000-substep run, if it is predicted to finish in time: from the longest windowed
    # run measured (time is linear in T), else from the throughput table.
    done = sorted(T for (T, k) in measured if k == "win")
    if done:
        predicted = measured[(done[-1], "win")]["seconds"] * 1000 / done[-1]
    else:
        fb_rate = rates.get((MEM_MATERIAL, MEM_PARTICLES), {}).get("fwd_bwd")
        predicted = 1000 * MEM_PARTICLES / fb_rate if fb_rate else float("inf")
    long_windowed = not args.quick and predicted <= args.max_windowed_s
    if long_windowed:
        measure(1000, WINDOW, f"measured (predicted {predicted:.0f} s)")

    # Extrapolations to T = 1000 (linear in T: per-substep intermediates, or per-window checkpoints).
    def key_of(r: dict) -> float:
        return r["gpu_peak_bytes"] if cuda else r["peak_bytes"]

    full = sorted((T, key_of(r)) for (T, k), r in measured.items() if k == "full")
    if len(full) >= 2:
        a, b = fit_line([t for t, _ in full], [y for _, y in full])
        row(1000, "T", f"**{fmt_gb(a + 1000 * b)} (extrapolated)**", "", "", "",
            f"not run (does not fit in memory here); linear fit over T = {', '.join(str(t) for t, _ in full)}: "
            f"{fmt_gb(a)} + {b / 2**20:.1f} MiB per substep")
    win = sorted((T, key_of(r)) for (T, k), r in measured.items() if k == "win")
    if not long_windowed and len(win) >= 2:
        a, b = fit_line([t for t, _ in win], [y for _, y in win])
        why = "--quick" if args.quick else f"predicted {predicted:.0f} s > --max-windowed-s {args.max_windowed_s:.0f}"
        row(1000, WINDOW, f"**{fmt_gb(a + 1000 * b)} (extrapolated)**", "", "", "",
            f"not run ({why}); linear fit over T = {', '.join(str(t) for t, _ in win)}")

    if args.quick:
        say(f"\n(--quick: the {LONG_SUBSTEPS}-substep rollout of {LONG_PARTICLES:,} particles was skipped)")
        return
    say(f"\n## Long rollout: {LONG_SUBSTEPS} substeps, ~{LONG_PARTICLES:,} particles ({MEM_MATERIAL}), window "
        f"{WINDOW}, back-propagated (target: < {LONG_LIMIT_GB:.0f} GB)\n")
    r = run_child(dict(material=MEM_MATERIAL, particles=LONG_PARTICLES, substeps=LONG_SUBSTEPS, window=WINDOW,
                       device=args.device))
    if "error" in r:
        say(f"failed: {r['error']}")
        return
    verdict = "PASS" if key_of(r) < LONG_LIMIT_GB * GB else "FAIL"
    say("| N | substeps | window | peak RSS increase | GPU peak | time fwd+bwd [s] | grad finite | max abs grad "
        "| < 6 GB |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    say(f"| {r['particles']:,} | {LONG_SUBSTEPS} | {WINDOW} | {fmt_gb(r['peak_bytes'])} | "
        f"{fmt_gb(r['gpu_peak_bytes']) if cuda else 'n/a'} | {r['seconds']:.1f} | "
        f"{r['grad_finite']} ({r['grad_nonfinite']} non-finite) | {r['grad_absmax']:.3g} | {verdict} |")
    if not r["grad_finite"]:
        say("\nWARNING: the gradient of this rollout is not finite (see above).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ours; Taichi follows --taichi-arch)")
    ap.add_argument("--quick", action="store_true", help="skip the long memory runs (T >= 200, 2000-substep run)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="particle counts (approximate)")
    ap.add_argument("--taichi-threads", type=int, default=2, help="Taichi CPU threads (cpu_max_num_threads)")
    ap.add_argument("--taichi-arch", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--max-windowed-s", type=float, default=240.0,
                    help="run the 1000-substep windowed rollout only if predicted to finish within this")
    ap.add_argument("--no-memory", action="store_true", help="throughput table only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child_memory(json.loads(args.child))), flush=True)
        return

    from diffworld.engine.runtime import init_warp
    from diffworld.sims.mpm.solver import cpu_workers

    wp = init_warp()
    have_taichi, ti_version = taichi_available()
    t_start = time.perf_counter()
    say("# diffworld MPM benchmark")
    say(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), warp {wp.config.version} "
        f"(CPU: {cpu_workers()} threads per launch), taichi {ti_version if have_taichi else 'not available'} "
        f"(arch {args.taichi_arch}, {args.taichi_threads} threads); device {args.device}")
    rates = throughput_table(args, have_taichi)
    say(f"\n(throughput table: {time.perf_counter() - t_start:.0f} s)")
    if not args.no_memory:
        memory_table(args, rates)
    say(f"\ntotal wall time: {time.perf_counter() - t_start:.0f} s")
    say("\n(`make bench` runs this script with --quick.)")


if __name__ == "__main__":
    main()
