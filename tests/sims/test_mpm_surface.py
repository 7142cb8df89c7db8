"""Liquid surfaces for the pictures of mpm runs (diffworld.sims.mpm.surface and the task's drawer):
the surface of a block at rest density encloses about the block's volume, colours blend between
two liquids, drops stay points, degenerate inputs give empty meshes, and failures fall back to
particles without stopping a run."""

import numpy as np
import pytest
import torch

from diffworld.sims.mpm.bodies import fill_shape
from diffworld.geometry.mesh_ops import mesh_report, mesh_volume
from diffworld.geometry.sdf import Box
from diffworld.sims.mpm.surface import liquid_surface

torch.set_num_threads(1)

DX = 0.02
LOWER = (0.0, 0.0, 0.0)
SHAPE = (21, 21, 21)
RED, BLUE = np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.2, 0.9])


def _block(center, half, ppc=8):
    x = fill_shape(Box(half, center).double(), LOWER, [0.4] * 3, DX / ppc ** (1.0 / 3.0))
    return x, torch.full((x.shape[0],), DX ** 3 / ppc, dtype=torch.float64)


def _mesh_volume(v, f):
    return float(mesh_volume(torch.as_tensor(v, dtype=torch.float64), torch.as_tensor(f)))


def test_block_at_rest_density_gives_a_closed_surface_of_its_volume():
    half = (0.06, 0.05, 0.04)
    x, vol = _block((0.2, 0.2, 0.2), half)
    s = liquid_surface(x, vol, torch.zeros(len(x), dtype=torch.int64), RED[None], LOWER, DX, SHAPE)
    assert s.faces.shape[0] > 100 and s.vertices.shape[1] == 3
    # inside the block grown by a cell, outward oriented, about the block's volume
    lo, hi = np.array([0.2 - h for h in half]), np.array([0.2 + h for h in half])
    assert np.all(s.vertices > lo - DX) and np.all(s.vertices < hi + DX)
    volume = _mesh_volume(s.vertices, s.faces)
    assert abs(volume / float(vol.sum()) - 1.0) < 0.2, volume / float(vol.sum())
    # every edge is shared by two faces (closed)
    assert mesh_report(torch.as_tensor(s.vertices, dtype=torch.float64), torch.as_tensor(s.faces)).watertight
    assert np.allclose(s.colors, RED) and s.covered.all()


def test_two_liquids_blend_colors_and_drops_stay_points():
    xa, va = _block((0.16, 0.2, 0.2), (0.04, 0.05, 0.04))
    xb, vb = _block((0.24, 0.2, 0.2), (0.04, 0.05, 0.04))
    drop = torch.tensor([[0.2, 0.2, 0.33]], dtype=torch.float64)  # one particle well above
    x = torch.cat([xa, xb, drop])
    vol = torch.cat([va, vb, va[:1]])
    group = torch.cat([torch.zeros(len(xa)), torch.ones(len(xb)), torch.ones(1)]).long()
    s = liquid_surface(x.float(), vol.float(), group, np.stack([RED, BLUE]), LOWER, DX, SHAPE)
    left, right = s.vertices[:, 0] < 0.14, s.vertices[:, 0] > 0.26
    middle = np.abs(s.vertices[:, 0] - 0.2) < 0.005
    assert np.allclose(s.colors[left], RED, atol=0.02) and np.allclose(s.colors[right], BLUE, atol=0.02)
    blend = s.colors[middle]
    assert len(blend) and np.all(np.abs(blend - (RED + BLUE) / 2).max(1) < 0.2)
    assert np.all(s.vertices[:, 2] < 0.3)  # no surface around the drop
    assert s.covered[:-1].all() and not s.covered[-1]


def test_degenerate_inputs_give_empty_meshes():
    one = torch.full((1, 3), 0.2, dtype=torch.float64)
    s = liquid_surface(one, torch.full((1,), DX ** 3 / 8), torch.zeros(1, dtype=torch.int64), RED[None], LOWER, DX,
                       SHAPE)
    assert s.vertices.shape == (0, 3) and s.faces.shape == (0, 3) and not s.covered.any()
    s = liquid_surface(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.int64), RED[None], LOWER, DX,
                       SHAPE)
    assert s.faces.shape == (0, 3) and s.covered.shape == (0,)
    with pytest.raises(ValueError, match="'level'"):
        liquid_surface(one, torch.ones(1), torch.zeros(1, dtype=torch.int64), RED[None], LOWER, DX, SHAPE, level=1.0)
    with pytest.raises(ValueError, match="'group'"):
        liquid_surface(one, torch.ones(1), torch.ones(1, dtype=torch.int64), RED[None], LOWER, DX, SHAPE)


SCENE = """
version: 1
name: tiny_liquids
seed: 0
runtime: {device: cpu, dtype: float32}
task:
  type: mpm
  domain: {lower: [0, 0, 0], upper: [0.4, 0.4, 0.4], resolution: 16, wall: slip}
  dt: 2.0e-3
  substeps: 2
  steps: 2
  bodies:
    - name: water
      shape: {type: box, center: [0.2, 0.2, 0.12], half_extents: [0.08, 0.08, 0.05]}
      material: {name: water, E: 2.0e4}
      ppc: 8
    - name: cube
      shape: {type: box, center: [0.2, 0.2, 0.25], half_extents: [0.03, 0.03, 0.03]}
      material: {name: jelly, E: 2.0e4}
      ppc: 8
  colliders:
    - {name: stick, shape: sphere, size: [0.03, 0, 0], motion: {type: velocities, position: [0.1, 0.1, 0.3]}}
  objective:
    type: trajectory
    controlled: [stick]
    losses:
      - {type: com, body: cube, target: [0.2, 0.2, 0.2]}
  outputs: {frames: 2, liquid_surface: OPTION}
optimizer: {name: adam, lr: 0.01, iterations: 1}
"""


def _outputs(tmp_path, option, monkeypatch=None):
    from diffworld.app.scenes import load_scene
    from diffworld.tasks.mpm.build import MPMScene as _Scene
    from diffworld.tasks.mpm.objectives import TrajectoryProblem
    from diffworld.tasks.mpm.outputs import write_outputs as _write_outputs

    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "scene.yaml"
    p.write_text(SCENE.replace("OPTION", option))
    cfg = load_scene(p)
    sim = _Scene(cfg.task, torch.float32, torch.device("cpu"), 0)
    prob = TrajectoryProblem(sim, cfg.task.objective)
    with torch.no_grad():
        out = sim.simulate(prob.control())
        return _write_outputs(sim, out, out, tmp_path, cfg.task, prob.control())


def test_run_outputs_draw_liquid_surfaces_and_fall_back_on_failure(tmp_path, monkeypatch):
    import diffworld.sims.mpm.surface as surface

    report = _outputs(tmp_path, "true")
    assert report == {"enabled": True, "frames": 4, "with_surface": 4, "fallback": 0, "error": None}
    assert (tmp_path / "after.png").is_file() and (tmp_path / "rollout.gif").is_file()
    assert _outputs(tmp_path / "off", "false")["enabled"] is False

    def broken(*args, **kwargs):
        raise RuntimeError("no surface today")

    monkeypatch.setattr(surface, "liquid_surface", broken)
    with pytest.warns(RuntimeWarning, match="no surface today"):
        report = _outputs(tmp_path / "broken", "true")
    assert report["fallback"] == 4 and report["with_surface"] == 0 and "no surface today" in report["error"]
    assert (tmp_path / "broken" / "after.png").is_file()
