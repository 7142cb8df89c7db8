"""Parameter sweeps: every point an ordinary run of one scene in its own folder, run by local worker
processes (:mod:`concurrent.futures`) or as Ray tasks, gathered into one table and plot.

A sweep over ``--set task.data.material.name=jelly,sand --set optimizer.lr=0.01,0.1`` has the four
points of the product; point ``k`` runs the scene with those overrides into
``OUT/NNN-key=value-...``, exactly as ``diffworld optimize`` would (the same seed, hence the same
numbers whichever executor runs it). ``results.csv`` holds one row per point (its values, status,
the run's scalar metrics, the error of a failed one) and ``results.png`` plots the main metric.
A failed point is reported and the others are kept; ``--resume`` reruns only the points without
a finished run.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["Point", "parse_sets", "plan", "run_point", "run_sweep"]

# the metric plotted (the first present): the task's final objective
MAIN_METRICS = ("final_loss", "final_rollout_mse", "final_chamfer", "chamfer")


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its index, its overrides and its run folder."""

    index: int
    values: dict[str, Any]
    folder: str


def parse_sets(sets: Sequence[str]) -> dict[str, list[Any]]:
    """``key=v1,v2,...`` strings -> {key: [values]}; each value is read as a YAML scalar (numbers,
    booleans, strings).

    Raises:
        ValueError: A malformed entry, an empty value list, a key given twice.
    """
    import yaml

    out: dict[str, list[Any]] = {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set {s!r}: expected key=value1,value2,...")
        key, _, raw = s.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ValueError(f"--set {s!r}: expected a dotted key such as optimizer.lr, got {key!r}")
        if key in out:
            raise ValueError(f"--set: key {key!r} given twice")
        values = []
        for v in raw.split(","):
            v = v.strip()
            if not v:
                raise ValueError(f"--set {s!r}: an empty value")
            try:
                value = yaml.safe_load(v)
            except yaml.YAMLError:
                value = v
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            values.append(value)
        out[key] = values
    if not out:
        raise ValueError("expected at least one --set key=value1,value2,...")
    return out


def _slug(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        name = k.rsplit(".", 1)[-1]
        parts.append(f"{name}={v}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))[:120]


def plan(sets: dict[str, list[Any]]) -> list[Point]:
    """The points of the product of ``sets`` (in the order given), each with its folder name."""
    keys = list(sets)
    return [Point(i, dict(zip(keys, combo)), f"{i:03d}-{_slug(dict(zip(keys, combo)))}")
            for i, combo in enumerate(itertools.product(*(sets[k] for k in keys)))]


def run_point(scene_path: str, values: dict[str, Any], out_dir: str, iterations: Optional[int] = None,
              device: Optional[str] = None) -> dict[str, Any]:
    """Run one point (in whatever process calls it): load the scene with the overrides, run it into
    ``out_dir`` as ``diffworld optimize`` does, and return ``{"status": "ok", "metrics": ...}`` or
    ``{"status": "failed", "error": ...}`` (also written to ``error.txt``). Never raises."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one core per point: the workers share the machine. Torch and the MPM solver's own threads
    # (DIFFWORLD_CPU_THREADS) are set so, and restored afterwards (a test may run a point in its
    # own process)
    threads, threads_env = torch.get_num_threads(), os.environ.get("DIFFWORLD_CPU_THREADS")
    torch.set_num_threads(1)
    os.environ["DIFFWORLD_CPU_THREADS"] = "1"
    try:
        import yaml

        from diffworld.app.scenes import load_scene
        from diffworld.engine.files import atomic_write
        from diffworld.engine.run import run_scene
        from diffworld.engine.runtime import get_runtime

        overrides = dict(values)
        if iterations is not None:
            overrides["optimizer.iterations"] = iterations
        if device is not None:
            overrides["runtime.device"] = device
        scene = load_scene(scene_path, overrides)
        runtime = get_runtime(scene.runtime.device, scene.runtime.dtype)
        text = yaml.safe_dump(scene.model_dump(mode="json"), sort_keys=False)
        atomic_write(out / "scene.yaml", lambda f: f.write(text.encode()))
        (out / "error.txt").unlink(missing_ok=True)
        metrics = run_scene(scene, runtime, out, progress=False, optimize=True)
        return {"status": "ok", "metrics": json.loads(json.dumps(metrics, default=str))}
    except Exception as exc:  # noqa: BLE001 - a point's failure is data for the table, not a crash
        msg = f"{type(exc).__name__}: {exc}"
        (out / "error.txt").write_text(msg + "\n\n" + traceback.format_exc())
        return {"status": "failed", "error": msg.splitlines()[0][:500]}
    finally:
        torch.set_num_threads(threads)
        if threads_env is None:
            os.environ.pop("DIFFWORLD_CPU_THREADS", None)
        else:
            os.environ["DIFFWORLD_CPU_THREADS"] = threads_env


def _finished(folder: Path) -> Optional[dict]:
    """The metrics of a finished run in ``folder`` (None if it did not finish)."""
    f = folder / "metrics.json"
    if f.is_file() and not (folder / "error.txt").exists():
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None


def _local_executor(workers: int) -> Callable:
    """Run calls in ``workers`` fresh processes (spawned: no fork of Warp or torch state)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    def run(calls: list[tuple], on_done: Callable) -> None:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_point, *args): i for i, args in calls}
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                    result = {"status": "failed", "error": f"worker died: {type(exc).__name__}: {exc}"}
                on_done(futures[fut], result)

    return run


def _ray_executor(address: str, workers: int) -> Callable:
    """Run calls as Ray tasks on the cluster at ``address`` (``local``: start a local instance
    with ``workers`` CPUs)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: Ray is not installed; install the extra: pip install 'diffworld[ray]'") from None

    def run(calls: list[tuple], on_done: Callable) -> None:
        started = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            started = True
        try:
            task = ray.remote(num_cpus=1)(run_point)
            refs = {task.remote(*args): i for i, args in calls}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a task whose worker died
                        result = {"status": "failed", "error": f"Ray task failed: {type(exc).__name__}: {exc}"}
                    on_done(refs[ref], result)
        finally:
            if started:
                ray.shutdown()

    return run


def _scalars(metrics: dict) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_table(out_dir: Path, points: list[Point], results: dict[int, dict]) -> Path:
    """``results.csv``: one row per point (index, folder, the swept values, status, the scalar
    metrics, the error)."""
    from diffworld.engine.files import atomic_path

    keys = list(points[0].values)
    metric_names: list[str] = []
    for r in results.values():
        for k in _scalars(r.get("metrics", {})):
            if k not in metric_names:
                metric_names.append(k)
    path = out_dir / "results.csv"
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["point", "folder", *keys, "status", *metric_names, "error"])
            for p in points:
                r = results.get(p.index, {"status": "not run"})
                m = _scalars(r.get("metrics", {}))
                w.writerow([p.index, p.folder, *[p.values[k] for k in keys], r["status"],
                            *[m.get(k, "") for k in metric_names], r.get("error", "")])
    return path


def write_plot(out_dir: Path, points: list[Point], results: dict[int, dict]) -> Optional[Path]:
    """``results.png``: the main metric against the first key's values, one line per combination
    of the other keys (None when no point finished)."""
    ok = [(p, results[p.index]["metrics"]) for p in points if results.get(p.index, {}).get("status") == "ok"]
    if not ok:
        return None
    name = next((m for m in MAIN_METRICS if any(m in r for _, r in ok)), None)
    if name is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.engine.files import atomic_path

    keys = list(points[0].values)
    first, rest = keys[0], keys[1:]
    lines: dict[tuple, list] = {}
    for p, m in ok:
        if name in m:
            lines.setdefault(tuple(p.values[k] for k in rest), []).append((p.values[first], m[name]))
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for pts in lines.values() for x, _ in pts)
    labels = sorted({str(x) for pts in lines.values() for x, _ in pts}) if not numeric else None
    for other, pts in lines.items():
        pts = sorted(pts, key=lambda t: t[0] if numeric else str(t[0]))
        xs = [x if numeric else labels.index(str(x)) for x, _ in pts]
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(rest, other)) or None
        ax.plot(xs, [y for _, y in pts], "o-", label=label)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(first)
    ax.set_ylabel(name)
    if all(y > 0 for pts in lines.values() for _, y in pts):
        ax.set_yscale("log")
    if rest:
        ax.legend(fontsize=8)
    path = out_dir / "results.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def run_sweep(scene_path: Path, sets: dict[str, list[Any]], out_dir: Path, *, workers: int = 2,
              ray_address: Optional[str] = None, resume: bool = False, iterations: Optional[int] = None,
              device: Optional[str] = None, echo: Callable[[str], None] = print) -> dict[int, dict]:
    """Run every point of ``sets`` (see the module docstring) and write the table and plot.

    Returns:
        {point index: {"status": "ok" | "failed", "metrics" | "error": ...}}.
    """
    from diffworld.app.scenes import load_scene

    points = plan(sets)
    for p in points:  # every point must be a valid scene before anything runs
        overrides = dict(p.values)
        if iterations is not None:
            overrides["optimizer.iterations"] = iterations
        load_scene(scene_path, overrides)  # raises SceneError naming the key
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    calls = []
    for p in points:
        folder = out_dir / p.folder
        done = _finished(folder) if resume else None
        if done is not None:
            results[p.index] = {"status": "ok", "metrics": done}
            echo(f"point {p.index} ({p.folder}): kept (finished earlier)")
        else:
            calls.append((p.index, (str(scene_path), p.values, str(folder), iterations, device)))
    executor = _ray_executor(ray_address, workers) if ray_address else _local_executor(workers)
    echo(f"sweep: {len(points)} points, {len(calls)} to run on "
         f"{'Ray at ' + ray_address if ray_address else f'{workers} local worker(s)'}")

    def on_done(i: int, result: dict) -> None:
        results[i] = result
        p = points[i]
        if result["status"] == "ok":
            main = next((f"{m} {result['metrics'][m]:.4g}" for m in MAIN_METRICS if m in result["metrics"]), "done")
            echo(f"point {i} ({p.folder}): {main}")
        else:
            echo(f"point {i} ({p.folder}): FAILED: {result['error']}")
        write_table(out_dir, points, results)

    if calls:
        executor(calls, on_done)
    write_table(out_dir, points, results)
    write_plot(out_dir, points, results)
    return results
