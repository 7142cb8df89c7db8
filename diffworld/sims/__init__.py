"""Differentiable simulators (roadmap: mpm/, fem/, tactile/, nclaw/). Empty until the MPM issue."""

__all__: list[str] = []
