"""Benchmark: the FEM's explicit and implicit integrators on one press-and-slide tactile task.

A flat gel pad (2 x 2 cm, 4 mm thick, 8 x 8 x 2 cells, E 100 kPa, nu 0.4, mass damping 20/s) on
a fixed sensor base; a rigid sphere (R 5 mm) presses 0.5 mm in over 0.05 s (smooth ramp), then
slides 8 mm along x in 0.1 s (0.08 m/s). Penalty contact k_n 300 N/m per node, k_t 0.2 N s/m,
mu 0.5 (k_t small enough that the explicit step at half its limit resolves the viscous stick
regime: k_t dt / m < 2 on the contact nodes). Float64, CPU, 1 thread.

Reference: explicit steps at 0.1 x the stability limit. Rows: explicit at 0.5 x the limit, and
implicit (backward Euler, Newton/CG, contact with lagged damping and friction) at 15, 30 and 60
steps for the whole 0.15 s. Columns: steps, dt over the explicit limit, the sensor base's
reaction averaged over the second half of the slide (tangential Fx and normal Fz [mN]) and its
ratio, the relative errors of Fx and Fz against the reference, the final nodal position error
over the largest displacement, and the wall time of the forward run [s] (no gradient) and of a
forward + backward for the gradient of the final contact forces w.r.t. the sphere's poses.

Usage::

    python benchmarks/fem_integrators.py [--quick]   # --quick: reference at 0.25 x the limit
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("WARP_CACHE_PATH", str(ROOT / ".cache" / "warp"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffworld.sims import fem  # noqa: E402
from diffworld.sims.fem import Contact, ContactParams, RigidObject  # noqa: E402
from diffworld.sims.tactile.sensors import flat_pad  # noqa: E402

D = torch.float64
T, R = 4e-3, 5e-3  # pad thickness, sphere radius [m]
DEPTH, T_PRESS, T_SLIDE, LENGTH = 5e-4, 0.05, 0.1, 8e-3
PARAMS = ContactParams(k_n=300.0, k_t=0.2, mu=0.5, eps_v=1e-3)


def scene():
    g = flat_pad(size=(0.02, 0.02), thickness=T, res=(8, 8, 2))
    model = fem.build_model(g.mesh, E=1e5, nu=0.4, density=1100.0, kinematic=g.base_nodes, damping=20.0,
                            gravity=(0.0, 0.0, 0.0), dtype=D)
    return model, g


def trajectory(n: int, explicit: bool):
    """Sphere centre and velocity per step (explicit rows: the start of the step; implicit: its end)."""
    dt = (T_PRESS + T_SLIDE) / n
    t = torch.arange(1, n + 1, dtype=D) * dt - (dt if explicit else 0.0)
    ramp = 0.5 * (1 - torch.cos(math.pi * torch.clamp(t / T_PRESS, max=1.0)))
    slide = torch.clamp((t - T_PRESS) / T_SLIDE, 0.0, 1.0)
    pos = torch.stack([-LENGTH / 2 + LENGTH * slide, torch.zeros_like(t), T + R - DEPTH * ramp], 1)
    vx = torch.where((t > T_PRESS) & (t <= T_PRESS + T_SLIDE), LENGTH / T_SLIDE, 0.0)
    return dt, pos, torch.stack([vx, torch.zeros_like(vx), torch.zeros_like(vx)], 1)


def run(model, g, n: int, integrator: str, grad: bool = True):
    dt, pos, vel = trajectory(n, integrator == "explicit")
    stepper = fem.ImplicitStepper(model, dt) if integrator == "implicit" else fem.Stepper(model, dt)
    every = max(1, n // 60)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fem.rollout(model, model.rest_state(), dt, n, window=max(1, min(n, 64)), integrator=integrator,
                          stepper=stepper, record_every=every, stability_check=False,
                          contact=Contact(RigidObject.sphere(R, pos, linear_velocity=vel), g.contact_nodes, PARAMS))
    wall = time.perf_counter() - t0
    f = torch.stack([stepper.forces(st.x, model.E, model.nu)[g.base_nodes].sum(0)
                     for st, k in zip(out.states, out.steps) if k * dt >= T_PRESS + 0.5 * T_SLIDE]).mean(0)
    wall_grad = math.nan
    if grad:
        p = pos.clone().requires_grad_(True)
        t0 = time.perf_counter()
        x, v = fem.rollout(model, model.rest_state(), dt, n, window=max(1, min(n, 64)), integrator=integrator,
                           stepper=stepper, stability_check=False,
                           contact=Contact(RigidObject.sphere(R, p, linear_velocity=vel), g.contact_nodes,
                                           PARAMS)).final
        r = fem.contact_forces(x, v, g.contact_nodes, RigidObject.sphere(R, p[-1], linear_velocity=vel[-1]), PARAMS)
        (r.normal_force_total + r.shear_force_total).backward()
        wall_grad = time.perf_counter() - t0
    return dict(n=n, x=out.final.x, fx=float(f[0]), fz=float(-f[2]), wall=wall, wall_grad=wall_grad,
                newton=getattr(stepper, "total_newton", 0), cg=getattr(stepper, "total_cg", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reference at 0.25 x the explicit limit")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, g = scene()
    lim = fem.stable_dt(model).dt
    total = T_PRESS + T_SLIDE
    ref_factor = 0.25 if a.quick else 0.1
    ref = run(model, g, math.ceil(total / (ref_factor * lim)), "explicit", grad=False)
    X = model.rest_state().x
    scale = float((ref["x"] - X).abs().max())
    print(f"explicit limit {lim:.3g} s; reference: explicit at {ref_factor} x the limit, {ref['n']} steps, "
          f"{ref['wall']:.1f} s; base reaction Fx {1e3 * ref['fx']:.3f} mN, Fz {1e3 * ref['fz']:.3f} mN, "
          f"Fx/Fz {ref['fx'] / ref['fz']:.4f}")
    print("| integrator | steps | dt / limit | Fx [mN] | Fz [mN] | Fx/Fz | Fx err | Fz err | x err | forward [s] "
          "| fwd + bwd [s] | Newton, CG per step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("explicit", math.ceil(total / (0.5 * lim)))] + [("implicit", n) for n in (15, 30, 60)]
    for name, n in rows:
        r = run(model, g, n, name)
        err_x = float((r["x"] - ref["x"]).abs().max()) / scale
        it = f"{r['newton'] / n:.1f}, {r['cg'] / n:.0f}" if name == "implicit" else "-"
        print(f"| {name} | {n} | {total / n / lim:.2f} | {1e3 * r['fx']:.3f} | {1e3 * r['fz']:.3f} | "
              f"{r['fx'] / r['fz']:.4f} | {r['fx'] / ref['fx'] - 1:+.2%} | {r['fz'] / ref['fz'] - 1:+.2%} | "
              f"{err_x:.2e} | {r['wall']:.2f} | {r['wall_grad']:.2f} | {it} |", flush=True)


if __name__ == "__main__":
    main()
