"""Neural constitutive laws (NCLaw's architecture and its plain-MLP ablation): rotation
equivariance to round-off on random, compressed, stretched and inverted F; exactly stress-free and
plasticity-free at F = I; the decomposition's hand-written adjoint vs central differences and finite
where singular values repeat; float64 FD checks through an MPM rollout w.r.t. the network weights,
independent of the checkpoint window; save/load and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from diffworld.engine.runtime import init_warp
from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.common.quaternion import axis_angle_to_quat, quat_to_matrix
from diffworld.sims.constitutive.neural import (InvariantElasticity, InvariantPlasticity, NeuralLaw, PlainElasticity,
                                                PlainPlasticity, invariants, load_law, rotation_and_singular_values,
                                                save_law)

torch.set_num_threads(1)
F64 = torch.float64


def _random_F(n: int, seed: int) -> torch.Tensor:
    """Random deformation gradients: general, near identity, strongly compressed/stretched along
    random axes, and inverted (det < 0)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(3, dtype=F64)
    general = eye + 0.4 * torch.randn(n, 3, 3, generator=g, dtype=F64)
    near = eye + 1e-7 * torch.randn(n, 3, 3, generator=g, dtype=F64)
    Q = quat_to_matrix(axis_angle_to_quat(torch.randn(n, 3, generator=g, dtype=F64)))
    s = torch.exp(1.2 * torch.randn(n, 3, generator=g, dtype=F64))
    stretched = Q @ torch.diag_embed(s) @ quat_to_matrix(axis_angle_to_quat(torch.randn(n, 3, generator=g, dtype=F64)))
    inverted = general.clone()
    inverted[:, :, 0] *= -1
    return torch.cat([general, near, stretched, inverted])


def _rotations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quat_to_matrix(axis_angle_to_quat(3.0 * torch.randn(n, 3, generator=g, dtype=F64)))


def _net(part):
    torch.manual_seed(0)
    return part.to(F64)


