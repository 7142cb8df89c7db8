"""Neural SDF: geometric initialization, dtypes, parameter gradients vs finite differences."""

import pytest
import torch
from torch.func import functional_call

from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.neural_sdf import NeuralSDF
from diffworld.geometry.sdf import Sphere, Union

F64 = torch.float64
R = 0.3


def cube_points(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3), generator=g, dtype=F64) - 0.5).to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_frequencies", [0, 4])
def test_init_approximates_sphere(seed, n_frequencies):
    net = NeuralSDF(width=128, depth=4, n_frequencies=n_frequencies, radius=R, seed=seed)
    x = cube_points(20000, seed=10)
    r = x.norm(dim=-1)
    with torch.no_grad():
        f = net(x)
    err = (f - (r - R)).abs()
    shell = (r > 0.2) & (r < 0.4)  # around the init surface
    # SAL init is approximate at a finite width: |x| times a direction-dependent factor ~ 1 +- 15%.
    assert float(err[shell].mean()) < 0.06
    assert float(err[shell].max()) < 0.2
    assert float(err.mean()) < 0.12
    # Sign is right away from the sphere.
    assert bool((f[r < 0.12] < 0).all())
    assert bool((f[r > 0.55] > 0).all())


def test_calibration_centers_the_init_sphere():
    net = NeuralSDF(width=64, depth=3, radius=R, seed=1)
    d = torch.randn(4000, 3, generator=torch.Generator().manual_seed(3))
    on_sphere = d / d.norm(dim=-1, keepdim=True) * R
    with torch.no_grad():
        assert abs(float(net(on_sphere).mean())) < 0.01
    raw = NeuralSDF(width=64, depth=3, radius=R, seed=1, calibrate=False)
    assert not torch.equal(raw.out.weight, net.out.weight)


def test_deterministic_and_seeded():
    a, b, c = NeuralSDF(64, 2, seed=5), NeuralSDF(64, 2, seed=5), NeuralSDF(64, 2, seed=6)
    x = cube_points(10)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize("n_frequencies", [0, 3])
def test_parameter_gradients_match_finite_differences_float64(n_frequencies):
    net = NeuralSDF(width=32, depth=3, n_frequencies=n_frequencies, radius=0.25, seed=0, beta=100.0).to(F64)
    # Move off the init (Fourier weights start at zero) so every parameter matters.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=F64))
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    x = cube_points(64, seed=2, dtype=F64)
    w = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=F64)

    def loss(*ps):
        return (functional_call(net, dict(zip(names, ps)), (x,)) * w).sum()

    for check in directional_check(loss, params, eps=1e-6, n_dirs=3, seed=9):
        assert abs(check.analytic) > 1e-8
        assert check.rel_error < 1e-6, check
    # Gradients reach every parameter through the module API too.
    net.zero_grad()
    (net(x) * w).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_point_gradient_and_composition():
    net = NeuralSDF(width=32, depth=2, seed=0).double()
    x = cube_points(32, seed=5, dtype=F64).requires_grad_(True)
    for check in directional_check(lambda p: net(p).sum(), [x], eps=1e-6):
        assert check.rel_error < 1e-6, check
    # It is an SDF module: composes with analytic fields; outputs have shape (N,).
    u = Union(net, Sphere(torch.tensor(0.1, dtype=F64), torch.tensor([0.4, 0.0, 0.0], dtype=F64)))
    assert u(x).shape == (32,)
    values, grads = net.value_and_grad(x.detach())
    assert values.shape == (32,) and grads.shape == (32, 3)


def test_dtypes_and_errors():
    net = NeuralSDF(width=16, depth=2)
    assert net(torch.zeros(3, 3)).dtype == torch.float32
    with pytest.raises(TypeError, match="'points' of dtype torch.float32"):
        net(torch.zeros(3, 3, dtype=F64))
    assert net.to(F64)(torch.zeros(3, 3, dtype=F64)).dtype == F64
    assert NeuralSDF(width=16, depth=1, dtype=F64)(torch.zeros(2, 3, dtype=F64)).shape == (2,)
    with pytest.raises(ValueError, match="'points' of shape"):
        net(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="'width'"):
        NeuralSDF(width=0)
    with pytest.raises(ValueError, match="'depth'"):
        NeuralSDF(depth=1.5)
    with pytest.raises(ValueError, match="'n_frequencies'"):
        NeuralSDF(n_frequencies=-1)
    with pytest.raises(ValueError, match="'radius'"):
        NeuralSDF(radius=0.0)
    with pytest.raises(ValueError, match="'beta'"):
        NeuralSDF(beta=-1.0)
    with pytest.raises(TypeError, match="'dtype'"):
        NeuralSDF(dtype=torch.float16)
