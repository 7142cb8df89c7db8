"""A small neural signed distance field (MLP) with geometric initialization.

Geometric initialization (Atzmon & Lipman, SAL, 2020): hidden weights ~ N(0, 2 / fan_out),
hidden biases 0, last-layer weights ~ N(sqrt(pi / fan_in), 1e-4), last bias ``-radius``. For a
ReLU network this makes the output close to ``|x| - radius`` (the expected value of
``sum_i w_i relu(a_i . h)`` over the random weights is ``|h|``, and He-scaled hidden layers keep
``|h|`` proportional to ``|x|``); ``Softplus(beta=100)`` is a smooth ReLU, so the same holds up
to ~ log(2) / beta near the origin. With a Fourier encoding, the first layer's weights on the
sin/cos features start at zero so the initial field depends only on raw ``x`` (IDR/NeuS-style).

At a finite width the random weights make the initial field ``c(x/|x|) |x| - radius`` with a
direction-dependent factor ``c`` that varies by about 10-20% at width 128 (less when wider), and
whose mean over directions drifts from 1 from seed to seed. ``calibrate=True`` (default) removes
the drift without data: the last-layer weights are rescaled so that the mean of the field over
a fixed, evenly spread set of points on the sphere of ``radius`` is exactly 0.
"""

from __future__ import annotations

import math

import torch

from diffworld.geometry.sdf import SDF

__all__ = ["NeuralSDF"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected '{name}' to be an int >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Expected '{name}' to be a finite number > 0, got {value!r}")
    return float(value)


def _fibonacci_sphere(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """n evenly spread unit vectors, shape (n, 3)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = torch.sqrt(1.0 - z * z)
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1).to(device=device, dtype=dtype)


class NeuralSDF(SDF):
    """MLP field ``f(x) : R^3 -> R``, initialized to approximate a sphere's SDF.

    Layers: [optional Fourier encoding] -> ``depth`` x (Linear(width) + Softplus(beta)) ->
    Linear(1). Being an :class:`SDF`, it composes with CSG and transforms.

    Args:
        width: Hidden width, >= 1 (>= 64 recommended for a close initial sphere).
        depth: Number of hidden layers, >= 1.
        n_frequencies: Fourier frequencies per axis (0 disables the encoding); frequency ``l``
            is ``2^l * pi`` [rad / m], features ``sin``/``cos`` of ``2^l pi x``.
        radius: Radius [m] of the sphere approximated at initialization, > 0.
        beta: Softplus sharpness [1 / m], > 0 (large = close to ReLU).
        seed: Seed of the initialization (the global RNG is not touched).
        calibrate: Rescale the last layer so the mean value on the init sphere is 0.
        dtype: float32 or float64 (or call ``.to(dtype)`` later).

    Raises:
        ValueError: Invalid sizes, radius or beta.
    """

    def __init__(self, width: int = 128, depth: int = 4, n_frequencies: int = 0, radius: float = 0.3,
                 beta: float = 100.0, seed: int = 0, calibrate: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width = _check_int("width", width, 1)
        self.depth = _check_int("depth", depth, 1)
        self.n_frequencies = _check_int("n_frequencies", n_frequencies, 0)
        self.radius = _check_positive("radius", radius)
        self.beta = _check_positive("beta", beta)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected 'seed' to be an int, got {seed!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Expected 'dtype' float32 or float64, got {dtype}")
        freqs = (2.0 ** torch.arange(self.n_frequencies, dtype=torch.float64)) * math.pi
        self.register_buffer("frequencies", freqs.to(dtype), persistent=False)
        in_dim = 3 + 6 * self.n_frequencies
        dims = [in_dim] + [self.width] * self.depth
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=dtype) for a, b in zip(dims[:-1], dims[1:]))
        self.out = torch.nn.Linear(self.width, 1, dtype=dtype)
        self.activation = torch.nn.Softplus(beta=self.beta)
        self.reset_parameters(seed, calibrate=bool(calibrate))

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, calibrate: bool = True) -> None:
        """Re-apply the geometric initialization (sphere of ``self.radius``).

        Args:
            seed: Seed of the random weights.
            calibrate: Rescale the last layer so the mean value on the sphere is 0.
        """
        gen = torch.Generator().manual_seed(seed)

        def normal_(t: torch.Tensor, mean: float, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean)

        for i, layer in enumerate(self.hidden):
            normal_(layer.weight, 0.0, math.sqrt(2.0) / math.sqrt(layer.out_features))
            layer.bias.zero_()
            if i == 0 and self.n_frequencies:
                layer.weight[:, 3:] = 0.0
        normal_(self.out.weight, math.sqrt(math.pi) / math.sqrt(self.width), 1e-4)
        self.out.bias.fill_(-self.radius)
        if calibrate:
            pts = _fibonacci_sphere(512, dtype=self.out.weight.dtype, device=self.out.weight.device) * self.radius
            h = self._features(pts)
            mean = float((h @ self.out.weight[0]).mean())
            if mean > 0.0:
                self.out.weight.mul_(self.radius / mean)

    def _features(self, p: torch.Tensor) -> torch.Tensor:
        h = self.encode(p)
        for layer in self.hidden:
            h = self.activation(layer(h))
        return h

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """Input features: ``x`` then ``sin``/``cos`` of each frequency times ``x``, shape (N, 3 + 6L)."""
        if not self.n_frequencies:
            return points
        arg = points[:, None, :] * self.frequencies.to(points)[:, None]  # (N, L, 3)
        return torch.cat([points, torch.sin(arg).reshape(points.shape[0], -1),
                          torch.cos(arg).reshape(points.shape[0], -1)], -1)

    def _eval(self, p: torch.Tensor) -> torch.Tensor:
        want = self.out.weight.dtype
        if p.dtype != want:
            raise TypeError(f"Expected 'points' of dtype {want} (the network's dtype; use .to(dtype)), got {p.dtype}")
        return self.out(self._features(p))[:, 0]

    def extra_repr(self) -> str:
        return (f"width={self.width}, depth={self.depth}, n_frequencies={self.n_frequencies}, "
                f"radius={self.radius}, beta={self.beta}")