def test_invariant_parts_are_rotation_equivariant_to_round_off():
    F = _random_F(200, 0)
    Q = _rotations(F.shape[0], 1)
    el, pl = _net(InvariantElasticity(output_scale=1e3)), _net(InvariantPlasticity())
    with torch.no_grad():
        tau, tau_q = el(F), el(Q @ F)
        Fp, Fp_q = pl(F), pl(Q @ F)
    # round-off relative to the stress scale of each F (output_scale |F|^2): near the identity tau
    # itself is ~1e-7 of it, and the SVD's rotation there is good to round-off of |F| only
    scale = 1e3 * F.abs().amax((-2, -1)) ** 2
    err = (tau_q - Q @ tau @ Q.transpose(-1, -2)).abs().amax((-2, -1)) / scale
    # measured up to 1.2e-12 for the stretched F (condition numbers up to ~1e3: the iterative SVD is
    # accurate to ~1e-15 x the condition number), ~1e-15 for the others
    assert float(err.max()) < 1e-11
    generic = torch.cat([torch.arange(200), torch.arange(400, 800)])  # away from the identity: relative too
    rel = (tau_q - Q @ tau @ Q.transpose(-1, -2)).abs().amax((-2, -1)) / tau.abs().amax((-2, -1))
    assert float(rel[generic].max()) < 1e-12  # measured 4.5e-14
    assert float((Fp_q - Q @ Fp).abs().max()) < 1e-12 * float(F.abs().max())
    # tau is symmetric (a Kirchhoff stress): P F^T with P = R S
    assert float((tau - tau.transpose(-1, -2)).abs().max()) > 0  # R S F^T is not symmetric in general
    # the ablation is not equivariant (so the test above can fail)
    plain = _net(PlainElasticity(output_scale=1e3))
    with torch.no_grad():
        assert float((plain(Q @ F) - Q @ plain(F) @ Q.transpose(-1, -2)).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stress_free_and_plasticity_free_at_identity_exactly(dtype):
    for seed in range(5):
        torch.manual_seed(seed)
        law = NeuralLaw(InvariantElasticity(output_scale=1e5), InvariantPlasticity()).to(dtype)
        plain = NeuralLaw(PlainElasticity(output_scale=1e5), PlainPlasticity()).to(dtype)
        I = torch.eye(3, dtype=dtype).expand(7, 3, 3)
        for m in (law, plain):
            assert bool((m.stress(I, {}) == 0).all())
            assert bool((m.project(I, {}) == I).all())


def test_decomposition_is_a_proper_polar_rotation_and_its_adjoint_matches_differences():
    F = _random_F(100, 2)
    R, s = rotation_and_singular_values(F)
    eye = torch.eye(3, dtype=F64)
    assert float((R.transpose(-1, -2) @ R - eye).abs().max()) < 1e-12
    assert float((torch.linalg.det(R) - 1).abs().max()) < 1e-12
    S = R.transpose(-1, -2) @ F  # the stretch: symmetric, eigenvalues = the singular values (sign of det F)
    assert float((S - S.transpose(-1, -2)).abs().max()) < 1e-10 * float(F.abs().max())
    ev = torch.linalg.eigvalsh(0.5 * (S + S.transpose(-1, -2)))
    assert float((ev.sort(-1).values - s.sort(-1).values).abs().max()) < 1e-10 * float(s.abs().max())
    assert bool(((s.prod(-1) > 0) == (torch.linalg.det(F) > 0)).all())
    # adjoint vs central differences in random directions (generic F: distinct singular values)
    g = torch.Generator().manual_seed(3)
    Fg = F[:100].clone().requires_grad_()
    wR = torch.randn(100, 3, 3, generator=g, dtype=F64)
    ws = torch.randn(100, 3, generator=g, dtype=F64)

    def f(X):
        Rx, sx = rotation_and_singular_values(X)
        return (Rx * wR).sum() + (sx * ws).sum()

    (grad,) = torch.autograd.grad(f(Fg), Fg)
    for _ in range(5):
        d = torch.randn(Fg.shape, generator=g, dtype=F64)
        e = 1e-6
        with torch.no_grad():
            fd = (f(Fg + e * d) - f(Fg - e * d)) / (2 * e)
        assert abs(float(fd) - float((grad * d).sum())) < 1e-6 * abs(float(fd))


def test_rotation_gradient_is_finite_and_right_where_singular_values_repeat():
    """At F = I and F = diag(2, 2, 1) torch's SVD autograd is NaN; R's derivative there is
    defined (it needs sigma_i + sigma_j only) and matches central differences."""
    g = torch.Generator().manual_seed(4)
    for base in (torch.eye(3, dtype=F64), torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))):
        Q = _rotations(1, 5)[0]
        F = (Q @ base).requires_grad_()
        w = torch.randn(3, 3, generator=g, dtype=F64)
        (grad,) = torch.autograd.grad((rotation_and_singular_values(F)[0] * w).sum(), F)
        assert bool(torch.isfinite(grad).all())
        for _ in range(3):
            d = torch.randn(3, 3, generator=g, dtype=F64)
            e = 1e-6
            with torch.no_grad():
                fd = ((rotation_and_singular_values(F + e * d)[0] - rotation_and_singular_values(F - e * d)[0])
                      * w).sum() / (2 * e)
            assert abs(float(fd) - float((grad * d).sum())) < 1e-6 * max(1.0, abs(float(fd)))
    # the networks' gradients w.r.t. F are finite at the identity (every particle at the start)
    F = torch.eye(3, dtype=F64).expand(4, 3, 3).clone().requires_grad_()
    x, R = invariants(F)
    law = NeuralLaw(_net(InvariantElasticity(output_scale=10.0)), _net(InvariantPlasticity()))
    out = law.stress(F, {}).sum() + law.project(F, {}).sum()
    (grad,) = torch.autograd.grad(out, F)
    assert bool(torch.isfinite(grad).all())


