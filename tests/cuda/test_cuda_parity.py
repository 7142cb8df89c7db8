"""The CUDA paths give the CPU paths' numbers: meshes, gradients, rollouts and scenes.

Every differentiable op runs on both devices from the same inputs; outputs are compared after
putting them in a canonical order (CUDA compaction may order rows differently), and gradients
are compared through order-independent losses. Float64 must agree to round-off (CUDA sums with
atomics in a different order), float32 to a few ulps of the quantities involved. Float64 central
differences are also run on the device itself.

Skipped without a CUDA device that both torch and Warp see. ``DIFFWORLD_PARITY_DEVICE=cpu`` runs
the module CPU against CPU, which checks the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import warp as wp

from diffworld.engine.gradcheck import directional_check

DEV = torch.device(os.environ.get("DIFFWORLD_PARITY_DEVICE", "cuda"))
CPU = torch.device("cpu")
F64 = torch.float64

pytestmark = pytest.mark.skipif(
    DEV.type == "cuda" and not (torch.cuda.is_available() and wp.is_cuda_available()),
    reason="no CUDA device seen by both torch and Warp",
)

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def smooth_field(res: int, dtype=F64, seed: int = 0, r: float = 0.32) -> torch.Tensor:
    """A sphere with low-frequency noise on a (res+1)^3 node grid over [-0.5, 0.5]^3."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-0.5, 0.5, res + 1, dtype=F64)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    s = torch.sqrt(x * x + y * y + z * z) - r
    for _ in range(4):
        k = torch.randn(3, generator=g, dtype=F64) * 6
        ph = float(torch.rand(1, generator=g)) * 6.28
        s = s + 0.02 * torch.sin(k[0] * x + k[1] * y + k[2] * z + ph)
    return s.to(dtype)


