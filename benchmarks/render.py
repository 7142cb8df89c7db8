"""Benchmark: the differentiable rasterizer, forward and forward + backward per view, at 128^2,
256^2 and 512^2 for ~10k and ~100k triangles, beside Mitsuba 3's silhouette-aware vertex
gradients on the same mesh and view.

Ours: :func:`diffworld.render.images.render_views` (rasterize by BVH ray casting, antialiased
mask, depth, normals), and its backward for a loss on all three w.r.t. the vertex positions.
Mitsuba 3 (``llvm_ad_rgb``, the ``direct_projective`` integrator, 16 samples per pixel, a
constant emitter and a diffuse mesh): ``mi.render`` and ``dr.backward`` of an image loss w.r.t.
``vertex_positions``, timed after one warm-up (its JIT). Mitsuba is only run if it imports:
``pip install mitsuba==3.9.1`` and, on Debian 12 (whose libLLVM 15 aborts in its code
generation), ``apt-get install libllvm19``; the script finds the newest ``libLLVM`` >= 16 under
``/usr/lib`` for ``DRJIT_LIBLLVM_PATH``. Otherwise its columns say "skipped" and why.
It runs at 10k triangles, 128^2 and 256^2 only (tens of seconds per iteration).

Meshes: UV spheres of radius 0.3 m with a bump pattern (so that silhouettes are not circles),
one camera at 1 m. float32, one CPU thread for torch and Warp; Mitsuba uses its own threads
(``--mitsuba-threads``, default 2: this machine's cores).

Usage::

    python benchmarks/render.py [--quick] [--no-mitsuba]

Runtime on a 2-core CPU: about 4 minutes with Mitsuba (``--quick``: 128^2 and 256^2, 10k only).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np
import torch
import trimesh

from diffworld.engine.runtime import init_warp
from diffworld.render.camera import orbit_views
from diffworld.render.images import render_views


def _mesh(n_faces: int) -> trimesh.Trimesh:
    n = int(round((n_faces / 4) ** 0.5))  # a UV sphere of count (n, n) has ~4 n^2 triangles
    m = trimesh.creation.uv_sphere(radius=0.3, count=[n, n])
    v = m.vertices.copy()
    d = v / np.linalg.norm(v, axis=1, keepdims=True)
    v = d * (0.3 + 0.02 * np.sin(7 * d[:, 0]) * np.sin(5 * d[:, 1]) * np.sin(6 * d[:, 2]))[:, None]
    return trimesh.Trimesh(v, m.faces, process=False)


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _ours(mesh: trimesh.Trimesh, res: int) -> tuple[float, float]:
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces, dtype=torch.int64)
    views = orbit_views((0, 0, 0), 0.3, 1, res, res, margin=1.2)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, res, res, generator=g)

    def forward():
        with torch.no_grad():
            render_views(v, f, views)

    def backward():
        x = v.clone().requires_grad_()
        r = render_views(x, f, views)
        ((r.mask * w).sum() + (r.depth * w).sum() + (r.normal.sum(-1) * w).sum()).backward()

    return _best(forward), _best(backward)


def _find_llvm() -> str | None:
    """The newest libLLVM >= 16 in the usual Debian places."""
    import re

    found = []
    for p in glob.glob("/usr/lib/llvm-*/lib/libLLVM*.so*") + glob.glob("/usr/lib/*-linux-gnu/libLLVM*.so*"):
        m = re.search(r"(?:llvm-|libLLVM-?|\.so\.)(\d+)", p)
        if m and int(m.group(1)) >= 16:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _mitsuba_setup():
    """(mitsuba, drjit) or the reason they cannot run."""
    if "DRJIT_LIBLLVM_PATH" not in os.environ:
        lib = _find_llvm()
        if lib is None:
            return "no libLLVM >= 16 found (Debian 12: apt-get install libllvm19)"
        os.environ["DRJIT_LIBLLVM_PATH"] = lib
    try:
        import drjit as dr
        import mitsuba as mi

        mi.set_variant("llvm_ad_rgb")
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, and say why
        return f"mitsuba unavailable ({type(exc).__name__}: {str(exc)[:120]}; pip install mitsuba==3.9.1)"
    return mi, dr


def _mitsuba(mi, dr, mesh: trimesh.Trimesh, res: int, spp: int = 16) -> tuple[float, float]:
    views = orbit_views((0, 0, 0), 0.3, 1, res, res, margin=1.2, dtype=torch.float64)
    c2w = views.cam_to_world[0].numpy()
    eye, fwd, down = c2w[:3, 3], c2w[:3, 2], c2w[:3, 1]
    fov = float(np.degrees(2 * np.arctan(0.5 * res / float(views.fy[0]))))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.ply")
        mesh.export(path)
        scene = mi.load_dict({
            "type": "scene",
            "integrator": {"type": "direct_projective"},
            "sensor": {"type": "perspective", "fov": fov, "fov_axis": "y",
                       "to_world": mi.ScalarTransform4f().look_at(origin=eye.tolist(), target=(eye + fwd).tolist(),
                                                                  up=(-down).tolist()),
                       "film": {"type": "hdrfilm", "width": res, "height": res, "rfilter": {"type": "box"},
                                "sample_border": True},
                       "sampler": {"type": "independent", "sample_count": spp}},
            "emitter": {"type": "constant"},
            "mesh": {"type": "ply", "filename": path, "bsdf": {"type": "diffuse"}},
        })
        params = mi.traverse(scene)
        key = "mesh.vertex_positions"
        ref = mi.render(scene, seed=1)

        def forward():
            np.asarray(mi.render(scene, seed=0))  # to numpy: forces the evaluation

        def backward():
            dr.enable_grad(params[key])
            params.update()
            img = mi.render(scene, params, seed=0)
            loss = dr.mean(dr.square(img - ref))
            dr.backward(loss)
            np.asarray(dr.grad(params[key]))
            dr.disable_grad(params[key])

        return _best(forward, 1), _best(backward, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128^2 and 256^2 at 10k triangles only")
    ap.add_argument("--no-mitsuba", action="store_true")
    ap.add_argument("--mitsuba-threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_warp()
    mi = None if args.no_mitsuba else _mitsuba_setup()
    why = "--no-mitsuba" if args.no_mitsuba else (mi if isinstance(mi, str) else None)
    if why is None:
        mi[1].set_thread_count(args.mitsuba_threads)
    sizes = [(10_000, 128), (10_000, 256)] if args.quick else [
        (n, r) for n in (10_000, 100_000) for r in (128, 256, 512)]
    print("| triangles | pixels | ours fwd [ms/view] | ours fwd+bwd [ms/view] | Mitsuba fwd [ms] | "
          "Mitsuba fwd+bwd [ms] | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|")
    for n, res in sizes:
        mesh = _mesh(n)
        of, ob = _ours(mesh, res)
        mf = mb = None
        if why is None and n <= 10_000 and res <= 256:
            mf, mb = _mitsuba(mi[0], mi[1], mesh, res)
        cell = lambda t: "skipped" if t is None else f"{t:.0f}"  # noqa: E731
        ratio = f"{mb / ob:.0f}x" if mb is not None else "-"
        print(f"| {len(mesh.faces):,} | {res}^2 | {of:.1f} | {ob:.1f} | {cell(mf)} | {cell(mb)} | {ratio} |",
              flush=True)
    if why is not None:
        print(f"\nMitsuba skipped: {why}")


if __name__ == "__main__":
    main()
