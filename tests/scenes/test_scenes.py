"""Every shipped scene validates, runs at a reduced size, and its loss decreases; scene errors."""

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffworld.app.cli import app
from diffworld.app.scenes import SceneError, load_scene, scene_json_schema

ALL_SCENES = sorted((Path(__file__).resolve().parents[2] / "scenes").glob("*.yaml"))
# Reconstruction scenes on marching cubes here; simulation scenes (test_mpm_scenes.py) and the
# FlexiCubes / G-Shell scenes (test_isosurface_scenes.py) have their own reduced runs.
SCENES = [p for p in ALL_SCENES if not p.stem.startswith(("mpm_", "tactile_", "nclaw_"))
          and load_scene(p).task.representation.type in ("grid", "neural")
          and load_scene(p).task.target.type != "images"]  # (image targets: tests/tasks/test_reconstruction_images.py)
runner = CliRunner()


def reduced(scene_path: Path) -> dict:
    over = {"optimizer.iterations": 12, "task.samples": 3000, "task.evaluation.n_points": 20000,
            "output.render": False}
    task = load_scene(scene_path).task
    if task.representation.type == "grid":
        over["task.representation.resolutions"] = [12, 20]
    else:
        over["task.representation.resolution"] = 20
        over["optimizer.iterations"] = 25
    if task.target.type in ("shape", "mesh"):
        over["task.target.n_points"] = 10000
    return over


