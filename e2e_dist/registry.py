"""Named registries for the extension points: model kinds (`model.kind`) and data sources
(`data.source`). One path for every entry, built in or not:

- an installed package declares it under the entry-point group (`[project.entry-points."e2e_dist.models"]`
  in its pyproject): the built-in kinds and sources are declared so in e2e-dist's own pyproject;
- or the config names it by import path, `mylab.models:build_conformer` (importable on every node:
  installed there, or shipped in the Ray job's runtime env);
- or code registers it in-process with `@registry.register("name")` (scripts, tests).

Listing names imports nothing; an entry's module is imported when it is used. An entry is a
builder function; it may carry `options`, a pydantic model for its own config section
(`model.options` / `data.options`), set with `plugins.options(...)`. Errors are one line naming the field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Generic, TypeVar

from e2e_dist.errors import ConfigError

F = TypeVar("F", bound=Callable)


def is_import_path(name: str) -> bool:
    """`package.module:attr` names an object to import; a plain name is looked up."""
    return ":" in name


class Registry(Generic[F]):
    def __init__(self, field: str, group: str, source_modules: list[str]):
        self.field = field
        """The config field that names an entry (for error messages), e.g. `model.kind`."""
        self.group = group
        """The entry-point group installed packages declare entries under."""
        self.source_modules = source_modules
        """The built-in entries' modules: imported only when e2e-dist runs from a source tree
        without its package metadata (so without its entry points)."""
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            self._entries[name] = fn
            return fn

        return deco

    def _entry_points(self) -> dict[str, metadata.EntryPoint]:
        eps = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
        if not _declares_own(eps.values()):  # e2e-dist on the path without its metadata (a checkout
            for mod in self.source_modules:  # on a node): the built-ins register themselves on import
                importlib.import_module(mod)
        return eps

    def names(self) -> list[str]:
        """Every name a config may use (besides import paths), without importing plug-ins."""
        return sorted(set(self._entry_points()) | set(self._entries))

    def get(self, name: str) -> F:
        if is_import_path(name):
            return self._import(name)
        if name in self._entries:
            return self._entries[name]
        ep = self._entry_points().get(name)
        if ep is None:
            if name in self._entries:  # a built-in that registered itself when its module was imported
                return self._entries[name]
            raise ConfigError(f"{self.field}: unknown {self.field.split('.')[-1]} {name!r} "
                              f"(known: {', '.join(self.names())}; or a module:attr import path)")
        try:
            return ep.load()
        except Exception as e:  # noqa: BLE001 - a plug-in that does not import is one line about it
            raise ConfigError(f"{self.field}: {name!r} (entry point {ep.value} of {self.group}) does not "
                              f"import: {type(e).__name__}: {e}") from None

    def _import(self, path: str) -> F:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - ModuleNotFoundError, or an error inside the module
            raise ConfigError(f"{self.field}: cannot import {module_name!r} for {path!r}: "
                              f"{type(e).__name__}: {e}") from None
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ConfigError(f"{self.field}: module {module_name!r} has no {attr!r}")
        if not callable(obj):
            raise ConfigError(f"{self.field}: {path!r} is not a builder function (got {type(obj).__name__})")
        return obj


def declared_builtin(group: str, name: str) -> bool:
    """Whether e2e-dist itself declares `name` under `group` - read from package metadata, nothing
    imported. Without metadata (a source tree) every plain name counts as built in."""
    eps = {ep.name: ep for ep in metadata.entry_points(group=group)}
    if not _declares_own(eps.values()):
        return name not in eps  # only plug-ins are declared: any other plain name is ours
    ep = eps.get(name)
    return ep is not None and ep.value.startswith("e2e_dist.")


def _declares_own(eps) -> bool:
    """Whether e2e-dist's own package metadata is among these entry points."""
    return any(ep.value.startswith("e2e_dist.") for ep in eps)


def entry_point_names(group: str) -> list[str]:
    """The names installed packages (e2e-dist included) declare under `group`, nothing imported."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})
