"""Warp dual-vertex / L_dev kernels of FlexiCubes against a plain torch formulation of the same
maths (forward and autograd), and their hand-written adjoint against float64 central differences
on random directions, for every float input, with carried attributes (W > 3)."""

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.kernels_flexicubes_dual import dual_vertices

Q, W, V = 40, 5, 24  # 40 cut edges carrying 2 attributes, 24 dual vertices


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(Q, W, generator=g, dtype=dtype)
    xb = xa + 0.3 * torch.randn(Q, W, generator=g, dtype=dtype)
    # a crossing exists on every edge: opposite signs at its ends
    sa = -0.1 - torch.rand(Q, generator=g, dtype=dtype)
    sb = 0.1 + torch.rand(Q, generator=g, dtype=dtype)
    aw = 0.2 + 1.5 * torch.rand(Q, 4, 2, generator=g, dtype=dtype)  # tanh-normalized weights lie in (0.01, 1.99)
    bw = 0.2 + 1.5 * torch.rand(Q, 4, generator=g, dtype=dtype)
    # every dual vertex is used, several times
    vid = torch.cat([torch.arange(V), torch.randint(0, V, (Q * 4 - V,), generator=g)]).view(Q, 4)
    return [xa, xb, sa, sb, aw, bw], vid


def _reference(xa, xb, sa, sb, aw, bw, vid):
    wa, wb = aw[..., 0] * sa[:, None], aw[..., 1] * sb[:, None]
    u = (xa[:, None] * wb[..., None] - xb[:, None] * wa[..., None]) / (wb - wa)[..., None]  # (Q, 4, W)
    terms = torch.cat([bw[..., None] * u, bw[..., None]], -1).reshape(-1, W + 1)
    acc = xa.new_zeros(V, W + 1).index_add(0, vid.reshape(-1), terms)
    v = acc[:, :W] / acc[:, W:]
    u1 = (xa * sb[:, None] - xb * sa[:, None]) / (sb - sa)[:, None]
    return v, (u1[:, None, :3] - v[vid][..., :3]).norm(dim=-1)


def _loss(out):
    """A fixed random linear functional of both outputs."""
    v, d = out
    g = torch.Generator().manual_seed(7)
    wv = torch.randn(v.shape, generator=g, dtype=v.dtype)
    wd = torch.randn(d.shape, generator=g, dtype=d.dtype)
    return (v * wv).sum() + (d * wd).sum()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_forward_matches_the_torch_formulation(dtype, tol):
    args, vid = _inputs(dtype)
    v, d = dual_vertices(*args, vid, V)
    v_ref, d_ref = _reference(*args, vid)
    assert v.shape == (V, W) and d.shape == (Q, 4) and v.dtype == dtype
    assert torch.allclose(v, v_ref, rtol=tol, atol=tol) and torch.allclose(d, d_ref, rtol=tol, atol=tol)


def test_backward_matches_torch_autograd():
    args, vid = _inputs(torch.float64, seed=1)
    mine = [t.clone().requires_grad_() for t in args]
    ref = [t.clone().requires_grad_() for t in args]
    _loss(dual_vertices(*mine, vid, V)).backward()
    _loss(_reference(*ref, vid)).backward()
    for name, a, b in zip(("xa", "xb", "sa", "sb", "aw", "bw"), mine, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("index,name", list(enumerate(("xa", "xb", "sa", "sb", "aw", "bw"))))
def test_adjoint_matches_central_differences(index, name):
    args, vid = _inputs(torch.float64, seed=2)
    args = [t.clone().requires_grad_(k == index) for k, t in enumerate(args)]
    checks = directional_check(lambda *a: _loss(dual_vertices(*a, vid, V)), args, eps=1e-6, n_dirs=3)
    assert checks and max(c.rel_error for c in checks) < 1e-6, (name, checks)


def test_only_the_distances_or_only_the_vertices_may_be_used():
    """A loss on one output leaves the other's incoming gradient None: both must still work."""
    args, vid = _inputs(torch.float64, seed=3)
    for pick in (0, 1):
        mine = [t.clone().requires_grad_() for t in args]
        ref = [t.clone().requires_grad_() for t in args]
        dual_vertices(*mine, vid, V)[pick].sum().backward()
        _reference(*ref, vid)[pick].sum().backward()
        for a, b in zip(mine, ref):
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
