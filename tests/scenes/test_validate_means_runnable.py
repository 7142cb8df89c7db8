"""`validate: ok` means the scene can run: every check that needs no simulation happens at
validation, with the key path in the message (each case here passed validation and failed the
run, or ran with a wrong value, before)."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffworld.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

CASES = [
    ("mpm_gather.yaml", "upper: [0.56, 0.32, 0.24]", "upper: [0.56, -0.32, 0.24]", "task.domain: Value error, expected lower < upper"),
    ("mpm_gather.yaml", "half_extents: [0.22, 0.1, 0.035]", "half_extents: [0.22, -0.1, 0.035]", "task.bodies[0].shape.half_extents"),
    ("mpm_gather.yaml", "half_extents: [0.22, 0.1, 0.035]", "half_extents: [.inf, 0.1, 0.035]", "task.bodies[0].shape.half_extents"),
    ("mpm_gather.yaml", "resolution: 28", "resolution: 1000000000000000000000000000000", "task.domain.resolution"),
    ("mpm_gather.yaml", "resolution: 28", "resolution: 100000", "task.domain.resolution"),
    ("mpm_gather.yaml", "size: [0.02, 0.08, 0.05]", "size: [0.02, .inf, 0.05]", "task.colliders[0].size"),
    ("mpm_gather.yaml", "name: mpm_gather", "name: " + "g" * 10000, "name: String should match pattern"),
    ("mpm_gather.yaml", "name: mpm_gather", "name: ../escape", "name: String should match pattern"),
    ("reconstruct_genus2.yaml", "device: auto", "device: ''", "runtime.device"),
    ("reconstruct_genus2.yaml", "final_lr_scale: 0.33", "final_lr_scale: .inf", "task.representation.final_lr_scale"),
    ("reconstruct_genus2.yaml", "lr: 0.3", "lr: true", "optimizer.lr: expected a number, got a boolean"),
    ("reconstruct_genus2.yaml", "eikonal: 1.0", "eikonal: 1e30", "task.weights.eikonal"),
    ("reconstruct_genus2.yaml", "n_points: 50000", "n_points: -5", "task.target.n_points"),
    ("reconstruct_genus2.yaml", "resolutions: [16, 32, 64]", "resolutions: [16, 32, 100000]", "task.representation.resolutions"),
]


@pytest.mark.parametrize("scene,old,new,want", CASES, ids=[f"{c[0]}:{c[2][:30]}" for c in CASES])
def test_validate_rejects_what_the_run_would(tmp_path, scene, old, new, want):
    text = (ROOT / "scenes" / scene).read_text()
    assert old in text, old
    path = tmp_path / scene
    path.write_text(text.replace(old, new, 1))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output[-600:]
    assert want in result.output, result.output[-600:]
    assert len(result.output) < 3000


def test_corrupt_assets_are_caught_at_validation(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "cad_part.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n"
                                                        + np.random.default_rng(0).bytes(64))
    path = tmp_path / "reconstruct_mesh.yaml"
    path.write_text((ROOT / "scenes" / "reconstruct_mesh.yaml").read_text())
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "task.target.path: Value error, cannot read the mesh file" in result.output, \
        result.output[-600:]


def test_a_file_that_is_not_an_npz_is_named_so(tmp_path):
    from diffworld.tasks.mpm.loss_terms import _npz_array

    bad = tmp_path / "targets.npz"
    np.save(tmp_path / "x.npy", np.zeros(3))
    bad.write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.raises(ValueError, match="not an .npz archive"):
        _npz_array(str(bad), "x")
    bad.write_bytes(np.random.default_rng(1).bytes(100))
    with pytest.raises(ValueError, match="not an .npz archive"):
        _npz_array(str(bad), "x")
