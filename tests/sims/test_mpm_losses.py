"""MPM losses (diffworld.sims.mpm.losses) and the trajectory optimization aids of the mpm task:
gradients vs float64 central finite differences on random directions, mass conservation of the
grid splat, shape matching at and away from the target, the growing horizon's schedule,
freeze_steps, user losses from Python, and config errors that name the key."""

import textwrap

import numpy as np
import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.app.scenes import SceneError, load_scene
from diffworld.geometry.sdf import Box, Sphere
from diffworld.sims.mpm import losses as L

torch.set_num_threads(1)

LOWER = (0.0, 0.0, 0.0)
DX = 0.05
SHAPE = (21, 21, 21)


def _points(n=120, seed=0, lo=0.3, hi=0.7):
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, generator=gen, dtype=torch.float64)


def _assert_fd(fn, inputs, tol=1e-6, eps=1e-6, n_dirs=3):
    checks = directional_check(fn, inputs, eps=eps, n_dirs=n_dirs)
    worst = max(c.rel_error for c in checks)
    assert all(abs(c.numeric) > 1e-9 for c in checks), checks  # a real derivative, not 0 == 0
    assert worst < tol, checks
    return worst


# --- grid density -------------------------------------------------------------------------------

def test_grid_density_conserves_mass_exactly_inside_the_grid():
    x = _points(500)
    m = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = L.grid_density(x, m, LOWER, DX, SHAPE)
    assert g.shape == SHAPE and g.dtype == torch.float64
    assert abs(float(g.sum() - m.sum())) <= 1e-12 * float(m.sum())
    assert float(g.min()) >= 0.0
    # float32 as well (to rounding), and a scalar mass
    g32 = L.grid_density(x.float(), 0.5, LOWER, DX, SHAPE)
    assert g32.dtype == torch.float32 and abs(float(g32.sum()) - 250.0) < 1e-3


def test_grid_density_mass_centre_matches_particles():
    # Quadratic B-splines reproduce linear functions: the grid's first moment is the particles'.
    x = _points(50, seed=3)
    m = torch.rand(50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = L.grid_density(x, m, LOWER, DX, SHAPE)
    axes = [DX * torch.arange(n, dtype=torch.float64) for n in SHAPE]
    nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    moment = (g[..., None] * nodes).reshape(-1, 3).sum(0)
    torch.testing.assert_close(moment, (m[:, None] * x).sum(0), rtol=1e-12, atol=1e-12)


def test_grid_density_drops_mass_outside_and_empty_input_is_connected():
    x = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)  # on the first node: part of its stencil is outside
    assert float(L.grid_density(x, 1.0, LOWER, DX, SHAPE).sum()) < 1.0
    empty = torch.zeros((0, 3), dtype=torch.float64, requires_grad=True)
    g = L.grid_density(empty, torch.zeros(0, dtype=torch.float64), LOWER, DX, SHAPE)
    assert g.shape == SHAPE and float(g.detach().abs().sum()) == 0.0 and g.requires_grad
    with pytest.raises(ValueError, match="'x' of shape"):
        L.grid_density(torch.zeros(4, 2, dtype=torch.float64), 1.0, LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="'mass' of shape"):
        L.grid_density(_points(4), torch.ones(3, dtype=torch.float64), LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="'dx'"):
        L.grid_density(_points(4), 1.0, LOWER, -1.0, SHAPE)


