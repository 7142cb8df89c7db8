"""diffworld: a differentiable geometry and simulation engine.

Kernels are NVIDIA Warp (CPU and CUDA); PyTorch is the front. Every differentiable operation
is a ``torch.autograd.Function``, so scenes are optimized with torch optimizers.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
