"""Float64 finite-difference checks through sliding contact with friction over several control
steps (issue 15 item 3), for both FEM integrators.

A coarse flat tactile pad (6 x 6 x 2 cells, :func:`~diffworld.sims.tactile.sensors.flat_pad`) is
driven by a sensor pose per control step (translation and rotation of its base, spread over the
substeps by :meth:`~diffworld.sims.fem.model.Control.upsample`) against a static rigid object: a
sphere, or a bump given as a triangle mesh (:class:`~diffworld.geometry.mesh_sdf.MeshSDF`). The
three control steps press (stick), creep sideways slowly (the central nodes stick: viscous
``k_t`` regime, the rim slips) and slide fast (slip at the Coulomb cap ``mu f_n``). The loss reads
tactile outputs at the end: the total normal and shear force of the contact law at the final
state, and 20 marker positions on the contact face (:class:`~diffworld.sims.tactile.camera.Markers`).

Checked by float64 central differences along random directions of each group of inputs: the
per-control-step sensor pose (3 x 6), the material (E, nu) and the contact parameters (k_n, k_d,
k_t, mu); scalars are relative (``p0 (1 + r)``) so a direction weighs them alike. The contact uses
smoothed ramps and min (``SMOOTH``), so the loss is smooth. Measured relative errors (explicit at
154 substeps per control step / implicit at 2), sphere: pose 3.5e-9 / 1.3e-9, material 2.7e-8 /
3.6e-8, contact 7.6e-8 / 2.1e-7; mesh bump: pose 1.0e-7 / 1.2e-9, material 8.2e-7 / 6.1e-8,
contact 1.4e-8 / 1.4e-7 (steps 1e-8 m-scale for the pose, 1e-6 relative for the scalars: the
explicit loss curves strongly in E and nu, a 1e-4 step gives 3e-3 truncation error). The
mesh's normal is held constant (exact on its faces; :mod:`diffworld.sims.fem.contact`).
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from diffworld.engine.gradcheck import directional_check
from diffworld.engine.runtime import init_warp
from diffworld.geometry.mesh_sdf import MeshSDF
from diffworld.sims import fem
from diffworld.sims.fem import Contact, ContactParams, Control, RigidObject
from diffworld.sims.tactile.camera import Markers
from diffworld.sims.tactile.sensors import flat_pad

torch.set_num_threads(1)
init_warp()

D = torch.float64
T = 4e-3  # pad thickness [m]
R = 5e-3  # sphere radius [m]
CTRL_DT = 5e-3  # control period [s]
C = 1.67e-3  # the objects sit between 4 nodes of the 3.33 mm grid [m]
TIGHT = dict(newton_tol=1e-13, cg_tol=1e-10, adjoint_tol=1e-14)
# sensor translation per control step [m]: press, creep (stick), slide (slip); the object sits above
TRANSLATION = torch.tensor([[0.0, 0.0, 9e-4], [2e-5, 0.0, 9.2e-4], [4e-4, 1e-4, 9.4e-4]], dtype=D)
ROTATION = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.004], [0.002, -0.002, 0.01]], dtype=D)
BASE = dict(E=1e5, nu=0.4, k_n=300.0, k_d=20.0, k_t=0.5, mu=0.4)
# smooth ramps and min: the loss is smooth, so central differences converge (hard ramps give kinks
# a node may cross within the FD step, more so over the explicit run's many substeps)
SMOOTH = dict(eps_v=1e-3, penetration_width=2e-5, damping_width=1e-3, friction_exponent=8.0)


def _bump() -> MeshSDF:
    """A closed convex bump (a spherical cap of radius 6 mm, 2.5 mm high, on a flat base), its
    apex down towards the pad: a convex hull of points on the cap and the base rim."""
    k = np.arange(60)
    golden = math.pi * (3 - math.sqrt(5))
    zc = 1 - (1 - math.cos(0.9)) * (k + 0.5) / 60  # cap of half-angle 0.9 rad on the unit sphere
    r = np.sqrt(1 - zc * zc)
    cap = np.stack([r * np.cos(golden * k), r * np.sin(golden * k), zc], 1)
    rim = np.stack([np.sin(0.9) * np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(0.9) * np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False)), np.full(24, math.cos(0.9))], 1)
    pts = np.concatenate([[[0.0, 0.0, 1.0]], cap, rim]) * 6e-3
    pts[:, 2] = 6e-3 - pts[:, 2]  # apex at z = 0, the base plane at z = 6 mm (1 - cos 0.9) above it
    hull = ConvexHull(pts)
    faces = hull.simplices.copy()
    p = pts[faces]
    nrm = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    flip = (nrm * (p.mean(1) - pts.mean(0))).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return MeshSDF(torch.from_numpy(pts), torch.from_numpy(faces).long(), sign="normal")


@pytest.fixture(scope="module")
def scene():
    g = flat_pad(size=(0.02, 0.02), thickness=T, res=(6, 6, 2))
    model = fem.build_model(g.mesh, E=BASE["E"], nu=BASE["nu"], density=1100.0, kinematic=g.base_nodes,
                            damping=2.0, gravity=(0.0, 0.0, 0.0), dtype=D)
    markers = Markers.sample(g.mesh.vertices, g.contact_faces, 20, seed=0)
    objects = {"sphere": RigidObject.sphere(R, torch.tensor([C, C, T + R], dtype=D)),
               "mesh_bump": RigidObject(_bump(), torch.tensor([C, C, T], dtype=D))}
    return model, g, markers, objects


def _loss_fn(scene, obj_name, integrator):
    model, g, markers, objects = scene
    obj = objects[obj_name]
    nodes = g.contact_nodes
    if integrator == "explicit":
        sub = math.ceil(CTRL_DT / (0.5 * fem.stable_dt(model).dt))
        opts = None
    else:
        sub, opts = 2, TIGHT
    dt = CTRL_DT / sub
    gen = torch.Generator().manual_seed(4)
    wm = torch.randn(20, 3, generator=gen, dtype=D)
    rest = markers.positions(model.rest_state().x).detach()

    def loss(translation, rotation, E_r, nu_r, k_n_r, k_d_r, k_t_r, mu_r):
        b = BASE
        params = ContactParams(k_n=b["k_n"] * (1 + k_n_r), k_d=b["k_d"] * (1 + k_d_r), k_t=b["k_t"] * (1 + k_t_r),
                               mu=b["mu"] * (1 + mu_r), **SMOOTH)
        control = Control(translation, rotation).upsample(sub)
        x, v = fem.rollout(model, model.rest_state(), dt, control=control, window=sub,
                           params={"E": b["E"] * (1 + E_r), "nu": b["nu"] * (1 + nu_r)}, integrator=integrator,
                           implicit_options=opts, contact=Contact(obj, nodes, params)).final
        r = fem.contact_forces(x, v, nodes, obj, params)
        return (10.0 * r.normal_force_total + 30.0 * r.shear_force_total
                + 1e4 * ((markers.positions(x) - rest) * wm).sum())

    return loss, sub


GROUPS = {"pose": (0, 1), "material": (2, 3), "contact": (4, 5, 6, 7)}


@pytest.mark.parametrize("integrator", ["explicit", "implicit"])
@pytest.mark.parametrize("obj_name", ["sphere", "mesh_bump"])
def test_sliding_gradients_match_central_differences(scene, obj_name, integrator):
    loss, sub = _loss_fn(scene, obj_name, integrator)
    zero = torch.zeros((), dtype=D)
    base = [TRANSLATION, ROTATION] + [zero] * 6
    # the regimes are there: contact, stick somewhere during the creep, slip in the slide
    with torch.no_grad():
        assert float(loss(*base)) != 0.0
    for name, idx in GROUPS.items():
        args = [t.clone().requires_grad_(i in idx) for i, t in enumerate(base)]
        eps = 1e-8 if name == "pose" else 1e-6  # the explicit loss curves strongly in E, nu: 1e-4 gives 3e-3
        for r in directional_check(loss, args, eps=eps, n_dirs=1, seed=7):
            print(f"\n[sliding {obj_name} {integrator} x{sub}] {name}: analytic {r.analytic:.10e} numeric "
                  f"{r.numeric:.10e} rel {r.rel_error:.1e}")
            assert r.rel_error < 1e-5


@pytest.mark.parametrize("integrator", ["explicit", "implicit"])
def test_both_regimes_occur(scene, integrator):
    """After the creep some contact nodes stick (k_t |v_t| below mu f_n), after the slide some slip."""
    model, g, _, objects = scene
    obj, nodes = objects["sphere"], g.contact_nodes
    sub = math.ceil(CTRL_DT / (0.5 * fem.stable_dt(model).dt)) if integrator == "explicit" else 2
    params = ContactParams(k_n=BASE["k_n"], k_d=BASE["k_d"], k_t=BASE["k_t"], mu=BASE["mu"], **SMOOTH)
    out = []
    for k in (2, 3):
        control = Control(TRANSLATION[:k], ROTATION[:k]).upsample(sub)
        with torch.no_grad():
            x, v = fem.rollout(model, model.rest_state(), CTRL_DT / sub, control=control, window=sub,
                               integrator=integrator, contact=Contact(obj, nodes, params)).final
            r = fem.contact_forces(x, v, nodes, obj, params)
            vt = v[nodes] - (v[nodes] * r.normal).sum(1, keepdim=True) * r.normal
            s = torch.sqrt((vt * vt).sum(1) + 1e-6)
            fn = BASE["k_n"] * r.penetration
            out.append((r.penetration > 1e-5, BASE["k_t"] * s < BASE["mu"] * fn, r))
    touching, stick, _ = out[0]
    touching2, stick2, _ = out[1]
    print(f"\n[regimes {integrator}] touching nodes sticking after the creep {int((touching & stick).sum())} of "
          f"{int(touching.sum())}, slipping after the slide {int((touching2 & ~stick2).sum())} of {int(touching2.sum())}")
    assert bool((touching & stick).any()) and bool((touching2 & ~stick2).any())
