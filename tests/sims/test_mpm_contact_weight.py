"""Soft-contact weights of MPM colliders (``Collider.contact_weight``) at a grid-node plane.

A collider's soft contact blends each grid node's velocity with its contact response by a weight
of the node's signed distance d. The default ``clamped_exp`` weight min(exp(-s d), 1) has a corner
at d = 0: its derivative is -s outside and 0 inside. Where a collider face lies exactly on a plane
of grid nodes, a loss is then not differentiable in the collider's position: moving the face
up pushes those nodes inside (weight stays 1), moving it down leaves them outside (weight falls
like exp), and the one-sided derivatives differ. The ``smooth`` weight exp(-r(s d)) (C1 ramp r)
has no corner, so both one-sided finite differences agree with each other and with the adjoint.

The scene: a jelly cube (float64) falls at 0.5 m/s onto a frictional box collider whose top face
is at z = 0.25 m, exactly the node plane k = 4 of a grid with dx = 1/16 m (every coordinate
involved is a binary fraction, so the distance of those nodes is exactly 0). Loss: a fixed random
weighting of the final positions and velocities after 8 substeps. Derivative w.r.t. the
collider's height (the same shift at every substep).
"""

import pytest
import torch

from diffworld.geometry.sdf import Box
from diffworld.sims import mpm

T = 8
Z_FACE = 0.25  # [m] the collider's top face: node plane k = 4 (dx = 1/16 m)
H = 1e-7  # [m] finite-difference step


def _setup(weight: str):
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=16)
    assert grid.dx == 1 / 16
    col = mpm.Collider("box", size=(0.25, 0.25, 0.125), friction=0.3, softness=40.0, contact_weight=weight)
    # Particles from half a cell above the face: the nodes on the face carry mass.
    body = mpm.Body(Box((0.125,) * 3, (0.5, 0.5, Z_FACE + 0.03125 + 0.125)), mpm.material("jelly", E=2e3),
                    ppc=8, velocity=(0.1, 0.0, -0.5))
    model, state = mpm.build_model(grid, [body], dt=2e-3, dtype=torch.float64, colliders=[col],
                                   gravity=(0.0, 0.0, -9.8))
    ctrl = torch.zeros(T, 1, 13, dtype=torch.float64)
    ctrl[:, 0, 2] = Z_FACE - 0.125  # box centre: top face at Z_FACE
    ctrl[:, 0, :2] = 0.5
    ctrl[:, 0, 6] = 1.0
    gen = torch.Generator().manual_seed(0)
    wx = torch.randn(state.x.shape, generator=gen, dtype=torch.float64)
    wv = torch.randn(state.v.shape, generator=gen, dtype=torch.float64)

    def loss(control):
        f = mpm.rollout(model, state, T, control, window=4).final
        return (f.x * wx).sum() + 0.1 * (f.v * wv).sum()

    return loss, ctrl


def _derivatives(weight: str):
    """(adjoint, forward FD, backward FD, central FD) of the loss in the collider's height."""
    loss, ctrl = _setup(weight)
    direction = torch.zeros_like(ctrl)
    direction[:, 0, 2] = 1.0
    c = ctrl.clone().requires_grad_()
    L0 = loss(c)
    (g,) = torch.autograd.grad(L0, c)
    with torch.no_grad():
        up, down = float(loss(ctrl + H * direction)), float(loss(ctrl - H * direction))
    L0 = float(L0.detach())
    return float((g * direction).sum()), (up - L0) / H, (L0 - down) / H, (up - down) / (2 * H)


@pytest.fixture(scope="module")
def clamped():
    return _derivatives("clamped_exp")


@pytest.fixture(scope="module")
def smooth():
    return _derivatives("smooth")


def test_clamped_weight_has_a_kink_where_the_face_lies_on_a_node_plane(clamped):
    adjoint, forward, backward, _ = clamped
    # The one-sided derivatives differ by far more than the O(H) curvature error of either (with
    # the smooth weight below they agree to 2e-6 relative): moving the face up only pushes the
    # face nodes inside (weight stays 1), moving it down lets their weight fall at rate s.
    # Measured: forward -5.8894, backward -6.2674 (6.2 % apart).
    assert abs(forward - backward) > 0.03 * abs(backward), clamped
    # The adjoint is the upward one (on the tie exp(0) = 1 Warp's min() sends the gradient to
    # the constant 1: the inside branch; measured 1.3e-6 relative, the forward difference's O(H)
    # error), so it cannot match a central difference.
    assert abs(adjoint - forward) < 1e-5 * abs(forward), clamped
    assert abs(adjoint - backward) > 0.03 * abs(backward), clamped


