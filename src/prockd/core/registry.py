"""A name -> class registry (no ``if method == ...`` chains)."""
from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from pydantic import ValidationError

from prockd.core.config import format_errors
from prockd.errors import ProckdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes; ``register`` is a class decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._moved: dict[str, str] = {}

    def moved(self, name: str, message: str) -> None:
        """A name that is no longer registered: asking for it raises ``message`` (what to use instead)."""
        self._moved[name] = message

    def register(self, name: str):
        """Class decorator registering ``cls`` under ``name``."""
        def deco(cls):
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = cls
            cls.name = name
            return cls
        return deco

    def get(self, name: str) -> T:
        """Return the class registered as ``name`` or raise a ProckdError with near matches."""
        if name not in self._items:
            if name in self._moved:
                raise ProckdError(f"{self.kind} '{name}': {self._moved[name]}")
            near = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ProckdError(f"unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)


def method_params(registry: Registry, cfg):
    """A run's method class from ``registry`` and its typed, validated ``Params`` (errors name the
    ``method.params`` keys; a method that distils needs a ``teacher`` section). Config files are validated
    without importing the method registries; the engines (and the benchmark's run queue) call this before
    anything runs."""

    cls = registry.get(cfg.method.name)
    try:
        params = cls.Params(**cfg.method.params)
    except ValidationError as e:
        raise ProckdError(f"config error: {format_errors(e, prefix='method.params', model=cls.Params)}") from None
    if getattr(cls, "needs_teacher", False) and cfg.teacher is None:
        raise ProckdError(f"config error: {registry.kind} '{cfg.method.name}' needs a 'teacher' section")
    return cls, params
