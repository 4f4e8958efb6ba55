"""Model registry: `kind` in the config -> builder. New model kinds register here."""

from __future__ import annotations

import importlib
from typing import Callable

from e2e_dist.errors import ConfigError
from e2e_dist.models.base import E2EModel

_BUILDERS: dict[str, Callable[..., E2EModel]] = {}
# Modules imported on first lookup, so registering a kind needs no import elsewhere.
_MODULES = ["e2e_dist.models.gpt", "e2e_dist.models.resnet", "e2e_dist.models.ctc_speech"]


def register_model(kind: str) -> Callable[[Callable[..., E2EModel]], Callable[..., E2EModel]]:
    def deco(fn: Callable[..., E2EModel]) -> Callable[..., E2EModel]:
        _BUILDERS[kind] = fn
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a missing model module is fine; a broken import inside one is not
                raise


def model_kinds() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def build_model(model_cfg, data_cfg=None) -> E2EModel:
    """Build the network described by `model_cfg` (a config.ModelConfig)."""
    _load_all()
    try:
        builder = _BUILDERS[model_cfg.kind]
    except KeyError:
        raise ConfigError(f"model.kind: unknown kind {model_cfg.kind!r} (known: {', '.join(sorted(_BUILDERS))})") from None
    return builder(model_cfg, data_cfg)
