"""Warp kernels of the explicit FEM integrator (one module: one compile, one kernel-cache entry).

One symplectic Euler step of a tet mesh (N nodes, T tets) is two launches::

    element_forces   per tet    x, Dm_inv, V, law, E, nu       -> f += nodal elastic forces (atomic)
    integrate        per node   x, v, f, m, control, g, alpha   -> x', v'

and its adjoint is the two hand-written kernels in reverse order::

    integrate_adjoint       per node   adjoints of x', v'  -> of x (direct part), v, f, m, control, g, alpha
    element_forces_adjoint  per tet    adjoint of f        -> of x (atomic), E, nu

Element forces (linear tets): ``F = Ds Dm_inv`` with ``Ds`` the columns ``x1 - x0, x2 - x0,
x3 - x0``; ``H = -V P(F) Dm_inv^T`` holds the forces on corners 1..3 as columns, corner 0 gets
``-(h1 + h2 + h3)`` so that every element's forces sum to zero exactly as written (linear
momentum). Lame parameters are computed inside from ``E`` and ``nu`` so their adjoints reach them.

Node update, free nodes (mass-proportional damping ``alpha`` taken implicitly so that it never
limits the step)::

    v' = (v + dt ((f + f_ext) / m + g)) / (1 + alpha dt),   x' = x + dt v'

Kinematic nodes follow the pose of the control row: ``x' = p + R a_k + t`` (``p`` the pivot,
``a_k`` the node's anchor relative to it), ``v' = (x' - x) / dt``. Nodes without mass (no tet uses
them) stay where they are.

The control row of a step (flat, float): ``R`` row-major (9), ``t`` (3) [m], then the external
forces of the load nodes (3 each) [N]: :data:`POSE_WIDTH` + 3 M values.

Warp's automatic adjoints would replay the stress and its rotation derivative per element; the
hand-written ones call the materials' VJP once (``first_piola_vjp``: one polar rotation). Both
precisions are declared as overloads of generic kernels.
"""

from __future__ import annotations

from typing import Any

import warp as wp

from diffworld.sims.constitutive.warp_laws import lame, lame_vjp
from diffworld.sims.fem.kernels_materials import first_piola_value, first_piola_vjp

__all__ = ["KERNELS", "POSE_WIDTH", "element_forces", "element_forces_adjoint", "integrate", "integrate_adjoint"]

POSE_WIDTH = 12  # R (3x3, row-major) and t (3) at the head of a control row


@wp.func
def edge_matrix(x: wp.array(dtype=Any), a: int, b: int, c: int, d: int):
    """Ds: the columns x_b - x_a, x_c - x_a, x_d - x_a [m]."""
    xa = x[a]
    return wp.matrix_from_cols(x[b] - xa, x[c] - xa, x[d] - xa)


@wp.func
def pose_rotation(control: wp.array(dtype=Any)):
    """R of a control row (row-major at its head)."""
    return wp.matrix_from_rows(
        wp.vector(control[0], control[1], control[2]),
        wp.vector(control[3], control[4], control[5]),
        wp.vector(control[6], control[7], control[8]))


@wp.func
def pose_translation(control: wp.array(dtype=Any)):
    """t of a control row [m]."""
    return wp.vector(control[9], control[10], control[11])


@wp.func
def load_force(control: wp.array(dtype=Any), slot: int):
    """External force [N] of load slot ``slot`` in a control row."""
    k = POSE_WIDTH + 3 * slot
    return wp.vector(control[k], control[k + 1], control[k + 2])


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@wp.kernel(enable_backward=False)
def element_forces(tets: wp.array2d(dtype=wp.int32), x: wp.array(dtype=Any), Dm_inv: wp.array(dtype=Any),
                   volume: wp.array(dtype=Any), law: wp.array(dtype=wp.int32), E: wp.array(dtype=Any),
                   nu: wp.array(dtype=Any), f: wp.array(dtype=Any)):
    """Adds each tet's elastic forces [N] to its 4 nodes (``f`` zeroed by the caller)."""
    e = wp.tid()
    i0, i1, i2, i3 = tets[e, 0], tets[e, 1], tets[e, 2], tets[e, 3]
    B = Dm_inv[e]
    F = edge_matrix(x, i0, i1, i2, i3) @ B
    mu, lam = lame(E[e], nu[e])
    H = first_piola_value(law[e], F, mu, lam) @ wp.transpose(B) * (-volume[e])
    h1 = wp.vector(H[0, 0], H[1, 0], H[2, 0])
    h2 = wp.vector(H[0, 1], H[1, 1], H[2, 1])
    h3 = wp.vector(H[0, 2], H[1, 2], H[2, 2])
    wp.atomic_add(f, i1, h1)
    wp.atomic_add(f, i2, h2)
    wp.atomic_add(f, i3, h3)
    wp.atomic_add(f, i0, -(h1 + h2 + h3))


