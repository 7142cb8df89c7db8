"""Bad input to the tactile simulator (issue 15 item 5) is answered with a clear error that names the
file/key/argument, what was expected and what was given, through both entry points: the library
(diffworld.sims.fem, .tactile, .coupling) and scene files (``diffworld validate`` / ``optimize``).

Cases: inverted or degenerate tets (the element named), a non-closed surface, negative stiffness,
dt above the stability limit, objects interpenetrating at the start (by how much), NaN in the
controls, and a run whose loss becomes non-finite (stops naming the iteration, keeps the last
good checkpoint). The library rollouts check the start when asked (``check_start``: a rollout
continued from a state in contact starts inside on purpose); the scene task always does.
"""

import sys
from pathlib import Path

import meshio
import numpy as np
import pytest
import torch
import trimesh
from typer.testing import CliRunner

from diffworld.app.cli import app
from diffworld.engine.runtime import init_warp
from diffworld.sims import fem
from diffworld.sims.coupling.fem_cable import CableGel, CoupledState, fem_cable_rollout
from diffworld.sims.coupling.fem_mpm import Gel, coupled_rollout
from diffworld.sims.tactile import ParallelGripper, dome, flat_pad, sensor_control

torch.set_num_threads(1)
init_warp()

ROOT = Path(__file__).resolve().parents[2]
SCENES = ROOT / "scenes"
F64 = torch.float64
runner = CliRunner()

# the small FEM-MPM and FEM-rope set-ups of the coupling tests (a coarse pad, a 1 cm jelly cube,
# a 9-particle rope on a table)
sys.path.insert(0, str(ROOT / "tests" / "sims"))
import test_fem_cable as cable_setup  # noqa: E402
import test_fem_mpm as mpm_setup  # noqa: E402

# 4 corners of a unit tet plus one more point, scaled to mm
V = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1.0]], dtype=F64) * 1e-3


def _pad_model():
    """A 8 x 8 x 2 mm flat pad (4 x 4 x 1 cells), base kinematic, float64, and its stable dt."""
    geo = flat_pad((0.008, 0.008), 0.002, (4, 4, 1))
    model = fem.build_model(geo.mesh, E=8e4, nu=0.43, density=2000.0, kinematic=geo.base_nodes, dtype=F64)
    return geo, model, fem.stable_dt(model).dt


def _ball(z):
    return fem.RigidObject.sphere(0.003, torch.tensor([0.0, 0.0, z], dtype=F64))


# ============================================================================== library: meshes


def test_inverted_tet_is_named_with_its_volume(tmp_path):
    with pytest.raises(ValueError) as info:
        fem.TetMesh(V, torch.tensor([[0, 1, 2, 3], [1, 2, 4, 3]]))
    msg = str(info.value)
    assert "TetMesh 'mesh': 1 inverted tet(s) (negative volume): tets 1 (-3.33e-10 m^3)" in msg, msg
    assert "orient=True" in msg
    # from a file: the file is named
    path = tmp_path / "gel.msh"
    meshio.write(str(path), meshio.Mesh(V.numpy(), [("tetra", np.array([[0, 1, 2, 3], [0, 2, 1, 4]]))]),
                 file_format="gmsh")
    with pytest.raises(ValueError, match=r"TetMesh '.*gel\.msh': 1 inverted tet\(s\) .*tets 1 \(-1\.67e-10 m\^3\)"):
        fem.TetMesh.load(path)
    assert fem.TetMesh.load(path, orient=True).n_tets == 2  # the advertised remedy works


def test_degenerate_tet_is_named_even_with_orient():
    flat = V.clone()
    flat[4] = torch.tensor([0.5e-3, 0.5e-3, 0.0])  # in the plane of corners 0, 1, 2
    for orient in (False, True):
        with pytest.raises(ValueError) as info:
            fem.TetMesh.from_arrays(flat, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]]), name="gel.vtu", orient=orient)
        msg = str(info.value)
        assert "TetMesh 'gel.vtu': 1 degenerate tet(s) (|volume| <= 1e-12 x mean edge length^3): tets 1 (0 m^3)" \
            in msg, msg