def test_smooth_weight_is_differentiable_where_the_face_lies_on_a_node_plane(smooth):
    adjoint, forward, backward, central = smooth
    # C1 weight: the one-sided differences agree to O(H) (measured 2.0e-6 relative) ...
    assert abs(forward - backward) < 2e-5 * abs(central), smooth
    # ... and the adjoint matches the central difference (float64: measured 2e-9 relative). This
    # also needs the box SDF's adjoint to keep its derivative on the face (kernels.sd_box).
    assert abs(adjoint - central) < 1e-7 * abs(central), smooth


def test_smooth_weight_equals_the_clamped_one_beyond_one_decay_length():
    # The weights themselves, through the kernel's collider pass: a node at distance d gets the
    # response blended by w(d). Compare the weights the two kinds give on a 1-D sweep of d by
    # reading the blended velocity of a static, frictionless, non-sticky plane: a node moving
    # into the plane at -1 m/s keeps -(1 - w) of its normal velocity.
    from diffworld.engine.runtime import init_warp
    from diffworld.sims.mpm import kernels as K

    wp = init_warp()
    k = K.build("float64")
    s = 40.0
    d = torch.linspace(-3 / s, 3 / s, 61, dtype=torch.float64)
    n = d.numel()
    weights = {}
    for name, code in K.CONTACT_WEIGHT.items():
        # one node per d: nodes along x at z = 0 on a grid with dx = 1; the plane sits at -d
        v = torch.zeros(n, 1, 1, 3, dtype=torch.float64)
        v[..., 2] = -1.0
        m = torch.ones(n, 1, 1, dtype=torch.float64)
        out = torch.empty_like(v)
        w_all = []
        for i in range(n):
            state = torch.zeros(13, dtype=torch.float64)
            state[2] = -float(d[i])
            state[6] = 1.0
            wp.launch(k["grid_collider"], (1, 1, 1),
                      [wp.from_torch(v[i:i + 1].contiguous(), dtype=k["vec3"]), wp.from_torch(m[i:i + 1].contiguous()),
                       k["vec3"](0.0, 0.0, 0.0), 1.0, K.SHAPE["plane"], k["vec3"](1.0, 1.0, 1.0), 0.0, s, code, 0,
                       wp.zeros(1, dtype=wp.float64), 0, wp.vec3i(2, 2, 2), k["vec3"](0.0, 0.0, 0.0), 1.0,
                       wp.from_torch(state)],
                      [wp.from_torch(out[i:i + 1], dtype=k["vec3"])], device="cpu")
            w_all.append(1.0 + float(out[i, 0, 0, 2]))  # v_z = -(1 - w)
        weights[name] = torch.tensor(w_all, dtype=torch.float64)
    clamped = torch.clamp(torch.exp(-s * d), max=1.0)
    assert torch.allclose(weights["clamped_exp"], clamped, rtol=1e-12, atol=1e-12)
    far = d.abs() >= 1 / s - 1e-12
    assert torch.allclose(weights["smooth"][far], clamped[far], rtol=1e-12, atol=1e-12)
    u = s * d[~far]
    assert torch.allclose(weights["smooth"][~far], torch.exp(-(u + 1) ** 2 / 4), rtol=1e-12, atol=1e-12)
    # Never above the clamped weight (the ramp lies above max(u, 0)), and 1 deep inside.
    assert bool((weights["smooth"] <= clamped + 1e-15).all())


def test_smooth_weight_needs_softness():
    with pytest.raises(ValueError, match="softness > 0"):
        mpm.Collider("box", softness=0.0, contact_weight="smooth")
    with pytest.raises(ValueError, match="contact_weight"):
        mpm.Collider("box", softness=10.0, contact_weight="smoothstep")