@wp.kernel(enable_backward=False)
def integrate(x: wp.array(dtype=Any), v: wp.array(dtype=Any), f: wp.array(dtype=Any), mass: wp.array(dtype=Any),
              kin_slot: wp.array(dtype=wp.int32), load_slot: wp.array(dtype=wp.int32), anchor: wp.array(dtype=Any),
              pivot: Any, control: wp.array(dtype=Any), gravity: wp.array(dtype=Any), damping: wp.array(dtype=Any),
              dt: Any, x_out: wp.array(dtype=Any), v_out: wp.array(dtype=Any)):
    """One symplectic Euler node update (see the module docstring)."""
    i = wp.tid()
    k = kin_slot[i]
    if k >= 0:
        xn = pivot + pose_rotation(control) @ anchor[k] + pose_translation(control)
        x_out[i] = xn
        v_out[i] = (xn - x[i]) / dt
        return
    m = mass[i]
    if m <= type(dt)(0.0):  # a vertex no tet uses: no mass, no force; it stays
        x_out[i] = x[i]
        v_out[i] = v[i] * type(dt)(0.0)
        return
    force = f[i]
    s = load_slot[i]
    if s >= 0:
        force = force + load_force(control, s)
    vn = (v[i] + (force / m + gravity[0]) * dt) / (type(dt)(1.0) + damping[0] * dt)
    v_out[i] = vn
    x_out[i] = x[i] + vn * dt


# ------------------------------------------------------------------------------------------------
# Adjoints
# ------------------------------------------------------------------------------------------------

@wp.kernel(enable_backward=False)
def integrate_adjoint(x: wp.array(dtype=Any), v: wp.array(dtype=Any), f: wp.array(dtype=Any),
                      mass: wp.array(dtype=Any), kin_slot: wp.array(dtype=wp.int32),
                      load_slot: wp.array(dtype=wp.int32), anchor: wp.array(dtype=Any), control: wp.array(dtype=Any),
                      gravity: wp.array(dtype=Any), damping: wp.array(dtype=Any), dt: Any,
                      adj_x_out: wp.array(dtype=Any), adj_v_out: wp.array(dtype=Any), adj_x: wp.array(dtype=Any),
                      adj_v: wp.array(dtype=Any), adj_f: wp.array(dtype=Any), adj_mass: wp.array(dtype=Any),
                      adj_control: wp.array(dtype=Any), adj_gravity: wp.array(dtype=Any),
                      adj_damping: wp.array(dtype=Any)):
    """Adjoint of :func:`integrate`: writes ``adj_x`` (the direct part; the element adjoint adds
    the force path), ``adj_v``, ``adj_f``; accumulates ``adj_mass``, ``adj_control``,
    ``adj_gravity`` and ``adj_damping``."""
    i = wp.tid()
    zero = type(dt)(0.0)
    gx = adj_x_out[i]
    gv = adj_v_out[i]
    k = kin_slot[i]
    if k >= 0:
        # x' = p + R a + t, v' = (x' - x) / dt
        g = gx + gv / dt
        a = anchor[k]
        for r in range(3):
            for c in range(3):
                wp.atomic_add(adj_control, 3 * r + c, g[r] * a[c])
            wp.atomic_add(adj_control, 9 + r, g[r])
        adj_x[i] = -gv / dt
        adj_v[i] = gv * zero
        adj_f[i] = gv * zero
        return
    m = mass[i]
    if m <= zero:
        adj_x[i] = gx
        adj_v[i] = gv * zero
        adj_f[i] = gv * zero
        return
    # x' = x + dt v', v' = s (v + dt (f_tot / m + g)), s = 1 / (1 + alpha dt)
    one = type(dt)(1.0)
    sc = one / (one + damping[0] * dt)
    w = gv + gx * dt  # adjoint of v'
    force = f[i]
    sl = load_slot[i]
    if sl >= 0:
        force = force + load_force(control, sl)
    u = v[i] + (force / m + gravity[0]) * dt  # v' = s u
    wu = w * sc  # adjoint of u
    adj_x[i] = gx
    adj_v[i] = wu
    gf = wu * (dt / m)
    adj_f[i] = gf
    if sl >= 0:
        base = POSE_WIDTH + 3 * sl
        for r in range(3):
            adj_control[base + r] = adj_control[base + r] + gf[r]
    adj_mass[i] = adj_mass[i] - wp.dot(gf, force) / m
    wp.atomic_add(adj_gravity, 0, wu * dt)
    # ds/dalpha = -dt s^2
    wp.atomic_add(adj_damping, 0, -wp.dot(w, u) * dt * sc * sc)