def test_sensor_too_thin_for_its_cells_names_the_arguments():
    """A pad 1e-15 m thick: every tet is flat; the message names flat_pad's arguments and the tets."""
    with pytest.raises(ValueError) as info:
        flat_pad((0.012, 0.012), 1e-15, (8, 8, 2))
    msg = str(info.value)
    assert msg.startswith("flat_pad: size (0.012, 0.012) m, thickness 1e-15 m, res (8, 8, 2) give an unusable mesh"), msg
    assert "768 degenerate tet(s)" in msg and "tets 0 (" in msg
    with pytest.raises(ValueError, match=r"^dome: inner_radius 0.0075 m, thickness 1e-16 m, layers 1, n_points 8 "
                                         r"give an unusable mesh: TetMesh 'dome': \d+ degenerate tet"):
        dome(7.5e-3, 1e-16, 1, 8)


# ============================================================================== library: stiffness


@pytest.mark.parametrize("name", ["k_n", "k_d", "k_t", "mu"])
def test_negative_contact_coefficient_rollout(name):
    geo, model, dt = _pad_model()
    cp = fem.ContactParams(**{"k_n": 1e3, name: -5.0})
    with pytest.raises(ValueError) as info:
        fem.rollout(model, model.rest_state(), 0.5 * dt, 2, contact=fem.Contact(_ball(0.005 + 1e-5), geo.contact_nodes,
                                                                                 cp))
    assert f"Expected '{name}' >= 0" in str(info.value) and "got min -5.0" in str(info.value), str(info.value)


def test_negative_young_modulus_names_the_tet():
    geo = flat_pad((0.008, 0.008), 0.002, (4, 4, 1))
    E = torch.full((geo.mesh.n_tets,), 8e4, dtype=F64)
    E[7] = -1.0
    with pytest.raises(ValueError, match=r"build_model: E expected a finite number > 0, got -1.0 \(element 7\)"):
        fem.build_model(geo.mesh, E=E, nu=0.43, density=2000.0)
    with pytest.raises(ValueError, match=r"build_model: 'density' must be finite and > 0 \[kg/m\^3\]; tet 0 has -5"):
        fem.build_model(geo.mesh, E=8e4, nu=0.43, density=-5.0)


def test_negative_contact_stiffness_in_couplings():
    block, st = mpm_setup._block(0.015)
    gel = mpm_setup._pad(0.03, True)
    with pytest.raises(ValueError, match=r"coupled_rollout: gels\[0\]\.contact\.k_n: expected a finite number >= 0, "
                                         r"got -3000\.0"):
        coupled_rollout([Gel(gel.model, mpm_setup._law(k_n=-3e3))], block, [gel.model.rest_state()], st, 2)
    model, faces = cable_setup._pad(5e-4)
    rope = cable_setup._rope()
    state = CoupledState((model.rest_state(),), rope.rest_state())
    with pytest.raises(ValueError, match=r"fem_cable_rollout: coupling\.params\.k_n must be finite and >= 0, "
                                         r"got -2000"):
        fem_cable_rollout([CableGel(model, faces)], rope, state, cable_setup.DT, 3,
                          cable_setup._coupling(0.5, k_n=-2000.0))


# ============================================================================== library: dt


def test_dt_above_the_elastic_limit():
    geo, model, dt = _pad_model()
    with pytest.raises(ValueError) as info:
        fem.rollout(model, model.rest_state(), 3 * dt, 2)
    msg = str(info.value)
    assert f"dt {3 * dt:.3g} s is above the stability limit {dt:.3g} s" in msg and "use substeps >= 3" in msg, msg
    assert f"{dt:.3g}" == "7.19e-05"


def test_dt_above_the_limits_in_couplings():
    slow, st = mpm_setup._block(0.015, dt=1e-3)
    gel = mpm_setup._pad(0.03, True)
    with pytest.raises(ValueError, match=r"coupled_rollout: the MPM model's dt 0\.001 s is above its stable step "
                                         r"0\.000119 s"):
        coupled_rollout([gel], slow, [gel.model.rest_state()], st, 2)
    block, st = mpm_setup._block(0.015)
    with pytest.raises(ValueError, match=r"coupled_rollout: gels\[0\] \('gel'\): dt 5e-05 s is above the penalty "
                                         r"contact's stable step .* \(k_n 1e\+07 N/m"):
        coupled_rollout([Gel(gel.model, mpm_setup._law(k_n=1e7))], block, [gel.model.rest_state()], st, 2)
    model, faces = cable_setup._pad(5e-4)
    rope = cable_setup._rope()
    state = CoupledState((model.rest_state(),), rope.rest_state())
    with pytest.raises(ValueError, match=r"dt 0\.0004 s is above the stability limit 9\.64e-05 s .* substeps >= 5"):
        fem_cable_rollout([CableGel(model, faces)], rope, state, 5 * cable_setup.DT, 3, cable_setup._coupling(0.5))
    with pytest.raises(ValueError, match=r"fem_cable_rollout: dt 8e-05 s cannot resolve the contact stiffness k_n "
                                         r"1e\+09 N/m \(need dt < 1\.29e-07 s"):
        fem_cable_rollout([CableGel(model, faces)], rope, state, cable_setup.DT, 3,
                          cable_setup._coupling(0.5, k_n=1e9))


