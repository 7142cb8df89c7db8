"""``material: {type: neural, path}`` in MPM scenes: a learned law file binds a body; a law file
made of the built-in corotated stress reproduces the built-in jelly scene (Warp path vs torch
seam) to round-off; bad law files and keys are refused naming the key path and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from diffworld.app.scenes import SceneError, load_scene
from diffworld.engine.runtime import init_warp
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import InvariantElasticity, NeuralLaw, save_law

torch.set_num_threads(1)
init_warp()
SCENE = Path(__file__).resolve().parents[2] / "scenes" / "mpm_sysid_jelly.yaml"
F64 = torch.float64


def _write(tmp_path: Path, material: dict) -> Path:
    data = yaml.safe_load(SCENE.read_text())
    data["task"]["bodies"][0]["material"] = material
    data["task"]["domain"]["resolution"] = 16
    data["task"]["bodies"][0]["ppc"] = 1
    p = tmp_path / "scene.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _final_state(path: Path, n: int = 40):
    from diffworld.tasks.mpm.build import MPMScene

    scene = load_scene(path)
    built = MPMScene(scene.task, F64, torch.device("cpu"), scene.seed)
    with torch.no_grad():
        out = mpm.rollout(built.model, built.state, n, None, window=n)
    return built, out.states[-1]


def test_a_law_file_of_the_builtin_stress_reproduces_the_builtin_scene(tmp_path):
    save_law(NeuralLaw("corotated"), tmp_path / "corotated")
    builtin, a = _final_state(_write(tmp_path, {"name": "jelly", "E": 2.0e4, "nu": 0.3, "density": 1000}))
    neural, b = _final_state(_write(tmp_path, {"type": "neural", "path": str(tmp_path / "corotated.pt"),
                                               "name": "jelly", "E": 2.0e4, "nu": 0.3, "density": 1000}))
    assert len(neural.model.torch_laws) == 1 and not builtin.model.torch_laws
    assert float((a.x - builtin.state.x).abs().max()) > 1e-3  # it moved
    for name, ta, tb in zip(mpm.State._fields, a, b):
        assert float((ta - tb).abs().max()) <= 1e-11 * float(ta.abs().max()), name


def test_a_learned_law_runs_in_a_scene_with_its_weights_fixed(tmp_path):
    torch.manual_seed(0)
    save_law(NeuralLaw(InvariantElasticity(width=8, output_scale=2e4)), tmp_path / "net")
    built, s = _final_state(_write(tmp_path, {"type": "neural", "path": "net.pt"}))  # relative to the scene
    assert all(bool(torch.isfinite(t).all()) for t in s)
    law = built.model.torch_laws[0].law
    assert not any(p.requires_grad for p in law.parameters())
    assert float(built.model.params["density"][0]) == 1000.0  # the default base material, jelly


@pytest.mark.parametrize("material,want", [
    ({"type": "neural"}, ("task.bodies[0].material: ", "path: required for type 'neural'")),
    ({"type": "neural", "path": "missing.pt"}, ("task.bodies[0].material.path: ", "missing.pt")),
    ({"name": "jelly", "path": "net.pt"}, ("task.bodies[0].material.path: only for type 'neural'",)),
    ({"E": 1.0e4}, ("task.bodies[0].material: ", "name: required for a built-in material")),
    ({"type": "spline", "name": "jelly"}, ("task.bodies[0].material.type: ", "'builtin' or 'neural'", "'spline'")),
])
def test_bad_neural_materials_are_refused_naming_the_key(tmp_path, material, want):
    torch.manual_seed(0)
    save_law(NeuralLaw(InvariantElasticity(width=8)), tmp_path / "net")
    with pytest.raises(SceneError) as err:
        load_scene(_write(tmp_path, material))
    for w in want:
        assert w in str(err.value), (w, str(err.value))


def test_weights_of_another_architecture_are_refused_at_validation(tmp_path):
    torch.manual_seed(0)
    save_law(NeuralLaw(InvariantElasticity(width=8)), tmp_path / "a")
    save_law(NeuralLaw(InvariantElasticity(width=16)), tmp_path / "b")
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())
    with pytest.raises(SceneError, match=r"task\.bodies\[0\]\.material\.path: .*b\.pt: elastic\.mlp\.layers\.0\.weight "
                                         r"has shape \(16, 13\)"):
        load_scene(_write(tmp_path, {"type": "neural", "path": "b.pt"}))