@wp.kernel(enable_backward=False)
def element_forces_adjoint(tets: wp.array2d(dtype=wp.int32), x: wp.array(dtype=Any), Dm_inv: wp.array(dtype=Any),
                           volume: wp.array(dtype=Any), law: wp.array(dtype=wp.int32), E: wp.array(dtype=Any),
                           nu: wp.array(dtype=Any), adj_f: wp.array(dtype=Any), adj_x: wp.array(dtype=Any),
                           adj_E: wp.array(dtype=Any), adj_nu: wp.array(dtype=Any)):
    """Adjoint of :func:`element_forces`: adds to ``adj_x`` (atomic) and ``adj_E``, ``adj_nu``."""
    e = wp.tid()
    i0, i1, i2, i3 = tets[e, 0], tets[e, 1], tets[e, 2], tets[e, 3]
    B = Dm_inv[e]
    F = edge_matrix(x, i0, i1, i2, i3) @ B
    mu, lam = lame(E[e], nu[e])
    # f_j = h_j (j = 1..3), f_0 = -(h1 + h2 + h3): the adjoint of column h_j is g_j - g_0
    g0 = adj_f[i0]
    GH = wp.matrix_from_cols(adj_f[i1] - g0, adj_f[i2] - g0, adj_f[i3] - g0)
    # H = -V P B^T  ->  adjoint of P: -V GH B
    GP = GH @ B * (-volume[e])
    gF, gmu, glam = first_piola_vjp(law[e], F, mu, lam, GP)
    dE, dnu = lame_vjp(E[e], nu[e], gmu, glam)
    adj_E[e] = adj_E[e] + dE
    adj_nu[e] = adj_nu[e] + dnu
    # F = Ds B  ->  adjoint of Ds: gF B^T, whose columns go to corners 1..3 and minus their sum to 0
    GD = gF @ wp.transpose(B)
    d1 = wp.vector(GD[0, 0], GD[1, 0], GD[2, 0])
    d2 = wp.vector(GD[0, 1], GD[1, 1], GD[2, 1])
    d3 = wp.vector(GD[0, 2], GD[1, 2], GD[2, 2])
    wp.atomic_add(adj_x, i1, d1)
    wp.atomic_add(adj_x, i2, d2)
    wp.atomic_add(adj_x, i3, d3)
    wp.atomic_add(adj_x, i0, -(d1 + d2 + d3))


# ------------------------------------------------------------------------------------------------
# Both precisions
# ------------------------------------------------------------------------------------------------

# The concrete overloads by precision name: launching them skips Warp's per-launch type inference
# of generic kernels (it cost more than the kernels themselves on small meshes).
KERNELS: dict[str, dict[str, Any]] = {}
for _name, _s in (("float32", wp.float32), ("float64", wp.float64)):
    _v = wp.types.vector(3, _s)
    _m = wp.types.matrix((3, 3), _s)
    _a, _av, _am = wp.array(dtype=_s), wp.array(dtype=_v), wp.array(dtype=_m)
    _i = wp.array(dtype=wp.int32)
    _tets = wp.array2d(dtype=wp.int32)
    KERNELS[_name] = {
        "element_forces": wp.overload(element_forces, [_tets, _av, _am, _a, _i, _a, _a, _av]),
        "integrate": wp.overload(integrate, [_av, _av, _av, _a, _i, _i, _av, _v, _a, _av, _a, _s, _av, _av]),
        "integrate_adjoint": wp.overload(integrate_adjoint, [_av, _av, _av, _a, _i, _i, _av, _a, _av, _a, _s, _av,
                                                             _av, _av, _av, _av, _a, _a, _av, _a]),
        "element_forces_adjoint": wp.overload(element_forces_adjoint, [_tets, _av, _am, _a, _i, _a, _a, _av, _av,
                                                                       _a, _a]),
    }