def test_dt_above_the_contact_limit_in_the_fem_rollout():
    geo, model, dt = _pad_model()
    cp = fem.ContactParams(k_n=1e9)
    with pytest.raises(ValueError, match=r"rollout: dt .* s is above the contact penalty stiffness limit .* \(k_n 1e\+09 "
                                         r"on contact node \d+ of mass"):
        fem.rollout(model, model.rest_state(), 0.9 * dt, 200, contact=fem.Contact(_ball(0.005 - 2e-4),
                                                                                   geo.contact_nodes, cp))


# ============================================================================== library: start inside


def _fem_start_inside():
    geo, model, dt = _pad_model()  # contact face at z = 2 mm; the ball's bottom 0.2 mm below it
    fem.rollout(model, model.rest_state(), 0.5 * dt, 2,
                contact=fem.Contact(_ball(0.005 - 2e-4), geo.contact_nodes, fem.ContactParams(k_n=1e3)),
                check_start=True)


def _mpm_start_inside():
    block, st = mpm_setup._block(0.015)  # cube z in [0.015, 0.025]; the pad's face at 0.022
    gel = mpm_setup._pad(0.022, True)
    coupled_rollout([gel], block, [gel.model.rest_state()], st, 2, check_start=True)


def _rope_start_inside():
    model, faces = cable_setup._pad(-1e-3)  # the pad's face 1 mm into the rope's spheres
    rope = cable_setup._rope()
    fem_cable_rollout([CableGel(model, faces)], rope, CoupledState((model.rest_state(),), rope.rest_state()),
                      cable_setup.DT, 3, cable_setup._coupling(0.5), check_start=True)


@pytest.mark.parametrize("run", [_fem_start_inside, _mpm_start_inside, _rope_start_inside],
                         ids=["fem-rigid", "fem-mpm", "fem-cable"])
def test_library_rollouts_refuse_a_start_inside_the_gel(run):
    """With check_start (off by default: a rollout continued from a state in contact starts
    inside on purpose) the library rollouts say by how much a body starts inside the gel."""
    with pytest.raises(ValueError, match=r"starts \d[.\d]* mm inside"):
        run()


# ============================================================================== library: NaN controls


