"""Taichi baseline for the MPM benchmark: the same MLS-MPM substep as ``diffworld.sims.mpm``, forward only.

FluidLab-style formulation, written for this benchmark:

* 3D MLS-MPM with APIC transfers, quadratic B-splines (3x3x3 stencil), float32;
* grid: 64 cells on the unit cube (65^3 nodes, dx = 1/64), free-slip walls 3 nodes thick (the
  outward normal component of a node velocity is zeroed);
* P2G scatters ``w (m v + A dpos)`` and ``w m`` with ``A = -dt V (4/dx^2) tau + m C``;
* grid: ``v = mv / m + dt g``, then the walls;
* G2P: ``v = sum w v_i``, ``C = (4/dx^2) sum w v_i dpos^T``, ``x += dt v``,
  ``F = (I + dt C) F``, then the plastic projection of F;
* laws: water (``tau = lam J (J-1) I``, then ``F <- J^(1/3) I``), fixed corotated
  (``tau = 2 mu (F - R) F^T + lam J (J-1) I``, R the polar rotation from ``ti.svd``), von Mises
  plasticine on Hencky strain (``eps = log(max(sigma, 0.05))``,
  ``tau = U (2 mu eps + lam tr(eps)) U^T``, return mapping of the deviatoric part onto the radius
  ``tau_y / (2 mu)``, ``F = U diag(exp(eps)) V^T``).

Each substep is three kernel launches: clear grid + P2G (one kernel), grid update, G2P with the
plastic projection fused in. State (x, v, C, F) is updated in place (Taichi's best case for a
forward-only run). There is no bounds check on grid indices: particles must stay in the interior.

Usage (stand-alone)::

    python benchmarks/mpm_taichi.py [--material water|jelly|plasticine] [--particles 100000] [--substeps 20]

From Python: ``taichi_throughput(material, n_particles, n_substeps)`` returns particle-substeps
per second (``ti.init(arch=ti.cpu, cpu_max_num_threads=2)`` unless told otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

import numpy as np

# No network version check (a background thread at ti.init) during a benchmark.
os.environ.setdefault("TI_SKIP_VERSION_CHECK", "ON")
# Kernel launches unwrapped even while the banner is redirected (a replaced sys.stdout at import
# otherwise makes Taichi wrap every kernel call to flush its print buffer).
os.environ.setdefault("TI_ENABLE_PYBUF", "0")

RESOLUTION = 64
BOUND = 3
DT = 1.0e-4
GRAVITY = (0.0, 0.0, -9.8)
DENSITY = 1000.0
PPC = 8
LOG_CLAMP = 0.05

# law, E [Pa], nu, yield stress [Pa]; keyed by diffworld's material names (and the law names).
MATERIALS = {
    "water": ("fluid", 1.0e5, 0.3, 0.0),
    "jelly": ("corotated", 1.0e5, 0.2, 0.0),
    "plasticine": ("von_mises", 3.0e5, 0.25, 5.0e3),
}
ALIASES = {"fluid": "water", "corotated": "jelly", "von_mises": "plasticine"}
LAW_ID = {"fluid": 0, "corotated": 1, "von_mises": 2}


def block_positions(n_particles: int, seed: int = 0) -> np.ndarray:
    """Uniform random positions in a cube holding ``n_particles`` at 8 per cell (float32, (N, 3)).

    The cube is centred in x and y and its bottom sits at z = 0.1 (middle-lower part of the
    domain). The points are sorted by cell so memory order follows space, like a lattice fill.
    """
    dx = 1.0 / RESOLUTION
    side = (n_particles * dx ** 3 / PPC) ** (1.0 / 3.0)
    lo = np.array([0.5 - side / 2, 0.5 - side / 2, 0.1])
    rng = np.random.default_rng(seed)
    x = lo + rng.random((n_particles, 3)) * side
    cell = np.floor(x / dx).astype(np.int64)
    order = np.lexsort((cell[:, 2], cell[:, 1], cell[:, 0]))
    return x[order].astype(np.float32)


def _resolve(material: str) -> tuple[str, float, float, float]:
    name = ALIASES.get(material, material)
    if name not in MATERIALS:
        raise ValueError(f"material: expected one of {sorted(MATERIALS)} (or {sorted(ALIASES)}), got {material!r}")
    return MATERIALS[name]


class TaichiMPM:
    """One block of particles of one material on the 64^3 grid (Taichi fields and kernels).

    ``ti.init`` must have been called; fields are allocated by the constructor.
    """

    def __init__(self, material: str, positions: np.ndarray, dt: float = DT) -> None:
        ti = import_taichi()

        law, E, nu, yield_stress = _resolve(material)
        law_id = LAW_ID[law]
        n = int(positions.shape[0])
        n_nodes = RESOLUTION + 1
        dx = 1.0 / RESOLUTION
        inv_dx = float(RESOLUTION)
        p_vol = dx ** 3 / PPC
        p_mass = DENSITY * p_vol
        mu = E / (2 * (1 + nu))
        lam = E * nu / ((1 + nu) * (1 - 2 * nu))
        radius = yield_stress / (2 * mu)
        stress_scale = -dt * p_vol * 4 * inv_dx * inv_dx
        gravity = ti.Vector(GRAVITY)
        f32 = ti.f32

        self.n = n
        self.x = ti.Vector.field(3, f32, n)
        self.v = ti.Vector.field(3, f32, n)
        self.C = ti.Matrix.field(3, 3, f32, n)
        self.F = ti.Matrix.field(3, 3, f32, n)
        self.grid_mv = ti.Vector.field(3, f32, (n_nodes,) * 3)
        self.grid_m = ti.field(f32, (n_nodes,) * 3)
        self.grid_v = ti.Vector.field(3, f32, (n_nodes,) * 3)
        x, v, C, F = self.x, self.v, self.C, self.F
        grid_mv, grid_m, grid_v = self.grid_mv, self.grid_m, self.grid_v

        @ti.func
        def hencky(sig):
            return ti.Vector([ti.log(ti.max(sig[i, i], LOG_CLAMP)) for i in ti.static(range(3))])

        @ti.func
        def kirchhoff(Fp):
            J = Fp.determinant()
            eye = ti.Matrix.identity(f32, 3)
            tau = ti.Matrix.zero(f32, 3, 3)
            if ti.static(law_id == 0):
                tau = lam * J * (J - 1.0) * eye
            elif ti.static(law_id == 1):
                U, sig, V = ti.svd(Fp, f32)
                R = U @ V.transpose()
                tau = 2.0 * mu * (Fp - R) @ Fp.transpose() + lam * J * (J - 1.0) * eye
            else:
                U, sig, V = ti.svd(Fp, f32)
                eps = hencky(sig)
                t = 2.0 * mu * eps + lam * eps.sum()
                tau = U @ ti.Matrix([[t[0], 0.0, 0.0], [0.0, t[1], 0.0], [0.0, 0.0, t[2]]]) @ U.transpose()
            return tau

        @ti.func
        def project(Ft):
            Fn = Ft
            if ti.static(law_id == 0):
                J = Ft.determinant()
                Fn = ti.pow(J, 1.0 / 3.0) * ti.Matrix.identity(f32, 3)
            elif ti.static(law_id == 2):
                U, sig, V = ti.svd(Ft, f32)
                eps = hencky(sig)
                tr = eps.sum()
                dev = eps - tr / 3.0
                ndev = dev.norm()
                if ndev > radius:
                    eps = tr / 3.0 + radius * dev / ndev
                e = ti.exp(eps)
                Fn = U @ ti.Matrix([[e[0], 0.0, 0.0], [0.0, e[1], 0.0], [0.0, 0.0, e[2]]]) @ V.transpose()
            return Fn

        @ti.kernel
        def p2g():
            for I in ti.grouped(grid_m):
                grid_m[I] = 0.0
                grid_mv[I] = ti.Vector.zero(f32, 3)
            for p in x:
                gx = x[p] * inv_dx
                base = ti.floor(gx - 0.5).cast(int)
                fx = gx - base.cast(f32)
                w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]
                A = stress_scale * kirchhoff(F[p]) + p_mass * C[p]
                mv = p_mass * v[p]
                for off in ti.static(ti.grouped(ti.ndrange(3, 3, 3))):
                    dpos = (off.cast(f32) - fx) * dx
                    weight = w[off[0]][0] * w[off[1]][1] * w[off[2]][2]
                    grid_mv[base + off] += weight * (mv + A @ dpos)
                    grid_m[base + off] += weight * p_mass

        @ti.kernel
        def grid_update():
            for I in ti.grouped(grid_m):
                vn = ti.Vector.zero(f32, 3)
                if grid_m[I] > 0.0:
                    vn = grid_mv[I] / grid_m[I] + dt * gravity
                    for d in ti.static(range(3)):
                        if I[d] < BOUND and vn[d] < 0.0:
                            vn[d] = 0.0
                        if I[d] >= n_nodes - BOUND and vn[d] > 0.0:
                            vn[d] = 0.0
                grid_v[I] = vn

        @ti.kernel
        def g2p():
            for p in x:
                gx = x[p] * inv_dx
                base = ti.floor(gx - 0.5).cast(int)
                fx = gx - base.cast(f32)
                w = [0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1.0) ** 2, 0.5 * (fx - 0.5) ** 2]
                vn = ti.Vector.zero(f32, 3)
                B = ti.Matrix.zero(f32, 3, 3)
                for off in ti.static(ti.grouped(ti.ndrange(3, 3, 3))):
                    dpos = (off.cast(f32) - fx) * dx
                    weight = w[off[0]][0] * w[off[1]][1] * w[off[2]][2]
                    gv = grid_v[base + off]
                    vn += weight * gv
                    B += weight * gv.outer_product(dpos)
                Cn = 4.0 * inv_dx * inv_dx * B
                v[p] = vn
                C[p] = Cn
                x[p] += dt * vn
                F[p] = project((ti.Matrix.identity(f32, 3) + dt * Cn) @ F[p])

        self._kernels = (p2g, grid_update, g2p)
        self._x0 = np.ascontiguousarray(positions, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        """Back to the initial state: the given positions at rest, F = I, C = 0."""
        self.x.from_numpy(self._x0)
        self.v.fill(0.0)
        self.C.fill(0.0)
        self.F.from_numpy(np.tile(np.eye(3, dtype=np.float32), (self.n, 1, 1)))

    def substep(self) -> None:
        for k in self._kernels:
            k()

    def positions(self) -> np.ndarray:
        return self.x.to_numpy()


def import_taichi():
    """``import taichi`` without its start-up banner."""
    with contextlib.redirect_stdout(io.StringIO()):
        import taichi as ti
    return ti


def _init(arch: str, threads: int) -> None:
    ti = import_taichi()
    kwargs = dict(default_fp=ti.f32, random_seed=0, offline_cache=True, log_level=ti.WARN)
    with contextlib.redirect_stdout(io.StringIO()):  # "[Taichi] Starting on arch=..."
        if arch == "cpu":
            ti.init(arch=ti.cpu, cpu_max_num_threads=threads, **kwargs)
        else:
            ti.init(arch=ti.cuda, **kwargs)


def taichi_run(material: str, positions: np.ndarray, n_substeps: int, *, arch: str = "cpu", threads: int = 2,
               repeat: int = 3) -> tuple[float, np.ndarray]:
    """Simulate ``n_substeps`` from rest; returns (seconds, final positions).

    Two substeps are run first (kernel compilation, not timed). Then, ``repeat`` times, the block
    is reset to its initial state and ``n_substeps`` are timed between ``ti.sync()`` calls; the
    median is returned (the positions are those after the first timed run).
    """
    _init(arch, threads)
    ti = import_taichi()
    sim = TaichiMPM(material, positions)
    for _ in range(2):
        sim.substep()
    times, x = [], None
    for _ in range(max(1, repeat)):
        sim.reset()
        ti.sync()
        t0 = time.perf_counter()
        for _ in range(n_substeps):
            sim.substep()
        ti.sync()
        times.append(time.perf_counter() - t0)
        if x is None:
            x = sim.positions()
    if not np.isfinite(x).all():
        raise RuntimeError(f"taichi {material}: non-finite positions after {n_substeps} substeps")
    return float(np.median(times)), x


def taichi_throughput(material: str, n_particles: int, n_substeps: int, *, positions: np.ndarray | None = None,
                      arch: str = "cpu", threads: int = 2) -> float:
    """Forward throughput [particle-substeps / s] of ``n_substeps`` substeps of one block.

    Args:
        material: ``water``, ``jelly`` (fixed corotated) or ``plasticine`` (von Mises), or the law
            names ``fluid``, ``corotated``, ``von_mises``.
        n_particles: Block size (ignored when ``positions`` is given).
        n_substeps: Timed substeps (after a 2-substep compile warm-up; median of 3 runs).
        positions: Initial positions (N, 3) in the unit cube's interior; default
            :func:`block_positions`.
        arch: ``cpu`` (``cpu_max_num_threads=threads``) or ``cuda``.
        threads: CPU threads.
    """
    pos = block_positions(n_particles) if positions is None else np.asarray(positions, dtype=np.float32)
    seconds, _ = taichi_run(material, pos, n_substeps, arch=arch, threads=threads)
    return pos.shape[0] * n_substeps / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--material", default="water", choices=sorted(MATERIALS))
    ap.add_argument("--particles", type=int, default=100_000)
    ap.add_argument("--substeps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    rate = taichi_throughput(args.material, args.particles, args.substeps, arch=args.arch, threads=args.threads)
    print(f"taichi {args.material} N={args.particles} ({args.arch}, {args.threads} threads): "
          f"{rate:,.0f} particle-substeps/s ({args.particles * args.substeps / rate:.3f} s for {args.substeps})")


if __name__ == "__main__":
    main()
