"""``diffworld sweep``: the grid of points, a failed point reported while the others are kept,
``--resume`` rerunning only what did not finish, and the same numbers from local worker processes
and from a local Ray instance."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffworld.app.cli import app
from diffworld.app.sweep import parse_sets, plan, run_sweep
from diffworld.sims.constitutive.neural import InvariantElasticity, InvariantPlasticity, NeuralLaw, save_law

ROOT = Path(__file__).resolve().parents[2]
SCENE = ROOT / "scenes" / "nclaw_jelly.yaml"
runner = CliRunner()


def _rows(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "results.csv")))


def test_sets_and_points():
    sets = parse_sets(["optimizer.lr=0.01,1e-3", "task.law.plastic=invariant,none", "task.data.steps=20"])
    assert sets == {"optimizer.lr": [0.01, 0.001], "task.law.plastic": ["invariant", "none"], "task.data.steps": [20]}
    pts = plan(sets)
    assert len(pts) == 4 and pts[3].values == {"optimizer.lr": 0.001, "task.law.plastic": "none", "task.data.steps": 20}
    assert pts[3].folder == "003-lr=0.001-plastic=none-steps=20"
    for bad, want in ((["lr"], "expected key=value1"), (["a b=1"], "dotted key"), (["x=1,,2"], "empty value"),
                      (["x=1", "x=2"], "given twice"), ([], "at least one")):
        with pytest.raises(ValueError, match=want):
            parse_sets(bad)


def test_a_failed_point_is_kept_apart_and_resume_reruns_only_it(tmp_path):
    law = tmp_path / "start.pt"
    args = ["sweep", str(SCENE), "--set", f"task.law.init={law},null", "--set", "task.data.steps=20",
            "--set", "task.law.width=8", "-n", "1", "--out", str(tmp_path / "sw")]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    rows = _rows(tmp_path / "sw")
    assert [row["status"] for row in rows] == ["failed", "ok"]
    assert "start.pt: no such file" in rows[0]["error"]
    assert (tmp_path / "sw" / rows[0]["folder"] / "error.txt").is_file()
    kept = (tmp_path / "sw" / rows[1]["folder"] / "metrics.json").stat().st_mtime_ns
    # a second sweep into the same folder is refused without --resume / --overwrite
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "holds an earlier sweep" in r.output
    torch.manual_seed(0)
    save_law(NeuralLaw(InvariantElasticity(width=8, output_scale=1e5), InvariantPlasticity(width=8)), law)
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "point 1 (001-init=None-steps=20-width=8): kept" in r.output
    rows = _rows(tmp_path / "sw")
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert (tmp_path / "sw" / rows[1]["folder"] / "metrics.json").stat().st_mtime_ns == kept
    assert (tmp_path / "sw" / "results.png").is_file()


def test_bad_points_are_refused_before_anything_runs(tmp_path):
    r = runner.invoke(app, ["sweep", str(SCENE), "--set", "task.law.width=8,-3", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 2 and "task.law.width" in r.output
    assert not (tmp_path / "sw" / "results.csv").exists()


def test_local_workers_and_ray_give_the_same_numbers(tmp_path):
    pytest.importorskip("ray")
    sets = {"task.law.width": [8, 16], "task.data.steps": [20]}
    local = run_sweep(SCENE, sets, tmp_path / "local", workers=2, iterations=2, echo=lambda s: None)
    ray = run_sweep(SCENE, sets, tmp_path / "ray", workers=2, iterations=2, ray_address="local", echo=lambda s: None)
    for i in (0, 1):
        assert local[i]["status"] == ray[i]["status"] == "ok"
        for key in ("initial_rollout_mse", "final_rollout_mse", "parameters"):
            assert local[i]["metrics"][key] == ray[i]["metrics"][key], key
    assert local[0]["metrics"]["final_rollout_mse"] != local[1]["metrics"]["final_rollout_mse"]
