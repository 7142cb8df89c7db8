"""Registries: a typed section's ``type:`` names a config model and the builder that runs it.

Nothing is ever ``eval``-ed: a scene can only name what code registered.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Union

from pydantic import BaseModel, Field

__all__ = ["Registry", "TASKS"]


class Registry:
    """Name -> (pydantic config model, builder).

    Args:
        kind: What the registry holds, used in messages ("task", "target", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type[BaseModel], Callable[..., Any]]] = {}

    def register(self, name: str, model: type[BaseModel], builder: Callable[..., Any]) -> None:
        """Register ``model`` (whose ``type`` field is ``Literal[name]``) and its builder."""
        if name in self._entries and self._entries[name][0] is not model:
            raise ValueError(f"{self.kind} type {name!r} is already registered")
        self._entries[name] = (model, builder)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def model(self, name: str) -> type[BaseModel]:
        """The config model registered as ``name``."""
        try:
            return self._entries[name][0]
        except KeyError:
            raise ValueError(f"unknown {self.kind} type {name!r}; expected one of {self.names()}") from None

    def builder(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name][1]
        except KeyError:
            raise ValueError(f"unknown {self.kind} type {name!r}; expected one of {self.names()}") from None

    def union(self) -> Any:
        """A discriminated union of the registered models (for a pydantic field)."""
        models = tuple(m for m, _ in self._entries.values())
        if not models:
            raise RuntimeError(f"no {self.kind} types registered")
        if len(models) == 1:
            return models[0]
        return Annotated[Union[models], Field(discriminator="type")]


TASKS = Registry("task")
