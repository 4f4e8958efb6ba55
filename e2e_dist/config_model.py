"""The model section of the run config: the built-in kinds' typed sections and a plug-in's.

Split from config.py to keep each module small; import from e2e_dist.config. This module must
not import Ray, DeepSpeed or torch (a plug-in's own module is imported when its config validates).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from e2e_dist.config_data import Section
from e2e_dist.errors import ConfigError


# ---------------------------------------------------------------------------------------- model
class GPTConfig(Section):
    kind: Literal["gpt"] = "gpt"
    """Byte-level GPT: bytes in, next-byte logits out."""
    n_layer: int = Field(2, ge=1)
    """Transformer blocks."""
    n_head: int = Field(2, ge=1)
    """Attention heads; must divide d_model."""
    d_model: int = Field(64, ge=8)
    """Residual stream width."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention and MLP outputs."""
    max_seq_len: int = Field(1024, ge=8)
    """Size of the learned position table; must be >= data.seq_len."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        return self


class ResNetConfig(Section):
    kind: Literal["resnet"] = "resnet"
    """ResNet-style CNN: pixels in, class logits out."""
    widths: list[int] = [16, 32, 64]
    """Channels of each stage; each stage after the first halves the resolution."""
    blocks_per_stage: int = Field(1, ge=1)
    """Residual blocks in each stage."""
    stem: Literal["conv3", "conv7"] = "conv3"
    """conv3: one 3x3 conv (small images); conv7: 7x7 stride-2 + max-pool (ImageNet style)."""
    in_channels: int = Field(1, ge=1)
    """Image channels (1 = grayscale, 3 = RGB)."""
    num_classes: int = Field(10, ge=2)
    """Output classes."""
    input_norm: Literal["none", "standardize", "standardize-polarity", "flatten-polarity",
                        "flatten-polarity-stacked"] = "none"
    """Per-image input normalization inside the model (so `predict` applies it too): `standardize`
    each image to zero mean, unit deviation; `standardize-polarity` also flips it to a dark
    background (glyphs in either polarity look alike); `flatten-polarity` subtracts the background
    too (a median filter: shadows and light gradients gone); `-stacked` feeds both (models/resnet.py)."""


class CTCSpeechConfig(Section):
    kind: Literal["ctc-speech"] = "ctc-speech"
    """Waveform -> characters: strided conv front end, transformer encoder, CTC head."""
    front_end: Literal["conv", "mel"] = "conv"
    """conv: strided convs over the raw samples; mel: log-mel energies computed in the model (fixed
    filterbank, 10 ms hop) then two stride-2 convs (40 ms frames): learns several times faster."""
    conv_channels: int = Field(64, ge=4)
    """Channels of the front end's convs."""
    conv_strides: list[int] = [5, 4, 4, 2]
    """conv front end: strides of its convs (their product is samples per encoder frame)."""
    n_layer: int = Field(2, ge=1)
    """Encoder blocks."""
    n_head: int = Field(2, ge=1)
    """Encoder attention heads; must divide d_model."""
    d_model: int = Field(64, ge=8)
    """Encoder width."""
    alphabet: str = " abcdefghijklmnopqrstuvwxyz'"
    """Characters the head predicts (CTC blank is added as index 0)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CTCSpeechConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        return self


class PluginModelConfig(Section):
    kind: str
    """A plug-in: the name an installed package declares under the `e2e_dist.models` entry points,
    or an import path `package.module:builder` importable on every node (docs/plugins.md)."""
    options: Any = {}
    """The plug-in's own options, validated against the pydantic model it declares (plugins.options)
    when the config loads: a builder gets them typed."""

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        # Before the fields: an unknown kind or a plug-in that does not import is the first error.
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            return data
        from e2e_dist.models.registry import MODELS
        from e2e_dist.plugins import validated_options

        try:
            typed = validated_options(MODELS.get(data["kind"]), data.get("options"), "model.options")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return {**data, "options": typed} if typed is not None else data


BUILTIN_MODEL_KINDS = ("gpt", "resnet", "ctc-speech")
"""Kinds with typed sections of their own here; any other kind is a plug-in (PluginModelConfig)."""


def _model_tag(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    if kind is None:
        return None
    return kind if kind in BUILTIN_MODEL_KINDS else "plugin"


ModelConfig = Annotated[Annotated[GPTConfig, Tag("gpt")] | Annotated[ResNetConfig, Tag("resnet")] | Annotated[CTCSpeechConfig, Tag("ctc-speech")] | Annotated[PluginModelConfig, Tag("plugin")],
                        Discriminator(_model_tag)]
