"""Warp kernels of the MLS-MPM solver (one module: one compile, one kernel-cache entry).

One substep is these launches (shapes: N particles; the grid is the box of nodes that particle
stencils touch, see ``solver.Stepper``)::

    stress_eval       per particle   F, material         -> elastic tau          (window start only; stress_adjoint)
    particle_affine   per particle   F, C, v, tau, mat.  -> A (3x3), p = m v, m  (hand adjoint: particle_affine_adjoint)
    p2g               per particle   x, p, A, m          -> grid momentum, mass  (hand adjoint: p2g_adjoint, a gather)
    grid_velocity     per node       momentum, mass      -> grid v               (automatic adjoint)
    grid_collider     per node, one launch per collider  -> grid v               (automatic adjoint)
    grid_walls        per node       grid v              -> grid v               (automatic adjoint)
    (without colliders, grid_velocity_walls does both grid_velocity and grid_walls in one launch;
     hand adjoint: grid_velocity_walls_adjoint)
    g2p               per particle   x, F, grid v        -> x', v', C', F_trial  (hand adjoint: g2p_adjoint, a scatter)
    plasticity_stress per particle   F_trial, material   -> F', tau(F')          (hand adjoint: plasticity_stress_adjoint)

Each substep does one SVD per particle (none for fluids and Neo-Hookean; a Newton polar
iteration for fixed corotated): the plastic projection's SVD also gives the elastic stress at the
projected F, which the next substep uses; the adjoint likewise uses one SVD for both.

APIC/MLS transfer with quadratic B-splines: ``A = -dt V0 (4/dx^2) tau + m C`` is scattered as
``w (p + A dpos)``; ``C' = (4/dx^2) sum w v_i dpos^T``. The transfer kernels split
``dpos = (o - fx) dx`` (node offset o) so the 27-node loops do a few flops per node, and they
skip per-node bounds checks: a particle whose stencil leaves the grid is dropped from the
transfer (``rollout.check_state`` reports it).

Warp's automatic adjoints of the transfer kernels re-run their 27-node loops and cost ~7x the
forward on CPU; those of the stress and plasticity kernels re-run the SVD two or three times. All
of them are written by hand (tested against finite differences and against Warp's automatic
adjoints). The per-node kernels are pure maps: their automatic adjoints cost 2-3x their forward,
and the one every model without colliders runs, ``grid_velocity_walls``, has a hand-written one.

The constitutive stage (stress, return map, their adjoints) calls the law device functions of
:mod:`diffworld.sims.constitutive.warp_laws`, dispatched on each particle's law code; particles
with the code ``EXTERNAL`` (a torch law) get zeros there and the solver fills their rows.

Kernels are built per precision by :func:`build` (float32 and float64) and cached.
"""

import warp as wp

from diffworld.engine.runtime import init_warp
from diffworld.sims.common.colliders import CONTACT_WEIGHTS, SHAPES
from diffworld.sims.constitutive.laws import LAWS
from diffworld.sims.constitutive.warp_laws import (kirchhoff_stress, kirchhoff_usv, kirchhoff_vjp,
                                                   kirchhoff_vjp_usv, needs_svd, project, project_usv,
                                                   project_vjp_usv, viscous_stress)
from diffworld.sims.constitutive.warp_svd import cofactor

__all__ = ["CONTACT_WEIGHT", "LAW", "SHAPE", "WALL", "build"]

# Constitutive law code of each built-in law (the particles' ``law`` array).
LAW = {name: law.code for name, law in LAWS.items()}
# Collider shapes (local frame; z is the axis of capsules, cylinders and cups; planes face +z).
SHAPE = {name: code for code, name in enumerate(SHAPES)}  # the kernels' shape codes
# Domain wall behaviour.
WALL = {"slip": 0, "sticky": 1, "friction": 2}
# Soft-contact weights of a collider (Collider.contact_weight): the kernels' codes.
CONTACT_WEIGHT = {name: code for code, name in enumerate(CONTACT_WEIGHTS)}


