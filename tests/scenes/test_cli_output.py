"""What the command line prints: help without value types beside flags, no CUDA warning on a CPU
machine, one kernel cache, progress for the steps after the fit, and a fresh run into a used
folder refused unless --overwrite, which replaces the earlier run's log, plot and checkpoints."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffworld.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
GENUS2 = ROOT / "scenes" / "reconstruct_genus2.yaml"
runner = CliRunner()


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffworld.app.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)


def _small_genus2(tmp: Path, resolutions: str, name: str = "s.yaml") -> Path:
    text = GENUS2.read_text()
    for old, new in {"resolutions: [16, 32, 64]": f"resolutions: {resolutions}", "n_points: 50000": "n_points: 3000",
                     "n_points: 200000": "n_points: 3000", "samples: 10000": "samples: 1000",
                     "render: true": "render: false"}.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", ["optimize", "run"])
def test_help_shows_flags_as_flags(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output, result.output
    assert "--progress / --no-progress" in result.output
    if command == "optimize":
        assert "--resume " in result.output
        iterations = result.output.split("--iterations", 1)[1].split("--out <path>", 1)[0]
        assert "per stage" in " ".join(iterations.split()), iterations


def test_validate_prints_no_cuda_warning():
    r = _cli("validate", str(GENUS2))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "CUDA" not in r.stdout + r.stderr, r.stderr


def test_info_reports_the_default_kernel_cache(tmp_path):
    if sys.platform != "linux":
        pytest.skip("the XDG cache folder is Linux's convention")
    env = {k: v for k, v in os.environ.items() if k not in ("WARP_CACHE_PATH", "DIFFWORLD_WARP_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    r = _cli("info", env=env)
    assert r.returncode == 0, r.stderr
    line, = [ln for ln in r.stdout.splitlines() if ln.startswith("warp kernel cache:")]
    assert line.split(": ", 1)[1].startswith(str(tmp_path / "diffworld" / "warp")), line
    assert "Warp CUDA warning" not in r.stderr


def test_run_says_when_it_computes_metrics(tmp_path):
    r = _cli("run", str(_small_genus2(tmp_path, "[12]")), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "computing metrics..." in r.stderr and "computing metrics: done in" in r.stderr, r.stderr


def test_a_fresh_run_into_a_used_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    first = _small_genus2(tmp_path, "[8, 12]", "first.yaml")
    result = runner.invoke(app, ["optimize", str(first), "-n", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["grid12.pt", "grid8.pt"]
    second = _small_genus2(tmp_path, "[10]", "second.yaml")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["optimize", str(second), "-n", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "holds an earlier run (log.csv, loss.png, 2 checkpoint(s))" in \
        result.output and "--overwrite" in result.output, result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    result = runner.invoke(app, ["optimize", str(second), "-n", "3", "--out", str(out), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "choose one" in result.output
    result = runner.invoke(app, ["optimize", str(second), "-n", "3", "--out", str(out), "--no-progress",
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "replacing the earlier run" in result.output
    # Only this run's rows: the loss plot is built from them, and --resume finds only its stages.
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [(r["stage"], r["iteration"]) for r in rows] == [("grid10", str(i)) for i in range(3)]
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["grid10.pt"]
