"""The ``diffworld`` command line.

Exit codes: 0 success, 1 a run failed (e.g. non-finite values; the last good checkpoint is kept),
2 bad input (scene file, arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

# Plain (click-style) help: typer's rich help panels print a "<bool>" type beside every flag,
# as if --resume took a value.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="diffworld: differentiable geometry and simulation. Scenes are YAML files.")

__all__ = ["app", "main"]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(scene_path: Path, overrides: dict):
    from diffworld.app.scenes import SceneError, load_scene

    try:
        return load_scene(scene_path, overrides)
    except SceneError as exc:
        _fail(str(exc))


def _execute(scene_path: Path, out: Optional[Path], device: Optional[str], iterations: Optional[int],
             resume: bool, optimize: bool, progress: bool, overwrite: bool = False) -> None:
    import yaml

    from diffworld.engine.runtime import get_runtime
    from diffworld.engine.run import run_scene

    overrides = {}
    if iterations is not None:
        overrides["optimizer.iterations"] = iterations
    if device is not None:
        overrides["runtime.device"] = device
    scene = _load(scene_path, overrides)
    try:
        runtime = get_runtime(scene.runtime.device, scene.runtime.dtype)
    except ValueError as exc:
        _fail(f"{scene_path}: runtime.{exc}")
    out_dir = out or Path("runs") / scene.name
    text = yaml.safe_dump(scene.model_dump(mode="json"), sort_keys=False)
    _prepare_out(out_dir, scene_path, text, resume, overwrite if optimize else None)
    from diffworld.engine.driver import NonFiniteError
    from diffworld.engine.files import atomic_write
    from diffworld.sims.cable.rollout import SimulationError as CableSimulationError
    from diffworld.sims.fem.rollout import SimulationError as FemSimulationError
    from diffworld.sims.mpm.rollout import SimulationError

    atomic_write(out_dir / "scene.yaml", lambda f: f.write(text.encode()))
    try:
        metrics = run_scene(scene, runtime, out_dir, resume=resume, progress=progress, optimize=optimize)
    except (NonFiniteError, SimulationError, FemSimulationError, CableSimulationError) as exc:
        _fail(str(exc), code=1)
    except ValueError as exc:  # a scene that validates but cannot be built (e.g. dt above the limit)
        _fail(f"{scene_path}: {exc}")
    except KeyboardInterrupt:
        _interrupted(scene_path, out_dir, optimize)
    except OSError as exc:  # a full disk, a folder removed under the run...
        _fail(f"cannot write the outputs in {out_dir} ({exc.strerror or exc}); the checkpoints written so far "
              f"are kept", code=1)
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"outputs in {out_dir}")


# Settings that may change between a run and its resumption (they do not change the numbers of
# the iterations already run).
_RESUMABLE = {("optimizer", "iterations"), ("runtime", "device")}


def _scene_differences(old: dict, new: dict, prefix: tuple = ()) -> list[str]:
    """Key paths where two scene dumps differ (at most a few), ignoring :data:`_RESUMABLE`."""
    out: list[str] = []
    for key in list(old) + [k for k in new if k not in old]:
        path = (*prefix, key)
        if path in _RESUMABLE:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_scene_differences(a, b, path))
        elif a != b:
            out.append(".".join(map(str, path)))
    return out


def _prepare_out(out_dir: Path, scene_path: Path, text: str, resume: bool, overwrite: bool | None) -> None:
    """Create the output folder; with --resume, check it holds a run of this scene and say what
    resuming will do. A fresh optimization (``overwrite`` not None) into a folder that holds an
    earlier run is refused unless ``overwrite``: nothing is deleted that the user did not ask to."""
    import yaml

    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"--out: {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--out: cannot create the output folder {out_dir} ({exc.strerror or exc})")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        _fail(f"--out: the output folder {out_dir} is not writable")
    if not resume:
        if overwrite is not None:
            _check_replace(out_dir, overwrite)
        return
    saved = out_dir / "scene.yaml"
    checkpoints = sorted((out_dir / "checkpoints").glob("*.pt")) if (out_dir / "checkpoints").is_dir() else []
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            old = None
        diff = _scene_differences(old, yaml.safe_load(text)) if isinstance(old, dict) else ["(unreadable scene.yaml)"]
        if diff:
            shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
            _fail(f"--resume: {out_dir} holds a run of another scene (it differs from {scene_path} at {shown}); "
                  f"resume it with the scene it was started with, or choose another --out")
    if not checkpoints:
        typer.echo(f"note: --resume: no checkpoints in {out_dir / 'checkpoints'}; starting from the beginning",
                   err=True)
    else:
        typer.echo(f"resuming from {', '.join(p.name for p in checkpoints)} in {out_dir / 'checkpoints'}", err=True)


def _check_replace(out_dir: Path, overwrite: bool) -> None:
    """A fresh optimization replaces an earlier run's log, loss plot and checkpoints in the folder
    (run_scene removes them, so the plot and a later --resume see only this run): only with
    --overwrite; without it, say what is there and the choices (exit 2)."""
    from diffworld.engine.run import previous_run_files

    files = previous_run_files(out_dir)
    if not files:
        return
    n_ckpt = sum(f.suffix == ".pt" for f in files)
    what = ", ".join(sorted({f.name for f in files if f.suffix != ".pt"}) + ([f"{n_ckpt} checkpoint(s)"] if n_ckpt else []))
    if not overwrite:
        _fail(f"--out: {out_dir} holds an earlier run ({what}); --resume continues it, --overwrite replaces it, "
              f"or choose another --out")
    typer.echo(f"note: --overwrite: replacing the earlier run in {out_dir} ({what})", err=True)


def _interrupted(scene_path: Path, out_dir: Path, optimize: bool) -> None:
    """Ctrl-C: say where the last checkpoint is and how to continue; exit 130 (like a shell)."""
    ckpts = sorted((out_dir / "checkpoints").glob("*.pt"), key=lambda p: p.stat().st_mtime) \
        if (out_dir / "checkpoints").is_dir() else []
    if optimize and ckpts:
        typer.echo(f"\ninterrupted: the last checkpoint is {ckpts[-1]}; continue with\n"
                   f"  diffworld optimize {scene_path} --out {out_dir} --resume", err=True)
    else:
        typer.echo("\ninterrupted: no checkpoint was written yet", err=True)
    raise typer.Exit(130)


@app.command()
def optimize(scene: Path = typer.Argument(..., help="Scene YAML file."),
             iterations: Optional[int] = typer.Option(
                 None, "--iterations", "-n",
                 help="Iterations per stage (overrides optimizer.iterations; a scene with several stages, "
                      "e.g. grid resolutions 16, 32, 64, runs this many in each)."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<name>)."),
             device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda:N."),
             resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoints in --out."),
             overwrite: bool = typer.Option(False, "--overwrite",
                                            help="Replace an earlier run's log, loss plot and checkpoints in --out."),
             progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")) -> None:
    """Optimize a scene: progress, log, loss curve, metrics, renders and checkpoints in --out."""
    if iterations is not None and iterations < 0:
        _fail(f"--iterations: expected a number >= 0, got {iterations}")
    if resume and overwrite:
        _fail("--resume and --overwrite: choose one (continue the run in --out, or replace it)")
    _execute(scene, out, device, iterations, resume, True, progress, overwrite)


@app.command()
def run(scene: Path = typer.Argument(..., help="Scene YAML file."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda:N."),
        progress: bool = typer.Option(True, "--progress/--no-progress",
                                      help="Say what is running (metrics, renders).")) -> None:
    """Build the scene and evaluate it as written (no optimization): metrics and renders."""
    _execute(scene, out, device, None, False, False, progress)


@app.command()
def sweep(scene: Path = typer.Argument(..., help="Scene YAML file."),
          sets: list[str] = typer.Option(..., "--set", help="key=value1,value2,... (repeat for a product of keys), "
                                                            "e.g. --set optimizer.lr=0.01,0.1"),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep folder (default runs/<name>-sweep)."),
          workers: int = typer.Option(2, "--workers", "-j", help="Points run at once (local processes or "
                                                                 "CPUs of a local Ray)."),
          ray: Optional[str] = typer.Option(None, "--ray", help="Run the points as Ray tasks: a cluster address "
                                                                "(ray://..., or auto), or 'local' to start one; "
                                                                "needs the 'ray' extra."),
          iterations: Optional[int] = typer.Option(None, "--iterations", "-n", help="Overrides optimizer.iterations "
                                                                                    "at every point."),
          device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda:N."),
          resume: bool = typer.Option(False, "--resume", help="Keep finished points, rerun failed or missing ones."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier sweep in --out.")) -> None:
    """Run a scene at every point of a parameter grid (one run folder each) and gather results.csv
    and results.png; exit 1 if a point failed (rerun those with --resume)."""
    import shutil

    from diffworld.app.scenes import SceneError
    from diffworld.app.sweep import parse_sets, run_sweep

    if workers < 1:
        _fail(f"--workers: expected a number >= 1, got {workers}")
    if iterations is not None and iterations < 0:
        _fail(f"--iterations: expected a number >= 0, got {iterations}")
    if resume and overwrite:
        _fail("--resume and --overwrite: choose one")
    try:
        grid = parse_sets(sets)
    except ValueError as exc:
        _fail(str(exc))
    base = _load(scene, {})
    out_dir = out or Path("runs") / f"{base.name}-sweep"
    if (out_dir / "results.csv").exists() and not (resume or overwrite):
        _fail(f"--out: {out_dir} holds an earlier sweep (results.csv); add --resume to rerun its failed points or "
              f"--overwrite to replace it")
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        results = run_sweep(scene, grid, out_dir, workers=workers, ray_address=ray, resume=resume,
                            iterations=iterations, device=device, echo=typer.echo)
    except SceneError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(str(exc))
    failed = [i for i, r in sorted(results.items()) if r["status"] != "ok"]
    typer.echo(f"results in {out_dir / 'results.csv'}")
    if failed:
        typer.echo(f"{len(failed)} point(s) failed: {failed}; rerun them with --resume", err=True)
        raise typer.Exit(1)


@app.command()
def validate(scene: Path = typer.Argument(..., help="Scene YAML file.")) -> None:
    """Check a scene file; print the errors (file, key path, expected) or 'ok'."""
    s = _load(scene, {})
    typer.echo(f"{scene}: ok (task: {s.task.type})")


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout.")) -> None:
    """Print the JSON Schema of the scene format."""
    from diffworld.app.scenes import scene_json_schema

    text = json.dumps(scene_json_schema(), indent=2)
    if out:
        from diffworld.engine.files import atomic_write

        try:
            atomic_write(out, lambda f: f.write((text + "\n").encode()))
        except OSError as exc:
            _fail(f"--out: cannot write {out} ({exc.strerror or exc})")
    else:
        typer.echo(text)


@app.command()
def render(mesh: Path = typer.Argument(..., help="Mesh file (obj/ply/stl/off/glb)."),
           out: Path = typer.Option(Path("render.png"), "--out", "-o", help="PNG, or GIF/MP4 for a turntable."),
           target: Optional[Path] = typer.Option(None, "--target", help="A second mesh drawn beside it.")) -> None:
    """Render a mesh off-screen (beside a target, or as a turntable for .gif/.mp4)."""
    from diffworld import viz as rd
    from diffworld.geometry import io

    try:
        m = io.load_mesh(mesh)
        t = io.load_mesh(target) if target is not None and out.suffix not in (".gif", ".mp4") else None
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    try:
        if out.suffix in (".gif", ".mp4"):
            path = rd.render_turntable(out, m.vertices, m.faces)
        elif t is not None:
            path = rd.render_side_by_side(out, (m.vertices, m.faces), (t.vertices, t.faces))
        else:
            path = rd.render_mesh(out, m.vertices, m.faces)
    except ValueError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out: cannot write {out} ({exc.strerror or exc})")
    typer.echo(f"wrote {path}")


@app.command()
def info() -> None:
    """Print versions, devices and the kernel cache."""
    import platform

    import torch

    from diffworld import __version__
    from diffworld.engine.runtime import cuda_unavailable_reason, init_warp, resolve_device

    wp = init_warp()
    typer.echo(f"diffworld {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
               f"warp {wp.__version__}")
    typer.echo(f"devices: {[str(d) for d in wp.get_devices()]}  auto -> {resolve_device('auto')}")
    if cuda_unavailable_reason():
        typer.echo("cuda (warp): not available, the NVIDIA CUDA driver could not be found or loaded")
    typer.echo(f"warp kernel cache: {wp.config.kernel_cache_dir}")
    typer.echo(f"torch threads: {torch.get_num_threads()}  cuda (torch): {torch.cuda.is_available()}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
