"""Gradient-check helpers: directional central finite differences in float64.

A gradient test compares ``<grad f(x), d>`` with ``(f(x + h d) - f(x - h d)) / 2h`` on random
directions ``d``; "the gradient is non-zero" is not a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["DirectionalCheck", "directional_check"]


@dataclass(frozen=True)
class DirectionalCheck:
    """Result of one directional derivative comparison.

    Attributes:
        analytic: ``<grad, d>`` from autograd.
        numeric: central finite difference along ``d``.
        rel_error: ``|analytic - numeric| / max(|numeric|, atol)``.
    """

    analytic: float
    numeric: float
    rel_error: float


def directional_check(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, eps: float = 1e-6,
                      n_dirs: int = 3, seed: int = 0, atol: float = 1e-8) -> list[DirectionalCheck]:
    """Compare autograd's directional derivative of a scalar function with central differences.

    Args:
        fn: Scalar-valued function of the inputs.
        inputs: Float64 tensors; the ones with ``requires_grad`` are perturbed.
        eps: Finite-difference step along the unit-norm direction.
        n_dirs: Number of random directions.
        seed: Seed of the directions.
        atol: Floor of the denominator of the relative error.

    Returns:
        One :class:`DirectionalCheck` per direction.
    """
    gen = torch.Generator().manual_seed(seed)
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*xs)
    wrt = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(out, wrt, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
    results = []
    for _ in range(n_dirs):
        dirs = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for x in wrt]
        norm = torch.sqrt(sum((d * d).sum() for d in dirs))
        dirs = [d / norm for d in dirs]
        analytic = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        with torch.no_grad():
            def shifted(sign: float):
                it = iter(dirs)
                args = [x + sign * eps * next(it) if x.requires_grad else x for x in xs]
                return float(fn(*args))
            numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        rel = abs(analytic - numeric) / max(abs(numeric), atol)
        results.append(DirectionalCheck(analytic, numeric, rel))
    return results
