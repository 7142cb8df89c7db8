"""Taichi baseline for the tactile benchmark: DiffTactile's formulation of the dome sensor step,
written for this benchmark from the facts in ``shared/reference/tactile.md`` (no reference code).

One substep ``s`` (state fields carry a substep index, as DiffTactile's do, so that
``ti.ad.Tape`` can replay a control step backwards):

* elastic forces: per tet ``F = Ds B^-1`` (``Ds`` the edge columns x_b - x_a, x_c - x_a,
  x_d - x_a), stable Neo-Hookean ``P = mu (1 - 1/(I_C + 1)) F + lam (J - alpha) dJ/dF`` with
  ``alpha = 1 + 3 mu / (4 lam)`` and ``dJ/dF`` the cofactor (columns f1 x f2, f2 x f0, f0 x f1),
  ``H = -V P B^-T`` to nodes b, c, d (columns of H) and minus their sum to node a;
* contact (penalty, object given as particles): a non-differentiated kernel finds, for every
  object particle, the nearest sensor triangle by centroid distance by brute force
  (O(N_obj x N_tri)); a differentiated kernel takes the signed distance along that triangle's
  normal, and if negative and the particle projects inside the triangle (barycentric test)
  applies ``f_n = -(k_n + k_d max(v_rel . n, 0)) sdf n`` and
  ``f_t = (v_t / |v_t|) min(k_t |v_t|, mu |f_n|)`` for ``|v_t| > 1e-4`` (``v_rel`` the
  triangle's mean node velocity minus the particle's) to the particle and minus a third of it to
  each triangle node;
* explicit symplectic Euler: ``v' = v + dt f / m`` (lumped masses), ``x' = x + dt v'``; the
  kinematic base nodes go to ``anchor + translation[s]`` with ``v' = (x' - x) / dt``.

Everything is float32 on ``ti.cpu``. ``TaichiDome.forward(n)`` runs n control steps;
``TaichiDome.forward_backward()`` one control step under ``ti.ad.Tape``.

(No ``from __future__ import annotations`` here: Taichi reads the kernels' annotations as types.)
"""

import contextlib
import io
import os

import numpy as np

# No network version check at ti.init, no print-buffer wrapping of every kernel call.
os.environ.setdefault("TI_SKIP_VERSION_CHECK", "ON")
os.environ.setdefault("TI_ENABLE_PYBUF", "0")

_TI = None


def import_taichi(threads: int = 1):
    """``import taichi`` and ``ti.init(arch=ti.cpu, cpu_max_num_threads=threads)`` once (banner muted)."""
    global _TI
    if _TI is None:
        with contextlib.redirect_stdout(io.StringIO()):
            import taichi as ti

            ti.init(arch=ti.cpu, cpu_max_num_threads=threads, default_fp=ti.f32, random_seed=0)
        _TI = ti
    return _TI