def _composed(part, F):
    """The law written as plain torch ops (the decomposition's own autograd Function, torch
    invariants, the MLP, the symmetric head): what the fused Warp kernels must reproduce."""
    R, s = rotation_and_singular_values(F)
    eye = torch.eye(3, dtype=F.dtype)
    C = F.transpose(-1, -2) @ F - eye
    x = torch.cat([s - 1.0, C.reshape(-1, 9), s.prod(-1, keepdim=True) - 1.0], -1) / part.input_scale
    N = part.mlp(x).reshape(-1, 3, 3)
    S = 0.5 * (N + N.transpose(-1, -2))
    if isinstance(part, InvariantElasticity):
        return part.output_scale * R @ S @ F.transpose(-1, -2)
    return F + part.alpha * R @ S


@pytest.mark.parametrize("kind", ["elastic", "plastic"])
def test_fused_kernels_match_the_torch_composition_values_and_gradients(kind):
    """The Warp invariants/head kernels and their hand-written adjoints against the same law
    composed of torch ops, on 800 random F (general, near I, stretched, inverted) plus F = I,
    with a non-trivial input normalisation; gradients w.r.t. F and every weight."""
    scale = [0.5, 0.7, 1.3] + [2.0] * 9 + [0.9]
    if kind == "elastic":
        part = _net(InvariantElasticity(width=32, output_scale=1e3, input_scale=scale))
    else:
        part = _net(InvariantPlasticity(width=32, alpha=0.1, input_scale=scale))
    F = torch.cat([_random_F(200, 21), torch.eye(3, dtype=F64)[None]]).requires_grad_()
    g = torch.Generator().manual_seed(22)
    w = torch.randn(F.shape, generator=g, dtype=F64)
    params = list(part.parameters())
    fused = part(F)
    ref = _composed(part, F)
    assert float((fused - ref).detach().abs().max()) < 1e-9 * max(1.0, float(ref.detach().abs().max()))
    ga = torch.autograd.grad((fused * w).sum(), [F, *params])
    gb = torch.autograd.grad((ref * w).sum(), [F, *params])
    for a, b in zip(ga, gb):
        assert bool(torch.isfinite(a).all())
        assert float((a - b).abs().max()) < 1e-8 * max(1.0, float(b.abs().max()))
    # and in float32, the fused path agrees with float64 to float32 round-off
    part32 = part.float()
    out32 = part32(F.detach().float())
    assert float((out32.double() - ref.detach()).abs().max()) < 1e-4 * max(1.0, float(ref.detach().abs().max()))


# ------------------------------------------------------------------------------ through a rollout

T = 16


def _scene():
    init_warp()
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=16)
    bodies = [mpm.Body(Box((0.1, 0.1, 0.1), (0.45, 0.5, 0.45)), mpm.material("neo_hookean", E=3e3), ppc=8,
                       velocity=(0.5, -0.4, -0.6), name="cube"),
              mpm.Body(Box((0.08, 0.08, 0.06), (0.62, 0.5, 0.3)), mpm.material("water", E=2e3), ppc=8,
                       name="water")]
    model, state = mpm.build_model(grid, bodies, dt=1e-3, dtype=F64)
    # a spin as in NCLaw's set-up, so that F leaves the identity at once in every direction
    c = state.x[model.body == 0].mean(0)
    spin = torch.linalg.cross(torch.tensor([4.0, 4.0, 4.0], dtype=F64).expand_as(state.x), state.x - c)
    v = torch.where((model.body == 0)[:, None], state.v + 0.1 * spin, state.v)
    return model, mpm.State(state.x, v, state.C, state.F)


def _law(kind):
    torch.manual_seed(7)
    if kind == "invariant":
        law = NeuralLaw(InvariantElasticity(width=16, output_scale=2e3), InvariantPlasticity(width=16, alpha=0.05))
    else:
        law = NeuralLaw(PlainElasticity(width=16, output_scale=2e3), PlainPlasticity(width=16, alpha=0.05))
    return law.to(F64)