def test_nan_in_fem_controls_names_the_field_and_step():
    geo, model, dt = _pad_model()
    t = torch.zeros(5, 3, dtype=F64)
    t[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^Control: 'translation' has a non-finite value \(NaN or Inf\) at step 3$"):
        fem.rollout(model, model.rest_state(), 0.5 * dt, 5, fem.Control(translation=t))
    q = torch.tensor([[0, 0, 0, 1.0]] * 5, dtype=F64)
    q[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^Control: 'rotation' has a non-finite value \(NaN or Inf\) at step 2$"):
        fem.rollout(model, model.rest_state(), 0.5 * dt, 5, fem.Control(rotation=q))
    # the tactile helper builds the control; the rollout refuses it
    with pytest.raises(ValueError, match=r"'translation' has a non-finite value \(NaN or Inf\) at step 3"):
        fem.rollout(model, model.rest_state(), 0.5 * dt, 5, sensor_control(t, torch.tensor([[0, 0, 0, 1.0]] * 5,
                                                                                             dtype=F64)))


def test_nan_in_gripper_opening_names_the_step():
    g = ParallelGripper(flat_pad((0.008, 0.008), 0.002, (4, 4, 1)), 0.03)
    o = torch.full((5,), 0.01, dtype=F64)
    o[2] = float("nan")
    with pytest.raises(ValueError, match=r"ParallelGripper: 'opening' must be in \[0, 0\.03\] m .*; step 2 has nan m"):
        g.pad_poses(torch.zeros(5, 3, dtype=F64), torch.tensor([[0, 0, 0, 1.0]] * 5, dtype=F64), o)


def test_nan_in_coupled_controls_names_the_gel_field_and_step():
    block, st = mpm_setup._block(0.015)
    gel = mpm_setup._pad(0.03, True)
    t = torch.zeros(3, 3, dtype=F64)
    t[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^coupled_rollout: gel_controls\[0\]: Control: 'translation' has a "
                                         r"non-finite value \(NaN or Inf\) at step 1$"):
        coupled_rollout([gel], block, [gel.model.rest_state()], st, 3, gel_controls=[fem.Control(translation=t)])
    model, faces = cable_setup._pad(5e-4)
    rope = cable_setup._rope()
    with pytest.raises(ValueError, match=r"Control: 'translation' has a non-finite value \(NaN or Inf\) at step 1"):
        fem_cable_rollout([CableGel(model, faces, control=fem.Control(translation=t))], rope,
                          CoupledState((model.rest_state(),), rope.rest_state()), cable_setup.DT, 3,
                          cable_setup._coupling(0.5))


# ============================================================================== scene files


def _scene(tmp_path: Path, scene: str, *replace: tuple[str, str]) -> Path:
    text = (SCENES / scene).read_text()
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / scene
    path.write_text(text)
    return path


def _refused(result, *want: str) -> None:
    """Exit 2 with a one-line error (no traceback) holding every ``want``."""
    out = result.output
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, out[-1500:])
    assert "Traceback" not in out and out.startswith("error: "), out[-1500:]
    for w in want:
        assert w in out, (w, out[-1500:])


def _validate(tmp_path, scene, *replace):
    return runner.invoke(app, ["validate", str(_scene(tmp_path, scene, *replace))])


SF, SYSID, GRASP = "tactile_surface_following.yaml", "tactile_sysid.yaml", "tactile_grasp_elastic.yaml"


@pytest.mark.parametrize("scene,old,new,want", [
    (SF, "  contact: {k_n: 2.0e8,", "  contact: {k_n: -2.0e8,",
     "task.contact.k_n: Input should be greater than or equal to 0 (given: -200000000.0)"),
    (SYSID, "  contact: {k_n: 2.0e8, k_t: 3.0e4,", "  contact: {k_n: 2.0e8, k_t: -3.0e4,",
     "task.contact.k_t: Input should be greater than or equal to 0 (given: -30000.0)"),
    (GRASP, "    contact: {k_n: 2.0e7,", "    contact: {k_n: -2.0e7,",
     "task.mpm.contact.k_n: Input should be greater than or equal to 0 (given: -20000000.0)"),
    (SF, "material: {E: 8.0e4,", "material: {E: -8.0e4,",
     "task.sensor.material.E: Input should be greater than 0 (given: -80000.0)"),
], ids=["k_n", "k_t", "mpm-k_n", "E"])
def test_scene_negative_stiffness(tmp_path, scene, old, new, want):
    _refused(_validate(tmp_path, scene, (old, new)), want)


@pytest.mark.parametrize("scene,old,new,want", [
    (SYSID, "  control_dt: 0.001", "  control_dt: 0.001\n  dt: 0.0005",
     "task.dt: 0.0005 s is above the friction limit (k_t = 30000 N s/m^3), 2.5e-05 s; use at most 2.5e-05 s"),
    (GRASP, "  control_dt: 0.0024", "  control_dt: 0.0024\n  dt: 0.001",
     "task.dt: 0.001 s is above the friction limit (mpm.contact.k_t = 10000 N s/m^3), 4.71e-05 s"),
], ids=["sysid", "grasp"])
def test_scene_dt_above_the_stability_limit(tmp_path, scene, old, new, want):
    _refused(_validate(tmp_path, scene, (old, new)), want)


@pytest.mark.parametrize("scene,old,new,want", [
    (SYSID, "position: [0, 0, 0.007]}", "position: [0, 0, 0.0065]}",
     "task.object: 'ball' starts 0.5 mm inside the gel of 'pad'"),
    (GRASP, "    opening: 0.022\n", "    opening: 0.010\n",
     "task.mpm: MPM particles start 1.62 mm inside the gel of 'gripper.left'"),
], ids=["sysid-ball", "grasp-cube"])
def test_scene_objects_interpenetrating_at_the_start(tmp_path, scene, old, new, want):
    _refused(_validate(tmp_path, scene, (old, new)), want)


def test_scene_body_surface_inside_the_gel_is_refused(tmp_path):
    _refused(_validate(tmp_path, GRASP, ("    opening: 0.022\n", "    opening: 0.018\n")), "inside the gel")


@pytest.mark.parametrize("scene,old,new,want", [
    (SF, "velocity: [0.02, 0, -0.03,", "velocity: [0.02, .nan, -0.03,",
     "task.motion.velocity[1]: Input should be a finite number (given: nan)"),
    (GRASP, "      - {t: 0.015, position: [0.03, 0.03, 0.0175]", "      - {t: 0.015, position: [0.03, .nan, 0.0175]",
     "task.motion.keyframes[1].position[1]: Input should be a finite number (given: nan)"),
    (GRASP, "opening: 0.0188}\n      - {t: 0.047", "opening: .inf}\n      - {t: 0.047",
     "task.motion.keyframes[1].opening: Input should be a finite number (given: inf)"),
], ids=["velocity", "keyframe-position", "keyframe-opening"])
def test_scene_nan_in_controls(tmp_path, scene, old, new, want):
    _refused(_validate(tmp_path, scene, (old, new)), want)


def test_scene_degenerate_sensor_mesh_names_the_thickness(tmp_path):
    _refused(_validate(tmp_path, SYSID, ("    thickness: 0.003", "    thickness: 1.0e-15")),
             "flat_pad: size (0.012, 0.012) m, thickness 1e-15 m, res (8, 8, 2) give an unusable mesh",
             "768 degenerate tet(s)", "tets 0 (")


def test_scene_object_mesh_that_is_not_closed(tmp_path):
    box = trimesh.creation.box((0.004, 0.004, 0.004))
    trimesh.Trimesh(box.vertices, box.faces[:-2], process=False).export(tmp_path / "open_box.obj")
    _refused(_validate(tmp_path, SF, (
        "  object: {name: ground, shape: waves, amplitude: 5.0e-4, wavelength: [0.008, 0]}",
        f"  object: {{name: cube, shape: mesh, path: {tmp_path / 'open_box.obj'}, position: [-0.004, 0, -0.0021]}}")),
        "task.object.path", "open_box.obj", "closed")


# ============================================================================== failed runs


SMALL_RUN = (("  steps: 30", "  steps: 10"), ("  outputs: {frames: 15}", "  outputs: {frames: 0}"),
             ("iterations: 25}", "iterations: 5, checkpoint_every: 1}"))


def test_nonfinite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN at iteration 2 (patched in: the total times NaN): ``optimize`` stops with
    the driver's message (exit 1, no traceback) and checkpoints/trajectory.pt still holds the
    finite parameters after 2 iterations."""
    from diffworld.tasks.tactile.objectives import TrajectoryProblem

    real = TrajectoryProblem.loss_fn
    seen = {}

    def loss_fn(self, iteration):
        total, terms = real(self, iteration)
        seen[iteration] = self.velocity.detach().clone()
        return (total * float("nan") if iteration == 2 else total), terms

    monkeypatch.setattr(TrajectoryProblem, "loss_fn", loss_fn)
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", str(_scene(tmp_path, SF, *SMALL_RUN)), "--out", str(out),
                                 "--no-progress"])
    text = result.output
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, text[-1500:])
    assert "Traceback" not in text
    ckpt = out / "checkpoints" / "trajectory.pt"
    assert ("error: non-finite total loss at stage 'trajectory', iteration 2; the optimizer did not step; last good "
            f"checkpoint: {ckpt} (after 2 iterations; resume=True continues from it)") in text, text[-1500:]
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2 and not state["done"]
    (name, value), = state["params"].items()
    assert torch.isfinite(value).all() and torch.equal(value.to(seen[2]), seen[2])  # the state before iteration 2
    assert not (out / "metrics.json").exists()


def test_fem_simulation_error_during_a_run_is_a_message(tmp_path, monkeypatch):
    """The FEM state turns non-finite at iteration 1 (patched in: the rollout's own check on a NaN
    state): the run must stop with that message, not a traceback."""
    from diffworld.tasks.tactile.objectives import TrajectoryProblem

    real = TrajectoryProblem.loss_fn

    def loss_fn(self, iteration):
        if iteration == 1:
            x = self.scene.model.rest_state().x.clone()
            x[5, 2] = float("nan")
            fem.check_state(fem.State(x, torch.zeros_like(x)), 12, self.scene.dt)
        return real(self, iteration)

    monkeypatch.setattr(TrajectoryProblem, "loss_fn", loss_fn)
    result = runner.invoke(app, ["optimize", str(_scene(tmp_path, SF, *SMALL_RUN)), "--out", str(tmp_path / "run"),
                                 "--no-progress"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    assert "error: non-finite x of node 5 after step 12" in result.output
