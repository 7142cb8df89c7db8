"""Constitutive laws: device stress vs d(energy)/dF and the torch reference; tangents vs finite
differences; plastic projections vs the torch reference; float32 stays finite at F = I."""

import math

import pytest
import torch

from diffworld.engine.gradcheck import directional_check
from diffworld.sims.mpm import materials as M

STRESS_LAWS = ["fluid", "corotated", "neo_hookean", "von_mises"]


def _random_F(n: int, scale: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    F = torch.eye(3, dtype=torch.float64) + scale * torch.randn(n, 3, 3, generator=gen, dtype=torch.float64)
    F[torch.linalg.det(F) < 0.2] = torch.eye(3, dtype=torch.float64)  # keep J well positive
    return F.to(dtype)


def _params(n: int, dtype=torch.float64, E=1.0e5, nu=0.3):
    return torch.full((n,), E, dtype=dtype), torch.full((n,), nu, dtype=dtype)


@pytest.mark.parametrize("law", STRESS_LAWS)
def test_stress_is_energy_derivative_and_matches_torch_reference(law):
    F = _random_F(64, 0.2, 1)
    E, nu = _params(64)
    tau = M.device_stress(law, F, E, nu)
    Fg = F.clone().requires_grad_()
    psi = M.energy_density(law, Fg, E, nu).sum()
    (P,) = torch.autograd.grad(psi, Fg)
    tau_energy = P @ F.transpose(-1, -2)
    scale = tau_energy.abs().max()
    assert (tau - tau_energy).abs().max() / scale < 1e-10
    assert (tau - M.kirchhoff_stress(law, F, E, nu)).abs().max() / scale < 1e-10


@pytest.mark.parametrize("law", STRESS_LAWS)
@pytest.mark.parametrize("scale", [0.2, 1e-4, 0.0])
def test_stress_tangent_matches_finite_differences(law, scale):
    # scale 0: exactly F = I (coincident singular values): the SVD adjoint must take its limit.
    F = _random_F(16, scale, 2)
    E, nu = _params(16)
    w = torch.randn(16, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    checks = directional_check(lambda F, E, nu: (M.device_stress(law, F, E, nu) * w).sum(),
                               [F.requires_grad_(), E.requires_grad_(), nu.requires_grad_()], eps=1e-6, n_dirs=3)
    for c in checks:
        assert c.rel_error < 1e-5, (law, scale, c)


@pytest.mark.parametrize("law", STRESS_LAWS)
def test_float32_tangent_is_finite_and_accurate_near_identity(law):
    # The textbook SVD adjoint divides by s_i^2 - s_j^2 and explodes here (Warp's svd3 adjoint).
    F64 = _random_F(32, 1e-6, 4)
    F64[:8] = torch.eye(3, dtype=torch.float64)
    E64, nu64 = _params(32)
    g = torch.randn(32, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        F = F64.to(dtype).requires_grad_()
        (M.device_stress(law, F, E64.to(dtype), nu64.to(dtype)) * g.to(dtype)).sum().backward()
        grads.append(F.grad.double())
    assert torch.isfinite(grads[0]).all()
    assert (grads[0] - grads[1]).abs().max() / grads[1].abs().max() < 1e-3


PLASTIC = {
    "fluid": dict(),
    "snow": dict(theta_c=0.02, theta_s=0.01),
    "von_mises": dict(yield_stress=3e3),
    "drucker_prager": dict(friction_angle=math.radians(30.0)),
}


def _plastic_args(n, dtype=torch.float64, **over):
    base = dict(E=1e5, nu=0.3, yield_stress=3e3, friction_angle=math.radians(30.0), theta_c=0.02, theta_s=0.01)
    base.update(over)
    return [torch.full((n,), base[k], dtype=dtype) for k in
            ("E", "nu", "yield_stress", "friction_angle", "theta_c", "theta_s")]


@pytest.mark.parametrize("law", list(PLASTIC))
def test_projection_matches_torch_reference(law):
    F = _random_F(128, 0.1, 6)
    args = _plastic_args(128)
    ours = M.device_projection(law, F, *args)
    ref = M.plastic_projection(law, F, *args)
    assert (ours - ref).abs().max() < 1e-7  # Warp svd3 (float64) is accurate to ~1e-9


@pytest.mark.parametrize("law", list(PLASTIC))
def test_projection_gradient_matches_finite_differences(law):
    F = _random_F(16, 0.05, 7)
    args = [a.requires_grad_() for a in _plastic_args(16)]
    w = torch.randn(16, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    checks = directional_check(lambda F, *a: (M.device_projection(law, F, *a) * w).sum(),
                               [F.requires_grad_(), *args], eps=1e-7, n_dirs=3)
    for c in checks:
        assert c.rel_error < 1e-5, (law, c)


def test_projection_returns_to_the_yield_surface():
    F = _random_F(256, 0.2, 9)
    E, nu, ys, fa, tc, ts = _plastic_args(256)
    Fn = M.device_projection("von_mises", F, E, nu, ys, fa, tc, ts)
    mu, _ = M.lame(E, nu)
    eps = torch.log(torch.linalg.svdvals(Fn))
    dev = (eps - eps.mean(-1, keepdim=True)).norm(dim=-1)
    assert (dev <= ys / (2 * mu) * (1 + 1e-9)).all()
    assert (dev > 0.99 * ys / (2 * mu)).any()  # some were projected


def test_material_validation_names_the_parameter():
    with pytest.raises(ValueError, match="unknown name 'honey'"):
        M.Material("honey")
    with pytest.raises(ValueError, match=r"nu expected a finite number in \(-1, 0.5\)"):
        M.Material("jelly", nu=0.5)
    with pytest.raises(ValueError, match="friction_angle"):
        M.Material("sand", friction_angle=95.0)


def test_scene_material_section_is_the_library_material():
    """One definition: the scene's material section has the library's parameters and applies the
    same ranges (and refuses YAML booleans)."""
    from pydantic import ValidationError

    from diffworld.tasks.mpm.config import MaterialConfig

    assert set(MaterialConfig.model_fields) == {"type", "name", "path", *M.PARAMETERS}  # type, path: neural laws
    for name, value in [("E", -1.0), ("nu", 0.5), ("friction_angle", 95.0), ("theta_c", 1.0), ("E", float("inf")),
                        ("E", True)]:
        with pytest.raises(ValueError, match=name):
            M.Material("sand", **{name: value})
        with pytest.raises(ValidationError, match=name):
            MaterialConfig(name="sand", **{name: value})
    assert MaterialConfig(name="jelly", E=1e4).build() == M.Material("jelly", E=1e4)