def _loss(model, state, window):
    out = mpm.rollout(model, state, T, None, window=window, record_every=4)
    gen = torch.Generator().manual_seed(5)
    return sum((s.x * torch.randn(s.x.shape, generator=gen, dtype=F64)).sum()
               + (s.F * torch.randn(s.F.shape, generator=gen, dtype=F64)).sum() for s in out.states[1:])


@pytest.mark.parametrize("kind", ["invariant", "plain"])
def test_weight_gradients_through_a_rollout_match_central_differences(kind):
    model, state = _scene()
    law = _law(kind)
    bound = mpm.use_law(model, law, "cube")
    params = list(law.parameters())
    _loss(bound, state, window=5).backward()
    grads = [p.grad.clone() for p in params]
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    gen = torch.Generator().manual_seed(11)
    eps = 1e-6
    for _ in range(2):
        dirs = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
        norm = torch.sqrt(sum((d * d).sum() for d in dirs))
        dirs = [d / norm for d in dirs]
        analytic = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.add_(sign * eps * d)
                values.append(float(_loss(bound, state, window=5)))
                for p, d in zip(params, dirs):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("everyone", [False, True])
def test_the_laws_own_substep_adjoint_equals_autograd(monkeypatch, everyone):
    """NeuralLaw's ``substep_stage`` (return map and stress without autograd, its hand-written
    adjoint) gives the autograd path's positions and gradients (weights, initial velocities),
    for a law on one body among others and for a law on every particle (the solver then skips
    the Warp return map)."""
    model, state = _scene_only_cube() if everyone else _scene()
    runs = []
    for staged in (True, False):
        law = _law("invariant")
        if not staged:
            monkeypatch.setattr(type(law), "substep_stage", lambda self, F, keep: None)
        bound = mpm.use_law(model, law, "cube")
        v = state.v.clone().requires_grad_(True)
        loss = _loss(bound, mpm.State(state.x, v, state.C, state.F), window=5)
        grads = torch.autograd.grad(loss, [v, *law.parameters()])
        runs.append((float(loss.detach()), grads))
        monkeypatch.undo()
    (la, ga), (lb, gb) = runs
    assert la == pytest.approx(lb, rel=1e-13, abs=0.0)
    for a, b in zip(ga, gb):
        assert float((a - b).abs().max()) <= 1e-11 * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("everyone", [False, True])
def test_the_staged_law_in_row_chunks_on_threads_equals_one_chunk(monkeypatch, everyone):
    """The solver runs a law's substep stage in row chunks on its CPU threads (here 3 chunks,
    forced by a small chunk floor): positions and gradients (weights, initial velocities) equal
    the one-chunk run's to round-off (the chunks' MLP products and weight-gradient sums round
    differently), for a law on one body among others and on every particle."""
    from diffworld.sims.mpm import solver

    model, state = _scene_only_cube() if everyone else _scene()
    runs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("DIFFWORLD_CPU_THREADS", threads)
        monkeypatch.setattr(solver, "MIN_LAW_CHUNK", 50)
        law = _law("invariant")
        bound = mpm.use_law(model, law, "cube")
        rows = int(bound.torch_laws[0].index.numel())
        assert len(mpm.Stepper(bound)._row_chunks(rows)) == int(threads)
        v = state.v.clone().requires_grad_(True)
        loss = _loss(bound, mpm.State(state.x, v, state.C, state.F), window=5)
        grads = torch.autograd.grad(loss, [v, *law.parameters()])
        runs.append((float(loss.detach()), grads))
    (la, ga), (lb, gb) = runs
    assert la == pytest.approx(lb, rel=1e-13, abs=0.0)
    for a, b in zip(ga, gb):
        assert float((a - b).abs().max()) <= 1e-11 * max(float(b.abs().max()), 1e-30)