def test_grid_density_gradient_matches_finite_differences():
    x = _points(60).requires_grad_()
    m = torch.rand(60, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _assert_fd(lambda x, m: (L.grid_density(x, m, LOWER, DX, SHAPE) * w).sum(), [x, m])


# --- shape matching ------------------------------------------------------------------------------

def _target(shape=None, mass=2.0, ppc=8):
    shape = shape or Box((0.1, 0.1, 0.08), (0.5, 0.5, 0.3))
    return L.target_grids(shape, mass, LOWER, DX, SHAPE, ppc=ppc, dtype=torch.float64)


def test_target_grids_hold_the_mass_and_the_sdf():
    t = _target()
    assert t.density.shape == SHAPE and t.sdf.shape == SHAPE
    assert abs(float(t.density.sum()) - 2.0) < 1e-12
    # node (10, 10, 6) = (0.5, 0.5, 0.3) is the box centre: 0.08 inside
    assert abs(float(t.sdf[10, 10, 6]) + 0.08) < 1e-6  # (the Box stores float32 parameters)
    assert t.points.shape == (8 * 8 * 6, 3)  # lattice of spacing dx / 2 inside the box
    with pytest.raises(ValueError, match="no sample point"):
        L.target_grids(Sphere(0.1, (5.0, 5.0, 5.0)), 1.0, LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="total_mass"):
        L.target_grids(Sphere(0.1, (0.5, 0.5, 0.5)), 0.0, LOWER, DX, SHAPE)


def test_shape_matching_is_zero_at_the_target_and_large_when_displaced():
    t = _target()
    m = 2.0 / t.points.shape[0]
    at = L.shape_matching_loss(t.points, m, t.density, t.sdf, LOWER, DX)
    assert float(at.density) < 1e-12
    # the SDF term has a small floor: the B-spline spreads mass up to 1.5 cells outside the surface
    assert float(at.sdf) < 0.1
    for shift in (0.5 * DX, 2 * DX):
        off = L.shape_matching_loss(t.points + torch.tensor([shift, 0, 0], dtype=torch.float64), m, t.density,
                                    t.sdf, LOWER, DX)
        assert float(off.density) > 0.2 and float(off.loss) > 5 * float(at.loss)
    far = L.shape_matching_loss(t.points + torch.tensor([0.35, 0.35, 0.0], dtype=torch.float64), m,
                                t.density, t.sdf, LOWER, DX)
    assert abs(float(far.density) - 2.0) < 1e-9  # no overlap: L1 mismatch is 2
    assert float(far.sdf) > float(off.sdf)
    # particles of another sampling (Poisson) of the same shape and mass: far below a displaced body
    from diffworld.sims.mpm.bodies import fill_shape

    pts = fill_shape(Box((0.1, 0.1, 0.08), (0.5, 0.5, 0.3)).double(), (0.38, 0.38, 0.2), (0.62, 0.62, 0.4), DX / 2,
                     "poisson", seed=3)
    pois = L.shape_matching_loss(pts, 2.0 / pts.shape[0], t.density, t.sdf, LOWER, DX)
    assert float(pois.loss) < 0.3 * float(off.loss)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_shape_matching_gradient_matches_finite_differences(norm):
    t = _target(Sphere(0.12, (0.5, 0.5, 0.5)))
    x = (_points(150, lo=0.36, hi=0.66)).requires_grad_()
    mass = torch.full((150,), 2.0 / 150, dtype=torch.float64)

    def f(x):
        return L.shape_matching_loss(x, mass, t.density, t.sdf, LOWER, DX, density_weight=1.0, sdf_weight=0.7,
                                     norm=norm).loss

    _assert_fd(f, [x])


def test_shape_matching_errors():
    t = _target()
    with pytest.raises(ValueError, match="norm"):
        L.shape_matching_loss(t.points, 1.0, t.density, t.sdf, LOWER, DX, norm="l3")
    with pytest.raises(ValueError, match="'target_sdf' of shape"):
        L.shape_matching_loss(t.points, 1.0, t.density, t.sdf[:-1], LOWER, DX)
    with pytest.raises(ValueError, match="sdf_weight"):
        L.shape_matching_loss(t.points, 1.0, t.density, t.sdf, LOWER, DX, sdf_weight=-1.0)


# --- trajectory, Chamfer, the simple terms ---------------------------------------------------------

def test_trajectory_loss_value_gradient_and_shape_errors():
    xs = torch.randn(4, 30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tg = torch.randn(4, 30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = ((xs - tg) ** 2).sum(-1).mean()
    assert abs(float(L.trajectory_loss(list(xs), tg) - want)) < 1e-14
    _assert_fd(lambda a: L.trajectory_loss(a, tg), [xs.clone().requires_grad_()])
    with pytest.raises(ValueError, match=r"shape of 'xs' \(4, 30, 3\).*\(3, 30, 3\)"):
        L.trajectory_loss(xs, tg[:3])


def test_chamfer_matches_dense_reference_and_finite_differences():
    a = _points(70, seed=1).requires_grad_()
    b = _points(50, seed=2).requires_grad_()
    d = torch.cdist(a, b) ** 2
    dense = d.min(1).values.mean() + d.min(0).values.mean()
    ours = L.chamfer_distance(a, b)
    assert abs(float(ours.detach() - dense.detach())) < 1e-14
    ga = torch.autograd.grad(ours, [a, b])
    gd = torch.autograd.grad(dense, [a, b])
    for u, v in zip(ga, gd):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    _assert_fd(lambda a, b: L.chamfer_distance(a, b), [a, b])
    with pytest.raises(ValueError, match="at least one point"):
        L.chamfer_distance(a, b[:0])


def test_com_region_shape_terms_gradients():
    x = _points(40, seed=4).requires_grad_()
    _assert_fd(lambda x: L.com_loss(x, (0.2, 0.6, 0.4)), [x])
    _assert_fd(lambda x: L.com_loss(x, (0.2, 0.6, 0.4), axes=[0, 1]), [x])
    c = x.detach().mean(0)
    assert abs(float(L.com_loss(x.detach(), (0.2, 0.6, 0.4), axes=[2])) - float((c[2] - 0.4) ** 2)) < 1e-15
    with pytest.raises(ValueError, match="'axes'"):
        L.com_loss(x, (0.2, 0.6, 0.4), axes=[3])
    _assert_fd(lambda x: L.region_loss(x, (0.4, 0.4, 0.4), (0.6, 0.7, 0.6), DX), [x])
    sdf = Sphere(0.1, (0.5, 0.5, 0.5)).double()
    pts = _points(30, seed=5, lo=0.45, hi=0.55)
    _assert_fd(lambda x: L.shape_cover_loss(x, sdf, pts), [x])


# --- mixing ---------------------------------------------------------------------------------------

def test_mixing_loss_is_one_segregated_and_zero_mixed():
    a = _points(200, seed=6, lo=0.2, hi=0.35)
    far = a + torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64)  # stencils never share a node
    for norm in ("l2", "l1"):
        seg = L.mixing_loss(a, 1.0, far, 1.0, LOWER, DX, SHAPE, norm=norm)
        assert abs(float(seg) - 1.0) < 1e-5, (norm, float(seg))  # l2: regularized quotient
        # B is a copy of A: every node holds both in the ratio 1:1
        assert float(L.mixing_loss(a, 1.0, a.clone(), 1.0, LOWER, DX, SHAPE, norm=norm)) < 1e-12
        # 1:3 by mass, segregated: still 1 (normalized by phi* (1 - phi*)); the same places: 0
        m = torch.full((200,), 3.0, dtype=torch.float64)
        assert abs(float(L.mixing_loss(a, 1.0, far, m, LOWER, DX, SHAPE, norm=norm)) - 1.0) < 1e-5
        assert float(L.mixing_loss(a, 1.0, a.clone(), m, LOWER, DX, SHAPE, norm=norm)) < 1e-12
        # an explicit target away from the overall share: the copies are no longer "mixed"
        assert float(L.mixing_loss(a, 1.0, a.clone(), 1.0, LOWER, DX, SHAPE, norm=norm, target=0.25)) > 0.1
    # half-overlapping bodies lie in between, and float32 agrees with float64
    half = a + torch.tensor([0.075, 0.0, 0.0], dtype=torch.float64)
    mid = L.mixing_loss(a, 1.0, half, 1.0, LOWER, DX, SHAPE)
    assert 0.2 < float(mid) < 0.9
    assert abs(float(L.mixing_loss(a.float(), 1.0, half.float(), 1.0, LOWER, DX, SHAPE)) - float(mid)) < 1e-5


@pytest.mark.parametrize("norm,target", [("l2", None), ("l1", None), ("l2", 0.3)])
def test_mixing_loss_gradient_matches_finite_differences(norm, target):
    a = _points(60, seed=7, lo=0.3, hi=0.55).requires_grad_()
    b = _points(50, seed=8, lo=0.4, hi=0.65).requires_grad_()
    ma = (0.5 + torch.rand(60, generator=torch.Generator().manual_seed(9), dtype=torch.float64)).requires_grad_()
    mb = (0.5 + torch.rand(50, generator=torch.Generator().manual_seed(10), dtype=torch.float64)).requires_grad_()
    worst = _assert_fd(lambda a, ma, b, mb: L.mixing_loss(a, ma, b, mb, LOWER, DX, SHAPE, norm=norm, target=target),
                       [a, ma, b, mb], tol=1e-7)
    print(f"mixing_loss {norm} target={target}: worst relative error vs central FD {worst:.2e}")


def test_mixing_loss_errors():
    a = _points(10)
    with pytest.raises(ValueError, match="two non-empty bodies"):
        L.mixing_loss(a, 1.0, a[:0], 1.0, LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="'norm'"):
        L.mixing_loss(a, 1.0, a, 1.0, LOWER, DX, SHAPE, norm="l3")
    with pytest.raises(ValueError, match="'target'"):
        L.mixing_loss(a, 1.0, a, 1.0, LOWER, DX, SHAPE, target=1.0)
    with pytest.raises(ValueError, match="positive mass"):
        L.mixing_loss(a, 0.0, a, 1.0, LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="'x_b' of shape"):
        L.mixing_loss(a, 1.0, a[:, :2], 1.0, LOWER, DX, SHAPE)


# --- the horizon schedule --------------------------------------------------------------------------

def test_horizon_schedule_grows_when_progress_stalls():
    from diffworld.tasks.mpm.objectives import HorizonSchedule

    s = HorizonSchedule(initial=2, grow=3, patience=2, tolerance=0.1, total=9)
    losses = [10.0, 8.0, 6.0,     # -25 % over 2 iterations: keep h = 2
              5.9,                # 6.0 -> 5.9 vs 8.0 -> 5.9: -26 %: keep
              5.8,                # 6.0 -> 5.8: -3 % < 10 %: grow to 5 (comparison restarts)
              20.0, 15.0,         # only 2 losses at h = 5: no decision
              14.0,               # 20 -> 14: -30 %: keep
              13.9,               # 15 -> 13.9: -7 %: grow to 8
              30.0, 30.0, 29.9,   # 30 -> 29.9: stall: grow to 9 (= total, clipped)
              29.0, 29.0, 29.0]   # at the total: stays
    got = [s.update(v) for v in losses]
    assert got == [2, 2, 2, 2, 5, 5, 5, 5, 8, 8, 8, 9, 9, 9, 9]
    assert s.history == [2] + got[:-1]
    # tolerance 0: the horizon grows only when the loss rises
    s = HorizonSchedule(initial=1, grow=1, patience=1, tolerance=0.0, total=3)
    assert [s.update(v) for v in (1.0, 2.0, 1.0, 0.5, 0.5, 0.6)] == [1, 2, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="HorizonSchedule.patience"):
        HorizonSchedule(1, 1, 0, 0.1, 3)
    with pytest.raises(ValueError, match="HorizonSchedule.tolerance"):
        HorizonSchedule(1, 1, 1, -0.1, 3)


# --- scene-level pieces: a tiny scene -------------------------------------------------------------

TINY = """
version: 1
name: tiny
seed: 0
runtime: {{device: cpu, dtype: {dtype}}}
task:
  type: mpm
  domain: {{lower: [0, 0, 0], upper: [0.6, 0.6, 0.6], resolution: 12, wall: slip}}
  dt: 2.0e-3
  substeps: 4
  steps: 5
  window: 4
  bodies:
    - name: dough
      shape: {{type: box, center: [0.3, 0.3, 0.2], half_extents: [0.05, 0.05, 0.05]}}
      material: {{name: jelly, E: 2.0e3, nu: 0.3}}
      ppc: 8
  colliders:
    - name: pusher
      shape: sphere
      size: [0.05, 0, 0]
      friction: 0.3
      softness: 100
      motion: {{type: velocities, position: [0.187, 0.31, 0.213], velocity: [0.3, 0, 0, 0, 0, 0]}}
  objective:
    type: trajectory
    controlled: [pusher]
    max_speed: 2.0
{extra}    losses:
{losses}
optimizer: {{name: adam, lr: 0.05, iterations: 2}}
"""

DENSITY = ("      - {type: density, body: dough, "
           "shape: {type: box, center: [0.34, 0.3, 0.2], half_extents: [0.05, 0.05, 0.05]}}")


def _write(tmp_path, losses=DENSITY, extra="", dtype="float64", name="scene.yaml"):
    p = tmp_path / name
    p.write_text(TINY.format(losses=losses, extra=extra, dtype=dtype))
    return p


def _problem(path):
    from diffworld.tasks.mpm.build import MPMScene as _Scene
    from diffworld.tasks.mpm.objectives import TrajectoryProblem

    scene = load_scene(path)
    dtype = torch.float64 if scene.runtime.dtype == "float64" else torch.float32
    sim = _Scene(scene.task, dtype, torch.device("cpu"), scene.seed)
    return sim, TrajectoryProblem(sim, scene.task.objective)


def test_scene_density_and_chamfer_losses_directional_derivative_vs_fd(tmp_path):
    """Rollout-level: d(loss)/d(actions) of the density + chamfer terms vs float64 FD."""
    losses = DENSITY + ("\n      - {type: chamfer, body: dough, weight: 100, "
                        "shape: {type: sphere, center: [0.33, 0.3, 0.2], radius: 0.06}}")
    sim, prob = _problem(_write(tmp_path, losses))
    vel = prob.velocities["pusher"]

    def f(v):
        out = sim.simulate(sim.control({"pusher": v}))
        return prob.losses(out.states)[0]

    _assert_fd(f, [vel.detach().clone().requires_grad_()], tol=1e-6, eps=1e-5, n_dirs=2)


def test_freeze_steps_zeroes_their_gradients_and_keeps_their_values(tmp_path):
    sim, prob = _problem(_write(tmp_path, extra="    freeze_steps: 2\n"))
    vel = prob.velocities["pusher"]
    loss, terms = prob.loss_fn(0)
    loss.backward()
    assert torch.all(vel.grad[:2] == 0)
    assert float(vel.grad[2:].abs().max()) > 0
    # a step of an optimizer with weight decay would move them: the projection puts them back
    start = vel.detach().clone()
    opt = torch.optim.AdamW([vel], lr=0.1, weight_decay=0.5)
    opt.step()
    with torch.no_grad():
        prob.project()
    assert torch.equal(vel[:2].detach(), start[:2]) and not torch.equal(vel[2:].detach(), start[2:])


def test_action_clipping_applies_to_the_initial_guess(tmp_path):
    p = _write(tmp_path, extra="    freeze_steps: 0\n")
    p.write_text(p.read_text().replace("max_speed: 2.0", "max_speed: 0.1"))
    _, prob = _problem(p)
    speeds = prob.velocities["pusher"][:, :3].detach().norm(dim=1)
    assert torch.allclose(speeds, torch.full_like(speeds, 0.1))


def test_dofs_optimize_only_the_listed_components(tmp_path):
    p = _write(tmp_path, extra="    dofs: {pusher: [vy, vz]}\n")
    p.write_text(p.read_text().replace("max_speed: 2.0", "max_speed: 0.5"))
    sim, prob = _problem(p)
    vel = prob.velocities["pusher"]
    loss, _ = prob.loss_fn(0)
    loss.backward()
    assert torch.all(vel.grad[:, [0, 3, 4, 5]] == 0) and float(vel.grad[:, 1:3].abs().max()) > 0
    start = vel.detach().clone()
    opt = torch.optim.AdamW([vel], lr=1.0, weight_decay=0.5)  # moves every component, and far
    with torch.no_grad():
        vel.grad[:, 1:3] = -1.0
    opt.step()
    with torch.no_grad():
        prob.project()
    v = vel.detach()
    assert torch.equal(v[:, [0, 3, 4, 5]], start[:, [0, 3, 4, 5]])  # fixed: vx = 0.3 kept
    # clipping scaled only vy, vz: the speed is at the bound and vx is untouched
    assert torch.allclose(v[:, :3].norm(dim=1), torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.all(v[:, 1:3] > 0)


def test_workspace_keeps_the_collider_inside_its_box(tmp_path):
    box = "    workspace: {pusher: {lower: [0.15, 0.28, 0.2], upper: [0.25, 0.4, 0.3]}}\n"
    sim, prob = _problem(_write(tmp_path, extra=box))
    vel = prob.velocities["pusher"]
    T = 4 * 2.0e-3  # substeps * dt of a control step
    start = torch.tensor([0.187, 0.31, 0.213], dtype=torch.float64)

    def positions(v):
        return start + T * torch.cumsum(v[:, :3].detach(), 0)

    # the initial guess (0.3 m/s along x for 5 steps: +0.012 m) fits: unchanged
    assert torch.allclose(vel.detach()[:, 0], torch.full((5,), 0.3, dtype=torch.float64))
    with torch.no_grad():  # an update that would carry it far out in x and y
        vel[:, 0] = 2.0
        vel[:, 1] = -2.0
        prob.project()
    p = positions(vel)
    lo = torch.tensor([0.15, 0.28, 0.2], dtype=torch.float64)
    hi = torch.tensor([0.25, 0.4, 0.3], dtype=torch.float64)
    assert torch.all(p >= lo - 1e-12) and torch.all(p <= hi + 1e-12)
    # clipped to 2 m/s along (1, -1), then stopped at the face y = 0.28: the step that reaches it is
    # scaled as a whole (direction kept) and the later ones are zero
    assert abs(float(p[-1, 1]) - 0.28) < 1e-12 and float(p[-1, 0]) < 0.25
    assert torch.allclose(vel.detach()[:, 0], -vel.detach()[:, 1]) and float(vel.detach()[-1, :3].abs().max()) == 0.0
    # the control that the simulation gets follows the same positions
    c = sim.control({"pusher": vel.detach()})
    assert torch.allclose(c[4 * 5 - 1, 0, :3].double(), p[-1] - T / 4 * vel.detach()[-1, :3], atol=1e-12)


def test_mixing_term_in_a_scene_and_its_rollout_derivative_vs_fd(tmp_path):
    milk = ("    - name: milk\n"
            "      shape: {type: box, center: [0.41, 0.3, 0.2], half_extents: [0.05, 0.05, 0.05]}\n"
            "      material: {name: viscous, E: 2.0e3, nu: 0.3, viscosity: 1.0}\n"
            "      ppc: 8\n")
    p = _write(tmp_path, "      - {type: mixing, bodies: [dough, milk]}\n      - {type: mixing, bodies: [milk, dough], "
                         "norm: l1, target: 0.4}")
    p.write_text(p.read_text().replace("  colliders:\n", milk + "  colliders:\n", 1))
    sim, prob = _problem(p)
    total, terms = prob.loss_fn(0)
    assert set(terms) == {"mixing_dough_milk", "mixing_milk_dough"}
    out = sim.simulate(prob.control())
    x, m, g = out.final.x.detach(), sim.masses(), sim.grid
    a, b = sim.mask("dough"), sim.mask("milk")
    want = L.mixing_loss(x[a], m[a], x[b], m[b], g.lower, g.dx, g.shape)
    assert abs(float(terms["mixing_dough_milk"]) - float(want)) < 1e-12 and 0.5 < float(want) <= 1.0
    vel = prob.velocities["pusher"]

    def f(v):
        return prob.losses(sim.simulate(sim.control({"pusher": v})).states)[0]

    _assert_fd(f, [vel.detach().clone().requires_grad_()], tol=1e-6, eps=1e-5, n_dirs=2)


def test_horizon_simulates_only_the_horizon(tmp_path):
    sim, prob = _problem(_write(tmp_path, extra="    horizon: {initial: 2, grow: 2, patience: 1, tolerance: 0.5}\n"))
    assert prob.horizon == 2
    out, total, _ = prob.evaluate(prob.horizon)
    assert out.substeps[-1] == 2 * 4 and len(out.states) == 3
    loss, terms = prob.loss_fn(0)
    assert terms["horizon"] == 2.0
    loss.backward()
    g = prob.velocities["pusher"].grad
    assert float(g[:2].abs().max()) > 0 and torch.all(g[2:] == 0)  # later actions do not act within the horizon
    for v in (1.0, 0.9):  # 10 % < 50 %: grows
        prob.callback(0, {"loss": v})
    assert prob.horizon == 4
    # --resume: the schedule is replayed from the losses in the driver checkpoint's history
    torch.save({"history": [{"loss": 1.0}, {"loss": 0.9}, {"loss": 0.8}]}, tmp_path / "ckpt.pt")
    _, fresh = _problem(tmp_path / "scene.yaml")
    fresh.replay(tmp_path / "ckpt.pt")
    assert fresh.horizon == 4 and fresh.schedule.history == [2, 2, 4]


def test_python_loss_from_a_module_in_tmp_path(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent("""
        import torch

        def height(states, info):
            x = states[-1].x[info.masks[info.body]]
            return info.options["scale"] * (x[:, 2] * info.mass[info.masks[info.body]]).sum()

        def not_a_tensor(states, info):
            return 1.0
    """))
    loss = "      - {type: python, function: 'my_losses.py:height', body: dough, options: {scale: 2.0}}"
    sim, prob = _problem(_write(tmp_path, loss))
    total, terms = prob.loss_fn(0)
    out = sim.simulate(prob.control())
    mask = sim.mask("dough")
    want = 2.0 * (out.final.x[mask][:, 2] * sim.masses()[mask]).sum()
    assert abs(float(total.detach()) - float(want.detach())) < 1e-12 and "python_height" in terms
    total.backward()
    assert float(prob.velocities["pusher"].grad.abs().max()) > 0
    # the module form, importable from sys.path
    monkeypatch.syspath_prepend(str(tmp_path))
    _, prob2 = _problem(_write(tmp_path, loss.replace("my_losses.py:height", "my_losses:height"), name="b.yaml"))
    assert abs(float(prob2.loss_fn(0)[0].detach()) - float(want.detach())) < 1e-12
    # a function that returns something else than a tensor: the error names the key
    _, prob3 = _problem(_write(tmp_path, loss.replace("height", "not_a_tensor"), name="c.yaml"))
    with pytest.raises(TypeError, match=r"task.objective.losses\[0\].*returned float"):
        prob3.loss_fn(0)


def test_target_trajectory_loss_and_its_shape_errors(tmp_path):
    sim, prob = _problem(_write(tmp_path))
    with torch.no_grad():
        out = sim.simulate(prob.control())
    xs = torch.stack([s.x for s in out.states[1:]]).numpy()
    np.savez(tmp_path / "traj.npz", x=xs + 0.01)
    loss = "      - {type: target_trajectory, body: dough, path: traj.npz}"
    sim, prob = _problem(_write(tmp_path, loss, name="t.yaml"))
    total, _ = prob.loss_fn(0)
    assert abs(float(total.detach()) - 3e-4) < 1e-12  # every particle 0.01 off on each axis
    # wrong particle count: named file and shapes, at build time
    np.savez(tmp_path / "few.npz", x=xs[:, :10])
    with pytest.raises(ValueError, match=r"task.objective.losses\[0\].path: .*few.npz holds 'x' of shape "
                                         r"\(5, 10, 3\); expected \(5, 64, 3\)"):
        _problem(_write(tmp_path, loss.replace("traj.npz", "few.npz"), name="u.yaml"))
    # wrong step count: at validation
    np.savez(tmp_path / "short.npz", x=xs[:3])
    with pytest.raises(SceneError, match=r"objective.losses\[0\].path: .*short.npz holds 'x' of shape \(3, 64, 3\)"):
        load_scene(_write(tmp_path, loss.replace("traj.npz", "short.npz"), name="v.yaml"))


@pytest.mark.parametrize("loss, extra, match", [
    ("      - {type: python, function: 'no_such_module_xyz:fn'}", "",
     r"task.objective.losses\[0\].function: .*cannot import module 'no_such_module_xyz'"),
    ("      - {type: python, function: 'missing.py:fn'}", "",
     r"task.objective.losses\[0\].function: .*file not found"),
    ("      - {type: python, function: 'math:pi'}", "", r"task.objective.losses\[0\].function: .*not callable"),
    ("      - {type: python, function: 'eval(1)'}", "", r"task.objective.losses\[0\].function: .*module.path:callable"),
    ("      - {type: density, body: dough, shape: {type: box}, norm: l3}", "", r"task.objective.losses\[0\].norm"),
    ("      - {type: density, body: dough}", "", r"task.objective.losses\[0\].shape: Field required"),
    ("      - {type: density, body: dough, shape: {type: box}, target: [0, 0, 0]}", "",
     r"task.objective.losses\[0\].target: unknown key"),
    ("      - {type: chamfer, body: bread, shape: {type: box}}", "",
     r"objective.losses\[0\].body: 'bread' is not a body"),
    ("      - {type: target_trajectory, body: dough, path: nowhere.npz}", "",
     r"task.objective.losses\[0\].path: .*file not found"),
    ("      - {type: com, body: dough}", "", r"task.objective.losses\[0\].target: Field required"),
    ("      - {type: warp, body: dough}", "", r"task.objective.losses\[0\]"),
    (DENSITY, "    horizon: {initial: 9, grow: 1}\n", r"objective.horizon.initial: 9 is more than task.steps \(5\)"),
    (DENSITY, "    horizon: {initial: 2, grow: 0}\n", r"task.objective.horizon.grow"),
    (DENSITY, "    horizon: {initial: 2, grow: 1, tolerance: -1}\n", r"task.objective.horizon.tolerance"),
    (DENSITY, "    freeze_steps: 5\n", r"objective.freeze_steps: 5 freezes every action"),
    (DENSITY, "    freeze_steps: -1\n", r"task.objective.freeze_steps"),
    ("      - {type: mixing, bodies: [dough, bread]}", "", r"objective.losses\[0\].bodies\[1\]: 'bread' is not a body"),
    ("      - {type: mixing, bodies: [dough, dough]}", "", r"task.objective.losses\[0\].bodies: .*two different"),
    ("      - {type: mixing, bodies: [dough]}", "", r"task.objective.losses\[0\].bodies"),
    ("      - {type: mixing, bodies: [dough, x], target: 1.5}", "", r"task.objective.losses\[0\].target"),
    (DENSITY, "    dofs: {spoon: [vx]}\n", r"objective.dofs: 'spoon' is not a controlled collider"),
    (DENSITY, "    dofs: {pusher: [vx, rx]}\n", r"task.objective.dofs.pusher.1"),
    (DENSITY, "    dofs: {pusher: []}\n", r"objective.dofs.pusher: expected at least one"),
    (DENSITY, "    workspace: {spoon: {lower: [0, 0, 0], upper: [1, 1, 1]}}\n",
     r"objective.workspace: 'spoon' is not a controlled collider"),
    (DENSITY, "    workspace: {pusher: {lower: [0.3, 0, 0], upper: [1, 1, 1]}}\n",
     r"objective.workspace.pusher: the collider starts at \[0.187, 0.31, 0.213\], outside"),
    (DENSITY, "    workspace: {pusher: {lower: [0, 0, 0], upper: [1, 0, 1]}}\n",
     r"task.objective.workspace.pusher: .*lower < upper"),
])
def test_bad_config_errors_name_the_key(tmp_path, loss, extra, match):
    with pytest.raises(SceneError, match=match):
        load_scene(_write(tmp_path, loss, extra))


# --- top-view pattern (latte art) ---------------------------------------------------------------

def _half_image():
    """8 x 8 image, bright in its left half: the pattern is x < middle of the rectangle."""
    img = np.zeros((8, 8))
    img[:, :4] = 1.0
    return img


def test_pattern_target_lays_the_image_on_the_rectangle():
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:2, :2] = 255  # top-left corner of the picture: low x, high y
    t = L.pattern_target(img, (0.2, 0.2), (0.8, 0.8), LOWER, DX, SHAPE, dtype=torch.float64)
    assert t.fraction.shape == SHAPE[:2] and abs(float(t.fraction.sum()) - 1.0) < 1e-12
    i, j = np.unravel_index(int(t.fraction.argmax()), SHAPE[:2])
    assert i * DX < 0.4 and j * DX > 0.6, (i * DX, j * DX)
    assert float(t.fraction[:4].sum()) == 0.0 and float(t.fraction[:, :4].sum()) == 0.0  # outside the rectangle
    assert float(t.distance[t.fraction > 0.5 * t.fraction.max()].max()) == 0.0
    with pytest.raises(ValueError, match="covers no grid node"):
        L.pattern_target(np.zeros((8, 8)), (0.2, 0.2), (0.8, 0.8), LOWER, DX, SHAPE)
    with pytest.raises(ValueError, match="lower < upper"):
        L.pattern_target(img, (0.8, 0.2), (0.2, 0.8), LOWER, DX, SHAPE)


def test_pattern_loss_on_and_off_the_pattern():
    t = L.pattern_target(_half_image(), (0.2, 0.2), (0.8, 0.8), LOWER, DX, SHAPE, dtype=torch.float64)
    on = t.fraction > 0
    # Particles on every pattern column with its mass fraction: the projection matches.
    cols = torch.nonzero(on).double() * DX
    x = torch.cat([cols, torch.full((cols.shape[0], 1), 0.5, dtype=torch.float64)], 1)
    r = L.pattern_loss(x, t.fraction[on], t, LOWER, DX)
    assert float(r.density) < 0.35 and float(r.sdf) < 0.05, r  # B-spline blur at the pattern's edges only
    # A compact cluster well to the right of the pattern (x = 0.7, the pattern ends near x = 0.5):
    # disjoint (density term 2) and about (0.7 - 0.5) / dx cells away.
    far = torch.tensor([[0.7, 0.5, 0.5]], dtype=torch.float64)
    r = L.pattern_loss(far, 1.0, t, LOWER, DX)
    edge = float((torch.nonzero(on)[:, 0].max()) * DX)
    assert abs(float(r.density) - 2.0) < 1e-12
    assert abs(float(r.sdf) - (0.7 - edge) / DX) < 0.6, (float(r.sdf), (0.7 - edge) / DX)
    # The distance term pulls the cluster towards the pattern (-x).
    far.requires_grad_()
    L.pattern_loss(far, 1.0, t, LOWER, DX).loss.backward()
    assert float(far.grad[0, 0]) > 0


def test_pattern_loss_gradient_matches_finite_differences():
    t = L.pattern_target(_half_image(), (0.2, 0.2), (0.8, 0.8), LOWER, DX, SHAPE, dtype=torch.float64)
    x = _points(80).requires_grad_()
    mass = (0.5 + torch.rand(80, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).requires_grad_()
    _assert_fd(lambda x, m: L.pattern_loss(x, m, t, LOWER, DX, distance_weight=0.3).loss, [x, mass])