def _build(dtype):  # noqa: C901 - one closure holds one precision's kernels
    vec3 = wp.types.vector(3, dtype)
    mat33 = wp.types.matrix((3, 3), dtype)
    quat = wp.types.quaternion(dtype)
    f = dtype

    # ---------------------------------------------------------------------------------------
    # Quadratic B-spline weights
    # ---------------------------------------------------------------------------------------

    @wp.func
    def bspline(x: vec3, lo: vec3, inv_dx: f):
        """Base node, local coordinate fx in [0.5, 1.5), weights W and their d/dfx (row = offset)."""
        gx = (x - lo) * inv_dx
        base = wp.vec3i(int(wp.floor(gx[0] - f(0.5))), int(wp.floor(gx[1] - f(0.5))), int(wp.floor(gx[2] - f(0.5))))
        fx = gx - vec3(f(base[0]), f(base[1]), f(base[2]))
        W = mat33()
        dW = mat33()
        for a in range(3):
            t = fx[a]
            W[0, a] = f(0.5) * (f(1.5) - t) * (f(1.5) - t)
            W[1, a] = f(0.75) - (t - f(1.0)) * (t - f(1.0))
            W[2, a] = f(0.5) * (t - f(0.5)) * (t - f(0.5))
            dW[0, a] = t - f(1.5)
            dW[1, a] = f(-2.0) * (t - f(1.0))
            dW[2, a] = t - f(0.5)
        return base, fx, W, dW

    @wp.func
    def on_grid(base: wp.vec3i, shape: wp.vec3i):
        # Whether the 3x3x3 stencil from `base` lies on the grid. A particle whose stencil does not
        # (it has left the domain; check_state reports it) takes no part in the transfers.
        return (base[0] >= 0 and base[1] >= 0 and base[2] >= 0 and base[0] + 2 < shape[0]
                and base[1] + 2 < shape[1] and base[2] + 2 < shape[2])

    # ---------------------------------------------------------------------------------------
    # Particle kernels
    # ---------------------------------------------------------------------------------------

    @wp.kernel
    def particle_affine(F: wp.array(dtype=mat33), C: wp.array(dtype=mat33), v: wp.array(dtype=vec3),
                        tau_e: wp.array(dtype=mat33), active: wp.array(dtype=wp.int32), eta: wp.array(dtype=f),
                        rho: wp.array(dtype=f), vol: wp.array(dtype=f), dt: f, inv_dx: f,
                        A: wp.array(dtype=mat33), p: wp.array(dtype=vec3), m: wp.array(dtype=f)):
        # tau_e: the elastic Kirchhoff stress at F, from the previous substep's plasticity_stress
        # (or stress_eval at the start of a window): the SVD is done once per substep.
        i = wp.tid()
        if active[i] == 0:
            A[i] = mat33(f(0.0))
            p[i] = vec3(f(0.0))
            m[i] = f(0.0)
            return
        mass = rho[i] * vol[i]
        tau = tau_e[i] + viscous_stress(C[i], F[i], eta[i])
        A[i] = tau * (-dt * vol[i] * f(4.0) * inv_dx * inv_dx) + C[i] * mass
        p[i] = v[i] * mass
        m[i] = mass

    @wp.kernel
    def plasticity(F_trial: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32), E: wp.array(dtype=f),
                   nu: wp.array(dtype=f), yield_stress: wp.array(dtype=f), friction_angle: wp.array(dtype=f),
                   theta_c: wp.array(dtype=f), theta_s: wp.array(dtype=f), F_out: wp.array(dtype=mat33)):
        i = wp.tid()
        F_out[i] = project(law[i], F_trial[i], E[i], nu[i], yield_stress[i], friction_angle[i], theta_c[i],
                           theta_s[i])

    @wp.kernel(enable_backward=False)
    def particle_affine_adjoint(F: wp.array(dtype=mat33), C: wp.array(dtype=mat33), v: wp.array(dtype=vec3),
                                tau_e: wp.array(dtype=mat33), active: wp.array(dtype=wp.int32),
                                eta: wp.array(dtype=f), rho: wp.array(dtype=f), vol: wp.array(dtype=f), dt: f,
                                inv_dx: f, adj_A: wp.array(dtype=mat33), adj_p: wp.array(dtype=vec3),
                                adj_m: wp.array(dtype=f), adj_F: wp.array(dtype=mat33), adj_C: wp.array(dtype=mat33),
                                adj_v: wp.array(dtype=vec3), adj_tau_e: wp.array(dtype=mat33),
                                adj_eta: wp.array(dtype=f), adj_rho: wp.array(dtype=f), adj_vol: wp.array(dtype=f)):
        # Hand-written adjoint of particle_affine (accumulates).
        i = wp.tid()
        if active[i] == 0:
            return
        Fi = F[i]
        Ci = C[i]
        mass = rho[i] * vol[i]
        k = -dt * f(4.0) * inv_dx * inv_dx
        gA = adj_A[i]
        gp = adj_p[i]
        g_mass = wp.ddot(gA, Ci) + wp.dot(gp, v[i]) + adj_m[i]
        G = gA * (k * vol[i])  # adjoint of tau
        # viscous stress (viscous_stress): dev(sym C) 2 eta J
        J = wp.determinant(Fi)
        D = (Ci + wp.transpose(Ci)) * f(0.5)
        Dd = D - wp.identity(n=3, dtype=f) * ((D[0, 0] + D[1, 1] + D[2, 2]) / f(3.0))
        tau = tau_e[i] + Dd * (f(2.0) * eta[i] * J)
        Gs = (G + wp.transpose(G)) * f(0.5)
        Gd = Gs - wp.identity(n=3, dtype=f) * ((Gs[0, 0] + Gs[1, 1] + Gs[2, 2]) / f(3.0))
        gDd = wp.ddot(G, Dd)
        adj_F[i] = adj_F[i] + cofactor(Fi) * (gDd * f(2.0) * eta[i])
        adj_C[i] = adj_C[i] + gA * mass + Gd * (f(2.0) * eta[i] * J)
        adj_v[i] = adj_v[i] + gp * mass
        adj_tau_e[i] = adj_tau_e[i] + G
        adj_eta[i] = adj_eta[i] + gDd * f(2.0) * J
        adj_rho[i] = adj_rho[i] + g_mass * vol[i]
        adj_vol[i] = adj_vol[i] + wp.ddot(gA, tau) * k + g_mass * rho[i]

    @wp.kernel(enable_backward=False)
    def plasticity_stress(F_trial: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32), E: wp.array(dtype=f),
                          nu: wp.array(dtype=f), yield_stress: wp.array(dtype=f), friction_angle: wp.array(dtype=f),
                          theta_c: wp.array(dtype=f), theta_s: wp.array(dtype=f), F_out: wp.array(dtype=mat33),
                          tau_out: wp.array(dtype=mat33)):
        # F' = project(F_trial) and the elastic stress tau(F') for the next substep, from one SVD
        # (the SVD laws: F' = U g(s) V^T keeps U and V); the others need none (corotated's polar
        # rotation is a Newton iteration).
        i = wp.tid()
        F = F_trial[i]
        L = law[i]
        U = wp.identity(n=3, dtype=f)
        s = vec3(f(1.0), f(1.0), f(1.0))
        V = wp.identity(n=3, dtype=f)
        if needs_svd(L):
            wp.svd3(F, U, s, V)
        Fn, sn = project_usv(L, F, U, s, V, E[i], nu[i], yield_stress[i], friction_angle[i], theta_c[i], theta_s[i])
        F_out[i] = Fn
        tau_out[i] = kirchhoff_usv(L, Fn, U, sn, V, E[i], nu[i])

    @wp.kernel
    def plasticity_stress_ref(F_trial: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32),
                              E: wp.array(dtype=f), nu: wp.array(dtype=f), yield_stress: wp.array(dtype=f),
                              friction_angle: wp.array(dtype=f), theta_c: wp.array(dtype=f),
                              theta_s: wp.array(dtype=f), F_out: wp.array(dtype=mat33),
                              tau_out: wp.array(dtype=mat33)):
        # Reference for tests: project then stress, two SVDs, Warp's automatic adjoint.
        i = wp.tid()
        Fn = project(law[i], F_trial[i], E[i], nu[i], yield_stress[i], friction_angle[i], theta_c[i], theta_s[i])
        F_out[i] = Fn
        tau_out[i] = kirchhoff_stress(law[i], Fn, E[i], nu[i])

    @wp.kernel(enable_backward=False)
    def plasticity_stress_adjoint(F_trial: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32),
                                  E: wp.array(dtype=f), nu: wp.array(dtype=f), yield_stress: wp.array(dtype=f),
                                  friction_angle: wp.array(dtype=f), theta_c: wp.array(dtype=f),
                                  theta_s: wp.array(dtype=f), adj_F_out: wp.array(dtype=mat33),
                                  adj_tau_out: wp.array(dtype=mat33), adj_F_trial: wp.array(dtype=mat33),
                                  adj_E: wp.array(dtype=f), adj_nu: wp.array(dtype=f),
                                  adj_yield_stress: wp.array(dtype=f), adj_friction_angle: wp.array(dtype=f),
                                  adj_theta_c: wp.array(dtype=f), adj_theta_s: wp.array(dtype=f)):
        # Hand-written adjoint of plasticity_stress (accumulates), from one SVD of F_trial: F' =
        # U g V^T, so the stress adjoint at F' reuses U, V with singular values g.
        i = wp.tid()
        F = F_trial[i]
        L = law[i]
        U = wp.identity(n=3, dtype=f)
        s = vec3(f(1.0), f(1.0), f(1.0))
        V = wp.identity(n=3, dtype=f)
        if needs_svd(L):
            wp.svd3(F, U, s, V)
        Fn, sn = project_usv(L, F, U, s, V, E[i], nu[i], yield_stress[i], friction_angle[i], theta_c[i],
                             theta_s[i])
        gFn, gE1, gnu1 = kirchhoff_vjp_usv(L, Fn, U, sn, V, E[i], nu[i], adj_tau_out[i])
        gF, gE2, gnu2, gys, gfa, gtc, gts = project_vjp_usv(L, F, U, s, V, E[i], nu[i], yield_stress[i],
                                                            friction_angle[i], theta_c[i], theta_s[i],
                                                            gFn + adj_F_out[i])
        adj_F_trial[i] = adj_F_trial[i] + gF
        adj_E[i] = adj_E[i] + gE1 + gE2
        adj_nu[i] = adj_nu[i] + gnu1 + gnu2
        adj_yield_stress[i] = adj_yield_stress[i] + gys
        adj_friction_angle[i] = adj_friction_angle[i] + gfa
        adj_theta_c[i] = adj_theta_c[i] + gtc
        adj_theta_s[i] = adj_theta_s[i] + gts

    @wp.kernel(enable_backward=False)
    def stress_adjoint(F: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32), E: wp.array(dtype=f),
                       nu: wp.array(dtype=f), adj_tau: wp.array(dtype=mat33), adj_F: wp.array(dtype=mat33),
                       adj_E: wp.array(dtype=f), adj_nu: wp.array(dtype=f)):
        # Hand-written adjoint of stress_eval (accumulates).
        i = wp.tid()
        gF, gE, gnu = kirchhoff_vjp(law[i], F[i], E[i], nu[i], adj_tau[i])
        adj_F[i] = adj_F[i] + gF
        adj_E[i] = adj_E[i] + gE
        adj_nu[i] = adj_nu[i] + gnu

    @wp.kernel(enable_backward=False)
    def p2g(x: wp.array(dtype=vec3), p: wp.array(dtype=vec3), A: wp.array(dtype=mat33), m: wp.array(dtype=f),
            active: wp.array(dtype=wp.int32), lo: vec3, dx: f,
            grid_mv: wp.array3d(dtype=vec3), grid_m: wp.array3d(dtype=f)):
        # Scatters w (p + A dpos) and w m. With dpos = (o - fx) dx for the node offset o in {0,1,2}^3,
        # p + A dpos = r + A dx o (r = p - A fx dx): built up axis by axis, a few flops per node.
        i = wp.tid()
        if active[i] == 0:
            return
        shape = wp.vec3i(grid_m.shape[0], grid_m.shape[1], grid_m.shape[2])
        base, fx, W, dW = bspline(x[i], lo, f(1.0) / dx)
        Ai = A[i]
        mi = m[i]
        G = Ai * dx
        g0 = vec3(G[0, 0], G[1, 0], G[2, 0])
        g1 = vec3(G[0, 1], G[1, 1], G[2, 1])
        g2 = vec3(G[0, 2], G[1, 2], G[2, 2])
        r = p[i] - Ai * (fx * dx)
        if not on_grid(base, shape):
            return
        ra = r  # r + G o, advanced by a column of G per node step (no multiplies by 0, 1, 2)
        for a in range(3):
            rab = ra
            for b in range(3):
                wab = W[a, 0] * W[b, 1]
                u = rab
                for c in range(3):
                    w = wab * W[c, 2]
                    ni = base[0] + wp.int32(a)
                    nj = base[1] + wp.int32(b)
                    nk = base[2] + wp.int32(c)
                    wp.atomic_add(grid_mv, ni, nj, nk, u * w)
                    wp.atomic_add(grid_m, ni, nj, nk, mi * w)
                    u = u + g2
                rab = rab + g1
            ra = ra + g0

    @wp.kernel(enable_backward=False)
    def p2g_adjoint(x: wp.array(dtype=vec3), p: wp.array(dtype=vec3), A: wp.array(dtype=mat33),
                    m: wp.array(dtype=f), active: wp.array(dtype=wp.int32), lo: vec3, dx: f,
                    adj_grid_mv: wp.array3d(dtype=vec3), adj_grid_m: wp.array3d(dtype=f),
                    adj_x: wp.array(dtype=vec3), adj_p: wp.array(dtype=vec3), adj_A: wp.array(dtype=mat33),
                    adj_m: wp.array(dtype=f)):
        # The adjoint of a scatter is a gather: no atomics. Accumulates into adj_x, adj_p, adj_A, adj_m.
        i = wp.tid()
        if active[i] == 0:
            return
        shape = wp.vec3i(adj_grid_m.shape[0], adj_grid_m.shape[1], adj_grid_m.shape[2])
        inv_dx = f(1.0) / dx
        base, fx, W, dW = bspline(x[i], lo, inv_dx)
        if not on_grid(base, shape):
            return
        # With q = gmv . (p + A dpos) + gmn m per node (dpos = (o - fx) dx for offset o):
        #   adj_p = sum w gmv,  adj_m = sum w gmn,  adj_A = sum w gmv dpos^T = dx (S - adj_p fx^T),
        #   adj_x = sum grad(w) q - A^T adj_p  (dpos depends on x through -fx dx),
        # where column d of S is sum w gmv o_d. The sums are nested by axis like g2p's.
        Ai = A[i]
        mi = m[i]
        G = Ai * dx
        g0 = vec3(G[0, 0], G[1, 0], G[2, 0])
        g1 = vec3(G[0, 1], G[1, 1], G[2, 1])
        g2 = vec3(G[0, 2], G[1, 2], G[2, 2])
        r = p[i] - Ai * (fx * dx)
        gp = vec3(f(0.0))
        s0 = vec3(f(0.0))
        s1 = vec3(f(0.0))
        s2 = vec3(f(0.0))
        gm = f(0.0)
        qx = f(0.0)
        qy = f(0.0)
        qz = f(0.0)
        ra = r
        for a in range(3):
            pa = vec3(f(0.0))
            pa1 = vec3(f(0.0))
            pa2 = vec3(f(0.0))
            ma = f(0.0)
            qa = f(0.0)
            qa_dy = f(0.0)
            qa_dz = f(0.0)
            rab = ra
            for b in range(3):
                u = rab
                pb = vec3(f(0.0))
                pb2 = vec3(f(0.0))
                mb = f(0.0)
                qb = f(0.0)
                qb_dz = f(0.0)
                for c in range(3):
                    gmv = adj_grid_mv[base[0] + wp.int32(a), base[1] + wp.int32(b), base[2] + wp.int32(c)]
                    gmn = adj_grid_m[base[0] + wp.int32(a), base[1] + wp.int32(b), base[2] + wp.int32(c)]
                    q = wp.dot(gmv, u) + gmn * mi
                    u = u + g2
                    wc = W[c, 2]
                    h = gmv * wc
                    pb += h
                    if c == 1:
                        pb2 += h
                    if c == 2:
                        pb2 += h + h
                    mb += gmn * wc
                    qb += q * wc
                    qb_dz += q * dW[c, 2]
                wb = W[b, 1]
                pb = pb * wb
                pa += pb
                if b == 1:
                    pa1 += pb
                if b == 2:
                    pa1 += pb + pb
                pa2 += pb2 * wb
                ma += mb * wb
                qa += qb * wb
                qa_dy += qb * dW[b, 1]
                qa_dz += qb_dz * wb
                rab = rab + g1
            ra = ra + g0
            wa = W[a, 0]
            pa = pa * wa
            gp += pa
            if a == 1:
                s0 += pa
            if a == 2:
                s0 += pa + pa
            s1 += pa1 * wa
            s2 += pa2 * wa
            gm += ma * wa
            qx += qa * dW[a, 0]
            qy += qa_dy * wa
            qz += qa_dz * wa
        gA = mat33(s0[0] - gp[0] * fx[0], s1[0] - gp[0] * fx[1], s2[0] - gp[0] * fx[2],
                   s0[1] - gp[1] * fx[0], s1[1] - gp[1] * fx[1], s2[1] - gp[1] * fx[2],
                   s0[2] - gp[2] * fx[0], s1[2] - gp[2] * fx[1], s2[2] - gp[2] * fx[2]) * dx
        adj_p[i] = adj_p[i] + gp
        adj_A[i] = adj_A[i] + gA
        adj_m[i] = adj_m[i] + gm
        adj_x[i] = adj_x[i] + vec3(qx, qy, qz) * inv_dx - wp.transpose(Ai) * gp

    @wp.kernel(enable_backward=False)
    def g2p(x: wp.array(dtype=vec3), F: wp.array(dtype=mat33), active: wp.array(dtype=wp.int32),
            grid_v: wp.array3d(dtype=vec3), lo: vec3, dx: f, dt: f,
            x_out: wp.array(dtype=vec3), v_out: wp.array(dtype=vec3), C_out: wp.array(dtype=mat33),
            F_trial: wp.array(dtype=mat33)):
        # v = sum w v_n and B = sum w v_n dpos^T with dpos = (o - fx) dx: B = dx (S - v fx^T), where
        # column d of S is sum w v_n o_d. The sums are nested by axis (z, then y, then x) so each
        # node costs one weight multiply and a few adds.
        i = wp.tid()
        shape = wp.vec3i(grid_v.shape[0], grid_v.shape[1], grid_v.shape[2])
        inv_dx = f(1.0) / dx
        base, fx, W, dW = bspline(x[i], lo, inv_dx)
        if active[i] == 0 or not on_grid(base, shape):
            x_out[i] = x[i]
            v_out[i] = vec3(f(0.0))
            C_out[i] = mat33(f(0.0))
            F_trial[i] = F[i]
            return
        vn = vec3(f(0.0))
        s0 = vec3(f(0.0))  # sum w v_n o_x
        s1 = vec3(f(0.0))  # sum w v_n o_y
        s2 = vec3(f(0.0))  # sum w v_n o_z
        for a in range(3):
            va = vec3(f(0.0))
            va1 = vec3(f(0.0))
            va2 = vec3(f(0.0))
            for b in range(3):
                vb = vec3(f(0.0))
                vb2 = vec3(f(0.0))
                for c in range(3):
                    g = grid_v[base[0] + wp.int32(a), base[1] + wp.int32(b), base[2] + wp.int32(c)] * W[c, 2]
                    vb += g
                    if c == 1:
                        vb2 += g
                    if c == 2:
                        vb2 += g + g
                vb = vb * W[b, 1]
                va += vb
                va2 += vb2 * W[b, 1]
                if b == 1:
                    va1 += vb
                if b == 2:
                    va1 += vb + vb
            va = va * W[a, 0]
            vn += va
            s1 += va1 * W[a, 0]
            s2 += va2 * W[a, 0]
            if a == 1:
                s0 += va
            if a == 2:
                s0 += va + va
        B = mat33(s0[0] - vn[0] * fx[0], s1[0] - vn[0] * fx[1], s2[0] - vn[0] * fx[2],
                  s0[1] - vn[1] * fx[0], s1[1] - vn[1] * fx[1], s2[1] - vn[1] * fx[2],
                  s0[2] - vn[2] * fx[0], s1[2] - vn[2] * fx[1], s2[2] - vn[2] * fx[2])
        Cn = B * (f(4.0) * inv_dx)
        v_out[i] = vn
        C_out[i] = Cn
        x_out[i] = x[i] + vn * dt
        F_trial[i] = (wp.identity(n=3, dtype=f) + Cn * dt) * F[i]

    @wp.kernel(enable_backward=False)
    def g2p_adjoint(x: wp.array(dtype=vec3), F: wp.array(dtype=mat33), active: wp.array(dtype=wp.int32),
                    grid_v: wp.array3d(dtype=vec3), C_out: wp.array(dtype=mat33), lo: vec3, dx: f, dt: f,
                    adj_x_out: wp.array(dtype=vec3), adj_v_out: wp.array(dtype=vec3),
                    adj_C_out: wp.array(dtype=mat33), adj_F_trial: wp.array(dtype=mat33),
                    adj_x: wp.array(dtype=vec3), adj_F: wp.array(dtype=mat33), adj_grid_v: wp.array3d(dtype=vec3)):
        # The adjoint of a gather is a scatter (atomics into adj_grid_v). Accumulates into adj_x, adj_F.
        i = wp.tid()
        shape = wp.vec3i(grid_v.shape[0], grid_v.shape[1], grid_v.shape[2])
        inv_dx = f(1.0) / dx
        base, fx, W, dW = bspline(x[i], lo, inv_dx)
        if active[i] == 0 or not on_grid(base, shape):
            adj_x[i] = adj_x[i] + adj_x_out[i]
            adj_F[i] = adj_F[i] + adj_F_trial[i]
            return
        D = f(4.0) * inv_dx * inv_dx
        Fi = F[i]
        Cn = C_out[i]
        gFt = adj_F_trial[i]
        adj_F[i] = adj_F[i] + wp.transpose(wp.identity(n=3, dtype=f) + Cn * dt) * gFt
        gC = adj_C_out[i] + gFt * wp.transpose(Fi) * dt
        gv = adj_v_out[i] + adj_x_out[i] * dt
        gB = gC * D
        # Each node receives w u with u = gv + gB dpos = r + G o (offset o, r = gv - gB fx dx,
        # G = gB dx); with q = v_n . u: adj_x += sum grad(w) q - gB^T sum w v_n.
        G = gB * dx
        g0 = vec3(G[0, 0], G[1, 0], G[2, 0])
        g1 = vec3(G[0, 1], G[1, 1], G[2, 1])
        g2 = vec3(G[0, 2], G[1, 2], G[2, 2])
        r = gv - gB * (fx * dx)
        vn = vec3(f(0.0))
        qx = f(0.0)
        qy = f(0.0)
        qz = f(0.0)
        ra = r
        for a in range(3):
            va = vec3(f(0.0))
            qa = f(0.0)
            qa_dy = f(0.0)
            qa_dz = f(0.0)
            rab = ra
            for b in range(3):
                wab = W[a, 0] * W[b, 1]
                vb = vec3(f(0.0))
                qb = f(0.0)
                qb_dz = f(0.0)
                u = rab
                for c in range(3):
                    ni = base[0] + wp.int32(a)
                    nj = base[1] + wp.int32(b)
                    nk = base[2] + wp.int32(c)
                    wc = W[c, 2]
                    wp.atomic_add(adj_grid_v, ni, nj, nk, u * (wab * wc))
                    vi = grid_v[ni, nj, nk]
                    q = wp.dot(vi, u)
                    vb += vi * wc
                    qb += q * wc
                    qb_dz += q * dW[c, 2]
                    u = u + g2
                wb = W[b, 1]
                va += vb * wb
                qa += qb * wb
                qa_dy += qb * dW[b, 1]
                qa_dz += qb_dz * wb
                rab = rab + g1
            ra = ra + g0
            wa = W[a, 0]
            vn += va * wa
            qx += qa * dW[a, 0]
            qy += qa_dy * wa
            qz += qa_dz * wa
        adj_x[i] = adj_x[i] + adj_x_out[i] + vec3(qx, qy, qz) * inv_dx - wp.transpose(gB) * vn

    # ---------------------------------------------------------------------------------------
    # Colliders (kinematic rigid bodies with SDF shapes) and the grid update
    # ---------------------------------------------------------------------------------------

    # Clamps at 0 of the SDFs. On a tie (a point exactly on a face, e.g. a grid node on a face
    # that lies on a node plane) Warp's min/max adjoints send the gradient to their second
    # argument, so the constant 0 comes first: the distance keeps its derivative 1 along the
    # normal there (both one-sided derivatives are 1). The other order gave 0 on the face, a wrong
    # gradient of the contact normal at such nodes (mpm_gather's first gradient norm was 1.3544
    # with it, 1.3756 with this; docs/mpm.md), and a kink the smooth contact weight cannot have.

    @wp.func
    def pos_part(x: f):
        """max(x, 0), derivative 1 at x = 0."""
        return wp.max(f(0.0), x)

    @wp.func
    def neg_part(x: f):
        """min(x, 0), derivative 1 at x = 0."""
        return wp.min(f(0.0), x)

    @wp.func
    def sd_box(q: vec3, h: vec3):
        d = vec3(wp.abs(q[0]), wp.abs(q[1]), wp.abs(q[2])) - h
        outside = vec3(pos_part(d[0]), pos_part(d[1]), pos_part(d[2]))
        return wp.length(outside) + neg_part(wp.max(d[0], wp.max(d[1], d[2])))

    @wp.func
    def sd_cylinder(q: vec3, r: f, hh: f):
        dr = wp.sqrt(q[0] * q[0] + q[1] * q[1] + f(1.0e-20)) - r
        dz = wp.abs(q[2]) - hh
        a = pos_part(dr)
        b = pos_part(dz)
        return neg_part(wp.max(dr, dz)) + wp.sqrt(a * a + b * b + f(1.0e-20))

    @wp.func
    def grid_sdf(q: vec3, data: wp.array(dtype=f), offset: int, dims: wp.vec3i, glo: vec3, h: f):
        # Trilinear sample of a node grid stored at data[offset:], C order; clamped at the border.
        g = (q - glo) / h
        i0 = wp.vec3i(0)
        t = vec3(f(0.0))
        for a in range(3):
            ga = wp.clamp(g[a], f(0.0), f(dims[a] - 1) - f(1.0e-4))
            i0[a] = wp.min(int(wp.floor(ga)), dims[a] - 2)
            t[a] = ga - f(i0[a])
        val = f(0.0)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    w = (t[0] if a == 1 else f(1.0) - t[0]) * (t[1] if b == 1 else f(1.0) - t[1]) * (
                        t[2] if c == 1 else f(1.0) - t[2])
                    idx = ((i0[0] + a) * dims[1] + (i0[1] + b)) * dims[2] + (i0[2] + c)
                    val += w * data[offset + idx]
        # Outside the grid's box the distance grows with the distance to the box.
        outside = q - vec3(wp.clamp(q[0], glo[0], glo[0] + h * f(dims[0] - 1)),
                           wp.clamp(q[1], glo[1], glo[1] + h * f(dims[1] - 1)),
                           wp.clamp(q[2], glo[2], glo[2] + h * f(dims[2] - 1)))
        return val + wp.length(outside + vec3(f(1.0e-20)))

    @wp.func
    def shape_sdf(kind: int, q: vec3, size: vec3, data: wp.array(dtype=f), offset: int, dims: wp.vec3i,
                  glo: vec3, h: f):
        """Signed distance [m] of a collider shape in its local frame (negative inside)."""
        d = f(0.0)
        if kind == 0:  # sphere, radius size[0]
            d = wp.length(q + vec3(f(1.0e-20))) - size[0]
        elif kind == 1:  # box, half extents
            d = sd_box(q, size)
        elif kind == 2:  # capsule along z: radius size[0], half length of the segment size[1]
            z = wp.clamp(q[2], -size[1], size[1])
            d = wp.length(q - vec3(f(0.0), f(0.0), z) + vec3(f(1.0e-20))) - size[0]
        elif kind == 3:  # cylinder along z: radius size[0], half height size[1]
            d = sd_cylinder(q, size[0], size[1])
        elif kind == 4:  # cup open at +z: inner radius size[0], half height size[1], wall size[2]
            outer = sd_cylinder(q, size[0] + size[2], size[1])
            inner = sd_cylinder(q - vec3(f(0.0), f(0.0), size[2]), size[0], size[1])
            d = wp.max(outer, -inner)
        elif kind == 5:  # half-space below the local xy plane (normal +z)
            d = q[2]
        else:
            d = grid_sdf(q, data, offset, dims, glo, h)
        return d

    @wp.func
    def collide(v: vec3, vc: vec3, n: vec3, influence: f, friction: f, sticky: int):
        """Velocity after contact with a surface of outward normal n moving at vc (Coulomb)."""
        vrel = v - vc
        vn = wp.dot(vrel, n)
        vnew = vrel
        if sticky != 0:
            vnew = vec3(f(0.0))
        elif vn < f(0.0):
            vt = vrel - n * vn
            tl = wp.sqrt(wp.dot(vt, vt) + f(1.0e-20))
            scale = wp.max(f(0.0), tl + friction * vn) / tl
            vnew = vt * scale
        return vc + vrel * (f(1.0) - influence) + vnew * influence

    @wp.kernel
    def grid_velocity(grid_mv: wp.array3d(dtype=vec3), grid_m: wp.array3d(dtype=f), gravity: vec3, dt: f,
                      min_mass: f, grid_v: wp.array3d(dtype=vec3)):
        # Nodes touched only by a B-spline tail (mass ~1e-24 kg) would make the adjoint of mv / m,
        # which divides by m^2, underflow to 0 in float32 and turn into NaN: the division uses
        # max(m, min_mass) instead. That keeps v continuous in the particle positions (a hard
        # cut-off made steps of ~1e-9 relative that finite differences see).
        i, j, k = wp.tid()
        mass = grid_m[i, j, k]
        if mass > f(0.0):
            grid_v[i, j, k] = grid_mv[i, j, k] / wp.max(mass, min_mass) + gravity * dt
        else:
            grid_v[i, j, k] = vec3(f(0.0))

    @wp.func
    def smooth_weight(u: f):
        """exp(-r(u)) with the C1 ramp r = 0 (u <= -1), (u + 1)^2 / 4 (|u| < 1), u (u >= 1); u = softness * sdf.

        It equals min(exp(-u), 1) for |u| >= 1 and its derivative is continuous at u = -1 and u = 1
        (0 and -exp(-1)), where the clamped weight's jumps from 0 to -1 at u = 0.
        """
        w = f(1.0)
        if u >= f(1.0):
            w = wp.exp(-u)
        elif u > f(-1.0):
            w = wp.exp(-(u + f(1.0)) * (u + f(1.0)) * f(0.25))
        return w

    @wp.kernel
    def grid_collider(grid_v: wp.array3d(dtype=vec3), grid_m: wp.array3d(dtype=f), lo: vec3, dx: f,
                      kind: int, size: vec3, friction: f, softness: f, weight: int, sticky: int,
                      sdf_data: wp.array(dtype=f), offset: int, dims: wp.vec3i, glo: vec3, h: f,
                      state: wp.array(dtype=f), grid_v_out: wp.array3d(dtype=vec3)):
        # One collider per launch (a new output array each): no loop-carried values for the adjoint.
        i, j, k = wp.tid()
        v = grid_v[i, j, k]
        if grid_m[i, j, k] <= f(0.0):
            grid_v_out[i, j, k] = v
            return
        xn = lo + vec3(f(i), f(j), f(k)) * dx
        pos = vec3(state[0], state[1], state[2])
        rot = wp.normalize(quat(state[3], state[4], state[5], state[6]))
        lin = vec3(state[7], state[8], state[9])
        ang = vec3(state[10], state[11], state[12])
        r = xn - pos
        q = wp.quat_rotate_inv(rot, r)
        d = shape_sdf(kind, q, size, sdf_data, offset, dims, glo, h)
        influence = f(0.0)
        if softness > f(0.0):
            if weight == 0:  # clamped_exp (the default: this exact expression keeps old results bit for bit)
                influence = wp.min(wp.exp(-d * softness), f(1.0))
            else:  # smooth: C1 in d, so a node on the surface gives no kink in the collider's pose
                influence = smooth_weight(d * softness)
        elif d < f(0.0):
            influence = f(1.0)
        if influence > f(1.0e-6):
            # Outward normal by central differences of the local SDF, rotated to the world frame.
            eps = dx * f(0.1)
            ex = vec3(eps, f(0.0), f(0.0))
            ey = vec3(f(0.0), eps, f(0.0))
            ez = vec3(f(0.0), f(0.0), eps)
            nl = vec3(shape_sdf(kind, q + ex, size, sdf_data, offset, dims, glo, h)
                      - shape_sdf(kind, q - ex, size, sdf_data, offset, dims, glo, h),
                      shape_sdf(kind, q + ey, size, sdf_data, offset, dims, glo, h)
                      - shape_sdf(kind, q - ey, size, sdf_data, offset, dims, glo, h),
                      shape_sdf(kind, q + ez, size, sdf_data, offset, dims, glo, h)
                      - shape_sdf(kind, q - ez, size, sdf_data, offset, dims, glo, h))
            n = wp.quat_rotate(rot, nl / wp.sqrt(wp.dot(nl, nl) + f(1.0e-20)))
            vc = lin + wp.cross(ang, r)
            v = collide(v, vc, n, influence, friction, sticky)
        grid_v_out[i, j, k] = v

    @wp.func
    def wall_normal(v: vec3, idx: int, n_nodes: int, axis: int, bound: int):
        """The normal (into the domain) of the face along ``axis`` that node ``idx`` moving at v
        pushes against (within ``bound`` nodes of it, moving out), else 0."""
        n = vec3(f(0.0))
        if idx < bound and v[axis] < f(0.0):
            n[axis] = f(1.0)
        if idx >= n_nodes - bound and v[axis] > f(0.0):
            n[axis] = f(-1.0)
        return n

    @wp.func
    def wall(v: vec3, idx: int, n_nodes: int, axis: int, bound: int, mode: int, mu: f):
        n = wall_normal(v, idx, n_nodes, axis, bound)
        out = v
        if n[axis] != f(0.0):
            if mode == 1:
                out = vec3(f(0.0))
            elif mode == 2:
                out = collide(v, vec3(f(0.0)), n, f(1.0), mu, 0)
            else:
                out = collide(v, vec3(f(0.0)), n, f(1.0), f(0.0), 0)
        return out

    @wp.kernel
    def grid_walls(grid_v: wp.array3d(dtype=vec3), origin: wp.vec3i, full: wp.vec3i, bound: int, mode: int, mu: f,
                   grid_v_out: wp.array3d(dtype=vec3)):
        # Domain walls: nodes within `bound` of a face cannot move out through it. grid_v is the
        # active box of the full grid (`full` nodes per axis), whose node (0, 0, 0) is `origin`.
        i, j, k = wp.tid()
        v = wall(grid_v[i, j, k], origin[0] + i, full[0], 0, bound, mode, mu)
        v = wall(v, origin[1] + j, full[1], 1, bound, mode, mu)
        v = wall(v, origin[2] + k, full[2], 2, bound, mode, mu)
        grid_v_out[i, j, k] = v

    @wp.func
    def box_node(n: int, dims: wp.vec3i):
        """(i, j, k) of node ``n`` of a box of ``dims`` nodes stored row-major (torch's layout)."""
        yz = dims[1] * dims[2]
        i = n / yz
        r = n - i * yz
        j = r / dims[2]
        return wp.vec3i(i, j, r - j * dims[2])

    @wp.kernel
    def grid_velocity_walls(grid_mv: wp.array(dtype=vec3), grid_m: wp.array(dtype=f), gravity: vec3, dt: f,
                            min_mass: f, dims: wp.vec3i, origin: wp.vec3i, full: wp.vec3i, bound: int, mode: int,
                            mu: f, grid_v_out: wp.array(dtype=vec3)):
        # grid_velocity then grid_walls in one pass (a model without colliders): the same arithmetic.
        # One thread per node of the box (dims nodes, flat): a 3-d launch spends ~4 ns a thread on
        # the CPU in index arithmetic, and most nodes of a particle box are empty, which need none.
        n = wp.tid()
        mass = grid_m[n]
        if not (mass > f(0.0)):  # (also NaN) v = 0, which no wall changes
            grid_v_out[n] = vec3(f(0.0))
            return
        v = grid_mv[n] / wp.max(mass, min_mass) + gravity * dt
        ijk = box_node(n, dims) + origin
        v = wall(v, ijk[0], full[0], 0, bound, mode, mu)
        v = wall(v, ijk[1], full[1], 1, bound, mode, mu)
        v = wall(v, ijk[2], full[2], 2, bound, mode, mu)
        grid_v_out[n] = v

    @wp.func
    def wall_adjoint(v: vec3, g: vec3, idx: int, n_nodes: int, axis: int, bound: int, mode: int, mu: f):
        """d loss / dv of ``wall(v, ...)`` from d loss / d(its result) ``g``."""
        n = wall_normal(v, idx, n_nodes, axis, bound)
        out = g
        if n[axis] != f(0.0):
            if mode == 1:  # sticky: the result is 0
                out = vec3(f(0.0))
            else:
                # collide(v, 0, n, 1, mu, 0) with v . n < 0 (a hit): vt * scale, vt = v - n (v . n),
                # scale = max(0, tl + mu vn) / tl, tl = |vt| (regularised)
                fr = f(0.0)
                if mode == 2:
                    fr = mu
                vn = wp.dot(v, n)
                vt = v - n * vn
                tl = wp.sqrt(wp.dot(vt, vt) + f(1.0e-20))
                x = tl + fr * vn
                g_vt = vec3(f(0.0))
                g_vn = f(0.0)
                if x >= f(0.0):  # (Warp's max(0, x) passes the gradient to x at x = 0 as well)
                    # d scale = mu dvn / tl - mu vn dtl / tl^2, dtl = vt . dvt / tl
                    sg = wp.dot(g, vt)
                    g_vt = g * (x / tl) - vt * (sg * fr * vn / (tl * tl * tl))
                    g_vn = sg * fr / tl
                out = g_vt - n * wp.dot(n, g_vt) + n * g_vn
        return out

    @wp.kernel
    def grid_velocity_walls_adjoint(grid_mv: wp.array(dtype=vec3), grid_m: wp.array(dtype=f), gravity: vec3,
                                    dt: f, min_mass: f, dims: wp.vec3i, origin: wp.vec3i, full: wp.vec3i, bound: int,
                                    mode: int, mu: f, adj_grid_v: wp.array(dtype=vec3),
                                    adj_grid_mv: wp.array(dtype=vec3), adj_grid_m: wp.array(dtype=f)):
        # Adjoint of grid_velocity_walls (writes, does not accumulate): the forward's three wall
        # inputs recomputed, then back through the walls and the division. Warp's automatic
        # adjoint of the same kernel costs ~2.4x its forward on CPU; this one about one forward.
        n = wp.tid()
        mass = grid_m[n]
        if not (mass > f(0.0)):  # (also NaN) v = 0 does not depend on the inputs
            adj_grid_mv[n] = vec3(f(0.0))
            adj_grid_m[n] = f(0.0)
            return
        M = wp.max(mass, min_mass)
        mv = grid_mv[n]
        v0 = mv / M + gravity * dt
        ijk = box_node(n, dims) + origin
        v1 = wall(v0, ijk[0], full[0], 0, bound, mode, mu)
        v2 = wall(v1, ijk[1], full[1], 1, bound, mode, mu)
        g = wall_adjoint(v2, adj_grid_v[n], ijk[2], full[2], 2, bound, mode, mu)
        g = wall_adjoint(v1, g, ijk[1], full[1], 1, bound, mode, mu)
        g = wall_adjoint(v0, g, ijk[0], full[0], 0, bound, mode, mu)
        g_m = f(0.0)
        if mass > min_mass:  # (else M is the floor, a constant)
            g_m = -wp.dot(g, mv) / (M * M)
        adj_grid_mv[n] = g / M
        adj_grid_m[n] = g_m

    @wp.kernel
    def stress_eval(F: wp.array(dtype=mat33), law: wp.array(dtype=wp.int32), E: wp.array(dtype=f),
                    nu: wp.array(dtype=f), tau: wp.array(dtype=mat33)):
        # Test and inspection helper: tau(F) of each law.
        i = wp.tid()
        tau[i] = kirchhoff_stress(law[i], F[i], E[i], nu[i])

    return {
        "particle_affine": particle_affine,
        "plasticity": plasticity,
        "particle_affine_adjoint": particle_affine_adjoint,
        "plasticity_stress": plasticity_stress,
        "plasticity_stress_ref": plasticity_stress_ref,
        "plasticity_stress_adjoint": plasticity_stress_adjoint,
        "stress_adjoint": stress_adjoint,
        "p2g": p2g,
        "p2g_adjoint": p2g_adjoint,
        "g2p": g2p,
        "g2p_adjoint": g2p_adjoint,
        "grid_velocity": grid_velocity,
        "grid_collider": grid_collider,
        "grid_walls": grid_walls,
        "grid_velocity_walls": grid_velocity_walls,
        "grid_velocity_walls_adjoint": grid_velocity_walls_adjoint,
        "stress_eval": stress_eval,
        "vec3": vec3,
        "mat33": mat33,
        "scalar": dtype,
    }


_KERNELS: dict[str, dict] = {}


def build(dtype_name: str) -> dict:
    """The kernels of one precision (``"float32"`` or ``"float64"``).

    Both precisions are built together on the first call (one Warp module: one compile, one cache
    entry); importing this module neither initializes Warp nor builds anything.
    """
    if not _KERNELS:
        init_warp()
        _KERNELS.update(float32=_build(wp.float32), float64=_build(wp.float64))
    return _KERNELS[dtype_name]
