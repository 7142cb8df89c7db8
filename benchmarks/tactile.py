"""Benchmark: the tactile dome (surface following and grasp scenes), diffworld vs a Taichi port of
DiffTactile's formulation, forward and forward + backward, the contact query, and memory.

Setup (issue 15 item 5; facts from shared/reference/tactile.md). Both sides run in the
reference's own unit system (lengths in cm, its raw material and contact constants; the code is
unit-agnostic), float32, on the same mesh with the same lumped masses:

* the dome: ``diffworld.sims.tactile.dome(inner_radius=0.75, thickness=0.75, layers=3,
  n_points=430)``: 1,928 nodes, 8,190 tets, 910 contact triangles (the reference: about 1,910 /
  8,198 / 1,543; our outer shell has as many points as the inner one, the reference's 4x);
  stable Neo-Hookean with DiffTactile's mu = 1294.01, lambda = 9201.11 (``stable_neo_hookean_E_nu``),
  rho = 2000, no gravity, no damping; the inner shell is the kinematic base, translated along x
  at 0.5 cm/s;
* explicit symplectic Euler at dt = 5e-5, 50 substeps per control step (the reference's);
* surface following: a wavy rigid surface (amplitude 0.05, wavelength 0.8 along x) pressing
  0.05 into the dome's apex, DiffTactile's contact constants (k_n, k_d, k_t, mu) = (34.53,
  269.44, 154.78, 43.85); grasp: a rigid sphere of radius 1 pressing 0.05 into the apex,
  (55.33, 239.97, 94.35, 4.9);
* ours: ``fem.rollout(..., contact=fem.Contact(...))``: SDF of the object at the gel's contact
  nodes (``Waves`` and ``Sphere`` analytic; ``MeshSDF`` of a triangulated wave surface: the BVH
  path); Taichi (``benchmarks/tactile_taichi.py``): the object as particles (a 64 x 64 grid on the
  wave surface, 4,096 Fibonacci points on the sphere), brute-force nearest sensor triangle by
  centroid distance per particle and substep, forces split 1/3 per triangle node; the contact
  laws differ (see that module and ``diffworld.sims.fem.contact``), the cost is the point.

Columns (control steps per second; one control step = 50 substeps):

* ours fwd: ``fem.rollout`` under ``torch.no_grad()``, best of 3 runs of ``--steps`` control steps
  (the analytic objects run on the Warp contact kernel, ``diffworld.sims.fem.kernels_contact``;
  the MeshSDF on the torch op);
* ours fwd+bwd: ``fem.rollout(..., window=50)`` with the translations and the contact constants
  requiring grad, then ``backward()`` of the final contact nodes' squared positions: full
  back-propagation through every control step; bwd/fwd the time of ``backward()`` over the
  rollout's;
* Taichi fwd: the same number of control steps, ``ti.init(arch=ti.cpu, cpu_max_num_threads=1)``;
  Taichi fwd+bwd: one control step under ``ti.ad.Tape`` (the reference's unit of backward: it
  truncates the surface-following gradient to one control step), per control step.

Checks: without contact, 50 substeps from the same initial state: max |x ours - x Taichi|
(relative to the dome's size) and the relative difference of d loss / d (base translation).

Contact query: the surface-following particles (4,096 points) against the sensor's outer shell:
the Warp BVH closest point (exact, not the nearest centroid) within a band of 0.1 (what a
penalty contact needs) and unbounded, and ``MeshSDF(sign="normal")`` (query + signed distance in
torch), against the brute-force nearest centroid (Taichi, 1 thread), on hemispheres of 910
(our dome), 1,543 (the reference's count) and 4x, 16x, 64x 1,543 triangles (``--quick``: up to
16x). Ours detects the other way round in the rollout (the object's SDF at the gel's contact
nodes): its cost is printed below the table.

Memory: peak resident memory added by a windowed fwd+bwd rollout (surface following, child
processes; VmHWM reset through /proc/self/clear_refs) vs the horizon (5, 40 and 1000 control
steps) and the window (50 and 500 substeps); ``--quick`` runs 5 and 20 only.

Usage::

    python benchmarks/tactile.py [--quick] [--steps 4] [--no-memory]

Runtime on a 2-core CPU: about 5 minutes (``--quick``: about 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DT = 5.0e-5
SUBSTEPS = 50
N_POINTS = 430
MU_S, LAM_S = 1294.01, 9201.11
DENSITY = 2000.0
SPEED = 0.5  # base speed along x [cm/s]
DEPTH = 0.05  # initial penetration at the apex [cm]
CONTACT = {"surface": (34.53, 269.44, 154.78, 43.85), "grasp": (55.33, 239.97, 94.35, 4.9)}
WAVE_AMPLITUDE, WAVE_LENGTH = 0.05, 0.8
SPHERE_RADIUS = 1.0
GRID = 64  # object particles of the wave surface: GRID x GRID over [-1.6, 1.6]^2
REF_TRIANGLES = 1543
BAND = 0.1  # contact query band [cm]
GB = 1024.0 ** 3


def say(*a) -> None:
    print(*a, flush=True)


# --- scenes -----------------------------------------------------------------------------------------

def build(scene: str, sdf_kind: str = "analytic"):
    """(model, geometry, contact, particles (P, 3) numpy) of a scene; ``sdf_kind`` analytic|mesh."""
    import numpy as np
    import torch

    from diffworld.geometry.mesh_sdf import MeshSDF
    from diffworld.geometry.sdf import Sphere, Waves
    from diffworld.sims import fem
    from diffworld.sims.tactile import dome

    g = dome(inner_radius=0.75, thickness=0.75, layers=3, n_points=N_POINTS)
    E, nu = fem.stable_neo_hookean_E_nu(MU_S, LAM_S)
    model = fem.build_model(g.mesh, E=float(E), nu=float(nu), density=DENSITY, kinematic=g.base_nodes,
                            gravity=(0.0, 0.0, 0.0), dtype=torch.float32)
    top = 1.5
    k_n, k_d, k_t, mu = CONTACT[scene]
    flip = torch.tensor([1.0, 0.0, 0.0, 0.0])  # pi about x: the object's solid side faces -z
    if scene == "surface":
        # local surface z = h(x) = a cos(k x); world z = p_z - h: the apex touches at depth DEPTH
        pos = torch.tensor([0.0, 0.0, top - DEPTH + WAVE_AMPLITUDE])
        if sdf_kind == "analytic":
            sdf = Waves(torch.tensor(WAVE_AMPLITUDE, dtype=torch.float64),
                        torch.tensor([WAVE_LENGTH, 0.0], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
        else:
            verts, faces = wave_mesh(128)
            sdf = MeshSDF(torch.from_numpy(verts), torch.from_numpy(faces), sign="normal")
        obj = fem.RigidObject(sdf, pos, rotation=flip)
        s = np.linspace(-1.6, 1.6, GRID)
        X, Y = np.meshgrid(s, s, indexing="ij")
        Z = float(pos[2]) - WAVE_AMPLITUDE * np.cos(2 * math.pi * X / WAVE_LENGTH)
        particles = np.stack([X.ravel(), Y.ravel(), Z.ravel()], 1)
    else:
        pos = torch.tensor([0.0, 0.0, top - DEPTH + SPHERE_RADIUS])
        obj = fem.RigidObject(Sphere(torch.tensor(SPHERE_RADIUS, dtype=torch.float64)), pos)
        particles = fibonacci_sphere(GRID * GRID) * SPHERE_RADIUS + pos.numpy()
    params = fem.ContactParams(k_n=k_n, k_d=k_d, k_t=k_t, mu=mu, eps_v=1e-4)
    contact = fem.Contact(obj, g.contact_nodes, params)
    return model, g, contact, particles


def wave_mesh(res: int):
    """The wave surface as a closed slab mesh (top: the waves on [-2, 2]^2, res x res cells; solid below)."""
    import numpy as np

    s = np.linspace(-2.0, 2.0, res + 1)
    X, Y = np.meshgrid(s, s, indexing="ij")
    top = np.stack([X.ravel(), Y.ravel(), WAVE_AMPLITUDE * np.cos(2 * math.pi * X.ravel() / WAVE_LENGTH)], 1)
    bottom = top.copy()
    bottom[:, 2] = -1.0
    verts = np.concatenate([top, bottom])
    idx = np.arange((res + 1) ** 2).reshape(res + 1, res + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = [np.stack([a, b, c], 1), np.stack([a, c, d], 1)]
    off = (res + 1) ** 2
    faces += [np.stack([a, c, b], 1) + off, np.stack([a, d, c], 1) + off]
    # side walls
    rings = [idx[:, 0], idx[-1, :], idx[::-1, -1], idx[0, ::-1]]
    for r in rings:
        p, q = r[:-1], r[1:]
        faces += [np.stack([p, p + off, q], 1), np.stack([q, p + off, q + off], 1)]
    return verts, np.concatenate(faces).astype(np.int64)


def fibonacci_sphere(n: int):
    import numpy as np

    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    r = np.sqrt(1 - z * z)
    t = math.pi * (3 - math.sqrt(5)) * k
    return np.stack([r * np.cos(t), r * np.sin(t), z], 1)


def translations(n_control: int, start: int = 0):
    """Base translation at the end of each substep, (n_control * 50, 3) float32."""
    import torch

    s = torch.arange(start * SUBSTEPS + 1, (start + n_control) * SUBSTEPS + 1, dtype=torch.float64)
    t = torch.zeros(s.shape[0], 3, dtype=torch.float64)
    t[:, 0] = SPEED * DT * s
    return t.float()


# --- ours ---------------------------------------------------------------------------------------------

def ours_forward(model, contact, state, n_control: int, repeat: int = 3) -> tuple[float, object]:
    import torch

    from diffworld.sims import fem

    ctrl = fem.Control(translation=translations(n_control))
    best, out = math.inf, None
    with torch.no_grad():
        fem.rollout(model, state, DT, control=fem.Control(translation=translations(1)), contact=contact, window=50)
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fem.rollout(model, state, DT, control=ctrl, contact=contact, window=SUBSTEPS, check=False)
            best = min(best, time.perf_counter() - t0)
    fem.check_state(out.final, n_control * SUBSTEPS, DT)
    return best, out.final


def ours_forward_backward(model, contact, state, n_control: int, window: int = SUBSTEPS) -> tuple[float, float]:
    import torch

    from diffworld.sims import fem

    nodes = contact.nodes

    def once(n: int) -> tuple[float, float]:
        tr = translations(n).requires_grad_()
        p = contact.params
        cp = [torch.tensor(float(getattr(p, k)), requires_grad=True) for k in ("k_n", "k_d", "k_t", "mu")]
        c = fem.Contact(contact.obj, nodes, fem.ContactParams(*cp, eps_v=p.eps_v))
        t0 = time.perf_counter()
        out = fem.rollout(model, state, DT, control=fem.Control(translation=tr), contact=c, window=window, check=False)
        loss = (out.final.x[nodes] ** 2).sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if not bool(torch.isfinite(tr.grad).all()):
            raise RuntimeError("non-finite gradient")
        return t1 - t0, t2 - t1

    once(1)
    return once(n_control)


def fmt_vec(f) -> str:
    return "(" + ", ".join(f"{float(c):.3g}" for c in f) + ")"


def first_step_force(model, contact, state):
    """Total contact force on the gel after one control step (ours), (3,)."""
    import torch

    from diffworld.sims import fem

    with torch.no_grad():
        out = fem.rollout(model, state, DT, control=fem.Control(translation=translations(1)), contact=contact,
                          window=SUBSTEPS)
        return fem.contact_forces(out.final.x, out.final.v, contact.nodes, contact.obj,
                                  contact.params).node_forces.sum(0)


def pressed_state(model):
    """The rest state (the object starts 0.05 deep at the apex; contact acts from substep 0)."""
    return model.rest_state()


# --- Taichi ---------------------------------------------------------------------------------------------

def taichi_available() -> tuple[bool, str]:
    try:
        from tactile_taichi import import_taichi

        return True, ".".join(str(v) for v in import_taichi().__version__)
    except Exception as exc:  # ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}"


def taichi_dome(model, g, particles, contact_consts):
    import numpy as np

    from tactile_taichi import TaichiDome

    kin = np.zeros(model.n_nodes, dtype=bool)
    kin[model.kinematic.numpy()] = True
    m = model.mesh
    return TaichiDome(m.vertices.numpy(), m.tets.numpy(), m.Dm_inv.numpy(), m.rest_volume.numpy(),
                      model.masses().detach().numpy(), kin, g.contact_faces.numpy(), particles, MU_S, LAM_S,
                      contact_consts, DT, SUBSTEPS, g.contact_nodes.numpy())


def taichi_times(td, state, n_control: int, repeat: int = 3) -> tuple[float, float]:
    """(forward seconds for n_control control steps, fwd+bwd seconds per control step)."""
    x0, v0 = state.x.numpy(), state.v.numpy()
    trans = translations(n_control).numpy()  # the same base motion as ours
    td.set_state(x0, v0)
    td.forward(1, trans)  # compile
    td.set_state(x0, v0)
    td.forward_backward()  # compile the gradient kernels
    fwd = fb = math.inf
    for _ in range(repeat):
        td.set_state(x0, v0)
        t0 = time.perf_counter()
        td.forward(n_control, trans)
        fwd = min(fwd, time.perf_counter() - t0)
    for _ in range(repeat):
        td.set_state(x0, v0)
        td.set_translation(trans[:SUBSTEPS])
        t0 = time.perf_counter()
        td.forward_backward()
        fb = min(fb, time.perf_counter() - t0)
    return fwd, fb


def elastic_check(model, g) -> tuple[float, float]:
    """No contact, one control step from the rest state: (max |dx| / 1.5, rel. diff of d loss / d translation)."""
    import numpy as np
    import torch

    from diffworld.sims import fem

    td = taichi_dome(model, g, np.zeros((0, 3)), None)
    tr = translations(1).requires_grad_()
    st = model.rest_state()
    out = fem.rollout(model, st, DT, control=fem.Control(translation=tr), window=SUBSTEPS)
    (out.final.x[g.contact_nodes] ** 2).sum().backward()
    td.set_translation(tr.detach().numpy())
    td.set_state(st.x.numpy(), st.v.numpy())
    td.forward_backward()
    xt, _ = td.final()
    dx = float(np.abs(out.final.x.detach().numpy() - xt).max()) / 1.5
    gt = td.trans.grad.to_numpy()
    ours = tr.grad.numpy()
    rel = float(np.abs(ours - gt).max() / np.abs(gt).max())
    return dx, rel


# --- contact query -----------------------------------------------------------------------------------

def hemisphere(n_faces: int):
    """Outer shell of a dome (radius 1.5) with about ``n_faces`` triangles: (vertices, faces) numpy."""
    from diffworld.sims.tactile.sensors import _hemisphere

    n = max(8, round(n_faces / 2.12))
    for _ in range(6):  # adjust the spiral count to the wanted face count
        n_rim = max(8, round(2 * math.pi / math.sqrt(2 * math.pi / n)))
        pts, faces = _hemisphere(n, n_rim)
        if abs(faces.shape[0] - n_faces) <= 2:
            break
        n = max(8, round(n * n_faces / faces.shape[0]))
    return pts * 1.5, faces


_BVH_KERNEL = None


def bvh_query_kernel():
    """A Warp kernel: closest face of each point (``mesh_query_point_no_sign``), within ``max_dist``."""
    global _BVH_KERNEL
    if _BVH_KERNEL is None:
        import warp as wp

        @wp.kernel
        def closest_face(mesh: wp.uint64, pts: wp.array(dtype=wp.vec3), max_dist: float,
                         face: wp.array(dtype=wp.int32)):
            i = wp.tid()
            q = wp.mesh_query_point_no_sign(mesh, pts[i], max_dist)
            face[i] = wp.where(q.result, q.face, -1)

        _BVH_KERNEL = closest_face
    return _BVH_KERNEL


def _best_ms(fn, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def query_table(args, have_taichi: bool) -> None:
    import numpy as np
    import torch
    import warp as wp

    from diffworld.geometry.mesh_sdf import MeshSDF

    _, g, _, particles = build("surface")
    pts = torch.from_numpy(particles).float()
    wpts = wp.array(particles.astype(np.float32), dtype=wp.vec3, device="cpu")
    face = wp.zeros(particles.shape[0], dtype=wp.int32, device="cpu")
    kern = bvh_query_kernel()
    say(f"\n## Contact query ({particles.shape[0]:,} surface-following particles vs the sensor's outer shell; "
        f"ms per query, best of 5)\n")
    say("BVH: Warp ``mesh_query_point_no_sign`` (exact closest point), unbounded or within a band of "
        f"{BAND} (2x the penetration: what a contact needs); MeshSDF: ``MeshSDF(sign='normal')`` at the points "
        "(BVH query + signed distance in torch); brute force: nearest centroid over all triangles.\n")
    say("| triangles | BVH, band | BVH, unbounded | MeshSDF | BVH build | brute force Taichi (1 thr) "
        "| brute / BVH band | brute / BVH unbounded |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|")
    sizes = [int(g.contact_faces.shape[0]), REF_TRIANGLES] + [REF_TRIANGLES * k for k in (4, 16, 64)]
    if args.quick:
        sizes = sizes[:4]
    for nf in sizes:
        if nf == sizes[0]:
            verts, faces = g.mesh.vertices.numpy(), g.contact_faces.numpy()
        else:
            verts, faces = hemisphere(nf)
        t0 = time.perf_counter()
        mesh = wp.Mesh(points=wp.array(verts.astype(np.float32), dtype=wp.vec3, device="cpu"),
                       indices=wp.array(faces.astype(np.int32).ravel(), dtype=wp.int32, device="cpu"))
        build_ms = (time.perf_counter() - t0) * 1e3

        def bvh(max_dist):
            wp.launch(kern, particles.shape[0], [mesh.id, wpts, float(max_dist), face], device="cpu")
            wp.synchronize()

        band = _best_ms(lambda: bvh(BAND), 20)
        unb = _best_ms(lambda: bvh(1.0e6), 5)
        sdf = MeshSDF(torch.from_numpy(verts).float(), torch.from_numpy(faces).long(), sign="normal")
        msdf = _best_ms(lambda: sdf(pts), 5)
        cent = verts[faces].mean(1)
        ti_ms = None
        if have_taichi:
            from tactile_taichi import brute_force_nearest

            run = brute_force_nearest(cent, particles)
            ti_ms = _best_ms(run, max(1, min(10, int(1e8 / (nf * particles.shape[0])))))
        fmt = lambda s: "n/a" if s is None else f"{s:.2f}"  # noqa: E731
        rat = lambda a, b: "n/a" if a is None else f"{a / b:.1f}x"  # noqa: E731
        say(f"| {faces.shape[0]:,} | {band:.3f} | {unb:.2f} | {msdf:.2f} | {build_ms:.1f} | {fmt(ti_ms)} "
            f"| {rat(ti_ms, band)} | {rat(ti_ms, unb)} |")
    # What ours evaluates per substep instead: the object's SDF at the gel's contact nodes.
    model, g, contact, _ = build("surface", "mesh")
    xc = model.rest_state().x[g.contact_nodes].contiguous()
    sdf = contact.obj.sdf
    local = ((xc.double() - contact.obj.position.double()) @ contact.obj.rotation_matrix().double()).float()
    ms = _best_ms(lambda: sdf(local), 20)
    say(f"\nOurs per substep detects the other way round: the object's SDF at the gel's {xc.shape[0]} contact nodes; "
        f"for the wave surface as a MeshSDF ({sdf.faces.shape[0]:,} triangles) that is {ms:.2f} ms (analytic "
        f"Waves: inside the contact kernel).")


# --- memory ----------------------------------------------------------------------------------------

def _status_kib() -> dict[str, int]:
    text = pathlib.Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def _fb_once(model, contact, state, n_control, window):
    import torch

    from diffworld.sims import fem

    tr = translations(n_control).requires_grad_()
    t0 = time.perf_counter()
    out = fem.rollout(model, state, DT, control=fem.Control(translation=tr), contact=contact, window=window,
                      check=False)
    loss = (out.final.x[contact.nodes] ** 2).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if not bool(torch.isfinite(tr.grad).all()):
        raise RuntimeError("non-finite gradient")
    return t1 - t0, t2 - t1


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(error=f"child exited with {proc.returncode}: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(args) -> None:
    say("\n## Memory of a fwd+bwd rollout (surface following; peak resident memory added, one child process each)\n")
    say("| control steps | substeps | window [substeps] | checkpoints | peak increase | fwd+bwd [s] | note |")
    say("|---:|---:|---:|---:|---:|---:|---|")
    horizons = (5, 20) if args.quick else (5, 40, 1000)
    results = {}
    for window in (SUBSTEPS, 10 * SUBSTEPS):
        for T in horizons:
            r = run_child(dict(steps=T, window=window))
            n_ckpt = math.ceil(T * SUBSTEPS / window)
            if "error" in r:
                say(f"| {T} | {T * SUBSTEPS:,} | {window} | {n_ckpt} | failed | | {r['error']} |")
                continue
            results[(T, window)] = r
            say(f"| {T} | {T * SUBSTEPS:,} | {window} | {n_ckpt} | {r['peak_bytes'] / 2**20:.1f} MiB "
                f"| {r['seconds']:.1f} | measured ({r['method']}) |")
    if args.quick:
        say("\n(--quick: the 1000-control-step runs were skipped: the small horizons' resident memory is dominated by "
            "allocator noise, so they are not extrapolated)")
    n = 1928
    say(f"\n(model: a checkpoint is (x, v) = {n * 6 * 4 / 1024:.0f} KiB; a window keeps 3 (N, 3) float32 arrays per "
        f"substep, {n * 9 * 4 / 1024:.0f} KiB; the increase also holds the allocator's and Warp's caches. The "
        f"reference keeps one control step on the GPU and a CPU checkpoint per control step.)")


# --- main ----------------------------------------------------------------------------------------------

def throughput_table(args, have_taichi: bool) -> None:
    say(f"\n## Throughput (control steps / s, one control step = {SUBSTEPS} substeps of {DT:g} s)\n")
    say("| scene | ours object | ours fwd | ours fwd+bwd | bwd/fwd | Taichi fwd | Taichi fwd+bwd (1 control step, Tape) "
        "| fwd ours / Taichi | fwd+bwd ours / Taichi |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for scene, kind in (("surface", "analytic"), ("surface", "mesh"), ("grasp", "analytic")):
        model, g, contact, particles = build(scene, kind)
        state = pressed_state(model)
        T = args.steps
        tf, final = ours_forward(model, contact, state, T)
        ff, fb = ours_forward_backward(model, contact, state, T)
        r_f, r_fb = T / tf, T / (ff + fb)
        ti_f = ti_fb = None
        if have_taichi and kind == "analytic":
            td = taichi_dome(model, g, particles, CONTACT[scene])
            a, b = taichi_times(td, state, T)
            ti_f, ti_fb = T / a, 1.0 / b
            # Elements' forces sum to zero, so the last substep's total nodal force is the contact's.
            notes.append(f"{scene}: total contact force on the sensor at the end of the first control step: ours "
                         f"{fmt_vec(first_step_force(model, contact, state))} ({contact.nodes.numel()} gel nodes), "
                         f"Taichi {fmt_vec(td.f.to_numpy()[SUBSTEPS - 1].sum(0))} ({particles.shape[0]:,} particles, "
                         f"k_n per particle)")
        obj = {"analytic": type(contact.obj.sdf).__name__, "mesh": "MeshSDF (BVH)"}[kind]
        fmt = lambda r: "n/a" if r is None else f"{r:.2f}"  # noqa: E731
        rat = lambda a, b: "n/a" if b is None else f"{a / b:.2f}x"  # noqa: E731
        say(f"| {scene} | {obj} | {r_f:.2f} | {r_fb:.2f} | {fb / ff:.2f} | {fmt(ti_f)} | {fmt(ti_fb)} "
            f"| {rat(r_f, ti_f)} | {rat(r_fb, ti_fb)} |")
    for line in notes:
        say(f"\n{line}")
    if not have_taichi:
        say("\nTaichi columns: n/a (taichi is not importable; `pip install taichi==1.7.4`, the `taichi` extra).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and horizons")
    ap.add_argument("--steps", type=int, default=None, help="control steps per throughput run (default 4, quick 2)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 2 if args.quick else 4

    import torch

    torch.set_num_threads(1)
    if args.child:
        spec = json.loads(args.child)
        model, g, contact, _ = build("surface")
        state = pressed_state(model)
        _fb_once(model, contact, state, 1, spec["window"])  # warm-up: kernels loaded
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            method, base = "VmHWM", _status_kib()["VmRSS"]
        except OSError:
            method, base = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tf, tb = _fb_once(model, contact, state, spec["steps"], spec["window"])
        peak = _status_kib()["VmHWM"] if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(dict(seconds=tf + tb, peak_bytes=max(0, peak - base) * 1024.0, method=method)), flush=True)
        return

    from bench_env import cpu_name, warp_version

    from diffworld.engine.runtime import init_warp

    init_warp()
    have_taichi, ti_version = taichi_available()
    t_start = time.perf_counter()
    say("# diffworld tactile benchmark (dome: surface following, grasp)")
    say(f"\n{cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; torch {torch.__version__} (1 thread), "
        f"warp {warp_version()}, taichi {ti_version if have_taichi else 'not available'} (cpu, 1 thread); float32")
    model, g, _, _ = build("surface")
    from diffworld.sims import fem

    lim = fem.stable_dt(model)
    say(f"dome: {model.n_nodes:,} nodes, {model.n_tets:,} tets, {g.contact_faces.shape[0]:,} contact triangles, "
        f"{g.contact_nodes.numel()} contact nodes; stable dt {lim.dt:.3g} (dt {DT:g} = {DT / lim.dt:.4f} of it)")
    if have_taichi:
        dx, rel = elastic_check(model, g)
        say(f"check (no contact, 1 control step): max |x ours - x Taichi| / radius {dx:.1e}; "
            f"d loss / d translation rel. diff {rel:.1e}")
    throughput_table(args, have_taichi)
    query_table(args, have_taichi)
    if not args.no_memory:
        memory_table(args)
    say(f"\ntotal wall time: {time.perf_counter() - t_start:.0f} s; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