@pytest.mark.parametrize("path", ALL_SCENES, ids=[p.stem for p in ALL_SCENES])
def test_scene_validates(path):
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_scene_runs_reduced_and_loss_decreases(path, tmp_path):
    from diffworld.engine.runtime import get_runtime
    from diffworld.engine.run import run_scene

    scene = load_scene(path, reduced(path))
    metrics = run_scene(scene, get_runtime("cpu", scene.runtime.dtype), tmp_path,
                                             progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    last_stage = rows[-1]["stage"]
    losses = [float(r["loss"]) for r in rows if r["stage"] == last_stage]
    assert losses[-1] < losses[0]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "loss.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["result"]["faces"] > 0
    assert metrics["result"]["watertight"]


def test_cli_optimize_writes_outputs_and_resumes(tmp_path):
    path = Path(__file__).resolve().parents[2] / "scenes" / "reconstruct_genus2.yaml"
    scene_file = tmp_path / "s.yaml"
    text = path.read_text().replace("resolutions: [16, 32, 64]", "resolutions: [8, 12]").replace(
        "n_points: 200000", "n_points: 5000")
    scene_file.write_text(text)
    out = tmp_path / "out"
    result = runner.invoke(app, ["optimize", str(scene_file), "-n", "4", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("scene.yaml", "log.csv", "loss.png", "metrics.json", "result.ply", "render.png",
                 "checkpoints/grid8.pt", "checkpoints/grid12.pt"):
        assert (out / name).is_file(), name
    first = json.loads((out / "metrics.json").read_text())["result"]
    # Resuming finished stages reproduces the result without optimizing again.
    result = runner.invoke(app, ["optimize", str(scene_file), "-n", "4", "--out", str(out), "--no-progress",
                                 "--resume"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "metrics.json").read_text())["result"]
    assert again["chamfer_l1"] == pytest.approx(first["chamfer_l1"])


BASE = """version: 1
task:
  type: reconstruction
  target: {type: shape, shape: sphere}
  representation: {type: grid, resolutions: [8]}
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE + "bogus: 1\n", "bogus: unknown key"),
        (BASE + "optimizer: {lr: fast}\n", "optimizer.lr"),
        (BASE + "optimizer: {iterations: -3}\n", "optimizer.iterations"),
        (BASE.replace("resolutions: [8]", "resolutions: [8, 4]"), "task.representation.resolutions"),
        (BASE.replace("shape: sphere", "shape: teapot"), "task.target.shape"),
        (BASE.replace("type: grid", "type: voxels"), "task.representation"),
        (BASE.replace("version: 1", "version: 7"), "version"),
        (BASE.replace("target: {type: shape, shape: sphere}", "target: {type: mesh, path: missing.obj}"),
         "task.target.path"),
        (BASE.replace("type: grid, resolutions: [8]", "type: flexicubes, resolutions: [8], weights_lr: 0"),
         "task.representation.weights_lr: Input should be greater than 0 (given: 0)"),
        (BASE + "  weights: {dev: 0.5}\n", "weights.dev: expected 0 with representation.type 'grid'"),
        (BASE.replace("type: grid", "type: flexicubes") + "  weights: {msdf_negative: 1.0}\n",
         "weights.msdf_negative: expected 0 with representation.type 'flexicubes'"),
        (BASE.replace("type: grid", "type: flexicubes") + "  weights: {sdf_sign_final: 0.01}\n",
         "weights.sdf_sign_final: expected it only with weights.sdf_sign > 0"),
        (BASE.replace("shape: sphere", "shape: open_cup"),
         "representation.type: expected 'gshell' for the open target shape 'open_cup'"),
        (BASE.replace("shape: sphere", "shape: open_cup").replace("type: grid", "type: gshell"),
         "weights.sign_band: expected a band in cells"),
        (BASE.replace("type: grid", "type: gshell") + "  weights: {sign_band: -1}\n", "task.weights.sign_band"),
        (BASE + "output: {turntable: avi}\n", "output.turntable: Input should be False, True, 'gif' or 'mp4' "
                                              "(given: 'avi')"),
        (BASE.replace("target: {type: shape, shape: sphere}",
                      "target: {type: images, source: {type: shape, shape: open_cup}, channels: [mask, normal]}")
         .replace("type: grid", "type: gshell"),
         "target.channels: representation gshell learns where to cut its template from depth maps"),
        ("version: 1\ntask: [1, 2\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_scene_errors_name_file_and_key(tmp_path, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SceneError) as info:
        load_scene(f)
    assert str(f) in str(info.value) and expected in str(info.value)
    result = runner.invoke(app, ["validate", str(f)])
    assert result.exit_code == 2 and expected in result.output


def test_exponent_numbers_are_floats(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(BASE + "optimizer: {lr: 1e-3, schedule_gamma: 5E-2}\n")
    s = load_scene(f)
    assert s.optimizer.lr == pytest.approx(1e-3) and isinstance(s.optimizer.lr, float)
    assert s.optimizer.schedule_gamma == pytest.approx(0.05)


def test_relative_paths_resolve_against_scene_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    f = tmp_path / "sub" / "s.yaml"
    f.write_text(BASE.replace("target: {type: shape, shape: sphere}", "target: {type: mesh, path: m.obj}"))
    assert load_scene(f).task.target.path == str(tmp_path / "sub" / "m.obj")


def test_missing_scene_file_exit_code(tmp_path):
    result = runner.invoke(app, ["optimize", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_schema_lists_tasks():
    schema = scene_json_schema()
    assert "task" in schema["properties"]
    assert "reconstruction" in json.dumps(schema)
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0 and json.loads(result.output)["title"] == "Scene"


def test_help_everywhere():
    for cmd in ([], ["optimize"], ["run"], ["validate"], ["schema"], ["render"], ["info"]):
        result = runner.invoke(app, cmd + ["--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_same_scene_and_seed_give_the_same_numbers(tmp_path):
    """Contract 7: determinism on CPU."""
    from diffworld.engine.runtime import get_runtime
    from diffworld.engine.run import run_scene

    path = Path(__file__).resolve().parents[2] / "scenes" / "reconstruct_genus2.yaml"
    over = {**reduced(path), "optimizer.iterations": 5, "output.save_mesh": False}
    logs = []
    for run in ("a", "b"):
        scene = load_scene(path, over)
        run_scene(scene, get_runtime("cpu", "float32"), tmp_path / run, progress=False)
        logs.append([r["loss"] for r in csv.DictReader(open(tmp_path / run / "log.csv"))])
    assert logs[0] == logs[1]


def test_the_optimizer_section_is_the_drivers_settings(tmp_path):
    """One definition: the scene's optimizer section has the driver's fields, defaults and choices
    (less the seed, which is the scene's, and print_every), and runs the driver's checks."""
    import dataclasses

    from diffworld.engine.driver import OPTIMIZERS, OptimizerSettings
    from diffworld.engine.config import OptimizerConfig

    fields = {f.name: f.default for f in dataclasses.fields(OptimizerSettings)}
    section = OptimizerConfig()
    assert set(fields) - set(OptimizerConfig.model_fields) == {"seed", "print_every"}
    assert {k: getattr(section, k) for k in OptimizerConfig.model_fields} == \
        {k: v for k, v in fields.items() if k in OptimizerConfig.model_fields}
    for name in OPTIMIZERS:  # "adamw" was accepted by the driver but not by scenes
        assert section.model_copy(update={"name": name}).settings(seed=1).name == name
    src = Path(__file__).resolve().parents[2] / "scenes" / "reconstruct_genus2.yaml"
    cases = [("lr: 0.3", "lr: true", "optimizer.lr: expected a number, got a boolean"),
             ("lr: 0.3", "lr: .inf", "optimizer.lr: Input should be a finite number"),
             ("name: adam", "name: adamw", None),
             ("  name: adam\n", "  name: lbfgs\n  weight_decay: 0.1\n", "LBFGS has no weight decay")]
    for old, new, want in cases:
        bad = tmp_path / "s.yaml"
        text = src.read_text()
        assert old in text
        bad.write_text(text.replace(old, new))
        result = runner.invoke(app, ["validate", str(bad)])
        if want is None:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2 and want in result.output, result.output
