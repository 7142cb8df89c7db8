"""FEM materials: torch stress = d(energy)/dF; Warp energy, stress, differential and VJP against
the torch references, autograd and central differences (float64; float32 within a stated
tolerance); rest state, small strain = linear (second-order agreement), rotation invariance,
stable Neo-Hookean through inversion and its DiffTactile parametrization; bad input."""

import math

import pytest
import torch

from diffworld.engine.runtime import init_warp
from diffworld.sims.constitutive import lame
from diffworld.sims.fem import materials as M

torch.set_num_threads(1)

LAWS = list(M.FEM_MATERIALS)
NONLINEAR = ["stable_neo_hookean", "fixed_corotated"]
E0, NU0 = 8.0e3, 0.43  # the tactile gel (DiffTactile's declared modulus, in Pa)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotations(n: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, 3, 3, generator=_gen(seed), dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R, 0, -2, -1))[:, None, :]
    Q[torch.linalg.det(Q) < 0, :, 0] *= -1
    return Q


def _stretched(n: int, seed: int, lo: float, hi: float, inverted: bool = False) -> torch.Tensor:
    """Q1 diag(s) Q2 with singular values in [lo, hi]; the smallest negated if ``inverted``."""
    s = lo + (hi - lo) * torch.rand(n, 3, generator=_gen(seed), dtype=torch.float64)
    if inverted:
        s = s.sort(-1, descending=True).values
        s[:, 2] = -s[:, 2]
    return _rotations(n, seed + 1) @ torch.diag_embed(s) @ _rotations(n, seed + 2)


def _cases(n: int, seed: int, law: str) -> dict[str, torch.Tensor]:
    """Deformation gradients: near identity, moderate, large stretch, and (not linear) inverted."""
    eye = torch.eye(3, dtype=torch.float64)
    out = {
        "near_identity": eye + 1e-3 * torch.randn(n, 3, 3, generator=_gen(seed), dtype=torch.float64),
        "moderate": eye + 0.3 * torch.randn(n, 3, 3, generator=_gen(seed + 1), dtype=torch.float64),
        "large_stretch": _stretched(n, seed + 2, 0.3, 3.0),
    }
    if law != "linear":
        # singular values apart enough that s_i + s_j (the polar rotation's divisor) stays > 0.3
        s = torch.stack([0.8 + 2.2 * torch.rand(n, generator=_gen(seed + 11), dtype=torch.float64),
                         0.8 + 2.2 * torch.rand(n, generator=_gen(seed + 12), dtype=torch.float64),
                         -0.2 - 0.3 * torch.rand(n, generator=_gen(seed + 13), dtype=torch.float64)], -1)
        out["inverted"] = _rotations(n, seed + 14) @ torch.diag_embed(s) @ _rotations(n, seed + 15)
    return out