def _scene_only_cube():
    init_warp()
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=16)
    bodies = [mpm.Body(Box((0.1, 0.1, 0.1), (0.45, 0.5, 0.45)), mpm.material("neo_hookean", E=3e3), ppc=8,
                       velocity=(0.5, -0.4, -0.6), name="cube")]
    model, state = mpm.build_model(grid, bodies, dt=1e-3, dtype=F64)
    c = state.x.mean(0)
    spin = torch.linalg.cross(torch.tensor([4.0, 4.0, 4.0], dtype=F64).expand_as(state.x), state.x - c)
    return model, mpm.State(state.x, state.v + 0.1 * spin, state.C, state.F)


def test_weight_gradients_do_not_depend_on_the_window():
    model, state = _scene()
    law = _law("invariant")
    bound = mpm.use_law(model, law, "cube")
    grads = []
    for window in (3, 7, T):
        law.zero_grad()
        _loss(bound, state, window).backward()
        grads.append([p.grad.clone() for p in law.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert float((a - b).abs().max()) <= 1e-10 * float(a.abs().max())


def test_an_analytic_part_keeps_its_material_parameters():
    """Elasticity analytic (the particles' E, nu), plasticity a network: the stress is the
    built-in law's exactly; the law reads E and nu by name."""
    from diffworld.sims.constitutive import LAWS

    torch.manual_seed(0)
    law = NeuralLaw("corotated", InvariantPlasticity()).to(F64)
    assert law.material_parameters == ("E", "nu")
    F = _random_F(20, 6)[:20]
    p = {"E": torch.full((20,), 1e4, dtype=F64), "nu": torch.full((20,), 0.3, dtype=F64)}
    assert torch.equal(law.stress(F, p), LAWS["corotated"].stress(F, p))


# ------------------------------------------------------------------------------ files


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    law = NeuralLaw(InvariantElasticity(width=8, output_scale=1e5, input_scale=[0.1] * 13),
                    InvariantPlasticity(width=8, depth=3, alpha=2e-3)).to(F64)
    path = save_law(law, tmp_path / "jelly")
    assert path.suffix == ".pt" and (tmp_path / "jelly.json").is_file()
    back = load_law(tmp_path / "jelly.json", dtype=F64)
    assert back.config() == law.config()
    F = _random_F(10, 7)
    assert torch.equal(back.stress(F, {}), law.stress(F, {}))
    assert torch.equal(back.project(F, {}), law.project(F, {}))
    assert load_law(path).elastic.mlp.layers[0].weight.dtype == torch.float32


def test_load_errors_name_the_file_and_the_mismatch(tmp_path):
    torch.manual_seed(1)
    law = NeuralLaw(InvariantElasticity(width=8), InvariantPlasticity(width=8))
    save_law(law, tmp_path / "a")
    with pytest.raises(ValueError, match=r"nope\.pt: no such file"):
        load_law(tmp_path / "nope.pt")
    # the weights of another architecture (width 16) under the description of width 8
    other = NeuralLaw(InvariantElasticity(width=16), InvariantPlasticity(width=16))
    save_law(other, tmp_path / "b")
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())
    with pytest.raises(ValueError, match=r"b\.pt: elastic\.mlp\.layers\.0\.weight has shape \(16, 13\), the "
                                         r"architecture in b\.json needs \(8, 13\)"):
        load_law(tmp_path / "b.pt")
    cfg = json.loads((tmp_path / "a.json").read_text())
    cfg["elastic"]["kind"] = "spline"
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"a\.json\.elastic\.kind: expected one of \['builtin', 'invariant', "
                                         r"'plain'\], got 'spline'"):
        load_law(tmp_path / "a.pt")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ValueError, match="not a diffworld neural law"):
        load_law(tmp_path / "a.pt")


