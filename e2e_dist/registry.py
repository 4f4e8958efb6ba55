"""A named registry whose entries register themselves when their module is imported.

Both extension points (model kinds, data sources) are one of these: a new kind is a new module
listed in `modules` plus a `@registry.register("name")` on its builder.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from e2e_dist.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, field: str, modules: list[str]):
        self.field = field
        """The config field that names an entry (for error messages), e.g. `model.kind`."""
        self.modules = modules
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            self._entries[name] = fn
            return fn

        return deco

    def _load_all(self) -> None:
        for mod in self.modules:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a missing optional module is fine; a broken import inside one is not
                    raise

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._entries)

    def get(self, name: str) -> F:
        self._load_all()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{self.field}: unknown {self.field.split('.')[-1]} {name!r} "
                              f"(known: {', '.join(sorted(self._entries))})") from None