def canonical_mesh(v: torch.Tensor, f: torch.Tensor, decimals: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices sorted lexicographically (keys rounded) and faces renumbered, rotated to start at
    their smallest index (orientation kept) and sorted: equal meshes give equal tensors."""
    v, f = v.detach().cpu().double(), f.detach().cpu()
    key = torch.round(v * 10 ** decimals)
    order = torch.arange(len(v))
    for a in (2, 1, 0):  # stable sorts, last key first
        order = order[torch.sort(key[order, a], stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(v))
    f = rank[f]
    k = f.argmin(dim=1, keepdim=True)
    f = torch.gather(f, 1, (k + torch.arange(f.shape[1])) % f.shape[1])
    for a in range(f.shape[1] - 1, -1, -1):
        f = f[torch.sort(f[:, a], stable=True).indices]
    return v[order], f


def assert_same_mesh(cpu_v, cpu_f, dev_v, dev_f, dtype):
    assert dev_v.device.type == DEV.type and dev_f.device.type == DEV.type
    assert cpu_v.shape == dev_v.shape and cpu_f.shape == dev_f.shape
    a_v, a_f = canonical_mesh(cpu_v, cpu_f)
    b_v, b_f = canonical_mesh(dev_v, dev_f)
    assert torch.equal(a_f, b_f)
    torch.testing.assert_close(b_v, a_v, **TOL[dtype])


def probe_loss(v: torch.Tensor) -> torch.Tensor:
    """An order-independent smooth function of the vertex positions."""
    return (torch.sin(3.0 * v[:, 0] + 1.0) * torch.cos(2.0 * v[:, 1]) + v[:, 2] ** 2).sum()


def leaf(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device).clone().requires_grad_(True)


def assert_close_grads(cpu: list[torch.Tensor], dev: list[torch.Tensor], dtype, names):
    for name, a, b in zip(names, cpu, dev):
        scale = float(a.abs().max()) or 1.0
        err = float((b.detach().cpu() - a).abs().max()) / scale
        bound = 1e-9 if dtype == F64 else 1e-3
        assert err < bound, (name, err)


# ---------------------------------------------------------------- marching cubes


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_marching_cubes_matches_cpu(dtype):
    from diffworld.geometry.marching_cubes import marching_cubes

    s = smooth_field(40, dtype)
    out = {}
    for dev in (CPU, DEV):
        x = leaf(s, dev)
        m = marching_cubes(x)
        probe_loss(m.vertices).backward()
        out[dev.type if dev != CPU else "cpu"] = (m, x.grad)
    (mc, gc), (md, gd) = out["cpu"], out[DEV.type]
    assert_same_mesh(mc.vertices, mc.faces, md.vertices, md.faces, dtype)
    assert_close_grads([gc], [gd], dtype, ["sdf"])


def test_marching_cubes_gradient_on_device_matches_finite_differences():
    from diffworld.geometry.marching_cubes import marching_cubes

    s = smooth_field(12).to(DEV).requires_grad_(True)
    for c in directional_check(lambda t: probe_loss(marching_cubes(t).vertices), [s], eps=1e-6):
        assert c.rel_error < 1e-6, c


def test_deepmesh_field_matches_cpu():
    from diffworld.geometry.marching_cubes import marching_cubes_field

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Softplus(beta=10), torch.nn.Linear(32, 1)).double()
    with torch.no_grad():
        net[2].bias.fill_(-0.15)
    grads = {}
    for dev in (CPU, DEV):
        n = net.to(dev)
        n.zero_grad()
        field = lambda p, n=n: n(p)[:, 0] + p.norm(dim=-1) - 0.25  # noqa: E731
        m = marching_cubes_field(field, 24, dtype=F64, device=dev)
        probe_loss(m.vertices).backward()
        grads[dev.type] = ([p.grad.detach().cpu().clone() for p in n.parameters()], m)
    (gc, mc), (gd, md) = grads["cpu"], grads[DEV.type]
    assert_same_mesh(mc.vertices, mc.faces, md.vertices, md.faces, F64)
    assert_close_grads(gc, gd, F64, ["w1", "b1", "w2", "b2"])


# ---------------------------------------------------------------- FlexiCubes and G-Shell


def _flexi_inputs(res: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c, n = (res,) * 3, (res + 1,) * 3
    return dict(beta=0.3 * torch.randn(*c, 12, generator=g, dtype=F64),
                alpha=0.3 * torch.randn(*c, 8, generator=g, dtype=F64),
                gamma=0.3 * torch.randn(*c, generator=g, dtype=F64),
                deform=0.3 * torch.randn(*n, 3, generator=g, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_flexicubes_matches_cpu(training, dtype):
    from diffworld.geometry.flexicubes import flexicubes

    res = 24
    s = smooth_field(res, dtype, seed=3)
    extra = {k: v.to(dtype) for k, v in _flexi_inputs(res).items()}
    if not training:
        extra.pop("gamma")
    names = ["sdf", *extra]

    def run(dev, dt):
        ins = [leaf(s.to(dt), dev)] + [leaf(v.to(dt), dev) for v in extra.values()]
        m = flexicubes(ins[0], training=training, **dict(zip(extra, ins[1:])))
        (probe_loss(m.vertices) + m.l_dev.sum()).backward()
        return m, [t.grad.detach().cpu().double() for t in ins]

    (mc, gc), (md, gd) = run(CPU, dtype), run(DEV, dtype)
    assert_same_mesh(mc.vertices, mc.faces, md.vertices, md.faces, dtype)
    torch.testing.assert_close(md.l_dev.sum().cpu(), mc.l_dev.sum(), **TOL[dtype])
    if dtype == F64:
        assert_close_grads(gc, gd, dtype, names)
        return
    # Float32 weight and sdf gradients divide by node-value differences: on this field they are
    # only good to 1e-2 (sdf) and 0.1-0.2 (beta, alpha) of the float64 gradient on the CPU too,
    # so the device must be as accurate as the CPU, not equal to it.
    _, g64 = run(CPU, F64)
    for name, a, b, ref in zip(names, gc, gd, g64):
        scale = float(ref.abs().max())
        err_cpu, err_dev = (float((x - ref).abs().max()) / scale for x in (a, b))
        assert err_dev <= 2 * err_cpu + 1e-5, (name, err_dev, err_cpu)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_flexicubes_gradient_on_device_matches_finite_differences(training):
    from diffworld.geometry.flexicubes import flexicubes

    res = 8
    s = smooth_field(res, seed=5).to(DEV)
    extra = {k: v.to(DEV) for k, v in _flexi_inputs(res, seed=2).items()}
    if not training:
        extra.pop("gamma")
    keys = list(extra)

    def loss(sdf, *ws):
        m = flexicubes(sdf, training=training, **dict(zip(keys, ws)))
        return probe_loss(m.vertices) + m.l_dev.sum()

    for i in range(len(keys) + 1):
        ins = [s.clone()] + [t.clone() for t in extra.values()]
        ins[i].requires_grad_(True)
        # 1e-5: the weights' directional derivatives are ~1e-3 of the loss, round-off bound at 1e-6
        for c in directional_check(loss, ins, eps=1e-5, seed=i):
            assert c.rel_error < 2e-5, (["sdf", *keys][i], c)


def test_flexicubes_tets_match_cpu():
    from diffworld.geometry.flexicubes import flexicubes
    from diffworld.geometry.tet_mesh import tet_volumes

    s = smooth_field(24, seed=7)
    res = {}
    for dev in (CPU, DEV):
        m = flexicubes(s.to(dev), output="tetrahedra")
        vol = tet_volumes(m.vertices, m.tets)
        res[dev.type] = (m, vol)
    (mc, vc), (md, vd) = res["cpu"], res[DEV.type]
    assert md.tets.device.type == DEV.type
    assert md.tets.shape == mc.tets.shape
    assert float(vd.min()) > 0 and float(vc.min()) > 0
    torch.testing.assert_close(vd.sum().cpu(), vc.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("template", ["flexicubes", "marching_tets"])
def test_gshell_matches_cpu(template):
    from diffworld.geometry import gshell

    build = {"flexicubes": gshell.gshell_flexicubes, "marching_tets": gshell.gshell_marching_tets}[template]
    s = smooth_field(24, seed=4)
    z = torch.linspace(-0.5, 0.5, 25, dtype=F64)
    msdf = (0.05 - z)[None, None, :].expand(25, 25, 25).contiguous()
    out = {}
    for dev in (CPU, DEV):
        a, b = leaf(s, dev), leaf(msdf, dev)
        m = build(a, b)
        length = (m.vertices[m.boundary_edges[:, 0]] - m.vertices[m.boundary_edges[:, 1]]).norm(dim=1).sum()
        (probe_loss(m.vertices) + length).backward()
        out[dev.type] = (m, [a.grad.cpu(), b.grad.cpu()], float(length.detach()))
    (mc, gc, lc), (md, gd, ld) = out["cpu"], out[DEV.type]
    assert_same_mesh(mc.vertices, mc.faces, md.vertices, md.faces, F64)
    assert mc.boundary_edges.shape == md.boundary_edges.shape
    assert math.isclose(lc, ld, rel_tol=1e-12)
    assert_close_grads(gc, gd, F64, ["sdf", "msdf"])


# ---------------------------------------------------------------- sampling and mesh SDF


def test_surface_samples_from_a_cpu_generator_are_the_same_on_every_device():
    from diffworld.geometry.marching_cubes import marching_cubes
    from diffworld.geometry.sampling import sample_surface

    m = marching_cubes(smooth_field(20, seed=9))
    got = {}
    for dev in (CPU, DEV):
        v = leaf(m.vertices, dev)
        smp = sample_surface(v, m.faces.to(dev), 5000, generator=torch.Generator().manual_seed(3))
        (smp.points.sum() + smp.normals[:, 0].sum()).backward()
        got[dev.type] = (smp.face_index.cpu(), smp.points.detach().cpu(), v.grad.cpu())
    c, d = got["cpu"], got[DEV.type]
    assert torch.equal(c[0], d[0])
    torch.testing.assert_close(d[1], c[1], **TOL[F64])
    torch.testing.assert_close(d[2], c[2], **TOL[F64])



def test_mesh_sdf_matches_cpu():
    from diffworld.geometry.marching_cubes import marching_cubes
    from diffworld.geometry.mesh_sdf import MeshSDF

    m = marching_cubes(smooth_field(20, seed=9))
    g = torch.Generator().manual_seed(0)
    x = (torch.rand((500, 3), generator=g, dtype=F64) - 0.5) * 0.9
    out = {}
    for dev in (CPU, DEV):
        verts, pts = leaf(m.vertices, dev), leaf(x, dev)
        field = MeshSDF(verts, m.faces.to(dev))
        vals = field(pts)
        (vals * torch.linspace(-1, 1, len(x), dtype=F64, device=dev)).sum().backward()
        out[dev.type] = (vals.detach().cpu(), pts.grad.cpu(), verts.grad.cpu())
    c, d = out["cpu"], out[DEV.type]
    # The closest-point search runs in float32 on both devices and refines in float64: a query
    # equidistant to two faces may pick either, which changes nothing in value, so compare
    # values tightly and gradients where they are unambiguous (almost everywhere).
    torch.testing.assert_close(d[0], c[0], rtol=0, atol=1e-9)
    same = (d[1] - c[1]).norm(dim=1) < 1e-9
    assert float(same.double().mean()) > 0.99
    torch.testing.assert_close(d[2].sum(0), c[2].sum(0), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- MPM

T = 16
MPM_CASES = {
    "water": dict(E=2e3),
    "viscous": dict(E=2e3, viscosity=0.5),
    "jelly": dict(E=2e3),
    "neo_hookean": dict(E=2e3),
    "snow": dict(E=2e3),
    "plasticine": dict(E=2e3, yield_stress=200.0),
    "sand": dict(E=2e3),
}


def _mpm_scene(name: str, dtype, device):
    from diffworld.geometry.sdf import Box
    from diffworld.sims import mpm

    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=12)
    cols = [mpm.Collider("sphere", size=(0.1, 0, 0), friction=0.3, softness=50.0)]
    body = mpm.Body(Box((0.1,) * 3, (0.5, 0.5, 0.4)), mpm.material(name, **MPM_CASES[name]), ppc=8,
                    velocity=(0.2, 0, -0.5))
    model, state = mpm.build_model(grid, [body], dt=2e-3, dtype=dtype, colliders=cols, device=device)
    ctrl = torch.zeros(T, 1, 13, dtype=dtype, device=device)
    ctrl[:, 0, :3] = torch.tensor([0.5, 0.5, 0.18], dtype=dtype, device=device)
    ctrl[:, 0, 6] = 1.0
    ctrl[:, 0, 9] = 0.3
    return model, state, ctrl


def _mpm_run(name: str, dtype, device):
    from diffworld.sims import mpm

    model, state, ctrl = _mpm_scene(name, dtype, device)
    x0, c = state.x.clone().requires_grad_(True), ctrl.clone().requires_grad_(True)
    E = model.params["E"].clone().requires_grad_(True)
    out = mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), T, c, window=5, params={"E": E},
                      record_every=8)
    f = out.final
    loss = (torch.sin(4 * f.x).sum() + (f.v ** 2).sum() + f.F.sum() + out.states[1].x[:, 2].sum())
    loss.backward()
    return [t.detach().cpu() for t in f], [x0.grad.cpu(), c.grad.cpu(), E.grad.cpu()]


@pytest.mark.parametrize("name", list(MPM_CASES))
def test_mpm_rollout_matches_cpu_float64(name):
    (fc, gc), (fd, gd) = _mpm_run(name, F64, CPU), _mpm_run(name, F64, DEV)
    for a, b, what in zip(fc, fd, "xvCF"):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=lambda m, w=what: f"{name} {w}: {m}")
    assert_close_grads(gc, gd, F64, ["x0", "control", "E"])


def test_mpm_rollout_float32_close_to_cpu():
    (fc, gc), (fd, gd) = _mpm_run("jelly", torch.float32, CPU), _mpm_run("jelly", torch.float32, DEV)
    torch.testing.assert_close(fd[0], fc[0], rtol=0, atol=1e-5)
    assert_close_grads(gc, gd, torch.float32, ["x0", "control", "E"])


def test_mpm_gradient_on_device_matches_finite_differences():
    from diffworld.sims import mpm

    model, state, ctrl = _mpm_scene("plasticine", F64, DEV)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(t.shape, generator=g, dtype=F64).to(DEV) for t in state]

    def loss(x0, control, E):
        out = mpm.rollout(model, mpm.State(x0, state.v, state.C, state.F), T, control, window=5, params={"E": E})
        return sum((a * b).sum() for a, b in zip(out.final, w))

    base = [state.x, ctrl, model.params["E"]]
    for i, eps in enumerate((1e-5, 1e-5, 1e-2)):
        ins = [t.detach().clone() for t in base]
        ins[i].requires_grad_(True)
        for c in directional_check(loss, ins, eps=eps, n_dirs=2, seed=i):
            assert c.rel_error < 1e-4, (i, c)


# ---------------------------------------------------------------- streams and scenes


@pytest.mark.skipif(DEV.type != "cuda", reason="streams exist on CUDA only")
def test_ops_are_ordered_on_a_non_default_torch_stream():
    """Inputs written by torch on a busy side stream, ops run there, results read there: the
    default stream's numbers (Warp launches on torch's current stream; the ops' own readbacks
    synchronize that stream, so this checks the results there, not every possible race)."""
    from diffworld.geometry.flexicubes import flexicubes
    from diffworld.geometry.marching_cubes import marching_cubes

    s = smooth_field(96, torch.float32, seed=11)
    ref_mc = marching_cubes(s.to(DEV))
    ref_fc = flexicubes(s.to(DEV))
    side = torch.cuda.Stream(DEV)
    for _ in range(3):
        with torch.cuda.stream(side):
            big = torch.empty((96 + 1,) * 3, device=DEV)
            torch.cuda._sleep(20_000_000)  # keeps the side stream busy: a launch elsewhere would race
            big.copy_(s.to(DEV, non_blocking=True))
            m = marching_cubes(big)
            f = flexicubes(big)
            got = (m.vertices.clone(), m.faces.clone(), f.vertices.clone(), f.faces.clone())
        side.synchronize()
        assert torch.equal(got[1], ref_mc.faces) and torch.equal(got[0], ref_mc.vertices)
        assert torch.equal(got[3], ref_fc.faces)
        torch.testing.assert_close(got[2], ref_fc.vertices, rtol=0, atol=1e-6)


SCENES = Path(__file__).resolve().parents[2] / "scenes"
_RECON = {"optimizer.iterations": 4, "task.representation.resolutions": [16, 24], "task.target.n_points": 20000,
          "task.evaluation.n_points": 20000, "output.render": False}
_MPM = {"optimizer.iterations": 2, "task.outputs.frames": 3, "task.outputs.movie": "none"}
SCENE_OVERRIDES = {
    "reconstruct_genus2": _RECON,
    "reconstruct_open_gshell": _RECON,
    "reconstruct_cad_flexicubes": _RECON,
    "reconstruct_mesh": {**_RECON, "task.representation.resolutions": [16]},
    "reconstruct_neural": {**{k: v for k, v in _RECON.items() if k != "task.representation.resolutions"},
                           "task.representation.resolution": 24},
    "mpm_pour": _MPM,
    "mpm_gather": _MPM,
    "mpm_stir": _MPM,
    "mpm_press_plasticine": _MPM,
    "mpm_push_plasticine": _MPM,
    "mpm_cut_plasticine": {**_MPM, "task.steps": 20},
    "mpm_sysid_jelly": {**_MPM, "optimizer.lbfgs_max_iter": 2},
    "mpm_latte_art": {**_MPM, "task.steps": 20, "task.emitters": "stop 0.25"},
}


def _overrides(name: str) -> dict:
    import yaml

    over = dict(SCENE_OVERRIDES[name])
    if over.get("task.emitters") == "stop 0.25":  # the jet must stop within the shortened run
        emitters = yaml.safe_load((SCENES / f"{name}.yaml").read_text())["task"]["emitters"]
        emitters[0]["stop"] = 0.25
        over["task.emitters"] = emitters
    return over


def _run_scene(name: str, device, out: Path) -> list[float]:
    import csv

    from diffworld.engine.runtime import get_runtime
    from diffworld.app.scenes import load_scene
    from diffworld.engine.run import run_scene

    sc = load_scene(SCENES / f"{name}.yaml", _overrides(name))
    run_scene(sc, get_runtime(device, sc.runtime.dtype), out, progress=False)
    return [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]


@pytest.mark.parametrize("name", sorted(SCENE_OVERRIDES))
def test_scene_on_device_matches_cpu(name, tmp_path):
    """A reduced run of every shipped scene on the device: finite, and its first loss (the scene
    before any update) is the CPU run's to float32 accuracy."""
    cpu = _run_scene(name, CPU, tmp_path / "cpu")
    dev = _run_scene(name, DEV, tmp_path / "dev")
    assert len(dev) == len(cpu) and all(math.isfinite(v) for v in dev), dev
    rel = abs(dev[0] - cpu[0]) / max(abs(cpu[0]), 1e-12)
    print(f"{name}: first loss cpu {cpu[0]:.9g} {DEV.type} {dev[0]:.9g} rel {rel:.2e}; last {cpu[-1]:.6g} / {dev[-1]:.6g}")
    assert rel < 1e-3, (cpu, dev)