def test_signed_svd_on_hostile_matrices():
    """The Jacobi SVD kernel: F = U diag(s) V^T to round-off, U and V proper rotations, s
    descending with s_2 carrying det F's sign, on random, identity, rotations, reflections,
    repeated and nearly repeated singular values, rank 2, rank 1, zero, strongly stretched,
    inverted, and matrices of scale 1e8 and 1e-8."""
    from diffworld.sims.constitutive.kernels_neural import signed_svd

    g = torch.Generator().manual_seed(31)
    n = 300
    eye = torch.eye(3, dtype=F64)
    general = eye + 0.5 * torch.randn(n, 3, 3, generator=g, dtype=F64)
    Q1, Q2 = _rotations(n, 32), _rotations(n, 33)

    def diag(*v):
        return torch.diag(torch.tensor(v, dtype=F64))

    cases = {
        "general": general, "identity": eye.expand(n, 3, 3), "near identity": eye + 1e-9 * general,
        "rotation": Q1, "reflection": Q1 @ diag(1.0, 1.0, -1.0), "repeated": Q1 @ diag(2.0, 2.0, 1.0) @ Q2,
        "repeated small": Q1 @ diag(1.0, 1e-3, 1e-3) @ Q2, "rank 2": Q1 @ diag(3.0, 0.5, 0.0) @ Q2,
        "rank 1": torch.randn(n, 3, 1, generator=g, dtype=F64) @ torch.randn(n, 1, 3, generator=g, dtype=F64),
        "zero": torch.zeros(n, 3, 3, dtype=F64),
        "stretched": Q1 @ torch.diag_embed(torch.exp(2.5 * torch.randn(n, 3, generator=g, dtype=F64))) @ Q2,
        "inverted": general * torch.tensor([-1.0, 1.0, 1.0], dtype=F64), "huge": 1e8 * general, "tiny": 1e-8 * general,
    }
    for name, F in cases.items():
        F = F.contiguous()
        U, s, V = signed_svd(F)
        scale = F.abs().amax((-2, -1)).clamp_min(1e-300)
        rec = ((U @ torch.diag_embed(s) @ V.transpose(-1, -2) - F).abs().amax((-2, -1)) / scale).max()
        assert float(rec) < 1e-12, (name, float(rec))
        for M in (U, V):
            assert float((M.transpose(-1, -2) @ M - eye).abs().max()) < 1e-12, name
            assert float((torch.linalg.det(M) - 1.0).abs().max()) < 1e-12, name
        ref = torch.linalg.svdvals(F)
        ref = torch.cat([ref[:, :2], ref[:, 2:] * torch.sign(torch.linalg.det(F))[:, None]], 1)
        err = ((s - ref).abs() / ref[:, :1].clamp_min(1e-300)).max()
        assert float(err) < 1e-12, (name, float(err))
        assert bool((s[:, 0] >= s[:, 1] - 1e-12 * s[:, 0]).all() and (s[:, 1] >= s[:, 2].abs() - 1e-12 * s[:, 0]).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_stage_kernels_equal_their_parts(dtype):
    """stage_mid_forward (plastic update + the elastic invariants, its Jacobi sweeps started from
    a given V) against head_forward then invariants_forward (sweeps from V = I): F' bitwise, x and
    R to round-off, for the return map's V as the start and for arbitrary rotations as the start,
    on random, near-identity, stretched, inverted, identity, rank-deficient and zero F; and
    stage_mid_adjoint bitwise equal to head_adjoint / invariants_adjoint composed as the law's
    adjoint composes them."""
    from diffworld.sims.constitutive.kernels_neural import (HEAD_PLASTIC, head_adjoint, head_forward,
                                                            invariants_adjoint, invariants_forward,
                                                            stage_mid_adjoint, stage_mid_forward)

    eye = torch.eye(3, dtype=F64)
    F = torch.cat([_random_F(100, 41), eye.expand(5, 3, 3), torch.zeros(3, 3, 3),
                   torch.randn(4, 3, 1, dtype=F64) @ torch.randn(4, 1, 3, dtype=F64)]).to(dtype).contiguous()
    n = F.shape[0]
    g = torch.Generator().manual_seed(42)
    N = (0.5 * torch.randn(n, 9, generator=g, dtype=F64)).to(dtype)
    inv_p = (1.0 / (0.5 + torch.rand(13, generator=g, dtype=F64))).to(dtype)
    inv_e = (1.0 / (0.5 + torch.rand(13, generator=g, dtype=F64))).to(dtype)
    alpha = 0.05
    _, R, usv = invariants_forward(F, inv_p)
    F_ref = head_forward(F, R, N, alpha, HEAD_PLASTIC)
    x_ref, R_ref, usv_ref = invariants_forward(F_ref, inv_e)
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # (float32: also the looser sweep tolerance)
    svd_tol = 1e-12 if dtype == torch.float64 else 1e-8
    s_ref = usv_ref[1]
    # R = U V^T is unique where s_1 + s_2 > 0 and as sensitive as 1 / (s_1 + s_2): compare there
    cond = (s_ref[:, 0].abs() / (s_ref[:, 1] + s_ref[:, 2]).clamp_min(1e-300)).clamp(1.0, 1e6)
    unique = (s_ref[:, 1] + s_ref[:, 2]) > 1e-6 * s_ref[:, 0].abs()
    for start in (usv[2], _rotations(n, 43)):
        F_new, x, R_new, usv_new = stage_mid_forward(F, R, N, alpha, start.contiguous(), inv_e)
        assert torch.equal(F_new, F_ref)
        assert float((x - x_ref).abs().max()) <= tol * max(1.0, float(x_ref.abs().max()))
        dR = (R_new - R_ref).double().abs().amax((-2, -1))
        assert bool((dR[unique] <= tol * cond[unique]).all())
        U, s, V = usv_new
        rec = U @ torch.diag_embed(s) @ V.transpose(-1, -2) - F_new.double()
        assert float(rec.abs().max()) <= svd_tol * max(1.0, float(F_new.abs().max()))
        assert float((s - s_ref).abs().max()) <= svd_tol * max(1.0, float(s.abs().max()))
    # the adjoint: bitwise the composition (same arithmetic, same order of the sums)
    gx, gR, g_head, g_in = (torch.randn(shape, generator=g, dtype=F64).to(dtype)
                            for shape in ((n, 13), (n, 3, 3), (n, 3, 3), (n, 3, 3)))
    g_F, g_R, g_N = stage_mid_adjoint(F_ref, inv_e, usv_ref, gx, gR, g_head, g_in, R, N, alpha)
    g_ref = g_in + (g_head + invariants_adjoint(F_ref, inv_e, usv_ref, gx, gR))
    gF2, gR2, gN2 = head_adjoint(F, R, N, alpha, HEAD_PLASTIC, g_ref)
    assert torch.equal(g_F, g_ref) and torch.equal(g_F, gF2)
    assert torch.equal(g_R, gR2) and torch.equal(g_N, gN2)
    # N and d loss / dx as the MLP hands them over (transposed views, read in place through their
    # strides): bitwise the same results; a wrong shape is refused by name
    N_t, gx_t = N.t().contiguous().t(), gx.t().contiguous().t()
    assert not N_t.is_contiguous() and torch.equal(N_t, N)
    assert torch.equal(head_forward(F, R, N_t, alpha, HEAD_PLASTIC), F_ref)
    assert torch.equal(stage_mid_forward(F, R, N_t, alpha, usv[2].contiguous(), inv_e)[0], F_ref)
    for a, b in zip(stage_mid_adjoint(F_ref, inv_e, usv_ref, gx_t, gR, g_head, g_in, R, N_t, alpha),
                    (g_F, g_R, g_N)):
        assert torch.equal(a, b)
    assert torch.equal(invariants_adjoint(F_ref, inv_e, usv_ref, gx_t, gR),
                       invariants_adjoint(F_ref, inv_e, usv_ref, gx, gR))
    with pytest.raises(ValueError, match=r"expected N of shape \(%d, 9\), got \(%d, 8\)" % (n, n)):
        head_forward(F, R, N[:, :8], alpha, HEAD_PLASTIC)


def test_float32_invariants_stop_sweeping_earlier_but_agree_with_float64():
    """sweep_tolerance: float32 deformation gradients stop the Jacobi sweeps at off-diagonals of
    1e-9 of the diagonal; x and R still agree with the float64 ones to float32 round-off, on the
    hostile F of the SVD test."""
    from diffworld.sims.constitutive.kernels_neural import invariants_forward, sweep_tolerance

    assert sweep_tolerance(torch.float32) > sweep_tolerance(torch.float64)
    F = _random_F(200, 51)
    inv = torch.ones(13, dtype=F64)
    x64, R64, _ = invariants_forward(F, inv)
    x32, R32, (U, s, V) = invariants_forward(F.float(), inv.float())
    assert float((R32.double() - R64).abs().max()) < 1e-5
    assert float(((x32.double() - x64).abs() / (1.0 + x64.abs())).max()) < 1e-5
    F32 = F.float().double()
    assert float((U @ torch.diag_embed(s) @ V.transpose(-1, -2) - F32).abs().max()) < 1e-7 * float(F32.abs().max())


def test_the_staged_law_follows_a_changed_input_scale():
    """substep_stage keeps 1 / input_scale between calls: a scale changed in place (as
    load_state_dict does) or a law moved to another dtype is seen at the next call."""
    torch.manual_seed(3)
    law = NeuralLaw(InvariantElasticity(width=16, output_scale=1e3), InvariantPlasticity(width=16, alpha=0.05)).to(F64)
    F = _random_F(20, 61)
    for change in (None, "in place", "state dict", "float32"):
        if change == "in place":
            with torch.no_grad():
                law.elastic.input_scale.mul_(1.7)
        elif change == "state dict":
            sd = law.state_dict()
            sd["plastic.input_scale"] = sd["plastic.input_scale"] * 0.6
            law.load_state_dict(sd)
        elif change == "float32":
            law = law.float()
        Fx = F.to(law.elastic.input_scale.dtype)
        F_new, tau, _ = law.substep_stage(Fx, keep=False)
        with torch.no_grad():
            F_ref, tau_ref = law(Fx, {})
        tol = 1e-10 if Fx.dtype == F64 else 1e-4
        assert float((F_new - F_ref).abs().max()) <= tol * float(F_ref.abs().max()), change
        assert float((tau - tau_ref).abs().max()) <= tol * float(tau_ref.abs().max()), change


def test_the_staged_law_steps_aside_where_the_module_path_would_differ():
    """substep_stage replaces the modules' forward calls: where those would do something else (a
    forward hook or pre-hook on any module they call, a layer with a bias or of another type, a
    global hook) it returns None and the solver takes the autograd path."""
    torch.manual_seed(4)
    F = _random_F(12, 62)

    def law():
        return NeuralLaw(InvariantElasticity(width=8), InvariantPlasticity(width=8)).to(F64)

    assert law().substep_stage(F, keep=False) is not None
    changes = {
        "hook on a layer": lambda L: L.elastic.mlp.layers[1].register_forward_hook(lambda m, i, o: 2 * o),
        "pre-hook on an MLP": lambda L: L.plastic.mlp.register_forward_pre_hook(lambda m, i: None),
        "hook on a part": lambda L: L.plastic.register_forward_hook(lambda m, i, o: o),
        "hook on the law": lambda L: L.register_forward_hook(lambda m, i, o: o),
        "a biased layer": lambda L: L.elastic.mlp.layers.__setitem__(0, torch.nn.Linear(13, 8).to(F64)),
        "another layer type": lambda L: L.plastic.mlp.layers.__setitem__(2, torch.nn.Bilinear(8, 8, 9).to(F64)),
    }
    for name, change in changes.items():
        L = law()
        change(L)
        assert L.substep_stage(F, keep=False) is None, name
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert law().substep_stage(F, keep=False) is None, "global hook"
    finally:
        handle.remove()
