"""Model registry: `model.kind` in the config -> builder `fn(model_cfg, data_cfg=None) -> E2EModel`.

The built-in kinds are entry points of e2e-dist's own pyproject (group `e2e_dist.models`), like any
installed plug-in's; see e2e_dist/registry.py and docs/plugins.md."""

from __future__ import annotations

from e2e_dist.models.base import E2EModel
from e2e_dist.registry import Registry

MODELS: Registry = Registry("model.kind", "e2e_dist.models",
                            ["e2e_dist.models.gpt", "e2e_dist.models.resnet", "e2e_dist.models.ctc_speech"])
register_model = MODELS.register


def model_kinds() -> list[str]:
    return MODELS.names()


def build_model(model_cfg, data_cfg=None) -> E2EModel:
    """Build the network described by `model_cfg` (a config.ModelConfig)."""
    return MODELS.get(model_cfg.kind)(model_cfg, data_cfg)
