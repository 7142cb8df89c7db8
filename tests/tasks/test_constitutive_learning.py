"""The ``constitutive_learning`` task (NCLaw): the truth set-up, teacher forcing (a law equal to the
truth has zero loss at every interval), the schedule, gradients of the teacher-forced loss vs central
differences, a reduced run whose rollout error falls and whose law file runs in an MPM scene, and the
seam's errors for a law that returns a wrong shape or non-finite values (law, body and substep named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffworld.app.scenes import SceneError, load_scene
from diffworld.engine.runtime import init_warp
from diffworld.sims import mpm
from diffworld.sims.constitutive import TorchLaw
from diffworld.sims.constitutive.neural import InvariantElasticity, NeuralLaw
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask
from diffworld.tasks.constitutive.training import (build_law, build_setup, ground_truth, lambda_at, rollout_mse,
                                                   teacher_forced_loss)

torch.set_num_threads(1)
init_warp()
ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def _task(**data) -> ConstitutiveLearningTask:
    base = {"material": {"name": "jelly"}, "resolution": 16, "size": 0.25, "steps": 12}  # 64 particles
    return ConstitutiveLearningTask.model_validate({"data": {**base, **data},
                                                   "law": {"width": 8, "plastic": "none"}})


def test_the_truth_setup_is_ncLaw_s():
    task = ConstitutiveLearningTask.model_validate({"data": {"material": {"name": "jelly"}}})
    model, state = build_setup(task.data, F64, "cpu")
    assert model.n_particles == 1000 and model.grid.dx == pytest.approx(0.05)
    c = state.x.mean(0)
    assert torch.allclose(c, torch.full((3,), 0.5, dtype=F64))
    assert float(state.x.max() - state.x.min()) == pytest.approx(0.45)  # cell centres of a 0.5 m cube
    # velocity (1, -1.5, -2) plus the spin (4, 4, 4) x (x - c): the mean is the linear part
    assert torch.allclose(state.v.mean(0), torch.tensor([1.0, -1.5, -2.0], dtype=F64), atol=1e-12)
    L = torch.linalg.cross(state.x - c, state.v).sum(0)
    assert float(L[0] - L[1]) == pytest.approx(0.0, abs=1e-9) and float(L[0]) > 0


def test_lambda_follows_a_cosine_from_start_to_end():
    seq = [lambda_at(i, 30, 25, 200) for i in range(30)]
    assert seq[0] == 25 and seq[-1] == 200
    assert all(a <= b for a, b in zip(seq, seq[1:]))
    assert seq[15] == pytest.approx(112.5, abs=10)


@pytest.mark.parametrize("lam", [1, 5, 12])
def test_a_law_equal_to_the_truth_has_zero_teacher_forced_loss(lam):
    task = _task()
    model, state = build_setup(task.data, F64, "cpu")
    truth = ground_truth(model, state, task.data.steps)
    same = mpm.use_law(model, NeuralLaw("corotated").to(F64), "cube")
    # round-off only (positions ~0.5 m: a squared error of ~1e-32 x 1e4); another law of the same
    # E and nu (neo-Hookean) differs by ~1e-20 after one step and more after more
    assert float(teacher_forced_loss(same, truth, lam, 50)) < 1e-28
    other = mpm.use_law(model, NeuralLaw("neo_hookean").to(F64), "cube")
    assert float(teacher_forced_loss(other, truth, lam, 50)) > 1e-22


def test_teacher_forced_loss_gradients_match_central_differences():
    task = _task()
    model, state = build_setup(task.data, F64, "cpu")
    truth = ground_truth(model, state, task.data.steps)
    torch.manual_seed(0)
    law = build_law(task.law, 1e5, F64, "cpu")
    with torch.no_grad():  # away from the zero start, so that every weight matters
        for p in law.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    bound = mpm.use_law(model, law, "cube")
    params = list(law.parameters())
    loss = teacher_forced_loss(bound, truth, 5, 4)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        dirs = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        analytic = float(sum((a * d).sum() for a, d in zip(grads, dirs)))
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.add_(sign * 1e-6 * d)
                vals.append(float(teacher_forced_loss(bound, truth, 5, 4)))
                for p, d in zip(params, dirs):
                    p.sub_(sign * 1e-6 * d)
        numeric = (vals[0] - vals[1]) / 2e-6
        assert abs(analytic - numeric) < 1e-5 * abs(numeric), (analytic, numeric)


def test_reduced_scene_learns_and_its_law_runs_in_an_mpm_scene(tmp_path):
    from diffworld.engine.run import run_scene
    from diffworld.engine.runtime import get_runtime

    scene = load_scene(ROOT / "scenes" / "nclaw_jelly.yaml", {"task.data.steps": 40, "optimizer.iterations": 6,
                                                               "task.teacher_forcing.end": 40})
    m = run_scene(scene, get_runtime("cpu", scene.runtime.dtype), tmp_path, progress=False)
    assert m["final_rollout_mse"] < 0.5 * m["initial_rollout_mse"], m
    for f in ("law.pt", "law.json", "mse.png", "final_frame.png", "log.csv", "metrics.json"):
        assert (tmp_path / f).is_file(), f
    assert json.loads((tmp_path / "law.json").read_text())["elastic"]["kind"] == "invariant"
    # the learned law as a material of an ordinary MPM scene
    data = yaml.safe_load((ROOT / "scenes" / "mpm_sysid_jelly.yaml").read_text())
    data["task"]["bodies"][0]["material"] = {"type": "neural", "path": str(tmp_path / "law.pt")}
    p = tmp_path / "uses_law.yaml"
    p.write_text(yaml.safe_dump(data))
    assert load_scene(p).task.bodies[0].material.type == "neural"


@pytest.mark.parametrize("data,law,want", [
    ({"material": {"type": "neural", "path": "x.pt"}}, {}, "task.data.material"),
    ({"material": {"name": "jelly"}}, {"elastic": "corotated", "plastic": "none"}, "at least one part must be a "
                                                                                   "network"),
    ({"material": {"name": "jelly"}}, {"elastic": "spline"}, "task.law.elastic: expected one of"),
    ({"material": {"name": "jelly"}, "size": 0.9}, {}, "task.data.size: the cube (0.9 m) reaches into the walls"),
    ({"material": {"name": "jelly"}, "dt": 0.01}, {}, "task.data.dt: 0.01 s is above the stability limit"),
])
def test_bad_scenes_are_refused_at_validation(tmp_path, data, law, want):
    scene = {"version": 1, "name": "x", "task": {"type": "constitutive_learning", "data": data, "law": law},
             "optimizer": {"name": "adam", "lr": 0.01, "iterations": 2}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scene))
    with pytest.raises(SceneError) as err:
        load_scene(p)
    assert want in str(err.value), str(err.value)


class _Broken(TorchLaw):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def stress(self, F, params):
        if self.mode == "shape":
            return F[:, 0]
        out = torch.zeros_like(F)
        out[3, 0, 0] = float("nan")
        return out


@pytest.mark.parametrize("mode,want", [
    ("shape", r"_Broken \(body 'cube', substep 0\): its stress has shape \(64, 3\); expected \(64, 3, 3\)"),
    ("nan", r"_Broken \(body 'cube', substep 0\): its stress is not finite for 1 of 64 particles \(first: particle 3\)"),
])
def test_a_law_with_a_bad_output_is_named_with_body_and_substep(mode, want):
    task = _task()
    model, state = build_setup(task.data, F64, "cpu")
    bound = mpm.use_law(model, _Broken(mode), "cube")
    with pytest.raises(ValueError, match=want):
        mpm.rollout(bound, state, 3, None)


# ---------------------------------------------------------------------- evaluation and recorded data


def test_evaluation_cases_replace_keys_and_score_each_law(tmp_path):
    """Each case is the training set-up with its keys replaced; a law equal to the truth scores
    exactly 0 on every case (same simulator, same start), a stress-free law does not."""
    from diffworld.sims.constitutive.torch_law import BuiltinTorchLaw
    from diffworld.tasks.constitutive.run import evaluate_case

    task = ConstitutiveLearningTask.model_validate({
        "data": {"material": {"name": "jelly"}, "resolution": 16, "size": 0.25, "steps": 12},
        "law": {"width": 8, "plastic": "none"},
        "evaluate": [{"name": "long", "steps": 24}, {"name": "fast", "velocity": [0.0, 0.0, -3.0], "spin": [0, 0, 0], "steps": 150},
                     {"name": "slope", "gravity": [4.9, 0.0, -8.49]},
                     {"name": "ball", "resolution": 24, "shape": {"type": "sphere", "radius": 0.15}}]})
    long, fast, slope, ball = (c.data(task.data) for c in task.evaluate)
    assert (long.steps, long.velocity) == (24, task.data.velocity)
    assert fast.velocity == (0.0, 0.0, -3.0) and fast.steps == 150 and fast.size == 0.25
    assert slope.gravity == (4.9, 0.0, -8.49)
    assert ball.resolution == 24 and ball.shape.type == "sphere"
    truth_like = BuiltinTorchLaw("corotated")
    free = build_law(task.law, 1e5, F64, "cpu").requires_grad_(False)
    for case in task.evaluate:
        r = evaluate_case(task, case, {"truth": truth_like, "free": free}, F64, "cpu")
        assert r["truth"] < 1e-20, (case.name, r["truth"])
        assert r["free"] > 1e-10, (case.name, r["free"])
        assert r["steps"] == case.data(task.data).steps
    model, _ = build_setup(ball, F64, "cpu")
    assert model.n_particles > 100 and model.grid.dx == pytest.approx(1 / 24)


def test_a_run_with_evaluation_writes_the_scores_and_their_plot(tmp_path):
    from diffworld.engine.run import run_scene
    from diffworld.engine.runtime import get_runtime

    scene = load_scene(ROOT / "scenes" / "nclaw_jelly.yaml", {
        "task.data.steps": 10, "task.data.resolution": 16, "task.data.size": 0.25, "optimizer.iterations": 2,
        "task.teacher_forcing.start": 5, "task.teacher_forcing.end": 10, "task.law.width": 8,
        "task.evaluate": [{"name": "long", "steps": 20}, {"name": "slope", "gravity": [4.9, 0.0, -8.49]}]})
    m = run_scene(scene, get_runtime("cpu", "float64"), tmp_path, progress=False)
    for name in ("long", "slope"):
        assert m[f"eval_{name}_mse"] >= 0 and m[f"eval_{name}_initial_mse"] > 0
        assert m["evaluation"][name]["steps"] == (20 if name == "long" else 10)
    assert (tmp_path / "evaluation.png").is_file() and (tmp_path / "truth.npz").is_file()
    # the recorded truth trains the same law: the same first loss as the simulated truth
    scene2 = load_scene(ROOT / "scenes" / "nclaw_jelly.yaml", {
        "task.data.steps": 10, "task.data.resolution": 16, "task.data.size": 0.25, "optimizer.iterations": 2,
        "task.teacher_forcing.start": 5, "task.teacher_forcing.end": 10, "task.law.width": 8,
        "task.data.trajectory": str(tmp_path / "truth.npz")})
    m2 = run_scene(scene2, get_runtime("cpu", "float64"), tmp_path / "again", progress=False)
    assert m2["initial_rollout_mse"] == pytest.approx(m["initial_rollout_mse"], rel=1e-12)
    assert m2["final_rollout_mse"] == pytest.approx(m["final_rollout_mse"], rel=1e-9)


@pytest.mark.parametrize("change,want", [
    ("short", r"'x' has 11 frames; data.steps is 12, so 13 are needed"),
    ("particles", r"'x' has 63 particles; the set-up \(shape, resolution, ppc\) makes 64"),
    ("missing", r"has no array 'F'"),
    ("nan", r"'v' has non-finite values"),
    ("shape", r"'C' has shape \(13, 64, 9\); expected \(13, 64, 3, 3\)"),
    ("garbage", r"cannot read .* as .npz"),
])
def test_recorded_trajectories_of_the_wrong_length_or_shape_are_refused(tmp_path, change, want):
    import numpy as np

    from diffworld.tasks.constitutive.training import load_trajectory, save_trajectory

    task = _task()
    model, state = build_setup(task.data, F64, "cpu")
    truth = ground_truth(model, state, task.data.steps)
    p = save_trajectory(truth, tmp_path / "t.npz")
    back = load_trajectory(p, 12, 64, F64, "cpu")
    assert all(torch.equal(a.x, b.x) and torch.equal(a.F, b.F) for a, b in zip(truth, back))
    arrays = dict(np.load(p))
    if change == "short":
        arrays = {k: v[:11] for k, v in arrays.items()}
    elif change == "particles":
        arrays = {k: v[:, :63] for k, v in arrays.items()}
    elif change == "missing":
        del arrays["F"]
    elif change == "nan":
        arrays["v"][5, 3, 1] = np.nan
    elif change == "shape":
        arrays["C"] = arrays["C"].reshape(13, 64, 9)
    bad = tmp_path / "bad.npz"
    if change == "garbage":
        bad.write_bytes(b"not a zip file")
    else:
        np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="data.trajectory: .*" + want):
        load_trajectory(bad, 12, 64, F64, "cpu")


@pytest.mark.parametrize("evaluate,want", [
    ([{"name": "a"}, {"name": "a"}], "names must be unique"),
    ([{"name": "training"}], "names must be unique"),
    ([{"name": "big", "shape": {"type": "sphere", "radius": 0.45}}], r"evaluate\[0\] \(big\): data: shape: .*particles outside the domain interior"),
    ([{"name": "fast", "dt": 0.1}], "dt"),
])
def test_bad_evaluation_cases_are_refused(evaluate, want):
    with pytest.raises(Exception, match=want):
        ConstitutiveLearningTask.model_validate({"data": {"material": {"name": "jelly"}}, "evaluate": evaluate})


def test_law_kind_switches_every_network_part():
    from diffworld.sims.constitutive.neural import PlainElasticity, PlainPlasticity

    task = ConstitutiveLearningTask.model_validate({"data": {"material": {"name": "jelly"}}, "law": {"kind": "plain"}})
    law = build_law(task.law, 1e5, F64, "cpu")
    assert isinstance(law.elastic, PlainElasticity) and isinstance(law.plastic, PlainPlasticity)
    task = ConstitutiveLearningTask.model_validate({"data": {"material": {"name": "jelly"}},
                                                   "law": {"kind": "plain", "elastic": "invariant"}})
    law = build_law(task.law, 1e5, F64, "cpu")
    assert isinstance(law.elastic, InvariantElasticity) and isinstance(law.plastic, PlainPlasticity)
