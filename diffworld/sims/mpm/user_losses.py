"""User-written losses of MPM scenes (``python`` loss terms): :class:`SceneInfo` (what such a
loss gets besides the states), :func:`load_callable` (a ``module:function`` or ``file.py:function``
spec, loaded without ``eval``) and :func:`call_user_loss` (its result checked, with the key in the
message). Re-exported by :mod:`diffworld.sims.mpm.losses`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["SceneInfo", "call_user_loss", "load_callable"]


@dataclass
class SceneInfo:
    """What a user loss (a ``python`` loss term) gets besides the states.

    A user loss is called as ``fn(states, info) -> loss`` where ``states`` is the list of recorded
    :class:`~diffworld.sims.mpm.State` (index 0 the initial state, then one per control step up to
    the current horizon: ``len(states) == info.steps + 1``; ``states[k].x`` are the positions [m],
    shape (N, 3), differentiable) and ``loss`` is a scalar tensor connected to them.

    Attributes:
        model: The :class:`~diffworld.sims.mpm.Model` (``model.params``, ``model.body``...).
        masks: Particles of each body and emitter, by name: bool tensors (N,); an emitter's mask
            holds only the particles released by the last recorded state (``model.released_mask(k *
            substeps)`` gives those released by state ``k``).
        mass: Particle masses [kg], shape (N,).
        grid_lower: Position of grid node (0, 0, 0) [m].
        dx: Grid spacing [m].
        grid_shape: Grid nodes per axis (gx, gy, gz).
        dt: Substep [s].
        substeps: Substeps per control step.
        steps: Control steps simulated in ``states`` (the current horizon).
        total_steps: Control steps of the whole task.
        actions: Optimized collider velocities by collider name, shape (total_steps, 6) (linear
            [m/s], angular [rad/s]); differentiable, e.g. for action regularizers.
        body: The term's ``body`` key (None if not given).
        options: The term's ``options`` mapping from the scene file.
    """

    model: Any
    masks: dict[str, torch.Tensor]
    mass: torch.Tensor
    grid_lower: tuple[float, float, float]
    dx: float
    grid_shape: tuple[int, int, int]
    dt: float
    substeps: int
    steps: int
    total_steps: int
    actions: dict[str, torch.Tensor] = field(default_factory=dict)
    body: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def load_callable(spec: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """Import a callable named ``"package.module:name"`` or ``"file.py:name"`` (no ``eval``).

    Args:
        spec: ``module:attr`` where ``module`` is an importable dotted module path, or a ``.py``
            file (relative to ``base_dir`` unless absolute); ``attr`` may be dotted
            (``Class.method``).
        base_dir: Folder of relative ``.py`` paths (the scene file's folder).

    Returns:
        The callable.

    Raises:
        ValueError: Malformed spec, module or file not importable, attribute missing or not
            callable (the message says which and why).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"expected 'module.path:callable' or 'file.py:callable', got {spec!r}")
    mod_name, attr = spec.split(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ValueError(f"{spec!r}: file not found: {path}")
        resolved = path.resolve()
        name = f"diffworld_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            try:
                module_spec = importlib.util.spec_from_file_location(name, resolved)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - reported with the spec
                sys.modules.pop(name, None)
                raise ValueError(f"{spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - reported with the spec
            raise ValueError(f"{spec!r}: cannot import module {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r}: {attr!r} is not callable (got {type(obj).__name__})")
    return obj


def call_user_loss(fn: Callable[..., Any], states: Sequence[Any], info: SceneInfo, key: str) -> torch.Tensor:
    """Call a user loss and check it returned a scalar tensor (``key`` names it in errors)."""
    value = fn(states, info)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key}: the loss function returned {type(value).__name__}; expected a scalar torch.Tensor")
    if value.numel() != 1:
        raise ValueError(f"{key}: the loss function returned shape {tuple(value.shape)}; expected a scalar")
    return value.reshape(())