def _params(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element E [Pa] in [2e3, 2e4] and nu in [0.2, 0.46] (soft, nearly incompressible gels)."""
    g = _gen(seed)
    E = 2e3 * 10 ** torch.rand(n, generator=g, dtype=torch.float64)
    nu = 0.2 + 0.26 * torch.rand(n, generator=g, dtype=torch.float64)
    return E.to(dtype), nu.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-element error relative to that element's reference norm."""
    a, b = a.double(), b.double()
    dims = tuple(range(1, b.dim()))
    err = (a - b).flatten(1).norm(dim=1) if dims else (a - b).abs()
    ref = b.flatten(1).norm(dim=1) if dims else b.abs()
    return float((err / ref.clamp_min(1e-300)).max())


@pytest.fixture(scope="module", autouse=True)
def _warp():
    init_warp()


# ------------------------------------------------------------------------------------------------
# Torch references
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("law", LAWS)
def test_torch_first_piola_is_the_energy_derivative(law):
    mat = M.FEM_MATERIALS[law]
    for case, F in _cases(64, 1, law).items():
        E, nu = _params(64, 2)
        Fg = F.clone().requires_grad_()
        (P_auto,) = torch.autograd.grad(mat.energy(Fg, E, nu).sum(), Fg)
        P = mat.first_piola(F, E, nu)
        assert _rel(P, P_auto) < 1e-10, (law, case, _rel(P, P_auto))
        if case == "inverted":
            assert (torch.linalg.det(F) < 0).all()


# ------------------------------------------------------------------------------------------------
# Warp device functions against the references
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("law", LAWS)
def test_device_energy_and_stress_match_torch_in_float64(law):
    mat = M.FEM_MATERIALS[law]
    for case, F in _cases(200, 3, law).items():
        E, nu = _params(200, 4)
        P = M.device_first_piola(law, F, E, nu)
        assert _rel(P, mat.first_piola(F, E, nu)) < 1e-11, (law, case)
        psi, psi_ref = M.device_energy(law, F, E, nu), mat.energy(F, E, nu)
        # psi ~ |P| |F - I|: near identity, compare to that scale (the energy is ~1e-6 of it)
        scale = (P.flatten(1).norm(dim=1) * (F - torch.eye(3, dtype=F.dtype)).flatten(1).norm(dim=1))
        assert float(((psi - psi_ref).abs() / scale).max()) < 1e-11, (law, case)


# float32: per-element error of P relative to |P|, against float64 at the same (rounded) inputs.
# Near rest (strain 1e-3) P ~ 1e-3 mu and the cancellations in F - R, cof(F), J - 1 cost about
# eps32 / strain; measured: 7.5e-5 near identity, <= 1.6e-5 otherwise (the float32 SVD of
# inverted fixed corotated).
FLOAT32_TOL = {"near_identity": 3e-4, "moderate": 5e-5, "large_stretch": 5e-5, "inverted": 5e-5}


@pytest.mark.parametrize("law", LAWS)
def test_device_stress_in_float32_is_within_tolerance(law):
    mat = M.FEM_MATERIALS[law]
    for case, F in _cases(200, 5, law).items():
        E, nu = _params(200, 6)
        P32 = M.device_first_piola(law, F.float(), E.float(), nu.float())
        assert P32.dtype == torch.float32
        # the reference at the float32-rounded inputs: only the kernel's rounding is measured
        ref = mat.first_piola(F.float().double(), E.float().double(), nu.float().double())
        assert _rel(P32, ref) < FLOAT32_TOL[case], (law, case, _rel(P32, ref))


@pytest.mark.parametrize("law", LAWS)
def test_device_differential_matches_central_differences(law):
    for case, F in _cases(100, 7, law).items():
        E, nu = _params(100, 8)
        dF = torch.randn(F.shape, generator=_gen(9), dtype=torch.float64)
        h = 1e-6 * F.flatten(1).norm(dim=1)[:, None, None]  # relative step
        fd = (M.device_first_piola(law, F + h * dF, E, nu) - M.device_first_piola(law, F - h * dF, E, nu)) / (2 * h)
        dP = M.device_first_piola_diff(law, F, dF, E, nu)
        assert _rel(dP, fd) < 1e-6, (law, case, _rel(dP, fd))
        # and the torch reference's differences agree with it
        mat = M.FEM_MATERIALS[law]
        fd_ref = (mat.first_piola(F + h * dF, E, nu) - mat.first_piola(F - h * dF, E, nu)) / (2 * h)
        assert _rel(dP, fd_ref) < 1e-6, (law, case)


@pytest.mark.parametrize("law", LAWS)
def test_differential_at_rest_is_the_linear_tangent(law):
    """At F = I exactly (coincident singular values) every law's tangent is 2 mu sym(dF) + lam tr(dF) I."""
    n = 16
    F = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    E, nu = _params(n, 10)
    dF = torch.randn(n, 3, 3, generator=_gen(11), dtype=torch.float64)
    mu, lam = lame(E, nu)
    want = mu[:, None, None] * (dF + dF.transpose(1, 2)) + (lam * dF.diagonal(0, 1, 2).sum(-1))[:, None, None] * F
    assert _rel(M.device_first_piola_diff(law, F, dF, E, nu), want) < 1e-13


@pytest.mark.parametrize("law", LAWS)
def test_device_vjp_matches_torch_autograd(law):
    mat = M.FEM_MATERIALS[law]
    for case, F in _cases(64, 12, law).items():
        E, nu = _params(64, 13)
        G = torch.randn(F.shape, generator=_gen(14), dtype=torch.float64)
        # reference in (mu, lam) and in (E, nu), by autograd of the torch stress
        mu, lam = (t.clone().requires_grad_() for t in lame(E, nu))
        Fg = F.clone().requires_grad_()
        ref_F, ref_mu, ref_lam = torch.autograd.grad((mat.first_piola_lame(Fg, mu, lam) * G).sum(), (Fg, mu, lam))
        Eg, nug = E.clone().requires_grad_(), nu.clone().requires_grad_()
        ref_E, ref_nu = torch.autograd.grad((mat.first_piola(F, Eg, nug) * G).sum(), (Eg, nug))
        got = M.device_first_piola_vjp(law, F, E, nu, G)
        for name, a, b in (("F", got.F, ref_F), ("mu", got.mu, ref_mu), ("lam", got.lam, ref_lam),
                           ("E", got.E, ref_E), ("nu", got.nu, ref_nu)):
            assert _rel(a, b) < 1e-9, (law, case, name, _rel(a, b))
        # the differentiable op's backward is that VJP
        Fg, Eg, nug = F.clone().requires_grad_(), E.clone().requires_grad_(), nu.clone().requires_grad_()
        (M.device_first_piola(law, Fg, Eg, nug) * G).sum().backward()
        assert _rel(Fg.grad, ref_F) < 1e-9 and _rel(Eg.grad, ref_E) < 1e-9 and _rel(nug.grad, ref_nu) < 1e-9


def test_warp_adjoint_of_the_stress_kernel_is_the_hand_written_vjp():
    """A kernel that calls ``first_piola`` (as an explicit integrator recorded on a Warp tape does)
    gets the hand-written VJP from Warp's automatic adjoint, for a mix of laws per element."""
    import warp as wp

    from diffworld.engine.bridge import launch, to_warp
    from diffworld.sims.fem import kernels_materials as K

    n = 96
    F = torch.cat([_cases(32, 15, "fixed_corotated")[c] for c in ("moderate", "large_stretch", "inverted")])
    codes = torch.arange(n, dtype=torch.int32) % 3
    E, nu = _params(n, 16)
    G = torch.randn(F.shape, generator=_gen(17), dtype=torch.float64)
    m33 = wp.types.matrix((3, 3), wp.float64)
    gF, gE, gnu = torch.zeros_like(F), torch.zeros_like(E), torch.zeros_like(nu)
    launch(K.first_piola_kernel, n, [to_warp(codes), to_warp(F, m33), to_warp(E), to_warp(nu)], F.device,
           outputs=[to_warp(torch.empty_like(F), m33)], adjoint=True,
           adj_inputs=[None, to_warp(gF, m33), to_warp(gE), to_warp(gnu)], adj_outputs=[to_warp(G, m33)])
    want = M.device_first_piola_vjp(codes, F, E, nu, G)
    assert _rel(gF, want.F) < 1e-14 and _rel(gE, want.E) < 1e-14 and _rel(gnu, want.nu) < 1e-14
    # the mixed launch equals per-law launches
    P = M.device_first_piola(codes, F, E, nu)
    for law, mat in M.FEM_MATERIALS.items():
        sel = codes == mat.code
        assert _rel(P[sel], mat.first_piola(F[sel], E[sel], nu[sel])) < 1e-11


# ------------------------------------------------------------------------------------------------
# Physical properties
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("law", LAWS)
def test_rest_state_is_energy_and_stress_free(law):
    n = 8
    F = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    E, nu = _params(n, 18)
    mat = M.FEM_MATERIALS[law]
    for P in (mat.first_piola(F, E, nu), M.device_first_piola(law, F, E, nu)):
        assert float(P.abs().max()) < 1e-12 * float(E.max())
    for psi in (mat.energy(F, E, nu), M.device_energy(law, F, E, nu)):
        assert float(psi.abs().max()) < 1e-12 * float(E.max())
    P32 = M.device_first_piola(law, F.float(), E.float(), nu.float())
    assert float(P32.abs().max()) < 1e-6 * float(E.max())


@pytest.mark.parametrize("law", NONLINEAR)
def test_small_strain_matches_linear_to_second_order(law):
    """P(I + eps G) - P_linear(I + eps G) = O(eps^2): halving eps divides the error by ~4, with the
    same E and nu (for stable Neo-Hookean this is what the 4/3, 5/6 reparametrization buys)."""
    n = 32
    G = torch.randn(n, 3, 3, generator=_gen(19), dtype=torch.float64)
    E, nu = _params(n, 20)
    eye = torch.eye(3, dtype=torch.float64)
    for stress in (lambda name, F: M.FEM_MATERIALS[name].first_piola(F, E, nu),
                   lambda name, F: M.device_first_piola(name, F, E, nu)):
        errs, rels = [], []
        for eps in (1e-3, 5e-4):
            F = eye + eps * G
            lin = stress("linear", F)
            diff = (stress(law, F) - lin).flatten(1).norm(dim=1)
            errs.append(diff / E)  # absolute error per element, in units of E
            rels.append(float((diff / lin.flatten(1).norm(dim=1)).max()))
        ratio = errs[0] / errs[1]
        assert rels[0] < 1e-2, rels  # the relative error is O(eps)
        assert float(ratio.min()) > 3.9 and float(ratio.max()) < 4.1, ratio  # the absolute error O(eps^2)


@pytest.mark.parametrize("law", NONLINEAR)
def test_rotation_invariance(law):
    mat = M.FEM_MATERIALS[law]
    Q = _rotations(64, 21)
    for case, F in _cases(64, 22, law).items():
        E, nu = _params(64, 23)
        for stress in (mat.first_piola, lambda F, E, nu: M.device_first_piola(law, F, E, nu)):
            assert _rel(stress(Q @ F, E, nu), Q @ stress(F, E, nu)) < 1e-10, (law, case)
        # Q F is far from I even when F is not: its energy carries rounding of order E eps_mach
        psi = M.device_energy(law, F, E, nu)
        diff = M.device_energy(law, Q @ F, E, nu) - psi
        assert float((diff.abs() / (E + psi.abs())).max()) < 1e-12, (law, case)


def test_linear_is_not_rotation_invariant():
    Q = _rotations(8, 24)
    F = torch.eye(3, dtype=torch.float64).repeat(8, 1, 1)
    P = M.FEM_MATERIALS["linear"].first_piola(Q @ F, E0, NU0)
    assert float(P.abs().max()) > 1e-2 * E0  # a rigid rotation stresses a linear material


def test_stable_neo_hookean_is_smooth_through_inversion():
    """F = Q1 diag(1.1, 0.9, t) Q2 with t through 0: finite energy, continuous stress (no log J),
    Warp equal to torch also at J = 0 exactly, and the energy grows as the element inverts."""
    t = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64)  # includes t = 0
    n = t.numel()
    F = _rotations(n, 25)[:1] @ torch.diag_embed(torch.stack([1.1 + 0 * t, 0.9 + 0 * t, t], -1)) @ _rotations(n, 26)[:1]
    mat = M.FEM_MATERIALS["stable_neo_hookean"]
    psi, P = mat.energy(F, E0, NU0), mat.first_piola(F, E0, NU0)
    assert torch.isfinite(psi).all() and torch.isfinite(P).all()
    assert _rel(M.device_first_piola("stable_neo_hookean", F, E0, NU0), P) < 1e-12
    assert torch.isfinite(M.device_energy("stable_neo_hookean", F, E0, NU0)).all()
    # Lipschitz along the path: neighbouring samples differ by O(dt)
    step = (P[1:] - P[:-1]).flatten(1).norm(dim=1)
    assert float(step.max()) < 3 * float(step.median())
    d = 1e-9  # across J = 0: the jump vanishes with the step
    Fpm = F[50:51].repeat(2, 1, 1)
    Fpm[0] += d * F[50] @ torch.diag(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    Fpm[1] -= d * F[50] @ torch.diag(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    Ppm = mat.first_piola(Fpm, E0, NU0)
    assert float((Ppm[0] - Ppm[1]).norm()) < 1e-6 * float(P[50].norm())
    assert bool((torch.diff(psi[:51]) < 0).all())  # energy decreases towards the rest state from t < 0
    assert float(psi[0]) > float(psi[75])  # inverted (t = -0.5) costs more than t = +0.25


def test_stable_neo_hookean_matches_the_reference_formula():
    """DiffTactile's raw constants (mu_s, lam_s) = (1294.01, 9201.11) converted by
    stable_neo_hookean_E_nu give exactly the reference's P = mu_s (1 - 1/(I_C + 1)) F +
    lam_s (J - alpha) dJ/dF, alpha = 1 + 3 mu_s / (4 lam_s); and our E, nu give the paper's
    mu_s = 4/3 mu, lam_s = lam + 5/6 mu."""
    mu_s, lam_s = 1294.01, 9201.11
    E, nu = M.stable_neo_hookean_E_nu(mu_s, lam_s)
    assert math.isclose(float(E), 2811.0, rel_tol=1e-3) and math.isclose(float(nu), 0.448, rel_tol=1e-3)
    mu, lam = lame(E, nu)
    assert math.isclose(4 / 3 * float(mu), mu_s, rel_tol=1e-12)
    assert math.isclose(float(lam) + 5 / 6 * float(mu), lam_s, rel_tol=1e-12)
    F = _cases(64, 27, "stable_neo_hookean")["large_stretch"]
    Ic = (F * F).sum((1, 2))[:, None, None]
    J = torch.linalg.det(F)[:, None, None]
    alpha = 1 + 3 * mu_s / (4 * lam_s)
    ref = mu_s * (1 - 1 / (Ic + 1)) * F + lam_s * (J - alpha) * J * torch.linalg.inv(F).transpose(1, 2)
    for P in (M.FEM_MATERIALS["stable_neo_hookean"].first_piola(F, E, nu),
              M.device_first_piola("stable_neo_hookean", F, E.expand(64), nu.expand(64))):
        assert _rel(P, ref) < 1e-11


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"unknown name 'rubber'; expected one of \['stable_neo_hookean', "
                                         r"'fixed_corotated', 'linear'\]"):
        M.material_code("rubber")
    assert [M.material_code(n) for n in LAWS] == [0, 1, 2]
    F = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    mat = M.FEM_MATERIALS["stable_neo_hookean"]
    E = torch.full((4,), 1e4, dtype=torch.float64)
    nu = torch.full((4,), 0.3, dtype=torch.float64)
    for bad_nu, shown in ((0.5, "0.5"), (-1.0, "-1.0"), (0.7, "0.7")):
        with pytest.raises(ValueError, match=rf"nu expected a finite number in \(-1, 0.5\), got {shown}"):
            mat.first_piola(F, E, bad_nu)
    with pytest.raises(ValueError, match=r"E expected a finite number > 0, got -3.0 \(element 2\)"):
        mat.energy(F, torch.tensor([1e4, 1e4, -3.0, 1e4], dtype=torch.float64), nu)
    with pytest.raises(ValueError, match=r"E expected a finite number > 0, got 0.0"):
        M.device_first_piola("linear", F, 0.0, nu)
    with pytest.raises(ValueError, match=r"nu expected a finite number in \(-1, 0.5\), got nan \(element 1\)"):
        M.check_parameters(E, torch.tensor([0.3, float("nan")]))
    with pytest.raises(ValueError, match=r"Expected 'F' of shape \(N, 3, 3\), got \(4, 9\)"):
        mat.energy(F.reshape(4, 9), E, nu)
    with pytest.raises(ValueError, match=r"Expected 'E' of shape \(4,\)"):
        mat.energy(F, E[:3], nu)
    with pytest.raises(ValueError, match=r"law codes: expected values in \[0, 1, 2\]"):
        M.device_energy(torch.tensor([0, 1, 7, 2], dtype=torch.int32), F, E, nu)


def test_empty_input_is_well_formed():
    F = torch.zeros(0, 3, 3, dtype=torch.float64)
    for law, mat in M.FEM_MATERIALS.items():
        assert mat.first_piola(F, 1e4, 0.3).shape == (0, 3, 3) and mat.energy(F, 1e4, 0.3).shape == (0,)
        assert M.device_first_piola(law, F, 1e4, 0.3).shape == (0, 3, 3)
        assert M.device_energy(law, F, 1e4, 0.3).shape == (0,)
        assert M.device_first_piola_vjp(law, F, 1e4, 0.3, F).E.shape == (0,)