class TaichiDome:
    """The dome's fields and kernels for ``substeps`` substeps per control step.

    Args:
        vertices: (N, 3) rest positions. tets: (T, 4). Dm_inv: (T, 3, 3) inverse rest edge
        matrices. volume: (T,). mass: (N,) lumped masses. kinematic: (N,) bool base nodes.
        faces: (F, 3) outward contact triangles. particles: (P, 3) object particles (static).
        mu_s, lam_s: the stable Neo-Hookean constants. contact: (k_n, k_d, k_t, mu) or None.
        dt: substep. substeps: substeps per control step (taped together). loss_nodes: nodes
        whose final squared positions are the loss.
    """

    def __init__(self, vertices, tets, Dm_inv, volume, mass, kinematic, faces, particles, mu_s, lam_s, contact,
                 dt, substeps, loss_nodes):
        ti = import_taichi()
        f32 = ti.f32
        n, nt, nf = vertices.shape[0], tets.shape[0], faces.shape[0]
        n_p = particles.shape[0] if contact is not None else 0
        S = substeps
        self.ti, self.S, self.n, self.n_p, self.nf = ti, S, n, n_p, nf
        self.x = ti.Vector.field(3, f32, (S + 1, n), needs_grad=True)
        self.v = ti.Vector.field(3, f32, (S + 1, n), needs_grad=True)
        self.f = ti.Vector.field(3, f32, (S, n), needs_grad=True)
        self.trans = ti.Vector.field(3, f32, S, needs_grad=True)
        self.loss = ti.field(f32, (), needs_grad=True)
        self.anchor = ti.Vector.field(3, f32, n)
        self.tets = ti.Vector.field(4, ti.i32, nt)
        self.Binv = ti.Matrix.field(3, 3, f32, nt)
        self.vol = ti.field(f32, nt)
        self.mass = ti.field(f32, n)
        self.kin = ti.field(ti.i32, n)
        self.faces = ti.Vector.field(3, ti.i32, nf)
        self.centroid = ti.Vector.field(3, f32, nf)
        self.obj = ti.Vector.field(3, f32, max(n_p, 1))
        self.nearest = ti.field(ti.i32, max(n_p, 1))
        self.loss_nodes = ti.field(ti.i32, loss_nodes.shape[0])
        self.anchor.from_numpy(vertices.astype(np.float32))
        self.tets.from_numpy(tets.astype(np.int32))
        self.Binv.from_numpy(Dm_inv.astype(np.float32))
        self.vol.from_numpy(volume.astype(np.float32))
        self.mass.from_numpy(mass.astype(np.float32))
        self.kin.from_numpy(kinematic.astype(np.int32))
        self.faces.from_numpy(faces.astype(np.int32))
        if n_p:
            self.obj.from_numpy(particles.astype(np.float32))
        self.loss_nodes.from_numpy(loss_nodes.astype(np.int32))
        x, v, f, trans, loss = self.x, self.v, self.f, self.trans, self.loss
        anchor, tets_f, Binv, vol, mass_f, kin = self.anchor, self.tets, self.Binv, self.vol, self.mass, self.kin
        faces_f, centroid, obj, nearest, lnodes = self.faces, self.centroid, self.obj, self.nearest, self.loss_nodes
        mu, lam = float(mu_s), float(lam_s)
        alpha = 1.0 + 0.75 * mu / lam
        k_n, k_d, k_t, mu_f = contact if contact is not None else (0.0, 0.0, 0.0, 0.0)
        dt = float(dt)
        n_loss = loss_nodes.shape[0]

        @ti.kernel
        def elastic(s: ti.i32):
            for e in range(nt):
                a, b, c, d = tets_f[e][0], tets_f[e][1], tets_f[e][2], tets_f[e][3]
                xa = x[s, a]
                Ds = ti.Matrix.cols([x[s, b] - xa, x[s, c] - xa, x[s, d] - xa])
                B = Binv[e]
                F = Ds @ B
                f0 = ti.Vector([F[0, 0], F[1, 0], F[2, 0]])
                f1 = ti.Vector([F[0, 1], F[1, 1], F[2, 1]])
                f2 = ti.Vector([F[0, 2], F[1, 2], F[2, 2]])
                dJ = ti.Matrix.cols([f1.cross(f2), f2.cross(f0), f0.cross(f1)])
                J = f0.dot(f1.cross(f2))
                Ic = F.norm_sqr()
                P = mu * (1.0 - 1.0 / (Ic + 1.0)) * F + lam * (J - alpha) * dJ
                H = -vol[e] * P @ B.transpose()
                h1 = ti.Vector([H[0, 0], H[1, 0], H[2, 0]])
                h2 = ti.Vector([H[0, 1], H[1, 1], H[2, 1]])
                h3 = ti.Vector([H[0, 2], H[1, 2], H[2, 2]])
                f[s, b] += h1
                f[s, c] += h2
                f[s, d] += h3
                f[s, a] += -(h1 + h2 + h3)

        @ti.ad.no_grad
        @ti.kernel
        def centroids(s: ti.i32):
            for t in range(nf):
                centroid[t] = (x[s, faces_f[t][0]] + x[s, faces_f[t][1]] + x[s, faces_f[t][2]]) / 3.0

        @ti.ad.no_grad
        @ti.kernel
        def detect():
            for p in range(n_p):
                q = obj[p]
                best = 3.0e38
                arg = 0
                for t in range(nf):
                    d2 = (q - centroid[t]).norm_sqr()
                    if d2 < best:
                        best = d2
                        arg = t
                nearest[p] = arg

        @ti.kernel
        def contact_forces(s: ti.i32):
            for p in range(n_p):
                t = nearest[p]
                i0, i1, i2 = faces_f[t][0], faces_f[t][1], faces_f[t][2]
                a, b, c = x[s, i0], x[s, i1], x[s, i2]
                nrm = (b - a).cross(c - a).normalized()
                q = obj[p]
                sdf = (q - a).dot(nrm)
                if sdf < 0.0:
                    qp = q - sdf * nrm
                    u = (b - qp).cross(c - qp).dot(nrm)
                    w = (c - qp).cross(a - qp).dot(nrm)
                    z = (a - qp).cross(b - qp).dot(nrm)
                    if u >= 0.0 and w >= 0.0 and z >= 0.0:
                        v_rel = (v[s, i0] + v[s, i1] + v[s, i2]) / 3.0  # the object is static
                        vn = v_rel.dot(nrm)
                        fn = -(k_n + k_d * ti.max(vn, 0.0)) * sdf * nrm
                        vt = v_rel - vn * nrm
                        vt_norm = vt.norm()
                        ft = ti.Vector([0.0, 0.0, 0.0])
                        if vt_norm > 1.0e-4:
                            ft = vt / vt_norm * ti.min(k_t * vt_norm, mu_f * fn.norm())
                        share = (fn + ft) / 3.0
                        f[s, i0] -= share
                        f[s, i1] -= share
                        f[s, i2] -= share

        @ti.kernel
        def integrate(s: ti.i32):
            for i in range(n):
                if kin[i] != 0:
                    xn = anchor[i] + trans[s]
                    x[s + 1, i] = xn
                    v[s + 1, i] = (xn - x[s, i]) / dt
                else:
                    vn = v[s, i] + dt * f[s, i] / mass_f[i]
                    v[s + 1, i] = vn
                    x[s + 1, i] = x[s, i] + dt * vn

        @ti.kernel
        def compute_loss():
            for k in range(n_loss):
                loss[None] += x[S, lnodes[k]].norm_sqr()

        @ti.kernel
        def clear_forces():
            for s, i in f:
                f[s, i] = ti.Vector([0.0, 0.0, 0.0])

        @ti.kernel
        def restart():
            # the next control step starts from this one's last substep
            for i in range(n):
                x[0, i] = x[S, i]
                v[0, i] = v[S, i]

        self._k = dict(elastic=elastic, centroids=centroids, detect=detect, contact=contact_forces,
                       integrate=integrate, loss=compute_loss, clear=clear_forces, restart=restart)

    def set_state(self, x0: np.ndarray, v0: np.ndarray) -> None:
        """Substep 0's positions and velocities, (N, 3) each."""
        xs = self.x.to_numpy()
        vs = self.v.to_numpy()
        xs[0], vs[0] = x0, v0
        self.x.from_numpy(xs.astype(np.float32))
        self.v.from_numpy(vs.astype(np.float32))

    def set_translation(self, trans: np.ndarray) -> None:
        """Base translation at the end of each substep of the control step, (S, 3)."""
        self.trans.from_numpy(trans.astype(np.float32))

    def _substeps(self) -> None:
        k = self._k
        for s in range(self.S):
            k["elastic"](s)
            if self.n_p:
                k["centroids"](s)
                k["detect"]()
                k["contact"](s)
            k["integrate"](s)

    def forward(self, n_control: int, translations=None) -> None:
        """``n_control`` control steps from the current state; ``translations`` (n_control * S, 3)
        sets each control step's base translations (None: keep the current ones)."""
        for c in range(n_control):
            if c:
                self._k["restart"]()
            if translations is not None:
                self.set_translation(translations[c * self.S:(c + 1) * self.S])
            self._k["clear"]()
            self._substeps()
        self.ti.sync()

    def forward_backward(self) -> None:
        """One control step and its gradient (``ti.ad.Tape`` on the loss)."""
        self._k["clear"]()
        self.loss[None] = 0.0
        with self.ti.ad.Tape(loss=self.loss):
            self._substeps()
            self._k["loss"]()
        self.ti.sync()

    def final(self):
        """The last substep's (x, v), (N, 3) each."""
        return self.x.to_numpy()[self.S], self.v.to_numpy()[self.S]

    def contact_query(self) -> None:
        """The brute-force nearest-triangle search alone (centroids of substep 0)."""
        self._k["centroids"](0)
        self._k["detect"]()
        self.ti.sync()


def brute_force_nearest(centroids: np.ndarray, points: np.ndarray):
    """A Taichi kernel finding, for each point, its nearest centroid by brute force.

    Returns:
        ``run()`` -> (P,) int32 nearest triangle per point (a closure over fields sized once).
    """
    ti = import_taichi()
    nf, n_p = centroids.shape[0], points.shape[0]
    cf = ti.Vector.field(3, ti.f32, nf)
    pf = ti.Vector.field(3, ti.f32, n_p)
    out = ti.field(ti.i32, n_p)
    cf.from_numpy(centroids.astype(np.float32))
    pf.from_numpy(points.astype(np.float32))

    @ti.kernel
    def nearest():
        for p in range(n_p):
            q = pf[p]
            best = 3.0e38
            arg = 0
            for t in range(nf):
                d2 = (q - cf[t]).norm_sqr()
                if d2 < best:
                    best = d2
                    arg = t
            out[p] = arg

    def run():
        nearest()
        ti.sync()
        return out

    return run
